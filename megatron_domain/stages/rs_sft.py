"""`mode: rs_sft`: rejection-sampled multi-turn SFT (in the family of STaR, ReST and
Constitutional AI's rejection-sampling stage). At setup, before the first step:

1. generate `rs_sft.dialogues_per_seed` dialogues of every seed (rollout/dialogues.py: batched
   across seeds and dialogues, turn by turn, from the policy as the stage starts);
2. score each whole dialogue with `rs_sft.judge` (judges/dialogue.py, 0-100);
3. keep the best share per seed or globally, drop low scores and near-duplicates, and measure
   the kept set's diversity against the generated set (stages/selection.py; the collapse guard
   warns or fails); with `rs_sft.gold_field`, replace the kept dialogues' failed turns by the
   seeds' known-good answers (stages/corrections.py);
4. train on the survivors through the sft path (loss on every assistant turn, packed).

With `rs_sft.rounds` > 1 the four steps repeat: at the first step of round k the policy as
trained so far generates the next dialogues (sampling seeds offset by the round), which go
through the same judging and selection to `<run_dir>/rounds/<k>/` (dialogues.jsonl, kept.jsonl,
rs_sft.json, the histogram); `<run_dir>/rs_sft.json` lists every round's summary. A resumed run
reads back the rounds it has, so it trains on exactly what an uninterrupted run would.

Everything generated is in `<run_dir>/dialogues.jsonl` (one line per dialogue: seed id, turns,
token ids, score, per-turn scores and constraint retention, the judge's reasons), written a
chunk of `rs_sft.seeds_per_chunk` seeds at a time after it is judged: a killed run continues
with the seeds it had not finished. `<run_dir>/rs_sft.json` has the selection and diversity
numbers, `kept.jsonl` the kept dialogues and `rs_sft_scores.png` the score histogram.
Under a parallel layout every rank generates (the forwards are collective) and rank 0 judges
and writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from megatron_domain.data.chat import load_template, read_conversations
from megatron_domain.data.seeds import Seed, read_seeds
from megatron_domain.files import write_json_atomic
from megatron_domain.judges import build_judge
from megatron_domain.judges.dialogue import DialogueScore, score_dialogues
from megatron_domain.parallel.apply import reshard_fsdp
from megatron_domain.rollout.dialogues import Dialogue, generate_dialogues
from megatron_domain.rollout.native import NativeSampler
from megatron_domain.rollout.policy import PolicyRollout, on_rank0, sampling_from_config
from megatron_domain.rollout.prompts import stop_conditions
from megatron_domain.rollout.user_simulator import EndpointUser, ModelUser, UserSimulator
from megatron_domain.stages import StageContext
from megatron_domain.stages.corrections import CorrectionCounts, check_gold_field, correct_with_gold
from megatron_domain.files import write_jsonl_atomic
from megatron_domain.stages.selection import collapse_problems, diversity, select
from megatron_domain.stages.sft import SftStage

DIALOGUES_FILE = "dialogues.jsonl"
ROUND_SEED_STRIDE = 1_000_003  # round k samples with base seed rollout.seed + k * this


class CollapsedKeptSet(RuntimeError):
    """The kept dialogues are too uniform to train on (rs_sft.collapse with fail: true)."""


def read_finished(path: Path, per_seed: int) -> dict[str, list[dict]]:
    """{seed id: its dialogue lines} for the seeds whose `per_seed` dialogues are all in the
    file; a partly written last line (a run killed while appending) is ignored."""
    by_seed: dict[str, dict[int, dict]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            by_seed.setdefault(record["seed_id"], {})[record["dialogue"]] = record
    return {seed: [lines[i] for i in range(per_seed)] for seed, lines in by_seed.items()
            if all(i in lines for i in range(per_seed))}


def dialogue_line(dialogue: Dialogue, score: DialogueScore) -> dict:
    """One line of dialogues.jsonl."""
    return {"seed_id": dialogue.seed_id, "dialogue": dialogue.index, "messages": dialogue.messages,
            "opening": dialogue.opening, "turn_fields": dialogue.turn_fields,
            "answer_token_ids": dialogue.answer_token_ids, "finish": dialogue.finish, **dataclasses.asdict(score)}


def line_dialogue(line: dict) -> Dialogue:
    """The Dialogue of a dialogues.jsonl line."""
    return Dialogue(line["seed_id"], line["dialogue"], line["messages"], line["opening"], line["turn_fields"],
                    line["answer_token_ids"], line["finish"])


def trained_turns(line: dict, train_on: str) -> list[bool]:
    """Which assistant messages of a kept dialogue are trained: the generated ones (`all`) or
    the generated ones the rubric passed in full (`passing`), and those holding a gold answer
    (`gold_turns`); assistant turns of the seed's opening are context."""
    opening = sum(m["role"] == "assistant" for m in line["messages"][:line["opening"]])
    generated = [True] * len(line["answer_token_ids"]) if train_on == "all" else [s >= 1.0 for s in line["turn_scores"]]
    gold = set(line.get("gold_turns", ()))  # turns replaced by their gold answer (rs_sft.gold_field)
    return [False] * opening + [passed or turn in gold for turn, passed in enumerate(generated, 1)]


def replay_conversations(pool: list[list[dict]], count: int, seed: int, round_index: int) -> list[list[dict]]:
    """`count` conversations of `pool` (rs_sft.replay) for round `round_index`: a seeded draw
    without replacement, the whole pool in a shuffled order again when count exceeds it."""
    if not pool or count <= 0:
        return []
    rng = np.random.default_rng([seed, round_index])
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(-(-count // len(pool)))])
    return [pool[int(i)] for i in order[:count]]


def append_lines(path: Path, lines: list[dict]) -> None:
    """Append whole lines in one write and flush them to disk."""
    with open(path, "a") as handle:
        handle.write("".join(json.dumps(line) + "\n" for line in lines))
        handle.flush()
        os.fsync(handle.fileno())


class RsSftStage(SftStage):
    """Generate, judge and select dialogues at setup; then the sft stage trains on the kept ones."""

    def setup(self, ctx: StageContext) -> None:
        """Round 0's dialogues (generated or read back), selection, collapse guard and sft rows;
        the steps per round and in all."""
        cfg, r = ctx.cfg, ctx.cfg.rs_sft
        self.ctx = ctx
        self.template = load_template(cfg.data.chat.template, cfg.data.tokenizer)
        self.seeds = read_seeds(r.seeds, r.turns)
        if r.gold_field:
            check_gold_field(self.seeds, r.gold_field, r.follow_ups, r.seeds)
        self.replay = read_conversations(r.replay) if r.replay else []
        self.round_summaries: list[dict] = []
        self.round = 0
        self.planned_steps = 0  # known once round 0's rows are (train.steps 0: rs_sft.epochs over them)
        self._prepare_round(0)
        rows = len(self.packed.tokens)
        self.steps_per_round = (cfg.train.steps // r.rounds if cfg.train.steps
                                else max(1, math.ceil(r.epochs * rows / cfg.train.global_batch_size)))
        self.planned_steps = r.rounds * self.steps_per_round
        if self.replay_rows:  # data.chat.replay: raw-text rows for every step now known
            self.size_replay(ctx, self.planned_steps)

    def batches(self, step: int) -> list[dict]:
        """The sft micro-batches of `step`; at the first step of a later round, that round's
        dialogues are generated by the policy as trained so far (or read back), judged and
        selected first."""
        index = step // self.steps_per_round
        if index != self.round:
            self.round = index
            self._prepare_round(index)
        return super().batches(step)

    def round_dir(self, index: int) -> Path:
        """Where round `index` keeps its files: the run directory for round 0, rounds/<index>/ after."""
        return Path(self.ctx.run_dir) if index == 0 else Path(self.ctx.run_dir) / "rounds" / str(index)

    def _prepare_round(self, index: int) -> None:
        """Generate (or read back) round `index`'s dialogues, select and check them, write the
        round's kept.jsonl, rs_sft.json and score histogram, and pack the kept ones as the rows
        the round trains on."""
        ctx, cfg, r = self.ctx, self.ctx.cfg, self.ctx.cfg.rs_sft
        out = self.round_dir(index)
        if ctx.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        path = out / DIALOGUES_FILE
        finished = read_finished(path, r.dialogues_per_seed)
        todo = [seed for seed in self.seeds if seed.id not in finished]
        if todo:
            if ctx.rank == 0:  # keep only whole seeds, then append new ones chunk by chunk
                write_jsonl_atomic(path, [line for seed in self.seeds if seed.id in finished
                                          for line in finished[seed.id]])
            self._generate_and_judge(todo, path, len(self.seeds), index)
            finished = read_finished(path, r.dialogues_per_seed)
        lines = [finished[seed.id] for seed in self.seeds]
        selection = select([[line["score"] for line in group] for group in lines],
                           [[line_dialogue(line).answers for line in group] for group in lines],
                           r.keep_fraction, r.keep_per, r.min_score, r.dedup_similarity)
        kept = [lines[s][d] for s, d in selection.kept]
        if not kept:
            raise ValueError(f"rs_sft: no dialogue kept of {sum(map(len, lines))} ({selection.below_min_score} under "
                             f"rs_sft.min_score={r.min_score}); lower min_score or check the judge's rationales in "
                             f"{path}")
        summary = {"round": index, **self._summarize(lines, kept, selection)}
        if r.gold_field:
            kept, counts = on_rank0(lambda: self._correct(kept))
            summary.update(dataclasses.asdict(counts))
        replayed = replay_conversations(self.replay, round(r.replay_fraction * len(kept)), cfg.data.seed, index)
        summary["replayed"] = len(replayed)
        problems = collapse_problems(summary["diversity_kept"], r.collapse)
        summary["collapse_warnings"] = problems
        if index == 0:
            self.summary = summary
        for earlier in range(1, index):  # a run resumed in a later round: the rounds it did not prepare
            if not any(past["round"] == earlier for past in self.round_summaries):
                past = json.loads((self.round_dir(earlier) / "rs_sft.json").read_text())
                self.round_summaries.append({k: v for k, v in past.items() if k not in ("scores", "kept_scores")})
        self.round_summaries.append({k: v for k, v in summary.items() if k not in ("scores", "kept_scores")})
        self.round_summaries.sort(key=lambda past: past["round"])
        if ctx.rank == 0:
            write_jsonl_atomic(out / "kept.jsonl", kept)
            write_json_atomic(out / "rs_sft.json", summary)
            plot_scores(summary["scores"], summary["kept_scores"], out / "rs_sft_scores.png")
            if r.rounds > 1:  # the run's summary: round 0 in full, every round so far in short
                write_json_atomic(Path(ctx.run_dir) / "rs_sft.json", {**self.summary, "rounds": self.round_summaries})
        if problems:
            which = f" of round {index}" if r.rounds > 1 else ""
            message = f"rs_sft: the kept dialogues{which} look collapsed: " + "; ".join(problems)
            if r.collapse.fail:
                raise CollapsedKeptSet(message + " (rs_sft.collapse.fail: true; nothing was trained on them)")
            warnings.warn(message, stacklevel=2)
        conversations = [line["messages"] for line in kept]
        turns = [trained_turns(line, r.train_on) for line in kept]
        self.use_conversations(ctx, conversations + replayed,
                               f"rs_sft: the {len(kept)} kept dialogues" + (f" of round {index}" if index else "")
                               + (f" and {len(replayed)} replayed conversations of {r.replay}" if replayed else ""),
                               turns + [[True] * sum(m["role"] == "assistant" for m in c) for c in replayed],
                               self.planned_steps)
        if index:  # the round's rows start a fresh shuffled stream at its first step
            self.first_row = index * self.steps_per_round * cfg.train.global_batch_size
        if ctx.rank == 0:  # the round's result, printed with --no-progress too
            s = summary
            tqdm.write(f"[rs_sft] {f'round {index}: ' if r.rounds > 1 else ''}kept {s['kept']} of {s['generated']} dialogues ({s['not_top']} not in "
                       f"the top {r.keep_fraction:.0%}, {s['below_min_score']} under min_score, {s['deduplicated']} "
                       f"near-duplicates); mean score {s['mean_score']:.1f} -> kept {s['mean_kept_score']:.1f}; "
                       f"distinct-2 {s['diversity_generated']['distinct_2']:.3f} -> "
                       f"{s['diversity_kept']['distinct_2']:.3f}; "
                       + (f"{s['replayed']} replayed conversations; " if s["replayed"] else "")
                       + (f"{s['gold_turns']} failed turns corrected with gold answers "
                          f"({s['gold_rejected']} rejected by the rubric); " if r.gold_field else "")
                       + f"{len(self.packed.tokens)} rows")

    def _generate_and_judge(self, seeds: list[Seed], path: Path, total_seeds: int, index: int) -> None:
        """Generate and judge `seeds` chunk by chunk for round `index`, appending each chunk's
        lines (rank 0); the sampling seeds depend on (rollout.seed, round, seed, dialogue)."""
        ctx, cfg, r = self.ctx, self.ctx.cfg, self.ctx.cfg.rs_sft
        model = ctx.model.parts[0]
        rollout = PolicyRollout(cfg, model, ctx.tokenizer, ctx.run_dir, ctx.device)
        params = sampling_from_config(cfg, ctx.tokenizer, chat=True)
        max_prompt = cfg.data.seq_len - params.max_new_tokens
        if max_prompt <= 0:
            raise ValueError(f"rollout.max_new_tokens={params.max_new_tokens} leaves no room for a prompt in "
                             f"data.seq_len={cfg.data.seq_len}; raise data.seq_len or lower rollout.max_new_tokens")
        show = cfg.train.progress and ctx.rank == 0
        bar = tqdm(total=len(seeds) * r.dialogues_per_seed, unit="dialogue",
                   desc="[rs_sft] dialogues" + (f" (round {index})" if r.rounds > 1 else ""),
                   disable=not show, dynamic_ncols=True)
        if len(seeds) < total_seeds and ctx.rank == 0:
            tqdm.write(f"[rs_sft] {total_seeds - len(seeds)} seed(s) already in {path}; generating the other "
                       f"{len(seeds)}")
        was_training = model.training
        model.train(False)
        try:
            for start in range(0, len(seeds), r.seeds_per_chunk):
                chunk = seeds[start:start + r.seeds_per_chunk]
                dialogues = generate_dialogues(
                    lambda prompts, p, s, progress: rollout.generate(prompts, p, s), chunk, r.dialogues_per_seed,
                    r.follow_ups, self.template, ctx.tokenizer, params, max_prompt,
                    cfg.rollout.seed + ROUND_SEED_STRIDE * index,
                    on_turn=lambda turn, answers: bar.set_postfix(turn=turn, answers=answers),
                    simulate=self._user_simulator(rollout, params))
                scores = on_rank0(lambda: score_dialogues(self._judge(), chunk, dialogues))
                if ctx.rank == 0:
                    append_lines(path, [dialogue_line(d, s) for group, group_scores in zip(dialogues, scores)
                                        for d, s in zip(group, group_scores)])
                if dist.is_initialized() and dist.get_world_size() > 1:
                    dist.barrier()
                bar.update(len(chunk) * r.dialogues_per_seed)
        finally:
            model.train(was_training)
            reshard_fsdp(model)  # the optimizers are built after setup, from the sharded parameters
            rollout.close()  # an in-process vLLM engine would hold its memory through training
            bar.close()

    def _correct(self, kept: list[dict]) -> tuple[list[dict], CorrectionCounts]:
        """The kept lines with their failed turns replaced by gold answers (stages/corrections.py)."""
        r = self.ctx.cfg.rs_sft
        seeds = {seed.id: seed for seed in self.seeds}
        counts, corrected = CorrectionCounts(), []
        for line in kept:
            line, one = correct_with_gold(line, line_dialogue(line), seeds[line["seed_id"]], r.gold_field,
                                          r.follow_ups, self._judge())
            corrected.append(line)
            counts.add(one)
        return corrected, counts

    def _user_simulator(self, rollout: PolicyRollout, params) -> UserSimulator | None:
        """The model-played user rs_sft.user_model / user_url name (None: scripted follow-ups).
        The policy plays it on every rank (its forwards are collective); another model or an
        endpoint on rank 0, whose answers reach every rank."""
        r = self.ctx.cfg.rs_sft
        if not (r.user_model or r.user_url):
            return None
        if r.user_model == "policy" and not r.user_url:
            return ModelUser(lambda prompts, p, s, progress: rollout.generate(prompts, p, s), self.ctx.tokenizer,
                             self.template, params, r.user_instruction)
        return lambda messages, seeds: on_rank0(lambda: self._external_user(params)(messages, seeds))

    def _external_user(self, params) -> UserSimulator:
        """The endpoint or separate model playing the user, built on first use (rank 0)."""
        r = self.ctx.cfg.rs_sft
        if getattr(self, "user", None) is None:
            if r.user_url:
                self.user = EndpointUser(r.user_url, r.user_model, r.user_instruction, params)
            else:
                from megatron_domain.judges.pairwise import load_judge_model

                model, tokenizer, template = load_judge_model(r.user_model, self.ctx.device)
                stop_ids, stop_strings = stop_conditions(template, tokenizer)
                sampler = NativeSampler.for_tokenizer(model, tokenizer, self.ctx.device)
                self.user = ModelUser(lambda prompts, p, s, progress: sampler.generate(prompts, p, s), tokenizer,
                                      template, dataclasses.replace(params, stop_token_ids=stop_ids, stop=stop_strings),
                                      r.user_instruction)
        return self.user

    def _judge(self):
        """The judge, built on first use (rank 0 only: it may load a model)."""
        if getattr(self, "judge", None) is None:
            self.judge = build_judge(self.ctx.cfg.rs_sft.judge, self.ctx.device, "rs_sft.judge")
        return self.judge

    def _summarize(self, lines: list[list[dict]], kept: list[dict], selection) -> dict:
        """Counts, score distribution and diversity of the generated and the kept sets."""
        scores = [line["score"] for group in lines for line in group]
        kept_scores = [line["score"] for line in kept]
        kept_by_seed: dict[str, list[list[str]]] = {}
        for line in kept:
            kept_by_seed.setdefault(line["seed_id"], []).append(line_dialogue(line).answers)
        retention = [[v for v in line["retention"] if v is not None] for group in lines for line in group]
        per_dialogue = [sum(values) / len(values) for values in retention if values]
        return {"generated": len(scores), "kept": len(kept), "kept_share": len(kept) / len(scores),
                "not_top": selection.not_top, "below_min_score": selection.below_min_score,
                "deduplicated": selection.deduplicated,
                "mean_score": sum(scores) / len(scores), "mean_kept_score": sum(kept_scores) / len(kept_scores),
                "mean_retention": sum(per_dialogue) / len(per_dialogue) if per_dialogue else 0.0,
                "finish": {f: sum(line["finish"] == f for group in lines for line in group)
                           for f in ("turns", "no_follow_up", "context")},
                "diversity_generated": diversity([[line_dialogue(x).answers for x in group] for group in lines]),
                "diversity_kept": diversity(list(kept_by_seed.values())),
                "scores": scores, "kept_scores": kept_scores}


def plot_scores(scores: list[float], kept: list[float], out_file: Path) -> None:
    """Histogram of the dialogue scores, generated vs kept (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_domain.eval.report import save_figure

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = [i * 5 for i in range(21)]
    ax.hist(scores, bins=bins, color="#9ab", label=f"generated ({len(scores)})")
    ax.hist(kept, bins=bins, color="#d62", label=f"kept ({len(kept)})")
    ax.set_xlabel("dialogue score (0-100)")
    ax.set_ylabel("dialogues")
    ax.legend()
    save_figure(fig, out_file)
