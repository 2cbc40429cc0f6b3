"""Stages are modes of the one engine. A stage provides:

- `setup(ctx)`: build its data (and anything else it needs) from the StageContext;
- `batches(step) -> list[micro-batch]`: the micro-batches of one optimizer step for this rank;
- `forward_step(batch, model) -> (output, loss_fn)`: run the model; `loss_fn(output)` returns
  `(loss_sum, loss_count, metrics)` so the engine can normalize over micro-batches and ranks
  (`loss_count` is the number of loss tokens, or of pairs for a per-pair loss). `metrics` holds
  per-micro-batch *sums* that the engine adds up over the job and divides by the job's
  loss_count (key `tokens`: the tokens processed, summed only; it sets tokens/s when the stage
  has `reports_tokens = True`);
- `state_dict()` / `load_state_dict()`: the data cursor, saved in every checkpoint;
- `close()` (optional): release what the stage started (an in-process vLLM engine); the engine
  calls it when training ends or fails;
- for pipeline parallelism (optional): `pipeline_batch(micro) -> PipelineBatch` (the step's
  micro-batches as model inputs and one loss target tensor that the schedule splits back into
  micro-batches) and `pipeline_loss(output, target) -> loss_sum`, computed on the last stage.

Stages never import each other or the engine. A new stage is one file plus an entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from megatron_domain.config import Config
from megatron_domain.data.tokenizer import TextTokenizer

STAGES = {"pretrain": "megatron_domain.stages.pretrain:PretrainStage",
          "sft": "megatron_domain.stages.sft:SftStage",
          "dpo": "megatron_domain.stages.dpo:DpoStage",
          "rs_sft": "megatron_domain.stages.rs_sft:RsSftStage"}


@dataclass
class StageContext:
    """What the engine hands a stage at setup. `model` is the policy being trained (a
    parallel.apply.ParallelModel, holding its initial weights during setup: a resumed run loads
    its checkpoint after); `build_reference()` builds a frozen model with the run's initial
    weights in the same parallel layout (a DPO reference); `rank`/`tp_size`: this process's
    global rank and the tensor-parallel degree; `pipeline_forward(model, inputs, kwargs)`
    (pp > 1 only): a forward-only pass of a pipelined model over a step's micro-batches,
    returning the last stage's output on the rank that holds it (parallel.pipeline)."""

    cfg: Config
    tokenizer: TextTokenizer
    device: torch.device
    run_dir: Path
    dp_rank: int = 0
    dp_size: int = 1
    model: Any = None
    build_reference: Callable[[], Any] | None = None
    rank: int = 0
    tp_size: int = 1
    pipeline_forward: Callable[[Any, torch.Tensor, dict], torch.Tensor | None] | None = None


@dataclass
class PipelineBatch:
    """A step's batch in the form pipeline schedules take: `inputs` for the first stage,
    `kwargs` for every stage, `target` for the loss on the last stage (all split along dim 0).
    `metrics()` (optional) gives the stage's metric sums of the step after the schedule ran:
    the sums on the last stage, the same keys (zeros) on the other ranks."""

    inputs: torch.Tensor
    kwargs: dict
    target: torch.Tensor
    loss_tokens: torch.Tensor
    metrics: Callable[[], dict] | None = None


LossFn = Callable[[Any], tuple[torch.Tensor, torch.Tensor, dict]]


class Stage(Protocol):
    """The contract between the engine and a stage."""

    def setup(self, ctx: StageContext) -> None: ...

    def batches(self, step: int) -> list[dict]: ...

    def forward_step(self, batch: dict, model: torch.nn.Module) -> tuple[Any, LossFn]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def create_stage(mode: str) -> Stage:
    """Instantiate the stage registered for `mode`."""
    if mode not in STAGES:
        raise ValueError(f"mode: unknown {mode!r}; registered stages: {', '.join(STAGES)}")
    module, name = STAGES[mode].split(":")
    return getattr(importlib.import_module(module), name)()
