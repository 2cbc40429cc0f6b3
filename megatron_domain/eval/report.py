"""The pipeline report: report.json, a readable report.md, a loss-curve PNG and a PNG of the
evaluation before/after each stage."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_domain.config import GENERATION_METRICS

# the generation panel's bars (every generation metric is in the tables)
PLOTTED_GENERATION_METRICS = ("format_adherence", "citation_accuracy", "refusal_in_scope", "refusal_out_of_scope",
                              "qa_f1")
from megatron_domain.eval.gates import flat_eval, verdict
from megatron_domain.files import write_json_atomic, write_text_atomic
from megatron_domain.metrics import read_metrics


def plot_loss_curves(stages: list[dict], out_file: str | os.PathLike) -> None:
    """One curve per stage on a shared step axis (stages placed end to end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    offset = 0
    for stage in stages:
        records = read_metrics(stage["run_dir"])
        if not records:
            continue
        steps = [offset + r["step"] for r in records]
        ax.plot(steps, [r["loss"] for r in records], label=f"{stage['name']} ({stage['mode']})")
        offset = steps[-1]
    ax.set_xlabel("optimizer step (stages end to end)")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("Training loss per stage")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, out_file)


def save_figure(fig, out_file: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG under a temporary name, then rename it; closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = Path(str(out_file) + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_file)


def plot_eval_deltas(stages: list[dict], out_file: str | os.PathLike) -> None:
    """Per stage: held-out perplexity before/after per eval set (log scale), and the
    generation metrics before/after when the stage has them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_generation = [s for s in stages if "generation" in s["eval_after"]]
    with_suites = [s for s in stages if s["eval_after"].get("suites")]
    panels = 1 + bool(with_generation) + bool(with_suites)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels + 1.5, 4.2), squeeze=False)
    ax = axes[0][0]
    sets = sorted({name for s in stages for name in s["eval_after"].get("ppl", {})})
    width = 0.8 / max(2 * len(sets), 1)
    for i, name in enumerate(sets):
        for j, (when, hatch) in enumerate((("eval_before", "//"), ("eval_after", ""))):
            xs = [k + (2 * i + j) * width for k in range(len(stages))]
            ys = [s[when].get("ppl", {}).get(name, float("nan")) for s in stages]
            ax.bar(xs, ys, width, label=f"{name} {'before' if j == 0 else 'after'}", hatch=hatch,
                   color=f"C{i}", alpha=0.5 if j == 0 else 0.9)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(stages))], [s["name"] for s in stages])
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("Perplexity before / after each stage")
    ax.legend(fontsize=8)
    if with_generation:
        ax = axes[0][1]
        labels, before, after = [], [], []
        for stage in with_generation:
            for metric, value in stage["eval_after"]["generation"].items():
                if metric in PLOTTED_GENERATION_METRICS:
                    labels.append(f"{stage['name']}\n{metric}")
                    before.append(stage["eval_before"].get("generation", {}).get(metric, 0.0))
                    after.append(value)
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], before, 0.4, label="before", alpha=0.5)
        ax.bar([x + 0.2 for x in xs], after, 0.4, label="after")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title("Generation metrics (greedy, held-out questions)")
        ax.legend(fontsize=8)
    if with_suites:
        ax = axes[0][panels - 1]
        labels, deltas = [], []
        for stage in with_suites:
            before = {k: v for suite in stage["eval_before"].get("suites", {}).values() for k, v in suite.items()}
            for suite in stage["eval_after"]["suites"].values():
                for metric, value in suite.items():
                    if metric in before:
                        labels.append(f"{stage['name']}\n{metric}")
                        deltas.append(value - before[metric])
        ax.bar(range(len(labels)), deltas, color=["C2" if d >= 0 else "C3" for d in deltas])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(list(range(len(labels))), labels, fontsize=7, rotation=60, ha="right")
        ax.set_ylabel("after - before")
        ax.set_title("lm-eval suite metrics: change per stage")
    save_figure(fig, out_file)


def plot_retention(stage: dict, out_file: str | os.PathLike) -> None:
    """Constraint retention against the turn index, before vs after the stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for when, style in (("eval_before", "--"), ("eval_after", "-")):
        values = stage[when].get("dialogues", {}).get("retention_by_turn", [])
        ax.plot(range(1, len(values) + 1), values, style, marker="o", label=when.replace("eval_", ""))
    ax.set_xlabel("assistant turn")
    ax.set_ylabel("constraint retention")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{stage['name']}: constraints kept per turn (held-out seeds)")
    ax.legend()
    save_figure(fig, out_file)


def _pct(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}"


def summary_table(stages: list[dict]) -> list[str]:
    """Every metric of every stage in one table: the first stage's input, then each stage's result."""
    columns = [flat_eval(stages[0]["eval_before"])] + [flat_eval(s["eval_after"]) for s in stages]
    metrics = list(dict.fromkeys(k for c in columns for k in c))
    lines = ["| metric | " + " | ".join([f"before {stages[0]['name']}"] + [f"after {s['name']}" for s in stages]) + " |",
             "|---|" + "---:|" * len(columns)]
    for metric in metrics:
        lines.append(f"| {metric} | " + " | ".join(f"{c[metric]:.4g}" if metric in c else "" for c in columns) + " |")
    return lines


def timing_table(stages: list[dict]) -> list[str]:
    """Per stage: wall time (eval included), training time, tokens trained on and tokens/s."""
    lines = ["| stage | mode | wall time (s) | training time (s) | tokens | tokens/s | final loss |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for s in stages:
        lines.append(f"| {s['name']} | {s['mode']} | {s.get('wall_time_s', float('nan')):.0f} | "
                     f"{s.get('train_time_s', float('nan')):.0f} | {s.get('tokens', 0):,} | "
                     f"{s.get('tokens_per_s', 0.0):,.0f} | {s.get('final_loss', float('nan')):.3f} |")
    return lines


def gate_lines(report: dict) -> list[str]:
    """Each gate's verdict, and the stop a failed gate caused."""
    gates = [g for s in report["stages"] for g in s.get("gates", [])]
    if not gates and not report.get("stopped_by_gate"):
        return []
    lines = ["## Gates", ""]
    if report.get("stopped_by_gate"):
        stop = report["stopped_by_gate"]
        lines += [f"**The pipeline stopped after stage {stop['stage']}**: " + "; ".join(stop["failures"]), ""]
    for g in gates:
        reason = f": {'; '.join(g['failures'])}" if g["failures"] else ""
        lines.append(f"- {verdict(g)}: {g['stage']}: {g['description']} ({g['before']:.4g} -> {g['after']:.4g}){reason}")
    return lines + [""]


def render_markdown(report: dict) -> str:
    """One table of every metric before/after every stage, stage costs, gates, then each stage
    in detail, and the plots."""
    lines = ["# Pipeline report", "", f"Output directory: `{report['out_dir']}`", ""]
    if report.get("curation"):
        curation = report["curation"]
        injected = ", ".join(f"{k} {v}" for k, v in curation["injected"].items())
        lines += ["## Data curation (domain corpus)", "", f"{curation['summary']} (injected: {injected}). "
                  f"Full report: `{curation['report']}`.", ""]
    if report["stages"]:
        lines += ["## Every metric, stage by stage", "", *summary_table(report["stages"]), "",
                  "## Cost per stage", "", *timing_table(report["stages"]), ""]
    lines += gate_lines(report)
    for stage in report["stages"]:
        lines += [f"## {stage['name']} (`{stage['mode']}`)", "", f"Run directory: `{stage['run_dir']}`", "",
                  "| eval set | ppl before | ppl after | change |", "|---|---:|---:|---:|"]
        before, after = stage["eval_before"]["ppl"], stage["eval_after"]["ppl"]
        for name in after:
            lines.append(f"| {name} | {before[name]:.2f} | {after[name]:.2f} | {_pct(before[name], after[name])} |")
        for suite, metrics in stage["eval_after"].get("suites", {}).items():
            sb = stage["eval_before"].get("suites", {}).get(suite, {})
            lines += ["", f"| suite {suite} (lm-eval) | before | after | change |", "|---|---:|---:|---:|"]
            for metric, value in metrics.items():
                old = sb.get(metric, float("nan"))
                lines.append(f"| {metric} | {old:.4f} | {value:.4f} | {value - old:+.4f} |")
        if "generation" in stage["eval_after"]:
            gb, ga = stage["eval_before"].get("generation", {}), stage["eval_after"]["generation"]
            lines += ["", "| generation metric (greedy, held-out questions) | before | after |", "|---|---:|---:|"]
            for metric in GENERATION_METRICS:
                if metric in ga:
                    lines.append(f"| {metric} | {gb.get(metric, float('nan')):.1%} | {ga[metric]:.1%} |")
            if "kl_to_reference" in ga:
                lines.append(f"| kl_to_reference (nats per answer) | {gb.get('kl_to_reference', 0.0):.3f} | "
                             f"{ga['kl_to_reference']:.3f} |")
            for sample in ga.get("samples", [])[:2]:
                lines += ["", f"> Q: {sample['prompt']}", f"> A: {sample['answer']}"]
        if "dialogues" in stage["eval_after"]:
            db, da = stage["eval_before"].get("dialogues", {}), stage["eval_after"]["dialogues"]
            lines += ["", f"| multi-turn metric (greedy, {da['dialogues']} held-out seeds) | before | after |",
                      "|---|---:|---:|"]
            for metric in ("dialogue_score", "late_retention"):
                lines.append(f"| {metric} | {db.get(metric, float('nan')):.1%} | {da[metric]:.1%} |")
            for rule, value in da.get("late_rules", {}).items():
                lines.append(f"| {rule} on late turns | {db.get('late_rules', {}).get(rule, float('nan')):.1%} | "
                             f"{value:.1%} |")
            lines += ["", f"![constraint retention by turn]({stage['name']}_retention.png)"]
        if "rs_sft" in stage:
            rs = stage["rs_sft"]
            lines += ["", f"Kept {rs['kept']} of {rs['generated']} sampled dialogues ({rs['kept_share']:.0%}; "
                          f"{rs['deduplicated']} near-duplicates dropped), mean score {rs['mean_score']:.1f} -> kept "
                          f"{rs['mean_kept_score']:.1f}; distinct-2 {rs['diversity_generated']['distinct_2']:.3f} "
                          f"generated vs {rs['diversity_kept']['distinct_2']:.3f} kept, top opening share "
                          f"{rs['diversity_kept']['top_opening_share']:.0%}, self-similarity "
                          f"{rs['diversity_kept']['self_similarity']:.2f}.",
                      "", f"![dialogue scores, generated vs kept]({stage['name']}_scores.png)"]
            lines += ["", *[f"**Collapse warning**: {w}" for w in rs.get("collapse_warnings", [])]]
        if "train_time_s" in stage:
            lines += ["", f"Training time: {stage['train_time_s']:.0f} s, final loss {stage.get('final_loss', float('nan')):.3f}"]
        lines.append("")
    lines += ["## Loss curves", "", "![loss curves](loss_curves.png)", "",
              "![evaluation before and after each stage](eval_deltas.png)", ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | os.PathLike, plots: bool = True) -> None:
    """report.json, report.md and (with `plots`) loss_curves.png and eval_deltas.png in
    `out_dir`, each written atomically."""
    out = Path(out_dir)
    write_json_atomic(out / "report.json", report)
    if plots:
        plot_loss_curves(report["stages"], out / "loss_curves.png")
        plot_eval_deltas(report["stages"], out / "eval_deltas.png")
        for stage in report["stages"]:
            if "dialogues" in stage["eval_after"]:
                plot_retention(stage, out / f"{stage['name']}_retention.png")
    write_text_atomic(out / "report.md", render_markdown(report))
