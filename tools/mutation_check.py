"""Mutation spot-check of the tests: plant plausible bugs in core functions, one at a time, in a
scratch copy of the repository, run the tests that should catch each, and report which bugs
the tests let through ("survivors").

    python tools/mutation_check.py                 # every mutation (about 20 minutes on 2 cores)
    python tools/mutation_check.py --list          # names only
    python tools/mutation_check.py --only sft-cursor-stuck lora-scaling-alpha

Each mutation is one exact text replacement in one file (it must match exactly once: a stale
mutation is reported, not silently skipped) plus the tests it is checked against: the fast
tests of the code it touches, and the small multi-process tests for parallel plans. The
unmutated tests run first; if they fail, nothing is reported. Prints one JSON line per
mutation and a summary line with the kill rate. Not part of CI: run it before closing work
on the core paths, and give every survivor a test or a reason.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    """One planted bug: replace `old` by `new` in `path`; `tests` should then fail."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


PACKING_TESTS = ("tests/test_model.py", "tests/test_kernels.py::test_pack_metadata_cpp_equals_reference")
CHAT_TESTS = ("tests/test_chat.py",)
DPO_TESTS = ("tests/test_kernels.py::test_dpo_losses_and_rewards_match_the_papers_formulas",
             "tests/test_dpo.py::test_loss_equals_trl_dpo_trainer")
CLUSTER = "tests/test_cluster.py"
TP_TESTS = ("tests/test_kernels.py::test_fused_cross_entropy_under_tensor_parallel_and_fsdp",)
EAGER_CE_TEST = "tests/test_kernels.py::test_linear_logprobs_loss_weights_compute_gradients_in_forward"

MUTATIONS = (
    # packing metadata and attention masks
    Mutation("pack-loss-crosses-documents", "megatron_domain/kernels/pack.py",
             "cu_seqlens=cu_seqlens, loss_mask=~is_eod)", "cu_seqlens=cu_seqlens, loss_mask=torch.ones_like(is_eod))",
             PACKING_TESTS),
    Mutation("pack-positions-do-not-restart", "megatron_domain/kernels/pack.py",
             "position_ids = index - start_index  # [B, S]", "position_ids = index  # [B, S]", PACKING_TESTS),
    Mutation("attention-crosses-documents", "megatron_domain/models/attention.py",
             "allowed = document_ids[:, :, None] == document_ids[:, None, :]  # [B, S, S]",
             "allowed = torch.ones_like(document_ids[:, :, None] == document_ids[:, None, :])  # [B, S, S]",
             ("tests/test_model.py", "tests/test_attention.py")),
    Mutation("shared-prompt-rejected-sees-chosen", "megatron_domain/models/attention.py",
             "allowed = allowed | (prefix_ids[:, :, None] == document_ids[:, None, :])  # [B, S, S]",
             "allowed = allowed | (prefix_ids[:, :, None] <= document_ids[:, None, :])  # [B, S, S]",
             ("tests/test_dpo.py::test_shared_prompt_layout_equals_two_rows", "tests/test_attention.py")),
    # SFT data: loss mask, positions, packing order, cursor
    Mutation("sft-loss-mask-shifted", "megatron_domain/data/chat.py",
             "out.loss_mask[r, pos:pos + n] = trained[1:]", "out.loss_mask[r, pos:pos + n] = trained[:-1]", CHAT_TESTS),
    Mutation("sft-positions-continue", "megatron_domain/data/chat.py",
             "out.position_ids[r, pos:pos + n] = np.arange(n)", "out.position_ids[r, pos:pos + n] = np.arange(pos, pos + n)",
             CHAT_TESTS),
    Mutation("sft-end-of-turn-not-trained", "megatron_domain/data/chat.py",
             "                end += len(marker)\n", "                pass\n", CHAT_TESTS),
    Mutation("bfd-first-fit", "megatron_domain/data/chat.py",
             "best = min(candidates, key=lambda r: room[r])", "best = candidates[0]", CHAT_TESTS),
    Mutation("bfd-not-decreasing", "megatron_domain/data/chat.py",
             "items.sort(key=lambda item: len(item[0]), reverse=True)", "items.sort(key=lambda item: len(item[0]))",
             CHAT_TESTS),
    Mutation("sft-cursor-stuck", "megatron_domain/stages/sft.py",
             "self.consumed_rows += self.global_batch", "self.consumed_rows += 0", ("tests/test_sft.py",)),
    Mutation("pretrain-cursor-stuck", "megatron_domain/stages/pretrain.py",
             "self.consumed_samples += self.global_batch", "self.consumed_samples += 0",
             ("tests/test_engine.py", "tests/test_data.py")),
    Mutation("dp-ranks-share-rows", "megatron_domain/stages/causal_lm.py",
             "start = consumed + dp_rank * per_rank", "start = consumed", ("tests/test_sft.py", "tests/test_data.py")),
    # losses
    Mutation("ce-mask-ignored", "megatron_domain/losses.py",
             "return (nll * mask).sum(), mask.sum()", "return nll.sum(), mask.sum()",
             ("tests/test_model.py", "tests/test_chat.py")),
    Mutation("dpo-rewards-without-beta", "megatron_domain/kernels/dpo.py",
             "rewards = beta * (policy_sums.detach() - reference_sums.detach())  # [2P]",
             "rewards = (policy_sums.detach() - reference_sums.detach())  # [2P]", DPO_TESTS),
    Mutation("ipo-target", "megatron_domain/losses.py",
             "return (h - 1 / (2 * beta)) ** 2", "return (h - 1 / beta) ** 2", DPO_TESTS),
    Mutation("hinge-without-beta", "megatron_domain/losses.py",
             "return torch.relu(1 - beta * h)", "return torch.relu(1 - h)", DPO_TESTS),
    Mutation("label-smoothing-sign", "megatron_domain/losses.py",
             "return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)",
             "return -(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)",
             DPO_TESTS),
    Mutation("robust-denominator", "megatron_domain/losses.py",
             "label_smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * label_smoothing)",
             "label_smoothing * F.logsigmoid(-beta * h)) / (1 - label_smoothing)", DPO_TESTS),
    Mutation("dpo-first-token-not-scored", "megatron_domain/data/preference.py",
             "index = np.concatenate([[predictor_of_first], start + np.arange(len(completion) - 1)])",
             "index = np.concatenate([[start], start + np.arange(len(completion) - 1)])",
             ("tests/test_dpo.py::test_pair_batch_scores_every_completion_token_at_its_predictor",
              "tests/test_dpo.py::test_shared_prompt_layout_equals_two_rows")),
    # LoRA
    Mutation("lora-scaling-alpha", "megatron_domain/models/lora.py",
             "self.scaling = alpha / rank", "self.scaling = alpha", ("tests/test_lora.py",)),
    Mutation("lora-dropout-in-eval", "megatron_domain/models/lora.py",
             "F.dropout(x, self.dropout, self.training)", "F.dropout(x, self.dropout, True)", ("tests/test_lora.py",)),
    # resume
    Mutation("rng-not-restored", "megatron_domain/checkpoint.py",
             "set_rng_state(load_rng_state(rng_file))", "load_rng_state(rng_file)", ("tests/test_lora.py",)),
    Mutation("mfu-draws-training-rng", "megatron_domain/metrics.py",
             "a = torch.randn(size, size, device=device, dtype=dtype, generator=private)  # [size, size]",
             "a = torch.randn(size, size, device=device, dtype=dtype)  # [size, size]", ("tests/test_lora.py",)),
    Mutation("optimizer-state-not-restored", "megatron_domain/checkpoint.py",
             "set_optimizer_state_dict(part, opt, {k: state[\"optim\"][k] for k in optim_sd}, options=_options())",
             "pass", ("tests/test_engine.py",)),
    Mutation("scheduler-not-restored", "megatron_domain/engine.py",
             "        scheduler.load_state_dict(extra[\"scheduler\"])\n", "        pass\n", ("tests/test_engine.py",)),
    Mutation("lr-warmup-off-by-one", "megatron_domain/optim.py",
             "return cfg.lr * (step + 1) / cfg.warmup_steps", "return cfg.lr * step / cfg.warmup_steps",
             ("tests/test_engine.py",)),
    # tensor / data parallel plans and gradient handling (small multi-process tests)
    Mutation("tp-down-proj-column-parallel", "megatron_domain/parallel/tensor.py",
             "\"mlp.down_proj\": RowwiseWithAdapter(output_layouts=residual),", "\"mlp.down_proj\": ColwiseWithAdapter(),",
             TP_TESTS),
    Mutation("tp-head-replicated-output", "megatron_domain/parallel/tensor.py",
             "plan[\"lm_head\"] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False)",
             "plan[\"lm_head\"] = ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=True)",
             TP_TESTS),
    Mutation("fsdp-gradients-not-rescaled", "megatron_domain/engine.py",
             "scale = pm.dims.dp / total_tokens", "scale = 1 / total_tokens", TP_TESTS),
    Mutation("clip-norm-of-one-pipeline-stage", "megatron_domain/parallel/grads.py",
             "        dist.all_reduce(squared, group=pp_group)\n", "        pass\n",
             ("tests/test_parallel.py::test_active_clipping_in_lora_layouts_matches_single_process",)),
    Mutation("dpo-pipeline-reference-is-the-policy", "megatron_domain/stages/dpo.py",
             "reference = self._pipeline_logps(self.ctx.model, rows, adapters_off=True)",
             "reference = self._pipeline_logps(self.ctx.model, rows, adapters_off=False)",
             ("tests/test_dpo.py::test_dpo_under_parallel_layouts_matches_one_process",)),
    # cluster behaviour: preemption, retention, resume checks, pipeline resume
    Mutation("preemption-decided-per-rank", "megatron_domain/cluster.py",
             "    dist.all_reduce(stacked, op=dist.ReduceOp.MAX)\n", "",
             (f"{CLUSTER}::test_sigusr1_to_a_torchrun_job_checkpoints_every_rank_and_resume_equals_straight",)),
    Mutation("retention-deletes-one-too-many", "megatron_domain/checkpoint.py",
             "doomed = [s for s in steps[:-keep_last]", "doomed = [s for s in steps[:-keep_last + 1]",
             (f"{CLUSTER}::test_keep_last_checkpoints_and_wall_time_checkpoints",)),
    Mutation("wall-clock-checkpoint-never-due", "megatron_domain/cluster.py",
             "return self.every_s > 0 and time.monotonic() - self.last >= self.every_s", "return False",
             (f"{CLUSTER}::test_keep_last_checkpoints_and_wall_time_checkpoints",)),
    Mutation("resume-ignores-the-data-seed", "megatron_domain/config.py",
             "RESUME_FIELDS = (\"mode\", \"data.corpora\", \"data.chat.path\", \"data.seed\",",
             "RESUME_FIELDS = (\"mode\", \"data.corpora\", \"data.chat.path\",",
             (f"{CLUSTER}::test_resume_with_another_data_stream_or_seed_names_the_fields",)),
    Mutation("pipeline-resume-keeps-a-changed-stage", "megatron_domain/pipeline.py",
             "    if changes:\n        shown", "    if False:\n        shown",
             (f"{CLUSTER}::test_pipeline_resume_after_a_kill_in_the_second_stage",)),
    # lm-eval adapter, gates and SFT replay
    Mutation("lm-eval-scores-one-position-late", "megatron_domain/eval/lm_eval_model.py",
             "start = len(inp) - len(cont)", "start = len(inp) - len(cont) + 1",
             ("tests/test_lm_eval.py::test_batched_scoring_equals_one_sequence_at_a_time",)),
    Mutation("lm-eval-no-left-truncation", "megatron_domain/eval/lm_eval_model.py",
             "inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for ctx, cont in rows]",
             "inputs = [(ctx + cont)[:-1] for ctx, cont in rows]",
             ("tests/test_lm_eval.py::test_batched_scoring_equals_one_sequence_at_a_time",)),
    Mutation("gate-max-drop-sign", "megatron_domain/eval/gates.py",
             "if not math.isnan(gate.max_drop) and -change > gate.max_drop + 1e-12:",
             "if not math.isnan(gate.max_drop) and change > gate.max_drop + 1e-12:",
             ("tests/test_lm_eval.py::test_gate_bounds",)),
    Mutation("gate-failure-does-not-stop", "megatron_domain/pipeline.py",
             "if stopping and not continue_on_gate_failure:", "if stopping and continue_on_gate_failure:",
             ("tests/test_lm_eval.py::test_a_failed_gate_stops_the_pipeline_with_a_message",)),
    Mutation("sft-replay-rows-repeat", "megatron_domain/stages/sft.py",
             "text = self.replay.micro_batch(index * self.replay_rows, self.replay_rows)",
             "text = self.replay.micro_batch(0, self.replay_rows)",
             ("tests/test_sft.py::test_sft_replay_mixes_raw_text_rows_and_resumes_exactly",)),
    Mutation("sft-replay-weight-ignored", "megatron_domain/stages/sft.py",
             'text = {**text, "loss_mask": text["loss_mask"].float() * self.replay_weight}  # [r, S] weights',
             'text = {**text, "loss_mask": text["loss_mask"].float()}  # [r, S] weights',
             ("tests/test_sft.py::test_sft_replay_loss_weight_is_a_weighted_token_mean",)),
    Mutation("citation-precision-over-gold", "megatron_domain/eval/domain_metrics.py",
             'result["citation_precision"] = hits / cited_total if cited_total else 0.0',
             'result["citation_precision"] = hits / sum(len(gold) for _, gold, _ in answerable)',
             ("tests/test_domain_metrics.py",)),
    Mutation("qa-normalize-keeps-articles", "megatron_domain/eval/domain_metrics.py",
             'return " ".join(ARTICLES.sub(" ", text).split())', 'return " ".join(text.split())',
             ("tests/test_domain_metrics.py",)),
    Mutation("under-refusal-inverted", "megatron_domain/eval/domain_metrics.py",
             'result["under_refusal"] = sum(not is_refusal(a, refusal, patterns) for a in unanswerable)',
             'result["under_refusal"] = sum(is_refusal(a, refusal, patterns) for a in unanswerable)',
             ("tests/test_domain_metrics.py",)),
    Mutation("pii-luhn-always-valid", "megatron_domain/data/curate/pii.py",
             "return len(digits) >= 13 and total % 10 == 0", "return len(digits) >= 13",
             ("tests/test_curate.py::test_pii_patterns_and_checksums",)),
    Mutation("pii-iban-no-checksum", "megatron_domain/data/curate/pii.py",
             'return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1', "return True",
             ("tests/test_curate.py::test_pii_patterns_and_checksums",)),
    Mutation("quality-threshold-keeps-all", "megatron_domain/data/curate/steps.py",
             'if doc.metadata["quality_score"] < self._threshold:', 'if doc.metadata["quality_score"] < 0.0:',
             ("tests/test_curate_quality.py::test_curation_drops_the_lowest_quarter",)),
    Mutation("quality-score-out-of-domain", "megatron_domain/data/curate/quality_model.py",
             "dict(zip(ls, ps)).get(LABEL_IN, 0.0)", "dict(zip(ls, ps)).get(LABEL_OUT, 0.0)",
             ("tests/test_curate_quality.py",)),
    Mutation("phone-no-digit-count", "megatron_domain/data/curate/pii.py",
             "return 8 <= sum(c.isdigit() for c in text) <= 15", "return True",
             ("tests/test_curate.py::test_pii_patterns_and_checksums",)),
    Mutation("regex-words-split-hyphens", "megatron_domain/data/curate/steps.py",
             """WORD = re.compile(r"\\w+(?:['’-]\\w+)*|[^\\w\\s]+")""", """WORD = re.compile(r"\\w+|[^\\w\\s]+")""",
             ("tests/test_curate.py::test_regex_word_tokenizer_agrees_with_datatrove_spacy_on_prose",)),
    Mutation("mixture-picks-the-worst", "megatron_domain/data/curate/mixture.py",
             'best = min(records, key=lambda r: r["objective"])', 'best = max(records, key=lambda r: r["objective"])',
             ("tests/test_mixture.py",)),
    Mutation("ner-ignores-placeholders", "megatron_domain/data/curate/ner.py",
             "if kind is None or any(start < t_end and t_start < end for t_start, t_end in taken):",
             "if kind is None:", ("tests/test_curate_ner.py",)),
    Mutation("dtype-auto-ignores-amx", "megatron_domain/precision.py",
             'fast = [flag for flag in ("amx_bf16", "avx512_bf16") if cpu[flag]]',
             'fast = [flag for flag in ("avx512_bf16",) if cpu[flag]]',
             ("tests/test_precision.py",)),
    Mutation("missed-target-exits-1", "megatron_domain/cli.py",
             'return 1 if any(not g["passed"] and g["stop"] for g in gates) else 0',
             'return 1 if any(not g["passed"] for g in gates) else 0',
             ("tests/test_lm_eval.py::test_a_failed_gate_stops_the_pipeline_with_a_message",)),
    # a stage's start eval taken from the previous stage's end
    Mutation("eval-reuse-ignores-perplexity", "megatron_domain/pipeline.py",
             "if abs(measured[k] - previous[k]) > rtol * abs(previous[k])]",
             "if abs(measured[k] - previous[k]) > 1e9 * abs(previous[k])]", ("tests/test_pipeline_eval.py",)),
    Mutation("eval-reuse-ignores-generation-settings", "megatron_domain/pipeline.py",
             'if now.eval.generation.path and gen_a == gen_b and "generation" in previous.eval_after:',
             'if now.eval.generation.path and "generation" in previous.eval_after:', ("tests/test_pipeline_eval.py",)),
    Mutation("eval-reuse-any-start", "megatron_domain/pipeline.py",
             "return init.resolve() == Path(checkpoint).resolve()", "return True", ("tests/test_pipeline_eval.py",)),
    # online DPO anchors
    Mutation("anchor-pair-swapped", "megatron_domain/stages/online.py",
             "best = (gap, (a, s) if scores[a] > scores[s] else (s, a))",
             "best = (gap, (s, a) if scores[a] > scores[s] else (a, s))",
             ("tests/test_dpo.py::test_anchor_completions_are_judged_with_the_samples",)),
    Mutation("anchor-without-end-of-turn", "megatron_domain/stages/online.py",
             "end = next((i + 1 for i, t in enumerate(token_ids) if t in stops), len(token_ids))",
             "end = next((i for i, t in enumerate(token_ids) if t in stops), len(token_ids))",
             ("tests/test_dpo.py::test_anchor_completions_are_judged_with_the_samples",)),
    Mutation("gold-answer-never-judged", "megatron_domain/stages/online.py",
             "+ ([(gold, GOLD)] if gold is not None else [])",
             "+ []",
             ("tests/test_dpo.py::test_gold_completions_are_chosen_against_the_worst_sample",)),
    Mutation("gold-in-the-mean-score", "megatron_domain/stages/online.py",
             'scores = [c["score"] for line in lines for c in line["completions"][:n]]',
             'scores = [c["score"] for line in lines for c in line["completions"]]',
             ("tests/test_dpo.py::test_gold_completions_are_chosen_against_the_worst_sample",)),
    Mutation("gold-correction-not-rejudged", "megatron_domain/stages/corrections.py",
             "if rescored.turn_scores[turn - 1] >= 1.0:", "if True:",
             ("tests/test_rs_sft.py::test_gold_corrections_replace_failed_turns_that_pass_the_rubric",)),
    Mutation("gold-correction-carries-over-turns", "megatron_domain/stages/corrections.py",
             "value = None if item is None else item.fields.get(key)",
             "value = seed.fields.get(key) if item is None else item.fields.get(key, seed.fields.get(key))",
             ("tests/test_rs_sft.py::test_gold_corrections_replace_failed_turns_that_pass_the_rubric",)),
    Mutation("gold-turns-not-trained", "megatron_domain/stages/rs_sft.py",
             "return [False] * opening + [passed or turn in gold for turn, passed in enumerate(generated, 1)]",
             "return [False] * opening + generated",
             ("tests/test_rs_sft.py::test_gold_corrections_replace_failed_turns_that_pass_the_rubric",
              "tests/test_rs_sft.py::test_rs_sft_trains_the_gold_answers_of_failed_turns")),
    Mutation("gold-corrections-not-kept", "megatron_domain/stages/rs_sft.py",
             "kept, counts = on_rank0(lambda: self._correct(kept))",
             "_, counts = on_rank0(lambda: self._correct(kept))",
             ("tests/test_rs_sft.py::test_rs_sft_trains_the_gold_answers_of_failed_turns",)),
    Mutation("gold-best-miss-is-the-worst", "megatron_domain/stages/online.py",
             "max(misses, key=lambda i: (scores[i], -i))", "min(misses, key=lambda i: (scores[i], i))",
             ("tests/test_dpo.py::test_gold_against_best_miss_pairs_the_gold_answer_with_the_hard_negative",)),
    Mutation("gold-both-replaces-a-right-sample", "megatron_domain/stages/online.py",
             "scores[gold] > max(scores[:sampled])", "scores[gold] >= max(scores[:sampled])",
             ("tests/test_dpo.py::test_gold_against_best_miss_pairs_the_gold_answer_with_the_hard_negative",)),
    Mutation("gold-chosen-counts-anchor-slot-only", "megatron_domain/stages/online.py",
             'for line in lines for built in (line["pair"], line.get("anchor_pair")))',
             'for line in lines for built in (line.get("anchor_pair"),))',
             ("tests/test_dpo.py::test_gold_against_best_miss_pairs_the_gold_answer_with_the_hard_negative",)),
    Mutation("demo-rs-seeds-in-four-phrasings", "megatron_domain/data/demo_sft.py",
             "return ([seed(i, TRAINING_PHRASINGS, 0, out_of_scope[0]) for i in range(count)],",
             "return ([seed(i, QUESTIONS, 0, out_of_scope[0]) for i in range(count)],",
             ("tests/test_demo_data.py",)),
    Mutation("rs-sft-replay-never-trained", "megatron_domain/stages/rs_sft.py",
             "self.use_conversations(ctx, conversations + replayed,",
             "self.use_conversations(ctx, conversations + replayed[:0],",
             ("tests/test_rs_sft.py::test_replayed_conversations_train_beside_the_kept_dialogues",)),
    Mutation("resume-counts-new-default-fields-as-changes", "megatron_domain/pipeline.py",
             "        return comparable_config(config_from_dict(data))",
             "        return data",
             ("tests/test_cluster.py::test_resume_counts_a_field_added_since_the_run_at_its_default",)),
    Mutation("cpu-bf16-rows-not-padded", "megatron_domain/precision.py",
             'return CPU_BF16_ROW_MULTIPLE if device.type == "cpu" and dtype == "bf16" else 1',
             'return CPU_BF16_ROW_MULTIPLE if device.type == "cuda" and dtype == "bf16" else 1',
             ("tests/test_precision.py",)),
    Mutation("mfu-against-the-fp32-rate-in-bf16", "megatron_domain/engine.py",
             'dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32',
             "dtype = torch.float32", ("tests/test_precision.py",)),
    Mutation("dpo-ignores-the-matmul-row-multiple", "megatron_domain/stages/dpo.py",
             "matmul_row_multiple(cfg.train.dtype, ctx.device))",
             "1)", ("tests/test_dpo.py::test_bf16_cpu_pads_the_pair_row_and_trains_as_unpadded",)),
    Mutation("attention-backward-refuses-head-dim-32", "megatron_domain/kernels/cpu_attention.py",
             "return q.dtype == torch.bfloat16 and q.shape[-1] % 32 == 0",
             "return q.dtype == torch.bfloat16 and q.shape[-1] % 64 == 0",
             ("tests/test_attention.py",)),
    Mutation("demo-dpo-prompts-without-gold", "megatron_domain/data/demo_sft.py",
             '"source": t, "answer": house_answer(sentence, t)}\n                    for t, sentence in pairs for',
             '"source": t}\n                    for t, sentence in pairs for',
             ("tests/test_demo_data.py",)),
    Mutation("gqa-native-heads-misgrouped", "megatron_domain/models/attention.py",
             "return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=native)",
             "return F.scaled_dot_product_attention(q, k.flip(1) if native else k, v, attn_mask=ctx.mask, "
             "enable_gqa=native)", ("tests/test_attention.py",)),
    # the demo's held-out split and phrasings
    Mutation("demo-heldout-phrasing-trained", "megatron_domain/data/demo_sft.py",
             "for template in QUESTIONS + mid_questions(topic, seed):",
             "for template in QUESTIONS + HELDOUT_QUESTIONS[:1] + mid_questions(topic, seed):",
             ("tests/test_demo_data.py",)),
    Mutation("demo-mid-phrasings-same-for-every-topic", "megatron_domain/data/demo_sft.py",
             'return tuple(random.Random(f"{seed}:{topic}").sample(MID_QUESTIONS, MID_PER_TOPIC))',
             "return tuple(MID_QUESTIONS[:MID_PER_TOPIC])",
             ("tests/test_demo_data.py",)),
    Mutation("demo-multi-turn-repeats-the-topic", "megatron_domain/data/demo_sft.py",
             "follow_ups = rng.sample([j for j in range(len(pairs)) if j != index], turns - 1)",
             "follow_ups = [index] * (turns - 1)", ("tests/test_demo_data.py",)),
    Mutation("demo-seeds-repeat-topic-sequences", "megatron_domain/data/demo_sft.py",
             'chosen = random.Random(f"dialogue:{offset}:{i}").sample(topics, turns)',
             "chosen = [topics[(offset + i * 11 + k * 7) % len(topics)] for k in range(turns)]",
             ("tests/test_demo_data.py",)),
    Mutation("demo-single-seeds-never-out-of-scope", "megatron_domain/data/demo_sft.py",
             "        if i % 2 == 0:\n            topic, sentence = rng.choice(pairs)",
             "        if True:\n            topic, sentence = rng.choice(pairs)", ("tests/test_demo_data.py",)),
    Mutation("demo-seeds-never-out-of-scope", "megatron_domain/data/demo_sft.py",
             "if oos_topics and i % 2 and turns > 2:", "if oos_topics and i % 2 and turns > 99:",
             ("tests/test_demo_data.py",)),
    # rs_sft rounds
    Mutation("rs-sft-rounds-never-regenerate", "megatron_domain/stages/rs_sft.py",
             "        if index != self.round:\n", "        if index != self.round and False:\n",
             ("tests/test_rs_sft.py::test_rs_sft_rounds_sample_from_the_trained_policy_and_resume_exactly",)),
    Mutation("rs-sft-round-steps-not-split", "megatron_domain/stages/rs_sft.py",
             "self.steps_per_round = (cfg.train.steps // r.rounds if", "self.steps_per_round = (cfg.train.steps if",
             ("tests/test_rs_sft.py::test_rs_sft_rounds_sample_from_the_trained_policy_and_resume_exactly",)),
    # the training step's speed paths (issue 17): compile, the CPU attention backward, the optimizer
    Mutation("compile-never-applied", "megatron_domain/parallel/apply.py",
             "if cfg.train.compile and compile_problem(cfg, dims) is None:",
             "if False and cfg.train.compile and compile_problem(cfg, dims) is None:",
             ("tests/test_compile.py::test_compile_wraps_every_decoder_layer_after_checkpointing",)),
    Mutation("compile-under-tensor-parallel", "megatron_domain/parallel/apply.py",
             "    if dims.tp > 1:\n        return (f\"train.compile left off", "    if False:\n        return (f\"train.compile left off",
             ("tests/test_compile.py::test_tensor_parallel_compile_falls_back_to_eager",)),
    Mutation("cpu-attention-never-used", "megatron_domain/models/attention.py",
             "if ctx.csrc_backward and runs_here(q):", "if False and ctx.csrc_backward and runs_here(q):",
             ("tests/test_attention.py::test_cpu_bf16_attention_backward_matches_reference_and_torch",)),
    Mutation("cpu-attention-forward-ignores-the-mask", "megatron_domain/kernels/cpu_attention.py",
             "    if mask is None:\n        out, lse", "    if True:\n        out, lse",
             ("tests/test_attention.py::test_cpu_bf16_attention_backward_matches_reference_and_torch",
              "tests/test_attention.py::test_cpu_flash_forward_kernels_match_reference")),
    Mutation("csrc-attention-forward-ignores-the-mask", "megatron_domain/kernels/cpu_attention.py",
             "attention_forward(q, k, v, mask, True,", "attention_forward(q, k, v, None, True,",
             ("tests/test_attention.py::test_cpu_flash_forward_kernels_match_reference",)),
    Mutation("adamw-never-fused-on-cpu", "megatron_domain/optim.py",
             'cpu_capabilities()["avx512f"])', 'cpu_capabilities()["avx512f"] and False)',
             ("tests/test_precision.py::test_adamw_is_fused_where_the_cpu_has_avx512_and_matches_foreach",)),
    # the fused cross-entropy (gradients in the forward pass; loss positions only)
    Mutation("fused-ce-never-eager", "megatron_domain/kernels/linear_logprobs.py",
             "eager = loss_weights is not None and", "eager = False and loss_weights is not None and",
             (EAGER_CE_TEST,)),
    Mutation("fused-ce-eager-scale-ignored", "megatron_domain/kernels/linear_logprobs.py",
             "if scale != 1.0:", "if False:", (EAGER_CE_TEST,)),
    Mutation("fused-ce-eager-trusts-any-gradient", "megatron_domain/kernels/linear_logprobs.py",
             "return float(scale) if torch.allclose(grad, scale * weights, rtol=1e-6, atol=0.0) else None",
             "return float(scale)",
             ("tests/test_kernels.py::test_linear_logprobs_loss_weights_fall_back_when_the_loss_is_other",)),
    Mutation("fused-step-scores-every-position", "megatron_domain/stages/causal_lm.py",
             "scored = mask.nonzero().squeeze(1)  # [M]", "scored = torch.arange(mask.numel())  # [M]",
             ("tests/test_kernels.py::test_fused_causal_lm_step_scores_only_the_loss_positions",)),
    Mutation("fused-ce-auto-under-pipeline-parallel", "megatron_domain/config.py",
             'return cfg.parallel.pp == 1 and cfg.kernels.linear_logprobs != "reference"',
             'return cfg.kernels.linear_logprobs != "reference"',
             ("tests/test_kernels.py::test_fused_cross_entropy_auto_is_on_where_it_runs",)),
    Mutation("demo-eval-asks-half-the-topics", "megatron_domain/data/demo_sft.py",
             "               for t, sentence in pairs for template in EVAL_QUESTIONS]\n",
             "               for t, sentence in pairs for template in EVAL_QUESTIONS if is_heldout(t, 0.5, seed)]\n",
             ("tests/test_demo_data.py::test_heldout_questions_and_topics_never_appear_in_training_data",)),
    Mutation("demo-dpo-prompts-sample-the-dpo-only-phrasings", "megatron_domain/data/demo_sft.py",
             "                    for t, sentence in pairs for template in DPO_EXTRA_QUESTIONS]",
             "                    for t, sentence in pairs for template in DPO_EXTRA_QUESTIONS[:8]]",
             ("tests/test_demo_data.py::test_dpo_prompts_carry_their_topics_reference_answer",)),
    # --no-progress drops the bars only: a batch job's log keeps the results
    Mutation("no-progress-hides-stage-results", "megatron_domain/pipeline.py",
             "        print_stage_summary(name, entry)  # results, not progress",
             "        progress and print_stage_summary(name, entry)  # results, not progress",
             ("tests/test_lm_eval.py::test_a_failed_gate_stops_the_pipeline_with_a_message",)),
    Mutation("no-progress-hides-dpo-round-lines", "megatron_domain/stages/online.py",
             "        if self.is_main:\n            tqdm.write(f\"[dpo] round {index}:",
             "        if self.show:\n            tqdm.write(f\"[dpo] round {index}:",
             ("tests/test_dpo.py::test_online_rounds_pair_best_and_worst_drop_ties_and_resume_exactly",)),
)


def scratch_copy(dst: Path) -> None:
    """The repository's tracked and untracked-but-not-ignored files, copied under `dst`, plus the
    built csrc extension (megatron_domain/_C*.so, ignored by git) when there is one: no mutation
    touches csrc/, and without it the tests of the code that calls the extension would skip."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            target = dst / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    for built in (REPO / "megatron_domain").glob("_C*.so"):
        shutil.copy2(built, dst / "megatron_domain" / built.name)


def run_tests(scratch: Path, tests: tuple[str, ...], timeout: int) -> tuple[int, str]:
    """pytest on `tests` with the scratch copy's package first on the path; (exit code, tail)."""
    env = {**os.environ, "PYTHONPATH": str(scratch), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                             cwd=scratch, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout} s"
    return run.returncode, (run.stdout + run.stderr)[-400:]


def check_imports_scratch(scratch: Path) -> None:
    """The tests must import the mutated package, not an installed copy."""
    env = {**os.environ, "PYTHONPATH": str(scratch)}
    found = subprocess.run([sys.executable, "-c", "import megatron_domain; print(megatron_domain.__file__)"],
                           cwd=scratch, env=env, capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(scratch.resolve()):
        raise SystemExit(f"mutation_check: megatron_domain imports from {found}, not the scratch copy {scratch}")


def apply(scratch: Path, mutation: Mutation) -> str | None:
    """Plant the mutation; returns the original text, or None when `old` is not found exactly once."""
    path = scratch / mutation.path
    text = path.read_text()
    if text.count(mutation.old) != 1:
        return None
    path.write_text(text.replace(mutation.old, mutation.new))
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=[], help="run these mutations (names from --list)")
    parser.add_argument("--list", action="store_true", help="print the mutation names and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run (default 900)")
    args = parser.parse_args()
    if args.list:
        for mutation in MUTATIONS:
            print(f"{mutation.name}: {mutation.path}")
        return 0
    unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}; see --list")
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    with tempfile.TemporaryDirectory(prefix="mdt-mutation-") as tmp:
        scratch = Path(tmp)
        scratch_copy(scratch)
        check_imports_scratch(scratch)
        baseline = tuple(sorted({t for m in chosen for t in m.tests}))
        code, tail = run_tests(scratch, baseline, args.timeout)
        if code != 0:
            print(f"mutation_check: the unmutated tests fail (exit {code}); fix them first:\n{tail}", file=sys.stderr)
            return 2
        results = []
        for mutation in chosen:
            start = time.perf_counter()
            original = apply(scratch, mutation)
            if original is None:
                result = {"mutation": mutation.name, "status": "stale", "file": mutation.path,
                          "why": "the text to replace is not in the file exactly once; update the mutation"}
            else:
                code, tail = run_tests(scratch, mutation.tests, args.timeout)
                (scratch / mutation.path).write_text(original)
                result = {"mutation": mutation.name, "status": "survived" if code == 0 else "killed",
                          "file": mutation.path, "tests": list(mutation.tests),
                          "seconds": round(time.perf_counter() - start, 1)}
                if code == 0:
                    result["why"] = "the tests pass with the bug planted: add a test that fails"
            results.append(result)
            print(json.dumps(result), flush=True)
    killed = sum(r["status"] == "killed" for r in results)
    summary = {"mutations": len(results), "killed": killed, "kill_rate": round(killed / max(len(results), 1), 3),
               "survivors": [r["mutation"] for r in results if r["status"] == "survived"],
               "stale": [r["mutation"] for r in results if r["status"] == "stale"]}
    print(json.dumps(summary))
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
