"""megatron-domain: one engine for domain-adaptive continued pre-training, SFT, DPO and
rejection-sampled SFT of Llama-family models."""

__version__ = "0.1.0"
