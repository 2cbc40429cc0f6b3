"""Packed causal-LM batches: rows of `seq_len` tokens spanning several documents, with
per-document positions, document ids and a loss mask that never crosses an EOD boundary."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from megatron_domain.kernels.pack import PackMetadata, pack_metadata_reference


def packed_batch(rows: list[np.ndarray], eod_id: int,
                 pack_metadata: Callable[[torch.Tensor, int], PackMetadata] = pack_metadata_reference,
                 device: torch.device | None = None) -> dict:
    """rows: B arrays of seq_len + 1 token ids -> a batch dict of [B, S] tensors:
    tokens, labels (next token), loss_mask, position_ids, document_ids, plus cu_seqlens.
    `pack_metadata` is the kernel (kernels.pack_metadata) run on `device` (default: CPU)."""
    text = torch.from_numpy(np.stack([np.asarray(r, dtype=np.int64) for r in rows]))  # [B, S+1]
    tokens, labels = text[:, :-1].contiguous(), text[:, 1:].contiguous()  # [B, S], [B, S]
    if device is not None:
        tokens, labels = tokens.to(device), labels.to(device)
    meta = pack_metadata(tokens, eod_id)
    return {"tokens": tokens, "labels": labels, "loss_mask": meta.loss_mask,
            "position_ids": meta.position_ids, "document_ids": meta.document_ids,
            "cu_seqlens": meta.cu_seqlens}


class PackedSampleStream:
    """Sample-indexed view of a (blended) GPT dataset: `micro_batch(start, size)` returns the
    packed batch of samples [start, start + size). The caller owns the cursor."""

    def __init__(self, dataset: torch.utils.data.Dataset, eod_id: int,
                 pack_metadata: Callable[[torch.Tensor, int], PackMetadata] = pack_metadata_reference,
                 device: torch.device | None = None):
        self.dataset = dataset
        self.eod_id = eod_id
        self.pack_metadata = pack_metadata
        self.device = device

    def __len__(self) -> int:
        return len(self.dataset)

    def micro_batch(self, start: int, size: int) -> dict:
        """Packed batch of `size` consecutive samples; `dataset_id` [B] names each row's corpus."""
        if start + size > len(self.dataset):
            raise IndexError(f"sample {start + size - 1} requested but the dataset was built with "
                             f"{len(self.dataset)} samples")
        samples = [self.dataset[i] for i in range(start, start + size)]
        # megatron-core returns tokens = text[:-1], labels = text[1:]; rebuild the text row
        rows = [np.concatenate([s["tokens"].numpy(), s["labels"][-1:].numpy()]) for s in samples]
        batch = packed_batch(rows, self.eod_id, self.pack_metadata, self.device)
        batch["dataset_id"] = torch.tensor([int(s.get("dataset_id", 0)) for s in samples])  # [B]
        return batch
