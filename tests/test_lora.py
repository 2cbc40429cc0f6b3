"""LoRA and QLoRA as model converters of the one engine: merge/unmerge, frozen base,
adapter-only checkpoints with exact resume, several adapters on one base, NF4 base memory."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from megatron_domain.config import config_from_dict
from megatron_domain.engine import train
from megatron_domain.eval.harness import load_eval_model
from megatron_domain.models.llama import build_model, materialize
from megatron_domain.models.lora import (
    LoRALinear, apply_lora, merge_lora, quantize_frozen_linears, trainable_parameters, unmerge_lora)
from megatron_domain.models.ao import weight_bytes

from conftest import tiny_config_dict

LORA = {"rank": 4, "dropout": 0.0}


def lora_model(seed: int = 0):
    cfg = config_from_dict({"model": {"preset": "tiny-test"}, "data": {"seq_len": 64}}).model
    model = build_model(cfg)
    apply_lora(model, rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
    model = materialize(model, "cpu", seed=seed)
    with torch.no_grad():  # a trained-looking adapter (B = 0 at init would make merging trivial)
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_b.normal_(0, 0.05)
    return model.eval()


def test_merge_equals_adapter_and_unmerge_restores_bitwise():
    model = lora_model()
    tokens = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32).expand(2, 32)
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight")}
    with torch.no_grad():
        adapter_logits = model(tokens, positions)
        merge_lora(model)
        merged_logits = model(tokens, positions)
    assert (merged_logits - adapter_logits).abs().max() <= 1e-5
    assert not torch.equal(model.layers["0"].self_attn.q_proj.weight, base_weights["layers.0.self_attn.q_proj.weight"])
    unmerge_lora(model)
    for name, param in model.named_parameters():
        if name in base_weights:
            assert torch.equal(param, base_weights[name]), name  # bitwise
    with torch.no_grad():
        assert torch.equal(model(tokens, positions), adapter_logits)


def test_only_adapters_train_and_checkpoints_hold_only_them(tiny_config, corpora, tmp_path):
    base = train(tiny_config("base", steps=2)).final_checkpoint
    cfg = config_from_dict({**tiny_config_dict(corpora, tmp_path / "sft", steps=4, checkpoint_every=2),
                            "model": {"preset": "tiny-test", "init_from": str(base)}, "lora": LORA})
    losses = train(cfg).losses
    assert losses[-1] < losses[0]
    stored = FileSystemReader(str(tmp_path / "sft" / "checkpoints" / "step_0000004")).read_metadata()
    model_keys = [k for k in stored.state_dict_metadata if k.startswith("model.")]
    assert model_keys and all(k.endswith(("lora_a", "lora_b")) for k in model_keys)  # adapters only
    assert len(model_keys) == 2 * 7 * 2
    # the optimizer state too: AdamW moments and step of the adapters only, none of the base
    optim_keys = [k for k in stored.state_dict_metadata if k.startswith("optim.state.")]
    moments = {k.split(".", 2)[2].rsplit(".", 1)[0] for k in optim_keys}
    assert moments == {k[len("model."):] for k in model_keys}
    assert {k.rsplit(".", 1)[1] for k in optim_keys} == {"exp_avg", "exp_avg_sq", "step"}
    # the base is untouched: the LoRA model with B = 0 would equal it; with the trained adapter
    # merged and unmerged, the base weights equal the base checkpoint bitwise
    model = load_eval_model(cfg, str(tmp_path / "sft"), torch.device("cpu"))
    plain = load_eval_model(config_from_dict(tiny_config_dict(corpora, tmp_path / "x")), str(base), torch.device("cpu"))
    plain_weights = dict(plain.named_parameters())
    for name, param in model.named_parameters():
        if not name.endswith(("lora_a", "lora_b")):
            assert torch.equal(param, plain_weights[name]), name
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < 0.2 * total


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_resume_equals_uninterrupted(tiny_config, corpora, tmp_path, dropout):
    """Exact resume, also with LoRA dropout (the training RNG is restored and nothing draws
    from it between the restore and the first step)."""
    base = train(tiny_config("base", steps=2)).final_checkpoint
    make = lambda name, p, **train_kw: config_from_dict({  # noqa: E731
        **tiny_config_dict(corpora, tmp_path / name, steps=6, **train_kw),
        "model": {"preset": "tiny-test", "init_from": str(base)}, "lora": {**LORA, "dropout": p}})
    straight = train(make("straight", dropout)).losses
    first = train(make("resumed", dropout, exit_at_step=3)).losses
    second = train(make("resumed", dropout), resume=True).losses
    assert first + second == straight
    if dropout:  # dropout really draws random masks: the losses differ from a run without it
        assert train(make("no_dropout", 0.0)).losses[1:] != straight[1:]


def test_lora_dropout_drops_only_the_adapter_input():
    """y = x W^T + b + (alpha / r) * dropout(x) A^T B^T, against a hand-written mask: the mask
    is drawn from the torch generator like F.dropout, scales kept inputs by 1 / (1 - p), and
    eval mode turns it off."""
    torch.manual_seed(0)
    layer = LoRALinear(8, 6, bias=True, rank=2, alpha=4.0, dropout=0.5)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
        layer.lora_a.normal_()
        layer.lora_b.normal_()
    x = torch.randn(3, 8)
    torch.manual_seed(1)
    got = layer(x)
    torch.manual_seed(1)
    mask = torch.empty_like(x).bernoulli_(0.5)  # what F.dropout draws: keep with probability 1 - p
    dropped = x * mask / 0.5
    expected = x @ layer.weight.T + layer.bias + 2.0 * (dropped @ layer.lora_a.T @ layer.lora_b.T)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    layer.eval()
    plain = x @ layer.weight.T + layer.bias + 2.0 * (x @ layer.lora_a.T @ layer.lora_b.T)
    torch.testing.assert_close(layer(x), plain, rtol=1e-6, atol=1e-6)


def test_two_adapters_on_one_base_stay_separate(tiny_config, corpora, tmp_path):
    """Per-tenant adapters: two runs on the same base with different data give different
    adapters, each loads on its own, and the base checkpoint is unchanged."""
    base = train(tiny_config("base", steps=2)).final_checkpoint
    before = FileSystemReader(str(base)).read_metadata()
    tenants = {}
    for tenant, corpus in (("alpha", "alpha_train"), ("beta", "beta_train")):
        data = tiny_config_dict(corpora, tmp_path / tenant, steps=3)
        data["data"]["corpora"] = [{"name": tenant, "path": corpora[corpus], "weight": 1.0}]
        cfg = config_from_dict({**data, "model": {"preset": "tiny-test", "init_from": str(base)}, "lora": LORA})
        train(cfg)
        tenants[tenant] = load_eval_model(cfg, str(tmp_path / tenant), torch.device("cpu"))
    a = tenants["alpha"].layers["0"].self_attn.q_proj.lora_b
    b = tenants["beta"].layers["0"].self_attn.q_proj.lora_b
    assert not torch.equal(a, b)
    assert FileSystemReader(str(base)).read_metadata().state_dict_metadata.keys() == before.state_dict_metadata.keys()


def test_qlora_trains_with_a_quarter_of_the_base_memory(corpora, tmp_path):
    """A base trained on alpha only, adapters trained on beta: the QLoRA loss falls, tracks
    plain LoRA within 1% (same adapters, 4-bit base), and the NF4 base weights take ~1/4 of
    their bf16 size."""
    base_data = tiny_config_dict(corpora, tmp_path / "base", steps=10)
    base_data["data"]["corpora"] = [{"name": "alpha", "path": corpora["alpha_train"], "weight": 1.0}]
    base = train(config_from_dict(base_data)).final_checkpoint
    losses = {}
    for quantize in ("none", "nf4"):
        data = tiny_config_dict(corpora, tmp_path / quantize, steps=10)
        data["data"]["corpora"] = [{"name": "beta", "path": corpora["beta_train"], "weight": 1.0}]
        cfg = config_from_dict({**data, "model": {"preset": "tiny-test", "init_from": str(base)},
                                "lora": {**LORA, "quantize_base": quantize},
                                "optim": {"lr": 2e-2, "min_lr": 2e-3, "warmup_steps": 1}})
        losses[quantize] = train(cfg).losses
    qlora = losses["nf4"]
    assert sum(qlora[-3:]) / 3 < sum(qlora[:3]) / 3 - 0.08
    assert max(abs(a - b) / b for a, b in zip(qlora, losses["none"])) < 0.01
    model = build_model(cfg.model)
    apply_lora(model, 4, 8.0, 0.0, tuple(cfg.lora.targets))
    model = materialize(model, "cpu", seed=0)
    bf16_bytes = sum(m.weight.numel() * 2 for m in model.modules() if isinstance(m, LoRALinear))
    assert quantize_frozen_linears(model) == 14
    nf4_bytes = sum(weight_bytes(m.weight) for m in model.modules() if isinstance(m, LoRALinear))
    assert 0.25 <= nf4_bytes / bf16_bytes <= 0.30  # 4 bits + double-quantized scales


def test_bad_lora_settings_are_reported(corpora, tmp_path):
    data = {**tiny_config_dict(corpora, tmp_path / "x"),
            "lora": {"rank": 0, "targets": ["q_proj", "qkv"], "quantize_base": "nf4"}}
    with pytest.raises(ValueError) as err:
        config_from_dict(data)
    assert "lora.targets: ['qkv']" in str(err.value)
    assert "lora.quantize_base: nf4 quantizes the frozen base for QLoRA; it needs lora.rank > 0" in str(err.value)
