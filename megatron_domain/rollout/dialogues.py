"""Multi-turn dialogues sampled from the policy, batched across seeds and dialogues: at every
turn the next assistant answer of every unfinished dialogue is generated in ONE call of the
rollout engine (so it runs full batches, not one dialogue at a time), then each dialogue gets
its next user turn from the seed's follow-ups (else a model-played user, else the scripted
list) and continues.

A dialogue ends after its seed's `turns` assistant turns, when no follow-up is left
(`finish: no_follow_up`), or when its next prompt plus an answer would no longer fit the
training sequence (`finish: context`). Every answer has its own sampling seed, fixed by (base,
seed id, dialogue, turn), so a dialogue does not depend on what else is in the batch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from megatron_domain.data.chat import ChatTemplate
from megatron_domain.data.seeds import Seed, follow_up, hash_index, turn_fields
from megatron_domain.data.tokenizer import TextTokenizer
from megatron_domain.rollout.prompts import chat_prompt_ids
from megatron_domain.rollout.sampling import Completion, SamplingParams
from megatron_domain.rollout.user_simulator import UserSimulator

# generate(prompt token ids, params, one seed per prompt, progress callback) -> completions in order
GenerateFn = Callable[[list[list[int]], SamplingParams, list[int], Callable[[int], None] | None], list[Completion]]


@dataclass
class Dialogue:
    """One sampled dialogue: the opening plus the generated turns; `turn_fields[k]` are the
    fields in force at assistant turn k + 1 (the seed's, updated by its follow-ups)."""

    seed_id: str
    index: int
    messages: list[dict]
    opening: int = 0  # how many of `messages` are the seed's opening (the generated turns follow)
    turn_fields: list[dict] = field(default_factory=list)
    answer_token_ids: list[list[int]] = field(default_factory=list)
    finish: str = ""

    @property
    def answers(self) -> list[str]:
        """The generated assistant turns, in order."""
        return [m["content"] for m in self.messages[self.opening:] if m["role"] == "assistant"]

    def history(self, turn: int) -> list[dict]:
        """The messages before assistant turn `turn` (1-based): what the model answered."""
        assistant_seen = 0
        for position in range(self.opening, len(self.messages)):
            if self.messages[position]["role"] == "assistant":
                assistant_seen += 1
                if assistant_seen == turn:
                    return self.messages[:position]
        raise IndexError(f"dialogue {self.seed_id}#{self.index} has no assistant turn {turn}")


def sampling_seed(base: int, seed: Seed, dialogue: int, turn: int) -> int:
    """The sampling seed of one answer: fixed by (base, seed id, dialogue, turn)."""
    return (base * 1_000_003 + hash_index(seed.id) * 10_007 + dialogue * 101 + turn) % (2**31 - 1)


def generate_dialogues(generate: GenerateFn, seeds: list[Seed], per_seed: int, scripted: list[str],
                       template: ChatTemplate, tokenizer: TextTokenizer, params: SamplingParams,
                       max_prompt_tokens: int, base_seed: int,
                       on_turn: Callable[[int, int], None] | None = None,
                       simulate: UserSimulator | None = None) -> list[list[Dialogue]]:
    """`per_seed` dialogues of each seed (grouped by seed, in order). A user turn comes from
    the seed's follow-ups, else from `simulate` (a model-played user, all dialogues of a turn
    at once), else from the scripted list. `on_turn(turn, answers)` is called after each
    batched turn (progress)."""
    params = dataclasses.replace(params, n=1)
    dialogues = [[Dialogue(seed.id, i, [dict(m) for m in seed.opening], opening=len(seed.opening))
                  for i in range(per_seed)] for seed in seeds]
    for turn in range(1, max(seed.turns for seed in seeds) + 1):
        batch: list[tuple[Seed, Dialogue]] = []
        simulated: list[tuple[Seed, Dialogue]] = []
        for seed, group in zip(seeds, dialogues):
            for dialogue in group:
                if dialogue.finish or turn > seed.turns:
                    dialogue.finish = dialogue.finish or "turns"
                    continue
                if turn > 1:
                    user = follow_up(seed, turn, [] if simulate is not None else scripted)
                    if user is None and simulate is not None:
                        simulated.append((seed, dialogue))
                        continue
                    if user is None:
                        dialogue.finish = "no_follow_up"
                        continue
                    dialogue.messages.append({"role": "user", "content": user.content})
                batch.append((seed, dialogue))
        if simulated:
            texts = simulate([d.messages for _, d in simulated],
                             [sampling_seed(base_seed + 1, seed, d.index, turn) for seed, d in simulated])
            for (seed, dialogue), text in zip(simulated, texts):
                dialogue.messages.append({"role": "user", "content": text})
                batch.append((seed, dialogue))
        prompts, live = [], []
        for seed, dialogue in batch:
            ids = chat_prompt_ids(dialogue.messages, template, tokenizer)
            if len(ids) > max_prompt_tokens:
                if turn > 1:
                    dialogue.messages.pop()  # the unanswered user turn goes
                dialogue.finish = "context"
                continue
            prompts.append(ids)
            live.append((seed, dialogue))
        if not live:
            break
        seeds_of_answers = [sampling_seed(base_seed, seed, d.index, turn) for seed, d in live]
        completions = generate(prompts, params, seeds_of_answers, None)
        for (seed, dialogue), completion in zip(live, completions):
            dialogue.messages.append({"role": "assistant", "content": completion.text})
            dialogue.answer_token_ids.append(list(completion.token_ids))
            dialogue.turn_fields.append(turn_fields(seed, turn, scripted))
        if on_turn is not None:
            on_turn(turn, len(live))
    for group in dialogues:
        for dialogue in group:
            dialogue.finish = dialogue.finish or "turns"
    return dialogues
