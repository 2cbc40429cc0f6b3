"""Attention backends for packed rows against a dense reference: explicit softmax(QK^T / sqrt(d))
over the document-causal mask, in float64. Backends that need a GPU or an optional package
(flash_varlen, te, compiled flex) are compared by tools/gpu_check.py on a GPU; here they fail
with a clear message."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config_dict
from megatron_domain.config import config_from_dict
from megatron_domain.engine import train
from megatron_domain.models.attention import (
    ATTENTION_BACKENDS, AttentionContext, dense_document_attention, document_causal_mask, from_packed_heads,
    sdpa_native_gqa, to_packed_heads, varlen_boundaries)

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


def csrc_forward_runs() -> bool:
    from megatron_domain.kernels.cpu_attention import csrc_forward_runs as runs

    return runs()


def bf16_cpu_attention_or_skip():
    """Skip (naming what is missing) where the csrc attention backward cannot run."""
    from megatron_domain.kernels.cpu_attention import cpu_attention_ready

    if not cpu_attention_ready(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("the csrc attention backward needs the prebuilt extension (pip install -e . "
                    "--no-build-isolation) and a CPU with AVX-512-BF16")


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("layout,seq,dim", [("causal", 200, 64), ("documents", 200, 64), ("documents", 64, 128),
                                            ("shared_prefix", 130, 64), ("causal", 200, 32),
                                            ("shared_prefix", 130, 32), ("documents", 100, 96)])
def test_cpu_bf16_attention_backward_matches_reference_and_torch(layout, seq, dim):
    """bf16 training attention on a CPU with AMX / AVX-512-BF16 runs SDPA's flash forward and
    the csrc backward: the forward is SDPA's exactly, and the gradients are as close to the
    float64 reference as torch's own flash backward (within 10%, measured 0.5x-1x its error) and
    within 1% of it. Sequence lengths that are not a multiple of the kernel's 64-key blocks,
    GQA (2 query heads per KV head), document masks and the DPO shared-prompt mask; head dims
    of 32 (the demo model's) and 96 (not a multiple of 64: dQ's columns packed 32 at a time)."""
    bf16_cpu_attention_or_skip()
    q, k, v, _ = packed_qkv(bsz=3, heads=4, kv_heads=2, seq=seq, dim=dim, seed=3)
    g = torch.Generator().manual_seed(4)
    lengths = [[seq // 3, seq - seq // 3], [seq], [1, 5, seq - 6]]
    document_ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])
    prefix_ids = None
    if layout == "causal":
        document_ids = torch.zeros_like(document_ids)
    if layout == "shared_prefix":  # rows: [prompt 0 | completion 1 | completion 2]; both completions see the prompt
        document_ids = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor([seq // 3, seq // 3,
                                                                                          seq - 2 * (seq // 3)]))] * 3)
        prefix_ids = torch.where(document_ids > 0, torch.zeros_like(document_ids), -torch.ones_like(document_ids))
    ctx = AttentionContext.build(document_ids, "sdpa", (3, seq), prefix_ids=prefix_ids, csrc_backward=True)
    grad_out = torch.randn(q.shape, generator=g)  # [B, Hq, S, D]
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out = dense_document_attention(*ref, document_ids, torch.float64, prefix_ids)
    ref_out.backward(grad_out.double())

    ours = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    out = ATTENTION_BACKENDS["sdpa"](*ours, ctx)
    assert "cpu_flash_attention" in type(out.grad_fn).__name__
    out.backward(grad_out.bfloat16())
    theirs = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
    torch_out = F.scaled_dot_product_attention(*theirs, attn_mask=ctx.mask, is_causal=ctx.mask is None,
                                               enable_gqa=True)
    if csrc_forward_runs():  # our forward (no bf16 brgemm here): as close to the reference as SDPA's
        assert relative_error(out, ref_out) <= 1.1 * relative_error(torch_out, ref_out) + 1e-4
    else:  # SDPA's own forward kernel
        assert torch.equal(out, torch_out)
    torch_out.backward(grad_out.bfloat16())
    for name, a, t, r in zip("qkv", ours, theirs, ref):
        ours_error, torch_error = relative_error(a.grad, r.grad), relative_error(t.grad, r.grad)
        assert ours_error <= 1.1 * torch_error + 1e-4, f"d{name}: {ours_error:.2e} vs torch's {torch_error:.2e}"
        assert relative_error(a.grad, t.grad.double()) < 1e-2, f"d{name} differs from torch's flash backward"


def csrc_matmuls_or_skip(matmuls: str) -> None:
    """Skip (naming why) where this CPU cannot run the kernel's `matmuls` implementation."""
    from megatron_domain.kernels.extension import prebuilt_extension

    bf16_cpu_attention_or_skip()
    available = prebuilt_extension().attention_backward_matmuls()
    if matmuls == "brgemm" and available != "brgemm":
        pytest.skip(f"oneDNN packs bf16 for brgemm only on AMX CPUs; this one runs {available!r}")


@pytest.mark.parametrize("matmuls", ["avx512_bf16", "brgemm"])
@pytest.mark.parametrize("layout,dim", [("causal", 64), ("documents", 96)])
def test_cpu_attention_backward_matmul_implementations(matmuls, layout, dim):
    """The csrc backward's two matmul implementations (AMX brgemm; VDPBF16PS register tiles on
    AVX-512-BF16 CPUs without AMX) each give gradients as close to the float64 reference as
    torch's flash backward, on 200 tokens (not a multiple of the 64-key blocks, so partial row
    tiles), GQA, and 64- and 32-column packed blocks (head dims 64 and 96); "auto" is exactly the
    implementation `attention_backward_matmuls()` names."""
    from megatron_domain.kernels.cpu_attention import cpu_flash_attention_forward
    from megatron_domain.kernels.extension import prebuilt_extension

    csrc_matmuls_or_skip(matmuls)
    ext = prebuilt_extension()
    seq = 200
    q, k, v, document_ids = packed_qkv(bsz=3, heads=4, kv_heads=2, seq=seq, dim=dim, seed=5)
    if layout == "causal":
        document_ids = torch.zeros_like(document_ids)
    mask = AttentionContext.build(document_ids, "sdpa", (3, seq), csrc_backward=True).mask  # [B, 1, S, S] or None
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(6))  # [B, Hq, S, D]
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    dense_document_attention(*ref, document_ids, torch.float64).backward(grad_out.double())
    qb, kb, vb, gb = (t.bfloat16() for t in (q, k, v, grad_out))
    out, lse = cpu_flash_attention_forward(qb, kb, vb, mask)
    grads = ext.attention_backward(gb, qb, kb, vb, out, lse, mask, True, dim ** -0.5, matmuls)
    theirs = [t.detach().requires_grad_() for t in (qb, kb, vb)]
    F.scaled_dot_product_attention(*theirs, attn_mask=mask, is_causal=mask is None, enable_gqa=True).backward(gb)
    for name, a, t, r in zip("qkv", grads, theirs, ref):
        ours_error, torch_error = relative_error(a, r.grad), relative_error(t.grad, r.grad)
        assert ours_error <= 1.1 * torch_error + 1e-4, f"{matmuls} d{name}: {ours_error:.2e} vs torch's {torch_error:.2e}"
    if matmuls == ext.attention_backward_matmuls():
        for a, b in zip(grads, ext.attention_backward(gb, qb, kb, vb, out, lse, mask, True, dim ** -0.5)):
            assert torch.equal(a, b)


def test_cpu_attention_backward_names_the_matmuls_it_cannot_run():
    """An unknown implementation, or brgemm on a CPU whose oneDNN does not pack bf16 for it,
    is refused with the choices this CPU has."""
    from megatron_domain.kernels.extension import prebuilt_extension

    bf16_cpu_attention_or_skip()
    ext = prebuilt_extension()
    q = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    lse = torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match="matmuls='tiles' is not one this CPU runs: 'auto'"):
        ext.attention_backward(q, q, q, q, q, lse, None, True, 0.125, "tiles")
    if ext.attention_backward_matmuls() != "brgemm":
        with pytest.raises(RuntimeError, match="'brgemm' where oneDNN packs bf16 for it"):
            ext.attention_backward(q, q, q, q, q, lse, None, True, 0.125, "brgemm")


@pytest.mark.parametrize("kernel", ["sdpa", "csrc"])
@pytest.mark.parametrize("layout,seq,dim", [("causal", 200, 64), ("documents", 100, 96), ("shared_prefix", 130, 32)])
def test_cpu_flash_forward_kernels_match_reference(kernel, layout, seq, dim):
    """Both kernels of the bf16 forward half (SDPA's CPU flash kernel; ours, which runs where
    oneDNN has no bf16 brgemm) give the float64 reference's output (as closely as SDPA's kernel,
    here the yardstick) and log-sum-exp, in the sequence-major layout the compiled regions'
    fake promises, on document masks, the DPO shared-prompt mask, and causal rows."""
    from megatron_domain.kernels.cpu_attention import flash_forward

    if kernel == "csrc":
        csrc_matmuls_or_skip("avx512_bf16")
    q, k, v, _ = packed_qkv(bsz=3, heads=4, kv_heads=2, seq=seq, dim=dim, seed=7)
    lengths = [[seq // 3, seq - seq // 3], [seq], [1, 5, seq - 6]]
    document_ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])
    prefix_ids = None
    if layout == "causal":
        document_ids = torch.zeros_like(document_ids)
    if layout == "shared_prefix":
        document_ids = torch.stack([torch.repeat_interleave(torch.arange(3), torch.tensor(
            [seq // 3, seq // 3, seq - 2 * (seq // 3)]))] * 3)
        prefix_ids = torch.where(document_ids > 0, torch.zeros_like(document_ids), -torch.ones_like(document_ids))
    mask = AttentionContext.build(document_ids, "sdpa", (3, seq), prefix_ids=prefix_ids, csrc_backward=True).mask
    ref_out = dense_document_attention(q, k, v, document_ids, torch.float64, prefix_ids)  # [B, Hq, S, D]
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    kr = kb.double().repeat_interleave(2, 1)  # [B, Hq, S, D]
    allowed = document_causal_mask(document_ids, prefix_ids)  # [B, 1, S, S]
    scores = (qb.double() @ kr.transpose(-1, -2)) / dim ** 0.5  # [B, Hq, S, S], of the bf16 inputs
    ref_lse = scores.masked_fill(~allowed, float("-inf")).logsumexp(-1)  # [B, Hq, S]
    out, lse = flash_forward(qb, kb, vb, mask, csrc=kernel == "csrc")
    sdpa_out, _ = flash_forward(qb, kb, vb, mask, csrc=False)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert out.transpose(1, 2).is_contiguous() and lse.transpose(1, 2).is_contiguous()  # [B, S, H, ...] memory
    assert relative_error(out, ref_out) <= 1.1 * relative_error(sdpa_out, ref_out) + 1e-4
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=0)


def test_cpu_attention_backward_refuses_what_it_cannot_run():
    """The kernel names its requirements; the model keeps torch's backward for fp32, for head
    dims that are not a multiple of 32, and without gradients."""
    from megatron_domain.kernels.cpu_attention import cpu_attention_ready, runs_here
    from megatron_domain.kernels.extension import prebuilt_extension

    bf16_cpu_attention_or_skip()
    q = torch.randn(1, 2, 8, 64)
    with pytest.raises(RuntimeError, match="bf16"):
        prebuilt_extension().attention_backward(q, q, q, q, q, torch.zeros(1, 2, 8), None, True, 0.125)
    assert not cpu_attention_ready(q)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_attention_ready(q)
    with torch.no_grad():
        assert not cpu_attention_ready(q.bfloat16())
    assert runs_here(q.bfloat16()) and not runs_here(q) and not runs_here(torch.zeros(1, 1, 1, 48, dtype=torch.bfloat16))
    ctx = AttentionContext.build(None, "sdpa", (1, 8), csrc_backward=True)
    out = ATTENTION_BACKENDS["sdpa"](*(torch.randn(1, 2, 8, 48, dtype=torch.bfloat16, requires_grad=True),) * 3, ctx)
    assert "cpu_flash_attention" not in type(out.grad_fn).__name__


def test_compiled_layer_keeps_the_csrc_attention_backward():
    """A compiled decoder layer (the engine's regional compile) runs the custom ops: the same
    output and gradients as the eager layer, in bf16 autocast on the CPU."""
    from megatron_domain.config import ModelConfig
    from megatron_domain.models.llama import DecoderLayer, rope_cos_sin, rope_inv_freq

    bf16_cpu_attention_or_skip()
    cfg = ModelConfig(hidden_size=128, intermediate_size=256, num_layers=1, num_heads=2, num_kv_heads=1,
                      vocab_size=64, max_seq_len=128)
    torch.manual_seed(0)
    eager = DecoderLayer(cfg)
    compiled = DecoderLayer(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile(fullgraph=True)
    x = torch.randn(2, 96, 128)
    document_ids = torch.repeat_interleave(torch.arange(2), torch.tensor([40, 56]))[None].expand(2, -1)
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), torch.arange(96)[None].expand(2, -1), torch.bfloat16)
    grads = []
    for layer in (eager, compiled):
        with torch.profiler.profile() as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ctx = AttentionContext.build(document_ids, "sdpa", (2, 96), csrc_backward=True)
                out = layer(x, cos, sin, ctx)
            out.float().square().mean().backward()
        ops = {event.key for event in prof.key_averages()}
        assert {"megatron_domain::cpu_flash_attention", "megatron_domain::cpu_flash_attention_backward"} <= ops
        grads.append([out.detach().float()] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
