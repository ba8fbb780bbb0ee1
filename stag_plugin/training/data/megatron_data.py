"""Megatron-LM's data flags, on data that is tokenized already:

    --data-path [weight] prefix [weight] prefix ...   Megatron indexed datasets (`prefix.bin`
                                                      and `prefix.idx`, as Megatron-LM's
                                                      tools/preprocess_data.py or megatron-core's
                                                      IndexedDatasetBuilder write them), blended
                                                      by the weights (normalised)
    --split 969,30,1                                  train, valid, test shares of each dataset's
                                                      documents (Megatron-LM's default when
                                                      --data-path is given without it)
    --mock-data                                       megatron-core's MockGPTDataset

The datasets are built as Megatron-LM's pretrain_gpt builds them: BlendedMegatronDatasetBuilder
over GPTDataset (MockGPTDataset), with the tokenizer --tokenizer-type names (the ids are in the
files already, so no tokenizer is trained).

    uses_megatron_data(data_path, mock)    whether the flags name such data
    MegatronData.from_flags(...)           the checked blend, split and index cache folder
    build_megatron_datasets(data, tokenizer, seq_length, seed, num_samples)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from stag_plugin.training.data.corpus import DataError

DEFAULT_SPLIT = "969, 30, 1"  # Megatron-LM's validate_args, for --data-path without --split
CACHE = "gpt-dataset-cache"  # <data-cache-dir>/<this>: GPTDataset's index cache


def _weight(word: str) -> Optional[float]:
    try:
        return float(word)
    except ValueError:
        return None


def _is_weight(word: str) -> bool:
    """A number that is not also the name of a file or folder."""
    return _weight(word) is not None and not Path(word).exists()


def _is_prefix(word: str) -> bool:
    return Path(word + ".bin").is_file() and Path(word + ".idx").is_file()


def uses_megatron_data(data_path: Optional[Sequence[str]], mock: bool = False) -> bool:
    """--mock-data, or a --data-path with a weight or a `.bin`/`.idx` prefix in it."""
    words = list(data_path or [])
    return bool(mock) or any(_is_weight(w) or _is_prefix(w) for w in words)


def parse_blend(words: Sequence[str]) -> tuple:
    """([prefix, ...], [weight, ...] or None) of `prefix prefix ...` or `weight prefix ...`,
    read as Megatron-Core's get_blend_from_list reads them (pairs when every other word from the
    first is a number), every prefix's `.bin` and `.idx` checked."""
    words = list(words)
    prefixes, weights = words, None
    if len(words) % 2 == 0 and all(_weight(w) is not None for w in words[0::2]):
        prefixes, weights = words[1::2], [_weight(w) for w in words[0::2]]
        if min(weights) < 0 or sum(weights) <= 0:
            raise DataError(f"--data-path weights {weights} must be >= 0 and not all 0",
                            "give each prefix a share, e.g. `0.3 a 0.7 b`")
    for prefix in prefixes:
        if not _is_prefix(prefix):
            missing = " and ".join(f"{prefix}{ext}" for ext in (".bin", ".idx")
                                   if not Path(prefix + ext).is_file())
            raise DataError(f"--data-path prefix {prefix}: no {missing}",
                            "name Megatron indexed datasets by their prefix (the path without "
                            ".bin/.idx), each after its weight if any; corpus files (JSONL, "
                            "text) cannot be mixed with them")
    return prefixes, weights


def check_split(split: str) -> list:
    """The normalised (train, valid, test) shares of a --split string, as Megatron-Core reads
    it; validation needs a share (stag train validates at the end of every run)."""
    numbers = [_weight(n) for n in re.findall(r"[.0-9]+", split)]
    if (None in numbers or not 1 <= len(numbers) <= 3 or sum(numbers) <= 0
            or re.search(r"[^.0-9,\s]", split)):
        raise DataError(f"--split {split!r} is not up to three shares such as '969,30,1'",
                        "pass train,valid,test shares of the documents, e.g. --split 969,30,1")
    numbers += [0.0] * (3 - len(numbers))
    if numbers[1] == 0:
        raise DataError(f"--split {split!r} leaves no documents for validation",
                        "give validation a share, e.g. --split 969,30,1")
    return [n / sum(numbers) for n in numbers]


@dataclass(frozen=True)
class MegatronData:
    """--data-path prefixes (with weights) and --split, or --mock-data (`blend` None)."""

    blend: Optional[tuple]  # ([prefix, ...], [weight, ...] or None)
    split: str
    cache_dir: Path  # GPTDataset's index cache (Megatron-LM's --data-cache-path)

    @property
    def mock(self) -> bool:
        return self.blend is None

    @classmethod
    def from_flags(cls, data_path, split: Optional[str], mock: bool,
                   data_cache_dir: Path) -> "MegatronData":
        if mock and data_path:
            raise DataError("--mock-data and --data-path both given",
                            "drop one: --mock-data trains on megatron-core's generated tokens")
        split = split if split is not None else DEFAULT_SPLIT
        check_split(split)
        blend = None if mock else parse_blend(data_path)
        return cls(blend, split, Path(data_cache_dir) / CACHE)

    def describe(self) -> str:
        if self.mock:
            return "megatron-core's MockGPTDataset"
        prefixes, weights = self.blend
        shares = "" if weights is None else f" weighted {weights}"
        return f"Megatron indexed datasets {prefixes}{shares}, split {self.split!r}"


def build_megatron_datasets(data: MegatronData, tokenizer, seq_length: int, seed: int,
                            num_samples: Sequence[Optional[int]]) -> list:
    """[train, valid, test] (None for a split without documents) as Megatron-LM's pretrain_gpt
    builds them. A sample count None asks for one epoch: a weighted blend then blends its
    datasets by their sizes (Megatron-Core needs a count to apply weights)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    blend = data.blend
    if blend is not None and blend[1] is not None and None in num_samples:
        blend = (blend[0], None)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=blend, split=data.split,
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False, path_to_cache=str(data.cache_dir),
        mmap_bin_files=True)
    if not data.mock:
        config.split_matrix = _without_empty_splits(blend[0], config.split_matrix)
    cls = MockGPTDataset if data.mock else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, list(num_samples), lambda: True, config).build()


def _without_empty_splits(prefixes: Sequence[str], split_matrix: list) -> list:
    """The split matrix without the splits that get no document of some prefix (Megatron-Core
    would loop forever asking such a split for samples): e.g. the test share 1 of 969,30,1
    over fewer than 500 documents. Such a split gives None, as one without a share."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    counts = [IndexedDataset(prefix).sequence_lengths.shape[0] for prefix in prefixes]
    return [None if span is None or any(
        int(round(span[0] * n)) >= int(round(span[1] * n)) for n in counts) else span
        for span in split_matrix]
