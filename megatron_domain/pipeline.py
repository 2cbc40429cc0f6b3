"""`mdt pipeline`: run stages one after another, evaluating before and after each, and
write `<out_dir>/report.json`, `report.md` and `loss_curves.png`.

    mdt pipeline configs/pipelines/demo.yaml
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from megatron_domain.checkpoint import latest_checkpoint, prepare_run_dir
from megatron_domain.config import (CHAT_MODES, GENERATION_METRICS, Config, ConfigError, PipelineConfig, config_from_dict,
                                    stage_gates, stage_names, to_dict)
from megatron_domain.data.demo_corpus import prepare_demo_data
from megatron_domain.data.demo_sft import build_demo_sft
from megatron_domain.engine import check_backends, train
from megatron_domain.eval.gates import evaluate_gates, failure_message, verdict
from megatron_domain.eval.harness import evaluate_model, load_eval_model
from megatron_domain.files import write_json_atomic
from megatron_domain.eval.report import write_report
from megatron_domain.metrics import read_metrics
from megatron_domain.parallel.distributed import ensure_process_group, resolve_device
from megatron_domain.tracking import Trackers


def evaluate_stage_input(cfg: Config, device: torch.device, previous: PreviousStage | None = None,
                         stage: str = "") -> dict:
    """The eval of the model a stage starts from (its init_from, or its random init). Held-out
    perplexity is always measured; the generation, dialogue and suite sections are taken from
    the previous stage's eval of its final weights where this stage starts from those weights
    and would compute them with the same settings (see `reusable_sections`), and the perplexity
    measured here agrees with that eval's. The result's "reused" entry says what was taken."""
    model = load_eval_model(cfg, None, device)
    run_dir = Path(cfg.train.run_dir)
    sections = reusable_sections(cfg, previous)
    if not sections:
        return evaluate_model(cfg, model, device, model if cfg.eval.generation.kl_samples else None,
                              suites_dir=run_dir / "lm_eval_before")
    model_sections = frozenset({"generation", "dialogues"})  # computed on the model itself
    result = evaluate_model(cfg, model, device, suites=[], skip=model_sections)  # perplexity first
    mismatch = ppl_mismatch(result["ppl"], previous.eval_after["ppl"])
    if mismatch:
        print(f"[{stage}] not reusing {previous.name}'s eval of its final weights: {mismatch}", flush=True)
        sections = set()
    reference = model if cfg.eval.generation.kl_samples and "generation" not in sections else None
    rest_suites = [s.name for s in cfg.eval.suites if f"suite:{s.name}" not in sections]
    result.update(evaluate_model(cfg, model, device, reference, suites_dir=run_dir / "lm_eval_before",
                                 suites=rest_suites, skip=frozenset({"ppl"}) | (model_sections & sections)))
    reused = sorted(model_sections & sections)
    if "generation" in sections:
        result["generation"] = {k: v for k, v in previous.eval_after["generation"].items() if k != "kl_to_reference"}
        if cfg.eval.generation.kl_samples:
            result["generation"]["kl_to_reference"] = 0.0  # KL(pi || pi): the start is its own reference
    if "dialogues" in sections:
        result["dialogues"] = previous.eval_after["dialogues"]
    for suite in cfg.eval.suites:
        if f"suite:{suite.name}" not in sections:
            continue
        result.setdefault("suites", {})[suite.name] = previous.eval_after["suites"][suite.name]
        reused.append(f"suite:{suite.name}")
        source = Path(previous.run_dir) / "lm_eval_after" / f"lm_eval_{suite.name}.json"
        if source.is_file():  # lm-eval's full results beside this stage's, as if run here
            (run_dir / "lm_eval_before").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, run_dir / "lm_eval_before" / f"lm_eval_{suite.name}.json")
    if reused:
        result["reused"] = {"from": previous.name, "sections": reused}
    return result


@dataclass
class PreviousStage:
    """What the next stage may reuse of the stage before it: its config, run dir and eval_after."""

    name: str
    cfg: Config
    run_dir: str
    eval_after: dict


def starts_from(cfg: Config, checkpoint: str) -> bool:
    """Whether `cfg.model.init_from` names `checkpoint` (itself, or the run dir whose latest
    checkpoint it is)."""
    if not cfg.model.init_from or not checkpoint or cfg.model.init_from.startswith("hf:"):
        return False
    init = Path(cfg.model.init_from)
    if init.is_dir() and not (init / "model.yaml").is_file() and latest_checkpoint(init) is not None:
        init = latest_checkpoint(init)
    return init.resolve() == Path(checkpoint).resolve()


def reusable_sections(cfg: Config, previous: PreviousStage | None) -> set[str]:
    """The eval sections ("generation", "dialogues", "suite:<name>") of `previous.eval_after`
    that this stage's eval of its start would compute again: it starts from the previous
    stage's final checkpoint, with the same model, tokenizer and section settings (the KL
    sample count aside: the start's KL to itself is 0)."""
    if previous is None or not starts_from(cfg, previous.eval_after.get("checkpoint", "")):
        return set()
    before, now = previous.cfg, cfg
    model_a, model_b = to_dict(before.model), to_dict(now.model)
    model_a.pop("init_from", None)
    model_b.pop("init_from", None)
    if model_a != model_b or before.data.tokenizer != now.data.tokenizer or before.data.eod_token != now.data.eod_token:
        return set()
    sections = set()
    gen_a, gen_b = to_dict(before.eval.generation), to_dict(now.eval.generation)
    gen_a.pop("kl_samples")
    gen_b.pop("kl_samples")
    if now.eval.generation.path and gen_a == gen_b and "generation" in previous.eval_after:
        sections.add("generation")
    if (now.eval.dialogues.seeds and to_dict(before.eval.dialogues) == to_dict(now.eval.dialogues)
            and before.data.seq_len == now.data.seq_len and "dialogues" in previous.eval_after):
        sections.add("dialogues")
    template = [c.data.chat.template if c.mode in CHAT_MODES else "" for c in (before, now)]
    old_suites = {s.name: to_dict(s) for s in before.eval.suites}
    for suite in now.eval.suites:
        if (old_suites.get(suite.name) == to_dict(suite) and template[0] == template[1]
                and suite.name in previous.eval_after.get("suites", {})):
            sections.add(f"suite:{suite.name}")
    return sections


def ppl_mismatch(measured: dict, previous: dict, rtol: float = 1e-3) -> str:
    """Why a stage's start is not the previous stage's end by held-out perplexity ("" when the
    shared sets agree within `rtol`, as merged LoRA weights do)."""
    shared = [k for k in measured if k in previous]
    if not shared:
        return "no held-out set in common to compare"
    off = [f"{k} {measured[k]:.4g} vs {previous[k]:.4g}" for k in shared
           if abs(measured[k] - previous[k]) > rtol * abs(previous[k])]
    return f"perplexity differs ({', '.join(off)})" if off else ""


def run_pipeline(pipe: PipelineConfig, stages: list[Config], progress: bool = True, overwrite: bool = False,
                 resume: bool = False, continue_on_gate_failure: bool = False) -> dict:
    """Run every stage; returns the report dict (also written to disk). A stage whose run
    directory already holds checkpoints is refused unless `overwrite` (moved aside) or `resume`:
    then a complete stage with an unchanged config is skipped, an interrupted one continues
    from its last checkpoint, and a stage whose config changed is rerun with every stage after
    it (each decision is logged with its reason). A preempted stage ends the pipeline early
    (`report["preempted"]`); rerun it with `resume`. After each stage its gates are checked: a
    failed stopping gate ends the pipeline there (`report["stopped_by_gate"]`), unless
    `continue_on_gate_failure`."""
    for cfg in stages:  # every stage's backends, before any stage starts
        check_backends(cfg, resolve_device(cfg.train.device))
    out = Path(pipe.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if pipe.demo_data.enabled:
        tqdm.write(f"preparing the demo corpora in {out / 'data'} ...")
        manifest = prepare_demo_data(out / "data", pipe.demo_data, progress=progress)
        if "curation" in manifest:
            curation = manifest["curation"]
            print(f"[curate] domain corpus: {curation['summary']}; report: {curation['report']}", flush=True)
        d = pipe.demo_data
        build_demo_sft(out / "data", d.sft_heldout_fraction, d.seed, d.sft_refusal_topics, d.rs_seeds,
                       d.rs_heldout_seeds, d.dialogue_turns, d.rs_single_seeds)
    report: dict = {"out_dir": str(out), "stages": []}
    if pipe.demo_data.enabled and "curation" in manifest:
        report["curation"] = manifest["curation"]
    earlier_rerun = ""
    previous = None
    for name, cfg in zip(stage_names(pipe), stages):
        action, reason = stage_action(cfg, resume, earlier_rerun)
        if resume:
            print(f"[{name}] --resume: {action} ({reason})", flush=True)
        if action == "skip":
            entry = json.loads((Path(cfg.train.run_dir) / STAGE_RECORD).read_text())
        else:
            if action == "rerun":
                earlier_rerun = name
            entry = run_stage(name, cfg, out, progress, overwrite or action == "rerun", action == "resume", previous)
        if entry is None:
            report["preempted"] = name
            write_report(report, out, plots=False)
            print(f"[{name}] preempted: the finished stages and this stage's checkpoint are kept; continue with "
                  "`mdt pipeline CONFIG --resume`", flush=True)
            return report
        previous = PreviousStage(name, cfg, entry["run_dir"], entry["eval_after"])
        entry["gates"] = evaluate_gates(name, stage_gates(pipe, name), entry["eval_before"], entry["eval_after"])
        report["stages"].append(entry)
        print_stage_summary(name, entry)  # results, not progress: printed with --no-progress too (batch logs)
        stopping = [g for g in entry["gates"] if not g["passed"] and g["stop"]]
        if stopping and not continue_on_gate_failure:
            report["stopped_by_gate"] = {"stage": name, "failures": [failure_message(g) for g in stopping]}
            write_report(report, out)
            for gate in stopping:
                print(f"[{name}] {failure_message(gate)}", flush=True)
            print(f"[{name}] the pipeline stops here (the report marks the failed gate); rerun with "
                  "--continue-on-gate-failure to go on regardless", flush=True)
            return report
        write_report(report, out, plots=False)  # a partial report survives a failing later stage
    write_report(report, out)
    return report


STAGE_CONFIG = "stage_config.json"  # the stage's resolved config, written when it starts
STAGE_RECORD = "stage.json"  # its report entry, written when it is complete


def comparable_config(cfg: Config) -> dict:
    """A stage's config as resume compares it (without the progress-bar switch)."""
    data = to_dict(cfg)
    data["train"].pop("progress", None)
    return data


def stored_config(path: Path) -> dict:
    """A stage's stored config as resume compares it: read back through the current Config, so
    a field this version added (absent from a run written before it) counts at its default,
    not as a change. A stored config this version cannot read is compared as it is written."""
    data = json.loads(path.read_text())
    try:
        return comparable_config(config_from_dict(data))
    except (ConfigError, TypeError, ValueError):
        return data


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes.extend(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            changes.append(f"{prefix}{key}")
    return changes


def stage_action(cfg: Config, resume: bool, earlier_rerun: str) -> tuple[str, str]:
    """What `mdt pipeline --resume` does with a stage: ("run" | "skip" | "resume" | "rerun", why)."""
    run_dir = Path(cfg.train.run_dir)
    if not resume:
        return "run", "a new pipeline run"
    if not (run_dir / STAGE_CONFIG).is_file():
        return "run", "not started before"
    if earlier_rerun:
        return "rerun", f"stage {earlier_rerun} before it was rerun"
    changes = config_changes(stored_config(run_dir / STAGE_CONFIG), comparable_config(cfg))
    if changes:
        shown = ", ".join(changes[:8]) + (f" and {len(changes) - 8} more" if len(changes) > 8 else "")
        return "rerun", f"its config changed: {shown}"
    if (run_dir / STAGE_RECORD).is_file():
        return "skip", "complete, config unchanged"
    if latest_checkpoint(run_dir) is not None:
        return "resume", f"interrupted; continuing from {latest_checkpoint(run_dir).name}"
    return "rerun", "interrupted before its first checkpoint"


def run_stage(name: str, cfg: Config, out: Path, progress: bool, overwrite: bool, resume: bool,
              previous: PreviousStage | None = None) -> dict | None:
    """Evaluate the stage's input (reusing what it can of `previous`'s final eval), train,
    evaluate the result; returns the report entry (also written to `<run_dir>/stage.json`), or
    None when the stage was preempted."""
    stage_start = time.perf_counter()
    run_dir = Path(cfg.train.run_dir)
    device = resolve_device(cfg.train.device)
    ensure_process_group(device)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
    write_json_atomic(run_dir / STAGE_CONFIG, comparable_config(cfg))
    if resume and (run_dir / "eval_before.json").is_file():
        before = json.loads((run_dir / "eval_before.json").read_text())
    else:
        before = evaluate_stage_input(cfg, device, previous, name)
        if "reused" in before:
            tqdm.write(f"[{name}] eval of its start: {', '.join(before['reused']['sections'])} taken from "
                       f"{previous.name}'s final eval (same weights by held-out perplexity, same settings)")
        write_json_atomic(run_dir / "eval_before.json", before)
    start = time.perf_counter()
    result = train(cfg, resume=resume, progress=progress)
    train_time = time.perf_counter() - start
    if result.preempted:
        return None
    reference = load_eval_model(cfg, None, device) if cfg.eval.generation.kl_samples else None
    after = evaluate_model(cfg, load_eval_model(cfg, str(result.final_checkpoint), device), device, reference,
                           suites_dir=run_dir / "lm_eval_after")
    after["checkpoint"] = str(result.final_checkpoint)
    write_json_atomic(run_dir / "eval.json", after)
    if cfg.tracking.tensorboard or cfg.tracking.wandb:  # the stage's before/after eval next to its curves
        trackers = Trackers(cfg, run_dir)
        trackers.log_summary({"eval_before": before, "eval_after": after}, step=cfg.train.steps)
        trackers.close()
    records = read_metrics(run_dir)
    tokens = sum(r.get("tokens_per_s", 0.0) * r.get("step_time_s", 0.0) for r in records)
    entry = {"name": name, "mode": cfg.mode, "eval_before": before, "eval_after": after, "run_dir": str(run_dir),
             "train_time_s": train_time, "wall_time_s": time.perf_counter() - stage_start,
             "tokens": round(tokens), "tokens_per_s": tokens / train_time if train_time else 0.0,
             "final_loss": records[-1]["loss"]}
    if cfg.mode == "rs_sft":  # what was generated, kept and how diverse it is
        summary = json.loads((run_dir / "rs_sft.json").read_text())
        entry["rs_sft"] = {k: v for k, v in summary.items() if k not in ("scores", "kept_scores")}
        shutil.copyfile(run_dir / "rs_sft_scores.png", out / f"{name}_scores.png")
    write_json_atomic(run_dir / STAGE_RECORD, entry)
    return entry


def print_stage_summary(name: str, entry: dict) -> None:
    """The stage's before -> after numbers, one line per kind."""
    before, after = entry["eval_before"], entry["eval_after"]
    summary = ", ".join(f"{k}: {before['ppl'][k]:.1f} -> {after['ppl'][k]:.1f}" for k in after["ppl"])
    tqdm.write(f"[{name}] held-out perplexity {summary}")
    if "generation" in after:
        gb, ga = before["generation"], after["generation"]
        rubric, domain = GENERATION_METRICS[:4], GENERATION_METRICS[4:]
        for group, label in ((rubric, ""), (domain, "domain metrics: ")):
            changes = ", ".join(f"{k.replace('_', ' ')} {gb[k]:.1%} -> {ga[k]:.1%}" for k in group if k in ga and k in gb)
            kl = f", KL to the stage's start {ga['kl_to_reference']:.3f}" if group is rubric and "kl_to_reference" in ga else ""
            if changes:
                tqdm.write(f"[{name}] {label}{changes}{kl}")
    if "dialogues" in after:
        db, da = before["dialogues"], after["dialogues"]
        tqdm.write(f"[{name}] dialogues: score {db['dialogue_score']:.1%} -> {da['dialogue_score']:.1%}, "
                   f"retention on late turns {db['late_retention']:.1%} -> {da['late_retention']:.1%}")
    for suite, metrics in after.get("suites", {}).items():
        changes = ", ".join(f"{k} {before.get('suites', {}).get(suite, {}).get(k, float('nan')):.4g} -> {v:.4g}"
                            for k, v in metrics.items())
        tqdm.write(f"[{name}] suite {suite}: {changes}")
    for gate in entry.get("gates", []):
        tqdm.write(f"[{name}] gate {verdict(gate)}: {gate['description']} ({gate['before']:.4g} -> {gate['after']:.4g})")
