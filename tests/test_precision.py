"""`train.dtype: auto`: bf16 on CPUs with AMX or AVX-512 BF16, fp32 elsewhere, decided from the
CPU's flags; a run with auto trains exactly as one with the resolved dtype spelled out, says
why, and its config.json records the resolved dtype while the caller's config keeps auto."""

from __future__ import annotations

import json

import torch

from megatron_domain.engine import train
from megatron_domain.metrics import cpu_capabilities
from megatron_domain.precision import fast_training_dtype


def test_cpu_rule_follows_the_flags(monkeypatch):
    import megatron_domain.precision as precision

    flags = {"cpu": "Test CPU", "amx_bf16": False, "avx512_bf16": False}
    monkeypatch.setattr(precision, "cpu_capabilities", lambda: dict(flags))
    dtype, reason = fast_training_dtype(torch.device("cpu"))
    assert dtype == "fp32" and "neither AMX nor AVX-512 BF16" in reason and "Test CPU" in reason
    flags["avx512_bf16"] = True
    assert fast_training_dtype(torch.device("cpu")) == ("bf16", "the CPU (Test CPU) has avx512_bf16")
    flags["amx_bf16"] = True
    assert fast_training_dtype(torch.device("cpu"))[1] == "the CPU (Test CPU) has amx_bf16 and avx512_bf16"


def test_auto_trains_as_the_resolved_dtype(tiny_config, capsys):
    cpu = cpu_capabilities()
    expected = "bf16" if cpu["amx_bf16"] or cpu["avx512_bf16"] else "fp32"
    auto = tiny_config("auto", steps=3, dtype="auto")
    got = train(auto)
    assert f"train.dtype auto -> {expected}" in capsys.readouterr().out
    assert auto.train.dtype == "auto"  # the caller's config is not changed
    assert json.loads((got.run_dir / "config.json").read_text())["train"]["dtype"] == expected
    assert train(tiny_config("explicit", steps=3, dtype=expected)).losses == got.losses


def test_adamw_is_fused_where_the_cpu_has_avx512_and_matches_foreach(monkeypatch):
    """The optimizer implementation follows the CPU (fused with AVX-512, foreach without, fused
    on CUDA); fused and foreach take the same steps up to float rounding."""
    from megatron_domain import optim

    for avx512, expected in ((True, {"fused": True}), (False, {"foreach": True})):
        monkeypatch.setattr(optim, "cpu_capabilities", lambda flag=avx512: {**cpu_capabilities(), "avx512f": flag})
        assert optim.adamw_implementation(torch.device("cpu")) == expected
    assert optim.adamw_implementation(torch.device("cuda")) == {"fused": True}
    assert optim.adamw_implementation(torch.device("cuda"), "foreach") == {"foreach": True}
    finals = []
    for kind in ({"fused": True}, {"foreach": True}):
        params = [torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
                  for shape in ((300, 64), (64,))]
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, **kind)
        grads = torch.Generator().manual_seed(1)
        for _ in range(20):
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads)
            opt.step()
        finals.append([p.detach() for p in params])
    for a, b in zip(*finals):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
        assert not torch.equal(a, torch.randn(a.shape, generator=torch.Generator().manual_seed(0)))


def test_bf16_rows_are_padded_to_repeat_matmul_shapes_only_on_a_cpu():
    from megatron_domain.precision import CPU_BF16_ROW_MULTIPLE, matmul_row_multiple

    assert matmul_row_multiple("bf16", torch.device("cpu")) == CPU_BF16_ROW_MULTIPLE == 64
    assert matmul_row_multiple("fp32", torch.device("cpu")) == 1
    assert matmul_row_multiple("bf16", torch.device("cuda")) == 1  # a device object; no GPU needed


def test_mfu_is_measured_against_the_matmul_rate_of_the_training_dtype(tiny_config):
    """A bf16 run's MFU denominator is this CPU's bf16 matmul rate, not its fp32 one: measured
    against fp32, the demo's bf16 stages on an AVX-512-BF16 CPU (bf16 matmuls ~2.2x fp32)
    logged MFU 1.08-1.19. Where bf16 is the fast dtype here, its rate is well above fp32's."""
    import pytest

    from megatron_domain.engine import mfu_peak_flops

    if fast_training_dtype(torch.device("cpu"))[0] != "bf16":
        pytest.skip("bf16 is not the fast dtype on this CPU (no AMX or AVX-512 BF16): the rates are not ordered")
    cpu = torch.device("cpu")
    bf16 = mfu_peak_flops(tiny_config("bf16", dtype="bf16"), cpu)
    fp32 = mfu_peak_flops(tiny_config("fp32", dtype="fp32"), cpu)
    assert bf16 > 1.3 * fp32, (bf16 / 1e9, fp32 / 1e9)  # measured: 2.2x (EPYC, no AMX), ~4x (AMX)
    assert mfu_peak_flops(tiny_config("set", dtype="bf16", peak_tflops=2.5), cpu) == 2.5e12
