"""`mode: dpo`: Direct Preference Optimization (Rafailov et al. 2023) and its family (IPO, hinge,
conservative and robust DPO: losses.dpo_pair_losses), offline on preference pairs
(data.chat.path, data/preference.py) or online (`dpo.online: true`): each round the current
policy samples completions of prompts, a judge scores them and best-vs-worst pairs train the
policy (stages/online.py; `<run_dir>/rounds/<n>.jsonl` holds everything a round generated).

The reference policy pi_ref (`dpo.reference`, the choice is logged): with LoRA the base with the
adapters switched off (no second copy of the weights); otherwise a frozen copy of the initial
weights, or (offline) reference log-probs computed once before training and stored with the run
(`<run_dir>/reference_logps.pt`).

A micro-batch is `train.micro_batch_size` pairs in ONE padding-free row (data/preference.py);
with `dpo.shared_prompt` each pair is [prompt | chosen | rejected] so the prompt is computed once.
Log-probs come from the fused `linear_logprobs` kernel at the scored positions only, so no
[tokens, vocab] logits tensor is kept; the loss is the `dpo_loss` kernel op.

Under pipeline parallelism (offline only) each micro-batch row is padded to a fixed length
(data/preference.pipeline_row_length), the loss target carries each scored slot's segment and
pi_ref's log-prob, and pi_ref's log-probs come from a forward-only pass of the pipeline.

Departures from the paper: batches count pairs (`train.global_batch_size` pairs per step, the
loss is the mean over them); IPO runs on per-token averaged log-ratios (as its authors and TRL);
pairs are reshuffled every epoch with a seeded permutation and the cursor counts pairs.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_domain.config import Config, DpoConfig
from megatron_domain.data.chat import load_template, warn_if_markers_split
from megatron_domain.data.preference import (
    PreferencePair, fixed_length_batch, pair_batch, pair_tokens, pipeline_row_length, read_preferences)
from megatron_domain.kernels.dpo import dpo_loss_reference
from megatron_domain.kernels.registry import get_kernel
from megatron_domain.losses import LENGTH_AVERAGED_LOSSES, segment_sums
from megatron_domain.models.lora import adapters_disabled
from megatron_domain.precision import matmul_row_multiple
from megatron_domain.stages import PipelineBatch, StageContext
from megatron_domain.stages.causal_lm import micro_batch_starts


def resolve_reference(cfg: Config) -> str:
    """dpo.reference with `auto` resolved: adapters under LoRA, else a frozen copy."""
    if cfg.dpo.reference != "auto":
        return cfg.dpo.reference
    return "adapters" if cfg.lora.rank > 0 else "copy"


def score_pairs(model: torch.nn.Module, batch: dict, logprobs_kernel) -> torch.Tensor:
    """log p(completion token) at every scored position of a pair batch -> [M] fp32."""
    return model(batch["tokens"], batch["position_ids"], batch["document_ids"], targets=batch["score_targets"],
                 logprobs_kernel=logprobs_kernel, prefix_ids=batch["prefix_ids"],
                 score_index=batch["score_index"])  # [M]


# the metric sums of `pair_loss` besides `tokens`
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
                "logps/rejected", "kl/chosen", "nll/chosen")


def split_by_pair(logps: torch.Tensor, segments: torch.Tensor, num_pairs: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Scored log-probs [M] (segment 2p: pair p's chosen, 2p + 1: its rejected, -1: unused)
    -> per pair (chosen, rejected) arrays."""
    logps, segments = logps.float().cpu(), segments.cpu()
    return [(logps[segments == 2 * p].numpy(), logps[segments == 2 * p + 1].numpy()) for p in range(num_pairs)]


def length_weights(segments: torch.Tensor, num_segments: int) -> torch.Tensor:
    """1 / |y| for each scored token of sequence y: segments [M] -> [M] fp32 (sums become means)."""
    lengths = torch.bincount(segments, minlength=num_segments).clamp(min=1).float()  # [2P]
    return 1.0 / lengths[segments]  # [M]


def chosen_kl_per_pair(policy: torch.Tensor, reference: torch.Tensor, segments: torch.Tensor,
                       num_pairs: int) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) on each pair's chosen completion, averaged over its
    tokens: k3 = exp(r) - 1 - r with r = log pi_ref - log pi (Schulman 2020; >= 0, unbiased under
    samples of pi). policy/reference/segments [M] -> [P]."""
    r = (reference - policy.detach()).float()  # [M]
    k3 = torch.expm1(r) - r  # [M]
    chosen = segments % 2 == 0  # [M]
    sums = torch.zeros(num_pairs, device=r.device).index_add(0, segments[chosen] // 2, k3[chosen])  # [P]
    counts = torch.bincount(segments[chosen] // 2, minlength=num_pairs).clamp(min=1)  # [P]
    return sums / counts  # [P]


def pair_loss(policy: torch.Tensor, reference: torch.Tensor, batch: dict, d: DpoConfig,
              loss_kernel=dpo_loss_reference) -> tuple[torch.Tensor, int, dict]:
    """The DPO-family loss of a pair batch from the policy's and pi_ref's log-probs at its scored
    positions (both [M]): (sum of the pair losses, number of pairs, metric sums over the pairs:
    rewards, margin, accuracy, policy log-probs, KL estimate and mean NLL on the chosen, tokens).

    With `dpo.sft_weight` alpha > 0 each pair's loss also gets alpha x the mean NLL of its chosen
    completion (RPO, Pang et al. 2024; TRL's rpo_alpha): it keeps the chosen answers likely,
    against DPO's tendency to lower both completions' likelihood."""
    segments, num_pairs = batch["score_segments"], batch["num_pairs"]
    pol, ref = policy.float(), reference.float()
    if d.loss_type in LENGTH_AVERAGED_LOSSES:
        weights = length_weights(segments, 2 * num_pairs)  # [M]
        pol, ref = pol * weights, ref * weights
    out = loss_kernel(pol, ref, segments, num_pairs, beta=d.beta, loss_type=d.loss_type,
                      label_smoothing=d.label_smoothing)
    losses = out.losses  # [P]
    margins = out.chosen_rewards - out.rejected_rewards  # [P]
    chosen_nll = -segment_sums(policy, segments, 2 * num_pairs)[0::2] / torch.bincount(
        segments, minlength=2 * num_pairs)[0::2].clamp(min=1)  # [P] mean NLL per chosen token
    if d.sft_weight > 0:  # RPO: + alpha * NLL(chosen) / |y_w|
        losses = losses + d.sft_weight * chosen_nll
    metrics = {"rewards/chosen": out.chosen_rewards.sum(), "rewards/rejected": out.rejected_rewards.sum(),
               "rewards/margin": margins.sum(), "rewards/accuracy": (margins > 0).float().sum(),
               "logps/chosen": out.policy_chosen.sum(), "logps/rejected": out.policy_rejected.sum(),
               "kl/chosen": chosen_kl_per_pair(policy, reference, segments, num_pairs).sum(),
               "nll/chosen": chosen_nll.detach().sum(), "tokens": float(batch["pair_tokens"])}
    return losses.sum(), num_pairs, metrics


class DpoStage:
    """Pairs (from a file, or from the online rounds) -> DPO-family loss against pi_ref."""

    reports_tokens = True  # the `tokens` metric (prompt + chosen + rejected) sets tokens/s

    def __init__(self) -> None:
        self.consumed_pairs = 0
        self.pairs: list[PreferencePair] = []
        self.reference_logps: list[tuple[np.ndarray, np.ndarray]] | None = None
        self.reference_model = None
        self.online = None
        self._orders: dict[tuple, np.ndarray] = {}
        self._pipeline_metrics: list[dict] = []

    # ----------------------------------------------------------------- setup

    def setup(self, ctx: StageContext) -> None:
        """Kernels, the reference and the data (the file's pairs, or the online round driver)."""
        cfg, d = ctx.cfg, ctx.cfg.dpo
        self.cfg, self.ctx = cfg, ctx
        self.template = load_template(cfg.data.chat.template, cfg.data.tokenizer)
        warn_if_markers_split(self.template, ctx.tokenizer)
        kernel = get_kernel("linear_logprobs", cfg.kernels.linear_logprobs, ctx.device)
        self.logprobs_kernel = functools.partial(kernel, chunk_rows=cfg.kernels.logprob_chunk_rows)
        self.loss_kernel = get_kernel("dpo_loss", cfg.kernels.dpo_loss, ctx.device)
        # the row splits over TP ranks under sequence parallelism; bf16 on a CPU also rounds it up so the
        # matmul shapes repeat (precision.matmul_row_multiple)
        self.pad_multiple = math.lcm(ctx.tp_size if cfg.parallel.sequence_parallel else 1,
                                     matmul_row_multiple(cfg.train.dtype, ctx.device))
        self.reference = resolve_reference(cfg)
        self.global_batch, self.micro_batch = cfg.train.global_batch_size, cfg.train.micro_batch_size
        self.dp_rank, self.dp_size = ctx.dp_rank, ctx.dp_size
        self.show = cfg.train.progress and ctx.rank == 0  # bars; messages go to rank 0's log either way
        self.is_main = ctx.rank == 0
        if self.reference == "copy":
            self.reference_model = ctx.build_reference()
        if d.online:
            from megatron_domain.stages.online import OnlineRounds

            self.online = OnlineRounds(ctx, self.template)
        else:
            data = read_preferences(cfg.data.chat.path, self.template, ctx.tokenizer, cfg.data.seq_len,
                                    cfg.data.chat.overflow)
            self.pairs = data.pairs
            if (data.truncated or data.dropped) and self.is_main:
                tqdm.write(f"[dpo] {data.truncated} pair(s) truncated and {data.dropped} dropped for exceeding "
                           f"data.seq_len={cfg.data.seq_len} (data.chat.overflow={cfg.data.chat.overflow})")
        if self.is_main:
            source = "online rounds" if d.online else f"{len(self.pairs)} pairs from {cfg.data.chat.path}"
            tqdm.write(f"[dpo] loss {d.loss_type} (beta {d.beta:g}), reference: {self.reference}, layout: "
                       f"{'shared prompt' if d.shared_prompt else 'two documents per pair'}; {source}")
        if self.reference == "precomputed":
            self.reference_logps = self._precomputed_reference(ctx)

    @property
    def seq_len(self) -> int:
        return self.cfg.data.seq_len

    def _batch(self, pairs: list[PreferencePair]) -> dict:
        batch = pair_batch(pairs, self.cfg.dpo.shared_prompt, self.seq_len, self.ctx.tokenizer.eod_id,
                           self.pad_multiple).as_dict()
        batch["pair_tokens"] = sum(pair_tokens(p) for p in pairs)
        return batch

    # ----------------------------------------------------------------- reference log-probs

    def _autocast(self):
        device = self.ctx.device
        if self.cfg.train.dtype == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(f"{self.cfg.model.init_from}|{self.cfg.train.dtype}|{self.cfg.dpo.shared_prompt}".encode())
        for pair in self.pairs:
            for ids in (pair.prompt, pair.chosen, pair.rejected):
                digest.update(ids.tobytes())
                digest.update(b"|")
        return digest.hexdigest()

    def _precomputed_reference(self, ctx: StageContext) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per pair (chosen, rejected) token log-probs under the initial policy: read from
        <run_dir>/reference_logps.pt when it matches the data, else computed once (every rank
        runs the same forwards; rank 0 writes the file, atomically)."""
        path = Path(ctx.run_dir) / "reference_logps.pt"
        fingerprint = self._fingerprint()
        if path.is_file():
            stored = torch.load(path, weights_only=True)
            if stored["fingerprint"] == fingerprint:
                return [(c.numpy(), r.numpy()) for c, r in zip(stored["chosen"], stored["rejected"])]
            if self.is_main:
                tqdm.write(f"[dpo] {path} was computed for other pairs or another initial model; recomputing")
        out: list[tuple[np.ndarray, np.ndarray]] = []
        bar = tqdm(total=len(self.pairs), desc="[dpo] reference log-probs", unit="pair", disable=not self.show)
        with torch.no_grad(), self._autocast():
            if ctx.pipeline_forward is not None:
                out = self._pipelined_reference_logps(bar)
            else:
                for start in range(0, len(self.pairs), self.micro_batch):
                    chunk = self.pairs[start:start + self.micro_batch]
                    batch = {k: v.to(ctx.device) if torch.is_tensor(v) else v for k, v in self._batch(chunk).items()}
                    logps = score_pairs(ctx.model.parts[0], batch, self.logprobs_kernel)  # [M]
                    out.extend(split_by_pair(logps, batch["score_segments"], len(chunk)))
                    bar.update(len(chunk))
        bar.close()
        if ctx.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            torch.save({"fingerprint": fingerprint, "chosen": [torch.from_numpy(c) for c, _ in out],
                        "rejected": [torch.from_numpy(r) for _, r in out]}, tmp)
            os.replace(tmp, path)
        return out

    def _pipelined_reference_logps(self, bar: tqdm) -> list[tuple[np.ndarray, np.ndarray]]:
        """`_precomputed_reference` under pipeline parallelism: the pairs in steps of the
        schedule's micro-batches (the last step filled up by repeating its last micro-batch)
        through forward-only passes; the rank holding the last stage shares the log-probs with
        its pipeline group."""
        micro = [self._batch(self.pairs[start:start + self.micro_batch])
                 for start in range(0, len(self.pairs), self.micro_batch)]
        per_pass = self.global_batch // (self.micro_batch * self.dp_size)
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, len(micro), per_pass):
            group = micro[start:start + per_pass]
            group += group[-1:] * (per_pass - len(group))
            rows = self._pipeline_rows(group)
            logps = self._pipeline_logps(self.ctx.model, rows, adapters_off=False)  # [n, L] or None
            for i, batch in enumerate(group[:len(micro) - start]):
                if logps is not None:
                    out.extend(split_by_pair(logps[i], rows["score_segments"][i], batch["num_pairs"]))
                bar.update(batch["num_pairs"])
        shared: list = [None] * self.ctx.model.mesh["pp"].size()
        dist.all_gather_object(shared, out if self.ctx.model.has_last_stage else None,
                               group=self.ctx.model.mesh["pp"].get_group())
        return next(entry for entry in shared if entry is not None)

    def _reference_for(self, batch: dict, model: torch.nn.Module) -> torch.Tensor:
        """pi_ref's log-probs at the batch's scored positions [M] (no gradient)."""
        if "reference_logps" in batch:
            return batch["reference_logps"]
        with torch.no_grad():
            if self.reference == "adapters":
                with adapters_disabled(model):
                    return score_pairs(model, batch, self.logprobs_kernel)
            return score_pairs(self.reference_model.parts[0], batch, self.logprobs_kernel)

    # ----------------------------------------------------------------- data

    def _pair_at(self, index: int, pairs: list[PreferencePair], seed: int) -> int:
        """Which pair sits at global position `index` of the endless, per-epoch shuffled stream."""
        epoch, offset = divmod(index, len(pairs))
        key = (seed, len(pairs), epoch)
        if key not in self._orders:
            self._orders = {key: np.random.default_rng(seed + epoch).permutation(len(pairs))}
        return int(self._orders[key][offset])

    def batches(self, step: int) -> list[dict]:
        """This rank's micro-batches of `micro_batch_size` pairs (online: of the round `step`
        belongs to, generated first when it does not exist yet); advances the cursor."""
        if self.online is not None:
            pairs, cursor, seed = self.online.pairs_for_step(step, self.global_batch)
        else:
            pairs, cursor, seed = self.pairs, self.consumed_pairs, self.cfg.data.seed
        self.consumed_pairs += self.global_batch
        if not pairs:
            return []
        micro = []
        for start in micro_batch_starts(cursor, self.global_batch, self.micro_batch, self.dp_rank, self.dp_size):
            indices = [self._pair_at(i, pairs, seed) for i in range(start, start + self.micro_batch)]
            batch = self._batch([pairs[i] for i in indices])
            if self.reference_logps is not None:
                batch["reference_logps"] = torch.from_numpy(np.concatenate(
                    [part for i in indices for part in self.reference_logps[i]]).astype(np.float32))
            micro.append(batch)
        return micro

    # ----------------------------------------------------------------- step

    def forward_step(self, batch: dict, model: torch.nn.Module):
        """Policy log-probs at the scored positions; the loss function applies the DPO loss
        against pi_ref and returns (sum of pair losses, pairs, metric sums)."""
        reference = self._reference_for(batch, model).detach().float()  # [M]
        policy = score_pairs(model, batch, self.logprobs_kernel)  # [M]

        def loss_fn(output: torch.Tensor):
            return pair_loss(output, reference, batch, self.cfg.dpo, self.loss_kernel)

        return policy, loss_fn

    # ----------------------------------------------------------------- pipeline parallelism

    def _pipeline_rows(self, micro: list[dict]) -> dict:
        """The micro-batches as fixed-length rows, one per micro-batch: tensors [n, L]."""
        length = pipeline_row_length(self.micro_batch, self.seq_len, self.pad_multiple)
        rows = [fixed_length_batch(batch, length, self.ctx.tokenizer.eod_id) for batch in micro]
        return {k: torch.cat([row[k] for row in rows]).to(self.ctx.device)
                for k in rows[0] if torch.is_tensor(rows[0][k])}

    def _pipeline_kwargs(self, rows: dict) -> dict:
        """What every pipeline stage's forward takes besides the tokens (the last stage scores)."""
        return {"position_ids": rows["position_ids"], "document_ids": rows["document_ids"],
                "prefix_ids": rows.get("prefix_ids"), "targets": rows["score_targets"],
                "score_index": rows["score_index"], "logprobs_kernel": self.logprobs_kernel}

    def _pipeline_logps(self, model, rows: dict, adapters_off: bool) -> torch.Tensor | None:
        """Log-probs [n, L] of `model` (a ParallelModel) at the rows' scored slots from a
        forward-only pass of the pipeline, on the rank holding the last stage (None elsewhere)."""
        with contextlib.ExitStack() as stack:
            if adapters_off:
                for part in model.parts:
                    stack.enter_context(adapters_disabled(part))
            return self.ctx.pipeline_forward(model, rows["tokens"], self._pipeline_kwargs(rows))

    def pipeline_batch(self, micro: list[dict]) -> PipelineBatch:
        """The step's micro-batches as fixed-length rows [n, L]; the loss target [n, L, 2] holds
        each scored slot's segment (-1: unused) and pi_ref's log-prob there, which a forward-only
        pass of the pipeline computes first (unless precomputed)."""
        rows = self._pipeline_rows(micro)
        if "reference_logps" in rows:
            reference = rows["reference_logps"]  # [n, L]
        elif self.reference == "adapters":
            reference = self._pipeline_logps(self.ctx.model, rows, adapters_off=True)
        else:
            reference = self._pipeline_logps(self.reference_model, rows, adapters_off=False)
        segments = rows["score_segments"].float()  # [n, L]
        reference = torch.zeros_like(segments) if reference is None else reference.float()  # [n, L]
        tokens = float(sum(batch["pair_tokens"] for batch in micro))
        return PipelineBatch(inputs=rows["tokens"], kwargs=self._pipeline_kwargs(rows),
                             target=torch.stack([segments, reference], dim=-1),  # [n, L, 2]
                             loss_tokens=torch.tensor(len(micro) * self.micro_batch),
                             metrics=lambda: self._pipeline_step_metrics(len(micro), tokens))

    def pipeline_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sum of the pair losses of one pipeline micro-batch: output = the policy's log-probs
        [b, L] at the scored slots, target [b, L, 2] (segment, pi_ref's log-prob). The metric
        sums are kept for `_pipeline_step_metrics`."""
        segments = target[..., 0].long()  # [b, L]
        used = segments >= 0  # [b, L]
        first = torch.arange(segments.shape[0], device=segments.device)[:, None] * 2 * self.micro_batch  # [b, 1]
        batch = {"score_segments": (segments + first)[used], "num_pairs": segments.shape[0] * self.micro_batch,
                 "pair_tokens": 0}
        loss, _, metrics = pair_loss(output[used], target[..., 1][used], batch, self.cfg.dpo, self.loss_kernel)
        self._pipeline_metrics.append({k: v.detach() for k, v in metrics.items() if k != "tokens"})
        return loss

    def _pipeline_step_metrics(self, num_micro: int, tokens: float) -> dict:
        """The metric sums of the step's last `num_micro` loss calls (the schedule also calls
        the loss once on placeholder tensors when it infers shapes at its first step); zeros on
        the ranks without the last stage, which make no loss calls."""
        records, self._pipeline_metrics = self._pipeline_metrics[-num_micro:], []
        return {**{k: sum(record[k] for record in records) if records else 0.0 for k in PAIR_METRICS},
                "tokens": tokens}

    def close(self) -> None:
        """Stop the online rounds' rollout engine (an in-process vLLM engine holds memory)."""
        if self.online is not None:
            self.online.close()

    # ----------------------------------------------------------------- resume

    def state_dict(self) -> dict:
        """The data cursor (pairs consumed)."""
        return {"consumed_pairs": self.consumed_pairs}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved cursor."""
        self.consumed_pairs = int(state["consumed_pairs"])

