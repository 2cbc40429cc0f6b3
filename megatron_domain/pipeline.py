"""`mdt pipeline`: run stages one after another, evaluating before and after each, and
write `<out_dir>/report.json`, `report.md` and `loss_curves.png`.

    mdt pipeline configs/pipelines/demo.yaml
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_domain.checkpoint import prepare_run_dir
from megatron_domain.config import DIALOGUE_METRICS, GENERATION_METRICS, Config, PipelineConfig, stage_names
from megatron_domain.data.demo_corpus import prepare_demo_data
from megatron_domain.data.demo_sft import build_demo_sft
from megatron_domain.engine import check_backends, train
from megatron_domain.eval.harness import evaluate_model, load_eval_model
from megatron_domain.eval.perplexity import write_json_atomic
from megatron_domain.eval.report import write_report
from megatron_domain.parallel.distributed import ensure_process_group, resolve_device
from megatron_domain.tracking import Trackers


def evaluate_stage_input(cfg: Config, device: torch.device) -> dict:
    """Perplexities of the model a stage starts from (its init_from, or its random init)."""
    model = load_eval_model(cfg, None, device)
    return evaluate_model(cfg, model, device, model if cfg.eval.generation.kl_samples else None)


def run_pipeline(pipe: PipelineConfig, stages: list[Config], progress: bool = True, overwrite: bool = False) -> dict:
    """Run every stage; returns the report dict (also written to disk). A stage whose run
    directory already holds checkpoints is refused unless `overwrite` (moved aside)."""
    for cfg in stages:  # every stage's backends, before any stage starts
        check_backends(cfg, resolve_device(cfg.train.device))
    out = Path(pipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if pipe.demo_data.enabled:
        if progress:
            tqdm.write(f"preparing the demo corpora in {out / 'data'} ...")
        prepare_demo_data(out / "data", pipe.demo_data, progress=progress)
        d = pipe.demo_data
        build_demo_sft(out / "data", d.sft_heldout_fraction, d.seed, d.sft_refusal_topics, d.rs_seeds,
                       d.rs_heldout_seeds, d.dialogue_turns)
    report: dict = {"out_dir": str(out), "stages": []}
    for name, cfg in zip(stage_names(pipe), stages):
        device = resolve_device(cfg.train.device)
        ensure_process_group(device)
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        prepare_run_dir(cfg.train.run_dir, resume=False, overwrite=overwrite)
        before = evaluate_stage_input(cfg, device)
        write_json_atomic(Path(cfg.train.run_dir) / "eval_before.json", before)
        start = time.perf_counter()
        result = train(cfg, progress=progress)
        train_time = time.perf_counter() - start
        reference = load_eval_model(cfg, None, device) if cfg.eval.generation.kl_samples else None
        after = evaluate_model(cfg, load_eval_model(cfg, str(result.final_checkpoint), device), device, reference)
        after["checkpoint"] = str(result.final_checkpoint)
        write_json_atomic(Path(cfg.train.run_dir) / "eval.json", after)
        if cfg.tracking.tensorboard or cfg.tracking.wandb:  # the stage's before/after eval next to its curves
            trackers = Trackers(cfg, cfg.train.run_dir)
            trackers.log_summary({"eval_before": before, "eval_after": after}, step=cfg.train.steps)
            trackers.close()
        entry = {"name": name, "mode": cfg.mode, "eval_before": before, "eval_after": after,
                 "run_dir": str(cfg.train.run_dir), "train_time_s": train_time, "final_loss": result.losses[-1]}
        if cfg.mode == "rs_sft":  # what was generated, kept and how diverse it is
            summary = json.loads((Path(cfg.train.run_dir) / "rs_sft.json").read_text())
            entry["rs_sft"] = {k: v for k, v in summary.items() if k not in ("scores", "kept_scores")}
            shutil.copyfile(Path(cfg.train.run_dir) / "rs_sft_scores.png", out / f"{name}_scores.png")
        report["stages"].append(entry)
        if progress:
            summary = ", ".join(f"{k}: {before['ppl'][k]:.1f} -> {after['ppl'][k]:.1f}" for k in after["ppl"])
            tqdm.write(f"[{name}] held-out perplexity {summary}")
            if "generation" in after:
                gb, ga = before["generation"], after["generation"]
                changes = ", ".join(f"{k.replace('_', ' ')} {gb[k]:.1%} -> {ga[k]:.1%}"
                                    for k in GENERATION_METRICS if k in ga and k in gb)
                kl = f", KL to the stage's start {ga['kl_to_reference']:.3f}" if "kl_to_reference" in ga else ""
                tqdm.write(f"[{name}] {changes}{kl}")
            if "dialogues" in after:
                db, da = before["dialogues"], after["dialogues"]
                tqdm.write(f"[{name}] dialogues: score {db['dialogue_score']:.1%} -> {da['dialogue_score']:.1%}, "
                           f"retention on late turns {db['late_retention']:.1%} -> {da['late_retention']:.1%}")
        write_report(report, out, plots=False)  # a partial report survives a failing later stage
    report["checks"] = evaluate_checks(pipe, report)
    write_report(report, out)
    return report


def evaluate_checks(pipe: PipelineConfig, report: dict) -> list[dict]:
    """Each configured check: what was measured vs its limit."""
    by_name = {s["name"]: s for s in report["stages"]}
    results = []
    for check in pipe.checks:
        stage = by_name[check.stage]
        if check.metric == "ppl":
            before, after = stage["eval_before"]["ppl"][check.set], stage["eval_after"]["ppl"][check.set]
            change = (after - before) / before
            bound = (f"at least {-check.max_change:.0%} lower" if check.max_change < 0
                     else f"at most {check.max_change:.0%} higher")
            results.append({"stage": check.stage, "set": check.set, "metric": "ppl", "max_change": check.max_change,
                            "measured": f"{change:+.1%} ({before:.2f} -> {after:.2f})", "change": change,
                            "passed": change <= check.max_change,
                            "description": f"{check.stage}: {check.set} perplexity {bound}"})
            continue
        section = "dialogues" if check.metric in DIALOGUE_METRICS else "generation"
        before = stage["eval_before"][section][check.metric]
        after = stage["eval_after"][section][check.metric]
        gain = after - before
        bounds = [f">= {check.min_after:.0%} after"] if check.min_after > 0 else []
        bounds.append(f"change {check.min_gain * 100:+.0f} points or more")
        if check.max_gain < 1.0:
            bounds.append(f"at most {check.max_gain * 100:+.0f} points")
        results.append({"stage": check.stage, "metric": check.metric, "min_after": check.min_after,
                        "min_gain": check.min_gain, "max_gain": check.max_gain,
                        "measured": f"{before:.1%} -> {after:.1%} ({gain * 100:+.1f} points)",
                        "passed": after >= check.min_after and check.min_gain <= gain <= check.max_gain,
                        "description": f"{check.stage}: {check.metric} {', '.join(bounds)}"})
    return results
