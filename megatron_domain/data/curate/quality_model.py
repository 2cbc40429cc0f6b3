"""The fastText quality classifier of `mdt data curate` (in-domain vs out-of-domain text):

    mdt data train-quality --in-domain good/*.jsonl --out-of-domain web/*.jsonl --output quality.bin

trains a supervised fastText model (word uni- and bigrams) on a seeded split of the labeled
documents, measures it on the held-out part and writes `quality.bin` with its record
`quality.bin.json` (held-out accuracy, precision / recall of in-domain, the documents used).
The curation config's `quality.classifier` points at the model; every document that passed the
heuristics gets `quality_score` = P(in-domain) and the lowest `quality.drop_fraction` are dropped
(curate/steps.py). fastText is what FineWeb-Edu, DCLM and datatrove's own filter use: linear,
trained in seconds on a few thousand documents, scoring thousands of documents per second on
one core. Package: `fasttext-numpy2-wheel` (the fastText build datatrove requires; the
`fasttext` sdist predates numpy 2).
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from pathlib import Path

from megatron_domain.data.chat import jsonl_records
from megatron_domain.files import write_json_atomic

LABEL_IN = "__label__in_domain"
LABEL_OUT = "__label__out_of_domain"
WHITESPACE = re.compile(r"\s+")


def fasttext_line(text: str) -> str:
    """A document as one fastText input line: lower case, every whitespace run one space."""
    return WHITESPACE.sub(" ", text.lower()).strip()


def read_labeled_texts(paths: list[str], text_key: str = "text") -> list[str]:
    """The `text_key` strings of JSONL files (or of every *.jsonl under a folder); a file or line
    that is not a JSON object with a string `text_key` is an error naming it."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(path.rglob("*.jsonl"))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder (give JSONL files or folders of them)")
    texts = []
    for file in files:  # ChatDataError (a ValueError) names the file and line of bad JSON
        for where, record in jsonl_records(file, f"a document with a string {text_key!r}"):
            if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                raise ValueError(f"{where}: expected an object with a string {text_key!r} "
                                 "(set --text-key for another field)")
            if record[text_key].strip():
                texts.append(record[text_key])
    if not texts:
        raise ValueError(f"no documents in {', '.join(paths)}")
    return texts


def split_heldout(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A seeded (train, held-out) split; the held-out part has round(fraction * n) documents, at least one."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    heldout_count = max(1, round(fraction * len(texts)))
    return [texts[i] for i in order[heldout_count:]], [texts[i] for i in order[:heldout_count]]


def binary_metrics(scores: list[float], labels: list[bool]) -> dict:
    """Accuracy at P(in-domain) >= 0.5, and precision / recall of the in-domain class."""
    predicted = [s >= 0.5 for s in scores]
    true_pos = sum(p and y for p, y in zip(predicted, labels))
    return {"accuracy": sum(p == y for p, y in zip(predicted, labels)) / len(labels),
            "precision_in_domain": true_pos / max(1, sum(predicted)),
            "recall_in_domain": true_pos / max(1, sum(labels)), "documents": len(labels)}


class QualityModel:
    """A trained classifier: `score(texts)` = P(in-domain) per text."""

    def __init__(self, path: str | os.PathLike):
        import fasttext

        if not Path(path).is_file():
            raise FileNotFoundError(f"quality classifier {path}: no such file; train one with `mdt data train-quality`")
        self.model = fasttext.load_model(str(path))
        if set(self.model.labels) != {LABEL_IN, LABEL_OUT}:
            raise ValueError(f"quality classifier {path}: labels {self.model.labels}, expected {LABEL_IN} and "
                             f"{LABEL_OUT}; train it with `mdt data train-quality`")

    def score(self, texts: list[str]) -> list[float]:
        """P(in-domain) of each text (fastText's softmax over the two labels)."""
        labels, probs = self.model.predict([fasttext_line(t) for t in texts], k=2)
        return [float(dict(zip(ls, ps)).get(LABEL_IN, 0.0)) for ls, ps in zip(labels, probs)]


def train_quality_classifier(in_domain: list[str], out_of_domain: list[str], output: str | os.PathLike,
                             heldout_fraction: float = 0.2, epochs: int = 10, lr: float = 0.5, word_ngrams: int = 2,
                             dim: int = 64, seed: int = 0) -> dict:
    """Train on the non-held-out documents of both classes, measure on the held-out ones, write
    the model (atomically) and its record `<output>.json`; returns the record."""
    import fasttext

    if not 0 < heldout_fraction < 1:
        raise ValueError(f"--heldout-fraction must be in (0, 1), got {heldout_fraction}")
    train_in, held_in = split_heldout(in_domain, heldout_fraction, seed)
    train_out, held_out = split_heldout(out_of_domain, heldout_fraction, seed + 1)
    lines = [f"{LABEL_IN} {fasttext_line(t)}" for t in train_in] + [f"{LABEL_OUT} {fasttext_line(t)}" for t in train_out]
    random.Random(seed).shuffle(lines)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        train_file = Path(tmp) / "train.txt"
        train_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        # one thread: the same data and seed give the same model
        model = fasttext.train_supervised(str(train_file), epoch=epochs, lr=lr, wordNgrams=word_ngrams, dim=dim,
                                          minCount=1, seed=seed, thread=1, verbose=0)
        model.save_model(str(Path(tmp) / "model.bin"))
        os.replace(Path(tmp) / "model.bin", output)
    classifier = QualityModel(output)
    held = held_in + held_out
    record = {"model": str(output), "train_documents": {"in_domain": len(train_in), "out_of_domain": len(train_out)},
              "heldout": binary_metrics(classifier.score(held), [True] * len(held_in) + [False] * len(held_out)),
              "settings": {"heldout_fraction": heldout_fraction, "epochs": epochs, "lr": lr,
                           "word_ngrams": word_ngrams, "dim": dim, "seed": seed}}
    write_json_atomic(Path(f"{output}.json"), record)
    return record


def classifier_record(path: str | os.PathLike) -> dict:
    """The record `train_quality_classifier` wrote next to a model ({} if there is none)."""
    sidecar = Path(f"{path}.json")
    return json.loads(sidecar.read_text()) if sidecar.is_file() else {}
