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
