"""Model-played users for rs_sft dialogues: when a seed has no follow-up of its own for a
turn, a model writes the user's next message instead of the scripted list.

The simulator sees the dialogue from the user's side: `rs_sft.user_instruction` as the system
prompt, then every turn with the roles swapped (the assistant's answers are the messages it
replies to), and writes the next user message. Kinds:

- a local model (`rs_sft.user_model`: `policy` = the model being trained, or a checkpoint of
  ours or an HF folder), generating for all dialogues of a turn in one batch;
- an OpenAI-compatible chat endpoint (`rs_sft.user_url`, `user_model` = the served model name),
  one request per dialogue, concurrently, each with a timeout and errors naming the URL.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from megatron_domain.data.chat import ChatTemplate
from megatron_domain.data.tokenizer import TextTokenizer
from megatron_domain.rollout.prompts import chat_prompt_ids
from megatron_domain.rollout.sampling import SamplingParams

# simulate(dialogues' messages so far, one seed each) -> the next user message of each
UserSimulator = Callable[[list[list[dict]], list[int]], list[str]]


def role_swapped(messages: list[dict], instruction: str) -> list[dict]:
    """The dialogue from the user's side: the instruction as system prompt, then each turn with
    user and assistant swapped (the seed's system prompt is the assistant's, so it is left out)."""
    swapped = [{"role": "system", "content": instruction}]
    for message in messages:
        if message["role"] != "system":
            swapped.append({"role": "assistant" if message["role"] == "user" else "user",
                            "content": message["content"]})
    return swapped


class ModelUser:
    """A local model plays the user: all dialogues of a turn in one generate call."""

    def __init__(self, generate: Callable, tokenizer: TextTokenizer, template: ChatTemplate, params: SamplingParams,
                 instruction: str):
        self.generate, self.tokenizer, self.template = generate, tokenizer, template
        self.params, self.instruction = params, instruction

    def __call__(self, dialogues: list[list[dict]], seeds: list[int]) -> list[str]:
        """The next user message of each dialogue."""
        prompts = [chat_prompt_ids(role_swapped(m, self.instruction), self.template, self.tokenizer)
                   for m in dialogues]
        return [c.text.strip() for c in self.generate(prompts, self.params, seeds, None)]


class EndpointUser:
    """An OpenAI-compatible chat endpoint plays the user (`/v1/chat/completions`)."""

    def __init__(self, url: str, model: str, instruction: str, params: SamplingParams, timeout_s: float = 60.0,
                 max_concurrency: int = 8):
        from megatron_domain.rollout.client import OpenAIClient

        self.url, self.model, self.instruction, self.params = url.rstrip("/"), model, instruction, params
        self.client = OpenAIClient([self.url], timeout_s, max_concurrency)
        self.max_concurrency = max_concurrency

    def _ask(self, messages: list[dict], seed: int) -> str:
        body = {"model": self.model, "messages": role_swapped(messages, self.instruction), "seed": seed,
                "max_tokens": self.params.max_new_tokens, "temperature": self.params.temperature,
                "top_p": self.params.top_p}
        reply = self.client.request(self.url, "POST", "/v1/chat/completions", "rs_sft user simulator", json=body)
        try:
            return reply.json()["choices"][0]["message"]["content"].strip()
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ValueError(f"rs_sft.user_url {self.url}: the reply is not an OpenAI chat completion ({exc})") from exc

    def __call__(self, dialogues: list[list[dict]], seeds: list[int]) -> list[str]:
        """The next user message of each dialogue (requests run concurrently)."""
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(self._ask, dialogues, seeds))
