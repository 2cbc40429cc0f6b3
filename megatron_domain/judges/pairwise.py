"""The pairwise judge: a stronger model says which of two answers is better. Every pair of
completions is asked twice, with the positions swapped; it counts only when both orders name
the same answer (position bias cancels; the disagreements are reported). A completion's score
is its share of won comparisons.

Verdict backends (`judge.backend`):
- `model`: an in-process model (a checkpoint or run directory of ours, or a Hugging Face
  folder) reads the comparison prompt; the verdict is whichever of the tokens "A" and "B" it
  gives the higher log-probability next;
- `openai`: any OpenAI-compatible endpoint (`judge.url`, `judge.model`: vLLM, TGI, SGLang,
  `mdt serve`) answers the comparison as a chat; the first standalone A or B of the reply is
  the verdict. Requests time out after `judge.timeout_s`, are retried `judge.retries` times
  with exponential back-off, and at most `judge.max_concurrency` prompts are judged at once.
"""

from __future__ import annotations

import itertools
import re
import time
from pathlib import Path
from typing import Protocol

import torch

from megatron_domain.config import JudgeConfig
from megatron_domain.judges import JudgeError, JudgeResult
from megatron_domain.rollout.prompts import PromptRecord

COMPARISON = ("Which answer to the question is better: more correct, following the instructions, and in the "
              "requested format?\n\nQuestion:\n{question}\n\nAnswer A:\n{a}\n\nAnswer B:\n{b}\n\n"
              "Reply with the single letter A or B.")
VERDICT = re.compile(r"\b([AB])\b")


def question_text(prompt: PromptRecord) -> str:
    """The conversation being answered, as text for the comparison prompt."""
    if prompt.messages is None:
        return prompt.text or ""
    if len(prompt.messages) == 1:
        return prompt.messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt.messages)


def comparison_messages(prompt: PromptRecord, a: str, b: str) -> list[dict]:
    """The chat the judge model reads for one ordered comparison."""
    return [{"role": "user", "content": COMPARISON.format(question=question_text(prompt), a=a, b=b)}]


class VerdictBackend(Protocol):
    """Answers ordered comparisons with "A", "B" or None (no readable verdict)."""

    def verdicts(self, chats: list[list[dict]]) -> list[str | None]: ...


class ModelVerdicts:
    """Verdicts from an in-process model: log p("A") vs log p("B") as the next token."""

    def __init__(self, model: torch.nn.Module, tokenizer, template, device: torch.device):
        self.model, self.tokenizer, self.template, self.device = model, tokenizer, template, device
        self.choice_ids = []
        for letter in ("A", "B"):
            ids = tokenizer.tokenizer.encode(letter, add_special_tokens=False).ids
            if len(ids) != 1:
                raise JudgeError(f"judge.model: the tokenizer splits {letter!r} into {len(ids)} tokens; the model "
                                 "backend needs single-token verdicts")
            self.choice_ids.append(ids[0])

    @torch.no_grad()
    def verdicts(self, chats: list[list[dict]]) -> list[str | None]:
        """One right-padded forward over all comparisons; the logits at each last prompt token."""
        from megatron_domain.rollout.prompts import chat_prompt_ids

        prompts = [chat_prompt_ids(chat, self.template, self.tokenizer) for chat in chats]
        width = max(len(p) for p in prompts)
        tokens = torch.full((len(prompts), width), self.tokenizer.eod_id, dtype=torch.long)  # [N, L]
        for row, ids in enumerate(prompts):
            tokens[row, :len(ids)] = torch.tensor(ids)
        positions = torch.arange(width).expand(len(prompts), width)  # [N, L]
        logits = self.model(tokens.to(self.device), positions.to(self.device))  # [N, L, V]
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)  # [N]
        choice = logits[torch.arange(len(prompts), device=self.device), last][:, self.choice_ids]  # [N, 2]
        return ["A" if a > b else "B" for a, b in choice.float().tolist()]


class OpenAIVerdicts:
    """Verdicts from an OpenAI-compatible chat endpoint, with timeouts and retries."""

    def __init__(self, url: str, model: str, timeout_s: float, retries: int, backoff_s: float = 0.5):
        from megatron_domain.rollout.client import OpenAIClient

        self.url, self.model, self.retries, self.backoff_s = url.rstrip("/"), model, retries, backoff_s
        self.client = OpenAIClient([self.url], timeout_s)

    def _ask(self, chat: list[dict]) -> str | None:
        from megatron_domain.rollout.client import ServerError

        body = {"model": self.model, "messages": chat, "max_tokens": 8, "temperature": 0.0}
        for attempt in range(self.retries + 1):
            try:
                reply = self.client.request(self.url, "POST", "/v1/chat/completions", "judge", json=body).json()
                match = VERDICT.search(reply["choices"][0]["message"]["content"] or "")
                return match.group(1) if match else None
            except ServerError as exc:
                if attempt == self.retries:
                    raise JudgeError(f"judge.url {self.url}: no answer after {self.retries + 1} attempt(s): {exc}; "
                                     "check that the server is up and judge.url/judge.model are right") from exc
                time.sleep(self.backoff_s * 2 ** attempt)
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                raise JudgeError(f"judge.url {self.url}: the reply is not an OpenAI chat completion ({exc})") from exc
        return None

    def verdicts(self, chats: list[list[dict]]) -> list[str | None]:
        """Each comparison in turn (prompts run concurrently: see judges.score_all)."""
        return [self._ask(chat) for chat in chats]


def load_judge_model(spec: str, device: torch.device):
    """(model, tokenizer, template) of `spec`: a Hugging Face folder (config.json +
    safetensors + tokenizer with a chat template), or a checkpoint / run directory of ours."""
    from megatron_domain.data.chat import load_template
    from megatron_domain.data.tokenizer import load_tokenizer

    folder = Path(spec.removeprefix("hf:"))
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        from megatron_domain.models.hf import load_hf_weights, model_config_from_hf, read_hf_config
        from megatron_domain.models.llama import build_model, materialize

        cfg = model_config_from_hf(read_hf_config(folder), str(folder / "config.json"))
        model = materialize(build_model(cfg), device, None)
        load_hf_weights(folder, [model], cfg)
        return model.eval(), load_tokenizer(str(folder)), load_template("tokenizer", str(folder))
    from megatron_domain.eval.harness import load_eval_model
    from megatron_domain.serve import serve_config

    cfg, checkpoint = serve_config(spec)
    model = load_eval_model(cfg, checkpoint, device)
    return model, load_tokenizer(cfg.data.tokenizer, cfg.data.eod_token), load_template(cfg.data.chat.template,
                                                                                        cfg.data.tokenizer)


def verdict_backend(cfg: JudgeConfig, device: torch.device | str) -> VerdictBackend:
    """The backend `judge.backend` names."""
    if cfg.backend == "openai":
        return OpenAIVerdicts(cfg.url, cfg.model, cfg.timeout_s, cfg.retries)
    device = torch.device(device)
    return ModelVerdicts(*load_judge_model(cfg.model, device), device)


class PairwiseJudge:
    """Round-robin comparisons in both orders; score = share of consistently won comparisons."""

    def __init__(self, backend: VerdictBackend, name: str = "judge", max_concurrency: int = 1):
        self.backend, self.name = backend, name
        self.max_concurrency = max_concurrency if isinstance(backend, OpenAIVerdicts) else 1

    def score(self, prompt: PromptRecord, completions: list[str]) -> JudgeResult:
        """Each unordered pair asked as (i, j) and (j, i); a win counts when both orders agree."""
        pairs = list(itertools.combinations(range(len(completions)), 2))
        chats = [comparison_messages(prompt, completions[a], completions[b])
                 for i, j in pairs for a, b in ((i, j), (j, i))]
        verdicts = self.backend.verdicts(chats)
        wins = [0] * len(completions)
        stats = {"comparisons": len(pairs), "consistent": 0, "first_position_wins": 0, "verdicts": 0}
        for (i, j), forward, swapped in zip(pairs, verdicts[0::2], verdicts[1::2]):
            for verdict in (forward, swapped):
                if verdict is not None:
                    stats["verdicts"] += 1
                    stats["first_position_wins"] += verdict == "A"
            winner = {("A", "B"): i, ("B", "A"): j}.get((forward, swapped))
            if winner is not None:
                wins[winner] += 1
                stats["consistent"] += 1
        others = max(1, len(completions) - 1)
        rationales = [f"won {w} of {len(completions) - 1} comparison(s) consistently in both orders" for w in wins]
        return JudgeResult([w / others for w in wins], rationales, stats)
