#!/usr/bin/env python
"""Throughput and near-duplicate accuracy of `mdt data curate` on a generated corpus. Prints one
JSON line (also appended to --out).

    python tools/bench_curate.py                       # ~100 MB, 2 workers, every step
    python tools/bench_curate.py --mb 5 --dedup-mb 5   # a quick run

1. Throughput: `--mb` MB of JSONL documents (English-like text drawn from a Zipf vocabulary,
   300-1500 words each) through the whole pipeline (read, exact dedup, MinHash near dedup,
   PII redaction, Gopher filters) with `--workers` processes: documents/s and MB/s of the whole
   run, and the seconds of each phase.
2. Near-duplicate accuracy: a `--dedup-mb` corpus with known pairs, through near dedup alone:
   positives are copies of a document with words replaced until the Jaccard similarity of the
   two documents' word 5-gram sets is in [0.8, 0.95]; hard negatives are two documents sharing
   a block of text, with Jaccard in [0.3, 0.5]; everything else is unrelated. Recall = share of
   positive pairs of which one document was removed; precision = share of removed documents
   that belong to a positive pair. (Goal: both >= 0.95 at Jaccard >= 0.8.) Similarities are
   measured on the generated texts, not assumed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

VOCAB = 5000


def vocabulary(rng: random.Random) -> tuple[list[str], list[float]]:
    """Pronounceable words with Zipf weights, the 40 most frequent being real stop words (the
    Gopher filter wants some)."""
    stop = ("the of and to a in is that for it as with was on be by this are from or at which an have not but "
            "they their his her we you can will").split()
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "po", "si", "de", "fa", "gu", "ha", "jo", "ve", "zi", "bo"]
    words = stop + ["".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))) for _ in range(VOCAB - len(stop))]
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    return words, weights


def document(rng: random.Random, words: list[str], weights: list[float], length: int) -> str:
    """Sentences of 8-20 words."""
    tokens = rng.choices(words, weights, k=length)
    out, i = [], 0
    while i < len(tokens):
        n = rng.randint(8, 20)
        sentence = " ".join(tokens[i:i + n])
        out.append(sentence[:1].upper() + sentence[1:] + ".")
        i += n
    return " ".join(out)


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    """Word n-grams of the lower-cased, punctuation-free text."""
    tokens = "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()
    return {tuple(tokens[i:i + n]) for i in range(max(1, len(tokens) - n + 1))}


def jaccard(a: str, b: str) -> float:
    """Jaccard similarity of the two texts' word 5-gram sets."""
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def near_copy(rng: random.Random, text: str, words: list[str], low: float, high: float) -> str | None:
    """`text` with words replaced one at a time until the Jaccard similarity falls below a target
    drawn uniformly from [low, high] (None if a replacement overshoots below `low`)."""
    tokens = text.split(" ")
    target = rng.uniform(low, high)
    for _ in range(2000):
        i = rng.randrange(len(tokens))
        tokens[i] = rng.choice(words)
        similarity = jaccard(text, " ".join(tokens))
        if similarity <= target:
            return " ".join(tokens) if similarity >= low else None
    return None


def write_corpus(folder: Path, megabytes: float, seed: int, with_pairs: bool) -> dict:
    """JSONL files of ~`megabytes` MB; with pairs: positives and hard negatives, ids recorded."""
    rng = random.Random(seed)
    words, weights = vocabulary(rng)
    folder.mkdir(parents=True, exist_ok=True)
    size, index, positives, negatives = 0, 0, [], []
    files = [open(folder / f"part{k}.jsonl", "w") for k in range(4)]
    try:
        while size < megabytes * 1e6:
            text = document(rng, words, weights, rng.randint(300, 1500))
            records = [text]
            if with_pairs and rng.random() < 0.1:
                copy = near_copy(rng, text, words, 0.8, 0.95)
                if copy is not None:
                    records.append(copy)
            elif with_pairs and rng.random() < 0.1:
                tokens = text.split(" ")
                other = document(rng, words, weights, max(20, len(tokens) * 35 // 100))
                sibling = " ".join(tokens[: len(tokens) * 60 // 100]) + " " + other  # a shared block: Jaccard ~0.44
                if 0.3 <= jaccard(text, sibling) <= 0.5:
                    records.append(sibling)
            ids = []
            for record in records:
                k = index % len(files)
                files[k].write(json.dumps({"text": record, "id": index}) + "\n")
                ids.append(index)
                size += len(record) + 20
                index += 1
            if len(ids) == 2:
                similarity = jaccard(records[0], records[1])
                (positives if similarity >= 0.8 else negatives).append({"ids": ids, "jaccard": similarity})
    finally:
        for handle in files:
            handle.close()
    return {"documents": index, "bytes": size, "positives": positives, "negatives": negatives}


def curate(inputs: Path, out: Path, workers: int, near_only: bool, bands: int, rows: int) -> tuple[float, dict]:
    """(seconds, report) of one curation run."""
    from megatron_domain.data.curate.config import CurateConfig, NearDedupConfig
    from megatron_domain.data.curate.pipeline import run_curation

    cfg = CurateConfig(inputs=[str(inputs)], output_dir=str(out), workers=workers,
                       near_dedup=NearDedupConfig(bands=bands, rows=rows))
    if near_only:
        cfg.exact_dedup.enabled = cfg.pii.enabled = cfg.quality.enabled = False
    started = time.perf_counter()
    report = run_curation(cfg, progress=False)
    return time.perf_counter() - started, report


def removed_source_ids(out: Path) -> set[int]:
    """The generator's ids of the documents near dedup removed."""
    ids = set()
    for path in (out / "removed" / "near_dedup").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            doc = json.loads(line)
            ids.add(int(doc["metadata"]["fields"]["id"]))
    return ids


def main(argv: list[str] | None = None) -> dict:
    """Generate, curate, measure, print the JSON line."""
    from megatron_domain.metrics import emit_json_line, machine_record

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=100.0, help="size of the throughput corpus")
    parser.add_argument("--dedup-mb", type=float, default=20.0, help="size of the near-duplicate corpus")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bands", type=int, default=30)
    parser.add_argument("--rows", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="also append the JSON line to this file")
    args = parser.parse_args(argv)
    record = {"bench": "curate", **machine_record(), "workers": args.workers, "bands": args.bands, "rows": args.rows}
    with tempfile.TemporaryDirectory(prefix="bench_curate_") as tmp:
        root = Path(tmp)
        if args.mb > 0:
            corpus = write_corpus(root / "corpus", args.mb, args.seed, with_pairs=False)
            seconds, report = curate(root / "corpus", root / "out", args.workers, False, args.bands, args.rows)
            record["throughput"] = {"documents": corpus["documents"], "megabytes": corpus["bytes"] / 1e6,
                                    "seconds": seconds, "documents_per_s": corpus["documents"] / seconds,
                                    "mb_per_s": corpus["bytes"] / 1e6 / seconds,
                                    "documents_out": list(report["phases"].values())[-1]["documents_out"],
                                    "phase_seconds": report.get("seconds", {})}
        if args.dedup_mb > 0:
            corpus = write_corpus(root / "pairs", args.dedup_mb, args.seed + 1, with_pairs=True)
            seconds, _ = curate(root / "pairs", root / "pairs_out", args.workers, True, args.bands, args.rows)
            removed = removed_source_ids(root / "pairs_out")
            positive_ids = {i for pair in corpus["positives"] for i in pair["ids"]}
            found = sum(bool(set(pair["ids"]) & removed) for pair in corpus["positives"])
            false_negatives = sum(bool(set(pair["ids"]) & removed) for pair in corpus["negatives"])
            record["near_dedup"] = {
                "documents": corpus["documents"], "positive_pairs": len(corpus["positives"]),
                "hard_negative_pairs": len(corpus["negatives"]), "removed": len(removed),
                "recall": found / max(1, len(corpus["positives"])),
                "precision": len(removed & positive_ids) / max(1, len(removed)),
                "hard_negatives_removed": false_negatives, "seconds": seconds,
                "positive_jaccard_range": [min((p["jaccard"] for p in corpus["positives"]), default=None),
                                           max((p["jaccard"] for p in corpus["positives"]), default=None)],
                "negative_jaccard_range": [min((p["jaccard"] for p in corpus["negatives"]), default=None),
                                           max((p["jaccard"] for p in corpus["negatives"]), default=None)]}
    emit_json_line(record, args.out)
    return record


if __name__ == "__main__":
    main()
