"""The native sampler (KV cache) against references: greedy decoding that recomputes the
whole sequence, teacher-forced log-probs of the training forward, one-at-a-time generation,
the single-process model at tp=2 (with and without sequence parallelism, with LoRA)."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from megatron_domain.models.lora import merge_lora
from megatron_domain.parallel.distributed import ensure_process_group
from megatron_domain.rollout.native import NativeSampler
from megatron_domain.rollout.packed import PackedLinear, packed_linears
from megatron_domain.rollout.sampling import SamplingParams, choose_tokens, filter_logits, make_generator

from parallel_harness import run_on_ranks
from rollout_cases import build_sampler_model, generate_on_rank, generate_records, sampler_config

PROMPT_LENGTHS = (5, 2, 13, 8, 1)


@pytest.fixture(scope="module")
def model():
    ensure_process_group(torch.device("cpu"))
    return build_sampler_model(sampler_config())


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(1, 500, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def make_sampler(model, batch: int = 64) -> NativeSampler:
    return NativeSampler(model, lambda ids: "".join(f"<{i}>" for i in ids), 0, torch.device("cpu"), batch)


@torch.no_grad()
def greedy_without_cache(model, prompt: list[int], steps: int) -> list[int]:
    """Reference: the argmax of a full forward over the whole sequence at every step."""
    seq = list(prompt)
    for _ in range(steps):
        logits = model(torch.tensor([seq]), torch.arange(len(seq))[None])[0, -1]  # [V]
        seq.append(int(logits.argmax()))
    return seq[len(prompt):]


@torch.no_grad()
def teacher_forced_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """log p(completion token | everything before it) from one training-style forward (fp32)."""
    seq = torch.tensor([prompt + completion])  # [1, T]
    logp = torch.log_softmax(model(seq, torch.arange(seq.shape[1])[None])[0].float(), -1)  # [T, V]
    return logp[len(prompt) - 1:-1].gather(1, torch.tensor(completion)[:, None]).squeeze(1)  # [C]


def test_greedy_with_cache_equals_recomputing_everything(model, prompts):
    out = make_sampler(model).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    for prompt, completion in zip(prompts, out):
        assert completion.token_ids == greedy_without_cache(model, prompt, 12)
        assert completion.finish_reason == "length"


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=1.0, n=3, seed=4),
                                    dict(temperature=0.7, top_p=0.8, top_k=40, n=2, seed=9)])
def test_logprobs_equal_teacher_forcing(model, prompts, params):
    """Returned log-probs = the training forward's log p of the same tokens (fp32, 1e-5),
    whatever the sampling transform: they are the model's raw log-probs."""
    out = make_sampler(model).generate(prompts, SamplingParams(max_new_tokens=10, **params))
    assert len(out) == len(prompts) * params.get("n", 1)
    for completion in out:
        want = teacher_forced_logprobs(model, prompts[completion.prompt_index], completion.token_ids)
        torch.testing.assert_close(torch.tensor(completion.logprobs), want, atol=1e-5, rtol=0)


def test_seeded_samples_are_reproducible_and_distinct(model, prompts):
    sampler = make_sampler(model)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, n=4, seed=123)
    first = [c.token_ids for c in sampler.generate(prompts, params)]
    again = [c.token_ids for c in sampler.generate(prompts, params)]
    other = [c.token_ids for c in sampler.generate(prompts, SamplingParams(max_new_tokens=10, n=4, seed=124))]
    assert first == again
    assert first != other
    for p in range(len(prompts)):  # the n samples of one prompt differ from each other
        assert len({tuple(ids) for ids in first[4 * p:4 * p + 4]}) == 4


@pytest.mark.parametrize("params", [dict(temperature=0.0), dict(temperature=1.0, n=3, top_k=50)])
def test_batch_equals_its_rows_one_at_a_time(model, prompts, params):
    """Left padding, the shared prompt cache, compaction of finished rows and per-sequence
    noise leave every row as it would be alone. One prompt stops early on a stop token."""
    sampler = make_sampler(model, batch=6)  # several batches; n=3 puts 2 prompts in each
    probe = sampler.generate(prompts[:1], SamplingParams(max_new_tokens=10, seed=50, **params))[0]
    params = dict(params, stop_token_ids=[probe.token_ids[3]])  # prompt 0 ends at its 4th token
    batched = sampler.generate(prompts, SamplingParams(max_new_tokens=10, **params), seeds=[50 + i for i in range(5)])
    alone = [c for i, p in enumerate(prompts)
             for c in sampler.generate([p], SamplingParams(max_new_tokens=10, **params), seeds=[50 + i])]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert batched[0].finish_reason == "stop" and len(batched[0].token_ids) <= 4
    for b, a in zip(batched, alone):
        torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=1e-5, rtol=0)


def test_stop_tokens_stop_strings_and_length(model, prompts):
    sampler = make_sampler(model)
    free = sampler.generate(prompts[:1], SamplingParams(max_new_tokens=8, temperature=0))[0]
    token = free.token_ids[2]
    by_token = sampler.generate(prompts[:1], SamplingParams(max_new_tokens=8, temperature=0,
                                                            stop_token_ids=[token]))[0]
    cut = free.token_ids.index(token) + 1
    assert by_token.token_ids == free.token_ids[:cut] and by_token.finish_reason == "stop"
    assert by_token.text == "".join(f"<{i}>" for i in free.token_ids[:cut - 1])  # the stop token is not text
    stop = f"<{free.token_ids[4]}>"
    by_string = sampler.generate(prompts[:1], SamplingParams(max_new_tokens=8, temperature=0, stop=[stop]))[0]
    assert by_string.finish_reason == "stop" and stop not in by_string.text
    assert free.text.startswith(by_string.text) and by_string.token_ids == free.token_ids[:len(by_string.token_ids)]
    ignored = sampler.generate(prompts[:1], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[token],
                                                           ignore_stop=True))[0]
    assert ignored.token_ids == free.token_ids and ignored.finish_reason == "length"


def test_lora_sampler_equals_merged_model():
    """With adapters active the sampler generates what the merged model generates."""
    lora_model = build_sampler_model(sampler_config(lora={"rank": 4, "dropout": 0.0}))
    prompts = [[3, 4, 5], [9, 8, 7, 6, 5, 4]]
    params = {"max_new_tokens": 10, "temperature": 1.0, "n": 2, "seed": 1}
    with_adapter = generate_records(lora_model, prompts, params)
    plain = generate_records(build_sampler_model(sampler_config()), prompts, params)
    merge_lora(lora_model)
    merged = generate_records(lora_model, prompts, params)
    assert [r["tokens"] for r in with_adapter] == [r["tokens"] for r in merged]
    assert [r["tokens"] for r in with_adapter] != [r["tokens"] for r in plain]  # the adapters matter


@pytest.mark.slow
def test_tensor_parallel_sampler_equals_single_process(tmp_path):
    """tp=2 (plain, sequence parallel, and with LoRA) generates the single-process tokens and
    log-probs: every rank caches its own heads, logits are gathered over the vocabulary."""
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19]]
    runs = [{"max_new_tokens": 8, "temperature": 0},
            {"max_new_tokens": 8, "temperature": 1.0, "n": 2, "seed": 3, "top_p": 0.9}]
    ensure_process_group(torch.device("cpu"))
    cases = [({"tp": 2, "sequence_parallel": False}, {}), ({"tp": 2, "sequence_parallel": True}, {}),
             ({"tp": 2, "sequence_parallel": True}, {"rank": 4, "dropout": 0.0})]
    for parallel, lora in cases:
        reference = [generate_records(build_sampler_model(sampler_config(lora=lora)), prompts, p) for p in runs]
        out = tmp_path / "tp.json"
        run_on_ranks(2, generate_on_rank, sampler_config(parallel, lora), prompts, runs, str(out))
        for want, got in zip(reference, json.loads(out.read_text())):
            assert [r["tokens"] for r in got] == [r["tokens"] for r in want], (parallel, lora)
            for a, b in zip(got, want):
                torch.testing.assert_close(torch.tensor(a["logprobs"]), torch.tensor(b["logprobs"]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_packed_cpu_weights_generate_the_same_and_are_restored(tied):
    """Prepacked oneDNN linears (the CPU default) give the unpacked tokens and log-probs, and
    the model's own modules are back in place afterwards (also a tied output layer)."""
    model = build_sampler_model({**sampler_config(), "model": {"preset": "tiny-test", "init_std": 0.08,
                                                               "tie_embeddings": tied}})
    modules_before = dict(model.named_modules())
    prompts = [[3, 4, 5], [9, 8, 7, 6, 5, 4], [2]]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, n=2, seed=8)
    packed = NativeSampler(model, str, 0, torch.device("cpu"), pack_weights=True)
    assert packed.pack_weights
    got = packed.generate(prompts, params)
    want = NativeSampler(model, str, 0, torch.device("cpu"), pack_weights=False).generate(prompts, params)
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-5, rtol=0)
    assert dict(model.named_modules()) == modules_before and (model.lm_head is None) == tied
    with packed_linears(model, 8) as count:  # 7 linears per layer + the output layer
        assert count == 7 * len(model.layers) + 1
        assert isinstance(model.layers["0"].mlp.up_proj, PackedLinear) and isinstance(model.lm_head, PackedLinear)
    assert dict(model.named_modules()) == modules_before


def test_top_k_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, 1.0, **kw))[0].tolist()  # noqa: E731
    assert kept(top_k=2, top_p=1.0) == [True, True, False, False, False]
    assert kept(top_k=0, top_p=0.7) == [True, True, False, False, False]  # 0.5 + 0.2 reaches 0.7
    assert kept(top_k=0, top_p=0.71) == [True, True, True, False, False]
    assert kept(top_k=0, top_p=0.01) == [True, False, False, False, False]  # the top token always stays


def test_sampling_draws_the_filtered_distribution():
    """Frequencies of 20k seeded draws match the temperature-scaled, nucleus-truncated probabilities."""
    logits = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    params = SamplingParams(temperature=2.0, top_p=0.8)
    want = filter_logits(logits[None], 2.0, 0, 0.8).softmax(-1)[0]  # temperature flattens, then top-p cuts
    draws = 20_000
    gens = [make_generator(7, j, torch.device("cpu")) for j in range(draws)]
    counts = Counter(choose_tokens(logits.expand(draws, -1), params, gens).tolist())
    freq = torch.tensor([counts[i] / draws for i in range(4)])
    # at T=2 the probabilities are .325 .282 .230 .163: the first three reach 0.8, the last is cut
    assert want[3] == 0 and counts[3] == 0 and want[2] > 0.25
    torch.testing.assert_close(freq, want, atol=0.015, rtol=0)


def test_bad_sampling_parameters_are_named(model):
    sampler = make_sampler(model)
    with pytest.raises(ValueError, match="top_p must be in"):
        sampler.generate([[1, 2]], SamplingParams(top_p=0))
    with pytest.raises(ValueError, match="temperature 0"):
        sampler.generate([[1, 2]], SamplingParams(temperature=0, n=2))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        sampler.generate([[1] * 250], SamplingParams(max_new_tokens=10))
    with pytest.raises(ValueError, match="at least one token"):
        sampler.generate([[]], SamplingParams())
