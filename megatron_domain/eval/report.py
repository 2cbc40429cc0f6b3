"""The pipeline report: report.json, a readable report.md, and a loss-curve PNG."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_domain.eval.perplexity import write_json_atomic
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
    fig.tight_layout()
    tmp = Path(str(out_file) + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_file)


def _pct(before: float, after: float) -> str:
    return f"{(after - before) / before:+.1%}"


def render_markdown(report: dict) -> str:
    """A table of perplexities before/after each stage, and the loss plot."""
    lines = ["# Pipeline report", "", f"Output directory: `{report['out_dir']}`", ""]
    for stage in report["stages"]:
        lines += [f"## {stage['name']} (`{stage['mode']}`)", "", f"Run directory: `{stage['run_dir']}`", "",
                  "| eval set | ppl before | ppl after | change |", "|---|---:|---:|---:|"]
        before, after = stage["eval_before"]["ppl"], stage["eval_after"]["ppl"]
        for name in after:
            lines.append(f"| {name} | {before[name]:.2f} | {after[name]:.2f} | {_pct(before[name], after[name])} |")
        if "generation" in stage["eval_after"]:
            gb, ga = stage["eval_before"].get("generation", {}), stage["eval_after"]["generation"]
            lines += ["", "| generation metric (greedy, held-out questions) | before | after |", "|---|---:|---:|"]
            for metric in ("format_adherence", "citation_accuracy"):
                lines.append(f"| {metric} | {gb.get(metric, float('nan')):.1%} | {ga[metric]:.1%} |")
            for sample in ga.get("samples", [])[:2]:
                lines += ["", f"> Q: {sample['prompt']}", f"> A: {sample['answer']}"]
        if "train_time_s" in stage:
            lines += ["", f"Training time: {stage['train_time_s']:.0f} s, final loss {stage.get('final_loss', float('nan')):.3f}"]
        lines.append("")
    if report.get("checks"):
        lines += ["## Checks", ""]
        for check in report["checks"]:
            lines.append(f"- {'PASS' if check['passed'] else 'FAIL'}: {check['description']} (measured {check['measured']})")
        lines.append("")
    lines += ["## Loss curves", "", "![loss curves](loss_curves.png)", ""]
    return "\n".join(lines)


def write_report(report: dict, out_dir: str | os.PathLike) -> None:
    """report.json, report.md and loss_curves.png in `out_dir` (each written atomically)."""
    out = Path(out_dir)
    write_json_atomic(out / "report.json", report)
    plot_loss_curves(report["stages"], out / "loss_curves.png")
    tmp = out / "report.md.tmp"
    tmp.write_text(render_markdown(report))
    os.replace(tmp, out / "report.md")
