"""Prepared data on disk (tokenizer + Megatron indexed datasets) and Megatron's GPTDataset on it.

`prepare_data` turns a corpus into an output folder:

    <output_dir>/tokenizer-<key16>/spm.model     SentencePiece model trained on the train split
                                                 (the embedded default), or
    <output_dir>/tokenizer-<id16>/               the given tokenizer's folder (its files and
                                                 stag_tokenizer.json; see data.tokenizers)
    <output_dir>/{train,valid,test}_text_document.{bin,idx}
                                                 Megatron indexed datasets: one document per
                                                 file / JSONL record, each followed by one eod
    <output_dir>/manifest.json                   what was written, and the content key
    <output_dir>/cache/<key16>/                  GPTDataset index cache (built on first use)

The folder is keyed by content (every document id and text hash, the split fractions' outcome,
the tokenizer key: the trained tokenizer's cache key, or a given tokenizer's identity, so two
tokenizers never share datasets): a second call with the same inputs returns the manifest's
result without tokenizing or writing anything. Writing is crash-safe: the manifest is removed
before any dataset file is replaced and written (atomically) after all of them, and each
`.bin`/`.idx` is written under a temporary name and renamed. Every input error is raised
before the folder is touched.

`build_gpt_datasets` builds Megatron's GPTDataset for each split with
BlendedMegatronDatasetBuilder, and `batch_from_samples` collates its samples.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from stag_plugin.training.data import tokenizers
from stag_plugin.training.data.corpus import (
    SPLITS,
    DataError,
    Document,
    load_corpus,
    split_documents,
)
from stag_plugin.training.data.megatron_data import MegatronData, build_megatron_datasets
from stag_plugin.training.data.tokenizer import StagTokenizer, tokenizer_cache_key, train_tokenizer

DATA_VERSION = 1  # bump when the on-disk layout or document encoding changes
MANIFEST = "manifest.json"
ENCODE_CHUNK = 64  # documents per threaded SentencePiece batch


@dataclass
class PreparedData:
    """The result of `prepare_data`: where the tokenizer and the per-split datasets are."""

    output_dir: Path
    key: str  # sha256 content key of this folder's data
    tokenizer_path: Path  # <output_dir>/tokenizer-<key16>/spm.model, or .../stag_tokenizer.json
    tokenizer_sha256: str  # the SentencePiece model's sha256, or the given tokenizer's identity
    vocab_size: int
    prefixes: dict[str, str]  # split -> "<output_dir>/<split>_text_document"; absent if empty
    num_documents: dict[str, int]  # split -> documents written
    num_tokens: dict[str, int]  # split -> tokens written, eod tokens included
    corpus: str  # human-readable description of the corpus
    fractions: dict[str, float] = field(default_factory=dict)  # "valid"/"test" -> fraction

    @property
    def cache_dir(self) -> Path:
        """Where Megatron's GPTDataset caches its document/sample/shuffle indices."""
        return self.output_dir / "cache" / self.key[:16]

    def to_manifest(self) -> dict:
        """JSON form with paths relative to output_dir, so the folder can be moved."""
        out = asdict(self)
        out.update(
            version=DATA_VERSION,
            output_dir=None,
            tokenizer_path=self.tokenizer_path.relative_to(self.output_dir).as_posix(),
            prefixes={k: Path(v).name for k, v in self.prefixes.items()},
        )
        return out

    @classmethod
    def from_manifest(cls, output_dir: str | os.PathLike) -> "PreparedData":
        """Read `<output_dir>/manifest.json` (DataError if absent or from another version)."""
        output_dir = Path(output_dir).resolve()
        try:
            data = json.loads((output_dir / MANIFEST).read_text("utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(
                f"{output_dir} holds no readable {MANIFEST} ({err})", "run prepare_data "
                "with this output folder first."
            ) from None
        if data.pop("version", None) != DATA_VERSION:
            raise DataError(f"{output_dir}/{MANIFEST} is from another version", "prepare again.")
        data.update(
            output_dir=output_dir,
            tokenizer_path=output_dir / data["tokenizer_path"],
            prefixes={k: str(output_dir / v) for k, v in data["prefixes"].items()},
        )
        return cls(**data)


# ---------------------------------------------------------------------------------------------
# prepare_data
# ---------------------------------------------------------------------------------------------


def prepare_data(
    data_paths: Sequence[str] | None,
    output_dir: str | os.PathLike,
    vocab_size: int = 8192,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    json_key: str = "text",
    progress: bool = True,
    tokenizer: Optional[tokenizers.TokenizerSource] = None,
) -> PreparedData:
    """Load, split, tokenize, and write one indexed dataset per split.

    `data_paths` None/empty means the Python standard library. `tokenizer` None trains a
    SentencePiece tokenizer of `vocab_size` pieces on the train split (the embedded default);
    a TokenizerSource (the --tokenizer-* flags) is copied into the folder and used instead.
    Every document ends with the tokenizer's eod id. Returns the cached result without
    rewriting anything when the folder already holds data for exactly these inputs.
    """
    if tokenizer is None:
        _check_vocab_size(vocab_size)
    corpus = load_corpus(data_paths, json_key)
    splits = split_documents(corpus.documents, valid_fraction, test_fraction)
    output_dir = Path(output_dir).resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"output folder {output_dir} is a file", "pass a folder path.")
    fractions = {"valid": valid_fraction, "test": test_fraction}
    tokenizer_key = (tokenizer_cache_key(splits["train"], vocab_size) if tokenizer is None
                     else tokenizer.identity)
    key = _data_key(splits, fractions, tokenizer_key)
    cached = _load_if_current(output_dir, key)
    if cached is not None:
        return cached
    tokenizer_path, built = _prepare_tokenizer(tokenizer, tokenizer_key, splits, output_dir,
                                               vocab_size)
    (output_dir / MANIFEST).unlink(missing_ok=True)  # invalid until every file is rewritten
    prefixes, num_docs, num_tokens = _write_splits(output_dir, splits, built, progress)
    prepared = PreparedData(
        output_dir=output_dir,
        key=key,
        tokenizer_path=tokenizer_path,
        tokenizer_sha256=tokenizers.fingerprint(built),
        vocab_size=built.vocab_size,
        prefixes=prefixes,
        num_documents=num_docs,
        num_tokens=num_tokens,
        corpus=corpus.description,
        fractions=fractions,
    )
    _write_json_atomically(output_dir / MANIFEST, prepared.to_manifest())
    return prepared


def _prepare_tokenizer(source, key: str, splits, output_dir: Path, vocab_size: int):
    """(tokenizer_path, tokenizer): SentencePiece trained on the train split (cached by `key`),
    or `source` written as `<output_dir>/tokenizer-<key16>/` and built from there."""
    if source is None:
        path = train_tokenizer(splits["train"], output_dir, vocab_size)
        return path, StagTokenizer(path)
    built = tokenizers.materialize(source, output_dir / f"tokenizer-{key[:16]}")
    return built.folder / tokenizers.SPEC_FILE, built


def _write_splits(output_dir: Path, splits: dict[str, list[Document]], tokenizer, progress: bool):
    """Tokenize and write each non-empty split; remove the files of an empty one.

    Returns (prefixes, num_documents, num_tokens), each a dict keyed by split name.
    """
    prefixes, num_docs, num_tokens = {}, {}, {}
    for split in SPLITS:
        prefix = output_dir / f"{split}_text_document"
        num_docs[split] = len(splits[split])
        if not splits[split]:
            _remove_dataset(prefix)
            num_tokens[split] = 0
            continue
        token_lists = _encode(tokenizer, splits[split], progress, f"tokenizing {split}")
        num_tokens[split] = write_indexed_dataset(str(prefix), token_lists, tokenizer.vocab_size)
        prefixes[split] = str(prefix)
    return prefixes, num_docs, num_tokens


def _check_vocab_size(vocab_size: int) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise DataError(f"vocab_size must be a positive int, got {vocab_size!r}", "e.g. 8192.")


def _data_key(splits: dict[str, list[Document]], fractions: dict, tokenizer_key: str) -> str:
    """sha256 over the data version, fractions, tokenizer key, each split's (id, text hash)s."""
    header = json.dumps([DATA_VERSION, fractions, tokenizer_key], sort_keys=True)
    digest = hashlib.sha256(header.encode())
    for split in SPLITS:
        digest.update(f"\0split={split}".encode())
        for doc in splits[split]:
            digest.update(f"\0{doc.doc_id}\0{doc.text_sha256}".encode("utf-8"))
    return digest.hexdigest()


def _load_if_current(output_dir: Path, key: str) -> Optional[PreparedData]:
    """The folder's PreparedData if its manifest has `key` and all its files are intact."""
    if not (output_dir / MANIFEST).is_file():
        return None
    try:
        prepared = PreparedData.from_manifest(output_dir)
    except (DataError, TypeError, KeyError):
        return None
    if prepared.key != key or not prepared.tokenizer_path.is_file():
        return None
    for split, prefix in prepared.prefixes.items():
        bin_path, idx_path = Path(prefix + ".bin"), Path(prefix + ".idx")
        itemsize = np.dtype(DType.optimal_dtype(prepared.vocab_size)).itemsize
        if not idx_path.is_file() or not bin_path.is_file():
            return None
        if bin_path.stat().st_size != prepared.num_tokens[split] * itemsize:
            return None
    return prepared


def _encode(
    tokenizer, docs: Sequence[Document], progress: bool, desc: str
) -> Iterator[list[int]]:
    """Token ids of each document followed by one eod, in order, with a tqdm bar."""
    from tqdm.auto import tqdm

    with tqdm(total=len(docs), desc=desc, unit="doc", disable=not progress) as bar:
        for start in range(0, len(docs), ENCODE_CHUNK):
            chunk = docs[start : start + ENCODE_CHUNK]
            for ids in tokenizer.tokenize_many([doc.text for doc in chunk]):
                yield ids + [tokenizer.eod]
            bar.update(len(chunk))


# ---------------------------------------------------------------------------------------------
# Indexed datasets
# ---------------------------------------------------------------------------------------------


def write_indexed_dataset(prefix: str, token_lists, vocab_size: int) -> int:
    """Write `<prefix>.bin/.idx`, one Megatron document per token list; returns the token count.

    dtype: DType.optimal_dtype(vocab_size), i.e. uint16 below 65500 ids, else int32. Both files
    are written under temporary names and then renamed.
    """
    dtype = DType.optimal_dtype(vocab_size)
    tmp = f"{os.path.dirname(prefix)}/.{os.path.basename(prefix)}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    num_tokens = 0
    try:
        for ids in token_lists:
            if ids and (min(ids) < 0 or max(ids) >= vocab_size):
                raise DataError(f"token id out of range [0, {vocab_size}) in {prefix}",
                                "tokenize with the tokenizer whose vocabulary size is given")
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            num_tokens += len(ids)
        builder.finalize(tmp + ".idx")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    finally:
        builder.data_file.close()  # finalize() closes it too; this covers the error path
        for suffix in (".bin", ".idx"):
            Path(tmp + suffix).unlink(missing_ok=True)
    return num_tokens


def _remove_dataset(prefix: Path) -> None:
    for suffix in (".bin", ".idx"):
        Path(str(prefix) + suffix).unlink(missing_ok=True)


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Megatron GPTDataset
# ---------------------------------------------------------------------------------------------


def build_gpt_datasets(
    prepared: PreparedData,
    tokenizer,
    seq_length: int,
    seed: int,
    num_samples: tuple[Optional[int], Optional[int], Optional[int]],
    create_attention_mask: bool = False,
    is_built_on_rank: Optional[Callable[[], bool]] = None,
) -> tuple[Optional[GPTDataset], Optional[GPTDataset], Optional[GPTDataset]]:
    """(train, valid, test) GPTDatasets of `seq_length`-token samples over the prepared splits.

    num_samples: minimum samples per split (None = one epoch). A split without data gives None.
    Each sample is a window of seq_length + 1 tokens of the split's documents concatenated in a
    seeded shuffled order: tokens = window[:-1], labels = window[1:]. Works with and without
    torch.distributed (with it, rank 0 builds the index cache first; call on every rank).
    `prepared` may also be a megatron_data.MegatronData (Megatron-LM's --data-path prefixes
    and --split, or --mock-data): its datasets as Megatron-LM builds them.
    """
    if isinstance(prepared, MegatronData):
        return tuple(build_megatron_datasets(prepared, tokenizer, seq_length, seed, num_samples))
    tokenizer = tokenizer if tokenizer is not None else tokenizers.load_prepared(prepared)
    _check_gpt_request(prepared, tokenizer, seq_length, num_samples)
    blends = [([prepared.prefixes[s]], None) if s in prepared.prefixes else None for s in SPLITS]
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend_per_split=blends,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=create_attention_mask,
        path_to_cache=str(prepared.cache_dir),
        mmap_bin_files=True,
    )
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, list(num_samples), is_built_on_rank or (lambda: True), config
    )
    train_ds, valid_ds, test_ds = builder.build()
    return train_ds, valid_ds, test_ds


def _check_gpt_request(prepared, tokenizer, seq_length, num_samples) -> None:
    """Clear errors for a mismatched tokenizer, a bad length, or a split shorter than a sample."""
    if tokenizers.fingerprint(tokenizer) != prepared.tokenizer_sha256:
        raise DataError(
            f"tokenizer {tokenizer.path} is not the one {prepared.output_dir} was prepared with "
            f"({prepared.tokenizer_path})", "load tokenizers.load_prepared(prepared)."
        )
    if not isinstance(seq_length, int) or seq_length <= 0:
        raise DataError(f"seq_length must be a positive int, got {seq_length!r}",
                        "pass --seq-length N with N >= 1")
    if len(num_samples) != len(SPLITS):
        raise DataError(f"num_samples must be (train, valid, test), got {num_samples!r}",
                        "pass three sample counts (None for a split that is not needed)")
    for split, wanted in zip(SPLITS, num_samples):
        have = prepared.num_tokens.get(split, 0)
        if split in prepared.prefixes and (wanted or 0) > 0 and have < seq_length + 1:
            raise DataError(
                f"the {split} split has {have} tokens, fewer than one sample of seq_length + 1 = "
                f"{seq_length + 1}", f"lower --seq-length, or give the {split} split more text."
            )


def batch_from_samples(samples: Sequence[dict]) -> dict[str, Optional[torch.Tensor]]:
    """Stack GPTDataset samples into a batch.

    Returns tokens [b, s] int64, labels [b, s] int64, loss_mask [b, s] float32,
    position_ids [b, s] int64, attention_mask [b, 1, s, s] bool (True = masked out) or None when
    the datasets were built without attention masks.
    """
    if not samples:
        raise ValueError("batch_from_samples needs at least one sample")
    lengths = {tuple(sample["tokens"].shape) for sample in samples}
    if len(lengths) != 1:
        raise ValueError(f"samples of different shapes cannot be batched: {sorted(lengths)}")
    batch = {
        "tokens": torch.stack([s["tokens"] for s in samples]).long(),  # [b, s]
        "labels": torch.stack([s["labels"] for s in samples]).long(),  # [b, s]
        "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),  # [b, s]
        "position_ids": torch.stack([s["position_ids"] for s in samples]).long(),  # [b, s]
        "attention_mask": None,
    }
    if all(s.get("attention_mask") is not None for s in samples):
        batch["attention_mask"] = torch.stack([s["attention_mask"] for s in samples])  # [b,1,s,s]
    return batch
