"""The curation report: documents and characters in and out of every phase (from datatrove's
per-executor stats), what each filter removed (counts by reason and examples), PII counts per
type, the near-duplicate clusters, the inputs that could not be read; `curation_report.json`
and `curation_report.md` in the output folder."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_domain.files import write_json_atomic, write_text_atomic

EXAMPLES = 3  # removed documents shown per step
CLUSTERS = 20  # near-duplicate clusters listed


def total(value) -> float:
    """A datatrove stat's total (stats are numbers or {total, n, mean, ...})."""
    return value.get("total", 0) if isinstance(value, dict) else value


def phase_stats(folder: Path) -> list[dict]:
    """datatrove's merged stats of one executor: [{name, stats}] per step ([] if it did not run).
    Without `stats.json` (under Slurm a separate job merges it, which the report's job does not
    wait for) the per-task files under `stats/` are merged here, as datatrove's merge_stats does."""
    path = folder / "stats.json"
    if path.is_file():
        return json.loads(path.read_text())
    tasks = sorted((folder / "stats").glob("*.json"))
    if not tasks:
        return []
    from datatrove.utils.stats import PipelineStats

    merged = sum((PipelineStats.from_json(json.loads(t.read_text())) for t in tasks), start=PipelineStats())
    return json.loads(merged.to_json())


def flow(steps: list[dict]) -> dict:
    """Documents and characters into the phase (its first step) and out of it (its last, a writer)."""
    if not steps:
        return {}
    readers = [s["stats"] for s in steps if "documents" in s["stats"]] or [steps[0]["stats"]]
    last = steps[-1]["stats"]
    return {"documents_in": int(sum(total(r.get("documents", r.get("total", 0))) for r in readers)),
            "characters_in": int(sum(total(r.get("doc_len", 0)) for r in readers)),
            "documents_out": int(total(last.get("total", 0))), "characters_out": int(total(last.get("doc_len", 0)))}


def read_jsonl_folder(folder: Path) -> list[dict]:
    """Every record of the *.jsonl files of a folder, in file order."""
    records = []
    for path in sorted(folder.glob("*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return records


def removed_summary(folder: Path) -> dict:
    """{count, by_reason, examples} of the documents a filter wrote to `folder`."""
    docs = read_jsonl_folder(folder)
    reasons: dict[str, int] = {}
    for doc in docs:
        reason = doc.get("metadata", {}).get("filter_reason", "duplicate")
        reasons[reason] = reasons.get(reason, 0) + 1
    return {"count": len(docs), "by_reason": reasons,
            "examples": [{"id": d["id"], "source": d.get("metadata", {}).get("source", ""),
                          "reason": d.get("metadata", {}).get("filter_reason", "duplicate"),
                          "text": d["text"][:300]} for d in docs[:EXAMPLES]]}


def near_clusters(folder: Path) -> list[dict]:
    """The near-duplicate clusters of the removed documents: cluster id, size, removed ids."""
    clusters: dict[int, dict] = {}
    for doc in read_jsonl_folder(folder):
        meta = doc.get("metadata", {})
        cid = meta.get("minhash_cluster_id")
        if cid is None:
            continue
        entry = clusters.setdefault(cid, {"cluster": cid, "size": meta.get("minhash_cluster_size", 0), "removed": []})
        entry["removed"].append(doc["id"])
    return sorted(clusters.values(), key=lambda c: -c["size"])


def problems(folder: Path) -> list[dict]:
    """The inputs the reader skipped, with their reasons."""
    return [record for path in sorted(folder.rglob("*.jsonl")) for record in
            (json.loads(line) for line in path.read_text().splitlines() if line.strip())]


def classifier_summary(cfg, out: Path) -> dict:
    """The classifier's held-out record, the threshold, the score distribution (and its PNG)."""
    import numpy as np

    from megatron_domain.data.curate.quality_model import classifier_record
    from megatron_domain.data.curate.steps import read_scores

    work = out / "work"
    threshold = json.loads((work / "quality_threshold.json").read_text())
    scores = np.asarray(read_scores(work / "quality_scores"))  # [documents]
    counts, edges = np.histogram(scores, bins=10, range=(0.0, 1.0))
    record = classifier_record(cfg.quality.classifier)
    summary = {"model": cfg.quality.classifier, "heldout": record.get("heldout", {}),
               "threshold": threshold["threshold"], "drop_fraction": threshold["drop_fraction"],
               "documents_scored": int(scores.size), "dropped": int((scores < threshold["threshold"]).sum()),
               "histogram": {"edges": [round(float(e), 2) for e in edges], "counts": counts.tolist()}}
    summary["plot"] = str(plot_scores(scores, threshold["threshold"], out / "quality_scores.png"))
    return summary


def plot_scores(scores, threshold: float, path: Path) -> Path:
    """A histogram of the quality scores with the drop threshold, as PNG (written atomically)."""
    import matplotlib

    from megatron_domain.eval.report import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(scores, bins=40, range=(0.0, 1.0), color="tab:blue")
    ax.axvline(threshold, color="tab:red", linestyle="--", label=f"drop below {threshold:.3f}")
    ax.set_xlabel("P(in-domain), fastText quality classifier")
    ax.set_ylabel("documents")
    ax.legend()
    save_figure(fig, path)
    return path


def write_report(cfg, phases, logs: Path, tokenized: dict | None, seconds: dict[str, float] | None = None) -> dict:
    """Collect, write (JSON and Markdown, each atomically) and return the report."""
    out = Path(cfg.output_dir)
    stats = {p.name: phase_stats(logs / f"{i:02d}_{p.name}") for i, p in enumerate(phases, 1)}
    skipped = problems(out / "work" / "problems")
    report: dict = {"output_dir": str(out), "inputs": list(cfg.inputs), "phases": {}, "removed": {}}
    for name in ("read", "exact_filter", "near_filter", "redact_filter", "quality_classifier"):
        if stats.get(name):
            report["phases"][name] = flow(stats[name])
    readers = [s["stats"] for s in stats.get("read", []) if "input_files" in s["stats"]]
    skipped_counts: dict[str, int] = {}
    for reader in readers:
        for key, value in reader.items():
            if key.startswith("skipped_"):
                skipped_counts[key[len("skipped_"):]] = skipped_counts.get(key[len("skipped_"):], 0) + int(total(value))
    report["read"] = {"files": int(sum(total(r.get("input_files", 0)) for r in readers)),
                      "documents": int(sum(total(r.get("documents", 0)) for r in readers)),
                      "skipped": skipped_counts, "skipped_inputs": skipped}
    cleaner = stats["read"][-2]["stats"] if len(stats.get("read", [])) >= 2 else {}
    report["read"]["dropped_empty_after_cleanup"] = int(total(cleaner.get("dropped_empty", 0)))
    for step in ("exact_dedup", "near_dedup", "quality", "repetition", "quality_classifier"):
        if (out / "removed" / step).is_dir():
            report["removed"][step] = removed_summary(out / "removed" / step)
    exact = report["removed"].get("exact_dedup")
    if exact:  # datatrove writes every document it cut spans from; those left empty were dropped
        f = report["phases"]["exact_filter"]
        dropped = f["documents_in"] - f["documents_out"]
        exact["by_reason"] = {"duplicate document (nothing left)": dropped,
                              "duplicate spans cut (document kept)": exact["count"] - dropped}
        exact["characters_removed"] = f["characters_in"] - f["characters_out"]
    if "near_filter" in stats:
        clusters = near_clusters(out / "removed" / "near_dedup")
        report["near_duplicates"] = {"clusters": len(clusters), "documents_removed": sum(len(c["removed"]) for c in clusters),
                                     "largest": clusters[:CLUSTERS]}
    redact = {k: v for s in stats.get("redact_filter", []) for k, v in s["stats"].items()}
    report["pii"] = {k[len("pii_"):]: int(total(v)) for k, v in redact.items() if k.startswith("pii_")}
    report["pii_documents"] = int(total(redact.get("documents_with_pii", 0)))
    report["pii_detector"] = (f"patterns + spaCy NER ({cfg.pii.ner_model})" if cfg.pii.ner_model else
                              "patterns only (regex; no pii.ner_model set)") if cfg.pii.enabled else "off"
    if cfg.quality.classifier:
        report["quality_classifier"] = classifier_summary(cfg, out)
    if tokenized:
        report["tokenized"] = tokenized
        # tokens in and out of every phase, at the output's characters per token (tokenizing each
        # phase's text again would cost as much as the whole run)
        last = list(report["phases"].values())[-1]
        per_char = tokenized["tokens"] / max(1, last["characters_out"])
        for f in report["phases"].values():
            f["tokens_in_est"] = round(f["characters_in"] * per_char)
            f["tokens_out_est"] = round(f["characters_out"] * per_char)
    if seconds:
        report["seconds"] = {name: round(value, 3) for name, value in seconds.items()}
    write_json_atomic(out / "curation_report.json", report)
    write_text_atomic(out / "curation_report.md", markdown(report))
    return report


def markdown(report: dict) -> str:
    """The report as Markdown tables."""
    read = report["read"]
    lines = ["# Curation report", "", f"Inputs: {', '.join(report['inputs'])}; output: {report['output_dir']}", "",
             f"Read {read['documents']} documents from {read['files']} files; skipped: "
             + (", ".join(f"{k} {v}" for k, v in read["skipped"].items()) or "none")
             + f"; empty after cleanup: {read['dropped_empty_after_cleanup']}.", "",
             "| phase | documents in | documents out | characters in | characters out | tokens in | tokens out |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, f in report["phases"].items():
        lines.append(f"| {name} | {f['documents_in']} | {f['documents_out']} | {f['characters_in']} | "
                     f"{f['characters_out']} | {f.get('tokens_in_est', '-')} | {f.get('tokens_out_est', '-')} |")
    if report.get("tokenized"):
        t = report["tokenized"]
        lines += ["", f"Tokenized: {t['documents']} documents, {t['tokens']} tokens -> `{t['prefix']}.bin/.idx` "
                      "(the tokens of earlier phases are estimated at the output's characters per token)."]
    if read["skipped_inputs"]:
        lines += ["", "| skipped input | line | reason |", "|---|---:|---|"]
        lines += [f"| {p['path']} | {p.get('line', '')} | {p['reason']} |" for p in read["skipped_inputs"][:50]]
    if report.get("near_duplicates"):
        nd = report["near_duplicates"]
        lines += ["", f"Near-duplicate clusters: {nd['clusters']} ({nd['documents_removed']} documents removed).", "",
                  "| cluster | size | removed |", "|---:|---:|---|"]
        lines += [f"| {c['cluster']} | {c['size']} | {', '.join(c['removed'][:5])} |" for c in nd["largest"]]
    lines += ["", f"PII detector: {report['pii_detector']}."]
    if report["pii"]:
        lines += ["", f"PII redacted in {report['pii_documents']} documents:", "", "| type | spans |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(report["pii"].items())]
    if report.get("quality_classifier"):
        qc = report["quality_classifier"]
        held = qc["heldout"]
        accuracy = f"held-out accuracy {held['accuracy']:.3f} on {held['documents']} documents" if held else \
            "no training record next to the model"
        lines += ["", f"Quality classifier `{qc['model']}` ({accuracy}): {qc['documents_scored']} documents scored, "
                      f"the lowest {qc['drop_fraction']:.0%} (P(in-domain) < {qc['threshold']:.3f}) dropped: "
                      f"{qc['dropped']}. Histogram: `{Path(qc['plot']).name}`.", "",
                  "| P(in-domain) | documents |", "|---|---:|"]
        edges = qc["histogram"]["edges"]
        lines += [f"| {edges[i]:.1f}-{edges[i + 1]:.1f} | {c} |" for i, c in enumerate(qc["histogram"]["counts"])]
    for step, summary in report["removed"].items():
        lines += ["", f"## Removed by {step}: {summary['count']}", ""]
        lines += [f"- {reason}: {count}" for reason, count in summary["by_reason"].items()]
        for example in summary["examples"]:
            lines += [f"> `{example['id']}` ({example['reason']}): {example['text'][:200]}"]
    return "\n".join(lines) + "\n"
