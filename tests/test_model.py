"""Model: packed rows equal unpacked documents; parity with transformers' Llama/Qwen2; meta build."""

from __future__ import annotations

import pytest
import torch

from megatron_domain.config import config_from_dict
from megatron_domain.kernels.pack import pack_metadata_reference
from megatron_domain.losses import masked_cross_entropy_sum

from conftest import naive_nll_sum
from megatron_domain.models.llama import build_model, count_parameters, materialize

EOD = 3


def tiny_model(**overrides):
    cfg = config_from_dict({"model": {"preset": "tiny-test", **overrides}, "data": {"seq_len": 64}}).model
    return materialize(build_model(cfg), "cpu", seed=0).eval(), cfg


def random_documents(lengths, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        doc = torch.randint(4, vocab, (n,), generator=gen)
        doc[-1] = EOD
        docs.append(doc)
    return docs


@pytest.mark.parametrize("variant", [{}, {"qkv_bias": True, "tie_embeddings": True},
                                     {"num_kv_heads": 4}, {"num_kv_heads": 1}])
@torch.no_grad()
def test_packed_equals_unpacked(variant):
    """Logits and loss of documents packed in one row equal each document run alone (fp32)."""
    model, cfg = tiny_model(**variant)
    docs = random_documents([7, 19, 1, 12, 25], cfg.vocab_size)
    row = torch.cat(docs)[None]  # [1, S]
    meta = pack_metadata_reference(row, EOD)
    packed = model(row, meta.position_ids, meta.document_ids)[0]  # [S, V]
    labels = torch.cat([row[0, 1:], row.new_tensor([EOD])])
    packed_loss, packed_count = masked_cross_entropy_sum(packed, labels, meta.loss_mask[0])
    offset, loss, count = 0, 0.0, 0.0
    for doc in docs:
        n = len(doc)
        alone = model(doc[None], torch.arange(n)[None])[0]  # [n, V], plain causal attention
        assert (packed[offset:offset + n] - alone).abs().max().item() <= 1e-5
        # within a document, predict tokens 1..n-1 (the prediction at EOD is masked when packed)
        l, c = naive_nll_sum(alone[:-1], doc[1:]), n - 1  # independent of the loss under test
        loss, count, offset = loss + l, count + c, offset + n
    assert packed_count.item() == count
    assert abs(packed_loss.item() - float(loss)) <= 1e-5 * max(1.0, abs(float(loss)))


def _hf_model(cfg, arch):
    transformers = pytest.importorskip("transformers")
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                  num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_seq_len,
                  rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings)
    if arch == "qwen2":
        hf_cfg = transformers.Qwen2Config(**common)
        return transformers.Qwen2ForCausalLM(hf_cfg)
    if cfg.rope_scaling.type == "llama3":
        rs = cfg.rope_scaling
        common["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                                  "high_freq_factor": rs.high_freq_factor,
                                  "original_max_position_embeddings": rs.original_max_position_embeddings}
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("llama", {"rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 32}, "rope_theta": 500000.0}),
    ("qwen2", {"qkv_bias": True, "tie_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}),
])
def test_matches_transformers(arch, overrides):
    """Same weights (renamed with the `model.` prefix) -> same logits as transformers, fp32."""
    ours, cfg = tiny_model(**overrides)
    hf = _hf_model(cfg, arch).eval()
    state = {("lm_head.weight" if k == "lm_head.weight" else f"model.{k}"): v for k, v in ours.state_dict().items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    tokens = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(input_ids=tokens).logits
        got = ours(tokens, torch.arange(48).expand(2, 48))
    assert (ref - got).abs().max().item() <= 1e-4


def test_meta_build_allocates_nothing_and_counts_parameters():
    """The 70B preset builds on meta in no memory; counts match the published sizes."""
    cfg = config_from_dict({"model": {"preset": "llama3.1-70b"}}).model
    model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert abs(count_parameters(cfg)["total"] - 70.55e9) / 70.55e9 < 0.001
    cfg8 = config_from_dict({"model": {"preset": "llama3.1-8b"}}).model
    assert abs(count_parameters(cfg8)["total"] - 8.03e9) / 8.03e9 < 0.001


def test_masked_cross_entropy_sum_closed_form():
    """Uniform logits over V give log V per counted position; masked positions count for
    nothing whatever their label (even an id outside the vocabulary)."""
    import math

    logits = torch.zeros(5, 7)
    labels = torch.tensor([3, 9999, 0, -100, 6])
    mask = torch.tensor([True, False, True, False, True])
    loss, count = masked_cross_entropy_sum(logits, labels, mask)
    assert count.item() == 3 and loss.item() == pytest.approx(3 * math.log(7), rel=1e-6)
    logits[0, 3] = 2.0  # one confident correct prediction: -log(e^2 / (e^2 + 6))
    loss, _ = masked_cross_entropy_sum(logits, labels, mask)
    assert loss.item() == pytest.approx(-math.log(math.e ** 2 / (math.e ** 2 + 6)) + 2 * math.log(7), rel=1e-6)


def test_model_modules_import_one_way():
    """No import circle among megatron_domain/models/*.py, counting imports inside functions too
    (the lazy ones hid llama -> attention -> te -> ao -> lora -> llama)."""
    import ast
    from pathlib import Path

    import megatron_domain.models as models

    folder = Path(models.__file__).parent
    graph = {}
    for path in folder.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("megatron_domain.models."):
                found.add(node.module.rsplit(".", 1)[1])
        graph[path.stem] = found

    def reaches(start: str, target: str, seen: set) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    circles = [name for name in graph if reaches(name, name, {name})]
    assert not circles, {name: sorted(graph[name]) for name in circles}
