"""ParallelDims: the resolved degrees of a run, their checks against the world size, the
model and the batch, and the DeviceMesh over (pp, dp_replicate, dp_shard, tp).

Ranks are laid out row-major in that order: tp is the fastest-varying coordinate (TP peers
are neighbouring ranks, i.e. one node's NVLink domain), pp the slowest.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_domain.config import Config, ConfigError

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Resolved parallel degrees (no -1 left); `world_size` = pp x dp_replicate x dp_shard x tp."""

    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    sequence_parallel: bool = False

    @property
    def world_size(self) -> int:
        """Number of ranks the layout needs."""
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def dp(self) -> int:
        """Data-parallel degree (replicas x shards): how many different batches one step sees."""
        return self.dp_replicate * self.dp_shard

    @property
    def is_parallel(self) -> bool:
        """Whether anything is split at all."""
        return self.world_size > 1

    def coordinates(self, rank: int) -> dict[str, int]:
        """This rank's index along every mesh dimension, plus its flattened `dp` index."""
        coords = {}
        rest = rank
        for name, size in reversed(list(zip(MESH_DIMS, (self.pp, self.dp_replicate, self.dp_shard, self.tp)))):
            coords[name] = rest % size
            rest //= size
        coords["dp"] = coords["dp_replicate"] * self.dp_shard + coords["dp_shard"]
        return coords

    def describe(self) -> str:
        """One line, e.g. `pp=4 x dp_replicate=1 x dp_shard=2 x tp=8 = 64 ranks (sequence parallel)`."""
        sp = " (sequence parallel)" if self.tp > 1 and self.sequence_parallel else ""
        return (f"pp={self.pp} x dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x tp={self.tp} "
                f"= {self.world_size} ranks{sp}")

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The 4-D DeviceMesh (dimension names MESH_DIMS) over the default process group."""
        return init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp),
                                mesh_dim_names=MESH_DIMS)


def resolve_parallel_dims(cfg: Config, world_size: int) -> ParallelDims:
    """Fill in the -1 degree from `world_size` and check everything that depends on it; a
    ConfigError lists each mismatch with its numbers."""
    par = cfg.parallel
    degrees = {"pp": par.pp, "dp_replicate": par.dp_replicate, "dp_shard": par.dp_shard, "tp": par.tp}
    known = 1
    for value in degrees.values():
        if value != -1:
            known *= value
    problems: list[str] = []
    free = [k for k, v in degrees.items() if v == -1]
    if free:
        if world_size % known:
            problems.append(f"parallel.{free[0]}=-1: the world size {world_size} is not divisible by the other "
                            f"degrees' product {known} ({_degrees_text(degrees)})")
        degrees[free[0]] = max(world_size // known, 1)
    dims = ParallelDims(sequence_parallel=par.sequence_parallel and degrees["tp"] > 1, **degrees)
    if not free and dims.world_size != world_size:
        problems.append(f"parallel: {_degrees_text(degrees)} = {dims.world_size} ranks but the world size is "
                        f"{world_size}; make the product equal the number of processes (or set one degree to -1)")
    problems.extend(check_dims_against_run(cfg, dims))
    if problems:
        raise ConfigError(problems)
    return dims


def check_dims_against_run(cfg: Config, dims: ParallelDims) -> list[str]:
    """Batch and schedule constraints that need the resolved data-parallel degree."""
    t = cfg.train
    problems: list[str] = []
    per_step = t.micro_batch_size * dims.dp
    if t.global_batch_size % per_step:
        problems.append(f"train.global_batch_size: {t.global_batch_size} is not a multiple of micro_batch_size "
                        f"x data-parallel degree ({t.micro_batch_size} x {dims.dp} = {per_step}); "
                        f"use a multiple of {per_step}")
    elif dims.pp > 1:
        num_micro = t.global_batch_size // per_step
        if num_micro < dims.pp:
            problems.append(f"train.global_batch_size: {num_micro} micro-batch(es) per step per pipeline but "
                            f"parallel.pp is {dims.pp}; the pipeline needs >= pp micro-batches "
                            f"(global batch >= {dims.pp * per_step})")
        elif cfg.parallel.pp_schedule != "gpipe" and num_micro % dims.pp:
            problems.append(f"train.global_batch_size: {num_micro} micro-batches per step is not a multiple of "
                            f"parallel.pp ({dims.pp}), which schedule {cfg.parallel.pp_schedule} needs")
    if cfg.lora.quantize_base != "none" and dims.world_size > 1:
        problems.append(f"lora.quantize_base: {cfg.lora.quantize_base} (QLoRA) runs on one device here; "
                        f"got {dims.describe()}; use plain LoRA (quantize_base: none) to shard the base")
    if cfg.eval.interval and dims.pp > 1:
        problems.append("eval.interval: periodic evaluation during training is not supported with parallel.pp > 1; "
                        "set eval.interval=0 and run `mdt eval` on the checkpoint")
    return problems


def _degrees_text(degrees: dict[str, int]) -> str:
    return " x ".join(f"{k}={v}" for k, v in degrees.items())

