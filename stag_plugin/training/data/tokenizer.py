"""A SentencePiece BPE tokenizer for source code that round-trips text exactly.

`train_tokenizer` trains on the documents it is given (the train split only) with settings that
keep every space, tab and newline (identity normalization, no whitespace folding, no dummy
prefix, byte fallback for anything outside the vocabulary, "\\n" a piece of its own), so
`detokenize(tokenize(text)) == text` for any Python string. The model is cached under
`<cache_dir>/tokenizer-<key16>/spm.model`, the key being a sha256 over the documents (ids and
text hashes), the vocabulary size and the trainer settings; a second call with the same inputs
reuses the file. The folder is written under a temporary name and renamed, so an interrupted run
never leaves a half model behind.

`StagTokenizer` exposes the model through Megatron-Core's tokenizer interface
(`megatron.core.tokenizers.MegatronTokenizerBase`, the type of `GPTDatasetConfig.tokenizer`).

Special ids (fixed for every model): unk=0, bos=1, eos=2, pad=3. The end-of-document token
`eod` is eos (2); bos is never emitted by `tokenize`, pad is never written to datasets.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
from megatron.core.tokenizers import MegatronTokenizerBase

from stag_plugin.training.data.corpus import DataError, Document

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
MODEL_FILENAME = "spm.model"
SETTINGS_VERSION = 1  # bump when the training recipe below changes in a way the dict misses
MAX_LINE_CHARS = 4096  # training lines are cut to this many characters (encoding is not)

# SentencePiece trainer settings; every entry takes part in the cache key.
TRAINER_SETTINGS = {
    "model_type": "bpe",
    "byte_fallback": True,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "split_digits": True,
    "allow_whitespace_only_pieces": True,
    "user_defined_symbols": ["\n"],
    "character_coverage": 0.9999,
    "max_sentencepiece_length": 16,
    "max_sentence_length": 4 * MAX_LINE_CHARS,  # bytes; a UTF-8 character is at most 4
    "input_sentence_size": 2_000_000,  # lines; the stdlib train split has ~300k
    "shuffle_input_sentence": True,
    "unk_id": UNK_ID,
    "bos_id": BOS_ID,
    "eos_id": EOS_ID,
    "pad_id": PAD_ID,
    "num_threads": 2,
    "minloglevel": 2,
}

# SentencePiece turns " " into U+2581 and back, so a literal U+2581 would come back as a space.
# `tokenize` writes that character as its three UTF-8 byte-fallback pieces instead.
_META = "\u2581"


# ---------------------------------------------------------------------------------------------
# Training and cache
# ---------------------------------------------------------------------------------------------


def tokenizer_cache_key(documents: Sequence[Document], vocab_size: int) -> str:
    """sha256 over (sorted ids + text hashes, vocab size, trainer settings and their version)."""
    digest = hashlib.sha256()
    header = {"version": SETTINGS_VERSION, "vocab_size": vocab_size, "settings": TRAINER_SETTINGS}
    digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
    for doc_id, text_hash in sorted((doc.doc_id, doc.text_sha256) for doc in documents):
        digest.update(f"\0{doc_id}\0{text_hash}".encode("utf-8"))
    return digest.hexdigest()


def train_tokenizer(
    documents: Sequence[Document], cache_dir: str | os.PathLike, vocab_size: int = 8192
) -> Path:
    """Path to `<cache_dir>/tokenizer-<key16>/spm.model`, trained on `documents` unless cached.

    Raises DataError when the documents cannot support `vocab_size` (too large or too small).
    """
    if not documents:
        raise DataError("cannot train a tokenizer on no documents", "pass a non-empty corpus.")
    key = tokenizer_cache_key(documents, vocab_size)
    final_dir = Path(cache_dir) / f"tokenizer-{key[:16]}"
    model_path = final_dir / MODEL_FILENAME
    if model_path.is_file():
        return model_path
    model_bytes = _train_model_bytes(documents, vocab_size)
    _write_dir_atomically(final_dir, {MODEL_FILENAME: model_bytes, "key.txt": key.encode()})
    return model_path


def _train_model_bytes(documents: Sequence[Document], vocab_size: int) -> bytes:
    """Train SentencePiece in memory on the documents' lines; the serialized model proto."""
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_lines(documents),
            model_writer=buffer,
            vocab_size=vocab_size,
            **TRAINER_SETTINGS,
        )
    except RuntimeError as err:
        raise _vocab_error(err, vocab_size) from err
    return buffer.getvalue()


def _training_lines(documents: Iterable[Document]) -> Iterator[str]:
    """Every line of every document, newline kept, cut to MAX_LINE_CHARS characters."""
    for doc in documents:
        for line in doc.text.splitlines(keepends=True):
            for start in range(0, len(line), MAX_LINE_CHARS):
                yield line[start : start + MAX_LINE_CHARS]


def _vocab_error(err: RuntimeError, vocab_size: int) -> Exception:
    """Turn SentencePiece's vocabulary-size failures into DataError with the usable bound."""
    message = str(err)
    too_high = re.search(r"Vocabulary size too high.*?<= ?(\d+)", message)
    if too_high:
        return DataError(
            f"vocabulary size {vocab_size} is too large for this corpus (sentencepiece says: "
            f"{message.split(']')[-1].strip()})",
            f"use --vocab-size <= {too_high.group(1)}, or add more training text")
    too_low = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_low:
        return DataError(
            f"vocabulary size {vocab_size} is too small for this corpus: it needs "
            f"{too_low.group(2)} pieces for its characters, bytes and special tokens",
            f"use --vocab-size >= {too_low.group(2)}")
    return DataError(
        f"sentencepiece could not train a {vocab_size}-piece tokenizer: {message}",
        "check the corpus and --vocab-size")


def _write_dir_atomically(final_dir: Path, files: dict[str, bytes]) -> None:
    """Write `files` into a temporary sibling folder, then rename it to `final_dir`."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    try:
        for name, data in files.items():
            (tmp_dir / name).write_bytes(data)
        try:
            os.rename(tmp_dir, final_dir)
        except OSError:
            if not (final_dir / MODEL_FILENAME).is_file():  # not a concurrent writer's result
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Megatron-Core tokenizer
# ---------------------------------------------------------------------------------------------


class StagTokenizer(MegatronTokenizerBase):
    """A trained SentencePiece model behind Megatron-Core's tokenizer interface.

    tokenize(text) -> list[int] (no bos/eos added), detokenize(ids) -> str, with
    detokenize(tokenize(text)) == text for every string. eod = eos = 2, pad = 3, unk = 0, bos = 1.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if not path.is_file():
            raise DataError(
                f"tokenizer model {path} does not exist", "run data preparation "
                "(stag_plugin.training.data.prepare_data) first, or pass the path of its spm.model."
            )
        super().__init__(str(path), {"library": "sentencepiece"})
        model_bytes = path.read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.model_sha256 = hashlib.sha256(model_bytes).hexdigest()
        self._check_special_ids()
        self._meta_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in _META.encode("utf-8")]

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StagTokenizer":
        """Load `spm.model` (or a folder containing it)."""
        path = Path(path)
        return cls(path / MODEL_FILENAME if path.is_dir() else path)

    def _check_special_ids(self) -> None:
        found = (self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id(), self._sp.pad_id())
        if found != (UNK_ID, BOS_ID, EOS_ID, PAD_ID) or self._sp.piece_to_id("<0x00>") == UNK_ID:
            raise DataError(
                f"{self.path} is not a StagTokenizer model (unk/bos/eos/pad ids {found}, expected "
                f"{(UNK_ID, BOS_ID, EOS_ID, PAD_ID)}, byte fallback required)", "train it with "
                "stag_plugin.training.data.train_tokenizer."
            )

    # -- text <-> ids ---------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` (no bos/eos). A literal U+2581 becomes its 3 byte pieces."""
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
        if _META not in text:
            return self._sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(_META)):
            if i:
                ids.extend(self._meta_ids)
            ids.extend(self._sp.encode(part))
        return ids

    def tokenize_many(self, texts: Sequence[str], num_threads: int = 2) -> list[list[int]]:
        """`[tokenize(t) for t in texts]`, encoding texts without U+2581 in one threaded batch."""
        plain = [i for i, text in enumerate(texts) if _META not in text]
        out: list[list[int]] = [None] * len(texts)  # type: ignore[list-item]
        encoded = self._sp.encode([texts[i] for i in plain], num_threads=num_threads)
        for i, ids in zip(plain, encoded):
            out[i] = ids
        for i, text in enumerate(texts):
            if out[i] is None:
                out[i] = self.tokenize(text)
        return out

    def detokenize(self, ids) -> str:
        """Text of a sequence of ids (list, numpy array or 1-D tensor); special ids vanish."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._sp.decode([int(i) for i in ids])

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("StagTokenizer is a plain-text tokenizer without chat template")

    # -- vocabulary and special tokens ----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab(self) -> dict[str, int]:
        """piece -> id (pieces use U+2581 for a space, `<0xNN>` for byte fallback)."""
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def inv_vocab(self) -> dict[int, str]:
        return {i: self._sp.id_to_piece(i) for i in range(self.vocab_size)}

    @property
    def eod(self) -> int:
        return EOS_ID

    @property
    def eos(self) -> int:
        return EOS_ID

    @property
    def bos(self) -> int:
        return BOS_ID

    @property
    def unk(self) -> int:
        return UNK_ID

    @property
    def pad(self) -> int:
        return PAD_ID

    @property
    def unique_identifiers(self) -> OrderedDict:
        """What Megatron's datasets hash into their index-cache names (megatron_dataset.py:66)."""
        return OrderedDict(
            [("class", f"{type(self).__module__}.{type(self).__qualname__}"),
             ("model_sha256", self.model_sha256)]
        )
