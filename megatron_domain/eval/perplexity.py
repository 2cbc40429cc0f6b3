"""Held-out perplexity: ppl = exp( sum of next-token NLL / number of predicted tokens ).

A set's documents are concatenated (each ends with EOD) and cut into rows of seq_len + 1
tokens with stride seq_len, so every token is predicted exactly once; attention and loss are
masked per document as in training, and the tail row is padded with masked positions.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megatron_domain.config import EvalSetConfig
from megatron_domain.data.indexed import read_documents
from megatron_domain.data.packing import packed_batch
from megatron_domain.losses import masked_cross_entropy_sum


def eval_rows(documents: list[np.ndarray], seq_len: int, eod_id: int, max_rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(rows [R, S+1] token ids, valid [R, S] bool: label positions that hold real tokens)."""
    stream = np.concatenate(documents).astype(np.int64)  # [T]
    num_rows = max(1, math.ceil((len(stream) - 1) / seq_len))
    if max_rows:
        num_rows = min(num_rows, max_rows)
    rows = np.full((num_rows, seq_len + 1), eod_id, dtype=np.int64)  # [R, S+1]
    valid = np.zeros((num_rows, seq_len), dtype=bool)  # [R, S]
    for r in range(num_rows):
        chunk = stream[r * seq_len: r * seq_len + seq_len + 1]
        rows[r, : len(chunk)] = chunk
        valid[r, : len(chunk) - 1] = True
    return rows, valid


@torch.no_grad()
def perplexity(model: torch.nn.Module, documents: list[np.ndarray], seq_len: int, eod_id: int,
               batch_size: int, device: torch.device, max_rows: int = 0) -> dict:
    """{"ppl", "nll", "tokens"} of `model` on `documents` (model put in eval mode meanwhile)."""
    was_training = model.training
    model.eval()
    rows, valid = eval_rows(documents, seq_len, eod_id, max_rows)
    total_nll = torch.zeros((), dtype=torch.float64)
    total_tokens = 0
    for start in range(0, len(rows), batch_size):
        batch = packed_batch(list(rows[start:start + batch_size]), eod_id)
        mask = batch["loss_mask"] & torch.from_numpy(valid[start:start + batch_size])  # [B, S]
        logits = model(batch["tokens"].to(device), batch["position_ids"].to(device),
                       batch["document_ids"].to(device))  # [B, S, V]
        nll, count = masked_cross_entropy_sum(logits.flatten(0, 1), batch["labels"].to(device).flatten(),
                                              mask.to(device).flatten())
        total_nll += nll.double().cpu()
        total_tokens += int(count.item())
    model.train(was_training)
    mean = total_nll.item() / max(total_tokens, 1)
    return {"ppl": math.exp(mean), "nll": mean, "tokens": total_tokens}


def evaluate_sets(model: torch.nn.Module, sets: list[EvalSetConfig], seq_len: int, eod_id: int, batch_size: int,
                  device: torch.device, max_rows: int = 0) -> dict:
    """{"ppl": {name: value}, "tokens": {name: count}} over the configured held-out sets."""
    out: dict = {"ppl": {}, "tokens": {}}
    for i, s in enumerate(sets):
        docs = read_documents(s.path, field=f"eval.sets[{i}].path")
        result = perplexity(model, docs, seq_len, eod_id, batch_size, device, max_rows)
        out["ppl"][s.name] = result["ppl"]
        out["tokens"][s.name] = result["tokens"]
    return out
