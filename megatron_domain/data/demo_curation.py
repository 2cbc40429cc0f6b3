"""The demo's curation step: the domain corpus's training documents go through `mdt data
curate` before DACPT, with known bad documents injected into the raw input so the report shows
each step at work:

- exact duplicates of real documents (removed by the exact span dedup),
- near-duplicates (a few words changed: removed by MinHash),
- PII appended to real documents (emails, phone numbers, an IBAN: redacted, counted per type),
- low-quality documents (spam, symbol soup, a navigation menu: removed by the Gopher filters),
- off-topic documents (docstrings of the general corpus: scored lowest by the fastText
  classifier, which is trained on the other general training documents vs the domain ones).

The curated corpus is written as the indexed dataset `domain_train`, which the DACPT stage reads.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from megatron_domain.files import write_jsonl_atomic

PII_LINES = ("For corrections write to jane.doe@example.org or call +1 415-555-2671.",
             "Questions about this section: python-docs@example.com, fax +44 20 7946 0958.",
             "Donations to IBAN DE89 3704 0044 0532 0130 00 keep the documentation free.")
LOW_QUALITY = ("buy now click here best price " * 40,
               "#### ==== {{{ }}} <<< >>> $$$ %%% ^^^ &&& *** ((( ))) ~~~ ||| " * 12,
               "\n".join(f"- Home\n- Products\n- About\n- Contact\n- Page {i}" for i in range(20)),
               "TODO")


def near_duplicate(text: str, rng: random.Random, changes: int = 3) -> str:
    """`text` with `changes` of its words replaced (5-gram Jaccard with the original ~0.85-0.95)."""
    words = text.split(" ")
    for i in rng.sample(range(len(words)), min(changes, len(words))):
        words[i] = "changed"
    return " ".join(words)


def injected_documents(domain: list[str], general: list[str], seed: int) -> tuple[list[dict], list[str], dict]:
    """The raw domain input: every domain document (three with PII appended) and the injected
    bad ones, each record with a `kind`; the general documents left for the classifier's
    out-of-domain side; the number injected per kind."""
    rng = random.Random(seed)
    picks = rng.sample(range(len(domain)), 9)
    records = [{"text": text, "kind": "domain"} for text in domain]
    for line, i in zip(PII_LINES, picks[:3]):
        records[i] = {"text": f"{domain[i]}\n\n{line}", "kind": "domain_with_pii"}
    records += [{"text": domain[i], "kind": "exact_duplicate"} for i in picks[3:6]]
    records += [{"text": near_duplicate(domain[i], rng), "kind": "near_duplicate"} for i in picks[6:9]]
    records += [{"text": text, "kind": "low_quality"} for text in LOW_QUALITY]
    off_topic = rng.sample(range(len(general)), 4)
    records += [{"text": general[i], "kind": "off_topic"} for i in off_topic]
    rng.shuffle(records)
    kinds = {kind: sum(r["kind"] == kind for r in records) for kind in
             ("exact_duplicate", "near_duplicate", "domain_with_pii", "low_quality", "off_topic")}
    return records, [t for i, t in enumerate(general) if i not in set(off_topic)], kinds


def curate_demo_domain(out: Path, domain: list[str], general: list[str], tokenizer: str, seed: int,
                       progress: bool = True) -> dict:
    """Write the raw input, train the quality classifier, curate into `<out>/domain_train`;
    returns the curation report with what was injected (`report["injected"]`)."""
    from megatron_domain.data.curate.config import CurateConfig, QualityConfig, CleanupConfig
    from megatron_domain.data.curate.pipeline import run_curation
    from megatron_domain.data.curate.quality_model import train_quality_classifier

    records, out_of_domain, injected = injected_documents(domain, general, seed)
    raw = out / "raw_domain"
    write_jsonl_atomic(raw / "domain.jsonl", records)
    classifier = train_quality_classifier(domain, out_of_domain, out / "quality_classifier" / "quality.bin", seed=seed)
    # The language reference is prose with code: spaces inside lines stay (indentation, aligned
    # comments), short sections (the shortest has 8 words) and code-heavy ones (symbols,
    # non-alphabetic words) stay too, and Gopher's repetition rules (tuned on web text) are off:
    # they removed 51 of 273 real sections (repeated n-grams of code and grammar rules). The
    # drop fraction takes about as many as were injected.
    cfg = CurateConfig(inputs=[str(raw)], output_dir=str(out / "curated_domain"), tokenizer=tokenizer,
                       output_prefix=str(out / "domain_train"), workers=2,
                       cleanup=CleanupConfig(collapse_spaces=False),
                       quality=QualityConfig(min_words=5, max_symbol_word_ratio=0.5, min_alpha_words_ratio=0.3,
                                             max_bullet_lines_ratio=0.8, min_stop_words=1, repetition=False,
                                             classifier=classifier["model"], drop_fraction=0.02))
    report = run_curation(cfg, progress=progress)
    report["injected"] = injected
    (out / "curated_domain" / "injected.json").write_text(json.dumps(injected, indent=2))
    return report


def curation_summary(report: dict) -> str:
    """One line: documents in and out and what each step removed or redacted."""
    phases = report["phases"]
    removed = report["removed"]
    last = phases[list(phases)[-1]]
    parts = [f"{report['read']['documents']} documents in, {last['documents_out']} out",
             f"exact duplicates {phases['exact_filter']['documents_in'] - phases['exact_filter']['documents_out']}",
             f"near duplicates {report.get('near_duplicates', {}).get('documents_removed', 0)}",
             f"PII spans {sum(report['pii'].values())}",
             f"quality {removed.get('quality', {}).get('count', 0) + removed.get('repetition', {}).get('count', 0)}",
             f"classifier {report.get('quality_classifier', {}).get('dropped', 0)}"]
    return ", ".join(parts)
