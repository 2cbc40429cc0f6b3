"""Llama-family decoder (Llama 3.x, Qwen2.5, Mistral): RMSNorm, RoPE (+ Llama 3.1 scaling),
GQA, SwiGLU, optional q/k/v bias and tied embeddings.

Parameter names are Hugging Face's without the `model.` prefix (`embed_tokens.weight`,
`layers.0.self_attn.q_proj.weight`, ..., `norm.weight`, `lm_head.weight`), so HF conversion
is a rename table. RoPE uses HF's rotate-half convention, so q/k weights need no permutation.
Layers live in a ModuleDict keyed by their global index so pipeline stages can drop layers
and keep names stable.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from megatron_domain.config import ModelConfig
from megatron_domain.kernels.cpu_attention import cpu_attention_ready
from megatron_domain.models.attention import ATTENTION_BACKENDS, AttentionContext
from megatron_domain.models.kv_cache import KVCache, cached_attention


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def reset_parameters(self) -> None:
        """Ones."""
        nn.init.ones_(self.weight)


def rope_inv_freq(cfg: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies [D/2] with optional Llama 3.1 scaling (HF `_compute_llama3_parameters`)."""
    dim = cfg.resolved_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    rs = cfg.rope_scaling
    if rs.type == "llama3":
        low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids [B, S] -> cos, sin [B, 1, S, D] (fp32 math, cast to `dtype`)."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rope_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of cos / sin: the one q and k have when RoPE is applied. Under autocast the
    projections return the autocast dtype while the residual stream `x` stays fp32; fp32
    cos / sin would promote q and k back to fp32 (a cast per layer, elementwise work at twice
    the bytes, and a cast back inside attention)."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D] with halves (a, b) -> (-b, a)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] rotated by position."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE. `layer_key` names the layer's slot in a KV cache."""

    def __init__(self, cfg: ModelConfig, layer_key: str = "0"):
        super().__init__()
        self.layer_key = layer_key
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.attend = ATTENTION_BACKENDS[cfg.attention_backend]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """x [B, S, H] -> [B, S, H]."""
        bsz, seq, _ = x.shape
        q = self.q_proj(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)  # [B, Hq, S, D]
        k = self.k_proj(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, S, D]
        v = self.v_proj(x).view(bsz, seq, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, S, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if ctx.kv_cache is not None:  # incremental decoding: attend over the cached positions too
            k, v = ctx.kv_cache.update(self.layer_key, k, v)  # [B, Hkv, T, D]
            out = cached_attention(q, k, v, ctx.kv_cache)  # [B, Hq, S, D]
        else:
            out = self.attend(q, k, v, ctx)  # [B, Hq, S, D]
        return self.o_proj(out.transpose(1, 2).reshape(bsz, seq, -1))  # [B, S, H]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, H] -> [B, S, H]."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_key: str = "0"):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_key)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """x [B, S, H] -> [B, S, H]."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The decoder, or one pipeline chunk of it. The full model maps tokens to logits. A
    pipeline chunk lacks `embed_tokens` (not the first stage: it takes hidden states) and/or
    `norm` + `lm_head` (not the last stage: it returns hidden states)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, str(i)) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("rope_inv_freq", rope_inv_freq(cfg), persistent=False)

    def output_weight(self) -> torch.Tensor:
        """The [V, H] output projection (the embedding when tied)."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def forward(self, inputs: torch.Tensor, position_ids: torch.Tensor,
                document_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                logprobs_kernel: Callable | None = None, kv_cache: KVCache | None = None,
                prefix_ids: torch.Tensor | None = None, score_index: torch.Tensor | None = None) -> torch.Tensor:
        """inputs: tokens [B, S] (or hidden states [B, S, H] on a later pipeline chunk) ->
        logits [B, S, V] (or hidden states [B, S, H] before the last chunk). `document_ids`
        [B, S] enables per-document masking; `position_ids` [B, S] restart at each document.
        With `targets` [B, S] and a `logprobs_kernel` (kernels' linear_logprobs), the last
        chunk returns log p(target) [B, S] fp32 instead of logits, never materializing them all
        (computed inside forward so FSDP's unsharded output weight is at hand).

        With a `kv_cache` (incremental decoding; `kv_cache.append` announced the S new
        positions, `document_ids` unused) every layer reads and extends the cache, and the
        last chunk returns the logits of the last position only, [B, 1, V]."""
        x = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs  # [B, S, H]
        cos, sin = rope_cos_sin(self.rope_inv_freq, position_ids, rope_dtype(x))  # [B, 1, S, D]
        if kv_cache is not None:
            ctx = AttentionContext(kv_cache=kv_cache)
        else:
            csrc_backward = self.cfg.attention_backend == "sdpa" and cpu_attention_ready(x)
            ctx = AttentionContext.build(document_ids, self.cfg.attention_backend, tuple(x.shape[:2]), prefix_ids,
                                         csrc_backward)
        for layer in self.layers.values():
            x = layer(x, cos, sin, ctx)  # [B, S, H]
        if self.norm is None:
            return x
        if kv_cache is not None and not isinstance(x, DTensor):
            x = x[:, -1:]  # [B, 1, H] (a sequence-parallel DTensor keeps all positions)
        x = self.norm(x)  # [B, S, H]
        if targets is not None and logprobs_kernel is not None:
            return self.target_logprobs(x, targets, logprobs_kernel, score_index)  # [B, S] or [M]
        if self.lm_head is not None:
            return self.lm_head(x)  # [B, S, V]
        return F.linear(x, self.embed_tokens.weight)  # [B, S, V]

    def target_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, logprobs_kernel: Callable,
                        score_index: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, S, H] (a DTensor under TP), targets [B, S] -> log p(target) [B, S] fp32;
        with `score_index` [M]: the hidden states at those flat positions, targets [M] -> [M]
        (or, as a pipeline schedule passes them, score_index/targets [B, K] indexing each
        row's own positions -> [B, K]).
        Under TP the output weight is vocabulary-sharded: each rank takes its local rows and the
        kernel reduces over the TP group."""
        weight, group = self.output_weight(), None
        if isinstance(weight, DTensor):
            group = weight.device_mesh.get_group()
            weight = weight.to_local()  # [V / tp, H]
        if isinstance(hidden, DTensor):
            hidden = hidden.redistribute(placements=[Replicate()]).to_local()  # [B, S, H]
        device_type = hidden.device.type
        # under autocast, run the kernel's matmuls in the autocast dtype in forward and backward alike
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        rows = hidden.flatten(0, 1)  # [B*S, H]
        if score_index is not None:
            if score_index.dim() == 2:  # per-row positions -> flat positions of the [B*S] rows
                offsets = torch.arange(score_index.shape[0], device=score_index.device)[:, None] * hidden.shape[1]
                score_index = (score_index + offsets).flatten()  # [B*K]
            rows = rows.index_select(0, score_index)  # [M, H]
        with torch.autocast(device_type, enabled=False):
            logp, _ = logprobs_kernel(rows.to(dtype), weight.to(dtype), targets.flatten(), group=group)
        return logp.view(targets.shape)  # [B, S] or [M]

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Deterministic init that does not depend on the parallel layout: every parameter gets
        `initial_value(name, ...)` from its own generator seeded by (seed, name). Sharded
        (DTensor) parameters keep their shard."""
        for name, param in self.named_parameters():
            copy_full_tensor(param, initial_value(canonical_name(name), tuple(param.shape), seed, self.cfg.init_std))
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (needed after building on the meta device)."""
        self.rope_inv_freq = rope_inv_freq(self.cfg, device=next(self.parameters()).device)


def initial_value(name: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """The full initial tensor of parameter `name`: ones for norms, zeros for biases and LoRA B,
    U(-1/sqrt(in), 1/sqrt(in)) for LoRA A (as nn.Linear and PEFT), N(0, std) otherwise."""
    if name.endswith("layernorm.weight") or name == "norm.weight":
        return torch.ones(shape)
    if name.endswith((".bias", "lora_b")):
        return torch.zeros(shape)
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if name.endswith("lora_a"):
        bound = 1.0 / math.sqrt(shape[1])
        return torch.empty(shape).uniform_(-bound, bound, generator=gen)
    return torch.randn(shape, generator=gen, dtype=torch.float32).mul_(std)


def canonical_name(name: str) -> str:
    """A parameter's name without wrapper prefixes (activation checkpointing, compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def copy_full_tensor(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (unsharded) tensor into `param`, keeping only this rank's shard when
    `param` is a DTensor (every rank holds the same `full`, so no communication is needed)."""
    if isinstance(param, DTensor):
        shard = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


def materialize(model: Transformer, device: torch.device | str, seed: int | None) -> Transformer:
    """Allocate a meta-device model on `device`; initialize it when `seed` is given."""
    model.to_empty(device=device)
    if seed is None:
        model.reset_buffers()
    else:
        model.init_weights(seed)
    return model


def build_model(cfg: ModelConfig) -> Transformer:
    """Build on the meta device (no memory); call `materialize` once converters are applied."""
    with torch.device("meta"):
        return Transformer(cfg)


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts {total, embedding, non_embedding} computed from shapes alone."""
    model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs per trained token: 6 x (non-embedding params, incl. output layer) for the
    matmuls (forward 2, backward 4) + 12 x layers x (heads x head_dim) x seq_len for attention
    scores and values (PaLM appendix B convention, no causal discount)."""
    counts = count_parameters(cfg)
    matmul_params = counts["non_embedding"] + (cfg.vocab_size * cfg.hidden_size if cfg.tie_embeddings else 0)
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.resolved_head_dim * seq_len
    return float(6 * matmul_params + attention)
