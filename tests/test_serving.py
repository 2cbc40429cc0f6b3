"""Serving a trained chat model: the HF export behaves as a chat model in transformers, `mdt serve`
answers OpenAI-style requests (incl. streaming and curl) exactly as the engine's sampler does,
the shared client talks to it, and `mdt generate` writes the sampler's completions."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest
import torch
import transformers

from megatron_domain.config import config_from_dict
from megatron_domain.convert import mdt_to_hf
from megatron_domain.data.chat import BUILTIN_TEMPLATES, load_template
from megatron_domain.data.tokenizer import load_tokenizer
from megatron_domain.eval.harness import load_eval_model
from megatron_domain.parallel.distributed import ensure_process_group
from megatron_domain.rollout.client import OpenAIClient
from megatron_domain.rollout.native import NativeSampler
from megatron_domain.rollout.prompts import chat_prompt_ids, stop_conditions
from megatron_domain.rollout.probe import completion_logprobs
from megatron_domain.rollout.sampling import SamplingParams

from parallel_harness import bench_serve_levels, free_port, stop_server, wait_for_server

QUESTIONS = ["what is list?", "what is module?", "what is error?"]


@pytest.fixture(scope="module")
def engine(chat_run):
    """The chat run's model, tokenizer, template and greedy chat parameters, as the engine sees them."""
    ensure_process_group(torch.device("cpu"))
    cfg = config_from_dict(chat_run["sft_config"])
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    template = load_template("chatml")
    model = load_eval_model(cfg, chat_run["sft"], torch.device("cpu"))
    stop_ids, stop_strings = stop_conditions(template, tokenizer)
    greedy = SamplingParams(max_new_tokens=40, temperature=0.0, stop_token_ids=stop_ids, stop=stop_strings)
    prompts = [chat_prompt_ids([{"role": "user", "content": q}], template, tokenizer) for q in QUESTIONS]
    answers = NativeSampler.for_tokenizer(model, tokenizer, torch.device("cpu")).generate(prompts, greedy)
    return {"cfg": cfg, "tokenizer": tokenizer, "template": template, "model": model, "greedy": greedy,
            "prompts": prompts, "answers": answers}


@pytest.fixture(scope="module")
def server(chat_run):
    """`mdt serve` on the chat run, on a free port of 127.0.0.1."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "megatron_domain.cli", "serve", chat_run["sft"], "--port", str(port),
                             "--model-name", "chat-test"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_server(proc, url, 120, lambda: proc.stdout.read()[-3000:])
    yield url
    stop_server(proc)


def test_chat_export_carries_template_and_stops_at_end_of_turn(chat_run, engine, tmp_path):
    """The export of a chatml SFT run: transformers renders the training-time prompt, and its
    greedy `generate` stops at <|im_end|> with the engine's answer."""
    summary = mdt_to_hf(chat_run["sft"], tmp_path / "export")
    tok_config = json.loads((tmp_path / "export" / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == BUILTIN_TEMPLATES["chatml"] and tok_config["eos_token"] == "<|im_end|>"
    im_end, eod = engine["tokenizer"].tokenizer.token_to_id("<|im_end|>"), engine["tokenizer"].eod_id
    assert sorted(summary["eos_token_id"]) == sorted([im_end, eod])
    generation = json.loads((tmp_path / "export" / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == sorted([im_end, eod]) and generation.get("bos_token_id") is None
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "export"), dtype=torch.float32)
    for question, prompt, answer in zip(QUESTIONS, engine["prompts"], engine["answers"]):
        rendered = hf_tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                    tokenize=True, return_dict=False)
        assert list(rendered) == prompt
        with torch.no_grad():
            out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt):]
        assert out.tolist() == answer.token_ids and out[-1].item() == im_end  # stopped at the end of turn
        assert hf_tokenizer.decode(out, skip_special_tokens=True) == answer.text


def test_chat_request_answers_like_the_engine(server, engine):
    for question, prompt, answer in zip(QUESTIONS, engine["prompts"], engine["answers"]):
        body = {"model": "chat-test", "messages": [{"role": "user", "content": question}], "max_tokens": 40,
                "temperature": 0, "return_token_ids": True}
        reply = httpx.post(server + "/v1/chat/completions", json=body, timeout=60).json()
        choice = reply["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": answer.text}
        assert choice["finish_reason"] == "stop" and choice["token_ids"] == answer.token_ids
        assert reply["prompt_token_ids"] == prompt
        assert reply["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(answer.token_ids),
                                  "total_tokens": len(prompt) + len(answer.token_ids)}


def test_curl_chat_request(server, engine):
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    body = json.dumps({"messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 40, "temperature": 0})
    out = subprocess.run(["curl", "-s", server + "/v1/chat/completions", "-H", "Content-Type: application/json",
                          "-d", body], capture_output=True, text=True, timeout=60, check=True).stdout
    assert json.loads(out)["choices"][0]["message"]["content"] == engine["answers"][0].text


def sse_payloads(response: httpx.Response) -> list:
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_chat_and_completions_add_up_to_the_full_answer(server, engine):
    body = {"messages": [{"role": "user", "content": QUESTIONS[1]}], "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as response:
        chunks = sse_payloads(response)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == engine["answers"][1].text
    # stream_options.include_usage: one more chunk, without choices, with the token counts
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as response:
        counted = sse_payloads(response)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in counted[:-1]) == engine["answers"][1].text
    assert counted[-1]["choices"] == [] and "usage" not in counted[-2]
    assert counted[-1]["usage"]["completion_tokens"] == len(engine["answers"][1].token_ids)
    assert counted[-1]["usage"]["prompt_tokens"] == len(engine["prompts"][1])
    body["stream_options"] = "yes"
    assert httpx.post(server + "/v1/chat/completions", json=body, timeout=60).status_code == 400
    # a stop string is never streamed, even when it arrives over several tokens
    full = engine["answers"][1].text
    stop = full[len(full) // 2: len(full) // 2 + 4]
    body = {"prompt": engine["prompts"][1], "max_tokens": 40, "temperature": 0, "stop": [stop], "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as response:
        streamed = "".join(c["choices"][0]["text"] for c in sse_payloads(response))
    assert streamed == full[: full.index(stop)]


def test_completions_with_token_ids_logprobs_and_samples(server, engine):
    body = {"prompt": engine["prompts"][0], "max_tokens": 12, "n": 3, "seed": 7, "temperature": 1.0, "logprobs": 0,
            "return_token_ids": True}
    first = httpx.post(server + "/v1/completions", json=body, timeout=60).json()["choices"]
    again = httpx.post(server + "/v1/completions", json=body, timeout=60).json()["choices"]
    assert [c["index"] for c in first] == [0, 1, 2] and first == again
    ids = [c["token_ids"] for c in first]
    want = completion_logprobs(engine["model"], [engine["prompts"][0]] * 3, ids, torch.device("cpu"))
    for choice, expected in zip(first, want):
        torch.testing.assert_close(torch.tensor(choice["logprobs"]["token_logprobs"]), torch.tensor(expected),
                                   atol=1e-5, rtol=0)


def test_shared_client_against_mdt_serve(server, engine):
    """rollout/client.py (what rollouts over `rollout.urls` and judges use) gets the native
    sampler's seeded samples from the server."""
    client = OpenAIClient([server], timeout_s=60)
    try:
        assert client.model_names() == ["chat-test"]
        params = SamplingParams(max_new_tokens=10, temperature=1.0, n=2, seed=0)
        got = client.complete_ids(engine["prompts"], params, [11, 12, 13], "chat-test")
        want = NativeSampler.for_tokenizer(engine["model"], engine["tokenizer"], torch.device("cpu")).generate(
            engine["prompts"], params, seeds=[11, 12, 13])
        assert [(c.prompt_index, c.sample_index, c.token_ids) for c in got] == [
            (c.prompt_index, c.sample_index, c.token_ids) for c in want]
    finally:
        client.close()


def test_bad_requests_name_the_problem(server):
    post = lambda path, body: httpx.post(server + path, json=body, timeout=30)  # noqa: E731
    assert httpx.get(server + "/v1/models", timeout=10).json()["data"][0]["id"] == "chat-test"
    cases = [("/v1/completions", {"prompt": "the", "max_tokens": 5000}, "exceeds the model's context"),
             ("/v1/completions", {"prompt": "the", "top_p": 0}, "top_p must be in"),
             ("/v1/completions", {"prompt": 5}, "'prompt' must be"),
             ("/v1/completions", {"prompt": [99999]}, "outside the vocabulary"),
             ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
             ("/v1/chat/completions", {"model": "gpt-4", "messages": []}, "is not served here")]
    for path, body, message in cases:
        reply = post(path, body)
        assert reply.status_code == 400 and message in reply.json()["error"]["message"], (body, reply.text)


def test_mdt_generate_writes_the_samplers_completions(chat_run, engine, tmp_path):
    import yaml

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": q}]})
                                 for i, q in enumerate(QUESTIONS)) + "\n" + json.dumps({"prompt": "the list"}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(chat_run["sft_config"]))
    out = tmp_path / "out.jsonl"
    run = subprocess.run([sys.executable, "-m", "megatron_domain.cli", "generate", str(config), "--prompts", str(prompts),
                          "--out", str(out), "--checkpoint", chat_run["sft"], "--set", "rollout.temperature=0",
                          "--set", "rollout.max_new_tokens=40", "--no-progress"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["prompts"] == 4 and summary["completions"] == 4 and summary["backend"] == "native"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["q0", "q1", "q2", "3"]
    for line, answer in zip(lines, engine["answers"]):
        assert line["completions"][0]["text"] == answer.text and line["completions"][0]["token_ids"] == answer.token_ids
    assert lines[3]["prompt"] == "the list" and lines[3]["completions"][0]["token_ids"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"text": "no"}\n')
    run = subprocess.run([sys.executable, "-m", "megatron_domain.cli", "generate", str(config), "--prompts", str(bad),
                          "--out", str(tmp_path / "never.jsonl")], capture_output=True, text=True)
    assert run.returncode == 2 and f"{bad}:2" in run.stderr and not (tmp_path / "never.jsonl").exists()


def test_bench_serve_measures_latency_against_mdt_serve(server, engine, tmp_path):
    """tools/bench_serve.py at 1 and 2 clients: every request completes with exactly the asked
    4 tokens (the greedy answers are longer), one token per streamed chunk."""
    assert all(len(a.token_ids) > 4 for a in engine["answers"])
    for level in bench_serve_levels(server, QUESTIONS, tmp_path, max_tokens=4):
        assert level["mean_output_tokens"] == 4 and level["tokens_per_chunk"] == 1.0
