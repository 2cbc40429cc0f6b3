"""`mode: pretrain`: causal-LM training on a weighted blend of packed corpora (base
pre-training and DACPT with replay are the same stage with different blends).

Departures from the plain recipe: documents are packed with per-document attention and
position resets (no attention or loss across an EOD), as in DESIGN.md "Data".
"""

from __future__ import annotations

from pathlib import Path

from megatron_domain.data.indexed import build_blended_dataset, check_prefix
from megatron_domain.data.packing import PackedSampleStream
from megatron_domain.kernels.registry import auto_backend, get_kernel
from megatron_domain.stages import StageContext
from megatron_domain.stages.causal_lm import (
    causal_lm_forward_step, causal_lm_pipeline_batch, causal_lm_pipeline_loss, micro_batch_starts,
    select_forward_step)


def corpus_stream(ctx: StageContext, num_samples: int) -> PackedSampleStream:
    """The blended, packed rows of `data.corpora` (num_samples rows of data.seq_len), with the
    configured pack-metadata kernel; shared by pretraining and the SFT modes' replay."""
    cfg = ctx.cfg
    for i, corpus in enumerate(cfg.data.corpora):
        check_prefix(corpus.path, f"data.corpora[{i}].path")
    cache = cfg.data.cache_dir or str(Path(ctx.run_dir) / "data_cache")
    dataset = build_blended_dataset(
        [c.path for c in cfg.data.corpora], [c.weight for c in cfg.data.corpora], num_samples=num_samples,
        seq_len=cfg.data.seq_len, vocab_size=ctx.tokenizer.vocab_size, eod_id=ctx.tokenizer.eod_id,
        seed=cfg.data.seed, cache_dir=cache)
    backend = cfg.kernels.pack_metadata
    if backend == "auto":
        backend = auto_backend("pack_metadata", ctx.device)
    # the CUDA kernel works on GPU tensors: rows go to the device before their metadata is built
    metadata_device = ctx.device if backend == "cuda" else None
    return PackedSampleStream(dataset, ctx.tokenizer.eod_id, get_kernel("pack_metadata", backend, metadata_device or "cpu"),
                              metadata_device)


class PretrainStage:
    """Blended, packed causal-LM batches; the cursor counts consumed samples (global)."""

    def __init__(self) -> None:
        self.consumed_samples = 0
        self.stream: PackedSampleStream | None = None

    def setup(self, ctx: StageContext) -> None:
        """Build the blended dataset for the whole run (steps x global batch samples)."""
        self.forward_step = select_forward_step(ctx.cfg, ctx.device)
        cfg = ctx.cfg
        if not cfg.data.corpora:
            raise ValueError("data.corpora: the pretrain mode needs at least one corpus "
                             "(a list of {path, weight})")
        self.global_batch = cfg.train.global_batch_size
        self.micro_batch = cfg.train.micro_batch_size
        self.dp_rank, self.dp_size = ctx.dp_rank, ctx.dp_size
        if self.global_batch % (self.micro_batch * self.dp_size):
            raise ValueError(f"train.global_batch_size ({self.global_batch}) must be a multiple of "
                             f"micro_batch_size x data-parallel size ({self.micro_batch} x {self.dp_size})")
        self.stream = corpus_stream(ctx, cfg.train.steps * self.global_batch)

    def batches(self, step: int) -> list[dict]:
        """This rank's micro-batches of the next global batch; advances the cursor."""
        starts = micro_batch_starts(self.consumed_samples, self.global_batch, self.micro_batch, self.dp_rank,
                                    self.dp_size)
        micro = [self.stream.micro_batch(start, self.micro_batch) for start in starts]
        self.consumed_samples += self.global_batch
        return micro

    # the causal-LM step on packed rows, shared with the other next-token stages (setup picks
    # the fused-cross-entropy form when kernels.fused_cross_entropy)
    forward_step = staticmethod(causal_lm_forward_step)
    pipeline_batch = staticmethod(causal_lm_pipeline_batch)
    pipeline_loss = staticmethod(causal_lm_pipeline_loss)

    def state_dict(self) -> dict:
        """The data cursor."""
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved cursor."""
        self.consumed_samples = int(state["consumed_samples"])
