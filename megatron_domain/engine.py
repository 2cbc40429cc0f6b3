"""The one training loop. Every mode runs through `train`: build the model and the stage,
then step (micro-batches -> token-normalized gradients -> clip -> AdamW -> LR schedule),
log, evaluate and checkpoint. The stage supplies data and the loss; the engine owns the rest.

    mdt train configs/stages/dacpt.yaml --set train.steps=100 [--resume]
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_domain.checkpoint import latest_checkpoint, load_checkpoint, load_model_weights, save_checkpoint
from megatron_domain.config import Config, to_dict
from megatron_domain.data.tokenizer import TextTokenizer, load_tokenizer
from megatron_domain.eval.perplexity import evaluate_sets
from megatron_domain.metrics import MetricsLog, peak_flops
from megatron_domain.models.llama import Transformer, build_model, count_parameters, training_flops_per_token
from megatron_domain.optim import build_optimizer, build_scheduler
from megatron_domain.parallel.apply import build_trainable_model
from megatron_domain.parallel.distributed import ensure_process_group, resolve_device
from megatron_domain.stages import StageContext, create_stage


@dataclass
class TrainResult:
    """What a finished run hands back (the per-step records are also in metrics.jsonl)."""

    run_dir: Path
    losses: list[float] = field(default_factory=list)
    final_checkpoint: Path | None = None


def autocast_context(cfg: Config, device: torch.device):
    """bf16 autocast when `train.dtype: bf16` (params and optimizer stay fp32)."""
    if cfg.train.dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def check_vocab(tokenizer: TextTokenizer, cfg: Config) -> None:
    """The tokenizer's ids must fit the model's embedding table."""
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} tokens but model.vocab_size is "
                         f"{cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size} or use the "
                         "model's own tokenizer")


def prepare_model(cfg: Config, device: torch.device) -> Transformer:
    """Meta-device build -> transforms -> materialize; init from `model.init_from` or a seed."""
    model = build_model(cfg.model)
    init_from = cfg.model.init_from
    model = build_trainable_model(model, cfg, device, init_seed=None if init_from else cfg.train.seed)
    if init_from:
        load_model_weights(init_from, model)
    return model


def move_batch(batch: dict, device: torch.device) -> dict:
    """Tensors of a micro-batch to `device` (non-blocking on CUDA)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class StepStats:
    """What one optimizer step measured."""

    loss: float  # token-weighted mean over the step's micro-batches
    loss_tokens: int
    tokens_seen: int
    grad_norm: float  # before clipping
    lr: float  # the LR this step used


def optimizer_step(cfg: Config, stage, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   scheduler: torch.optim.lr_scheduler.LRScheduler, step: int, device: torch.device) -> StepStats:
    """Forward/backward over the stage's micro-batches, normalize gradients by the total number
    of loss tokens (exact over micro-batches), clip, AdamW step, advance the LR schedule."""
    loss_sum = torch.zeros((), device=device)
    tokens = torch.zeros((), device=device)
    seen_tokens = 0
    for batch in stage.batches(step):
        batch = move_batch(batch, device)
        with autocast_context(cfg, device):
            output, loss_fn = stage.forward_step(batch, model)
            mb_loss, mb_tokens, _ = loss_fn(output)
        mb_loss.backward()
        loss_sum += mb_loss.detach()
        tokens += mb_tokens.detach()
        seen_tokens += batch["tokens"].numel()
    scale = 1.0 / tokens.clamp(min=1)
    params = [p for p in model.parameters() if p.grad is not None]
    for p in params:
        p.grad.mul_(scale)
    max_norm = cfg.optim.clip_grad if cfg.optim.clip_grad > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return StepStats(loss=(loss_sum * scale).item(), loss_tokens=int(tokens.item()), tokens_seen=seen_tokens,
                     grad_norm=float(grad_norm), lr=lr)


def train(cfg: Config, resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Run `cfg.train.steps` optimizer steps of the stage `cfg.mode`; returns the losses."""
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    ensure_process_group(device)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
    check_vocab(tokenizer, cfg)

    model = prepare_model(cfg, device)
    stage = create_stage(cfg.mode)
    stage.setup(StageContext(cfg=cfg, tokenizer=tokenizer, device=device, run_dir=run_dir))
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    log = MetricsLog(run_dir)

    start_step = 0
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; run without --resume")
        extra = load_checkpoint(ckpt, model, optimizer)
        scheduler.load_state_dict(extra["scheduler"])
        stage.load_state_dict(extra["stage"])
        start_step = extra["step"]
        log.truncate_after(start_step)
    else:
        log.truncate_after(0)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    params = count_parameters(cfg.model)
    flops_per_token = training_flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_flops(device, cfg.train.peak_tflops)
    show = cfg.train.progress if progress is None else progress
    bar = tqdm(total=cfg.train.steps, initial=start_step, desc=f"{cfg.mode} {run_dir.name}", disable=not show,
               unit="step", dynamic_ncols=True)
    if show:
        tqdm.write(f"[{run_dir.name}] model: {params['total'] / 1e6:.2f}M parameters "
                   f"({params['non_embedding'] / 1e6:.2f}M non-embedding), {flops_per_token / 1e6:.1f} MFLOP/token")
    result = TrainResult(run_dir=run_dir)
    model.train()
    for step in range(start_step, cfg.train.steps):
        t0 = time.perf_counter()
        stats = optimizer_step(cfg, stage, model, optimizer, scheduler, step, device)
        loss = stats.loss
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        tokens_per_s = stats.tokens_seen / elapsed
        record = {"step": step + 1, "loss": loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
                  "tokens_per_s": tokens_per_s, "mfu": tokens_per_s * flops_per_token / peak,
                  "loss_tokens": stats.loss_tokens, "step_time_s": elapsed}
        if device.type == "cuda":
            record["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        result.losses.append(loss)
        if cfg.eval.interval and cfg.eval.sets and (step + 1) % cfg.eval.interval == 0:
            evaluation = evaluate_sets(model, cfg.eval.sets, cfg.eval.seq_len or cfg.data.seq_len, tokenizer.eod_id,
                                       cfg.eval.batch_size, device, cfg.eval.max_rows)
            record.update({f"eval_ppl/{name}": value for name, value in evaluation["ppl"].items()})
        if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
            log.write(record)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{record['mfu']:.1%}")
        bar.update(1)
        is_last = step + 1 == cfg.train.steps
        exiting = step + 1 == cfg.train.exit_at_step
        if is_last or exiting or (cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0):
            result.final_checkpoint = save_checkpoint(
                run_dir, step + 1, model, optimizer,
                {"scheduler": scheduler.state_dict(), "stage": stage.state_dict(), "mode": cfg.mode})
        if exiting:
            break
    bar.close()
    return result
