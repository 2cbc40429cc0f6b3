"""Our models inside lm-evaluation-harness: an `lm_eval` LM registered as "megatron-domain".

Importing this module registers the model type, so lm-eval's own entry points find it:

    mdt lm-eval --model megatron-domain --model_args config=runs/demo/sft/config.json \\
        --tasks demo_domain_mc --include_path ...          (the lm-eval CLI, with our model)
    lm_eval.simple_evaluate(model="megatron-domain", model_args="pretrained=hf:/models/x", ...)

model_args: `config` (a run's config.json: the model that run trained, or a training YAML: its
`model.init_from`; `checkpoint` picks another checkpoint; a LoRA run is its base plus the
checkpoint's adapters) or `pretrained` (an `hf:` folder or a checkpoint / run directory of
ours, tokenizer from `tokenizer`, else the folder); `batch_size`, `max_length` (default
model.max_seq_len), `max_gen_toks`, `device`, `chat_template`; any other key is an error
(lm-eval's `max_batch_size` is accepted and unused: batches are capped by a logits budget).

Requests are scored the way lm-eval's `hf` model scores them (same tokenization, left
truncation to max_length + 1 tokens, rolling windows for perplexity), so the two agree on an
exported model (tests/test_lm_eval.py). Batches are sorted by length (longest first) and
right-padded; `generate_until` runs on the rollout engine's KV-cache sampler, batched.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
import lm_eval.models  # noqa: F401  (lm-eval's own model types, hf and vllm: registered before ours)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from megatron_domain.data.tokenizer import TextTokenizer
from megatron_domain.rollout.native import NativeSampler
from megatron_domain.rollout.sampling import SamplingParams

MODEL_NAME = "megatron-domain"
LOGITS_BUDGET_BYTES = 1 << 30  # fp32 logits of one scoring batch; rows are capped to stay below it


def bos_token_id(tokenizer: TextTokenizer) -> int | None:
    """The BOS id that tokenizer_config.json (beside tokenizer.json) names, if any."""
    config_file = Path(tokenizer.source).with_name("tokenizer_config.json")
    if not config_file.is_file():
        return None
    bos = json.loads(config_file.read_text()).get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    return tokenizer.tokenizer.token_to_id(bos) if bos else None


def load_for_eval(config: str | None, checkpoint: str | None, pretrained: str | None, tokenizer: str | None,
                  device: str) -> tuple[torch.nn.Module, TextTokenizer, object]:
    """(model in eval mode, tokenizer, Config) from lm-eval model_args strings."""
    from megatron_domain.config import config_from_dict, load_config, stored_model_config
    from megatron_domain.data.tokenizer import load_tokenizer
    from megatron_domain.eval.harness import load_eval_model
    from megatron_domain.parallel.distributed import ensure_process_group, resolve_device

    if bool(config) == bool(pretrained):
        raise ValueError(f"{MODEL_NAME}: give exactly one of model_args config=<run config.json or YAML> "
                         "or pretrained=<hf:folder | checkpoint | run dir>")
    if config:
        cfg = load_config(config)
        run_dir = Path(config).parent
        if checkpoint is None and Path(config).name == "config.json" and (run_dir / "checkpoints" / "latest").is_file():
            checkpoint = str(run_dir)  # a run's own config.json: the model that run trained
    else:
        source = pretrained if pretrained.startswith("hf:") or not Path(pretrained, "config.json").is_file() \
            or Path(pretrained, "checkpoints").is_dir() else f"hf:{pretrained}"
        folder = source.removeprefix("hf:")
        stored = stored_model_config(source)  # data.seq_len must fit the model's context (it is not used here)
        seq_len = min(512, int((stored[0] if stored else {}).get("max_seq_len") or 512))
        cfg = config_from_dict({"model": {"init_from": source},
                                "data": {"tokenizer": tokenizer or folder, "seq_len": seq_len}},
                               source=f"{MODEL_NAME} model_args")
    if tokenizer:
        cfg.data.tokenizer = tokenizer
    cfg.train.device = device
    torch_device = resolve_device(device)
    ensure_process_group(torch_device)
    model = load_eval_model(cfg, checkpoint, torch_device)
    return model, load_tokenizer(cfg.data.tokenizer, cfg.data.eod_token), cfg


@register_model(MODEL_NAME, "mdt")
class MegatronDomainLM(TemplateLM):
    """lm-eval's three request types on a Transformer of ours (LoRA included). Build it from
    model_args (`lm-eval --model megatron-domain`), or pass `model` and `tokenizer` objects
    (the pipeline evaluates the model it holds without writing it out)."""

    def __init__(self, config: str | None = None, checkpoint: str | None = None, pretrained: str | None = None,
                 tokenizer: str | TextTokenizer | None = None, model: torch.nn.Module | None = None,
                 batch_size: int | str = 16, max_length: int | None = None, max_gen_toks: int = 256,
                 device: str = "cpu", chat_template: str = "", max_batch_size: int | None = None, **unknown):
        super().__init__()
        if unknown:  # a typo would otherwise be ignored silently
            raise ValueError(f"{MODEL_NAME}: unknown model_args {', '.join(sorted(unknown))}; known: config, checkpoint, "
                             "pretrained, tokenizer, batch_size, max_length, max_gen_toks, device, chat_template")
        if isinstance(batch_size, str):
            if not batch_size.isdigit():  # lm-eval's "auto" probes GPU memory; we cap batches by a logits budget
                raise ValueError(f"{MODEL_NAME}: batch_size must be a number, not {batch_size!r}")
            batch_size = int(batch_size)
        if model is None:
            if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI default is cuda
                logging.getLogger(__name__).warning("%s: device %s requested but no GPU is visible; using the CPU",
                                                    MODEL_NAME, device)
                device = "cpu"
            model, tokenizer, cfg = load_for_eval(config, checkpoint, pretrained,
                                                  tokenizer if isinstance(tokenizer, str) else None, device)
            chat_template = chat_template or (cfg.data.chat.template if cfg.data.chat.path else "")
        elif not isinstance(tokenizer, TextTokenizer):
            raise ValueError(f"{MODEL_NAME}: a `model` object needs a `tokenizer` object (TextTokenizer)")
        self.model = model.eval()
        self.text_tokenizer = tokenizer
        self.model_device = next(model.parameters()).device
        self.batch_size_per_call = max(1, int(batch_size))
        self._max_length = int(max_length) if max_length else model.cfg.max_seq_len
        self._max_gen_toks = int(max_gen_toks)
        self._bos = bos_token_id(tokenizer)
        self.chat_template_name = chat_template
        self.sampler = NativeSampler.for_tokenizer(model, tokenizer, self.model_device,
                                                   max_batch_sequences=self.batch_size_per_call)

    # -- what TemplateLM asks for -----------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        """The end-of-document token."""
        return self.text_tokenizer.eod_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is replaced by: BOS where the tokenizer has one, else EOD
        (as lm-eval's `hf` model does)."""
        return self._bos if self._bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        """Longest window scored at once (default model.max_seq_len)."""
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        """Identifies the tokenizer in lm-eval's cache keys."""
        return self.text_tokenizer.source.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids; with add_special_tokens None the tokenizer's own post-processing applies
        unless the string already starts with the BOS token (lm-eval's `hf` rule)."""
        if add_special_tokens is None:
            bos_text = self.text_tokenizer.tokenizer.id_to_token(self._bos) if self._bos is not None else None
            add_special_tokens = not (bos_text and string.startswith(bos_text))
        return self.text_tokenizer.tokenizer.encode(string, add_special_tokens=add_special_tokens).ids

    def tok_decode(self, tokens: list[int]) -> str:
        """Ids -> text."""
        return self.text_tokenizer.decode(tokens)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """lm-eval's `--apply_chat_template`: the run's chat template (data.chat.template, or the
        `chat_template` model arg, e.g. chatml)."""
        from megatron_domain.data.chat import load_template

        if not self.chat_template_name:
            raise ValueError(f"{MODEL_NAME}: --apply_chat_template needs a chat template: a config with "
                             "data.chat, or model_args chat_template=chatml (or another template name)")
        template = load_template(self.chat_template_name, self.text_tokenizer.source)
        return template.render(chat_history, add_generation_prompt=add_generation_prompt)

    # -- scoring ----------------------------------------------------------------------------------

    def _rows_per_batch(self, longest: int) -> int:
        vocab = self.model.cfg.vocab_size
        return max(1, min(self.batch_size_per_call, LOGITS_BUDGET_BYTES // max(1, 4 * longest * vocab)))

    @torch.no_grad()
    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) pairs -> (sum of log p(continuation), greedy?) each.
        The input is context + continuation without its last token, left-truncated to
        max_length tokens; rows are right-padded, so padding never precedes a scored token."""
        inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for ctx, cont in rows]
        width = max(len(x) for x in inputs)
        pad = self.eot_token_id
        tokens = torch.tensor([x + [pad] * (width - len(x)) for x in inputs], device=self.model_device)  # [B, S]
        positions = torch.arange(width, device=self.model_device).expand_as(tokens)  # [B, S]
        logits = self.model(tokens, positions)  # [B, S, V]
        results = []
        for row, (inp, (_, cont)) in enumerate(zip(inputs, rows)):
            start = len(inp) - len(cont)
            logp = F.log_softmax(logits[row, start:len(inp)].float(), dim=-1)  # [C, V]
            target = torch.tensor(cont, device=self.model_device)  # [C]
            total = logp.gather(1, target[:, None]).sum().item()
            greedy = bool((logp.argmax(dim=-1) == target).all())
            results.append((total, greedy))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) | None, context ids, continuation ids) -> results in
        request order, computed longest first in batches."""
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise ValueError(f"{MODEL_NAME}: a loglikelihood request needs a non-empty context and continuation")
            if len(cont) > self.max_length:
                raise ValueError(f"{MODEL_NAME}: a continuation of {len(cont)} tokens exceeds max_length "
                                 f"{self.max_length}; raise model_args max_length (up to model.max_seq_len)")
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc=f"{MODEL_NAME} loglikelihood", dynamic_ncols=True)
        start = 0
        while start < len(order):
            first = requests[order[start]]
            count = self._rows_per_batch(min(self.max_length, len(first[1]) + len(first[2])))
            batch = order[start:start + count]
            for index, result in zip(batch, self._score_batch([requests[i][1:] for i in batch])):
                results[index] = result
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], result)
            bar.update(len(batch))
            start += count
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts (perplexity tasks): disjoint windows of max_length
        tokens, each conditioned on as much preceding text as fits, the first on the prefix token."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for window in lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                            prefix_token=self.prefix_token_id,
                                                            max_seq_len=self.max_length, context_len=1):
                windows.append((None, *lm_utils.make_disjoint_window(window)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations cut at the first `until` string,
        at most max_gen_toks tokens; requests with the same settings share batches."""
        groups: dict[str, list[int]] = {}
        for index, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(index)
        answers: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc=f"{MODEL_NAME} generate", dynamic_ncols=True)
        for key, indices in groups.items():
            params = self._sampling(json.loads(key))
            budget = max(1, self.max_length - params.max_new_tokens)
            prompts = [self.tok_encode(requests[i].args[0])[-budget:] for i in indices]
            prompts = [p or [self.prefix_token_id] for p in prompts]
            for index, completion in zip(indices, self.sampler.generate(prompts, params)):
                answers[index] = completion.text
                self.cache_hook.add_partial("generate_until", requests[index].args, completion.text)
            bar.update(len(indices))
        bar.close()
        return answers

    def _sampling(self, kwargs: dict) -> SamplingParams:
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        do_sample = bool(kwargs.get("do_sample", False))
        temperature = float(kwargs.get("temperature", 0.0)) if do_sample else 0.0
        max_new = int(kwargs.get("max_gen_toks", self._max_gen_toks))
        return SamplingParams(max_new_tokens=min(max_new, self.max_length - 1), temperature=temperature,
                              top_p=float(kwargs.get("top_p", 1.0) or 1.0), stop=[u for u in until if u],
                              stop_token_ids=[self.eot_token_id], seed=0)
