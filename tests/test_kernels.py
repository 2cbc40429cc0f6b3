"""Every kernel implementation against its pure-torch reference, forward and gradients
(DESIGN.md "Kernels"). Tolerances: fp32 1e-5 (relative to the value's scale where stated);
bf16 inputs compare against the reference run on the same bf16 inputs, within 2e-2."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_domain.config import ConfigError, config_from_dict, fused_cross_entropy_enabled
from megatron_domain.kernels.dpo import dpo_loss_fused, dpo_loss_reference
from megatron_domain.kernels.linear_logprobs import (CppSliceMath, TorchSliceMath, cpp_slice_math_available,
                                                     linear_logprobs_chunked, linear_logprobs_reference)
from megatron_domain.kernels.pack import pack_metadata_extension, pack_metadata_reference
from megatron_domain.kernels.registry import KERNEL_TABLE, get_kernel
from parallel_cases import layout_result, parity_config_dict, run_jobs
from parallel_harness import run_on_ranks
from tests.kernel_cases import vocab_parallel_logprobs

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
NEEDS_CPP_SLICE_MATH = pytest.mark.skipif(not cpp_slice_math_available(),
                                          reason="the csrc cross-entropy rows need the built extension and a CPU "
                                                 "with AVX-512-BF16")
SLICE_MATHS = [TorchSliceMath, pytest.param(CppSliceMath, marks=NEEDS_CPP_SLICE_MATH)]


def packed_tokens(rows: int, seq: int, eod: int, seed: int) -> torch.Tensor:
    """Random rows with EODs at random places, plus the edge cases: EOD first, EOD last,
    two EODs in a row, and a row without any EOD."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 50, (rows, seq), generator=g)  # [B, S]
    tokens[torch.rand(rows, seq, generator=g) < 0.15] = eod
    tokens[0, 0] = eod
    tokens[0, -1] = eod
    if seq > 3:
        tokens[min(1, rows - 1), 1:3] = eod
    if rows > 2:
        tokens[2] = torch.randint(1, 50, (seq,), generator=g)
    return tokens


@pytest.mark.parametrize("rows,seq", [(1, 1), (3, 7), (4, 64), (5, 1031)])
def test_pack_metadata_cpp_equals_reference(rows, seq):
    tokens = packed_tokens(rows, seq, eod=0, seed=rows * seq)
    ref, ext = pack_metadata_reference(tokens, 0), pack_metadata_extension(tokens, 0)
    for field in ("document_ids", "position_ids", "cu_seqlens", "loss_mask"):
        assert torch.equal(getattr(ref, field), getattr(ext, field)), field
    assert ext.cu_seqlens.dtype == torch.int32


def dpo_inputs(pairs: int, dtype: torch.dtype, seed: int):
    """Per-token log-probs of `pairs` chosen/rejected responses of random lengths, packed with
    ignored (-1) prompt tokens between them."""
    g = torch.Generator().manual_seed(seed)
    segments = []
    for s in range(2 * pairs):
        segments += [-1] * int(torch.randint(0, 4, (1,), generator=g)) + [s] * int(torch.randint(1, 9, (1,), generator=g))
    segment_ids = torch.tensor(segments)  # [T]
    policy = (-torch.rand(len(segments), generator=g) * 3).to(dtype)  # [T]
    reference = (policy.float() + torch.randn(len(segments), generator=g) * 0.3).to(dtype)  # [T]
    return policy, reference, segment_ids


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0),
                                                ("robust", 0.1)])
@pytest.mark.parametrize("pairs,dtype", [(1, torch.float32), (6, torch.float32), (5, torch.bfloat16)])
def test_dpo_loss_cpp_equals_reference(loss_type, smoothing, pairs, dtype):
    policy, reference, segment_ids = dpo_inputs(pairs, dtype, seed=pairs)
    grads, outputs = [], []
    for fn in (dpo_loss_reference, dpo_loss_fused):
        p = policy.clone().requires_grad_()
        out = fn(p, reference, segment_ids, pairs, beta=0.5, loss_type=loss_type, label_smoothing=smoothing)
        (out.losses * torch.arange(1.0, pairs + 1)).sum().backward()  # distinct weight per pair
        grads.append(p.grad.float())
        outputs.append(out)
    ref, fused = outputs
    for field in ("losses", "policy_chosen", "policy_rejected", "chosen_rewards", "rejected_rewards"):
        torch.testing.assert_close(getattr(fused, field), getattr(ref, field), atol=1e-5, rtol=1e-5)
    tol = TOLERANCE[dtype] if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(grads[1], grads[0], atol=tol, rtol=tol)
    assert grads[0][segment_ids < 0].abs().max() == 0  # prompt tokens get no gradient
    assert ref.metrics().keys() == {"loss", "rewards/chosen", "rewards/rejected", "rewards/margin",
                                    "rewards/accuracy", "logps/chosen", "logps/rejected"}


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0),
                                         ("robust", 0.2)])
@pytest.mark.parametrize("fn", [dpo_loss_reference, dpo_loss_fused], ids=["reference", "cpp"])
def test_dpo_losses_and_rewards_match_the_papers_formulas(fn, loss_type, eps):
    """Two pairs of hand-made token log-probs against the published formulas written out with
    `math` (not the code under test): per-pair losses, rewards beta (log pi - log pi_ref),
    margins and accuracy. Against the reference, pair 0's policy moved towards the rejected
    answer (margin -1.25), pair 1's towards the chosen one (margin +0.5)."""
    import math

    beta = 0.5
    policy = torch.tensor([-1.0, -2.0, -9.0, -3.0, -0.5, -4.0, -3.0, -1.0])
    reference = torch.tensor([-1.5, -2.0, -7.0, -3.0, -1.0, -3.0, -1.0, -1.0])
    segment_ids = torch.tensor([-1, 0, 0, 1, 1, 2, 3, 3])  # token 0 is prompt: never counted
    out = fn(policy, reference, segment_ids, 2, beta=beta, loss_type=loss_type, label_smoothing=eps)
    pc, pr, rc, rr = [-11.0, -4.0], [-3.5, -4.0], [-9.0, -3.0], [-4.0, -2.0]  # sums per segment, by hand
    log_sigmoid = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    expected = []
    for i in range(2):
        h = (pc[i] - pr[i]) - (rc[i] - rr[i])
        expected.append({
            "sigmoid": -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h),
            "ipo": (h - 1 / (2 * beta)) ** 2,
            "hinge": max(0.0, 1 - beta * h),
            "robust": (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps),
        }[loss_type])
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.loss.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    chosen = [beta * (pc[i] - rc[i]) for i in range(2)]  # [-1.0, -0.5]
    rejected = [beta * (pr[i] - rr[i]) for i in range(2)]  # [0.25, -1.0]
    assert out.chosen_rewards.tolist() == pytest.approx(chosen) and out.rejected_rewards.tolist() == pytest.approx(rejected)
    metrics = out.metrics()
    assert metrics["rewards/margin"] == pytest.approx((chosen[0] - rejected[0] + chosen[1] - rejected[1]) / 2)
    assert metrics["rewards/accuracy"] == 0.5
    assert metrics["logps/chosen"] == pytest.approx(sum(pc) / 2) and metrics["logps/rejected"] == pytest.approx(sum(pr) / 2)


def test_dpo_loss_rejects_bad_segments():
    policy, reference, segment_ids = dpo_inputs(2, torch.float32, seed=0)
    with pytest.raises(RuntimeError, match="2 \\* num_pairs"):
        dpo_loss_fused(policy, reference, segment_ids, 1)
    with pytest.raises(ValueError, match="loss_type 'kto' unknown"):
        dpo_loss_reference(policy, reference, segment_ids, 2, loss_type="kto")


def logprob_case(n: int, h: int, v: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets, torch.randn(n, generator=g), torch.randn(n, generator=g)


def run_logprobs(fn, case, with_entropy: bool, **kwargs):
    """Outputs and gradients of sum(g_lp * logp) (+ sum(g_H * entropy))."""
    hidden, weight, targets, g_lp, g_ent = case
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, ent = fn(hidden, weight, targets, with_entropy=with_entropy, **kwargs)
    loss = (lp * g_lp).sum() + ((ent * g_ent).sum() if with_entropy else 0)
    loss.backward()
    return {"logp": lp, "entropy": ent, "grad_hidden": hidden.grad, "grad_weight": weight.grad}


def assert_logprobs_close(got: dict, want: dict, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    for key, expected in want.items():
        if expected is None:
            assert got[key] is None
            continue
        assert got[key].dtype == expected.dtype, key
        torch.testing.assert_close(got[key].float(), expected.float(), atol=tol, rtol=tol, msg=key)


@pytest.mark.parametrize("n,h,v,chunk", [(1, 8, 5, 0), (33, 16, 101, 8), (64, 32, 256, 64), (50, 24, 333, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_linear_logprobs_chunked_equals_reference(n, h, v, chunk, dtype, with_entropy):
    """The chunked kernel with the slice math it picks by default (the csrc rows on this CPU when
    it runs them, without entropy)."""
    case = logprob_case(n, h, v, dtype, seed=n + v)
    want = run_logprobs(linear_logprobs_reference, case, with_entropy)
    got = run_logprobs(linear_logprobs_chunked, case, with_entropy, chunk_rows=chunk)
    assert_logprobs_close(got, want, dtype)


@NEEDS_CPP_SLICE_MATH
@pytest.mark.parametrize("n,h,v,chunk", [(1, 8, 5, 0), (33, 16, 101, 8), (50, 24, 333, 7), (300, 32, 4099, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hint", [False, True])
def test_linear_logprobs_csrc_rows_equal_reference(n, h, v, chunk, dtype, hint):
    """CppSliceMath (csrc/cpu/cross_entropy_rows.cpp; vocabularies that are not a multiple of its
    16 lanes, bf16 logits read and written as bf16) against the reference, with and without the
    gradients computed in the forward pass; targets off this slice of the vocabulary included."""
    hidden, weight, targets, g_lp, _ = logprob_case(n, h, v, dtype, seed=n + v)
    case = (hidden, weight, targets, g_lp, None)
    want = run_logprobs(linear_logprobs_reference, case, False)
    got = run_logprobs(linear_logprobs_chunked, case, False, chunk_rows=chunk, math=CppSliceMath,
                       loss_weights=g_lp if hint else None)
    assert_logprobs_close(got, want, dtype)
    stats = CppSliceMath.stats(torch.randn(3, v), torch.tensor([0, v - 1, v + 5]), torch.tensor([True, True, False]))
    assert stats[2, 2] == 0  # a target outside the slice's columns has no logit here


def test_csrc_rows_run_on_every_avx512_bf16_cpu():
    """The csrc cross-entropy rows are plain AVX-512 code: the extension offers them exactly where
    the CPU has AVX-512 (F, BW, VL, DQ) and AVX-512-BF16, AMX or not (they were gated on oneDNN's
    bf16 brgemm packing, which an AMD EPYC with AVX-512-BF16 but no AMX does not offer, so that
    CPU ran the torch slice math)."""
    from megatron_domain.kernels.extension import prebuilt_extension
    from megatron_domain.metrics import cpu_model_and_flags

    ext = prebuilt_extension()
    if ext is None or not hasattr(ext, "cross_entropy_rows"):
        pytest.skip("the csrc extension is not built (pip install -e . builds it)")
    _, flags = cpu_model_and_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo to read the CPU flags from (not Linux)")
    expected = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "fma"} <= flags
    assert bool(ext.cross_entropy_rows_supported()) == expected, sorted(f for f in flags if "avx512" in f or "amx" in f)


def test_csrc_kernels_run_on_torchs_intra_op_threads():
    """The C++ kernels' at::parallel_for spreads work over torch's threads and follows
    torch.set_num_threads. Built without -fopenmp it compiles to a serial call: until the
    twentieth session every csrc CPU kernel ran on one core (bench-20m attention per layer,
    2 threads: forward 11.9 -> 6.3 ms, backward 23.8 -> 12.5 ms once fixed). In a fresh process:
    vLLM's CPU worker, started in-process by the rollout tests, replaces torch.set_num_threads in
    its process with a function that does nothing (vllm/v1/worker/cpu_worker.py)."""
    from megatron_domain.kernels.extension import prebuilt_extension

    if prebuilt_extension() is None:
        pytest.skip("the csrc extension is not built (pip install -e . builds it)")
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch does not run its intra-op threads on OpenMP")
    code = ("import json, torch; from megatron_domain.kernels.extension import prebuilt_extension\n"
            "ext = prebuilt_extension(); used = {}\n"
            "for threads in (2, 1, 3):\n"
            "    torch.set_num_threads(threads); used[threads] = ext.intra_op_threads_used(12)\n"
            "print(json.dumps(used))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    used = json.loads(result.stdout.strip().splitlines()[-1])
    assert used == {"2": 2, "1": 1, "3": 3}, used


def test_linear_logprobs_triton_interpreted_equals_reference():
    """The Triton slice kernels under TRITON_INTERPRET=1 (small shapes, CPU tensors), in a
    fresh process because triton reads the variable when it is imported."""
    triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton runs this test)")
    import numpy

    def minor(version: str) -> tuple[int, int]:
        return tuple(int(part) for part in version.split(".")[:2])

    if minor(triton.__version__) < (3, 7) and minor(numpy.__version__) >= (2, 4):
        pytest.skip(f"triton {triton.__version__}'s interpreter cannot run loops with numpy {numpy.__version__} "
                    "(triton-lang/triton#9171, fixed in triton 3.7): upgrade triton or use numpy < 2.4")
    code = "import json; from tests.kernel_cases import triton_interpreted_errors as f; print(json.dumps(f()))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(errors) == 6, errors
    for name, error in errors.items():
        assert error < TOLERANCE[torch.bfloat16 if name.endswith("bfloat16") else torch.float32], (name, error)


def test_linear_logprobs_triton_kernels_compile_for_hopper_without_a_gpu():
    """The Triton kernels through the real compiler (AST -> TTIR -> PTX -> cubin for sm_90), which
    needs no GPU: the interpreter accepts code that the compiler rejects (a kernel reading an
    annotated, not instantiated, constexpr global ran interpreted here and failed on an H200)."""
    triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton runs this test)")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend to compile with")
    from megatron_domain.kernels.triton_logprobs import _gradient_kernel, _stats_kernel

    target = GPUTarget("cuda", 90, 32)
    stats = {"logits_ptr": "*fp32", "targets_ptr": "*i64", "owned_ptr": "*i8", "out_ptr": "*fp32", "n_rows": "i32",
             "vocab": "i32", "stride_row": "i32", "BLOCK": "constexpr"}
    compiled = [triton.compile(ASTSource(_stats_kernel, stats, {"BLOCK": 1024}), target=target)]
    gradient = {"logits_ptr": "*fp32", "lse_ptr": "*fp32", "mean_ptr": "*fp32", "targets_ptr": "*i64",
                "owned_ptr": "*i8", "grad_logp_ptr": "*fp32", "grad_entropy_ptr": "*fp32", "vocab": "i32",
                "stride_row": "i32", "HAS_ENTROPY": "constexpr", "BLOCK": "constexpr"}
    for has_entropy in (True, False):
        constants = {"HAS_ENTROPY": has_entropy, "BLOCK": 1024}
        compiled.append(triton.compile(ASTSource(_gradient_kernel, gradient, constants), target=target))
    for kernel in compiled:
        assert kernel.asm["cubin"] and ".target sm_90" in kernel.asm["ptx"]


@pytest.mark.slow
def test_linear_logprobs_vocab_split_over_two_processes(tmp_path):
    run_on_ranks(2, vocab_parallel_logprobs, str(tmp_path))
    for rank in range(2):
        errors = ast.literal_eval((tmp_path / f"rank{rank}.txt").read_text())
        assert max(errors.values()) < 1e-5, (rank, errors)  # fp32 math on both sides


class CountingSliceMath:
    """A slice math (TorchSliceMath, CppSliceMath) that counts the slices it turns into gradients."""

    def __init__(self, inner):
        self.inner, self.in_weight_dtype, self.gradient_calls = inner, inner.in_weight_dtype, 0

    def stats(self, *args):
        return self.inner.stats(*args)

    def gradient_(self, *args):
        self.gradient_calls += 1
        return self.inner.gradient_(*args)

    def stats_and_gradient_(self, *args):
        self.gradient_calls += 1
        return self.inner.stats_and_gradient_(*args)


@pytest.mark.parametrize("math", SLICE_MATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.37])
def test_linear_logprobs_loss_weights_compute_gradients_in_forward(dtype, scale, math):
    """With `loss_weights` (the loss is c * sum(w * logp)) the gradients come from the forward's
    slices: backward recomputes no logits slice, and the result is what the recomputing backward
    gives (bit for bit when c = 1, as in the engine's summed loss)."""
    hidden, weight, targets, _, _ = logprob_case(50, 24, 333, dtype, seed=5)
    mask = (torch.arange(50) % 3 != 0).float()  # [N] a loss mask with holes
    results = {}
    for name, hint in (("recompute", None), ("eager", -mask)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        counting = CountingSliceMath(math)
        lp, _ = linear_logprobs_chunked(h, w, targets, chunk_rows=7, loss_weights=hint, math=counting)
        in_forward = counting.gradient_calls
        (-(lp * mask).sum() * scale).backward()
        results[name] = {"logp": lp.detach(), "grad_hidden": h.grad, "grad_weight": w.grad,
                         "slices": (in_forward, counting.gradient_calls - in_forward)}
    # ceil(50 / 7) = 8 slices, each recomputed (logits matmul) in backward without the hint
    assert results["recompute"]["slices"] == (0, 8) and results["eager"]["slices"] == (8, 0)
    for key in ("logp", "grad_hidden", "grad_weight"):
        if scale == 1.0:
            assert torch.equal(results["eager"][key], results["recompute"][key]), key
        else:
            # bf16: the forward's gradient is rounded before it is scaled (one more bf16 rounding)
            tol = TOLERANCE[dtype]
            torch.testing.assert_close(results["eager"][key].float(), results["recompute"][key].float(), atol=tol, rtol=tol)


def test_linear_logprobs_loss_weights_fall_back_when_the_loss_is_other():
    """A hint that does not match the loss (here a squared log-prob) costs a recompute, not a
    wrong gradient; without gradients (evaluation) the hint changes nothing."""
    hidden, weight, targets, g_lp, _ = logprob_case(33, 16, 101, torch.float32, seed=8)
    want = run_logprobs(linear_logprobs_reference, (hidden, weight, targets, g_lp, None), False)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    lp, _ = linear_logprobs_chunked(h, w, targets, chunk_rows=8, loss_weights=torch.ones(33))
    (lp * g_lp).sum().backward()  # g_lp is not proportional to the weights
    torch.testing.assert_close(h.grad, want["grad_hidden"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad, want["grad_weight"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        lp_eval, _ = linear_logprobs_chunked(h, w, targets, chunk_rows=8, loss_weights=torch.ones(33))
    torch.testing.assert_close(lp_eval, want["logp"].detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="loss_weights must be"):
        linear_logprobs_chunked(h, w, targets, loss_weights=torch.ones(32))


def test_linear_logprobs_frozen_weight_gets_no_gradient():
    """A frozen output head (LoRA runs) gets no gradient and the hidden gradient is unchanged."""
    hidden, weight, targets, g_lp, _ = logprob_case(20, 8, 50, torch.float32, seed=3)
    want = run_logprobs(linear_logprobs_reference, (hidden, weight, targets, g_lp, None), False)["grad_hidden"]
    hidden = hidden.clone().requires_grad_()
    lp, _ = linear_logprobs_chunked(hidden, weight, targets, chunk_rows=6)  # weight.requires_grad is False
    (lp * g_lp).sum().backward()
    assert weight.grad is None
    torch.testing.assert_close(hidden.grad, want, atol=1e-5, rtol=1e-5)


def test_linear_logprobs_chunked_memory_is_bounded():
    """The chunked path never holds more than a slice of logits: its autograd graph saves the
    inputs and [N]-sized statistics only (no [N, V] tensor)."""
    hidden, weight, targets, _, _ = logprob_case(256, 16, 4096, torch.float32, seed=0)
    hidden.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        linear_logprobs_chunked(hidden, weight, targets, chunk_rows=32)
    assert saved and all(s.numel() <= 4096 * 16 for s in map(torch.Size, saved)), saved


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu")))
def test_cuda_kernels_compile_with_nvcc(source, tmp_path):
    """Compile-only (no GPU here): every .cu builds for sm_90 without torch headers."""
    result = subprocess.run(["nvcc", "-arch=sm_90", "-O3", "-c", str(ROOT / "csrc" / "cuda" / source),
                             "-o", str(tmp_path / "kernel.o")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "kernel.o").stat().st_size > 0


def test_registry_choices_and_errors():
    assert get_kernel("linear_logprobs", "auto", "cpu") is linear_logprobs_chunked
    assert get_kernel("pack_metadata", "reference", "cpu") is pack_metadata_reference
    with pytest.raises(ValueError, match="kernels.dpo_loss: 'cuda' needs CUDA tensors"):
        get_kernel("dpo_loss", "cuda", "cpu")
    with pytest.raises(ValueError, match="kernels.linear_logprobs: 'cuda' is not an implementation"):
        get_kernel("linear_logprobs", "cuda", "cpu")
    with pytest.raises(ConfigError, match="kernels.dpo_loss: unknown 'fast'"):
        config_from_dict({"kernels": {"dpo_loss": "fast"}})
    assert set(KERNEL_TABLE) == {"pack_metadata", "linear_logprobs", "dpo_loss"}


def test_importing_the_package_loads_no_optional_kernel():
    """Our Triton module and the compiled extension load only when chosen (torch itself may
    import triton when it is installed: torch.distributed.pipelining does)."""
    optional = ("megatron_domain.kernels.triton_logprobs", "megatron_domain._C", "megatron_domain_ext",
                "megatron_domain.models.flash", "megatron_domain.models.te", "transformer_engine", "flash_attn")
    code = ("import sys, megatron_domain.kernels.registry, megatron_domain.engine, megatron_domain.cli; "
            f"print(sorted(m for m in {optional!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


FUSED = {"fused_cross_entropy": True, "logprob_chunk_rows": 24}
LOGITS = {"fused_cross_entropy": False}  # the full-logits cross-entropy (the default is auto: fused)


def assert_same_step(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert got["loss"] == pytest.approx(want["loss"], abs=tol)
    assert got["grads"].keys() == want["grads"].keys()
    for key, grad in want["grads"].items():
        torch.testing.assert_close(got["grads"][key], grad, atol=tol, rtol=tol, msg=key)
    assert got["losses"] == pytest.approx(want["losses"], abs=tol)


@pytest.mark.parametrize("tied", [False, True])
def test_fused_cross_entropy_equals_logits_path(corpora, tmp_path, tied):
    """kernels.fused_cross_entropy: same loss, same gradients (incl. the output weight) and the
    same 3-step losses as the full-logits cross-entropy, one process."""
    want = layout_result(parity_config_dict(corpora, tmp_path / "logits", kernels=LOGITS, tie_embeddings=tied))
    got = layout_result(parity_config_dict(corpora, tmp_path / "fused", kernels=FUSED, tie_embeddings=tied))
    assert_same_step(got, want)


def test_fused_cross_entropy_auto_is_on_where_it_runs():
    base = {"model": {"preset": "tiny-test"}, "data": {"seq_len": 32}}
    assert fused_cross_entropy_enabled(config_from_dict(base))
    assert not fused_cross_entropy_enabled(config_from_dict({**base, "kernels": {"linear_logprobs": "reference"}}))
    assert not fused_cross_entropy_enabled(config_from_dict({**base, "parallel": {"pp": 2}, "train": {
        "micro_batch_size": 1, "global_batch_size": 2}}))
    assert not fused_cross_entropy_enabled(config_from_dict({**base, "kernels": LOGITS}))
    with pytest.raises(ConfigError, match="kernels.fused_cross_entropy: expected true, false or auto, got 'yes'"):
        config_from_dict({**base, "kernels": {"fused_cross_entropy": "yes"}})


def test_fused_causal_lm_step_scores_only_the_loss_positions():
    """The fused step hands the kernel the hidden rows of the masked-in positions only (an SFT
    row's prompt costs no output-layer work) with the loss weights, and its loss is the logits
    path's masked sum."""
    from megatron_domain.models.llama import build_model, materialize
    from megatron_domain.stages.causal_lm import causal_lm_forward_step, fused_causal_lm_step

    cfg = config_from_dict({"model": {"preset": "tiny-test"}, "data": {"seq_len": 32}})
    model = materialize(build_model(cfg.model), "cpu", seed=0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=g)  # [B, S]
    mask = torch.zeros(2, 12)
    mask[0, 5:], mask[1, 8:] = 1.0, 0.25  # a prompt, then the answer; weighted replay rows
    batch = {"tokens": tokens, "labels": tokens.roll(-1, 1), "loss_mask": mask,
             "position_ids": torch.arange(12).expand(2, -1), "document_ids": torch.zeros(2, 12, dtype=torch.long)}
    seen = []

    def spy(hidden, weight, targets, **kwargs):
        seen.append((hidden.shape[0], kwargs["loss_weights"]))
        return linear_logprobs_chunked(hidden, weight, targets, **kwargs)

    output, loss_fn = fused_causal_lm_step(spy)(batch, model)
    fused_loss, count, _ = loss_fn(output)
    rows, weights = seen[0]
    assert rows == 7 + 4 and torch.equal(weights, -torch.tensor([1.0] * 7 + [0.25] * 4))
    logits, _ = causal_lm_forward_step(batch, model)
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    assert count == mask.sum()
    torch.testing.assert_close(fused_loss, (per_token * mask.flatten()).sum(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_fused_cross_entropy_under_tensor_parallel_and_fsdp(corpora, tmp_path):
    """The fused loss with the vocabulary split over tp=2 (sequence parallel) and under FSDP
    equals the single-process full-logits loss and gradients."""
    want = layout_result(parity_config_dict(corpora, tmp_path / "single", kernels=LOGITS))
    layouts = {"tp2": {"tp": 2}, "dp2": {"dp_shard": 2}}
    jobs = [(name, "layout", parity_config_dict(corpora, tmp_path / name, parallel, kernels=FUSED), None)
            for name, parallel in layouts.items()]
    run_on_ranks(2, run_jobs, jobs, str(tmp_path))
    for name in layouts:
        assert_same_step(torch.load(tmp_path / f"{name}.pt"), want)
