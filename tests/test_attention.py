"""Attention backends for packed rows against a dense reference: explicit softmax(QK^T / sqrt(d))
over the document-causal mask, in float64. Backends that need a GPU or an optional package
(flash_varlen, te, compiled flex) are compared by tools/gpu_check.py on a GPU; here they fail
with a clear message."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import tiny_config_dict
from megatron_domain.config import config_from_dict
from megatron_domain.engine import train
from megatron_domain.models.attention import (
    ATTENTION_BACKENDS, AttentionContext, dense_document_attention, from_packed_heads, sdpa_native_gqa,
    to_packed_heads, varlen_boundaries)

TOLERANCE = 1e-5  # fp32 backends vs the float64 reference


def dense_reference(q, k, v, document_ids):
    """The float64 dense masked reference."""
    return dense_document_attention(q, k, v, document_ids, torch.float64)


def packed_qkv(bsz=3, heads=4, kv_heads=2, seq=37, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, heads, seq, dim, generator=g)
    k = torch.randn(bsz, kv_heads, seq, dim, generator=g)
    v = torch.randn(bsz, kv_heads, seq, dim, generator=g)
    # several documents, one document, 1-token documents
    lengths = [[seq // 4, seq // 2, seq - seq // 4 - seq // 2], [seq], [1, 1, seq - 2]][:bsz]
    document_ids = torch.stack([torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths])
    return q, k, v, document_ids


@pytest.mark.parametrize("single_document", [False, True])
def test_sdpa_matches_dense_reference(single_document):
    q, k, v, document_ids = packed_qkv()
    if single_document:
        document_ids = torch.zeros_like(document_ids)
    out = ATTENTION_BACKENDS["sdpa"](q, k, v, AttentionContext.build(document_ids, "sdpa"))
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, document_ids), atol=TOLERANCE, rtol=TOLERANCE)


@pytest.mark.parametrize("single_document", [False, True])
def test_sdpa_gradients_match_dense_reference_with_grouped_kv_heads(single_document):
    """The backward of the sdpa backend (the CPU flash kernel with `enable_gqa`: KV heads not
    repeated) gives the reference's gradients for q and for the shared k and v heads."""
    q, k, v, document_ids = packed_qkv()
    if single_document:
        document_ids = torch.zeros_like(document_ids)
    ctx = AttentionContext.build(document_ids, "sdpa")
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))  # [B, Hq, S, D]
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    dense_reference(*ref, document_ids).backward(grad_out.double())
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 5e-2)):  # repeated heads, native GQA
        ours = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        assert sdpa_native_gqa(ours[0], ctx.mask) == (dtype == torch.bfloat16)
        ATTENTION_BACKENDS["sdpa"](*ours, ctx).backward(grad_out.to(dtype))
        for name, a, b in zip("qkv", ours, ref):
            torch.testing.assert_close(a.grad.double(), b.grad, atol=tolerance, rtol=tolerance, msg=f"d{name} {dtype}")


def test_flex_forward_matches_dense_reference_on_cpu():
    q, k, v, document_ids = packed_qkv(seq=64)
    out = ATTENTION_BACKENDS["flex"](q, k, v, AttentionContext.build(document_ids, "flex"))
    torch.testing.assert_close(out.double(), dense_reference(q, k, v, document_ids), atol=TOLERANCE, rtol=TOLERANCE)


def test_varlen_layout_and_boundaries():
    """The THD layout round-trips, and cu_seqlens lists every document start over the
    flattened batch (what flash_varlen and te get)."""
    q, _, _, document_ids = packed_qkv()
    assert torch.equal(from_packed_heads(to_packed_heads(q), q.shape[0]), q)
    cu_seqlens, longest = varlen_boundaries(document_ids)
    assert cu_seqlens.tolist() == [0, 9, 27, 37, 74, 75, 76, 111] and longest == 37
    none_ctx = AttentionContext.build(None, "flash_varlen", shape=(2, 5))
    assert none_ctx.cu_seqlens.tolist() == [0, 5, 10] and none_ctx.max_seqlen == 5


@pytest.mark.parametrize("backend,package", [("flash_varlen", "flash_attn"), ("te", "transformer_engine")])
def test_optional_backends_name_their_package(backend, package):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here; tools/gpu_check.py compares it on a GPU")
    q, k, v, document_ids = packed_qkv()
    with pytest.raises(ImportError, match=f"attention_backend={backend}|fp8.backend=te|{backend}"):
        ATTENTION_BACKENDS[backend](q, k, v, AttentionContext.build(document_ids, backend))


def test_flex_attention_has_no_backward_on_cpu(corpora, tmp_path):
    """Guard for a measured torch pitfall: FlexAttention refuses inputs that require grad on
    CPU, so training refuses attention_backend=flex there with a clear error (evaluation is
    fine). If torch adds the CPU backward, this fails: lift the refusal in engine.build_trainer."""
    q, k, v, document_ids = packed_qkv(seq=32)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        ATTENTION_BACKENDS["flex"](q.requires_grad_(), k, v, AttentionContext.build(document_ids, "flex"))
    cfg = tiny_config_dict(corpora, tmp_path)
    cfg["model"]["attention_backend"] = "flex"
    with pytest.raises(ValueError, match="model.attention_backend=flex cannot train on CPU"):
        train(config_from_dict(cfg))
