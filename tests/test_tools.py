"""The GPU check and the loss benchmark run on CPU (dry run / small shapes) and report what
they promise: every section, no errors, kernel errors within tolerance, fused-loss memory
well under the naive path's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    for section in ("extension", "kernels", "attention", "fp8", "attention_speed", "bench_losses", "bench_vs_transformers", "bench_bf16",
                    "bench_bf16_fused_ce", "bench_fp8", "bench_fp8_fused_ce", "bench_bf16_8b_16_layers",
                    "bench_fp8_8b_16_layers", "engine", "bench_rollout"):
        assert "error" not in summary[section], (section, summary[section])
    kernels = summary["kernels"]
    assert all("error" not in result for result in kernels.values() if isinstance(result, dict)), kernels
    assert kernels["pack_metadata/cpp"]["equal"] is True
    for name, errors in kernels.items():
        if name.startswith("linear_logprobs") and name.endswith("float32"):
            assert max(v for k, v in errors.items() if k.endswith("_err")) < 1e-4, (name, errors)
        if name.startswith("dpo_loss"):
            assert errors["grad_err"] < 1e-4, (name, errors)
    assert summary["attention"]["sdpa"]["ok"] and summary["attention"]["flex"]["ok"]
    assert summary["fp8"]["float8"]["relative_error"] < 0.1  # e4m3 keeps ~3 significant bits
    speed = summary["attention_speed"]  # forward + backward of each kernel that runs here, timed
    for name in ("sdpa_flash/causal", "sdpa_math/causal", "sdpa/causal", "sdpa/documents"):
        assert speed[name]["ms"] > 0, (name, speed)
    assert speed["sdpa/causal"]["tflops"] > 0 and "tflops" not in speed["sdpa/documents"]
    assert summary["bench_losses"]["vocab"]["4096"]["loss_diff"] < 1e-4
    assert summary["bench_vs_transformers"]["compiled_fused_ce"]["speedup_vs_hf"] > 0, summary["bench_vs_transformers"]
    assert "skipped" in summary["bench_vs_transformers"]["eager"]  # (the same tool, run by the bench tests below)
    assert summary["bench_bf16"]["tokens_per_s"] > 0 and summary["fp8_speedup"] > 0
    assert summary["fp8_speedup_fused_ce"] > 0 and summary["fp8_speedup_8b_16_layers"] > 0
    for section in ("bench_bf16", "bench_fp8"):  # the profiled steps: ranked ops, shares of one total
        profile = summary[section]["profile"]
        shares = [op["share"] for op in profile["top_ops"]]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9, profile
        assert 0 < profile["matmul_share"] < 1 and set(profile["phase_ms_per_step"]) == {"forward", "backward",
                                                                                          "optimizer"}
    engine = summary["engine"]  # the whole engine (mdt train) in one process
    assert engine["bench"] == "parallel_layouts" and [r["layout"] for r in engine["layouts"]] == ["single"]
    assert engine["layouts"][0]["tokens_per_s"] > 0 and engine["layouts"][0]["final_loss"] > 0
    rollout = summary["bench_rollout"]  # the generation benchmark: same prompts, lengths and sampling for both
    assert rollout["results"]["native"]["new_tokens"] == rollout["results"]["hf"]["new_tokens"] == 2 * 2 * 4
    assert rollout["native_vs_hf"] > 0 and rollout["machine"]["logical_cores"] >= 1
    # same model, same tokens: the fused cross-entropy reaches the same loss after the same steps
    assert summary["bench_bf16_fused_ce"]["final_loss"] == pytest.approx(summary["bench_bf16"]["final_loss"], rel=2e-2)


def test_gpu_check_budget_skips_the_rest_and_still_writes_json(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, "tools/gpu_check.py", "--dry-run", "--out", str(out), "--budget-s", "0",
                             "--skip", "extension"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert "extension" not in summary
    for section in ("kernels", "attention", "fp8", "bench_bf16", "bench_fp8", "bench_losses"):
        assert "--budget-s of 0 s" in summary[section]["skipped"], summary[section]
    assert not list(tmp_path.glob("*.tmp"))


def assert_machine_recorded(line: dict) -> None:
    """A benchmark JSON line says where it ran: torch, CPU model, threads and vector/matrix flags."""
    import torch

    assert line["torch"] == torch.__version__ and line["cpu"] and line["torch_threads"] >= 1
    assert {"avx2", "avx512f", "avx512_bf16", "amx_bf16"} <= set(line)


def test_bench_losses_fused_path_saves_memory():
    result = subprocess.run([sys.executable, "tools/bench_losses.py", "--tokens", "1024", "--hidden", "32",
                             "--vocab", "32768", "--iters", "1", "--warmup", "0"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert_machine_recorded(line)
    row = line["vocab"]["32768"]
    assert row["loss_diff"] < 1e-4
    assert row["memory_ratio"] < 0.5, row  # [1024, 32768] fp32 logits alone are 128 MiB


def test_bench_dpo_compares_ours_with_trl_on_the_same_tokens(tmp_path):
    """A tiny run of tools/bench_dpo.py: both trainers finish on the same pairs and the JSON
    line carries tokens/s, peak memory and the ratio (speed itself is not asserted)."""
    pytest.importorskip("trl")
    out = tmp_path / "bench.jsonl"
    run = subprocess.run([sys.executable, "tools/bench_dpo.py", "--steps", "2", "--prompt-len", "4", "8",
                          "--completion-len", "2", "6", "--hidden", "64", "--layers", "1", "--vocab", "256",
                          "--runs", "ours,trl", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["pairs"] == 8 and record["tokens"] > 0
    assert_machine_recorded(record)
    for name in ("ours", "trl"):
        assert record[name]["tokens_per_s"] > 0 and record[name]["peak_rss_gb"] > 0, record[name]
        assert abs(record[name]["final_loss"] - 0.6931) < 0.01  # lr 1e-6: both stay at log 2
    assert record["ratios"]["ours/trl"]["tokens_per_s"] > 0


def test_bench_reports_the_failing_implementations_own_error():
    """When a measuring process fails, tools/bench.py exits naming the implementation and showing
    that process's error (on the H200 only "exit status 1" came back, hiding a Triton error)."""
    run = subprocess.run([sys.executable, "tools/bench.py", "--preset", "no-such-preset", "--steps", "1",
                          "--warmup", "0", "--seq", "16"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode != 0
    assert "tools/bench.py --impl ours failed" in run.stderr and "unknown preset 'no-such-preset'" in run.stderr


def test_bench_profile_breaks_the_step_down():
    """tools/bench.py --profile --rounds 2 on a tiny model: each implementation's forward /
    backward / optimizer times, its matmul share and top ops by self time, sorted, shares adding
    below 1; both rounds' speeds kept, the median round reported."""
    pytest.importorskip("transformers")
    run = subprocess.run([sys.executable, "tools/bench.py", "--preset", "tiny-test", "--batch", "2", "--seq", "32",
                          "--steps", "1", "--warmup", "1", "--profile", "--profile-top", "5", "--rounds", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    line = json.loads(run.stdout.strip().splitlines()[-1])
    assert_machine_recorded(line)
    for impl in ("ours", "hf"):
        profile = line[f"{impl}_profile"]
        assert set(profile["phase_ms_per_step"]) == {"forward", "backward", "optimizer"}
        assert all(ms > 0 for ms in profile["phase_ms_per_step"].values())
        top = profile["top_ops"]
        assert len(top) == 5 and [o["self_ms_per_step"] for o in top] == sorted((o["self_ms_per_step"] for o in top),
                                                                                reverse=True)
        assert 0 < profile["matmul_share"] < 1 and sum(o["share"] for o in top) <= 1 + 1e-9
        assert any(o["op"] == "aten::mm" for o in top)
        assert len(line[f"{impl}_tokens_per_s_rounds"]) == 2
        assert line[f"{impl}_tokens_per_s"] == max(line[f"{impl}_tokens_per_s_rounds"])  # the upper median of 2
    assert len(line["speedup_vs_hf_rounds"]) == 2
    assert run.stderr.count("profile of ours") == 1 and "Self CPU" in run.stderr


@pytest.mark.slow
def test_bench_curate_measures_throughput_and_near_dedup_accuracy():
    """tools/bench_curate.py on small corpora: the whole pipeline's documents/s and MB/s, and
    MinHash near dedup finding every generated pair (Jaccard 0.8-0.95) without touching the
    near-misses (~0.44): the corpus and the hashing are seeded, so the counts are exact."""
    pytest.importorskip("datatrove")
    run = subprocess.run([sys.executable, "tools/bench_curate.py", "--mb", "0.2", "--dedup-mb", "0.6"],
                         capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    line = json.loads(run.stdout.strip().splitlines()[-1])
    assert_machine_recorded(line)
    assert line["throughput"]["documents_per_s"] > 0 and line["throughput"]["documents_out"] > 0
    dedup = line["near_dedup"]
    assert dedup["positive_pairs"] >= 3 and dedup["hard_negative_pairs"] >= 3, dedup
    assert 0.8 <= dedup["positive_jaccard_range"][0] and dedup["negative_jaccard_range"][1] <= 0.5
    assert dedup["recall"] == 1.0 and dedup["precision"] == 1.0 and dedup["hard_negatives_removed"] == 0
