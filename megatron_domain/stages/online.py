"""Online rounds for the `dpo` mode: each round samples `dpo.samples_per_prompt` completions of
`dpo.prompts_per_round` prompts from the current policy (rollout.*: temperature, top-p, max new
tokens, stop at the end of turn), scores them with the judge (`dpo.judge`), and pairs the best
against the worst completion of each prompt. Ties and pairs whose scores differ by less than
`dpo.min_score_margin` are dropped (counted in the round's summary). `dpo.anchors` (fixed
completions such as the house refusal) are judged with every prompt's samples and give a
second pair per prompt: the anchor against the sample farthest from it in score. A rule's
right answer is then chosen before the policy ever samples it, and rejected where it is wrong,
while the sampled pair keeps teaching what separates the samples (e.g. the right citation).
`dpo.gold_field` does the same with each prompt's own known-good completion (a key of its
prompt-file line): where every sample misses, the gold answer is chosen against the worst one,
or with `dpo.gold_against: best_miss` against the best sample it outranks (the hard negative;
`both` also puts it on the chosen side of a sampled pair of misses).

Everything a round generates is written, before training on it, to
`<run_dir>/rounds/<n>.jsonl` (one line per prompt: messages, fields, every completion with its
token ids, their log-probs under the sampling policy, score and rationale, and the pair built),
plus a line in `rounds/summary.jsonl` (with the vLLM backend also the weight sync's time and
probe difference). A
round file that exists is read instead of generated, so a resumed run trains on exactly the
rounds it generated before, and a round can be re-trained offline. Sampling seeds depend only
on (rollout.seed, round, prompt), so regenerating a round from the same weights is exact.

Under a parallel layout every rank generates (the forwards are collective), rank 0 judges and
writes, and every rank reads the file back.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from megatron_domain.files import write_jsonl_atomic
from megatron_domain.data.chat import ChatTemplate
from megatron_domain.data.preference import PreferencePair, fit_pair
from megatron_domain.judges import JudgeResult, build_judge, merge_stats, score_all
from megatron_domain.rollout.policy import PolicyRollout, on_rank0, sampling_from_config
from megatron_domain.rollout.prompts import PromptRecord, chat_prompt_ids, read_prompts, stop_conditions
from megatron_domain.rollout.sampling import Completion
from megatron_domain.stages import StageContext


def prompt_messages(record: PromptRecord) -> list[dict]:
    """A prompt as chat messages (a plain `prompt` text is one user turn)."""
    return record.messages if record.messages is not None else [{"role": "user", "content": record.text}]


def best_and_worst(scores: list[float], min_margin: float) -> tuple[int, int] | str:
    """(chosen, rejected) indices: the first best and the last worst; or why no pair is built
    (`tie`: all scores equal; `margin`: best - worst < min_margin)."""
    top, bottom = max(scores), min(scores)
    if top == bottom:
        return "tie"
    if top - bottom < min_margin:
        return "margin"
    return scores.index(top), len(scores) - 1 - scores[::-1].index(bottom)


def anchor_pair(scores: list[float], sampled: int, min_margin: float) -> tuple[int, int] | None:
    """(chosen, rejected) pairing an anchor (index >= `sampled`) with the sample whose score is
    farthest from it, the higher one chosen: the best sample against an anchor the judge ranks
    low, an anchor the judge ranks high against the worst sample. Over several anchors the
    widest gap; None when no gap reaches max(min_margin, >0)."""
    best = None
    for a in range(sampled, len(scores)):
        for s in (max(range(sampled), key=lambda i: (scores[i], -i)), min(range(sampled), key=lambda i: (scores[i], i))):
            gap = abs(scores[a] - scores[s])
            if gap > 0 and gap >= min_margin and (best is None or gap > best[0]):
                best = (gap, (a, s) if scores[a] > scores[s] else (s, a))
    return None if best is None else best[1]


def best_miss_pair(scores: list[float], sampled: int, gold: int, min_margin: float) -> tuple[int, int] | None:
    """(gold, the best sample the judge ranks below it): the hard negative, e.g. a well-formed
    answer citing the wrong section rather than a derailed one; None when every sample scores
    at least as high as the gold completion less max(min_margin, >0)."""
    misses = [i for i in range(sampled) if scores[gold] - scores[i] > 0 and scores[gold] - scores[i] >= min_margin]
    return (gold, max(misses, key=lambda i: (scores[i], -i))) if misses else None


def round_record(round_index: int, record: PromptRecord, prompt_ids: list[int], samples: list[Completion],
                 judged: JudgeResult, min_margin: float, sampled: int | None = None,
                 gold_against: str = "worst") -> dict:
    """One prompt's line of a round file: the sampled pair (best vs worst of the first
    `sampled` completions, default all) and, when anchors follow them, the anchor pair; with
    `gold_against: best_miss` a gold completion the judge ranks above a sample is paired
    against the best such sample instead; `both`: that too, and where it outranks every sample
    it also replaces the sampled pair's chosen side (gold vs worst, gold vs best miss)."""
    sampled = len(samples) if sampled is None else sampled
    scores = [float(s) for s in judged.scores]
    pair = best_and_worst(scores[:sampled], min_margin)
    line = {"round": round_index, "prompt_id": record.id, "messages": prompt_messages(record), "fields": record.fields,
            "prompt_ids": prompt_ids,
            "completions": [{"text": c.text, "token_ids": c.token_ids, "logprobs": c.logprobs,
                             "finish_reason": c.finish_reason, "score": s, "rationale": r}
                            for c, s, r in zip(samples, judged.scores, judged.rationales)],
            "pair": {"chosen": pair[0], "rejected": pair[1]} if isinstance(pair, tuple) else None,
            "dropped": pair if isinstance(pair, str) else None}
    if sampled < len(samples):
        extra = anchor_pair(scores, sampled, min_margin)
        gold = next((i for i in range(sampled, len(samples)) if samples[i].finish_reason == GOLD), None)
        if gold_against in ("best_miss", "both") and gold is not None:
            extra = best_miss_pair(scores, sampled, gold, min_margin) or extra
        worst = min(range(sampled), key=lambda i: (scores[i], -i))  # the last worst, as best_and_worst
        if (gold_against == "both" and gold is not None and scores[gold] > max(scores[:sampled])
                and scores[gold] - scores[worst] >= min_margin):
            # every sample misses: the sampled pair would make a miss the chosen side; the gold
            # answer takes its place (against the worst), the best miss is the second pair
            line["pair"], line["dropped"] = {"chosen": gold, "rejected": worst}, None
            extra = None if extra and extra[1] == worst else extra
        line["anchor_pair"] = {"chosen": extra[0], "rejected": extra[1]} if extra else None
    return line


ANCHOR = "anchor"  # the finish_reason of an anchor completion in a round file
GOLD = "gold"  # the finish_reason of a prompt's gold completion (dpo.gold_field) in a round file
FIXED_KEYS = {ANCHOR: "dpo.anchors", GOLD: "dpo.gold_field"}


def anchor_completion(messages: list[dict], prompt_ids: list[int], text: str, template: ChatTemplate,
                      tokenizer, prompt_index: int, sample_index: int, kind: str = ANCHOR) -> Completion:
    """`text` as a completion of the prompt: its tokens as the chat template renders the
    finished turn (up to and including the end-of-turn token, as a sampled completion that
    stopped there), no sampling log-probs. `kind` (ANCHOR or GOLD) is its finish reason."""
    full = tokenizer.tokenizer.encode(template.render(messages + [{"role": "assistant", "content": text}]),
                                      add_special_tokens=False).ids
    if full[:len(prompt_ids)] != prompt_ids:  # the template renders a finished turn differently
        raise ValueError(f"{FIXED_KEYS[kind]}: {text!r} does not continue the rendered prompt under chat template "
                         f"{template.name!r}; fixed completions need a template whose prompt is a prefix of the full turn")
    token_ids = full[len(prompt_ids):]
    stops = set(stop_conditions(template, tokenizer)[0])
    end = next((i + 1 for i, t in enumerate(token_ids) if t in stops), len(token_ids))
    return Completion(prompt_index, sample_index, token_ids[:end], text, [], kind)


def anchor_pairs(lines: list[dict], side: str, kind: str = ANCHOR) -> int:
    """How many of a round's pairs (the sampled slot, which `gold_against: both` may give the
    gold answer, and the second pair) have a fixed completion of `kind` (ANCHOR or GOLD) as
    their `side` ("chosen" or "rejected")."""
    return sum(built is not None and line["completions"][built[side]]["finish_reason"] == kind
               for line in lines for built in (line["pair"], line.get("anchor_pair")))


def check_gold_field(prompts: list[PromptRecord], key: str, path: str) -> None:
    """Check the prompts' gold completions (their `key` field; lines without it have none):
    errors name the prompts file and the prompt when a value is not a non-empty string, or the
    file when no prompt carries the key at all (a misspelt `dpo.gold_field`)."""
    golds = [p.fields.get(key) for p in prompts]
    for record, gold in zip(prompts, golds):
        if gold is not None and (not isinstance(gold, str) or not gold.strip()):
            raise ValueError(f"{path}: prompt {record.id}: {key!r} (dpo.gold_field) must be a non-empty completion "
                             f"text, got {gold!r}")
    if all(g is None for g in golds):
        raise ValueError(f"dpo.gold_field: no prompt of {path} has the key {key!r}; add it to the lines that have a "
                         "known-good completion, or unset dpo.gold_field")


def read_round(path: Path, seq_len: int) -> list[PreferencePair]:
    """The pairs of a round file (prompt ids and the sampled token ids, exactly as generated)."""
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        record = json.loads(line)
        completions = record["completions"]
        for built in (record["pair"], record.get("anchor_pair")):
            if built is None:
                continue
            pair = PreferencePair(np.asarray(record["prompt_ids"], dtype=np.int64),
                                  np.asarray(completions[built["chosen"]]["token_ids"], dtype=np.int64),
                                  np.asarray(completions[built["rejected"]]["token_ids"], dtype=np.int64),
                                  f"{path}:{number} (prompt {record['prompt_id']})")
            pairs.append(fit_pair(pair, seq_len, "truncate"))
    return pairs


class OnlineRounds:
    """Generates, judges and stores the rounds; hands the DPO stage each round's pairs."""

    def __init__(self, ctx: StageContext, template: ChatTemplate):
        self.ctx, self.cfg, self.template = ctx, ctx.cfg, template
        self.prompts = read_prompts(self.cfg.dpo.prompts)
        if self.cfg.dpo.gold_field:
            check_gold_field(self.prompts, self.cfg.dpo.gold_field, self.cfg.dpo.prompts)  # before any round
        self.dir = Path(ctx.run_dir) / "rounds"
        self.round_index = -1
        self.pairs: list[PreferencePair] = []
        self.rollout: PolicyRollout | None = None
        self.sync_metrics: dict = {}  # of the weight sync before this round's sampling (vLLM)
        self.judge = None
        self.show = self.cfg.train.progress and ctx.rank == 0  # bars; the round lines go to rank 0's log either way
        self.is_main = ctx.rank == 0
        d = self.cfg.dpo
        params = sampling_from_config(self.cfg, ctx.tokenizer, chat=True)
        self.params = dataclasses.replace(params, n=d.samples_per_prompt).validate()
        longest = max(len(chat_prompt_ids(prompt_messages(p), template, ctx.tokenizer)) for p in self.prompts)
        if longest + 1 > self.cfg.data.seq_len:
            raise ValueError(f"dpo.prompts: a prompt of {self.cfg.dpo.prompts} is {longest} tokens, longer than "
                             f"data.seq_len={self.cfg.data.seq_len} allows; raise data.seq_len or shorten it")

    def pairs_for_step(self, step: int, global_batch: int) -> tuple[list[PreferencePair], int, int]:
        """(the round's pairs, this step's cursor into them, the shuffling seed) for `step`."""
        d = self.cfg.dpo
        index = step // d.steps_per_round
        if index != self.round_index:
            path = self.dir / f"{index}.jsonl"
            if not path.is_file():
                self._run_round(index, path)
            self.pairs = read_round(path, self.cfg.data.seq_len)
            self.round_index = index
        return self.pairs, (step % d.steps_per_round) * global_batch, self.cfg.data.seed + 1000 * index

    def round_prompts(self, index: int) -> list[PromptRecord]:
        """Round `index`'s prompts: the next prompts_per_round of an endless stream that walks
        the prompts file in a fresh seeded order every epoch."""
        count, out, orders = self.cfg.dpo.prompts_per_round, [], {}
        for position in range(index * count, (index + 1) * count):
            epoch, offset = divmod(position, len(self.prompts))
            if epoch not in orders:
                orders[epoch] = np.random.default_rng(self.cfg.data.seed + epoch).permutation(len(self.prompts))
            out.append(self.prompts[int(orders[epoch][offset])])
        return out

    def _generate(self, index: int, prompt_ids: list[list[int]], records: list[PromptRecord]) -> list[Completion]:
        model = self.ctx.model.parts[0]
        if self.rollout is None:
            self.rollout = PolicyRollout(self.cfg, model, self.ctx.tokenizer, self.ctx.run_dir, self.ctx.device)
            self.sync_metrics = {}
        else:  # vLLM: push the trained weights and probe them (native: nothing to do)
            self.sync_metrics = self.rollout.sync(model)
        seeds = [self.cfg.rollout.seed * 1_000_003 + index * 7_919 + i if r.seed is None else r.seed
                 for i, r in enumerate(records)]
        total = len(prompt_ids) * self.params.n * self.params.max_new_tokens
        bar = tqdm(total=total, desc=f"[dpo] round {index}: sampling", unit="tok", disable=not self.show,
                   leave=False, dynamic_ncols=True)
        was_training = model.training
        model.train(False)
        try:
            return self.rollout.generate(prompt_ids, self.params, seeds, progress=bar.update)
        finally:
            model.train(was_training)
            bar.close()

    def close(self) -> None:
        """Stop the rollout engine (started at the first round this run generates)."""
        if self.rollout is not None:
            self.rollout.close()
            self.rollout = None

    def _judge(self, records: list[PromptRecord], completions: list[list[str]]) -> list[JudgeResult]:
        if self.judge is None:
            self.judge = build_judge(self.cfg.dpo.judge, self.ctx.device, "dpo.judge")
        return score_all(self.judge, records, completions)

    def _run_round(self, index: int, path: Path) -> None:
        """Sample, judge, pair, and write the round (rank 0 writes; every rank waits for it)."""
        start = time.perf_counter()
        records = self.round_prompts(index)
        prompt_ids = [chat_prompt_ids(prompt_messages(r), self.template, self.ctx.tokenizer) for r in records]
        completions = self._generate(index, prompt_ids, records)
        by_prompt = [[c for c in completions if c.prompt_index == i] for i in range(len(records))]
        d = self.cfg.dpo
        for i, (record, ids) in enumerate(zip(records, prompt_ids)):
            gold = record.fields.get(d.gold_field) if d.gold_field else None
            fixed = [(text, ANCHOR) for text in d.anchors] + ([(gold, GOLD)] if gold is not None else [])
            by_prompt[i] += [anchor_completion(prompt_messages(record), ids, text, self.template, self.ctx.tokenizer,
                                               i, self.params.n + j, kind)
                             for j, (text, kind) in enumerate(fixed)]
        generated = time.perf_counter()
        judged = on_rank0(lambda: self._judge(records, [[c.text for c in group] for group in by_prompt]))
        lines = [round_record(index, r, ids, group, result, self.cfg.dpo.min_score_margin, self.params.n,
                              d.gold_against)
                 for r, ids, group, result in zip(records, prompt_ids, by_prompt, judged)]
        n = self.params.n  # the policy's samples; anchors and gold completions follow them
        scores = [c["score"] for line in lines for c in line["completions"][:n]]
        summary = {"round": index, "prompts": len(lines), "pairs": sum(line["pair"] is not None for line in lines),
                   "dropped_ties": sum(line["dropped"] == "tie" for line in lines),
                   "dropped_margin": sum(line["dropped"] == "margin" for line in lines),
                   **({"anchor_chosen": anchor_pairs(lines, "chosen"), "anchor_rejected": anchor_pairs(lines, "rejected")}
                      if d.anchors else {}),
                   **({"gold_chosen": anchor_pairs(lines, "chosen", GOLD), "gold_rejected": anchor_pairs(lines, "rejected", GOLD)}
                      if d.gold_field else {}),
                   "mean_score": float(np.mean(scores)),
                   "mean_best_score": float(np.mean([max(c["score"] for c in line["completions"][:n]) for line in lines])),
                   "completion_tokens": sum(len(c.token_ids) for c in completions),
                   "generate_s": generated - start, "judge_s": time.perf_counter() - generated,
                   **self.sync_metrics, **merge_stats(judged)}
        if self.ctx.rank == 0:
            write_jsonl_atomic(path, lines)
            with open(self.dir / "summary.jsonl", "a") as f:
                f.write(json.dumps(summary) + "\n")
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        if self.is_main:
            tqdm.write(f"[dpo] round {index}: {summary['pairs']} pairs from {summary['prompts']} prompts "
                       f"({summary['dropped_ties']} ties, {summary['dropped_margin']} under the margin dropped), "
                       f"mean score {summary['mean_score']:.3f}, best {summary['mean_best_score']:.3f}; "
                       f"sampled in {summary['generate_s']:.1f} s, judged in {summary['judge_s']:.1f} s")
