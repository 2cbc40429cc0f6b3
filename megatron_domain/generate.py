"""`mdt generate CONFIG --prompts in.jsonl --out out.jsonl`: sample completions of a file of
prompts from a checkpoint, with the configured rollout backend and sampling.

    mdt generate runs/demo/sft/config.yaml --prompts questions.jsonl --out answers.jsonl \
        --checkpoint runs/demo/sft --set rollout.temperature=0.7 --set rollout.n=4

Input lines: {"messages": [...]} (chat, rendered with data.chat.template; the answer stops at
the end of turn) or {"prompt": "text"} (plain continuation), each with an optional "id" and
"seed". Output lines, one per prompt: {"id", "messages" | "prompt", "completions": [{"text",
"token_ids", "logprobs", "finish_reason"}]}. The model is `--checkpoint`, else model.init_from
(a LoRA run: its base plus the checkpoint's adapters). The output appears only when complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from tqdm import tqdm

from megatron_domain.config import Config
from megatron_domain.data.chat import load_template
from megatron_domain.data.tokenizer import load_tokenizer
from megatron_domain.rollout.policy import PolicyRollout, sampling_from_config
from megatron_domain.rollout.prompts import chat_prompt_ids, read_prompts


def run_generate(cfg: Config, prompts_path: str, out_path: str, checkpoint: str | None = None,
                 progress: bool = True) -> dict:
    """Generate for every prompt of `prompts_path`, write `out_path`; returns a summary."""
    from megatron_domain.eval.harness import load_eval_model
    from megatron_domain.parallel.distributed import ensure_process_group, resolve_device

    records = read_prompts(prompts_path)
    device = resolve_device(cfg.train.device)
    ensure_process_group(device)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
    template = load_template(cfg.data.chat.template, tokenizer.source) if any(r.messages for r in records) else None
    ids = [chat_prompt_ids(r.messages, template, tokenizer) if r.messages else tokenizer.tokenizer.encode(
        r.text, add_special_tokens=False).ids for r in records]
    model = load_eval_model(cfg, checkpoint, device)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix="mdt-generate-")  # the exported policy, for vLLM
    rollout = PolicyRollout(cfg, model, tokenizer, scratch.name, device)
    results: dict[int, list] = {}
    total_tokens = 0
    try:
        bar = tqdm(total=len(records) * cfg.rollout.n * cfg.rollout.max_new_tokens, unit="tok", disable=not progress,
                   desc=f"generate ({rollout.backend})", dynamic_ncols=True)
        for chat in (True, False):  # chat and plain prompts stop differently
            group = [i for i, r in enumerate(records) if bool(r.messages) == chat]
            if not group:
                continue
            params = sampling_from_config(cfg, tokenizer, chat)
            seeds = [records[i].seed if records[i].seed is not None else cfg.rollout.seed + i for i in group]
            done = rollout.generate([ids[i] for i in group], params, seeds, progress=bar.update)
            for c in done:
                results.setdefault(group[c.prompt_index], []).append(c)
                total_tokens += len(c.token_ids)
        elapsed = bar.format_dict["elapsed"]
        bar.close()
    finally:
        rollout.close()
        scratch.cleanup()
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as handle:
        for i, record in enumerate(records):
            line = {"id": record.id, **({"messages": record.messages} if record.messages else {"prompt": record.text}),
                    "completions": [{"text": c.text, "token_ids": c.token_ids, "logprobs": c.logprobs,
                                     "finish_reason": c.finish_reason} for c in results[i]]}
            handle.write(json.dumps(line, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return {"out": str(out), "prompts": len(records), "completions": sum(map(len, results.values())),
            "new_tokens": total_tokens, "tokens_per_s": total_tokens / elapsed if elapsed else 0.0,
            "backend": rollout.backend}
