#!/usr/bin/env python
"""DPO training throughput: our `dpo` mode against TRL's DPOTrainer on the same model, the same
pairs, the same optimizer and the same reference handling. Prints one JSON line.

    python tools/bench_dpo.py                      # Llama h512 x 6 layers, vocab 8192, fp32, 2 threads
    python tools/bench_dpo.py --steps 4 --prompt-len 8 32 --completion-len 4 16 --hidden 64 --layers 2   # quick

Setup: random Llama weights (hidden --hidden, --layers layers, vocab 8192) saved as a Hugging
Face folder that both load; `--steps x --pairs-per-step` random pairs with prompt and completion
lengths drawn uniformly from the given ranges, one epoch, AdamW (lr 1e-6, no weight decay, clip
1.0). Tokens are written as words of a word-level tokenizer ("w17 w5 ... eos"), so TRL's text
pipeline tokenizes them to exactly the ids our run reads pre-tokenized.

Runs (each in its own subprocess, so peak memory is its own):
- `ours`: frozen-copy reference, shared-prompt padding-free rows (our defaults);
- `trl`: TRL's defaults (a reference copy, padded [chosen; rejected] rows);
- `ours_precomputed` / `trl_precomputed`: reference log-probs computed before training.
tokens/s = (prompt + chosen + rejected tokens of all pairs) / wall time of the whole training
call (model load, reference log-probs and, for ours, the final checkpoint included). TRL's
`padding_free` is disabled in TRL 1.16 (it falls back to padding), so `trl_precomputed` is its
fastest setting. MFU-equivalent: tokens/s x 6 x (non-embedding + output) parameters / the
CPU's measured fp32 matmul peak.

Online (`--online`, runs `ours_online` and `trl_online`): `--steps` rounds of `--online-prompts`
prompts (random words, 32-64 tokens), 2 completions each of `--online-new-tokens` tokens
sampled at temperature 0.9, a reward function standing in for the judge (the number of
distinct words; ours calls it as a rubric `function` rule), one training step per round on the
round's pairs; TRL: `trl.experimental.online_dpo.OnlineDPOTrainer` generating with
transformers. Ours renders the prompts with the chatml template (a few tokens more) and uses
its native KV-cache sampler. prompts/s = prompts of all rounds / wall time of the training call.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing

EOS = "eos"
LR = 1e-6


def word_tokenizer(vocab: int, path: Path) -> None:
    """tokenizer.json of a word-level vocabulary: w0 .. w{vocab-2} and `eos` (one token per word)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    words = {f"w{i}": i for i in range(vocab - 1)}
    words[EOS] = vocab - 1
    tok = Tokenizer(WordLevel(words, unk_token=EOS))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.add_special_tokens([EOS])
    tok.save(str(path))


def make_pairs(count: int, vocab: int, prompt_len: tuple[int, int], completion_len: tuple[int, int],
               seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """Random (prompt, chosen, rejected) ids; completions end with the eos id (as TRL appends it)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        prompt = rng.integers(0, vocab - 1, rng.integers(prompt_len[0], prompt_len[1] + 1)).tolist()
        chosen, rejected = (rng.integers(0, vocab - 1, rng.integers(completion_len[0], completion_len[1])).tolist()
                            + [vocab - 1] for _ in range(2))
        out.append((prompt, chosen, rejected))
    return out


def words(ids: list[int], vocab: int) -> str:
    return " ".join(EOS if i == vocab - 1 else f"w{i}" for i in ids)


def prepare(root: Path, args) -> dict:
    """Tokenizer, pairs (ids and text) and the HF model folder."""
    import transformers

    vocab = args.vocab
    word_tokenizer(vocab, root / "tokenizer.json")
    pairs = make_pairs(args.steps * args.pairs_per_step, vocab, tuple(args.prompt_len), tuple(args.completion_len))
    with open(root / "pairs_ids.jsonl", "w") as f:
        for p, c, r in pairs:
            f.write(json.dumps({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r}) + "\n")
    with open(root / "pairs_text.jsonl", "w") as f:
        for p, c, r in pairs:
            f.write(json.dumps({"prompt": words(p, vocab), "chosen": " " + words(c, vocab),
                                "rejected": " " + words(r, vocab)}) + "\n")
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                      num_key_value_heads=args.hidden // 64, max_position_embeddings=1024,
                                      tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(root / "model")
    tokens = sum(len(p) + len(c) + len(r) for p, c, r in pairs)
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in pairs)
    return {"pairs": len(pairs), "tokens": tokens, "longest_sequence": longest,
            "padding_fraction_two_rows": padding_fraction(pairs, args.pairs_per_step)}


def padding_fraction(pairs, batch: int) -> float:
    """Share of padded positions in TRL's layout (2 x batch rows padded to the longest)."""
    padded = real = 0
    for start in range(0, len(pairs), batch):
        group = pairs[start:start + batch]
        lengths = [len(p) + len(c) for p, c, _ in group] + [len(p) + len(r) for p, _, r in group]
        padded += len(lengths) * max(lengths)
        real += sum(lengths)
    return 1 - real / padded


def our_model_section(root: Path) -> dict:
    """Our `model:` config for the shared HF folder (its shape, initialized from it)."""
    from megatron_domain.models.hf import model_config_from_hf, read_hf_config

    shape = vars(model_config_from_hf(read_hf_config(root / "model")))
    return {**{k: v for k, v in shape.items() if k != "rope_scaling"}, "init_from": f"hf:{root / 'model'}"}


def run_ours(root: Path, args, precomputed: bool) -> dict:
    from megatron_domain.config import config_from_dict
    from megatron_domain.engine import train

    model = our_model_section(root)
    cfg = config_from_dict({
        "mode": "dpo", "model": model,
        "data": {"tokenizer": str(root / "tokenizer.json"), "eod_token": EOS, "seq_len": 1024,
                 "chat": {"path": str(root / "pairs_ids.jsonl")}},
        "optim": {"lr": LR, "min_lr": LR, "warmup_steps": 0, "weight_decay": 0.0, "clip_grad": 1.0},
        "dpo": {"reference": "precomputed" if precomputed else "copy"},
        "kernels": {"linear_logprobs": "chunked"},
        "train": {"run_dir": str(root / ("ours_pre" if precomputed else "ours")), "steps": args.steps,
                  "micro_batch_size": args.pairs_per_step, "global_batch_size": args.pairs_per_step,
                  "device": "cpu", "progress": False, "num_threads": args.threads, "log_every": 1}})
    start = time.perf_counter()
    result = train(cfg)
    return {"wall_s": time.perf_counter() - start, "final_loss": result.losses[-1]}


def trl_inputs(root: Path, data_file: str):
    """(model, tokenizer, dataset) for a TRL trainer: the shared HF weights, the word-level
    tokenizer, and `data_file` of `root` as a datasets.Dataset."""
    import transformers
    from datasets import load_dataset

    model = transformers.AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(root / "tokenizer.json"), eos_token=EOS,
                                                     pad_token=EOS)
    return model, tokenizer, load_dataset("json", data_files=str(root / data_file), split="train")


def run_trl(root: Path, args, precomputed: bool) -> dict:
    import trl

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer, dataset = trl_inputs(root, "pairs_text.jsonl")
    config = trl.DPOConfig(output_dir=str(root / "trl_out"), per_device_train_batch_size=args.pairs_per_step,
                           gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=LR,
                           lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, beta=0.1,
                           max_length=None, precompute_ref_log_probs=precomputed, report_to="none", use_cpu=True,
                           bf16=False, save_strategy="no", logging_steps=args.steps, dataloader_num_workers=0,
                           disable_tqdm=True, dataset_num_proc=None)
    trainer = trl.DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    out = trainer.train()
    return {"wall_s": time.perf_counter() - start, "final_loss": float(out.training_loss)}


def distinct_words(fields: dict, answer: str) -> float:
    """The online benchmark's judge: the number of distinct words of an answer (ours: rubric function)."""
    return float(len(set(answer.split())))


def trl_distinct_words(prompts, completions, **kwargs) -> list[float]:
    """The same reward in TRL's reward-function signature."""
    return [distinct_words({}, c) for c in completions]


def online_prompts(root: Path, args) -> None:
    rng = np.random.default_rng(1)
    with open(root / "prompts.jsonl", "w") as f:
        for _ in range(args.steps * args.online_prompts):
            f.write(json.dumps({"prompt": words(rng.integers(0, args.vocab - 1, rng.integers(32, 65)).tolist(),
                                                args.vocab)}) + "\n")


def run_ours_online(root: Path, args) -> dict:
    from megatron_domain.config import config_from_dict
    from megatron_domain.engine import train

    model = our_model_section(root)
    cfg = config_from_dict({
        "mode": "dpo", "model": model,
        "data": {"tokenizer": str(root / "tokenizer.json"), "eod_token": EOS, "seq_len": 256,
                 "chat": {"template": "chatml"}},
        "optim": {"lr": LR, "min_lr": LR, "warmup_steps": 0, "weight_decay": 0.0, "clip_grad": 1.0},
        "rollout": {"max_new_tokens": args.online_new_tokens, "temperature": 0.9},
        "dpo": {"online": True, "prompts": str(root / "prompts.jsonl"), "rounds": args.steps,
                "prompts_per_round": args.online_prompts, "samples_per_prompt": 2, "steps_per_round": 1,
                "judge": {"kind": "rubric", "rules": [{"function": "bench_dpo:distinct_words"}]}},
        "kernels": {"linear_logprobs": "chunked"},
        "train": {"run_dir": str(root / "ours_online"), "steps": args.steps, "micro_batch_size": args.online_prompts,
                  "global_batch_size": args.online_prompts, "device": "cpu", "progress": False,
                  "num_threads": args.threads}})
    start = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - start
    rounds = [json.loads(line) for line in (root / "ours_online" / "rounds" / "summary.jsonl").read_text().splitlines()]
    return {"wall_s": wall, "final_loss": result.losses[-1], "generate_s": sum(r["generate_s"] for r in rounds),
            "pairs": sum(r["pairs"] for r in rounds)}


def run_trl_online(root: Path, args) -> dict:
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer, dataset = trl_inputs(root, "prompts.jsonl")
    config = OnlineDPOConfig(output_dir=str(root / "trl_online"), per_device_train_batch_size=args.online_prompts,
                             gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=LR,
                             lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, beta=0.1,
                             max_new_tokens=args.online_new_tokens, temperature=0.9, max_length=256,
                             report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                             logging_steps=args.steps, dataloader_num_workers=0, disable_tqdm=True)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=[trl_distinct_words], args=config, train_dataset=dataset,
                               processing_class=tokenizer)
    out = trainer.train()
    return {"wall_s": time.perf_counter() - start, "final_loss": float(out.training_loss)}


def worker(args) -> None:
    """One run in this process; prints its JSON."""
    root = Path(args.root)
    torch.set_num_threads(args.threads)
    if args.worker.endswith("_online"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # the rubric function's module
        result = (run_ours_online if args.worker.startswith("ours") else run_trl_online)(root, args)
    else:
        precomputed = args.worker.endswith("_precomputed")
        result = (run_ours if args.worker.startswith("ours") else run_trl)(root, args, precomputed)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[32, 256])
    parser.add_argument("--completion-len", type=int, nargs=2, default=[16, 256])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", default="ours,trl,ours_precomputed,trl_precomputed")
    parser.add_argument("--online", action="store_true", help="also compare online DPO (ours_online, trl_online)")
    parser.add_argument("--online-prompts", type=int, default=8, help="prompts per round (online)")
    parser.add_argument("--online-new-tokens", type=int, default=64, help="tokens per completion (online)")
    parser.add_argument("--out", default="", help="also append the JSON line to this file")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--root", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    from megatron_domain.metrics import machine_record, measured_matmul_flops

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        root = Path(tmp)
        record = {"bench": "dpo", "model": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                                            "dtype": "fp32"},
                  "steps": args.steps, "pairs_per_step": args.pairs_per_step, "prompt_len": args.prompt_len,
                  "completion_len": args.completion_len, **prepare(root, args), **machine_record()}
        runs = args.runs.split(",") + (["ours_online", "trl_online"] if args.online else [])
        if args.online:
            online_prompts(root, args)
            record["online"] = {"rounds": args.steps, "prompts_per_round": args.online_prompts, "completions": 2,
                                "new_tokens": args.online_new_tokens}
        from megatron_domain.models.hf import model_config_from_hf, read_hf_config
        from megatron_domain.models.llama import count_parameters

        counts = count_parameters(model_config_from_hf(read_hf_config(root / "model")))
        params = counts["non_embedding"]
        peak = measured_matmul_flops(torch.device("cpu"), torch.float32, min_seconds=1.0)
        try:
            import trl
            record["trl_version"] = trl.__version__
        except ImportError:
            record["trl_version"] = None
        for run in runs:
            if run.startswith("trl") and record["trl_version"] is None:
                record[run] = {"skipped": "trl is not installed (pip install trl)"}
                continue
            cmd = [sys.executable, __file__, "--worker", run, "--root", str(root), "--steps", str(args.steps),
                   "--pairs-per-step", str(args.pairs_per_step), "--threads", str(args.threads),
                   "--vocab", str(args.vocab), "--online-prompts", str(args.online_prompts),
                   "--online-new-tokens", str(args.online_new_tokens)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                record[run] = {"error": (proc.stderr or proc.stdout)[-2000:]}
                continue
            result = json.loads(lines[-1][len("RESULT "):])
            if run.endswith("_online"):
                result["prompts_per_s"] = args.steps * args.online_prompts / result["wall_s"]
            else:
                result["tokens_per_s"] = record["tokens"] / result["wall_s"]
                result["mfu_equiv"] = result["tokens_per_s"] * 6 * params / peak
            record[run] = result
        ratios = {}
        for ours, theirs in (("ours", "trl"), ("ours", "trl_precomputed"), ("ours_precomputed", "trl_precomputed")):
            if "tokens_per_s" in record.get(ours, {}) and "tokens_per_s" in record.get(theirs, {}):
                ratios[f"{ours}/{theirs}"] = {
                    "tokens_per_s": record[ours]["tokens_per_s"] / record[theirs]["tokens_per_s"],
                    "peak_rss": record[ours]["peak_rss_gb"] / record[theirs]["peak_rss_gb"]}
        if "prompts_per_s" in record.get("ours_online", {}) and "prompts_per_s" in record.get("trl_online", {}):
            ratios["ours_online/trl_online"] = {
                "prompts_per_s": record["ours_online"]["prompts_per_s"] / record["trl_online"]["prompts_per_s"],
                "peak_rss": record["ours_online"]["peak_rss_gb"] / record["trl_online"]["peak_rss_gb"]}
        record["ratios"] = ratios
        line = json.dumps(record)
        print(line)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
