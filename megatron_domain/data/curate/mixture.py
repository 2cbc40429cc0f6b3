"""`mdt data tune-mixture`: choose the weights of `data.corpora` by short proxy trainings.

    mdt data tune-mixture configs/pipelines/demo.yaml --stage dacpt --grid 4 --steps 60
    mdt data tune-mixture dacpt.yaml --candidates 0.9,0.1 0.7,0.3 0.5,0.5 --target domain=2 --target general=1

Each candidate weighting trains the run config (its model, optimizer, init_from: a small model
or the real stage shortened with `--steps`) for the same number of steps on the same data order
seed, then measures held-out perplexity on the config's `eval.sets`. The objective is the
weighted mean of the sets' log perplexities (`--target NAME=WEIGHT`, default every set at weight 1);
the lowest wins. Written to `--out-dir`: `mixture.json` (every candidate), `mixture.yaml` (the
winning `data.corpora`, to paste into the stage), `mixture.png` (perplexity per weighting).
A rerun reuses the candidates that already finished (`proxies/<i>/result.json`).

A grid (every weighting in steps of 1/N with no corpus at zero) over a few corpora is cheap
enough at proxy scale and, unlike a DoReMi-style reweighting, needs no reference model and
no mapping from target sets to training corpora; it is what we implemented.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

from megatron_domain.config import Config
from megatron_domain.files import write_json_atomic, write_text_atomic


def simplex_grid(corpora: int, divisions: int) -> list[list[float]]:
    """Every weighting of `corpora` corpora in steps of 1/divisions with all weights > 0."""
    if divisions < corpora:
        raise ValueError(f"--grid {divisions}: needs at least one step per corpus ({corpora} corpora)")
    grid = []
    for cuts in itertools.combinations(range(1, divisions), corpora - 1):
        bounds = (0, *cuts, divisions)
        grid.append([round((bounds[i + 1] - bounds[i]) / divisions, 6) for i in range(corpora)])
    return grid


def parse_candidates(texts: list[str], corpora: int) -> list[list[float]]:
    """`--candidates 0.9,0.1 ...`: one weight per corpus, each > 0, normalized to sum 1."""
    candidates = []
    for text in texts:
        try:
            weights = [float(w) for w in text.split(",")]
        except ValueError as exc:
            raise ValueError(f"--candidates {text!r}: not comma-separated numbers") from exc
        if len(weights) != corpora or min(weights) <= 0:
            raise ValueError(f"--candidates {text!r}: give {corpora} weights > 0, one per data.corpora entry")
        candidates.append([w / sum(weights) for w in weights])
    return candidates


def parse_targets(texts: list[str], cfg: Config) -> dict[str, float]:
    """`--target NAME=WEIGHT` over the config's eval sets (none given: every set at weight 1)."""
    names = [s.name for s in cfg.eval.sets]
    if not names:
        raise ValueError("eval.sets: empty; the proxies are compared on held-out perplexity of these sets")
    targets = {}
    for text in texts:
        name, _, weight = text.partition("=")
        if name not in names:
            raise ValueError(f"--target {text!r}: {name!r} is not an eval set; choose from {', '.join(names)}")
        targets[name] = float(weight or 1.0)
    return targets or {name: 1.0 for name in names}


def objective(ppl: dict[str, float], targets: dict[str, float]) -> float:
    """The weighted mean log perplexity over the target sets."""
    return sum(w * math.log(ppl[name]) for name, w in targets.items()) / sum(targets.values())


def proxy_config(cfg: Config, weights: list[float], run_dir: Path, steps: int) -> Config:
    """The run config with these corpus weights, `steps` steps, its own run directory."""
    proxy = copy.deepcopy(cfg)
    for corpus, weight in zip(proxy.data.corpora, weights):
        corpus.weight = weight
    proxy.train.run_dir = str(run_dir)
    proxy.train.steps = steps or proxy.train.steps
    proxy.train.checkpoint_every = 0
    proxy.eval.interval = 0
    proxy.eval.generation.path = ""
    return proxy


def run_proxy(cfg: Config, weights: list[float], run_dir: Path, steps: int, progress: bool) -> dict:
    """Train one proxy (or reuse its finished result) and measure its held-out perplexities."""
    from megatron_domain.engine import train
    from megatron_domain.eval.harness import load_eval_model
    from megatron_domain.eval.perplexity import evaluate_sets
    from megatron_domain.data.tokenizer import load_tokenizer
    from megatron_domain.parallel.distributed import resolve_device

    record_file = run_dir / "result.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        if record["weights"] == weights:
            return record
    proxy = proxy_config(cfg, weights, run_dir, steps)
    result = train(proxy, progress=progress, overwrite=True)
    device = resolve_device(proxy.train.device)
    model = load_eval_model(proxy, str(result.final_checkpoint), device)
    tokenizer = load_tokenizer(proxy.data.tokenizer, proxy.data.eod_token)
    evaluated = evaluate_sets(model, proxy.eval.sets, proxy.eval.seq_len or proxy.data.seq_len, tokenizer.eod_id,
                              proxy.eval.batch_size, device, proxy.eval.max_rows)
    record = {"weights": weights, "ppl": evaluated["ppl"], "final_loss": result.losses[-1] if result.losses else None}
    write_json_atomic(record_file, record)
    return record


def tune_mixture(cfg: Config, candidates: list[list[float]], targets: dict[str, float], out_dir: str | Path,
                 steps: int = 0, progress: bool = True) -> dict:
    """Train and measure every candidate; write mixture.json / .yaml / .png; returns the summary."""
    out = Path(out_dir)
    names = [c.name for c in cfg.data.corpora]
    records = []
    for i, weights in enumerate(candidates):
        record = run_proxy(cfg, weights, out / "proxies" / f"{i:02d}", steps, progress)
        record["objective"] = objective(record["ppl"], targets)
        records.append(record)
        if progress:
            ppl = ", ".join(f"{k} {v:.2f}" for k, v in record["ppl"].items())
            print(f"[tune-mixture] {i + 1}/{len(candidates)} {describe(names, weights)}: ppl {ppl}; "
                  f"objective {record['objective']:.4f}", flush=True)
    best = min(records, key=lambda r: r["objective"])
    summary = {"corpora": names, "targets": targets, "steps": steps or cfg.train.steps, "candidates": records,
               "best": best, "snippet": str(out / "mixture.yaml"), "plot": str(out / "mixture.png")}
    write_json_atomic(out / "mixture.json", summary)
    write_text_atomic(out / "mixture.yaml", snippet(cfg, best, targets, len(records)))
    plot_mixture(records, names, best, out / "mixture.png")
    return summary


def describe(names: list[str], weights: list[float]) -> str:
    """'domain 0.75 / general 0.25'."""
    return " / ".join(f"{n} {w:.2f}" for n, w in zip(names, weights))


def snippet(cfg: Config, best: dict, targets: dict[str, float], count: int) -> str:
    """The chosen `data.corpora` as YAML, with how it was chosen."""
    import yaml

    corpora = [{"name": c.name, "path": c.path, "weight": round(w, 4)} for c, w in zip(cfg.data.corpora, best["weights"])]
    header = (f"# mdt data tune-mixture: the best of {count} weightings by held-out perplexity "
              f"({', '.join(f'{k} x{v:g}' for k, v in targets.items())}); "
              f"ppl {', '.join(f'{k} {v:.3f}' for k, v in best['ppl'].items())}\n")
    return header + yaml.safe_dump({"data": {"corpora": corpora}}, sort_keys=False)


def plot_mixture(records: list[dict], names: list[str], best: dict, path: Path) -> None:
    """Held-out perplexity of every target set per candidate weighting (PNG, written atomically)."""
    import matplotlib

    from megatron_domain.eval.report import save_figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["\n".join(f"{w:.2f}" for w in r["weights"]) for r in records]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(records) + 2), 3.8))
    for name in records[0]["ppl"]:
        ax.plot(range(len(records)), [r["ppl"][name] for r in records], marker="o", label=f"{name} held-out ppl")
    ax.axvline(records.index(best), color="tab:red", linestyle="--", label="chosen")
    ax.set_xticks(range(len(records)), labels, fontsize=8)
    ax.set_xlabel("weights (" + " / ".join(names) + ")")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=8)
    save_figure(fig, path)
