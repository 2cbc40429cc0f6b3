"""Evaluation harness: held-out perplexity on named sets, base-model selection, reports."""
