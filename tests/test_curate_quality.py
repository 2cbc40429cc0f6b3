"""The fastText quality classifier of `mdt data curate` and the Ray executor: `mdt data
train-quality` separates a clearly separable toy set (and does not on shuffled labels), a
curation with the classifier drops exactly the lowest-scoring quarter (the off-topic documents)
and reports it with a histogram, and the same curation on a local Ray cluster gives the same
corpus as the local worker processes."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("datatrove")
pytest.importorskip("fasttext")

from megatron_domain.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STOP = "the of and to in is that for it as with was on be by this are from or at which an have not but".split()
PRINTER = "printer driver firmware update network cable power supply paper tray toner cartridge error reset".split()
COOKING = "recipe onion garlic butter oven simmer flour sugar salad pepper roast dough sauce spoon".split()


def prose(topic: list[str], seed: int, words: int = 120) -> str:
    """Random text mixing stop words with a topic's words (passes the Gopher heuristics)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(STOP + topic) for _ in range(words)) + "."


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("quality")
    good = write_jsonl(tmp / "in" / "a.jsonl", [prose(PRINTER, i) for i in range(300)])
    bad = write_jsonl(tmp / "out.jsonl", [prose(COOKING, 1000 + i) for i in range(300)])
    assert main(["data", "train-quality", "--in-domain", str(good.parent), "--out-of-domain", str(bad),
                 "--output", str(tmp / "quality.bin")]) == 0
    return {"tmp": tmp, "model": tmp / "quality.bin", "record": json.loads((tmp / "quality.bin.json").read_text())}


def test_classifier_separates_a_separable_set(classifier):
    from megatron_domain.data.curate.quality_model import QualityModel

    record = classifier["record"]
    assert record["train_documents"] == {"in_domain": 240, "out_of_domain": 240}
    assert record["heldout"]["documents"] == 120 and record["heldout"]["accuracy"] >= 0.95
    scores = QualityModel(classifier["model"]).score([prose(PRINTER, 5000), prose(COOKING, 5001)])
    assert scores[0] > 0.9 and scores[1] < 0.1


def test_classifier_cannot_separate_shuffled_labels(tmp_path):
    from megatron_domain.data.curate.quality_model import train_quality_classifier

    texts = [prose(PRINTER if i % 2 else COOKING, i) for i in range(400)]
    random.Random(0).shuffle(texts)  # both "classes" now hold the same mix of topics
    record = train_quality_classifier(texts[:200], texts[200:], tmp_path / "q.bin")
    assert 0.3 <= record["heldout"]["accuracy"] <= 0.7


def test_train_quality_names_a_bad_line(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    assert main(["data", "train-quality", "--in-domain", str(good), "--out-of-domain", str(good),
                 "--output", str(tmp_path / "q.bin")]) != 0
    assert f"{good}:2: expected an object with a string 'text'" in capsys.readouterr().err


def curate(tmp: Path, name: str, model: Path, *extra: str) -> dict:
    config = tmp / f"{name}.yaml"
    config.write_text(json.dumps({"inputs": [str(tmp / "raw")], "output_dir": str(tmp / name), "workers": 2,
                                  "exact_dedup": {"enabled": False}, "near_dedup": {"enabled": False},
                                  "quality": {"min_words": 20, "classifier": str(model), "drop_fraction": 0.25}}))
    run = subprocess.run([sys.executable, "-m", "megatron_domain.cli", "data", "curate", str(config), *extra],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    out = tmp / name
    docs = [json.loads(line) for path in sorted((out / "jsonl").glob("*.jsonl")) for line in path.read_text().splitlines()]
    return {"out": out, "ids": sorted(d["id"] for d in docs), "docs": docs,
            "report": json.loads((out / "curation_report.json").read_text())}


@pytest.fixture(scope="module")
def curated_with_classifier(classifier) -> dict:
    tmp = classifier["tmp"]
    # 12 on-topic documents and 4 off-topic ones (a quarter): the quarter with the lowest scores
    write_jsonl(tmp / "raw" / "docs.jsonl", [prose(PRINTER, 2000 + i) for i in range(12)]
                + [prose(COOKING, 3000 + i) for i in range(4)])
    return curate(tmp, "local", classifier["model"])


def test_curation_drops_the_lowest_quarter(curated_with_classifier):
    report, out = curated_with_classifier["report"], curated_with_classifier["out"]
    assert curated_with_classifier["ids"] == sorted(f"docs.jsonl#{i}" for i in range(1, 13))
    qc = report["quality_classifier"]
    assert qc["documents_scored"] == 16 and qc["dropped"] == 4 and qc["drop_fraction"] == 0.25
    assert qc["heldout"]["accuracy"] >= 0.95 and sum(qc["histogram"]["counts"]) == 16
    removed = sorted(d["id"] for d in report["removed"]["quality_classifier"]["examples"])
    assert report["removed"]["quality_classifier"]["count"] == 4 and removed[0] == "docs.jsonl#13"
    assert report["removed"]["quality_classifier"]["by_reason"] == {"below_quality_threshold": 4}
    assert all(d["metadata"]["quality_score"] >= qc["threshold"] for d in curated_with_classifier["docs"])
    assert (out / "quality_scores.png").stat().st_size > 1000
    assert "held-out accuracy" in (out / "curation_report.md").read_text()
    assert report["phases"]["quality_classifier"] == {**report["phases"]["quality_classifier"], "documents_in": 16,
                                                      "documents_out": 12}


def test_a_missing_classifier_is_a_config_error(tmp_path):
    from megatron_domain.config import ConfigError
    from megatron_domain.data.curate.config import load_curate_config

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps({"inputs": [str(tmp_path)], "quality": {"classifier": "nope.bin", "drop_fraction": 1}}))
    with pytest.raises(ConfigError) as info:
        load_curate_config(str(path))
    assert "quality.classifier: 'nope.bin' is not a file" in str(info.value)
    assert "quality.drop_fraction: must be in [0, 1), got 1" in str(info.value)


@pytest.mark.slow
def test_ray_executor_gives_the_same_corpus(classifier, curated_with_classifier):
    pytest.importorskip("ray")
    ray_run = curate(classifier["tmp"], "ray", classifier["model"], "--executor", "ray")
    assert ray_run["ids"] == curated_with_classifier["ids"]
    assert [d["text"] for d in sorted(ray_run["docs"], key=lambda d: d["id"])] == \
        [d["text"] for d in sorted(curated_with_classifier["docs"], key=lambda d: d["id"])]
    assert ray_run["report"]["quality_classifier"]["dropped"] == 4
    for run, key in ((ray_run, "ray_remote_kwargs"), (curated_with_classifier, "start_method")):  # who ran it
        assert all(key in json.loads(p.read_text()) for p in (run["out"] / "work" / "logs").glob("*/executor.json"))
