"""Data: tokenizers, Megatron indexed corpora, blending, packing and the demo corpora."""
