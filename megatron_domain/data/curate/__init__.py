"""`mdt data curate`: raw documents in, a clean, deduplicated, redacted, quality-filtered
corpus out (JSONL and the Megatron indexed dataset the engine reads), with a report of what
each step removed. Built on HF's datatrove (executors, MinHash and exact span dedup, Gopher
filters, writers); ours are only the steps it lacks (multi-format reading and extraction,
Unicode/whitespace cleanup, the PII patterns with checksums). See curate/pipeline.py."""
