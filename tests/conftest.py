"""Shared fixtures: two small synthetic corpora ("alpha" and "beta", different word
distributions), a tokenizer trained on them, and a tiny-model config that trains in seconds."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from megatron_domain.config import config_from_dict
from megatron_domain.data.indexed import write_indexed_dataset
from megatron_domain.data.preprocess import tokenize_documents
from megatron_domain.data.tokenizer import train_bpe_tokenizer

# Test modules by their measured time on 2 cores (one process, 2026-12-03), slowest first:
# the xdist workers (pytest.ini) take whole modules in this order, so that no long module is
# left to run alone at the end; modules not named here follow in their usual order.
SLOWEST_MODULES = ("test_parallel", "test_demo", "test_rollout_vllm", "test_cluster", "test_lm_eval", "test_tools",
                   "test_dpo", "test_launch", "test_curate_slurm", "test_rollout_native", "test_fp8", "test_kernels",
                   "test_curate_quality", "test_rs_sft", "test_compile", "test_curate")


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pytest.ini): one worker per core, at most 4 (each peaks at ~2 GB and several
    tests start 2-8 processes of their own), at least 2; none (run in this process, with every
    core) when the command names tests of one module only, which one worker would take whole."""
    modules = {str(arg).split("::")[0] for arg in config.args}
    if len(modules) == 1 and next(iter(modules)).endswith(".py"):
        return 0
    return min(4, max(2, os.cpu_count() or 1))


def pytest_configure(config) -> None:
    """Under xdist, share the cores between the workers: each worker's torch (and every process
    it starts, through OMP_NUM_THREADS) gets cores / workers threads, instead of every process
    using all cores and the workers' OpenMP threads contending."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items) -> None:
    """Order the modules as SLOWEST_MODULES says (a stable sort: tests keep their order within a module)."""
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).stem, len(rank)))


ALPHA_WORDS = "the function returns a list of values from the module and raises an error when".split()
BETA_WORDS = "an expression evaluates to an object whose type determines the operations it supports".split()


def synthetic_documents(words: list[str], count: int, seed: int) -> list[str]:
    """`count` pseudo-sentences of 5..60 words drawn from `words`."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 60))) + "." for _ in range(count)]


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> dict:
    """Paths of the tokenizer and of train/held-out indexed datasets for both corpora."""
    root = tmp_path_factory.mktemp("corpora")
    alpha = synthetic_documents(ALPHA_WORDS, 300, seed=1)
    beta = synthetic_documents(BETA_WORDS, 300, seed=2)
    tok = train_bpe_tokenizer(alpha + beta, 400, root / "tokenizer.json")
    out = {"tokenizer": str(root / "tokenizer.json"), "eod_id": tok.eod_id, "vocab_size": tok.vocab_size}
    for name, docs in (("alpha", alpha), ("beta", beta)):
        for split, part in (("train", docs[:260]), ("heldout", docs[260:])):
            prefix = root / f"{name}_{split}"
            write_indexed_dataset(prefix, tokenize_documents(iter(part), tok, progress=False), tok.vocab_size)
            out[f"{name}_{split}"] = str(prefix)
    return out


def tiny_config_dict(corpora: dict, run_dir: Path | str, **train) -> dict:
    """A pretrain config of the tiny-test model over the synthetic blend (80% alpha, 20% beta)."""
    return {
        "mode": "pretrain",
        "model": {"preset": "tiny-test"},
        "data": {"tokenizer": corpora["tokenizer"], "seq_len": 64,
                 "corpora": [{"name": "alpha", "path": corpora["alpha_train"], "weight": 0.8},
                             {"name": "beta", "path": corpora["beta_train"], "weight": 0.2}]},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "train": {"run_dir": str(run_dir), "steps": 6, "micro_batch_size": 4, "global_batch_size": 4,
                  "device": "cpu", "progress": False, **train},
        "eval": {"sets": [{"name": "alpha", "path": corpora["alpha_heldout"]},
                          {"name": "beta", "path": corpora["beta_heldout"]}], "batch_size": 4},
    }


@pytest.fixture
def tiny_config(corpora, tmp_path):
    """Factory: tiny_config(**train_overrides) -> validated Config writing to tmp_path/run."""
    def make(run_name: str = "run", **train):
        return config_from_dict(tiny_config_dict(corpora, tmp_path / run_name, **train))
    return make


@pytest.fixture(autouse=True)
def _deterministic_threads():
    torch.set_num_threads(2)
    yield


CHAT_MODEL = {"preset": "tiny-test", "num_heads": 2, "num_kv_heads": 1}  # head_dim 32: vLLM's CPU kernels need >= 32


def chat_lines(count: int = 48) -> list[str]:
    """Conversations whose answers follow a fixed pattern (the topic word is echoed and cited)."""
    lines = []
    for i in range(count):
        word = ALPHA_WORDS[i % len(ALPHA_WORDS)]
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"what is {word}?"},
            {"role": "assistant", "content": f"the {word} returns a list. [source: `{word}`]"}]}))
    return lines


def chat_run_config(root: Path, name: str, tokenizer: str, chat_path: str, steps: int, **extra) -> dict:
    """A full fine-tuning (or, with lora=..., adapter) sft run of the chat test model."""
    cfg = {"mode": "sft", "model": dict(CHAT_MODEL),
           "data": {"tokenizer": tokenizer, "seq_len": 64, "chat": {"path": chat_path, "template": "chatml"}},
           "optim": {"lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "weight_decay": 0.0},
           "train": {"run_dir": str(root / name), "steps": steps, "micro_batch_size": 8, "global_batch_size": 8,
                     "device": "cpu", "progress": False, "seed": 3}}
    for key, value in extra.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory) -> dict:
    """A chat model trained for the rollout and serving tests: a BPE with <|im_start|>/<|im_end|>
    as special tokens, a 2-layer model SFT-trained (chatml) until it answers in the pattern and
    ends its turn, and a LoRA run on top of it. Returns paths and the run configs."""
    from megatron_domain.engine import train
    from megatron_domain.data.tokenizer import CHATML_SPECIALS

    root = tmp_path_factory.mktemp("chat_run")
    chat_path = root / "chat.jsonl"
    chat_path.write_text("\n".join(chat_lines()) + "\n")
    texts = synthetic_documents(ALPHA_WORDS, 200, seed=1) + [json.loads(line)["messages"][1]["content"]
                                                            for line in chat_lines()]
    train_bpe_tokenizer(texts, 400, root / "tokenizer.json", CHATML_SPECIALS)
    full = chat_run_config(root, "sft", str(root / "tokenizer.json"), str(chat_path), steps=60)
    train(config_from_dict(full))
    lora = chat_run_config(root, "lora", str(root / "tokenizer.json"), str(chat_path), steps=6,
                           model={"init_from": str(root / "sft")}, lora={"rank": 8, "dropout": 0.0},
                           optim={"lr": 5e-3, "min_lr": 5e-4})
    train(config_from_dict(lora))
    return {"root": root, "tokenizer": str(root / "tokenizer.json"), "chat_path": str(chat_path),
            "sft": str(root / "sft"), "lora": str(root / "lora"), "sft_config": full, "lora_config": lora}


def train_tp_splittable_chat_model(chat_run: dict, root: Path) -> str:
    """The chat test data on the tiny-test shape (4 heads, 2 KV heads: splits over tp=2), SFT
    for 30 steps; returns its run directory (for tests of online stages at tp=2)."""
    from megatron_domain.engine import train

    sft = chat_run_config(root, "sft4", chat_run["tokenizer"], chat_run["chat_path"], steps=30)
    sft["model"] = {"preset": "tiny-test"}
    train(config_from_dict(sft))
    return str(root / "sft4")


def naive_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """sum_i -log softmax(logits_i)[label_i], one position at a time with math.log / exp (an
    independent reference for the losses under test)."""
    import math

    total = 0.0
    for row, label in zip(logits.double().tolist(), labels.tolist()):
        top = max(row)
        log_norm = top + math.log(sum(math.exp(x - top) for x in row))
        total += log_norm - row[label]
    return total
