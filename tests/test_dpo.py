"""The dpo mode: loss parity with TRL's DPOTrainer, the shared-prompt layout against the two-row
reference, the LoRA reference, preference data errors, and a golden run with exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ALPHA_WORDS, CHAT_MODEL, synthetic_documents
from megatron_domain.config import DpoConfig, config_from_dict
from megatron_domain.data.chat import ChatDataError, load_template
from megatron_domain.data.preference import PreferencePair, pair_batch, read_preferences
from megatron_domain.data.tokenizer import CHATML_SPECIALS, load_tokenizer, train_bpe_tokenizer
from megatron_domain.engine import train
from megatron_domain.kernels.linear_logprobs import linear_logprobs_chunked
from megatron_domain.models.llama import build_model, materialize
from megatron_domain.models.lora import adapters_disabled, apply_lora
from megatron_domain.stages.dpo import pair_loss, score_pairs


def random_pairs(count: int, vocab: int, seed: int, max_prompt: int = 12, max_completion: int = 10
                 ) -> list[PreferencePair]:
    """Pairs of random token ids with random lengths (completions of 1 token included)."""
    rng = np.random.default_rng(seed)
    draw = lambda low, high: rng.integers(1, vocab, rng.integers(low, high + 1))  # noqa: E731
    return [PreferencePair(draw(3, max_prompt), draw(1, max_completion), draw(1, max_completion), f"pair {i}")
            for i in range(count)]


def tiny_model(seed: int = 0, **overrides):
    """The tiny-test decoder (fp32, random init) and its ModelConfig."""
    cfg = config_from_dict({"model": {"preset": "tiny-test", **overrides}, "data": {"seq_len": 64}}).model
    return materialize(build_model(cfg), "cpu", seed), cfg


def as_batch(pairs, shared: bool, seq_len: int = 64) -> dict:
    batch = pair_batch(pairs, shared, seq_len, pad_id=0).as_dict()
    batch["pair_tokens"] = 0
    return batch


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_shared_prompt_layout_equals_two_rows(backend):
    """[prompt | chosen | rejected] with the prefix mask gives the same per-token log-probs and
    the same loss gradients as two documents per pair (within 1e-5, fp32)."""
    torch.manual_seed(0)
    model, cfg = tiny_model(attention_backend=backend)
    pairs = random_pairs(5, cfg.vocab_size, seed=1)
    results = []
    for shared in (True, False):
        batch = as_batch(pairs, shared)
        model.zero_grad()
        with torch.set_grad_enabled(backend == "sdpa"):  # FlexAttention has no backward on CPU
            logps = score_pairs(model, batch, linear_logprobs_chunked)  # [M]
            reference = logps.detach() + 0.3 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(2))
            loss, _, _ = pair_loss(logps, reference, batch, DpoConfig())
            if backend == "sdpa":
                loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logps.detach(), batch, grads))
    (shared_logps, shared_batch, shared_grads), (row_logps, row_batch, row_grads) = results
    assert shared_batch["tokens"].shape[1] < row_batch["tokens"].shape[1]  # the prompt is computed once
    assert torch.equal(shared_batch["score_targets"], row_batch["score_targets"])
    torch.testing.assert_close(shared_logps, row_logps, rtol=0, atol=1e-5)
    for name, grad in row_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=0, atol=1e-5, msg=name)
    assert backend == "flex" or row_grads["layers.0.self_attn.q_proj.weight"].abs().max() > 0


def test_pair_batch_scores_every_completion_token_at_its_predictor():
    """The first completion token is predicted at the prompt's last position in both layouts;
    every other at the position where the previous completion token was fed."""
    pair = PreferencePair(np.array([5, 6, 7]), np.array([8, 9]), np.array([10, 11, 12]))
    for shared in (True, False):
        b = pair_batch([pair], shared, 64, pad_id=0, pad_multiple=4)
        tokens = b.tokens[0]
        assert b.tokens.shape[1] % 4 == 0
        assert b.score_targets.tolist() == [8, 9, 10, 11, 12]
        assert b.score_segments.tolist() == [0, 0, 1, 1, 1]
        fed = tokens[b.score_index].tolist()
        assert fed == [7, 8, 7, 10, 11]  # what the model saw last before each target
        positions = b.position_ids[0][b.score_index].tolist()
        assert positions == [2, 3, 2, 3, 4]  # completions both continue the prompt's positions


def test_lora_reference_is_the_base_model():
    """With adapters disabled a LoRA model computes exactly the base model's logits."""
    base, cfg = tiny_model(seed=3)
    lora_model = build_model(cfg)
    apply_lora(lora_model, rank=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "gate_proj"))
    lora_model.to_empty(device="cpu")
    lora_model.load_state_dict(base.state_dict(), strict=False)
    lora_model.reset_buffers()
    with torch.no_grad():
        for name, p in lora_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    tokens = torch.randint(0, cfg.vocab_size, (2, 16))
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        expected = base(tokens, positions)
        adapted = lora_model(tokens, positions)
        with adapters_disabled(lora_model):
            disabled = lora_model(tokens, positions)
        again = lora_model(tokens, positions)
    assert (adapted - expected).abs().max() > 1e-2  # the adapters do change the model
    torch.testing.assert_close(disabled, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(again, adapted, rtol=0, atol=0)  # switched back on after the block


# ----------------------------------------------------------------------------- TRL parity


@pytest.fixture(scope="module")
def hf_pair_models(tmp_path_factory):
    """A random HF Llama (the reference) and a perturbed copy (the policy), saved as folders."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf_dpo")
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    reference = transformers.LlamaForCausalLM(config)
    policy = transformers.LlamaForCausalLM(config)
    policy.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    for name, model in (("reference", reference), ("policy", policy)):
        model.save_pretrained(root / name)
    return root


def our_model_from_hf(folder):
    from megatron_domain.models.hf import load_hf_weights, model_config_from_hf, read_hf_config

    cfg = model_config_from_hf(read_hf_config(folder))
    model = materialize(build_model(cfg), "cpu", None)
    load_hf_weights(folder, [model], cfg)
    return model


@pytest.mark.parametrize("loss_type,smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.1)])
def test_loss_equals_trl_dpo_trainer(hf_pair_models, tmp_path, loss_type, smoothing):
    """Our loss on a batch of random pairs equals TRL's DPOTrainer.compute_loss on the same
    token ids (TRL pads two rows per pair; we pack one shared-prompt row)."""
    trl = pytest.importorskip("trl")
    import transformers
    from datasets import Dataset

    pairs = random_pairs(4, 256, seed=5)
    policy_hf = transformers.AutoModelForCausalLM.from_pretrained(hf_pair_models / "policy")
    reference_hf = transformers.AutoModelForCausalLM.from_pretrained(hf_pair_models / "reference")
    tokenizer_file = tmp_path / "tok.json"
    train_bpe_tokenizer(["a b c d e"], 300, tokenizer_file)
    processing = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>",
                                                      pad_token="<|endoftext|>")
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=[loss_type],
                         label_smoothing=smoothing, report_to="none", use_cpu=True, bf16=False,
                         per_device_train_batch_size=4, max_length=None)
    dataset = Dataset.from_list([{"prompt": "a b", "chosen": " c", "rejected": " d"}])
    trainer = trl.DPOTrainer(model=policy_hf, ref_model=reference_hf, args=args, train_dataset=dataset,
                             processing_class=processing)
    examples = [{"prompt_ids": p.prompt.tolist(), "chosen_ids": p.chosen.tolist(),
                 "rejected_ids": p.rejected.tolist()} for p in pairs]
    inputs = trainer.data_collator(examples)
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, inputs))

    batch = as_batch(pairs, shared=True)
    with torch.no_grad():
        policy = score_pairs(our_model_from_hf(hf_pair_models / "policy"), batch, linear_logprobs_chunked)
        reference = score_pairs(our_model_from_hf(hf_pair_models / "reference"), batch, linear_logprobs_chunked)
    loss_sum, count, metrics = pair_loss(policy, reference, batch, DpoConfig(loss_type=loss_type,
                                                                             label_smoothing=smoothing))
    assert count == 4
    assert abs(float(loss_sum) / count - trl_loss) <= 1e-5 * max(1.0, abs(trl_loss))
    assert abs(float(loss_sum) / count - {"sigmoid": np.log(2), "hinge": 1.0}.get(loss_type, 0.0)) > 1e-4


# ----------------------------------------------------------------------------- data


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("dpo_tok")
    texts = synthetic_documents(ALPHA_WORDS, 200, seed=1) + [f"the {w} returns a list. [source: `{w}`]"
                                                            for w in ALPHA_WORDS]
    train_bpe_tokenizer(texts, 400, root / "tok.json", CHATML_SPECIALS)
    return str(root / "tok.json")


def preference_lines(count: int = 24) -> list[dict]:
    """String pairs: the cited pattern is chosen over a rambling answer."""
    out = []
    for i in range(count):
        w = ALPHA_WORDS[i % len(ALPHA_WORDS)]
        out.append({"prompt": f"what is {w}?", "chosen": f"the {w} returns a list. [source: `{w}`]",
                    "rejected": f"{w} " * (1 + i % 5) + "is an error"})
    return out


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def test_preference_formats_render_with_the_chat_template(chat_tokenizer, tmp_path):
    """String, conversational and implicit-prompt lines give the same tokens; only the
    assistant turn (through <|im_end|>) is a completion."""
    tok = load_tokenizer(chat_tokenizer)
    template = load_template("chatml")
    lines = [{"prompt": "what is list?", "chosen": "a list.", "rejected": "no."},
             {"prompt": [{"role": "user", "content": "what is list?"}],
              "chosen": [{"role": "assistant", "content": "a list."}],
              "rejected": [{"role": "assistant", "content": "no."}]},
             {"chosen": [{"role": "user", "content": "what is list?"}, {"role": "assistant", "content": "a list."}],
              "rejected": [{"role": "user", "content": "what is list?"}, {"role": "assistant", "content": "no."}]}]
    data = read_preferences(write_jsonl(tmp_path / "p.jsonl", lines), template, tok, 64)
    first = data.pairs[0]
    for pair in data.pairs[1:]:
        assert [a.tolist() for a in (pair.prompt, pair.chosen, pair.rejected)] == \
               [a.tolist() for a in (first.prompt, first.chosen, first.rejected)]
    assert tok.decode(first.prompt.tolist()).endswith("assistant\n")
    assert first.chosen[-1] == tok.tokenizer.token_to_id("<|im_end|>")
    assert "a list." in tok.decode(first.chosen.tolist())


@pytest.mark.parametrize("line,message", [
    ({"prompt": "q", "chosen": " ", "rejected": "b"}, "chosen completion is empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "word " * 80, "chosen": "a", "rejected": "b"}, "longer than data.seq_len=32"),
    ({"prompt": "q", "chosen": "a"}, "needs \"chosen\" and \"rejected\""),
])
def test_bad_pairs_name_the_file_and_line(chat_tokenizer, tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [preference_lines(1)[0], line])
    with pytest.raises(ChatDataError, match=message) as err:
        read_preferences(path, load_template("chatml"), load_tokenizer(chat_tokenizer), 32)
    assert f"{path}:2" in str(err.value)


# ----------------------------------------------------------------------------- runs


def dpo_config(tmp_path: Path, tokenizer: str, pairs_path: str, name: str, **sections) -> dict:
    cfg = {"mode": "dpo", "model": dict(CHAT_MODEL),
           "data": {"tokenizer": tokenizer, "seq_len": 64, "chat": {"path": pairs_path}},
           "optim": {"lr": 3e-3, "warmup_steps": 1, "weight_decay": 0.0},
           "train": {"run_dir": str(tmp_path / name), "steps": 6, "micro_batch_size": 2, "global_batch_size": 4,
                     "device": "cpu", "progress": False, "seed": 3}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dpo_run_learns_resumes_exactly_and_precomputes_the_reference(chat_tokenizer, tmp_path):
    """The policy moves toward the chosen answers (margin and accuracy up, loss down); a run
    stopped at step 3 and resumed equals the straight run; the precomputed reference gives the
    same losses as the frozen copy and is stored with the run."""
    pairs_path = write_jsonl(tmp_path / "pairs.jsonl", preference_lines())
    straight = train(config_from_dict(dpo_config(tmp_path, chat_tokenizer, pairs_path, "straight")))
    assert straight.losses[0] == pytest.approx(np.log(2), abs=1e-6)  # policy == reference at step 0
    assert straight.losses[-1] < straight.losses[0] - 0.1
    last = read_metrics(tmp_path / "straight")[-1]
    assert last["rewards/margin"] > 0 and last["rewards/accuracy"] > 0.5 and last["kl/chosen"] > 0
    halted = dpo_config(tmp_path, chat_tokenizer, pairs_path, "resumed")
    halted["train"]["exit_at_step"] = 3
    train(config_from_dict(halted))
    halted["train"]["exit_at_step"] = 0
    resumed = train(config_from_dict(halted), resume=True)
    assert resumed.losses == straight.losses[3:]
    precomputed = train(config_from_dict(dpo_config(tmp_path, chat_tokenizer, pairs_path, "pre",
                                                    dpo={"reference": "precomputed"})))
    assert (tmp_path / "pre" / "reference_logps.pt").is_file()
    np.testing.assert_allclose(precomputed.losses, straight.losses, rtol=0, atol=1e-5)


def test_bf16_cpu_pads_the_pair_row_and_trains_as_unpadded(chat_tokenizer, tmp_path, monkeypatch):
    """In bf16 on a CPU the pair row is padded to a multiple of 64 positions (the padding is its
    own document, never scored: precision.matmul_row_multiple); the losses equal those of the
    same run without the padding to bf16 rounding."""
    import megatron_domain.stages.dpo as dpo_stage

    pairs_path = write_jsonl(tmp_path / "pairs.jsonl", preference_lines())
    lengths = {}

    def recording(name):
        def batch(*args, **kwargs):
            built = pair_batch(*args, **kwargs)
            lengths.setdefault(name, []).append(built.tokens.shape[1])
            return built
        return batch

    runs = {}
    for name, multiple in (("padded", None), ("unpadded", 1)):
        monkeypatch.setattr(dpo_stage, "pair_batch", recording(name))
        if multiple is not None:
            monkeypatch.setattr(dpo_stage, "matmul_row_multiple", lambda dtype, device: multiple)
        cfg = dpo_config(tmp_path, chat_tokenizer, pairs_path, name)
        cfg["train"]["dtype"] = "bf16"
        runs[name] = train(config_from_dict(cfg)).losses
    assert all(n % 64 == 0 for n in lengths["padded"])
    assert any(n % 64 for n in lengths["unpadded"])  # the rows would vary otherwise
    np.testing.assert_allclose(runs["padded"], runs["unpadded"], rtol=0, atol=2e-3)


def test_lora_dpo_uses_the_base_as_reference(chat_tokenizer, tmp_path):
    """LoRA DPO (reference: auto -> adapters) starts at log 2 and learns."""
    pairs_path = write_jsonl(tmp_path / "pairs.jsonl", preference_lines())
    result = train(config_from_dict(dpo_config(tmp_path, chat_tokenizer, pairs_path, "lora",
                                               lora={"rank": 8, "dropout": 0.0}, optim={"lr": 1e-2})))
    assert result.losses[0] == pytest.approx(np.log(2), abs=1e-6)
    assert result.losses[-1] < result.losses[0]


def test_dpo_config_errors_name_the_field(chat_tokenizer, tmp_path):
    from megatron_domain.config import ConfigError

    bad = dpo_config(tmp_path, chat_tokenizer, "x.jsonl", "bad", dpo={"reference": "adapters", "loss_type": "kto",
                                                                       "label_smoothing": 0.7, "online": True,
                                                                       "samples_per_prompt": 1},
                     parallel={"pp": 2})
    with pytest.raises(ConfigError) as err:
        config_from_dict(bad)
    text = str(err.value)
    for expected in ("dpo.reference: adapters needs LoRA", "dpo.loss_type: unknown 'kto'", "dpo.label_smoothing",
                     "dpo.prompts", "dpo.samples_per_prompt", "dpo.judge.rules",
                     "parallel.pp: online DPO samples with the policy"):
        assert expected in text


# ----------------------------------------------------------------------------- parallel layouts

DPO_LAYOUTS = {"tp2": {"tp": 2}, "tp2_sp": {"tp": 2, "sequence_parallel": True}, "dp_shard2": {"dp_shard": 2},
               "pp2": {"pp": 2}}


@pytest.mark.slow
def test_dpo_under_parallel_layouts_matches_one_process(chat_tokenizer, tmp_path):
    """tp=2 (with and without sequence parallelism), dp_shard=2, pp=2 (the reference through
    forward-only pipeline passes: a frozen copy, the base under LoRA, or precomputed once), and
    LoRA at tp=2: the loss and every gradient of step 0 within 1e-5 of one process, then the
    same 3-step losses; under pp the reward metrics too."""
    from parallel_cases import layout_result, run_jobs
    from parallel_harness import run_on_ranks

    pairs_path = write_jsonl(tmp_path / "pairs.jsonl", preference_lines())

    def cfg(name, parallel, **sections):
        out = dpo_config(tmp_path, chat_tokenizer, pairs_path, name, parallel=parallel, **sections)
        out["model"] = {"preset": "tiny-test"}  # 4 heads, 2 KV heads: splits over tp=2
        out["train"]["steps"] = 3
        return out

    lora = {"lora": {"rank": 4, "dropout": 0.0}}
    reference = {"full": layout_result(cfg("ref", {})), "lora": layout_result(cfg("ref_lora", {}, **lora))}
    jobs = [(name, "layout", cfg(name, par), None) for name, par in DPO_LAYOUTS.items()]
    jobs.append(("tp2_lora", "layout", cfg("tp2_lora", {"tp": 2}, **lora), None))
    jobs.append(("pp2_lora", "layout", cfg("pp2_lora", {"pp": 2}, **lora), None))
    jobs.append(("pp2_precomputed", "layout", cfg("pp2_precomputed", {"pp": 2}, dpo={"reference": "precomputed"}),
                 None))
    run_on_ranks(2, run_jobs, jobs, str(tmp_path))
    for name in [*DPO_LAYOUTS, "tp2_lora", "pp2_lora", "pp2_precomputed"]:
        ref = reference["lora" if name.endswith("lora") else "full"]
        got = torch.load(tmp_path / f"{name}.pt", weights_only=False)
        assert abs(got["loss"] - ref["loss"]) <= 1e-5, name
        assert sorted(got["grads"]) == sorted(ref["grads"]), name
        for param, grad in ref["grads"].items():
            torch.testing.assert_close(got["grads"][param], grad, rtol=0, atol=1e-5, msg=f"{name}: {param}")
        assert max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])) <= 1e-5, name
    assert any(g.abs().max() > 0 for g in reference["full"]["grads"].values())
    assert (tmp_path / "pp2_precomputed" / "reference_logps.pt").is_file()
    for name, ref_name in (("pp2", "ref"), ("pp2_lora", "ref_lora")):
        for got, want in zip(read_metrics(tmp_path / name), read_metrics(tmp_path / ref_name), strict=True):
            for key in ("rewards/chosen", "rewards/margin", "rewards/accuracy", "logps/rejected", "kl/chosen"):
                assert got[key] == pytest.approx(want[key], abs=1e-5), (name, key)


# ----------------------------------------------------------------------------- online rounds

HOUSE_RULES = [{"name": "format", "pattern": r"^the \w+ returns a list\. \[source: `\w+`\]$"},
               {"name": "citation", "pattern": r"\[source: `{source}`\]"}]


def online_config(chat_run: dict, tmp_path: Path, name: str, **dpo) -> dict:
    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": f"what is {w}?", "source": w} for w in ALPHA_WORDS])
    return {"mode": "dpo", "model": {**CHAT_MODEL, "init_from": chat_run["sft"]},
            "data": {"tokenizer": chat_run["tokenizer"], "seq_len": 64, "chat": {"template": "chatml"}},
            "optim": {"lr": 1e-3, "warmup_steps": 1, "weight_decay": 0.0},
            "rollout": {"max_new_tokens": 20, "temperature": 1.0, "seed": 5},
            "dpo": {"online": True, "prompts": str(prompts), "rounds": 3, "prompts_per_round": 8,
                    "samples_per_prompt": 4, "steps_per_round": 2, "judge": {"kind": "rubric", "rules": HOUSE_RULES},
                    **dpo},
            "train": {"run_dir": str(tmp_path / name), "steps": 6, "micro_batch_size": 2, "global_batch_size": 4,
                      "device": "cpu", "progress": False, "seed": 3}}


def round_lines(run_dir: Path, index: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "rounds" / f"{index}.jsonl").read_text().splitlines()]


def pop_logprobs(lines: list[dict]) -> list[float]:
    """Remove the sampled log-probs from round lines (floats that differ in the last digits
    between parallel layouts); returns them flattened."""
    return [lp for line in lines for c in line["completions"] for lp in c.pop("logprobs")]


def test_online_rounds_pair_best_and_worst_drop_ties_and_resume_exactly(chat_run, tmp_path, capsys):
    """Each round writes every completion with its score and rationale; the pair is the best
    against the worst; ties are dropped and counted; a run stopped mid-round and resumed trains
    on the same rounds and ends with the same losses. Without progress bars the setup and round
    lines are still printed (a batch job's log)."""
    straight_cfg = online_config(chat_run, tmp_path, "straight")
    straight = train(config_from_dict(straight_cfg))
    run_dir = tmp_path / "straight"
    printed = capsys.readouterr().out
    assert "[straight] model: " in printed and "[dpo] loss sigmoid (beta 0.1)" in printed
    assert [line.split(":")[0] for line in printed.splitlines() if line.startswith("[dpo] round ")] == [
        "[dpo] round 0", "[dpo] round 1", "[dpo] round 2"]
    summaries = [json.loads(line) for line in (run_dir / "rounds" / "summary.jsonl").read_text().splitlines()]
    assert [s["round"] for s in summaries] == [0, 1, 2]
    for index, summary in enumerate(summaries):
        lines = round_lines(run_dir, index)
        assert len(lines) == 8 == summary["prompts"]
        assert summary["pairs"] + summary["dropped_ties"] + summary["dropped_margin"] == 8
        for line in lines:
            scores = [c["score"] for c in line["completions"]]
            assert len(scores) == 4 and all("format:" in c["rationale"] for c in line["completions"])
            if line["pair"] is None:
                assert line["dropped"] == "tie" and len(set(scores)) == 1
            else:
                assert scores[line["pair"]["chosen"]] == max(scores) > min(scores) == scores[line["pair"]["rejected"]]
    assert sum(s["pairs"] for s in summaries) > 0 and sum(s["dropped_ties"] for s in summaries) > 0
    halted = online_config(chat_run, tmp_path, "resumed")
    halted["train"]["exit_at_step"] = 3  # in the middle of round 1
    train(config_from_dict(halted))
    assert not (tmp_path / "resumed" / "rounds" / "2.jsonl").exists()
    halted["train"]["exit_at_step"] = 0
    resumed = train(config_from_dict(halted), resume=True)
    assert resumed.losses == straight.losses[3:]
    for index in range(3):
        assert round_lines(tmp_path / "resumed", index) == round_lines(run_dir, index)


def test_online_margin_drops_close_pairs(chat_run, tmp_path):
    """min_score_margin above every possible gap drops every pair (and training still runs)."""
    cfg = online_config(chat_run, tmp_path, "margin", rounds=1, steps_per_round=1, min_score_margin=1.5)
    cfg["train"]["steps"] = 1
    result = train(config_from_dict(cfg))
    summary = json.loads((tmp_path / "margin" / "rounds" / "summary.jsonl").read_text())
    assert summary["pairs"] == 0 and summary["dropped_margin"] + summary["dropped_ties"] == 8
    assert summary["dropped_margin"] > 0
    assert result.losses == [0.0]


def test_anchor_completions_are_judged_with_the_samples(chat_run, tmp_path):
    """dpo.anchors: a fixed refusal joins every prompt's samples as the chat template renders
    it (end-of-turn token included) and gives a second pair: the chosen answer of each
    out-of-scope prompt (the policy never refuses) against the worst sample, the rejected one
    of each answerable prompt against its best sample; the sampled pair stays among the
    samples; the summary counts both sides; offline DPO refuses anchors."""
    refusal = "I cannot answer."
    rules = [{**rule, "when": "source"} for rule in HOUSE_RULES] + [
        {"name": "refusal", "pattern": r"^I cannot answer\.$", "when": "!source"}]
    cfg = online_config(chat_run, tmp_path, "anchors", rounds=1, steps_per_round=1, anchors=[refusal],
                        judge={"kind": "rubric", "rules": rules})
    write_jsonl(Path(cfg["dpo"]["prompts"]), [{"prompt": f"what is {w}?", "source": w} for w in ALPHA_WORDS[:4]]
                + [{"prompt": f"who wrote {w}?", "source": None} for w in ALPHA_WORDS[:4]])
    cfg["train"]["steps"] = 1
    result = train(config_from_dict(cfg))
    assert len(result.losses) == 1 and result.losses[0] > 0
    tokenizer = load_tokenizer(chat_run["tokenizer"])
    expected_ids = tokenizer.tokenizer.encode(refusal, add_special_tokens=False).ids + [
        tokenizer.tokenizer.token_to_id("<|im_end|>")]
    lines = round_lines(tmp_path / "anchors", 0)
    chosen = rejected = 0
    for line in lines:
        *samples, anchor = line["completions"]
        assert len(samples) == 4 and anchor["finish_reason"] == "anchor" and anchor["text"] == refusal
        assert anchor["token_ids"] == expected_ids and anchor["logprobs"] == []
        scores = [c["score"] for c in samples]
        if line["pair"] is not None:
            assert scores[line["pair"]["chosen"]] == max(scores) > min(scores) == scores[line["pair"]["rejected"]]
        if line["fields"].get("source") is None:
            assert anchor["score"] == 1.0 and max(scores) == 0.0 and line["pair"] is None  # samples tie
            assert line["anchor_pair"] == {"chosen": 4, "rejected": 0}
            chosen += 1
        else:
            assert anchor["score"] == 0.0
            if max(scores) > 0:
                assert line["anchor_pair"] == {"chosen": scores.index(max(scores)), "rejected": 4}
                rejected += 1
            else:
                assert line["anchor_pair"] is None
    summary = json.loads((tmp_path / "anchors" / "rounds" / "summary.jsonl").read_text())
    assert chosen == 4 and rejected > 0
    assert (summary["anchor_chosen"], summary["anchor_rejected"]) == (chosen, rejected)
    offline = {**cfg, "dpo": {"anchors": [refusal]}, "data": {**cfg["data"], "chat": {"path": "pairs.jsonl"}}}
    with pytest.raises(ValueError, match=r"dpo.anchors: anchors are judged with online samples"):
        config_from_dict(offline)


def test_gold_completions_are_chosen_against_the_worst_sample(chat_run, tmp_path):
    """dpo.gold_field: a prompt's own known-good answer (a key of its line) joins its samples,
    tokenized as the chat template renders the finished turn, and is chosen against the worst
    sample wherever the judge ranks it above them; prompts without the key get none; the
    summary counts the gold pairs and its mean scores are the policy's samples only; a missing
    key, an empty value and offline DPO are refused with messages naming them."""
    cfg = online_config(chat_run, tmp_path, "gold", rounds=1, steps_per_round=1, gold_field="answer")
    prompts = Path(cfg["dpo"]["prompts"])
    write_jsonl(prompts, [{"prompt": f"what is {w}?", "source": w, "answer": f"the {w} returns a list. [source: `{w}`]"}
                          for w in ALPHA_WORDS[:6]] + [{"prompt": f"what is {w}?", "source": w} for w in ALPHA_WORDS[6:8]])
    cfg["train"]["steps"] = 1
    result = train(config_from_dict(cfg))
    assert len(result.losses) == 1 and result.losses[0] > 0
    tokenizer = load_tokenizer(chat_run["tokenizer"])
    end = tokenizer.tokenizer.token_to_id("<|im_end|>")
    lines = round_lines(tmp_path / "gold", 0)
    assert len(lines) == 8
    gold_chosen = 0
    for line in lines:
        word = line["fields"]["source"]
        scores = [c["score"] for c in line["completions"]]
        if "answer" not in line["fields"]:
            assert len(line["completions"]) == 4 and "anchor_pair" not in line
            continue
        *samples, gold = line["completions"]
        assert len(samples) == 4 and gold["finish_reason"] == "gold" and gold["text"] == line["fields"]["answer"]
        assert gold["token_ids"] == tokenizer.tokenizer.encode(gold["text"], add_special_tokens=False).ids + [end]
        assert gold["score"] == 1.0 and gold["logprobs"] == [], word
        if min(scores[:4]) < 1.0:
            assert line["anchor_pair"] == {"chosen": 4, "rejected": scores.index(min(scores[:4]))}
            gold_chosen += 1
        else:
            assert line["anchor_pair"] is None
    summary = json.loads((tmp_path / "gold" / "rounds" / "summary.jsonl").read_text())
    assert gold_chosen > 0 and (summary["gold_chosen"], summary["gold_rejected"]) == (gold_chosen, 0)
    sampled = [c["score"] for line in lines for c in line["completions"][:4]]
    assert summary["mean_score"] == pytest.approx(sum(sampled) / len(sampled))
    assert summary["mean_best_score"] == pytest.approx(sum(max(c["score"] for c in line["completions"][:4])
                                                           for line in lines) / 8)
    cfg["train"]["run_dir"] = str(tmp_path / "gold_typo")
    cfg["dpo"]["gold_field"] = "answers"
    with pytest.raises(ValueError, match=r"dpo.gold_field: no prompt of .*prompts.jsonl has the key 'answers'"):
        train(config_from_dict(cfg))
    write_jsonl(prompts, [{"prompt": "what is alpha?", "source": "alpha", "answer": " "}])
    cfg["dpo"]["gold_field"] = "answer"
    with pytest.raises(ValueError, match=r"prompts.jsonl: prompt 0: 'answer' \(dpo.gold_field\) must be a non-empty"):
        train(config_from_dict(cfg))
    offline = {**cfg, "dpo": {"gold_field": "answer"}, "data": {**cfg["data"], "chat": {"path": "pairs.jsonl"}}}
    with pytest.raises(ValueError, match=r"dpo.gold_field: gold completions are judged with online samples"):
        config_from_dict(offline)


def test_gold_against_best_miss_pairs_the_gold_answer_with_the_hard_negative():
    """dpo.gold_against: worst pairs the gold answer against the lowest-scored sample, best_miss
    against the best sample it outranks (a well-formed answer citing the wrong section, first one
    on ties); a gold answer the judge ranks below the samples is rejected against the best in
    both modes; a gold answer tied with every sample gives no pair; an unknown mode is refused."""
    from megatron_domain.judges import JudgeResult
    from megatron_domain.rollout.prompts import PromptRecord
    from megatron_domain.rollout.sampling import Completion
    from megatron_domain.stages.online import anchor_pairs, round_record

    def record(scores: list[float], against: str) -> dict:
        completions = [Completion(0, i, [1], f"s{i}", [0.0], "stop") for i in range(len(scores) - 1)]
        completions.append(Completion(0, len(scores) - 1, [1], "gold", [], "gold"))
        judged = JudgeResult(scores, [""] * len(scores))
        return round_record(0, PromptRecord("p0", messages=[{"role": "user", "content": "q"}]), [1], completions,
                            judged, 0.0, len(scores) - 1, against)

    def line(scores: list[float], against: str) -> dict | None:
        return record(scores, against)["anchor_pair"]

    misses = [2 / 3, 1 / 3, 0.0, 2 / 3, 1.0]  # samples 0 and 3 cite the wrong section, 2 derailed
    assert line(misses, "worst") == {"chosen": 4, "rejected": 2}
    assert line(misses, "best_miss") == {"chosen": 4, "rejected": 0}
    # both: every sample misses, so the sampled pair (a miss chosen) becomes gold vs the worst
    assert record(misses, "worst")["pair"] == {"chosen": 0, "rejected": 2}
    both = record(misses, "both")
    assert both["pair"] == {"chosen": 4, "rejected": 2} and both["anchor_pair"] == {"chosen": 4, "rejected": 0}
    tied = record([0.5, 0.5, 1.0], "both")  # tied misses: gold vs the last and vs the first
    assert tied["pair"] == {"chosen": 2, "rejected": 1} and tied["dropped"] is None
    assert tied["anchor_pair"] == {"chosen": 2, "rejected": 0}
    single = record([0.5, 1.0], "both")  # one sample: one pair, not the same pair twice
    assert single["pair"] == {"chosen": 1, "rejected": 0} and single["anchor_pair"] is None
    hit = record([1.0, 0.5, 0.0, 1.0], "both")  # a sample is right: the sampled pair stays
    assert hit["pair"] == {"chosen": 0, "rejected": 2} and hit["anchor_pair"] == {"chosen": 3, "rejected": 1}
    # the round summary's gold_chosen counts the gold answer in either pair slot
    assert anchor_pairs([both, single, hit], "chosen", "gold") == 4
    assert anchor_pairs([both, single, hit], "rejected", "gold") == 0
    for against in ("worst", "best_miss", "both"):
        assert line([1.0, 0.5, 1.0, 0.0], against) == {"chosen": 0, "rejected": 3}  # the gold answer failed
        assert line([1.0, 1.0, 1.0], against) is None
    bad = {"mode": "dpo", "model": {"preset": "tiny-test"}, "train": {"steps": 1},
           "dpo": {"online": True, "prompts": "p.jsonl", "gold_field": "answer", "gold_against": "nearest",
                   "judge": {"kind": "rubric", "rules": [{"pattern": "x"}]}}}
    with pytest.raises(ValueError, match=r"dpo.gold_against: unknown 'nearest'; choose one of worst, best_miss, both"):
        config_from_dict(bad)


def test_init_from_a_lora_run_starts_from_its_merged_weights(chat_run, tmp_path):
    """model.init_from = a LoRA run (adapters only in its checkpoints): the base it names plus
    its adapters, merged, so a DPO stage can start from a LoRA SFT stage."""
    from megatron_domain.eval.harness import load_eval_model

    lora_cfg = config_from_dict(chat_run["lora_config"])
    expected_model = load_eval_model(lora_cfg, chat_run["lora"], torch.device("cpu"))
    start_cfg = config_from_dict({**chat_run["sft_config"], "model": {**CHAT_MODEL, "init_from": chat_run["lora"]}})
    started = load_eval_model(start_cfg, None, torch.device("cpu"))
    base = load_eval_model(config_from_dict(chat_run["sft_config"]), chat_run["sft"], torch.device("cpu"))
    tokens = torch.randint(0, 300, (2, 12))
    positions = torch.arange(12).expand(2, 12)
    with torch.no_grad():
        expected, got, before = (m(tokens, positions) for m in (expected_model, started, base))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - before).abs().max() > 1e-4  # the adapters were applied


def test_pretokenized_pairs_are_used_as_they_are(chat_tokenizer, tmp_path):
    """TRL's tokenized columns (prompt_ids, chosen_ids, rejected_ids) load without a template;
    bad ids are named."""
    tok = load_tokenizer(chat_tokenizer)
    lines = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]}]
    data = read_preferences(write_jsonl(tmp_path / "ids.jsonl", lines), load_template("chatml"), tok, 32)
    pair = data.pairs[0]
    assert (pair.prompt.tolist(), pair.chosen.tolist(), pair.rejected.tolist()) == ([5, 6, 7], [8, 9], [10])
    bad = write_jsonl(tmp_path / "bad_ids.jsonl", [{"prompt_ids": [1], "chosen_ids": [99999], "rejected_ids": [2]}])
    with pytest.raises(ChatDataError, match=r"bad_ids.jsonl:1: \"chosen_ids\" must be a list of token ids"):
        read_preferences(bad, load_template("chatml"), tok, 32)


def test_sft_weight_adds_the_chosen_mean_nll_per_pair():
    """RPO: the loss of each pair gains alpha x the mean NLL of its chosen tokens."""
    pairs = random_pairs(3, 100, seed=9)
    batch = as_batch(pairs, shared=True)
    policy = -torch.rand(batch["score_targets"].shape[0], generator=torch.Generator().manual_seed(0)) * 4
    reference = policy + 0.1
    plain, _, _ = pair_loss(policy, reference, batch, DpoConfig())
    rpo, _, metrics = pair_loss(policy, reference, batch, DpoConfig(sft_weight=0.5))
    segments = batch["score_segments"]
    expected = sum(float(-policy[segments == 2 * p].mean()) for p in range(3))
    assert float(rpo - plain) == pytest.approx(0.5 * expected, rel=1e-6)
    assert float(metrics["nll/chosen"]) == pytest.approx(expected, rel=1e-6)


def test_generation_eval_reports_refusals_and_kl(chat_run, tmp_path):
    """In-scope metrics ignore out-of-scope questions; the sampled KL of a model to itself is 0
    and to another model positive."""
    from megatron_domain.eval.harness import load_eval_model
    from megatron_domain.eval.rubric import evaluate_generation

    questions = write_jsonl(tmp_path / "q.jsonl", [{"prompt": f"what is {w}?", "source": w} for w in ALPHA_WORDS[:4]]
                            + [{"prompt": "what is the weather?", "source": None}])
    tok = load_tokenizer(chat_run["tokenizer"])
    model = load_eval_model(config_from_dict(chat_run["sft_config"]), chat_run["sft"], torch.device("cpu"))
    other = load_eval_model(config_from_dict(chat_run["lora_config"]), chat_run["lora"], torch.device("cpu"))
    refusal = "the list returns a list. [source: `list`]"  # an answer the model gives, standing in for a refusal
    same = evaluate_generation(model, tok, questions, "chatml", 24, torch.device("cpu"), refusal=refusal,
                               reference=model, kl_samples=2)
    assert (same["in_scope"], same["out_of_scope"]) == (4, 1)
    assert 0 <= same["refusal_in_scope"] <= 1 and same["refusal_out_of_scope"] in (0.0, 1.0)
    assert abs(same["kl_to_reference"]) < 1e-3
    moved = evaluate_generation(model, tok, questions, "chatml", 24, torch.device("cpu"), reference=other,
                                kl_samples=2)
    assert moved["kl_to_reference"] > 1e-3 and "refusal_in_scope" not in moved


@pytest.mark.slow
def test_online_rounds_under_tp2_and_dp_shard2_match_one_process(chat_run, tmp_path):
    """Every rank samples the round in lockstep (the forwards are collective): tp=2 and
    dp_shard=2 write the same round files and reach the same losses as one process."""
    from parallel_cases import run_jobs
    from parallel_harness import run_on_ranks
    from conftest import train_tp_splittable_chat_model

    base = train_tp_splittable_chat_model(chat_run, tmp_path)

    def cfg(name: str, parallel: dict) -> dict:
        out = online_config(chat_run, tmp_path, name, rounds=2, steps_per_round=2)
        out["model"] = {"preset": "tiny-test", "init_from": base}
        out["train"]["steps"] = 4
        out["parallel"] = parallel
        out["rollout"]["max_new_tokens"] = 16
        out["dpo"]["judge"] = {"kind": "rubric", "rules": [{"pattern": "returns a list"},  # partial credit
                                                          {"pattern": r"\[source: `{source}`\]"}]}
        return out

    reference = train(config_from_dict(cfg("one", {}))).losses
    run_on_ranks(2, run_jobs, [("dp2", "train", cfg("dp2", {"dp_shard": 2}), None),
                               ("tp2", "train", cfg("tp2", {"tp": 2}), None)], str(tmp_path))
    for name in ("dp2", "tp2"):
        losses = torch.load(tmp_path / f"{name}.pt", weights_only=False)
        assert max(abs(a - b) for a, b in zip(losses, reference)) <= 1e-5, name
        for index in range(2):
            got, want = round_lines(tmp_path / name, index), round_lines(tmp_path / "one", index)
            got_logprobs, want_logprobs = pop_logprobs(got), pop_logprobs(want)
            assert got == want, (name, index)  # the same tokens, texts, scores and pairs
            np.testing.assert_allclose(got_logprobs, want_logprobs, rtol=0, atol=1e-4, err_msg=f"{name} {index}")
    assert sum(json.loads(line)["pairs"] for line in
               (tmp_path / "one" / "rounds" / "summary.jsonl").read_text().splitlines()) > 0
