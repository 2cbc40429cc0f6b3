"""The one training loop. Every mode runs through `train`: build the model and the stage,
then step (micro-batches -> token-normalized gradients -> clip -> AdamW -> LR schedule),
log, evaluate and checkpoint. The stage supplies data and the loss; the engine owns the rest.

    mdt train configs/stages/dacpt.yaml --set train.steps=100 [--resume]
    torchrun --nproc-per-node 8 -m megatron_domain.cli train CONFIG --set parallel.tp=8

Under torchrun every rank runs `train`; `parallel.*` lays the ranks out (ParallelDims).
"""

from __future__ import annotations

import contextlib
import json
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from tqdm import tqdm

from megatron_domain.checkpoint import (
    check_checkpoint_model, latest_checkpoint, load_checkpoint, load_initial_weights, prepare_run_dir, prune_checkpoints,
    save_checkpoint, saved_step)
from megatron_domain.cluster import HangWatchdog, PreemptionSignals, WallClockCheckpoints, agree
from megatron_domain.config import Config, resume_differences, to_dict
from megatron_domain.data.tokenizer import TextTokenizer, load_tokenizer
from megatron_domain.eval.perplexity import evaluate_sets
from megatron_domain.metrics import MetricsLog, peak_flops
from megatron_domain.models.llama import build_model, count_parameters, training_flops_per_token
from megatron_domain.models.lora import init_lora_weights, quantize_frozen_linears, trainable_parameters
from megatron_domain.optim import build_optimizer, build_scheduler
from megatron_domain.parallel.apply import ParallelModel, build_parallel_model, compile_problem
from megatron_domain.parallel.dims import ParallelDims, resolve_parallel_dims
from megatron_domain.parallel.distributed import ensure_process_group, rank, resolve_device, world_size
from megatron_domain.precision import resolve_training_dtype
from megatron_domain.parallel.grads import clip_grads
from megatron_domain.parallel.pipeline import ForwardOnlyPipeline, build_schedule
from megatron_domain.parallel.tensor import loss_parallel_context
from megatron_domain.stages import Stage, StageContext, create_stage
from megatron_domain.tracking import Trackers, check_tracking


@dataclass
class TrainResult:
    """What a finished run hands back (the per-step records are also in metrics.jsonl);
    `preempted`: the signal that stopped it early (None: it ran to its end)."""

    run_dir: Path
    losses: list[float] = field(default_factory=list)
    final_checkpoint: Path | None = None
    preempted: str | None = None


def mfu_peak_flops(cfg: Config, device: torch.device) -> float:
    """The MFU denominator of a run: `train.peak_tflops` when set, a GPU's data-sheet bf16 peak,
    else this CPU's measured matmul rate in the dtype its matmuls run in (bf16 under
    `train.dtype: bf16`, resolved). Measured against the fp32 rate, the demo's bf16 stages on an
    AMD EPYC with AVX-512 BF16 (bf16 matmuls ~2.2x fp32 there) logged MFU 1.08-1.19."""
    dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
    return peak_flops(device, cfg.train.peak_tflops, dtype, min_seconds=0.2)


def autocast_context(cfg: Config, device: torch.device) -> contextlib.ExitStack:
    """bf16 autocast when `train.dtype: bf16` (params and optimizer stay fp32), inside
    Transformer Engine's fp8_autocast when `fp8.backend: te`."""
    stack = contextlib.ExitStack()
    if cfg.train.dtype == "bf16":
        stack.enter_context(torch.autocast(device_type=device.type, dtype=torch.bfloat16))
    if cfg.fp8.backend == "te":
        from megatron_domain.models.te import te_fp8_autocast

        stack.enter_context(te_fp8_autocast(cfg.fp8.resolved_recipe))
    return stack


def peak_memory_gb(device: torch.device) -> float:
    """This rank's peak memory: allocated GPU memory on CUDA, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def trainable_parameters_of(pm: ParallelModel, dims: ParallelDims) -> tuple[int, int]:
    """(trainable, total) parameters of the whole model, summed over pipeline ranks (DTensor
    parameters count at full size, so TP/FSDP ranks are not double counted)."""
    counts = torch.zeros(2, dtype=torch.float64, device=next(pm.parameters()).device)
    for part in pm.parts:
        trainable, total = trainable_parameters(part)
        counts += torch.tensor([trainable, total], dtype=torch.float64, device=counts.device)
    if dims.pp > 1:
        dist.all_reduce(counts, group=pm.mesh["pp"].get_group())
    return int(counts[0]), int(counts[1])


def check_vocab(tokenizer: TextTokenizer, cfg: Config) -> None:
    """The tokenizer's ids must fit the model's embedding table."""
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but model.vocab_size is "
                         f"{cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size} or use the "
                         "model's own tokenizer")


def setup_parallel(cfg: Config, device: torch.device) -> tuple[ParallelDims, DeviceMesh | None]:
    """Resolve `parallel.*` against the world size and build the device mesh (None when the
    run is a single process)."""
    ensure_process_group(device)
    dims = resolve_parallel_dims(cfg, world_size())
    return dims, dims.build_mesh(device.type) if dims.is_parallel else None


def prepare_model(cfg: Config, dims: ParallelDims, mesh: DeviceMesh | None, device: torch.device) -> ParallelModel:
    """Meta-device build -> parallel transforms -> materialize; init from `model.init_from`
    (a checkpoint of any layout, or `hf:<folder>`) or from the seed."""
    init_from = cfg.model.init_from
    pm = build_parallel_model(build_model(cfg.model), cfg, dims, mesh, device,
                              init_seed=None if init_from else cfg.train.seed)
    if init_from:
        load_initial_weights(init_from, pm.parts, cfg.model)
        if cfg.lora.rank > 0:  # fresh adapters on the loaded base
            for part in pm.parts:
                init_lora_weights(part, cfg.train.seed)
    if cfg.lora.quantize_base == "nf4":
        for part in pm.parts:
            quantize_frozen_linears(part)
    return pm


def frozen_copy(cfg: Config, dims: ParallelDims, mesh: DeviceMesh | None, device: torch.device) -> ParallelModel:
    """A second model with the run's initial weights (model.init_from, or the seed's init) in
    the same layout, frozen and in eval mode: the reference of a full-fine-tuning DPO run."""
    pm = prepare_model(cfg, dims, mesh, device)
    for p in pm.parameters():
        p.requires_grad_(False)
    return pm.train(False)


def move_batch(batch: dict, device: torch.device) -> dict:
    """Tensors of a micro-batch to `device` (non-blocking on CUDA)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class StepStats:
    """What one optimizer step measured (loss and tokens over the whole job)."""

    loss: float  # token-weighted mean over all micro-batches of all data-parallel ranks
    loss_tokens: int
    grad_norm: float  # of the whole model, before clipping
    lr: float  # the LR this step used
    metrics: dict = field(default_factory=dict)  # the stage's metrics, job means (`tokens`: job sum)


@dataclass
class Trainer:
    """The pieces one training step needs on this rank."""

    cfg: Config
    stage: Stage
    model: ParallelModel
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    device: torch.device
    schedule: Any = None  # the pipeline schedule when parallel.pp > 1

    @property
    def counts_loss(self) -> bool:
        """Whether this rank's loss sum enters the job's loss: one rank per data-parallel
        replica (TP peers compute the same loss; only the last pipeline stage computes it)."""
        coords = self.model.dims.coordinates(rank())
        return coords["tp"] == 0 and self.model.has_last_stage


def forward_backward(trainer: Trainer, step: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Forward and backward over this rank's micro-batches of `step`; gradients hold loss
    *sums*. Returns this rank's (loss_sum, loss_tokens, metric sums), zeros where no loss is
    computed."""
    cfg, device, pm = trainer.cfg, trainer.device, trainer.model
    micro = trainer.stage.batches(step)
    loss_sum = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device)
    metric_sums: dict[str, torch.Tensor] = {}
    with loss_parallel_context(pm.dims.tp), autocast_context(cfg, device):
        if trainer.schedule is not None:
            pb = trainer.stage.pipeline_batch([move_batch(batch, device) for batch in micro])
            kwargs = move_batch(pb.kwargs, device)
            inputs = (pb.inputs.to(device),) if pm.has_first_stage else ()
            losses: list[torch.Tensor] = []
            trainer.schedule.step(*inputs, target=pb.target.to(device), losses=losses, **kwargs)
            if pm.has_last_stage:
                loss_sum += torch.stack([loss.detach() for loss in losses]).sum()
                tokens += pb.loss_tokens.to(device)
            if pb.metrics is not None:  # every rank: the job-wide sum needs the same keys everywhere
                metric_sums = {k: torch.as_tensor(v, device=device).detach().float() for k, v in pb.metrics().items()}
            return loss_sum, tokens, metric_sums
        model = pm.parts[0]
        for i, batch in enumerate(micro):
            if pm.dims.dp > 1:  # reduce-scatter gradients once, after the last micro-batch
                model.set_requires_gradient_sync(i == len(micro) - 1)
            output, loss_fn = trainer.stage.forward_step(move_batch(batch, device), model)
            mb_loss, mb_tokens, mb_metrics = loss_fn(output)
            mb_loss.backward()
            loss_sum += mb_loss.detach()
            tokens += torch.as_tensor(mb_tokens, device=device).detach()
            for key, value in mb_metrics.items():
                metric_sums[key] = metric_sums.get(key, 0) + torch.as_tensor(value, device=device).detach().float()
    return loss_sum, tokens, metric_sums


def normalize_gradients(trainer: Trainer, loss_sum: torch.Tensor, tokens: torch.Tensor,
                        metric_sums: dict | None = None) -> tuple[float, int, dict]:
    """Sum this rank's loss and token count over the job and divide every gradient by the job's
    loss-token count, so gradients are those of the token-mean loss of the whole global batch
    (exact over micro-batches and data-parallel ranks). Returns (job loss, job loss tokens, the
    stage's metrics as job means; `tokens` as the job's sum)."""
    pm = trainer.model
    names = sorted(metric_sums or {})
    values = [loss_sum, tokens] + [metric_sums[k].reshape(()) for k in names]
    totals = torch.stack(values) * float(trainer.counts_loss)  # [2 + metrics]
    if pm.dims.is_parallel:
        dist.all_reduce(totals)
    total_tokens = totals[1].clamp(min=1)
    scale = pm.dims.dp / total_tokens  # FSDP averaged gradients over the dp ranks: undo that
    for p in pm.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    metrics = {k: (v if k == "tokens" else v / total_tokens).item() for k, v in zip(names, totals[2:])}
    return (totals[0] / total_tokens).item(), int(totals[1].item()), metrics


def optimizer_step(trainer: Trainer, step: int) -> StepStats:
    """One optimizer step: forward/backward, gradients normalized over the job, clipped by the
    whole model's norm, AdamW step, LR schedule advanced."""
    cfg, pm = trainer.cfg, trainer.model
    loss, loss_tokens, metrics = normalize_gradients(trainer, *forward_backward(trainer, step))
    pp_group = pm.mesh["pp"].get_group() if pm.dims.pp > 1 else None
    grad_norm = clip_grads([p for p in pm.parameters() if p.grad is not None], cfg.optim.clip_grad, pp_group)
    lr = trainer.schedulers[0].get_last_lr()[0]
    for optimizer, scheduler in zip(trainer.optimizers, trainer.schedulers):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
    return StepStats(loss=loss, loss_tokens=loss_tokens, grad_norm=grad_norm, lr=lr, metrics=metrics)


# optional packages of the GPU paths: (config key, value, module, what to install, the alternative)
OPTIONAL_BACKENDS = (
    ("model.attention_backend", "flash_varlen", "flash_attn", "flash-attn (pip install flash-attn, CUDA only)",
     "use model.attention_backend=sdpa"),
    ("model.attention_backend", "te", "transformer_engine", "Transformer Engine (pip install "
     "'megatron-domain[gpu]', CUDA only)", "use model.attention_backend=sdpa"),
    ("fp8.backend", "te", "transformer_engine", "Transformer Engine (pip install 'megatron-domain[gpu]', CUDA only)",
     "use fp8.backend=float8 (torchao)"),
    ("fp8.backend", "float8", "torchao", "torchao (pip install torchao)", "use fp8.backend=none"),
)


def check_backends(cfg: Config, device: torch.device) -> None:
    """Refuse, before anything is created, a backend this machine cannot run: an optional
    package that is not installed, or a combination the device cannot do; names the key."""
    import importlib.util

    for key, value, module, package, alternative in OPTIONAL_BACKENDS:
        section, _, name = key.partition(".")
        if getattr(getattr(cfg, section), name) == value and importlib.util.find_spec(module) is None:
            raise ValueError(f"{key}={value} needs {package}, which is not installed here; install it or {alternative}")
    if cfg.model.attention_backend == "flex" and device.type == "cpu":
        raise ValueError("model.attention_backend=flex cannot train on CPU: torch has no FlexAttention backward "
                         "there; train with sdpa on CPU (flex is fine for CPU evaluation and on GPUs)")
    check_tracking(cfg.tracking)
    if cfg.fp8.backend == "float8" and device.type == "cpu" and not cfg.fp8.emulate:
        raise ValueError("fp8.backend=float8 on CPU needs fp8.emulate: true (CPUs have no FP8 matmul)")


def build_trainer(cfg: Config, device: torch.device, run_dir: Path, tokenizer: TextTokenizer) -> Trainer:
    """Mesh, model, stage, optimizers (one per model part) and the pipeline schedule."""
    check_backends(cfg, device)
    dims, mesh = setup_parallel(cfg, device)
    fallback = compile_problem(cfg, dims)
    if fallback and rank() == 0:
        print(f"[{run_dir.name}] {fallback}", flush=True)
    pm = prepare_model(cfg, dims, mesh, device)
    coords = dims.coordinates(rank())
    stage = create_stage(cfg.mode)
    num_micro = cfg.train.global_batch_size // (cfg.train.micro_batch_size * dims.dp)
    pipeline_forward = (ForwardOnlyPipeline(mesh["pp"], device, cfg.parallel.pp_schedule, num_micro)
                        if dims.pp > 1 else None)
    stage.setup(StageContext(cfg=cfg, tokenizer=tokenizer, device=device, run_dir=run_dir,
                             dp_rank=coords["dp"], dp_size=dims.dp, model=pm,
                             build_reference=lambda: frozen_copy(cfg, dims, mesh, device), rank=rank(),
                             tp_size=dims.tp, pipeline_forward=pipeline_forward))
    if cfg.train.steps == 0:  # rs_sft: epochs over the data the stage prepared at setup
        cfg.train.steps = stage.planned_steps
        if rank() == 0:
            print(f"train.steps: 0 -> {cfg.train.steps} ({cfg.mode}: the steps its data needs)", flush=True)
    optimizers = [build_optimizer(part, cfg.optim) for part in pm.parts]
    schedulers = [build_scheduler(opt, cfg.optim, cfg.train.steps) for opt in optimizers]
    schedule = None
    if dims.pp > 1:
        if not hasattr(stage, "pipeline_batch"):
            raise ValueError(f"parallel.pp={dims.pp}: mode {cfg.mode!r} does not support pipeline parallelism; "
                             "use parallel.pp=1")
        schedule = build_schedule(list(zip(pm.stage_indices, pm.parts)), pm.num_stages, mesh["pp"], device,
                                  cfg.parallel.pp_schedule, num_micro, stage.pipeline_loss)
    return Trainer(cfg=cfg, stage=stage, model=pm, optimizers=optimizers, schedulers=schedulers, device=device,
                   schedule=schedule)


def resume_from_latest(trainer: Trainer, run_dir: Path) -> int:
    """Load the run's latest checkpoint (any parallel layout); returns the step to continue from.
    Without a checkpoint (a job preempted before its first one and requeued with the same
    `--resume` command line) the run starts at step 0, saying so. A checkpoint whose run used
    another model, data stream, seed, stage or adapter layout is an error naming the fields."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        if rank() == 0:
            print(f"--resume: no complete checkpoint in {run_dir / 'checkpoints'} yet; starting from step 0",
                  flush=True)
        return 0
    check_checkpoint_model(trainer.cfg.model, ckpt, "--resume:")
    saved_config = run_dir / "config.json"
    if saved_config.is_file():
        differences = resume_differences(json.loads(saved_config.read_text()), to_dict(trainer.cfg))
        if differences:
            raise ValueError(f"--resume: {ckpt} was written by a run with other settings, so it cannot continue "
                             f"this one: {'; '.join(differences)}. Restore them, or start a new run in another "
                             "train.run_dir (or run without --resume and with --overwrite to move this one aside)")
    extra = load_checkpoint(ckpt, trainer.model.parts, trainer.optimizers)
    for scheduler in trainer.schedulers:
        scheduler.load_state_dict(extra["scheduler"])
    trainer.stage.load_state_dict(extra["stage"])
    return int(extra["step"])


def train(cfg: Config, resume: bool = False, progress: bool | None = None, overwrite: bool = False) -> TrainResult:
    """Run `cfg.train.steps` optimizer steps of the stage `cfg.mode` on this rank's share of
    the parallel layout; returns the job's losses (the same on every rank). A new run refuses a
    run directory with checkpoints unless `overwrite` (which moves the old one aside)."""
    if progress is not None:  # --no-progress also silences the stage's own bars (sampling, rounds)
        cfg.train.progress = progress
    device = resolve_device(cfg.train.device)
    cfg, dtype_reason = resolve_training_dtype(cfg, device)
    check_backends(cfg, device)  # before anything is written
    run_dir = prepare_run_dir(cfg.train.run_dir, resume, overwrite)
    if dtype_reason and rank() == 0:
        print(f"[{run_dir.name}] {dtype_reason}", flush=True)
    finished = latest_checkpoint(run_dir) if resume and cfg.train.steps else None
    if finished is not None and saved_step(finished) >= cfg.train.steps:
        if rank() == 0:
            print(f"--resume: {run_dir} already finished its {cfg.train.steps} steps ({finished}); nothing to do "
                  "(raise train.steps to train further)", flush=True)
        return TrainResult(run_dir=run_dir, final_checkpoint=finished)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
    check_vocab(tokenizer, cfg)
    trainer = build_trainer(cfg, device, run_dir, tokenizer)
    dims = trainer.model.dims
    is_main = rank() == 0
    trackers = Trackers(cfg, run_dir) if is_main and (cfg.tracking.tensorboard or cfg.tracking.wandb) else None
    log = MetricsLog(run_dir, enabled=is_main, trackers=trackers)
    start_step = resume_from_latest(trainer, run_dir) if resume else 0
    log.truncate_after(start_step)
    if is_main:
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    params = count_parameters(cfg.model)
    flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)
    show = cfg.train.progress and is_main
    bar = tqdm(total=cfg.train.steps, initial=start_step, desc=f"{cfg.mode} {run_dir.name}", disable=not show,
               unit="step", dynamic_ncols=True)
    if is_main:  # setup lines are printed with --no-progress too: they belong in a batch job's log
        tqdm.write(f"[{run_dir.name}] model: {params['total'] / 1e6:.2f}M parameters "
                   f"({params['non_embedding'] / 1e6:.2f}M non-embedding), {flops_per_token / 1e6:.1f} MFLOP/token; "
                   f"{dims.describe()}")
    if cfg.lora.rank > 0:  # counted on every rank (a collective over pipeline stages), printed on one
        trainable, total = trainable_parameters_of(trainer.model, dims)
        if is_main:
            tqdm.write(f"[{run_dir.name}] LoRA rank {cfg.lora.rank}, alpha {cfg.lora.scale_alpha:g} on "
                       f"{', '.join(cfg.lora.targets)}: {trainable:,} trainable parameters of {total:,} "
                       f"({trainable / total:.3%})")
    result = TrainResult(run_dir=run_dir)
    trainer.model.train()
    if is_main and cfg.train.hang_timeout_s > 0:
        tqdm.write(f"[{run_dir.name}] hang watchdog: a step over {cfg.train.hang_timeout_s:g} s dumps every thread's "
                   "stack to stderr and exits 1")
    try:
        with PreemptionSignals(cfg.train.preempt_signals) as signals, HangWatchdog(cfg.train.hang_timeout_s) as watchdog:
            run_steps(trainer, start_step, result, log, bar, tokenizer, signals, watchdog)
    finally:
        bar.close()
        if hasattr(trainer.stage, "close"):
            trainer.stage.close()
        if trackers is not None:
            trackers.close()
    return result


def run_steps(trainer: Trainer, start_step: int, result: TrainResult, log: MetricsLog, bar: tqdm,
              tokenizer: TextTokenizer, signals: PreemptionSignals, watchdog: HangWatchdog) -> None:
    """The training loop from `start_step`: optimizer steps, metrics, periodic eval and
    checkpoints (appended to `result`); stops after the step in which a preemption signal
    arrived (on any rank), with a checkpoint; the watchdog is re-armed after every step."""
    cfg, device, dims = trainer.cfg, trainer.device, trainer.model.dims
    run_dir = result.run_dir
    flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)
    peak = mfu_peak_flops(cfg, device)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    wall_clock = WallClockCheckpoints(cfg.train.checkpoint_every_minutes)
    for step in range(start_step, cfg.train.steps):
        t0 = time.perf_counter()
        stats = optimizer_step(trainer, step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        # stages whose rows vary (dpo) report the tokens they processed; an empty step processed none
        default_tokens = 0.0 if getattr(trainer.stage, "reports_tokens", False) else tokens_per_step
        tokens_per_s = stats.metrics.pop("tokens", default_tokens) / elapsed
        per_gpu = tokens_per_s / dims.world_size
        record = {"step": step + 1, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                  "tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": per_gpu,
                  "mfu": per_gpu * flops_per_token / peak, "loss_tokens": stats.loss_tokens,
                  "step_time_s": elapsed, "world_size": dims.world_size, **stats.metrics}
        record["peak_memory_gb"] = peak_memory_gb(device)
        result.losses.append(stats.loss)
        if cfg.eval.interval and cfg.eval.sets and (step + 1) % cfg.eval.interval == 0:
            with loss_parallel_context(dims.tp):
                evaluation = evaluate_sets(trainer.model.parts[0], cfg.eval.sets, cfg.eval.seq_len or cfg.data.seq_len,
                                           tokenizer.eod_id, cfg.eval.batch_size, device, cfg.eval.max_rows)
            record.update({f"eval_ppl/{name}": value for name, value in evaluation["ppl"].items()})
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            log.write(record)
        shown = {k.split("/")[-1]: f"{stats.metrics[k]:.3f}" for k in ("rewards/margin", "rewards/accuracy")
                 if k in stats.metrics}
        bar.set_postfix(loss=f"{stats.loss:.4f}", **shown, tok_s=f"{tokens_per_s:,.0f}", mfu=f"{record['mfu']:.1%}")
        bar.update(1)
        is_last = step + 1 == cfg.train.steps
        signum, time_due = agree([signals.number, int(wall_clock.due())], device)  # the same decision on every rank
        preempted = signum > 0
        exiting = step + 1 == cfg.train.exit_at_step or preempted
        if (is_last or exiting or time_due
                or (cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0)):
            result.final_checkpoint = write_checkpoint(trainer, step + 1, bar)
            wall_clock.written()
        if preempted:
            result.preempted = signal.Signals(signum).name
            if rank() == 0:
                print(f"[{run_dir.name}] preempted ({result.preempted}) after step {step + 1}: checkpoint "
                      f"{result.final_checkpoint} written; exiting with status 0 (continue with --resume)", flush=True)
        if exiting:
            break
        watchdog.arm()


def write_checkpoint(trainer: Trainer, step: int, bar: tqdm) -> Path:
    """Save checkpoint `step`, then delete the checkpoints train.keep_last_checkpoints no longer
    keeps; logs how long the write took."""
    cfg, run_dir = trainer.cfg, Path(trainer.cfg.train.run_dir)
    started = time.perf_counter()
    path = save_checkpoint(run_dir, step, trainer.model.parts, trainer.optimizers,
                           {"scheduler": trainer.schedulers[0].state_dict(), "stage": trainer.stage.state_dict(),
                            "mode": cfg.mode, "parallel": trainer.model.dims.describe()})
    deleted = prune_checkpoints(run_dir, cfg.train.keep_last_checkpoints)
    if rank() == 0:
        note = f"; deleted step(s) {', '.join(map(str, deleted))} (keep_last_checkpoints)" if deleted else ""
        bar.write(f"[{run_dir.name}] checkpoint step {step} written in {time.perf_counter() - started:.1f} s{note}")
    return path
