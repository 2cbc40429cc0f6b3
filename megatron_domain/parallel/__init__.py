"""Parallelism and model transforms applied in DESIGN.md's fixed build order."""
