"""Pipeline parallelism with `torch.distributed.pipelining`.

The model is split into pp x virtual stages of consecutive decoder layers; the embedding
goes with stage 0 and the final norm + output layer with the last stage. Every chunk is a
`Transformer` that keeps the global layer names (`layers.17...`), so checkpoints do not
depend on the split. Stages map to ranks in loop order (stage s on pp rank s % pp) except
for the V-shaped zero-bubble schedule (rank r holds stages r and 2 pp - 1 - r).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble, ScheduleLoopedBFS,
    ScheduleZBVZeroBubble)

from megatron_domain.models.llama import Transformer

SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "looped_bfs": ScheduleLoopedBFS,
    "interleaved_zero_bubble": ScheduleInterleavedZeroBubble,
    "zbv_zero_bubble": ScheduleZBVZeroBubble,
}


def layer_split(num_layers: int, num_stages: int, explicit: list[int] | None = None) -> list[tuple[int, int]]:
    """[start, end) layer ranges of each stage. `explicit` gives the count per stage; otherwise
    the split is even and the remainder goes to the middle stages (the first and last also hold
    the embedding and the output layer)."""
    if explicit:
        counts = list(explicit)
    else:
        counts = [num_layers // num_stages] * num_stages
        by_distance_from_middle = sorted(range(num_stages), key=lambda s: (abs(s - (num_stages - 1) / 2), s))
        for s in by_distance_from_middle[: num_layers % num_stages]:
            counts[s] += 1
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ranges


def stages_of_rank(pp_rank: int, pp: int, virtual: int, schedule: str) -> list[int]:
    """Global stage indices held by `pp_rank`, in execution order."""
    if schedule == "zbv_zero_bubble":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + v * pp for v in range(virtual)]


def split_model(model: Transformer, stage: int, num_stages: int, layers: tuple[int, int]) -> Transformer:
    """A meta-device chunk of `model` for `stage`: its layers, plus the embedding on the first
    stage and the norm + output layer on the last."""
    chunk = copy.deepcopy(model)
    for key in list(chunk.layers.keys()):
        if not layers[0] <= int(key) < layers[1]:
            del chunk.layers[key]
    if stage > 0:
        chunk.embed_tokens = None
    if stage < num_stages - 1:
        chunk.norm = None
        chunk.lm_head = None
    return chunk


def build_pipeline_chunks(model: Transformer, pp_rank: int, pp: int, virtual: int, schedule: str,
                          explicit_layers: list[int] | None) -> list[tuple[int, Transformer]]:
    """(global stage index, chunk) for every stage this rank holds."""
    num_stages = pp * virtual
    split = layer_split(model.cfg.num_layers, num_stages, explicit_layers)
    return [(s, split_model(model, s, num_stages, split[s])) for s in stages_of_rank(pp_rank, pp, virtual, schedule)]


def schedule_problem(schedule: str, backend: str, torch_version: str) -> str | None:
    """Why `schedule` cannot run over the `backend` process group with this torch (None when it
    can). Before torch 2.12 the pipeline's warm-up sends to the neighbouring stage even when it
    lives on the same rank, as the V-shaped schedule's middle stages do; NCCL allows sending to
    oneself, gloo fails with "Pair is not connected" (seen with torch 2.11)."""
    if (schedule == "zbv_zero_bubble" and backend == "gloo"
            and torch.torch_version.TorchVersion(torch_version) < (2, 12)):
        return (f"parallel.pp_schedule=zbv_zero_bubble: torch {torch_version} cannot run it over gloo (CPU), "
                "since its warm-up sends to the same rank; upgrade to torch >= 2.12 or use interleaved_zero_bubble")
    return None


def build_schedule(chunks: list[tuple[int, nn.Module]], num_stages: int, pp_mesh: DeviceMesh,
                   device: torch.device, schedule: str, num_microbatches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None):
    """The pipeline schedule over this rank's stages. `loss_fn(output, target)` returns a
    micro-batch's loss *sum* (None: a forward-only schedule, run with `.eval()`); gradients are not rescaled (`scale_grads=False`) because the engine
    divides by the number of loss tokens of the whole step."""
    group = pp_mesh.get_group()
    problem = schedule_problem(schedule, dist.get_backend(group), torch.__version__)
    if problem:
        raise ValueError(problem)
    stages = [PipelineStage(module, index, num_stages, device, group=group) for index, module in chunks]
    cls = SCHEDULES[schedule]
    if len(stages) == 1 and schedule in ("gpipe", "1f1b"):
        return cls(stages[0], n_microbatches=num_microbatches, loss_fn=loss_fn, scale_grads=False)
    return cls(stages, n_microbatches=num_microbatches, loss_fn=loss_fn, scale_grads=False)


class ForwardOnlyPipeline:
    """Forward-only passes of pipelined models (no loss, no backward; e.g. the log-probs of a
    DPO reference): one schedule per model, built at its first use and kept, since a schedule
    fixes its micro-batch shapes at its first step."""

    def __init__(self, pp_mesh: DeviceMesh, device: torch.device, schedule: str, num_microbatches: int):
        self.pp_mesh, self.device = pp_mesh, device
        self.schedule, self.num_microbatches = schedule, num_microbatches
        self._schedules: dict[int, object] = {}

    def __call__(self, model, inputs: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
        """The last stage's output for the whole batch (inputs [n x b, ...] split into the
        configured micro-batches) on the rank that holds the last stage; None on the others.
        `model` is a parallel.apply.ParallelModel; every pipeline rank must call this together."""
        key = id(model)
        if key not in self._schedules:
            self._schedules[key] = build_schedule(list(zip(model.stage_indices, model.parts)), model.num_stages,
                                                  self.pp_mesh, self.device, self.schedule, self.num_microbatches,
                                                  loss_fn=None)
        schedule = self._schedules[key]
        if not hasattr(schedule, "eval"):  # forward-only runs came with the schedules' eval() in later torch releases
            raise RuntimeError(f"a forward-only pipeline pass (e.g. the DPO reference under parallel.pp > 1) needs "
                               f"PipelineSchedule.eval(), which torch {torch.__version__} lacks; upgrade torch or use "
                               "parallel.pp=1")
        args = (inputs,) if model.has_first_stage else ()
        with torch.no_grad():
            out = schedule.eval(*args, **kwargs)
        return out if model.has_last_stage else None
