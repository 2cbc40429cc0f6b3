"""`mdt data curate`: raw documents in, a clean, deduplicated, redacted, quality-filtered
corpus out (JSONL and the Megatron indexed dataset the engine reads), with a report of what
each step removed. Built on HF's datatrove (executors: local, Ray, Slurm; MinHash and exact span
dedup, Gopher filters, writers); ours are only the steps it lacks (multi-format reading and
extraction, Unicode/whitespace cleanup, the PII patterns with checksums and the optional spaCy
NER, the quantile-dropping fastText classifier, a fast word tokenizer). See curate/pipeline.py.
`mdt data train-quality` trains the classifier (curate/quality_model.py) and `mdt data
tune-mixture` weights the corpora by proxy trainings (curate/mixture.py)."""
