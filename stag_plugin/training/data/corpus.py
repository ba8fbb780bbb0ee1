"""Documents to train on: the Python standard library by default, or the user's files.

A corpus is an ordered list of `Document(doc_id, text)`. The id is stable across machines (a
relative path, or `path:line` for a JSONL record) and alone decides the document's split, through
a sha256 of the id, so the split never depends on the machine, the process or the file order.

Inputs understood by `load_corpus`:
    None                   the running interpreter's standard library (`sysconfig` "stdlib"):
                           every `.py` file outside site-packages/dist-packages and outside any
                           folder named test/tests/idle_test, skipping files that are not UTF-8
    `*.jsonl` / `*.json`   one JSON object per line with the text under `json_key` (the format
                           Megatron-LM's tools/preprocess_data.py reads)
    any other file         one document per file (UTF-8)
    a directory            every file below it, recursively, sorted, hidden entries skipped;
                           files that are not UTF-8 are skipped and counted

Every problem raises `DataError`, whose message names the input and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from stag_plugin.errors import StagError

SPLITS = ("train", "valid", "test")
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
JSONL_SUFFIXES = frozenset({".jsonl", ".json"})


class DataError(StagError):
    """Bad input data or options for the data pipeline; the message says what and how to fix it."""


@dataclass(frozen=True)
class Document:
    """One training document: a stable id (used for the split hash) and its exact text."""

    doc_id: str
    text: str

    @property
    def text_sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass
class Corpus:
    """The documents of a corpus, in a deterministic order, and how they were found."""

    documents: list[Document]
    description: str
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> number of files/records


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def stdlib_root() -> Path:
    """The source folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def load_corpus(paths: Sequence[str] | None = None, json_key: str = "text") -> Corpus:
    """Load the default stdlib corpus (`paths` None or empty) or the user's files/directories.

    Documents whose text is empty or whitespace only are dropped (counted in `skipped`); a corpus
    left with no document raises DataError.
    """
    if not paths:
        docs, skipped = _stdlib_documents()
        root = stdlib_root()
        what = f"Python {sys.version.split()[0]} standard library ({root})"
    else:
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        docs, skipped = _user_documents([str(p) for p in paths], json_key)
        what = "user data: " + ", ".join(str(p) for p in paths)
    kept = [doc for doc in docs if doc.text.strip()]
    if len(kept) < len(docs):
        skipped["empty documents"] = len(docs) - len(kept)
    if not kept:
        raise DataError(
            f"the corpus is empty: {what} gave {len(docs)} documents, none with any text "
            f"(skipped: {skipped or 'nothing'})", f"pass files or directories that contain "
            f"text (JSONL needs a non-empty '{json_key}' field per line)."
        )
    n_chars = sum(len(doc.text) for doc in kept)
    description = f"{what}: {len(kept)} documents, {n_chars / 1e6:.1f} M characters"
    return Corpus(documents=kept, description=description, skipped=skipped)


def _stdlib_documents() -> tuple[list[Document], dict[str, int]]:
    """All stdlib `.py` files outside excluded folders, sorted by relative posix path."""
    root = stdlib_root()
    if not root.is_dir():
        raise DataError(
            f"the standard library source folder {root} does not exist (an interpreter without "
            "its .py sources?)", "pass your own data paths instead of the default corpus."
        )
    docs, not_utf8 = [], 0
    for rel in _walk_files(root, skip_dirs=EXCLUDED_DIRS | {"__pycache__"}):
        if not rel.endswith(".py"):
            continue
        text = _read_utf8(root / rel)
        if text is None:
            not_utf8 += 1
            continue
        docs.append(Document(rel, text))
    return docs, ({"not UTF-8": not_utf8} if not_utf8 else {})


def _user_documents(paths: list[str], json_key: str) -> tuple[list[Document], dict[str, int]]:
    """Documents from each path in order; a directory contributes its files sorted."""
    docs, skipped = [], {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(
                f"data path {raw!r} does not exist", f"check the path (relative paths are "
                f"resolved against {os.getcwd()}), or omit data paths to use the default "
                "standard-library corpus."
            )
        if not path.is_dir():
            found = _file_documents(path, path.name, json_key)
            if found is None:
                raise DataError(
                    f"{path} is not valid UTF-8 text", "convert it to UTF-8 or leave it out."
                )
            docs.extend(found)
            continue
        for rel in _walk_files(path):
            found = _file_documents(path / rel, f"{path.resolve().name}/{rel}", json_key)
            if found is None:
                skipped["not UTF-8"] = skipped.get("not UTF-8", 0) + 1
            else:
                docs.extend(found)
    return docs, skipped


def _walk_files(directory: Path, skip_dirs: frozenset = frozenset()) -> list[str]:
    """Relative posix paths of the files below `directory`, sorted.

    Hidden files and folders (name starting with ".") and folders named in `skip_dirs` are left
    out, at any depth.
    """
    found = []
    for current, dirnames, filenames in os.walk(directory):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        rel_dir = Path(current).relative_to(directory)
        found += [(rel_dir / f).as_posix() for f in filenames if not f.startswith(".")]
    return sorted(found)


def _file_documents(path: Path, rel: str, json_key: str) -> list[Document] | None:
    """The documents of one file (one, or one per JSONL line); None if it is not UTF-8."""
    text = _read_utf8(path)
    if text is None:
        return None
    if path.suffix.lower() in JSONL_SUFFIXES:
        return list(_jsonl_documents(text, path, rel, json_key))
    return [Document(rel, text)]


def _jsonl_documents(text: str, path: Path, rel: str, json_key: str) -> Iterator[Document]:
    """One document per non-blank line of a JSONL file, id `rel:line` (1-based)."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{where} is not valid JSON ({err.msg} at column {err.colno})", "a JSONL file "
                "holds one JSON object per line, e.g. {\"text\": \"...\"}; fix or remove that line."
            ) from None
        yield Document(f"{rel}:{lineno}", _record_text(record, where, json_key))


def _record_text(record, where: str, json_key: str) -> str:
    """The text field of one JSONL record, with a precise error when it is absent or not text."""
    if not isinstance(record, dict):
        raise DataError(
            f"{where} is a JSON {type(record).__name__}, not an object", f"write one object per "
            f"line with the text under '{json_key}', e.g. {{\"{json_key}\": \"...\"}}."
        )
    if json_key not in record:
        keys = ", ".join(repr(k) for k in record) or "none"
        raise DataError(
            f"{where}: the JSON object has no '{json_key}' key (its keys: {keys})", f"pass "
            f"--json-keys NAME (json_key=NAME) to read another field, or add '{json_key}'."
        )
    value = record[json_key]
    if not isinstance(value, str):
        raise DataError(
            f"{where}: '{json_key}' must be a string, got {type(value).__name__}", "store the "
            "document text as a JSON string."
        )
    return value


def _read_utf8(path: Path) -> str | None:
    """The exact text of a file (no newline translation), or None if it is not valid UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------


def split_fraction(doc_id: str) -> float:
    """A stable number in [0, 1) for a document id: the first 8 bytes of sha256(id) / 2**64."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(doc_id: str, valid_fraction: float, test_fraction: float) -> str:
    """The split of a document id: u = split_fraction(id); valid | test | train by thresholds."""
    u = split_fraction(doc_id)
    if u < valid_fraction:
        return "valid"
    if u < valid_fraction + test_fraction:
        return "test"
    return "train"


def split_documents(
    documents: Sequence[Document], valid_fraction: float = 0.05, test_fraction: float = 0.05
) -> dict[str, list[Document]]:
    """Split documents by id hash into {'train', 'valid', 'test'}, each in corpus order.

    train and valid must be non-empty; test may be empty only when test_fraction is 0.
    """
    _check_fractions(valid_fraction, test_fraction)
    splits = {name: [] for name in SPLITS}
    for doc in documents:
        splits[split_of(doc.doc_id, valid_fraction, test_fraction)].append(doc)
    wanted = {"train": 1.0, "valid": valid_fraction, "test": test_fraction}
    for name in SPLITS:
        if not splits[name] and wanted[name] > 0:
            raise DataError(
                f"the {name} split is empty: {len(documents)} documents split by id hash with "
                f"valid_fraction={valid_fraction}, test_fraction={test_fraction} put none in "
                f"{name}", f"add more documents (or split large files into several), or "
                f"{_fraction_fix(name)}."
            )
    return splits


def _check_fractions(valid_fraction: float, test_fraction: float) -> None:
    if not 0.0 < valid_fraction < 1.0:
        raise DataError(
            f"valid_fraction must be in (0, 1), got {valid_fraction}", "e.g. --valid-fraction "
            "0.05 (the trainer needs a validation split)."
        )
    if not 0.0 <= test_fraction < 1.0 or valid_fraction + test_fraction >= 1.0:
        raise DataError(
            f"test_fraction must be in [0, 1) with valid_fraction + test_fraction < 1, got "
            f"valid={valid_fraction}, test={test_fraction}", "lower the fractions."
        )


def _fraction_fix(split: str) -> str:
    if split == "train":
        return "lower --valid-fraction/--test-fraction"
    if split == "valid":
        return "raise --valid-fraction"
    return "raise --test-fraction, or pass --test-fraction 0 to have no test split"
