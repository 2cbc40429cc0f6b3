"""Evaluation: perplexity bookkeeping, eval.json, pick-base ranking, and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_domain.engine import train
from megatron_domain.eval.harness import pick_base, run_eval
from megatron_domain.eval.perplexity import eval_rows, perplexity
from megatron_domain.models.llama import build_model, materialize

from conftest import naive_nll_sum, tiny_config_dict


def test_eval_rows_predict_every_token_once():
    docs = [np.array([5, 6, 7, 0]), np.array([8, 9, 0]), np.array([4, 3, 0])]
    rows, valid = eval_rows(docs, seq_len=4, eod_id=0)
    assert rows.shape == (3, 5) and valid.sum() == 9  # 10 tokens -> 9 next-token predictions
    assert rows[0].tolist() == [5, 6, 7, 0, 8] and rows[1].tolist() == [8, 9, 0, 4, 3]
    assert rows[2].tolist() == [3, 0, 0, 0, 0] and valid[2].tolist() == [True, False, False, False]


@torch.no_grad()
def test_perplexity_equals_per_document_reference(tiny_config):
    """Packed-row perplexity = exp(mean NLL) of each document scored alone (no cross-doc context)."""
    cfg = tiny_config()
    model = materialize(build_model(cfg.model), "cpu", seed=0)
    gen = torch.Generator().manual_seed(0)
    docs = [np.append(torch.randint(1, 400, (n,), generator=gen).numpy(), 0) for n in (10, 3, 30, 7)]
    got = perplexity(model, docs, seq_len=256, eod_id=0, batch_size=2, device=torch.device("cpu"))
    nll, count = 0.0, 0
    for doc in docs:
        t = torch.from_numpy(doc)[None]
        logits = model(t, torch.arange(len(doc))[None])[0]
        nll, count = nll + naive_nll_sum(logits[:-1], t[0, 1:]), count + len(doc) - 1
    assert got["tokens"] == count
    assert got["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_eval_json_and_pick_base(tiny_config, tmp_path):
    """Trained weights beat the random init on held-out data; pick-base ranks them first."""
    cfg = tiny_config("trained", steps=12)
    result = train(cfg)
    out = run_eval(cfg, str(result.final_checkpoint))
    written = json.loads((tmp_path / "trained" / "eval.json").read_text())
    assert set(written["ppl"]) == {"alpha", "beta"} and written["ppl"] == out["ppl"]
    short = train(tiny_config("short", steps=2))
    ranking = pick_base(cfg, [str(short.final_checkpoint), str(result.run_dir)], "alpha")
    assert [r["candidate"] for r in ranking] == [str(result.run_dir), str(short.final_checkpoint)]
    assert ranking[0]["ppl"] < ranking[1]["ppl"]


def test_cli_train_eval_and_errors(corpora, tmp_path):
    """`mdt train` / `mdt eval` from the command line; a bad config exits 2 with the message."""
    import yaml

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_config_dict(corpora, tmp_path / "cli")))
    cli = [sys.executable, "-m", "megatron_domain.cli"]
    run = subprocess.run(cli + ["train", str(cfg_file), "--set", "train.steps=2", "--no-progress"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["checkpoint"].endswith("step_0000002")
    run = subprocess.run(cli + ["eval", str(cfg_file), "--checkpoint", str(tmp_path / "cli")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert set(json.loads((tmp_path / "cli" / "eval.json").read_text())["ppl"]) == {"alpha", "beta"}
    run = subprocess.run(cli + ["train", str(cfg_file), "--set", "optim.lrr=1"], capture_output=True, text=True)
    assert run.returncode == 2 and "optim.lrr: unknown key; did you mean 'optim.lr'?" in run.stderr
    assert "Traceback" not in run.stderr
