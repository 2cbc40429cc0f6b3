"""The native sampler (`rollout.backend: native`): our model with a KV cache, the reference
every other backend is checked against.

One `generate` call: the prompts are sorted by length and cut into batches of at most
`max_batch_sequences` sequences (prompts x n). For each batch, the prompts are left-padded
and prefilled once (one forward over the whole prompt), the cache rows are repeated n times
(the samples of a prompt share its prefilled cache), then every decode step feeds one token
per live sequence. Finished sequences (stop token, stop string, length) are dropped from the
batch once they make up a quarter of it, so the tail of a batch does not pay for the dead
rows. Works on a plain model, with LoRA adapters, and on a tensor-parallel model (every TP
rank calls `generate` with the same prompts and seeds; each caches its own heads). On CPU the
plain linear layers run on prepacked oneDNN weights during a generation (rollout/packed.py).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.distributed.tensor import DTensor

from megatron_domain.data.tokenizer import TextTokenizer
from megatron_domain.models.kv_cache import KVCache
from megatron_domain.rollout.packed import packed_linears, packing_available
from megatron_domain.rollout.sampling import (
    Completion, SamplingParams, StopChecker, choose_tokens, make_generator, sequence_seeds)


class NativeSampler:
    """Generate from `model` (a Transformer, possibly with LoRA or tensor parallel).
    `pack_weights`: run plain linear layers on prepacked CPU weights (None = when available)."""

    def __init__(self, model: torch.nn.Module, decode: Callable[[list[int]], str], pad_id: int,
                 device: torch.device, max_batch_sequences: int = 64, pack_weights: bool | None = None):
        if getattr(model, "embed_tokens", True) is None or getattr(model, "norm", True) is None:
            raise ValueError("native sampler: the model is one pipeline chunk (no embedding or no output layer); "
                             "generation needs the whole model on every rank: use parallel.pp=1 for sampling")
        self.model = model
        self.decode = decode
        self.pad_id = pad_id
        self.device = device
        self.max_batch_sequences = max_batch_sequences
        self.sequence_multiple = sequence_parallel_degree(model)
        self.pack_weights = packing_available(device) if pack_weights is None else pack_weights

    @classmethod
    def for_tokenizer(cls, model: torch.nn.Module, tokenizer: TextTokenizer, device: torch.device,
                      max_batch_sequences: int = 64) -> "NativeSampler":
        """A sampler whose texts are `tokenizer`'s decoding (special tokens skipped), padding with EOD."""
        decode = lambda ids: tokenizer.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        return cls(model, decode, tokenizer.eod_id, device, max_batch_sequences)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int] | None = None,
                 progress: Callable[[int], None] | None = None,
                 on_token: Callable[[int, int, int], None] | None = None) -> list[Completion]:
        """n completions per prompt, in order (prompt 0's samples first). `seeds` gives each
        request its own seed (default params.seed + index). `progress(new_tokens)` is called
        after every decode step, `on_token(prompt_index, sample_index, token_id)` for every
        generated token (streaming)."""
        params.validate()
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        limit = getattr(getattr(self.model, "cfg", None), "max_seq_len", 0)
        longest = max((len(p) for p in prompts), default=0)
        if limit and longest + params.max_new_tokens > limit:
            raise ValueError(f"generate: the longest prompt ({longest} tokens) + max_new_tokens "
                             f"({params.max_new_tokens}) exceeds model.max_seq_len ({limit}); shorten it")
        request_seeds = sequence_seeds(params.seed, seeds, len(prompts))
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        per_batch = max(1, self.max_batch_sequences // params.n)
        results: dict[tuple[int, int], Completion] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            with contextlib.ExitStack() as stack:
                if self.pack_weights:
                    stack.enter_context(packed_linears(self.model, self.max_batch_sequences))
                for start in range(0, len(order), per_batch):
                    indices = order[start:start + per_batch]
                    for completion in self._generate_batch([prompts[i] for i in indices], indices,
                                                           [request_seeds[i] for i in indices], params, progress,
                                                           on_token):
                        results[(completion.prompt_index, completion.sample_index)] = completion
        finally:
            self.model.train(was_training)
        return [results[(i, j)] for i in range(len(prompts)) for j in range(params.n)]

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """tokens/positions [B, S] -> next-token logits [B, V] (fp32, full vocabulary)."""
        logits = self.model(tokens, positions, kv_cache=cache)  # [B, 1, V] (or [B, S, V] under SP)
        if isinstance(logits, DTensor):  # vocab-sharded under tensor parallelism
            logits = logits.full_tensor()
        return logits[:, -1].float()  # [B, V]

    def _generate_batch(self, prompts: list[list[int]], indices: list[int], seeds: list[int],
                        params: SamplingParams, progress, on_token) -> list[Completion]:
        n, device, multiple = params.n, self.device, self.sequence_multiple
        width = -(-max(len(p) for p in prompts) // multiple) * multiple
        cache = KVCache(len(prompts), width + params.max_new_tokens * multiple, device)
        tokens = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # [P, L] left-padded
        real = torch.zeros((len(prompts), width), dtype=torch.bool)  # [P, L]
        positions = torch.zeros((len(prompts), width), dtype=torch.long)  # [P, L]
        for row, prompt in enumerate(prompts):
            pad = width - len(prompt)
            tokens[row, pad:] = torch.tensor(prompt)
            real[row, pad:] = True
            positions[row, pad:] = torch.arange(len(prompt))
        cache.append(real.to(device))
        logits = self._forward(tokens.to(device), positions.to(device), cache)  # [P, V]
        # n sequences per prompt: repeat the prefilled cache rows and the last logits
        expand = torch.arange(len(prompts), device=device).repeat_interleave(n)  # [P*n]
        if n > 1:
            cache.select_rows(expand)
            logits = logits.index_select(0, expand)  # [P*n, V]
        rows = [(p, j) for p in range(len(prompts)) for j in range(n)]  # live row -> (batch prompt, sample)
        generators = [make_generator(seeds[p], j, device) for p, j in rows]
        next_position = torch.tensor([len(prompts[p]) for p, _ in rows], device=device)  # [B]
        outputs: dict[tuple[int, int], list[int]] = {row: [] for row in rows}
        logprobs: dict[tuple[int, int], list[float]] = {row: [] for row in rows}
        finished: set[tuple[int, int]] = set()
        stopper = StopChecker(params, self.decode)
        for step in range(params.max_new_tokens):
            chosen = choose_tokens(logits, params, generators)  # [B]
            chosen_logprobs = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None]).squeeze(1)  # [B]
            appended = 0
            for key, token, logprob in zip(rows, chosen.tolist(), chosen_logprobs.tolist()):
                if key in finished:
                    continue
                outputs[key].append(token)
                logprobs[key].append(logprob)
                appended += 1
                if on_token is not None:
                    on_token(indices[key[0]], key[1], token)
                if stopper.finished(outputs[key]):
                    finished.add(key)
            if progress is not None:
                progress(appended)
            if step == params.max_new_tokens - 1 or len(finished) == len(outputs):
                break
            live = [b for b, key in enumerate(rows) if key not in finished]
            if len(rows) - len(live) >= max(1, len(rows) // 4):  # compact: drop finished rows
                keep = torch.tensor(live, device=device)
                cache.select_rows(keep)
                chosen, next_position = chosen.index_select(0, keep), next_position.index_select(0, keep)
                rows, generators = [rows[b] for b in live], [generators[b] for b in live]
            step_valid = torch.zeros(len(rows), multiple, dtype=torch.bool, device=device)  # [B, m]
            step_valid[:, -1] = True  # the real token last, after m - 1 padding positions
            cache.append(step_valid)
            step_tokens = torch.full((len(rows), multiple), self.pad_id, dtype=torch.long, device=device)  # [B, m]
            step_tokens[:, -1] = chosen
            logits = self._forward(step_tokens, next_position[:, None].expand(-1, multiple), cache)  # [B, V]
            next_position = next_position + 1
        completions = []
        for (p, j), ids in outputs.items():
            completions.append(Completion(prompt_index=indices[p], sample_index=j, token_ids=ids,
                                          text=stopper.text(ids), logprobs=logprobs[(p, j)],
                                          finish_reason="stop" if (p, j) in finished else "length"))
        return completions


def sequence_parallel_degree(model: torch.nn.Module) -> int:
    """tp when `model` runs sequence parallel (only then are its RMSNorm weights DTensors:
    see parallel/tensor.py), else 1."""
    norm = getattr(model, "norm", None)
    weight = getattr(norm, "weight", None)
    return weight.device_mesh.size() if isinstance(weight, DTensor) else 1
