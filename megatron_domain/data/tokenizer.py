"""Tokenizers: a Hugging Face `tokenizer.json` (file or model folder) through the `tokenizers`
library, or a byte-level BPE trained locally for the demo."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOD_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eot_id|>")
DEMO_EOD = "<|endoftext|>"
CHATML_SPECIALS = ("<|im_start|>", "<|im_end|>")  # one token each, as in Qwen's tokenizer


class TextTokenizer:
    """Thin wrapper that knows the end-of-document id and the vocabulary size."""

    def __init__(self, tokenizer: Tokenizer, eod_id: int, source: str):
        self.tokenizer = tokenizer
        self.eod_id = eod_id
        self.source = source

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (incl. added special tokens)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        """Alias used by megatron-core's dataset classes."""
        return self.eod_id

    def encode(self, text: str) -> list[int]:
        """Text -> ids (the tokenizer's own special-token post-processing applies)."""
        return self.tokenizer.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (parallel in Rust)."""
        return [enc.ids for enc in self.tokenizer.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text."""
        return self.tokenizer.decode(list(ids))

    def special_tokens(self) -> list[str]:
        """The added special tokens' strings (e.g. <|eot_id|>, <|im_end|>)."""
        return [t.content for t in self.tokenizer.get_added_tokens_decoder().values() if t.special]


def load_tokenizer(path: str | os.PathLike, eod_token: str = "", key: str = "data.tokenizer",
                   eod_key: str = "data.eod_token") -> TextTokenizer:
    """Load `tokenizer.json` (or a folder holding one); find the EOD token (`eod_token` or the
    first known end-of-text token). Errors name the path and the setting to change (`key`,
    `eod_key`: the config keys, or a command's options)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer not found: {file} ({key} must be a tokenizer.json "
                                "file or a Hugging Face model folder that contains one)")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:  # the Rust library raises a bare Exception for malformed files
        raise ValueError(f"{file}: not a valid Hugging Face tokenizer.json ({exc})") from exc
    candidates = (eod_token,) if eod_token else EOD_CANDIDATES
    for name in candidates:
        token_id = tok.token_to_id(name)
        if token_id is not None:
            return TextTokenizer(tok, token_id, str(file))
    raise ValueError(f"{file}: no end-of-document token found (tried {', '.join(candidates)}); "
                     f"set {eod_key} to the token that ends a document")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_file: str | os.PathLike,
                        extra_special_tokens: tuple[str, ...] = ()) -> TextTokenizer:
    """Train a byte-level BPE with `<|endoftext|>` as EOD (plus `extra_special_tokens`, e.g. a
    chat template's markers, each kept as one token) and save it (atomically) to `out_file`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[DEMO_EOD, *extra_special_tokens],
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(out_file.name + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, out_file)
    return TextTokenizer(tok, tok.token_to_id(DEMO_EOD), str(out_file))
