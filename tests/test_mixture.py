"""`mdt data tune-mixture`: the grid is the positive simplex, bad candidates are named, and the
proxy trainings pick the weighting that favours the corpus whose held-out perplexity is the
target (alpha-heavy for alpha, beta-heavy for beta, the second time from the reused proxies)."""

from __future__ import annotations

import json

import pytest
import yaml

from megatron_domain.cli import main
from megatron_domain.data.curate.mixture import objective, parse_candidates, simplex_grid
from conftest import tiny_config_dict


def test_simplex_grid_and_candidates():
    assert simplex_grid(2, 4) == [[0.25, 0.75], [0.5, 0.5], [0.75, 0.25]]
    assert simplex_grid(3, 3) == [[0.333333, 0.333333, 0.333333]]
    assert len(simplex_grid(3, 5)) == 6  # C(4, 2)
    with pytest.raises(ValueError, match="--grid 2: needs at least one step per corpus"):
        simplex_grid(3, 2)
    assert parse_candidates(["3,1"], 2) == [[0.75, 0.25]]
    with pytest.raises(ValueError, match="give 2 weights > 0"):
        parse_candidates(["1,0"], 2)
    assert objective({"a": 10.0, "b": 100.0}, {"a": 1.0, "b": 3.0}) == pytest.approx((2.302585 + 3 * 4.605170) / 4)


@pytest.fixture
def mixture_config(corpora, tmp_path):
    data = tiny_config_dict(corpora, tmp_path / "unused", steps=30)
    data["eval"] = {"batch_size": 8, "sets": [{"name": "alpha", "path": corpora["alpha_heldout"]},
                                              {"name": "beta", "path": corpora["beta_heldout"]}]}
    path = tmp_path / "proxy.yaml"
    path.write_text(json.dumps(data))
    return path


def test_tune_mixture_follows_the_target(mixture_config, tmp_path, capsys):
    out = tmp_path / "mixture"
    args = ["data", "tune-mixture", str(mixture_config), "--candidates", "0.95,0.05", "0.05,0.95", "--out-dir", str(out),
            "--no-progress"]
    assert main(args + ["--target", "alpha=1"]) == 0
    first = json.loads((out / "mixture.json").read_text())
    assert first["best"]["weights"] == [0.95, 0.05]
    alpha_heavy, beta_heavy = first["candidates"]
    assert alpha_heavy["ppl"]["alpha"] < beta_heavy["ppl"]["alpha"]
    assert beta_heavy["ppl"]["beta"] < alpha_heavy["ppl"]["beta"]
    snippet = yaml.safe_load((out / "mixture.yaml").read_text())
    assert [c["weight"] for c in snippet["data"]["corpora"]] == [0.95, 0.05]
    assert snippet["data"]["corpora"][0]["name"] == "alpha"
    assert (out / "mixture.png").stat().st_size > 1000
    trained = (out / "proxies" / "00" / "result.json").stat().st_mtime_ns
    assert main(args + ["--target", "beta=1"]) == 0  # the same proxies, another objective
    assert json.loads((out / "mixture.json").read_text())["best"]["weights"] == [0.05, 0.95]
    assert (out / "proxies" / "00" / "result.json").stat().st_mtime_ns == trained
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["best"]["weights"] == [0.05, 0.95]


def test_tune_mixture_names_an_unknown_target(mixture_config, tmp_path, capsys):
    assert main(["data", "tune-mixture", str(mixture_config), "--target", "gamma=1", "--out-dir",
                 str(tmp_path / "m")]) != 0
    assert "--target 'gamma=1': 'gamma' is not an eval set; choose from alpha, beta" in capsys.readouterr().err
