"""Llama-family decoder, attention backends."""
