"""Evaluation suites: lm-evaluation-harness tasks run on a model of ours, offline.

A suite (`eval.suites` entry) names lm-eval tasks. Besides any task lm-eval knows (or finds
under the suite's `include_path`), these read local copies of the usual benchmarks from the
suite's `data_dir`; each is lm-eval's built-in task (same prompt, choices and metrics)
with its dataset pointed at local JSONL files, in the layout of the Hugging Face dataset:

    mmlu_local           <data_dir>/mmlu/test.jsonl (+ dev.jsonl for few-shot)    cais/mmlu "all"
    arc_easy_local       <data_dir>/arc_easy/test.jsonl (+ train.jsonl)            allenai/ai2_arc
    arc_challenge_local  <data_dir>/arc_challenge/test.jsonl (+ train.jsonl)       allenai/ai2_arc
    hellaswag_local      <data_dir>/hellaswag/validation.jsonl (+ train.jsonl)     Rowan/hellaswag
    gsm8k_local          <data_dir>/gsm8k/test.jsonl and train.jsonl (5-shot)      openai/gsm8k "main"
    demo_general_mc      <data_dir>/general_mc.jsonl   (the demo's suites, built by the pipeline:
    demo_domain_mc       <data_dir>/domain_mc.jsonl     pick a held-out passage's true continuation)

The task YAMLs are written per run (`<out>/lm_eval_tasks/`) with the paths filled in, and a
missing file is an error naming it before lm-eval starts: nothing is ever downloaded. The
Hugging Face offline switches (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) are set to 1 unless the
environment sets them, before `datasets` is first imported by this module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_domain.config import EvalSuiteConfig
from megatron_domain.files import write_json_atomic


@dataclass(frozen=True)
class LocalTask:
    """An lm-eval task over local files: `base` (a built-in task YAML, relative to lm-eval's
    tasks folder, included and overridden) or `config` (a whole task), and its splits as
    {split: file under data_dir}; `required` splits must exist."""

    base: str = ""
    config: dict = field(default_factory=dict)
    splits: dict = field(default_factory=dict)
    required: tuple = ()
    layout: str = ""


DEMO_MC_CONFIG = {
    "output_type": "multiple_choice", "test_split": "test",
    "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
    "metadata": {"version": 1.0},
}
MC_LAYOUT = 'one JSON object per line: {"context": str, "choices": [4 str], "label": 0-3}'

LOCAL_TASKS = {
    "mmlu_local": LocalTask(base="mmlu/default/_default_template_yaml",
                            splits={"test": "mmlu/test.jsonl", "dev": "mmlu/dev.jsonl"}, required=("test",),
                            layout='{"question", "subject", "choices": [4 str], "answer": 0-3} (cais/mmlu)'),
    "arc_easy_local": LocalTask(base="arc/arc_easy.yaml", splits={"test": "arc_easy/test.jsonl",
                                "train": "arc_easy/train.jsonl", "validation": "arc_easy/validation.jsonl"},
                                required=("test",),
                                layout='{"question", "choices": {"text": [...], "label": [...]}, "answerKey"} '
                                       '(allenai/ai2_arc)'),
    "arc_challenge_local": LocalTask(base="arc/arc_easy.yaml", splits={"test": "arc_challenge/test.jsonl",
                                     "train": "arc_challenge/train.jsonl",
                                     "validation": "arc_challenge/validation.jsonl"}, required=("test",),
                                     layout='{"question", "choices": {"text": [...], "label": [...]}, '
                                            '"answerKey"} (allenai/ai2_arc)'),
    "hellaswag_local": LocalTask(base="hellaswag/hellaswag.yaml", splits={"validation": "hellaswag/validation.jsonl",
                                 "train": "hellaswag/train.jsonl"}, required=("validation",),
                                 layout='{"ctx_a", "ctx_b", "activity_label", "endings": [4 str], "label"} '
                                        '(Rowan/hellaswag)'),
    "gsm8k_local": LocalTask(base="gsm8k/gsm8k.yaml", splits={"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"},
                             required=("test", "train"), layout='{"question", "answer"} (openai/gsm8k "main")'),
    "demo_general_mc": LocalTask(config=DEMO_MC_CONFIG, splits={"test": "general_mc.jsonl"}, required=("test",),
                                 layout=MC_LAYOUT),
    "demo_domain_mc": LocalTask(config=DEMO_MC_CONFIG, splits={"test": "domain_mc.jsonl"}, required=("test",),
                                layout=MC_LAYOUT),
}


def set_offline_defaults() -> None:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE = 1 unless already set (read when `datasets` and
    `huggingface_hub` are first imported)."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")


def lm_eval_tasks_dir() -> Path:
    """Where the installed lm-eval keeps its task YAMLs."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def render_local_tasks(suite: EvalSuiteConfig, where: str, out_dir: Path) -> Path:
    """Write the YAML of every local task the suite uses into `out_dir` (data paths filled in);
    raise FileNotFoundError naming the missing file and the expected layout."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = Path(suite.data_dir) if suite.data_dir else None
    for name in suite.tasks:
        task = LOCAL_TASKS.get(name)
        if task is None:
            continue
        if data_dir is None:
            raise ValueError(f"{where}.data_dir: task {name} reads local files; set data_dir to the folder "
                             f"holding {task.splits[task.required[0]]}")
        files = {split: data_dir / rel for split, rel in task.splits.items()}
        for split in task.required:
            if not files[split].is_file():
                raise FileNotFoundError(f"{where}: task {name} needs {files[split]}, which does not exist. "
                                        f"Expected layout under data_dir: {', '.join(task.splits.values())}; "
                                        f"{task.layout}. Nothing is downloaded: copy the data there first")
        present = {split: str(path) for split, path in files.items() if path.is_file()}
        body = ({"include": str(lm_eval_tasks_dir() / task.base)} if task.base else dict(task.config))
        body.update({"task": name, "dataset_path": "json", "dataset_name": None,
                     "dataset_kwargs": {"data_files": present}})
        if task.base:  # built-in splits the local copy lacks are switched off
            for key, split in (("training_split", "train"), ("validation_split", "validation"),
                               ("test_split", "test"), ("fewshot_split", "dev" if "dev" in task.splits else "train")):
                if split not in present:
                    body[key] = None
        tmp = out_dir / f"{name}.yaml.tmp"
        tmp.write_text(yaml.safe_dump(body, sort_keys=False))
        os.replace(tmp, out_dir / f"{name}.yaml")
    return out_dir


def flat_metrics(results: dict) -> dict[str, float]:
    """lm-eval's {"task": {"acc,none": 0.5, "acc_stderr,none": ...}} -> {"task/acc": 0.5};
    a filtered metric keeps its filter: "gsm8k_local/exact_match,strict-match"."""
    flat = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filter_name = key.split(",", 1)
            flat[f"{task}/{metric}" + ("" if filter_name == "none" else f",{filter_name}")] = float(value)
    return flat


def unknown_tasks(manager, tasks: list[str]) -> list[str]:
    """The names in `tasks` that a lm-eval TaskManager indexes as no task, group or tag."""
    return [t for t in tasks if t not in manager.all_subtasks and t not in manager.all_groups
            and t not in manager.all_tags]


def run_suite(suite: EvalSuiteConfig, lm, out_dir: str | os.PathLike, where: str = "eval.suites") -> dict:
    """Run one suite with lm-eval on `lm` (an lm_eval LM); write lm-eval's full results to
    `<out_dir>/lm_eval_<suite>.json`; returns {"task/metric": value}."""
    set_offline_defaults()
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = Path(out_dir)
    include = [str(render_local_tasks(suite, where, out / "lm_eval_tasks" / suite.name))]
    if suite.include_path:
        if not Path(suite.include_path).is_dir():
            raise FileNotFoundError(f"{where}.include_path: {suite.include_path} is not a folder of task YAMLs")
        include.append(suite.include_path)
    # lm-eval's own task index (13k YAMLs) takes ~17 s to build; index only the local tasks and
    # the include_path first, and lm-eval's tasks only when a task is not among them
    manager = TaskManager(include_path=include, include_defaults=False)
    if unknown_tasks(manager, suite.tasks):
        manager = TaskManager(include_path=include)
    unknown = unknown_tasks(manager, suite.tasks)
    if unknown:
        raise ValueError(f"{where}.tasks: lm-eval knows no task {', '.join(map(repr, unknown))} (local tasks: "
                         f"{', '.join(LOCAL_TASKS)}; or add your own YAMLs under include_path)")
    output = lm_eval.simple_evaluate(model=lm, tasks=list(suite.tasks), task_manager=manager,
                                     num_fewshot=None if suite.num_fewshot < 0 else suite.num_fewshot,
                                     limit=suite.limit or None, log_samples=suite.log_samples,
                                     apply_chat_template=suite.apply_chat_template, random_seed=0,
                                     numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
                                     bootstrap_iters=0)
    write_json_atomic(out / f"lm_eval_{suite.name}.json", json.loads(json.dumps(output, default=str)))
    return flat_metrics(output["results"])


def evaluate_suites(suites: list[EvalSuiteConfig], model, tokenizer, out_dir: str | os.PathLike,
                    names: list[str] | None = None, chat_template: str = "") -> dict[str, dict]:
    """Every suite (or those in `names`) on an in-memory model: {suite: {"task/metric": v}}."""
    set_offline_defaults()
    try:
        from megatron_domain.eval.lm_eval_model import MegatronDomainLM
    except ModuleNotFoundError as exc:
        if exc.name != "lm_eval" and not str(exc.name).startswith("lm_eval."):
            raise
        raise ModuleNotFoundError(f"eval.suites ({', '.join(s.name for s in suites)}) run on lm-evaluation-harness, "
                                  "which is not installed: pip install -e '.[eval]' (or remove eval.suites)") from exc

    chosen = [s for s in suites if names is None or s.name in names]
    results = {}
    for suite in chosen:
        lm = MegatronDomainLM(model=model, tokenizer=tokenizer, batch_size=suite.batch_size,
                              max_length=suite.max_length or None, chat_template=chat_template)
        results[suite.name] = run_suite(suite, lm, out_dir, f"eval.suites[{suite.name}]")
    return results
