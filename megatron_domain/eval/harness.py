"""`mdt eval`: held-out perplexity of a checkpoint on the configured sets -> eval.json, and
`mdt eval pick-base`: rank candidate checkpoints by in-domain perplexity (lowest first)."""

from __future__ import annotations

from pathlib import Path

import torch

from megatron_domain.checkpoint import check_checkpoint_model, load_initial_weights, load_model_weights
from megatron_domain.config import CHAT_MODES, Config
from megatron_domain.data.tokenizer import load_tokenizer
from megatron_domain.eval.perplexity import evaluate_sets
from megatron_domain.files import write_json_atomic
from megatron_domain.eval.rubric import evaluate_generation
from megatron_domain.models.llama import build_model, materialize
from megatron_domain.models.lora import apply_lora, init_lora_weights
from megatron_domain.parallel.distributed import ensure_process_group, resolve_device


def load_eval_model(cfg: Config, checkpoint: str | None, device: torch.device) -> torch.nn.Module:
    """The model to evaluate: `checkpoint`, else `model.init_from`, else the seeded random init.
    A LoRA run (lora.rank > 0) is its base (`model.init_from`) plus the checkpoint's adapters."""
    model = build_model(cfg.model)
    if cfg.lora.rank > 0:
        apply_lora(model, cfg.lora.rank, cfg.lora.scale_alpha, cfg.lora.dropout, tuple(cfg.lora.targets))
    has_weights = bool(checkpoint or cfg.model.init_from)
    model = materialize(model, device, seed=None if has_weights else cfg.train.seed)
    if cfg.lora.rank > 0 and has_weights:
        init_lora_weights(model, cfg.train.seed)
    if cfg.model.init_from and (cfg.lora.rank > 0 or not checkpoint):
        load_initial_weights(cfg.model.init_from, [model], cfg.model)
    if checkpoint:
        check_checkpoint_model(cfg.model, checkpoint, "checkpoint")
        load_model_weights(checkpoint, [model], adapters_only=cfg.lora.rank > 0 and bool(cfg.model.init_from))
    return model.eval()


def evaluate_model(cfg: Config, model: torch.nn.Module, device: torch.device,
                   reference: torch.nn.Module | None = None, suites_dir: str | Path | None = None,
                   suites: list[str] | None = None, skip: frozenset[str] = frozenset()) -> dict:
    """Perplexity on every `eval.sets` entry with the config's tokenizer and sequence length;
    the generation eval when `eval.generation.path` is set (`reference`: the model the KL is
    measured against); the multi-turn eval when `eval.dialogues.seeds` is set; the lm-eval
    suites of `eval.suites` (only those named in `suites`, when given), their full results
    written to `suites_dir` (default: the run directory). `skip`: sections not to compute
    ("ppl", "generation", "dialogues")."""
    if not cfg.eval.sets:
        raise ValueError("eval.sets: no held-out sets configured; add entries {name, path}")
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
    seq_len = cfg.eval.seq_len or cfg.data.seq_len
    result = {} if "ppl" in skip else evaluate_sets(model, cfg.eval.sets, seq_len, tokenizer.eod_id,
                                                    cfg.eval.batch_size, device, cfg.eval.max_rows)
    gen = cfg.eval.generation
    if gen.path and "generation" not in skip:
        result["generation"] = evaluate_generation(model, tokenizer, gen.path, gen.template, gen.max_new_tokens,
                                                   device, gen.max_examples, gen.refusal, reference, gen.kl_samples,
                                                   gen.refusal_patterns)
    if cfg.eval.dialogues.seeds and "dialogues" not in skip:
        from megatron_domain.eval.dialogues import evaluate_dialogues

        result["dialogues"] = evaluate_dialogues(model, tokenizer, cfg.eval.dialogues, device, cfg.data.seq_len)
    if cfg.eval.suites and suites != []:
        from megatron_domain.eval.suites import evaluate_suites

        result["suites"] = evaluate_suites(cfg.eval.suites, model, tokenizer, suites_dir or cfg.train.run_dir,
                                           suites, cfg.data.chat.template if cfg.mode in CHAT_MODES else "")
    return result


def run_eval(cfg: Config, checkpoint: str | None = None, out_file: str | None = None,
             suites: list[str] | None = None) -> dict:
    """Evaluate and write `<run_dir>/eval.json` (or `out_file`): {"ppl": {set: value},
    "suites": {suite: {"task/metric": value}}, ...}; `suites`: only these of eval.suites
    (each suite's full lm-eval results go to lm_eval_<suite>.json beside the output)."""
    names = [s.name for s in cfg.eval.suites]
    unknown = [n for n in suites or [] if n not in names]
    if unknown:
        raise ValueError(f"--suite {', '.join(unknown)}: not in eval.suites ({', '.join(names) or 'none configured'})")
    device = resolve_device(cfg.train.device)
    ensure_process_group(device)
    model = load_eval_model(cfg, checkpoint, device)
    out = Path(out_file or Path(cfg.train.run_dir) / "eval.json")
    result = evaluate_model(cfg, model, device, suites_dir=out.parent, suites=suites)
    result["checkpoint"] = checkpoint or cfg.model.init_from or "random-init"
    write_json_atomic(out, result)
    return result


def pick_base(cfg: Config, candidates: list[str], set_name: str) -> list[dict]:
    """Rank candidate checkpoints (or run dirs) by held-out perplexity on `set_name`."""
    names = [s.name for s in cfg.eval.sets]
    if set_name not in names:
        raise ValueError(f"--set-name {set_name!r} is not among eval.sets ({', '.join(names) or 'none'})")
    device = resolve_device(cfg.train.device)
    ensure_process_group(device)
    ranking = []
    for candidate in candidates:
        model = load_eval_model(cfg, candidate, device)
        ppl = evaluate_model(cfg, model, device)["ppl"]
        ranking.append({"candidate": candidate, "ppl": ppl[set_name], "all_ppl": ppl})
    ranking.sort(key=lambda r: r["ppl"])
    for i, entry in enumerate(ranking):
        entry["rank"] = i + 1
    return ranking
