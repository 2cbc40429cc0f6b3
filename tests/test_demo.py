"""The demo pipeline, reduced in size, from the CLI: it runs end to end, writes its report,
and meets the DACPT criteria (domain perplexity -30% or better, general at most +5%)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REDUCED = [  # ~1.5 minutes on 2 cores: a quarter of the general corpus, a 64-wide 2-layer model
    "demo_data.max_general_docs=250",
    "defaults.model.hidden_size=64",
    "defaults.model.num_layers=2",
    "defaults.model.intermediate_size=192",
    "stages.base_pretrain.train.steps=150",
    "stages.dacpt.train.steps=80",
    "stages.dacpt.optim.lr=5e-4",
    "stages.dacpt.optim.min_lr=5e-5",
]


@pytest.mark.slow
def test_reduced_demo_pipeline_meets_its_criteria(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "megatron_domain.cli", "pipeline", "configs/pipelines/demo.yaml",
           "--no-progress", "--set", f"out_dir={out}"]
    for item in REDUCED:
        cmd += ["--set", item]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["base_pretrain", "dacpt"]
    for stage in report["stages"]:
        assert set(stage) >= {"name", "mode", "eval_before", "eval_after", "run_dir"}
        assert set(stage["eval_after"]["ppl"]) == {"domain", "general"}
    dacpt = report["stages"][1]
    before, after = dacpt["eval_before"]["ppl"], dacpt["eval_after"]["ppl"]
    # DACPT starts from the base stage's final weights
    assert before == pytest.approx(report["stages"][0]["eval_after"]["ppl"])
    assert after["domain"] <= 0.70 * before["domain"]
    assert after["general"] <= 1.05 * before["general"]
    assert all(c["passed"] for c in report["checks"]) and len(report["checks"]) == 2
    assert (out / "report.md").read_text().startswith("# Pipeline report")
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PASS: dacpt: domain perplexity" in run.stdout
