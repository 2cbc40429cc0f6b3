"""What every rollout backend shares: sampling parameters, the completion record, the
next-token choice (temperature, top-k, top-p, per-sequence seeded noise) and stop handling.

Randomness is per sequence, as in vLLM: sequence j of request i draws from its own generator
seeded by (request seed, j), so a request's samples do not depend on which other requests
share its batch, and a seeded request is reproducible. A token is drawn by inverting the
cumulative distribution with one uniform number per sequence and step (as torch.multinomial
does): one scalar draw per row instead of a vocabulary-sized noise vector per row, which cost
a fifth of the decode time on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_domain.config import sampling_problems

@dataclass
class SamplingParams:
    """How to continue each prompt. temperature 0 = greedy; top_k 0 and top_p 1 = off.
    Generation of a sequence ends at a `stop_token_ids` token (kept in the token ids, left out
    of the text), at a `stop` string (the text is cut before it) or after `max_new_tokens`."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_stop: bool = False  # run every sequence to max_new_tokens (benchmarks)

    def validate(self) -> "SamplingParams":
        """Raise ValueError naming the bad field; returns self."""
        problems = [f"{key} {message}" for key, message in sampling_problems(
            self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.n)]
        if any(not s for s in self.stop):
            problems.append("stop strings must be non-empty")
        if problems:
            raise ValueError("sampling: " + "; ".join(problems))
        return self


@dataclass
class Completion:
    """One generated sequence: new token ids (a final stop token included), their text (stop
    token or string left out), the log-probability of each new token under the model
    (log_softmax of the raw logits, before temperature / top-k / top-p: the quantity a
    trainer computes by teacher forcing), and why it ended."""

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str


def sequence_seeds(base_seed: int | None, request_seeds: list[int] | None, num_requests: int) -> list[int]:
    """One seed per request: the caller's, else base_seed + request index, else fresh random
    seeds from torch's global generator."""
    if request_seeds is not None:
        if len(request_seeds) != num_requests:
            raise ValueError(f"seeds: {len(request_seeds)} given for {num_requests} prompts")
        return [int(s) for s in request_seeds]
    if base_seed is None:
        base_seed = int(torch.randint(0, 2**31 - 1, ()).item())
    return [base_seed + i for i in range(num_requests)]


def make_generator(seed: int, sample_index: int, device: torch.device) -> torch.Generator:
    """The generator of sample `sample_index` of a request seeded with `seed`."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + sample_index) % (2**63 - 1))


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B, V] -> scaled logits with everything outside top-k / the top-p nucleus set
    to -inf (the most likely token always survives). fp32."""
    logits = logits.float() / temperature  # [B, V]
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        probs = sorted_logits.softmax(-1)  # [B, V]
        before = probs.cumsum(-1) - probs  # [B, V] mass of the more likely tokens
        drop_sorted = before >= top_p  # [B, V] (the first token has before = 0: kept)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # [B, V]
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """Next token of every row: logits [B, V] -> ids [B]; `generators[b]` draws row b's number."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, params.temperature, params.top_k, params.top_p).softmax(-1)  # [B, V]
    cdf = probs.double().cumsum(-1)  # [B, V] fp64: exact enough over 100K+ tokens
    uniform = torch.cat([torch.rand(1, generator=g, device=g.device, dtype=torch.float64) for g in generators])  # [B]
    target = (uniform * cdf[:, -1])[:, None]  # [B, 1] a point in [0, total mass)
    # the first token whose cumulative mass exceeds the point; zero-probability tokens never do
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=logits.shape[-1] - 1)  # [B]


class StopChecker:
    """Decides, token by token, whether a sequence is finished and what its text is."""

    def __init__(self, params: SamplingParams, decode):
        self.stop_ids = set() if params.ignore_stop else set(params.stop_token_ids)
        self.stop_strings = [] if params.ignore_stop else list(params.stop)
        self.decode = decode  # ids -> text (special tokens skipped)

    def finished(self, token_ids: list[int]) -> bool:
        """Whether the sequence so far ends generation (before the length limit)."""
        if token_ids and token_ids[-1] in self.stop_ids:
            return True
        if self.stop_strings:
            text = self.decode(token_ids)
            return any(s in text for s in self.stop_strings)
        return False

    def text(self, token_ids: list[int]) -> str:
        """The completion's text: a final stop token left out, cut before the first stop string,
        without a trailing incomplete UTF-8 character (as vLLM's detokenizer, which never emits one)."""
        if token_ids and token_ids[-1] in self.stop_ids:
            token_ids = token_ids[:-1]
        text = self.decode(token_ids)
        cuts = [text.find(s) for s in self.stop_strings if s in text]
        return (text[: min(cuts)] if cuts else text).rstrip("\ufffd")
