"""`mdt`: the command-line entry point.

    mdt pipeline configs/pipelines/demo.yaml [--set stages.dacpt.train.steps=50]
    mdt train CONFIG [--set train.steps=10] [--resume]
    mdt train CONFIG --dry-run --world-size 64 --set parallel.tp=8 --set parallel.pp=4
    torchrun --nproc-per-node 8 -m megatron_domain.cli train CONFIG --set parallel.tp=8
    mdt eval CONFIG [--checkpoint RUN_OR_CKPT] [--suite NAME]  -> <run_dir>/eval.json (+ lm-eval suites)
    mdt lm-eval --model megatron-domain --model_args config=RUN/config.json --tasks ...  (lm-eval's CLI)
    mdt eval pick-base CONFIG --candidates A B C [--set-name domain]
    mdt convert hf-to-mdt HF_FOLDER CKPT_DIR | mdt convert mdt-to-hf RUN_OR_CKPT HF_FOLDER [--dtype bf16]
    mdt generate CONFIG --prompts in.jsonl --out out.jsonl [--checkpoint RUN_OR_CKPT]
    mdt serve RUN_OR_CKPT [--port 8000]                   -> OpenAI-compatible HTTP on 127.0.0.1
    mdt data preprocess --input a.jsonl b.txt --tokenizer tokenizer.json --output-prefix out/corpus
    mdt data demo-corpus --out-dir data/demo

Every command takes `--set a.b=c` overrides. Errors in input print one clear message (set
MDT_TRACEBACK=1 to see the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from megatron_domain.config import ConfigError, DemoDataConfig, load_config, load_pipeline, stage_names


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=10 (repeatable)")


def _cmd_pipeline(args: argparse.Namespace) -> int:
    from megatron_domain.eval.gates import verdict
    from megatron_domain.pipeline import run_pipeline

    pipe, stages = load_pipeline(args.config, args.overrides)
    report = run_pipeline(pipe, stages, progress=not args.no_progress, overwrite=args.overwrite, resume=args.resume,
                          continue_on_gate_failure=args.continue_on_gate_failure)
    print(f"report: {os.path.join(pipe.out_dir, 'report.md')}")
    if report.get("preempted"):
        return 0  # the scheduler's signal: checkpoint written, continue with --resume
    gates = [g for stage in report["stages"] for g in stage.get("gates", [])]
    for gate in gates:
        print(f"{verdict(gate)}: {gate['stage']}: {gate['description']}: {gate['before']:.4g} -> {gate['after']:.4g}")
    if report.get("stopped_by_gate"):
        stop = report["stopped_by_gate"]
        print(f"error: the pipeline stopped after stage {stop['stage']}: " + "; ".join(stop["failures"]), file=sys.stderr)
    # a failed stopping gate is an error even when --continue-on-gate-failure ran the rest; a
    # missed target (stop: false) is reported above and does not change the exit status
    return 1 if any(not g["passed"] and g["stop"] for g in gates) else 0


def _dry_run_world_size(cfg, requested: int) -> int:
    if requested:
        return requested
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    degrees = [cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp_shard, cfg.parallel.dp_replicate]
    if -1 in degrees:
        raise ValueError("--dry-run: a parallel degree is -1 (the rest of the world size); pass --world-size N "
                         "(e.g. 64 for 8 nodes x 8 GPUs)")
    return degrees[0] * degrees[1] * degrees[2] * degrees[3]


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from megatron_domain.parallel.plan import format_plan, plan_layout

        plan = plan_layout(cfg, _dry_run_world_size(cfg, args.world_size))
        print(format_plan(plan))
        print(json.dumps(plan))
        return 0
    from megatron_domain.engine import train

    result = train(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    print(json.dumps({"run_dir": str(result.run_dir), "final_loss": result.losses[-1] if result.losses else None,
                      "checkpoint": str(result.final_checkpoint), "preempted": result.preempted}))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from megatron_domain.eval.harness import run_eval

    cfg = load_config(args.config, args.overrides)
    print(json.dumps(run_eval(cfg, args.checkpoint, args.out, args.suite or None), indent=2))
    return 0


def _cmd_pick_base(args: argparse.Namespace) -> int:
    from megatron_domain.eval.harness import pick_base

    cfg = load_config(args.config, args.overrides)
    ranking = pick_base(cfg, args.candidates, args.set_name)
    for entry in ranking:
        print(f"{entry['rank']}. {entry['candidate']}: {args.set_name} ppl {entry['ppl']:.3f}")
    print(json.dumps({"best": ranking[0]["candidate"], "ranking": ranking}))
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from megatron_domain.data.preprocess import preprocess
    from megatron_domain.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer, args.eod_token, key="--tokenizer", eod_key="--eod-token")
    stats = preprocess(args.input, tokenizer, args.output_prefix, json_key=args.json_key,
                       progress=not args.no_progress)
    print(json.dumps({"output_prefix": args.output_prefix, **stats}))
    return 0


def _cmd_curate(args: argparse.Namespace) -> int:
    from megatron_domain.data.curate.config import load_curate_config
    from megatron_domain.data.curate.pipeline import run_curation

    overrides = args.overrides + ([f"executor={args.executor}"] if args.executor else [])
    cfg = load_curate_config(args.config, overrides)
    report = run_curation(cfg, progress=not args.no_progress)
    if "submitted" in report:
        print(json.dumps({"output_dir": cfg.output_dir, "executor": "slurm", **report,
                          "report": str(Path(cfg.output_dir) / "curation_report.md")}))
        return 0
    phases = report["phases"]
    last = phases[list(phases)[-1]]
    print(json.dumps({"output_dir": cfg.output_dir, "documents_read": report["read"]["documents"],
                      "documents_out": last["documents_out"], "report": str(Path(cfg.output_dir) / "curation_report.md"),
                      **({"indexed_dataset": report["tokenized"]["prefix"]} if report.get("tokenized") else {})}))
    return 0


def _cmd_train_quality(args: argparse.Namespace) -> int:
    from megatron_domain.data.curate.quality_model import read_labeled_texts, train_quality_classifier

    record = train_quality_classifier(read_labeled_texts(args.in_domain, args.text_key),
                                      read_labeled_texts(args.out_of_domain, args.text_key), args.output,
                                      heldout_fraction=args.heldout_fraction, epochs=args.epochs, lr=args.lr,
                                      word_ngrams=args.word_ngrams, dim=args.dim, seed=args.seed)
    print(json.dumps(record))
    return 0


def _cmd_tune_mixture(args: argparse.Namespace) -> int:
    from megatron_domain.data.curate.mixture import parse_candidates, parse_targets, simplex_grid, tune_mixture

    if args.stage:
        pipe, stages = load_pipeline(args.config, args.overrides)
        names = stage_names(pipe)
        if args.stage not in names:
            raise ValueError(f"--stage {args.stage!r}: not a stage of {args.config}; choose from {', '.join(names)}")
        cfg = stages[names.index(args.stage)]
    else:
        cfg = load_config(args.config, args.overrides)
    if len(cfg.data.corpora) < 2:
        raise ValueError(f"data.corpora: {len(cfg.data.corpora)} corpus in {args.config}; a mixture needs two or more")
    corpora = len(cfg.data.corpora)
    candidates = parse_candidates(args.candidates, corpora) if args.candidates else simplex_grid(corpora, args.grid)
    summary = tune_mixture(cfg, candidates, parse_targets(args.target, cfg), args.out_dir, args.steps,
                           progress=not args.no_progress)
    print(json.dumps({"best": summary["best"], "snippet": summary["snippet"], "plot": summary["plot"]}))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from megatron_domain.convert import hf_to_mdt, mdt_to_hf

    if args.direction == "hf-to-mdt":
        summary = hf_to_mdt(args.src, args.dst, dtype=args.dtype, verify=not args.no_verify, overwrite=args.overwrite)
    else:
        summary = mdt_to_hf(args.src, args.dst, config=args.config, tokenizer=args.tokenizer, dtype=args.dtype,
                            max_shard_size=args.max_shard_size, verify=not args.no_verify, lora_export=args.lora,
                            overwrite=args.overwrite)
    for key, ids in summary.get("ignored_source_token_ids", {}).items():
        print(f"note: the source model's {key} {ids} are not special tokens of the tokenizer (transformers' "
              "defaults?); not carried into the export")
    if "max_logit_diff" in summary:
        print(f"verified: max logit difference {summary['max_logit_diff']:.3g} (ours vs transformers, fp32)")
    else:
        print("NOT verified (--no-verify)")
    print(json.dumps(summary))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from megatron_domain.generate import run_generate

    cfg = load_config(args.config, args.overrides)
    summary = run_generate(cfg, args.prompts, args.out, args.checkpoint, progress=not args.no_progress)
    print(json.dumps(summary))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from megatron_domain.serve import serve

    serve(args.checkpoint, host=args.host, port=args.port, config=args.config, name=args.model_name,
          template=args.template, device=args.device, max_batch_sequences=args.max_batch_sequences)
    return 0


def _cmd_demo_corpus(args: argparse.Namespace) -> int:
    from megatron_domain.data.demo_corpus import prepare_demo_data

    manifest = prepare_demo_data(args.out_dir, DemoDataConfig(enabled=True, vocab_size=args.vocab_size),
                                 progress=not args.no_progress)
    print(json.dumps(manifest, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `mdt` argument parser."""
    parser = argparse.ArgumentParser(prog="mdt", description="megatron-domain: domain-specialized LLM training")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipeline", help="run a multi-stage pipeline (e.g. configs/pipelines/demo.yaml)")
    p.add_argument("config")
    p.add_argument("--overwrite", action="store_true",
                   help="stages whose run directory holds an earlier run: move it aside (<dir>.old-<time>) and rerun")
    p.add_argument("--resume", action="store_true",
                   help="skip complete stages whose config is unchanged, continue an interrupted stage from its last "
                        "checkpoint, rerun a changed stage and every stage after it")
    p.add_argument("--continue-on-gate-failure", action="store_true",
                   help="a stage's failed gate is reported but does not stop the pipeline")
    _add_set(p)
    p.set_defaults(func=_cmd_pipeline)

    p = sub.add_parser("train", help="train one stage")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="train.run_dir holds an earlier run: move it aside (<run_dir>.old-<time>) and start anew")
    p.add_argument("--dry-run", action="store_true",
                   help="print the parallel layout, layers and parameters per rank and memory per GPU; no training")
    p.add_argument("--world-size", type=int, default=0,
                   help="with --dry-run: the number of GPUs to plan for (default: $WORLD_SIZE or the product "
                        "of the parallel degrees)")
    _add_set(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="held-out perplexity -> <run_dir>/eval.json ('mdt eval pick-base ...' ranks bases)")
    p.add_argument("config")
    p.add_argument("--checkpoint", default=None, help="checkpoint or run directory (default: model.init_from)")
    p.add_argument("--out", default=None, help="output JSON (default <run_dir>/eval.json)")
    p.add_argument("--suite", action="append", default=[], metavar="NAME",
                   help="run only this eval.suites entry (repeatable; default: every suite)")
    _add_set(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("convert", help="Hugging Face folder <-> our checkpoint, verified by logits")
    p.add_argument("direction", choices=["hf-to-mdt", "mdt-to-hf"])
    p.add_argument("src", help="hf-to-mdt: an HF model folder; mdt-to-hf: a checkpoint or run directory")
    p.add_argument("dst", help="output directory (written under DST.tmp, renamed after verification)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="convert the weights to this dtype (default: keep the source dtype)")
    p.add_argument("--config", default=None, help="mdt-to-hf: the run config (default: found next to the checkpoint)")
    p.add_argument("--tokenizer", default=None,
                   help="mdt-to-hf: folder or tokenizer.json to carry over (default: the run's data.tokenizer)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty DST (after the new folder is verified); the source is never touched")
    p.add_argument("--max-shard-size", default="5GB", help="mdt-to-hf: largest safetensors shard (default 5GB)")
    p.add_argument("--lora", choices=["merge", "adapter"], default="merge",
                   help="mdt-to-hf of a LoRA run: merge the adapter into the base, or write a PEFT adapter")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the logit check (it needs two fp32 copies of the model in CPU memory)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser("generate", help="sample completions of a JSONL file of prompts (rollout.* sampling/backend)")
    p.add_argument("config", help="the run config (its model, tokenizer, chat template and rollout section)")
    p.add_argument("--prompts", required=True, help="JSONL: {\"messages\": [...]} or {\"prompt\": \"text\"} per line")
    p.add_argument("--out", required=True, help="output JSONL, one line per prompt with its completions")
    p.add_argument("--checkpoint", default=None, help="checkpoint or run directory (default: model.init_from)")
    _add_set(p)
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    p.add_argument("checkpoint", help="checkpoint or run directory (or an imported HF checkpoint)")
    p.add_argument("--config", default=None, help="the run config (default: the run's config.json)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", default="", help="the model id clients ask for (default: the checkpoint's name)")
    p.add_argument("--template", default="", help="chat template (default: the run's, else chatml)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-batch-sequences", type=int, default=64, help="sequences decoded together")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("preprocess", help="JSONL/text -> tokenized Megatron indexed dataset (.bin/.idx)")
    q.add_argument("--input", nargs="+", required=True, help="JSONL files ({\"text\": ...} per line) or text files")
    q.add_argument("--tokenizer", required=True, help="tokenizer.json or a Hugging Face model folder")
    q.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    q.add_argument("--json-key", default="text")
    q.add_argument("--eod-token", default="", help="end-of-document token (default: auto-detect)")
    q.set_defaults(func=_cmd_preprocess)
    q = data_sub.add_parser("curate", help="raw documents -> extracted, deduplicated, redacted, filtered corpus")
    q.add_argument("config", help="curation YAML (megatron_domain/data/curate/config.py)")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set workers=4 (repeatable)")
    q.add_argument("--executor", choices=["local", "slurm", "ray"], default="",
                   help="where the phases run (default: the config's `executor`, else local worker processes)")
    q.set_defaults(func=_cmd_curate)
    q = data_sub.add_parser("train-quality", help="train the fastText in-domain quality classifier curation uses")
    q.add_argument("--in-domain", nargs="+", required=True, help="JSONL files (or folders of them) of in-domain text")
    q.add_argument("--out-of-domain", nargs="+", required=True, help="JSONL files (or folders) of out-of-domain text")
    q.add_argument("--output", required=True, help="the model file (its held-out record goes to OUTPUT.json)")
    q.add_argument("--text-key", default="text")
    q.add_argument("--heldout-fraction", type=float, default=0.2)
    q.add_argument("--epochs", type=int, default=10)
    q.add_argument("--lr", type=float, default=0.5)
    q.add_argument("--word-ngrams", type=int, default=2)
    q.add_argument("--dim", type=int, default=64)
    q.add_argument("--seed", type=int, default=0)
    q.set_defaults(func=_cmd_train_quality)
    q = data_sub.add_parser("tune-mixture", help="pick data.corpora weights by short proxy trainings")
    q.add_argument("config", help="a run config, or a pipeline YAML with --stage")
    q.add_argument("--stage", default="", help="the stage of a pipeline YAML whose corpora are weighted")
    q.add_argument("--grid", type=int, default=4, help="weights in steps of 1/N, none at zero (default 4)")
    q.add_argument("--candidates", nargs="+", default=[], metavar="W1,W2,...", help="explicit weightings instead")
    q.add_argument("--target", action="append", default=[], metavar="SET=WEIGHT",
                   help="eval set and its weight in the objective (repeatable; default every set, weight 1)")
    q.add_argument("--steps", type=int, default=0, help="proxy training steps (default: the config's train.steps)")
    q.add_argument("--out-dir", default="runs/mixture")
    q.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    q.set_defaults(func=_cmd_tune_mixture)
    q = data_sub.add_parser("demo-corpus", help="extract and tokenize the embedded demo corpora")
    q.add_argument("--out-dir", required=True)
    q.add_argument("--vocab-size", type=int, default=2048)
    q.set_defaults(func=_cmd_demo_corpus)
    for action in list(sub.choices.values()) + list(data_sub.choices.values()):
        action.add_argument("--no-progress", action="store_true", help="no progress bars (setup, result and gate lines are still printed)")
    return parser


def build_pick_base_parser() -> argparse.ArgumentParser:
    """`mdt eval pick-base`: a separate parser, since `eval` takes the config positionally."""
    p = argparse.ArgumentParser(prog="mdt eval pick-base",
                                description="rank candidate base checkpoints by held-out in-domain perplexity")
    p.add_argument("config")
    p.add_argument("--candidates", nargs="+", required=True, help="checkpoint or run directories")
    p.add_argument("--set-name", default="domain", help="the eval set to rank by (default: domain)")
    _add_set(p)
    p.set_defaults(func=_cmd_pick_base)
    return p


def run_lm_eval_cli(argv: list[str]) -> int:
    """`mdt lm-eval ARGS`: lm-eval's own command line with our model type registered
    (`--model megatron-domain`), offline unless HF_HUB_OFFLINE / HF_DATASETS_OFFLINE say otherwise.
    `--local-data DIR` adds the local benchmark copies (mmlu_local, ...; eval/suites.py) read from DIR."""
    import tempfile
    from pathlib import Path

    from megatron_domain.config import EvalSuiteConfig
    from megatron_domain.eval.suites import LOCAL_TASKS, render_local_tasks, set_offline_defaults

    set_offline_defaults()
    with tempfile.TemporaryDirectory(prefix="mdt-lm-eval-tasks-") as tasks_dir:
        if "--local-data" in argv:
            at = argv.index("--local-data")
            if at + 1 >= len(argv):
                print("error: --local-data needs a folder", file=sys.stderr)
                return 2
            data_dir = argv[at + 1]
            argv = argv[:at] + argv[at + 2:]
            present = [name for name, task in LOCAL_TASKS.items()
                       if all((Path(data_dir) / task.splits[split]).is_file() for split in task.required)]
            if not present:
                print(f"error: --local-data {data_dir}: holds none of the local benchmark copies "
                      f"({', '.join(LOCAL_TASKS)}); see the README's 'Evaluation suites' for the layout",
                      file=sys.stderr)
                return 2
            render_local_tasks(EvalSuiteConfig(name="cli", tasks=present, data_dir=data_dir), "--local-data",
                               Path(tasks_dir))
            argv = argv + ["--include_path", tasks_dir]
        import megatron_domain.eval.lm_eval_model  # noqa: F401  (registers --model megatron-domain)
        from lm_eval._cli import HarnessCLI
        from lm_eval.utils import setup_logging

        setup_logging()
        parser = HarnessCLI()
        saved = sys.argv
        sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv (it inserts its default `run` command)
        try:
            parser.execute(parser.parse_args())
        finally:
            sys.argv = saved
            stop_child_processes()
    return 0


def stop_child_processes(timeout_s: float = 30.0) -> None:
    """Terminate (then kill) this process's multiprocessing children. With `--model vllm`
    lm-eval leaves vLLM's engine process running after the results are written (its model
    object is never released), and at interpreter exit multiprocessing joins that non-daemon
    process forever: measured, `mdt lm-eval --model vllm` wrote its results and then hung."""
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout_s)
        if child.is_alive():
            child.kill()
            child.join(timeout_s)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:
        return run_lm_eval_cli(argv[1:])
    if argv[:2] == ["eval", "pick-base"]:
        args = build_pick_base_parser().parse_args(argv[2:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, FileExistsError, KeyError, ModuleNotFoundError) as exc:
        if os.environ.get("MDT_TRACEBACK"):
            raise
        if isinstance(exc, ConfigError) and not exc.source and isinstance(getattr(args, "config", None), str):
            exc = ConfigError(exc.problems, args.config)  # e.g. a layout problem found once the world size is known
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
