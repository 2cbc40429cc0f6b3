"""Chat data for SFT: the loss covers exactly the assistant turns (content + end-of-turn)
under every template; bad conversations fail with file, line and the fix."""

from __future__ import annotations

import json

import numpy as np

import pytest
from tokenizers import AddedToken, Tokenizer

from megatron_domain.data.chat import ChatDataError, encode_conversation, load_template, read_conversations
from megatron_domain.data.tokenizer import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You answer questions about the module."},
    {"role": "user", "content": "What does the function return?"},
    {"role": "assistant", "content": "It returns a list of values. [source: alpha-1]"},
    {"role": "user", "content": "And when does it raise?"},
    {"role": "assistant", "content": "It raises an error when the module is missing. [source: alpha-2]"},
    {"role": "user", "content": "Thanks, the module?"},
    {"role": "assistant", "content": "The module and the function. [source: alpha-3]"},
]
OWN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")


@pytest.fixture
def chat_tokenizer(corpora, tmp_path):
    """The test BPE plus <|im_start|>/<|im_end|> as special tokens and its own chat template."""
    tok = Tokenizer.from_file(corpora["tokenizer"])
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    folder = tmp_path / "tok"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": OWN_TEMPLATE, "eos_token": "<|im_end|>"}))
    return folder


@pytest.mark.parametrize("template_name", ["llama3", "chatml", "tokenizer"])
def test_loss_mask_is_exactly_the_assistant_turns(template_name, chat_tokenizer):
    tokenizer = load_tokenizer(chat_tokenizer)
    template = load_template(template_name, str(chat_tokenizer))
    ids, trained = encode_conversation(CONVERSATION, template, tokenizer)
    eot = template.end_of_turn or "<|im_end|>"
    expected = "".join(m["content"] + eot for m in CONVERSATION if m["role"] == "assistant")
    # decode each maximal run of trained tokens: together they are the assistant turns, nothing else
    runs, current = [], []
    for token, is_trained in zip(ids.tolist(), trained.tolist()):
        if is_trained:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    assert len(runs) == 3
    decoded = [tokenizer.tokenizer.decode(run, skip_special_tokens=False) for run in runs]
    assert "".join(decoded) == expected
    untrained = tokenizer.tokenizer.decode(ids[~trained].tolist(), skip_special_tokens=False)
    for message in CONVERSATION:
        if message["role"] != "assistant":
            assert message["content"] in untrained


def test_prompt_response_records_and_bad_input(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "Q?", "response": "A.", "system": "S"}) + "\n\n")
    assert read_conversations(good) == [[{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"},
                                         {"role": "assistant", "content": "A."}]]
    cases = {
        "no_assistant.jsonl": ({"messages": [{"role": "user", "content": "hi"}]}, r":1: the conversation has no assistant"),
        "bad_role.jsonl": ({"messages": [{"role": "bot", "content": "hi"}]}, r":1: message 0 has unknown role 'bot'"),
    }
    for name, (record, message) in cases.items():
        path = tmp_path / name
        path.write_text(json.dumps(record) + "\n")
        with pytest.raises(ChatDataError, match=rf"{name}{message}"):
            read_conversations(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ChatDataError, match="empty.jsonl: the file is empty"):
        read_conversations(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{not json\n")
    with pytest.raises(ChatDataError, match=r"broken.jsonl:2: not valid JSON"):
        read_conversations(broken)


def _examples(tokenizer, template_name="chatml"):
    from megatron_domain.data.chat import encode_conversation, load_template
    template = load_template(template_name)
    conversations = [CONVERSATION, CONVERSATION[1:3], [{"role": "user", "content": "the module?"},
                                                       {"role": "assistant", "content": "It raises. [source: b]"}]]
    return [encode_conversation(c, template, tokenizer) for c in conversations]


def test_packed_sft_loss_equals_unpacked(corpora):
    """Best-fit-decreasing packs several conversations in one row; with per-conversation
    positions and attention the summed loss equals running each conversation alone."""
    import torch

    from megatron_domain.config import model_config_from_dict
    from megatron_domain.data.chat import pack_conversations
    from megatron_domain.models.llama import build_model, materialize
    from megatron_domain.stages.causal_lm import causal_lm_forward_step

    tokenizer = load_tokenizer(corpora["tokenizer"])
    examples = _examples(tokenizer)
    model = materialize(build_model(model_config_from_dict({"preset": "tiny-test"})), "cpu", seed=0).eval()

    def loss_sum(packed):
        batch = {k: torch.from_numpy(getattr(packed, k)) for k in
                 ("tokens", "labels", "loss_mask", "position_ids", "document_ids")}
        with torch.no_grad():
            logits, loss_fn = causal_lm_forward_step(batch, model)
            total, count, _ = loss_fn(logits)
        return total.item(), int(count.item())

    def naive_loss_sum(ids, trained):
        """Each conversation alone, by hand: token t+1 is predicted from tokens 0..t, and
        counts when it is an assistant token."""
        with torch.no_grad():
            logits = model(ids[None, :-1], torch.arange(len(ids) - 1)[None])[0]  # [S-1, V]
        per_token = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none")  # [S-1]
        return float((per_token * trained[1:]).sum()), int(trained[1:].sum())

    total_len = sum(len(ids) - 1 for ids, _ in examples)
    packed = pack_conversations(examples, seq_len=total_len + 5, pad_id=tokenizer.eod_id)
    assert packed.tokens.shape[0] == 1  # all three share one row
    alone = [naive_loss_sum(torch.as_tensor(ids), torch.as_tensor(trained).float()) for ids, trained in examples]
    assert all(count > 0 for _, count in alone)
    for example, (reference, _) in zip(examples, alone):  # one conversation per packed row agrees too
        single = loss_sum(pack_conversations([example], seq_len=len(example[0]) - 1, pad_id=tokenizer.eod_id))
        assert abs(single[0] - reference) <= 1e-5 * max(1.0, abs(reference))
    together = loss_sum(packed)
    assert together[1] == sum(c for _, c in alone)
    assert abs(together[0] - sum(s for s, _ in alone)) <= 1e-5 * max(1.0, abs(together[0]))


def test_best_fit_decreasing_and_overflow(corpora):
    from megatron_domain.data.chat import pack_conversations

    tokenizer = load_tokenizer(corpora["tokenizer"])
    examples = _examples(tokenizer)
    lengths = sorted(len(ids) - 1 for ids, _ in examples)
    seq_len = lengths[-1] - 1  # the longest no longer fits
    truncated = pack_conversations(examples, seq_len, tokenizer.eod_id, overflow="truncate")
    dropped = pack_conversations(examples, seq_len, tokenizer.eod_id, overflow="drop")
    assert (truncated.truncated, truncated.dropped) == (1, 0)
    assert (dropped.truncated, dropped.dropped) == (0, 1)
    assert truncated.loss_mask.sum() > dropped.loss_mask.sum()
    # the two short ones share a row when they fit together
    assert dropped.tokens.shape[0] == (1 if lengths[0] + lengths[1] <= seq_len else 2)


def test_template_markers_missing_from_the_tokenizer_are_warned(corpora, chat_tokenizer):
    """llama3 on a tokenizer without its markers: each is named with the number of tokens it
    splits into; chatml on a tokenizer that has <|im_start|>/<|im_end|> is quiet."""
    import warnings

    from megatron_domain.data.chat import warn_if_markers_split

    plain = load_tokenizer(corpora["tokenizer"])
    with pytest.warns(UserWarning, match=r"data.chat.template=llama3: .*<\|eot_id\|> -> \d+ tokens.*not single tokens"):
        split = warn_if_markers_split(load_template("llama3"), plain)
    assert set(split) == {"<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
    assert all(n > 1 for n in split.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_if_markers_split(load_template("chatml"), load_tokenizer(chat_tokenizer)) == {}


def test_best_fit_decreasing_places_like_the_textbook_rule():
    """Needs 6, 10, 8, 9, 7, 5, 12, 3 in rows of 16, placed longest first, each into the fullest
    row it fits (worked by hand): {12}, {10, 6}, {9, 7}, {8, 5, 3}. First fit would put the 3
    with the 12; packing in input order would differ too."""
    from megatron_domain.data.chat import pack_conversations

    needs = [6, 10, 8, 9, 7, 5, 12, 3]
    # example i: ids 100*i, 100*i+1, ... (need + 1 tokens, so `need` positions), all trained
    examples = [(np.arange(100 * i, 100 * i + n + 1), np.ones(n + 1, bool)) for i, n in enumerate(needs)]
    packed = pack_conversations(examples, seq_len=16, pad_id=0)
    rows = []
    for r in range(packed.tokens.shape[0]):
        firsts = [int(packed.tokens[r, p]) for p in range(16)
                  if packed.position_ids[r, p] == 0 and packed.loss_mask[r, p]]
        rows.append([t // 100 for t in firsts])
    assert rows == [[6], [1, 0], [3, 4], [2, 5, 7]]
    for r, row in enumerate(rows):  # positions restart per example, labels are the next ids
        start = 0
        for i in row:
            n = needs[i]
            assert packed.position_ids[r, start:start + n].tolist() == list(range(n))
            assert packed.labels[r, start:start + n].tolist() == list(range(100 * i + 1, 100 * i + n + 1))
            start += n
        assert not packed.loss_mask[r, start:].any()
