"""Megatron indexed corpora (`.bin`/`.idx`) and megatron-core's blended GPT dataset.

This is the only module that imports `megatron.core`. Its package import prints warnings
about Transformer Engine / Apex being absent; they are irrelevant to the data pipeline and
silenced here.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Sequence

import numpy as np
import torch

from megatron_domain.parallel.distributed import ensure_process_group


def _megatron():
    """Import the megatron-core dataset modules (lazily, warnings about optional GPU libs muted)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("megatron").setLevel(logging.WARNING)
        from megatron.core.datasets import indexed_dataset
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    return SimpleNamespace(indexed_dataset=indexed_dataset, Builder=BlendedMegatronDatasetBuilder,
                           GPTDataset=GPTDataset, GPTDatasetConfig=GPTDatasetConfig)


def token_dtype(vocab_size: int) -> type:
    """Smallest integer dtype that holds every token id."""
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32


def check_prefix(prefix: str, field: str) -> None:
    """Raise FileNotFoundError naming the config field when `prefix.bin` or `prefix.idx` is absent."""
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(prefix + suffix):
            raise FileNotFoundError(f"{field}: {prefix}{suffix} does not exist; the path must be an indexed "
                                    "dataset prefix (without .bin/.idx), e.g. written by `mdt data preprocess`")


def write_indexed_dataset(prefix: str | os.PathLike, documents: Iterable[Sequence[int]], vocab_size: int) -> dict:
    """Write documents (token id lists, EOD included) as `prefix.bin/.idx`, atomically:
    both files are written under a temporary name and renamed when complete."""
    mc = _megatron()
    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix + ".tmp"
    dtype = token_dtype(vocab_size)
    builder = mc.indexed_dataset.IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    num_docs = num_tokens = 0
    try:
        for doc in documents:
            builder.add_document(np.asarray(doc, dtype=dtype), [len(doc)])
            num_docs += 1
            num_tokens += len(doc)
        builder.finalize(tmp + ".idx")
        if num_docs == 0:
            raise ValueError(f"no non-empty documents to write to {prefix}")
    except BaseException:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            Path(tmp + suffix).unlink(missing_ok=True)
        raise
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    return {"documents": num_docs, "tokens": num_tokens}


def read_documents(prefix: str, field: str = "path") -> list[np.ndarray]:
    """All documents of an indexed dataset as arrays of token ids."""
    check_prefix(prefix, field)
    ds = _megatron().indexed_dataset.IndexedDataset(prefix)
    return [np.array(ds[i], copy=True) for i in range(len(ds))]  # copies: the mmap closes with `ds`


@dataclass
class TokenInfo:
    """The tokenizer facts megatron-core's GPTDataset asks for (`vocab_size`, `eod`)."""

    vocab_size: int
    eod: int

    @property
    def unique_identifiers(self) -> dict:
        """Part of the dataset cache key megatron-core hashes."""
        return {"class": "TokenInfo", "vocab_size": self.vocab_size, "eod": self.eod}


def build_blended_dataset(prefixes: list[str], weights: list[float], num_samples: int, seq_len: int,
                          vocab_size: int, eod_id: int, seed: int, cache_dir: str) -> torch.utils.data.Dataset:
    """megatron-core's BlendedMegatronDatasetBuilder over `prefixes` with explicit `weights`:
    `num_samples` rows of seq_len + 1 tokens (documents concatenated across EOD), each tagged
    with `dataset_id`. Masks and positions are not computed here (see `data.packing`)."""
    mc = _megatron()
    ensure_process_group(torch.device("cpu"))  # megatron-core's builders query the default group
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    config = mc.GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_len,
        blend_per_split=[(list(prefixes), [float(w) for w in weights]), None, None],
        path_to_cache=cache_dir, tokenizer=TokenInfo(vocab_size, eod_id),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, mid_level_dataset_surplus=0.005)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train, _, _ = mc.Builder(mc.GPTDataset, [num_samples, None, None], lambda: True, config).build()
    return train
