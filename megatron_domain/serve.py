"""`mdt serve CHECKPOINT`: an OpenAI-compatible HTTP server over the native sampler.

    mdt serve runs/demo/sft                       # http://127.0.0.1:8000
    curl -s 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
         -d '{"messages": [{"role": "user", "content": "What does the with statement do?"}], "max_tokens": 48}'

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions` (prompt as text or token
ids, `n`, `seed`, `stop`, `logprobs`, `return_token_ids`, streaming) and
`POST /v1/chat/completions` (messages rendered with the run's chat template, the reply stops at
its end-of-turn token; streaming). Judges, benchmarks and the `rollout.urls` backend talk to
it, or to vLLM, through the same client (rollout/client.py). FastAPI + uvicorn; one request
generates at a time (the sampler batches the prompts and samples of a request). Bound to
127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from megatron_domain.config import CHAT_MODES, Config, config_from_dict, load_yaml
from megatron_domain.data.chat import ChatTemplate, load_template, parse_messages
from megatron_domain.data.tokenizer import TextTokenizer, load_tokenizer
from megatron_domain.rollout.native import NativeSampler
from megatron_domain.rollout.prompts import chat_prompt_ids, stop_conditions
from megatron_domain.rollout.sampling import Completion, SamplingParams, sequence_seeds


class RequestError(ValueError):
    """A bad request (HTTP 400) with a message naming the field."""


def serve_config(checkpoint: str, config: str | None = None) -> tuple[Config, str]:
    """(run config, checkpoint path) for serving: `--config`, else the run's config.json (two
    levels above a checkpoint, or in a run directory), else an imported HF checkpoint
    (`model.yaml` + `tokenizer/` written by `mdt convert hf-to-mdt`)."""
    from megatron_domain.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(checkpoint)
    if config:
        return config_from_dict(load_yaml(config), source=config), str(path)
    run_config = path.parent.parent / "config.json"
    if run_config.is_file():
        return config_from_dict(json.loads(run_config.read_text()), source=str(run_config)), str(path)
    if (path / "model.yaml").is_file() and (path / "tokenizer").is_dir():
        cfg = config_from_dict({"model": {"preset": str(path / "model.yaml")},
                                "data": {"tokenizer": str(path / "tokenizer"), "seq_len": 1}})
        return cfg, str(path)
    raise FileNotFoundError(f"{checkpoint}: no run config (config.json) next to the checkpoint and not an imported "
                            "HF checkpoint; pass --config RUN_CONFIG.yaml")


@dataclass
class ServedModel:
    """What the endpoints need: the sampler, tokenizer, chat template and the model's name."""

    name: str
    sampler: NativeSampler
    tokenizer: TextTokenizer
    template: ChatTemplate
    max_seq_len: int
    lock: threading.Lock

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids (no special tokens added)."""
        return self.tokenizer.tokenizer.encode(text, add_special_tokens=False).ids


def _number(body: dict, key: str, default, kind=float):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise RequestError(f"'{key}' must be a {'whole number' if kind is int else 'number'}, got {value!r}")
    return kind(value)


def sampling_from_request(body: dict, served: ServedModel, chat: bool) -> SamplingParams:
    """SamplingParams from an OpenAI-style request body (errors name the field)."""
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("'stop' must be a string or a list of strings")
    stop_ids, stop_strings = stop_conditions(served.template if chat else None, served.tokenizer)
    extra_ids = body.get("stop_token_ids") or []
    if not isinstance(extra_ids, list) or not all(isinstance(i, int) for i in extra_ids):
        raise RequestError("'stop_token_ids' must be a list of token ids")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    params = SamplingParams(max_new_tokens=_number({"max_tokens": max_tokens}, "max_tokens", 16 if not chat else 256, int),
                            temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
                            top_k=max(0, _number(body, "top_k", 0, int)), n=_number(body, "n", 1, int),
                            seed=_number(body, "seed", None, int),
                            stop=stop + stop_strings, stop_token_ids=sorted(set(stop_ids + extra_ids)),
                            ignore_stop=bool(body.get("ignore_eos", False)))
    try:
        return params.validate()
    except ValueError as exc:
        raise RequestError(str(exc)) from exc


def completion_prompts(body: dict, served: ServedModel) -> list[list[int]]:
    """`prompt` as text, token ids, or a list of either -> token-id prompts."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [served.encode(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return [completion_prompts({"prompt": p}, served)[0] for p in prompt]
    raise RequestError("'prompt' must be a string, a list of token ids, or a list of those")


def check_lengths(prompts: list[list[int]], params: SamplingParams, served: ServedModel) -> None:
    """Every prompt plus max_tokens must fit the model's context."""
    for ids in prompts:
        if not ids:
            raise RequestError("a prompt is empty")
        if len(ids) + params.max_new_tokens > served.max_seq_len:
            raise RequestError(f"prompt ({len(ids)} tokens) + max_tokens ({params.max_new_tokens}) exceeds the model's "
                               f"context of {served.max_seq_len} tokens")
        if max(ids) >= served.sampler.model.cfg.vocab_size or min(ids) < 0:
            raise RequestError(f"a prompt token id is outside the vocabulary (0..{served.sampler.model.cfg.vocab_size - 1})")


class TextStream:
    """Incremental text of one sequence for streaming: decodes the ids so far and releases only
    text that can no longer change: never a stop string or what follows it, and the last
    (longest stop string - 1) characters and any partial UTF-8 character are held back until
    later tokens settle them."""

    def __init__(self, decode, stop: list[str]):
        self.decode, self.stop, self.ids, self.sent = decode, stop, [], 0
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, token: int) -> str:
        """The new text after `token`."""
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        cuts = [text.find(s) for s in self.stop if s in text]
        ready = min(cuts) if cuts else len(text) - self.hold
        if ready <= self.sent:
            return ""
        delta, self.sent = text[self.sent:ready], ready
        return delta

    def finish(self, final_text: str) -> str:
        """What remains of the final (stop-trimmed) text."""
        return final_text[self.sent:] if len(final_text) > self.sent else ""


def create_app(served: ServedModel):
    """The FastAPI application."""
    app = FastAPI(title="megatron-domain", description=f"OpenAI-compatible server for {served.name}")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error",
                                                                   "code": status}})

    @app.get("/health")
    def health():
        """200 while the server is up."""
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        """The one model served."""
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": 0,
                                            "owned_by": "megatron-domain", "max_model_len": served.max_seq_len}]}

    async def parse(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError as exc:
            raise RequestError(f"the body is not valid JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        if body.get("model") not in (None, served.name):
            raise RequestError(f"model {body.get('model')!r} is not served here; this server serves {served.name!r}")
        return body

    @app.post("/v1/completions")
    async def completions(request: Request):
        """OpenAI completions: text or token-id prompts, n samples each, optional streaming."""
        try:
            body = await parse(request)
            params = sampling_from_request(body, served, chat=False)
            with_usage = include_usage(body)
            prompts = completion_prompts(body, served)
            check_lengths(prompts, params, served)
        except RequestError as exc:
            return error(400, str(exc))
        seeds = sequence_seeds(params.seed, None, len(prompts))
        if body.get("stream"):
            return StreamingResponse(_stream(served, prompts, params, seeds, False, with_usage),
                                     media_type="text/event-stream")
        done = await _generate_async(served, prompts, params, seeds)
        want_logprobs, want_ids = body.get("logprobs") is not None, bool(body.get("return_token_ids"))
        choices = []
        for c in done:
            choice = {"index": c.prompt_index * params.n + c.sample_index, "text": c.text,
                      "finish_reason": c.finish_reason,
                      "logprobs": _completion_logprobs(c, served) if want_logprobs else None}
            if want_ids:
                choice.update(token_ids=c.token_ids, prompt_token_ids=prompts[c.prompt_index])
            choices.append(choice)
        return _envelope("text_completion", served, choices, prompts, done)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        """OpenAI chat completions: messages rendered with the run's template, optional streaming."""
        try:
            body = await parse(request)
            params = sampling_from_request(body, served, chat=True)
            with_usage = include_usage(body)
            try:
                messages = parse_messages(body.get("messages"), "'messages'", need_assistant=False)
            except ValueError as exc:
                raise RequestError(str(exc)) from exc
            prompt = chat_prompt_ids(messages, served.template, served.tokenizer)
            check_lengths([prompt], params, served)
        except RequestError as exc:
            return error(400, str(exc))
        seeds = sequence_seeds(params.seed, None, 1)
        if body.get("stream"):
            return StreamingResponse(_stream(served, [prompt], params, seeds, True, with_usage),
                                     media_type="text/event-stream")
        done = await _generate_async(served, [prompt], params, seeds)
        choices = []
        for c in done:
            choice = {"index": c.sample_index, "message": {"role": "assistant", "content": c.text},
                      "finish_reason": c.finish_reason,
                      "logprobs": {"content": [{"token": t, "logprob": lp} for t, lp in
                                               zip(_token_strings(c, served), c.logprobs)]} if body.get("logprobs")
                      else None}
            if body.get("return_token_ids"):
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        response = _envelope("chat.completion", served, choices, [prompt], done)
        if body.get("return_token_ids"):
            response["prompt_token_ids"] = prompt
        return response

    return app


async def _generate_async(served: ServedModel, prompts, params, seeds) -> list[Completion]:
    import anyio

    def run():
        with served.lock:
            return served.sampler.generate(prompts, params, seeds)
    return await anyio.to_thread.run_sync(run)


def _token_strings(c: Completion, served: ServedModel) -> list[str]:
    return [served.tokenizer.tokenizer.decode([t], skip_special_tokens=False) for t in c.token_ids]


def _completion_logprobs(c: Completion, served: ServedModel) -> dict:
    return {"tokens": _token_strings(c, served), "token_logprobs": c.logprobs, "top_logprobs": None,
            "text_offset": None}


def include_usage(body: dict) -> bool:
    """OpenAI's `stream_options: {"include_usage": true}`: a last chunk with the token counts."""
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object, e.g. {\"include_usage\": true}")
    return bool(options.get("include_usage"))


def _usage(prompts, done: list[Completion]) -> dict:
    prompt_tokens, completion_tokens = sum(map(len, prompts)), sum(len(c.token_ids) for c in done)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _envelope(kind: str, served: ServedModel, choices: list[dict], prompts, done: list[Completion]) -> dict:
    return {"id": f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
            "created": int(time.time()), "model": served.name, "choices": choices, "usage": _usage(prompts, done)}


def _stream(served: ServedModel, prompts, params: SamplingParams, seeds, chat: bool, with_usage: bool = False):
    """Server-sent events: one chunk per piece of text as tokens are generated, then the
    finish reasons, (with `with_usage`) a chunk with no choices and the token counts, then
    `data: [DONE]`."""
    events: queue.Queue = queue.Queue()
    streams: dict[tuple[int, int], TextStream] = {}
    stop_ids = set(params.stop_token_ids)

    def on_token(prompt_index: int, sample_index: int, token: int) -> None:
        key = (prompt_index, sample_index)
        stream = streams.setdefault(key, TextStream(served.sampler.decode, params.stop))
        if token not in stop_ids:
            events.put(("delta", key, stream.push(token)))

    def work():
        try:
            with served.lock:
                done = served.sampler.generate(prompts, params, seeds, on_token=on_token)
            events.put(("done", None, done))
        except Exception as exc:  # reported to the client as an error event
            events.put(("error", None, str(exc)))

    threading.Thread(target=work, daemon=True).start()
    stream_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(**fields) -> str:
        payload = {"id": stream_id, "object": kind, "created": int(time.time()), "model": served.name, **fields}
        return f"data: {json.dumps(payload)}\n\n"

    def chunk(index: int, text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish}
        return event(choices=[choice])

    if chat:
        for j in range(params.n):
            yield chunk(j, None, None, first=True)
    while True:
        kind_, key, value = events.get()
        if kind_ == "delta" and value:
            yield chunk(key[0] * params.n + key[1], value, None)
        elif kind_ == "error":
            yield f"data: {json.dumps({'error': {'message': value}})}\n\n"
            break
        elif kind_ == "done":
            for c in value:
                key = (c.prompt_index, c.sample_index)
                rest = streams.setdefault(key, TextStream(served.sampler.decode, params.stop)).finish(c.text)
                yield chunk(key[0] * params.n + key[1], rest or None, c.finish_reason)
            if with_usage:
                yield event(choices=[], usage=_usage(prompts, value))
            break
    yield "data: [DONE]\n\n"


def build_served_model(checkpoint: str, config: str | None = None, name: str = "", template: str = "",
                       device: str = "auto", max_batch_sequences: int = 64) -> ServedModel:
    """Load the checkpoint (a LoRA run: its base + adapters) and everything the endpoints need."""
    from megatron_domain.eval.harness import load_eval_model
    from megatron_domain.parallel.distributed import ensure_process_group, resolve_device

    cfg, path = serve_config(checkpoint, config)
    torch_device = resolve_device(device if device != "auto" else cfg.train.device)
    ensure_process_group(torch_device)
    tokenizer = load_tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
    model = load_eval_model(cfg, path, torch_device)
    template_name = template or (cfg.data.chat.template if cfg.mode in CHAT_MODES else "chatml")
    sampler = NativeSampler.for_tokenizer(model, tokenizer, torch_device, max_batch_sequences)
    return ServedModel(name=name or Path(checkpoint).resolve().name, sampler=sampler, tokenizer=tokenizer,
                       template=load_template(template_name, tokenizer.source), max_seq_len=cfg.model.max_seq_len,
                       lock=threading.Lock())


def serve(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, **kwargs) -> None:
    """Load and serve until interrupted."""
    import uvicorn

    served = build_served_model(checkpoint, **kwargs)
    print(f"serving {served.name} on http://{host}:{port} (OpenAI-compatible: /v1/completions, /v1/chat/completions)",
          flush=True)
    uvicorn.run(create_app(served), host=host, port=port, log_level="warning")
