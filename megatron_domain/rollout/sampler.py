"""Greedy decoding with our model, batched over prompts of different lengths.

Prompts are left-padded; the padding is its own document (document_ids 0, the prompt 1), so
with per-document attention no real token sees a pad, and positions start at 0 at each
prompt's first token: every row decodes exactly as it would alone. Each step re-runs the
whole sequence (no KV cache): fine for evaluation-sized batches of short answers; the
KV-cache sampler for DPO rollouts replaces this loop, not its interface.
"""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, pad_id: int,
                    device: torch.device, is_done: Callable[[list[int]], bool] | None = None,
                    batch_size: int = 32) -> list[list[int]]:
    """The argmax continuation of every prompt (new tokens only), stopping a row when
    `is_done(new_tokens)` says so or after `max_new_tokens`."""
    was_training = model.training
    model.eval()
    outputs: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        outputs.extend(_generate_batch(model, prompts[start:start + batch_size], max_new_tokens, pad_id, device,
                                       is_done))
    model.train(was_training)
    return outputs


def _generate_batch(model, prompts, max_new_tokens, pad_id, device, is_done):
    longest = max(len(p) for p in prompts)
    rows = len(prompts)
    tokens = torch.full((rows, longest), pad_id, dtype=torch.long)  # [B, L] left-padded
    documents = torch.zeros((rows, longest), dtype=torch.long)  # [B, L] 0 = padding, 1 = the prompt
    positions = torch.zeros((rows, longest), dtype=torch.long)  # [B, L]
    for r, prompt in enumerate(prompts):
        offset = longest - len(prompt)
        tokens[r, offset:] = torch.tensor(prompt)
        documents[r, offset:] = 1
        positions[r, offset:] = torch.arange(len(prompt))
        positions[r, :offset] = torch.arange(offset)
    tokens, documents, positions = tokens.to(device), documents.to(device), positions.to(device)
    new_tokens: list[list[int]] = [[] for _ in range(rows)]
    active = [True] * rows
    for _ in range(max_new_tokens):
        logits = model(tokens, positions, documents)[:, -1]  # [B, V]
        next_ids = logits.argmax(-1)  # [B]
        for r in range(rows):
            if active[r]:
                new_tokens[r].append(int(next_ids[r]))
                if is_done is not None and is_done(new_tokens[r]):
                    active[r] = False
        if not any(active):
            break
        tokens = torch.cat([tokens, next_ids[:, None]], dim=1)  # [B, L+1]
        documents = torch.cat([documents, documents[:, -1:]], dim=1)  # [B, L+1]
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)  # [B, L+1]
    return new_tokens
