"""Data: preprocessing, clear errors for bad input, blend ratios, and packing masks that never
cross a document boundary (checked from the masks themselves)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megatron_domain.data.indexed import build_blended_dataset, read_documents
from megatron_domain.data.packing import PackedSampleStream
from megatron_domain.data.preprocess import preprocess
from megatron_domain.data.tokenizer import load_tokenizer
from megatron_domain.kernels.pack import pack_metadata_reference
from megatron_domain.models.attention import document_causal_mask


def test_preprocess_jsonl_and_text_round_trip(corpora, tmp_path):
    """Each JSONL record and each text file becomes one document, its tokens then EOD."""
    tok = load_tokenizer(corpora["tokenizer"])
    texts = ["the function returns a list.", "an expression evaluates to an object."]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in texts) + "\n\n")
    txt = tmp_path / "b.txt"
    txt.write_text("the module raises an error")
    stats = preprocess([str(jsonl), str(txt)], tok, str(tmp_path / "out" / "c"), progress=False)
    assert stats["documents"] == 3
    docs = read_documents(str(tmp_path / "out" / "c"))
    expected = [tok.encode(t) + [tok.eod_id] for t in texts + ["the module raises an error"]]
    assert [d.tolist() for d in docs] == expected
    assert not list((tmp_path / "out").glob("*.tmp*"))


@pytest.mark.parametrize("line,message", [
    ('{"text": "ok"}\n{"text": "broken"\n', "bad.jsonl:2: invalid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', "bad.jsonl:2: no 'text' field"),
    ('{"text": 5}\n', "bad.jsonl:1: field 'text' must be a string"),
])
def test_malformed_jsonl_names_file_and_line(corpora, tmp_path, line, message):
    """Malformed input fails naming file and line, and leaves no output behind."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line)
    with pytest.raises(ValueError, match=message):
        preprocess([str(bad)], load_tokenizer(corpora["tokenizer"]), str(tmp_path / "out"), progress=False)
    assert not list(tmp_path.glob("out*"))


def test_tokenizer_errors(tmp_path):
    """A missing tokenizer and one with no EOD token fail with what to set."""
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        load_tokenizer(tmp_path / "nope.json")
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "t.json"))
    with pytest.raises(ValueError, match="data.eod_token"):
        load_tokenizer(tmp_path / "t.json")


def test_pack_metadata_masks_never_cross_documents():
    """From the masks: attention never links two documents; no counted label crosses an EOD."""
    eod = 0
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 20, (3, 50), generator=gen)
    tokens[torch.rand(3, 50, generator=gen) < 0.1] = eod
    tokens[1, 0] = eod  # a row starting with an EOD (end of a previous sample's document)
    meta = pack_metadata_reference(tokens, eod)
    mask = document_causal_mask(meta.document_ids)[:, 0]  # [B, S, S]
    for b in range(3):
        for i in range(50):
            for j in range(50):
                crosses = j > i or bool((tokens[b, j:i] == eod).any())  # an EOD between key j and query i
                assert bool(mask[b, i, j]) == (not crosses)
            # a counted prediction: token i and its label i+1 are in the same document
            if meta.loss_mask[b, i] and i + 1 < 50:
                assert meta.document_ids[b, i] == meta.document_ids[b, i + 1]
                assert tokens[b, i] != eod
        starts = [0] + [i + 1 for i in range(49) if tokens[b, i] == eod]
        for s, e in zip(starts, starts[1:] + [50]):
            assert meta.position_ids[b, s:e].tolist() == list(range(e - s))
    assert meta.cu_seqlens[-1] == 150 and bool((meta.cu_seqlens[1:] > meta.cu_seqlens[:-1]).all())


def test_blend_ratio_of_sampled_tokens(corpora, tmp_path):
    """megatron-core's blended dataset gives each corpus its configured share of tokens (+-2%)."""
    tok = load_tokenizer(corpora["tokenizer"])
    for weights in ([0.9, 0.1], [0.5, 0.5]):
        ds = build_blended_dataset([corpora["alpha_train"], corpora["beta_train"]], weights, num_samples=2000,
                                   seq_len=32, vocab_size=tok.vocab_size, eod_id=tok.eod_id, seed=0,
                                   cache_dir=str(tmp_path / f"cache{weights[0]}"))
        stream = PackedSampleStream(ds, tok.eod_id)
        counts = np.zeros(2)
        for start in range(0, 2000, 100):
            batch = stream.micro_batch(start, 100)
            np.add.at(counts, batch["dataset_id"].numpy(), batch["tokens"].shape[1])
        share = counts / counts.sum()
        assert np.abs(share - np.array(weights)).max() <= 0.02, share
        # every row really comes from its corpus: beta rows contain no alpha-only word pieces
        alpha_only = set(tok.encode(" function returns module"))
        beta_rows = batch["tokens"][batch["dataset_id"] == 1]
        assert not (set(beta_rows.flatten().tolist()) & alpha_only)


def test_tokenizer_from_model_folder_and_explicit_eod(corpora, tmp_path):
    """A Hugging Face model folder (holding tokenizer.json) loads; data.eod_token picks the EOD."""
    import shutil

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(corpora["tokenizer"], folder / "tokenizer.json")
    tok = load_tokenizer(folder)
    assert tok.eod_id == corpora["eod_id"] and tok.vocab_size == corpora["vocab_size"]
    assert load_tokenizer(folder, eod_token="<|endoftext|>").eod_id == tok.eod_id
    with pytest.raises(ValueError, match="set data.eod_token"):
        load_tokenizer(folder, eod_token="</not-a-token>")
