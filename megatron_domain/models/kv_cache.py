"""Key/value cache for incremental decoding with our decoder.

Each layer owns a preallocated buffer pair k, v [B, Hkv, C, D] (allocated at the layer's first
write, with the local head count, dtype and device of its keys, so a tensor-parallel rank
caches only its own heads). All rows advance together: prompts of different lengths are
left-padded, and `valid` [B, C] marks which cache positions hold real tokens. A forward over
S new positions (the prompt in prefill, one token per decode step) is announced with
`append(valid_new)`; each layer then writes its keys and values at [length - S, length) and
attends over [0, length) with the mask this call built: a query sees the valid keys at or
before its own position, and itself (so a padding query attends to something and stays
finite; no real query ever sees a padding key).

`select_rows` reorders, repeats (n samples per prompt share one prefilled prompt) or drops
(finished sequences) rows of every buffer at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Per-layer key/value buffers of `batch_size` rows and `capacity` positions."""

    def __init__(self, batch_size: int, capacity: int, device: torch.device | str):
        self.capacity = capacity
        self.length = 0  # positions written (the same for every row)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)  # [B, C]
        self.buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mask: torch.Tensor | None = None  # [B, 1, S, length] bool, of the forward in flight
        self._folded_masks: dict[int, torch.Tensor] = {}  # groups -> additive mask, shared by all layers

    def append(self, valid_new: torch.Tensor) -> None:
        """Announce the next forward: valid_new [B, S] says which of its S positions are real
        tokens (False = left padding). Builds the attention mask [B, 1, S, length + S]."""
        steps = valid_new.shape[1]
        start, end = self.length, self.length + steps
        if end > self.capacity:
            raise ValueError(f"KV cache overflow: {end} positions needed, capacity {self.capacity}")
        self.valid[:, start:end] = valid_new
        keys = torch.arange(end, device=self.valid.device)  # [T]
        queries = torch.arange(start, end, device=self.valid.device)  # [S]
        causal = keys[None, :] <= queries[:, None]  # [S, T]
        itself = keys[None, :] == queries[:, None]  # [S, T]
        self.mask = ((self.valid[:, None, :end] & causal) | itself)[:, None]  # [B, 1, S, T]
        self._folded_masks = {}
        self.length = end

    def folded_mask(self, groups: int, dtype: torch.dtype) -> torch.Tensor:
        """The mask of this forward for `groups` query heads per KV head folded into the query
        axis, as an additive float mask (0 / -inf) [B, 1, G*S, T]: built once per forward and
        shared by every layer (SDPA on CPU is faster with it than with a boolean mask)."""
        if groups not in self._folded_masks:
            bsz, _, seq, keys = self.mask.shape
            folded = self.mask[:, :, None].expand(bsz, 1, groups, seq, keys).reshape(bsz, 1, groups * seq, keys)
            additive = torch.zeros(folded.shape, dtype=dtype, device=folded.device)
            self._folded_masks[groups] = additive.masked_fill_(~folded, float("-inf"))
        return self._folded_masks[groups]

    def update(self, layer: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys/values k, v [B, Hkv, S, D] of `layer`; returns the cached
        keys and values so far, [B, Hkv, length, D] views."""
        if layer not in self.buffers:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self.buffers[layer] = (k.new_zeros(shape), v.new_zeros(shape))
        k_buf, v_buf = self.buffers[layer]
        start = self.length - k.shape[2]
        k_buf[:, :, start:self.length] = k
        v_buf[:, :, start:self.length] = v
        return k_buf[:, :, :self.length], v_buf[:, :, :self.length]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep rows `rows` [B'] (indices, repeats allowed) of every buffer, in that order."""
        rows = rows.to(self.valid.device)
        self.valid = self.valid.index_select(0, rows)
        self.buffers = {name: (k.index_select(0, rows), v.index_select(0, rows))
                        for name, (k, v) in self.buffers.items()}


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Attention of S new queries over the cache: q [B, Hq, S, D], k/v [B, Hkv, T, D] (the
    cache's views) -> [B, Hq, S, D]. Grouped-query heads are folded into the query axis (the
    group's queries share their KV head) instead of repeating the cached keys and values for
    every query head, which would copy the whole cache at every decode step."""
    bsz, q_heads, seq, dim = q.shape
    groups = q_heads // k.shape[1]
    folded = q.reshape(bsz, k.shape[1], groups * seq, dim)  # [B, Hkv, G*S, D] (head h = kv * G + g)
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=cache.folded_mask(groups, q.dtype))  # [B, Hkv, G*S, D]
    return out.reshape(bsz, q_heads, seq, dim)
