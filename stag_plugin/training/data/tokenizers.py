"""Tokenizers as Megatron-LM has them: `--tokenizer-type` and its files, built through
megatron-core's own tokenizer classes (`MegatronTokenizer.from_pretrained`), next to the
plugin's embedded default, and one small `TokenizerSpec` describing each, saved with every
prepared dataset, checkpoint and inference folder so every loader rebuilds the same tokenizer.

    --tokenizer-type            files (flags)                    megatron-core library
    (none: the default)         trained on the corpus            - (StagTokenizer, tokenizer.py)
    GPTSentencePieceTokenizer   --tokenizer-model (any .model)   "sentencepiece"
    HuggingFaceTokenizer        --tokenizer-model (a folder)     "huggingface"
    GPT2BPETokenizer            --vocab-file, --merge-file       "huggingface" (GPT2Tokenizer)
    NullTokenizer               none (--vocab-size)              "null-text" ("null" in 0.16)

Ids, as Megatron-LM's tokenizers give them:
    GPTSentencePieceTokenizer   SentencePiece's encode (no bos / eos); eod = the model's eos
    HuggingFaceTokenizer        `tokenizer(text).input_ids` (special tokens such as a bos
                                included: Megatron-LM's default); eod = its eos token
    GPT2BPETokenizer            GPT-2 byte-level BPE of vocab.json + merges.txt (a literal
                                "<|endoftext|>" in the text is that token); eod = <|endoftext|>
    NullTokenizer               text = whitespace-separated ids; eod = vocab_size - 1, no pad

A tokenizer folder holds `stag_tokenizer.json` (the spec) and copies of the files it names:
checkpoints keep it as `iter_XXXXXXX/tokenizer/`, inference folders as `tokenizer/`, prepared
data as `tokenizer-<id16>/`; no path of the machine that made it is kept. A checkpoint saved
before tokenizer types existed holds `iter_XXXXXXX/tokenizer.model` and a record without
"type": it loads as the plugin's own SentencePiece tokenizer.

GPT2BPETokenizer is built by megatron-core's "huggingface" library over a folder holding the
two files and a tokenizer_config.json naming GPT2Tokenizer: megatron-core's "megatron" library
(Megatron-LM's route) asks the Hugging Face Hub for the gpt2 tokenizer config and so cannot run
offline (in 0.16 it also passes the vocab file as the merge file).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

from megatron.core.tokenizers import MegatronTokenizerBase

from stag_plugin.errors import StagError
from stag_plugin.training.data.tokenizer import StagTokenizer

SENTENCEPIECE, HUGGINGFACE = "GPTSentencePieceTokenizer", "HuggingFaceTokenizer"
GPT2BPE, NULL = "GPT2BPETokenizer", "NullTokenizer"
TYPES = (SENTENCEPIECE, HUGGINGFACE, GPT2BPE, NULL)
STAG = "StagTokenizer"  # the embedded default's spec type (no --tokenizer-type)
SPEC_FILE = "stag_tokenizer.json"
CHECKPOINT_DIR = "tokenizer"  # iter_XXXXXXX/tokenizer/, <inference folder>/tokenizer/
SP_MODEL = "tokenizer.model"  # a SentencePiece model's name in a folder (also the legacy file)
GPT2_EOD = "<|endoftext|>"
GPT2_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "bos_token": GPT2_EOD, "eos_token": GPT2_EOD,
               "unk_token": GPT2_EOD, "add_prefix_space": False}
# The files of a Hugging Face tokenizer folder that are copied (model weights never are).
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model",
            "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
            "chat_template.json", "config.json")
HF_VOCABULARIES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
FLAGS = ("tokenizer_type", "tokenizer_model", "vocab_file", "merge_file")


def add_tokenizer_args(group) -> None:
    """Megatron-LM's tokenizer flags (names, meanings, defaults); --vocab-size is the data
    group's own (the NullTokenizer's vocabulary, or the size of the default's SentencePiece)."""
    group.add_argument("--tokenizer-type", default=None, metavar="TYPE",
                       help=f"one of {', '.join(TYPES)} (Megatron-LM's names); default: train "
                            "a SentencePiece BPE tokenizer of --vocab-size pieces on the corpus")
    group.add_argument("--tokenizer-model", default=None, metavar="PATH",
                       help="GPTSentencePieceTokenizer: the SentencePiece model file; "
                            "HuggingFaceTokenizer: a local tokenizer folder (no download)")
    group.add_argument("--vocab-file", default=None, metavar="PATH",
                       help="GPT2BPETokenizer: vocab.json")
    group.add_argument("--merge-file", default=None, metavar="PATH",
                       help="GPT2BPETokenizer: merges.txt")


# ---------------------------------------------------------------------------- descriptions


def _sha256(data: Union[Path, bytes]) -> str:
    if isinstance(data, bytes):
        return hashlib.sha256(data).hexdigest()
    digest = hashlib.sha256()
    with open(data, "rb") as handle:
        while chunk := handle.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def _identity(kind: str, hashes: Dict[str, str], options: dict) -> str:
    """sha256 of what decides the ids: the type, every file's sha256 (by its name in a
    tokenizer folder) and the options; never a path."""
    text = json.dumps({"type": kind, "files": hashes, "options": options}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class TokenizerSource:
    """A tokenizer before it is built: its type, its options and its files (name in a
    tokenizer folder -> the file where it is now, or its bytes when generated)."""

    type: str
    files: Dict[str, Union[Path, bytes]] = field(default_factory=dict)
    options: dict = field(default_factory=dict)

    @property
    def identity(self) -> str:
        hashes = {name: _sha256(data) for name, data in self.files.items()}
        return _identity(self.type, hashes, self.options)


@dataclass(frozen=True)
class TokenizerSpec:
    """A built tokenizer: type, files (name -> sha256), options, and its ids. `bos` and `pad`
    are None when the tokenizer has none. JSON form: `to_json()` (what stag_run.json's
    "tokenizer" and stag_tokenizer.json hold; the keys "vocab_size" and "eod" as before)."""

    type: str
    files: Dict[str, str]
    options: dict
    vocab_size: int
    eod: int
    bos: Optional[int] = None
    pad: Optional[int] = None

    @property
    def identity(self) -> str:
        return _identity(self.type, self.files, self.options)

    def to_json(self) -> dict:
        return {"type": self.type, "files": dict(self.files), "options": dict(self.options),
                "vocab_size": self.vocab_size, "eod": self.eod, "bos": self.bos,
                "pad": self.pad, "identity": self.identity}

    @classmethod
    def from_json(cls, entries: dict, where: str) -> "TokenizerSpec":
        try:
            return cls(entries["type"], dict(entries["files"]), dict(entries["options"]),
                       int(entries["vocab_size"]), int(entries["eod"]), entries.get("bos"),
                       entries.get("pad"))
        except (KeyError, TypeError, ValueError) as err:
            raise StagError(f"{where} is not a tokenizer description ({type(err).__name__}: "
                            f"{err})", "restore the file the plugin wrote with it") from err

    def describe(self) -> str:
        extra = f", {self.options['vocab_size']} ids" if self.type == NULL else ""
        return f"{self.type}{extra}, identity {self.identity[:12]}"


# ---------------------------------------------------------------------------- from flags


def source_from_args(args, vocab_size: Optional[int] = None) -> Optional[TokenizerSource]:
    """The tokenizer the --tokenizer-* flags of `args` name (NullTokenizer: `vocab_size`, by
    default args.vocab_size); None for the embedded default."""
    values = {flag: getattr(args, flag, None) for flag in FLAGS}
    if all(value is None for value in values.values()):
        return None
    vocab_size = vocab_size if vocab_size is not None else getattr(args, "vocab_size", None)
    return source_from_flags(**values, vocab_size=vocab_size)


def source_from_flags(tokenizer_type, tokenizer_model=None, vocab_file=None, merge_file=None,
                      vocab_size=None, where: str = "") -> TokenizerSource:
    """Check Megatron-LM's tokenizer flags and gather the files they name (StagError naming
    the flag otherwise). `where` says where the values came from, for messages."""
    given = {"--tokenizer-model": tokenizer_model, "--vocab-file": vocab_file,
             "--merge-file": merge_file}
    if tokenizer_type is None:
        raise StagError(f"{_named(given)} given{where} without --tokenizer-type",
                        f"add --tokenizer-type (one of {', '.join(TYPES)})")
    if tokenizer_type not in TYPES:
        raise StagError(f"--tokenizer-type {tokenizer_type}{where} is not supported",
                        f"use one of {', '.join(TYPES)} (Megatron-LM's names), or leave it out "
                        "to train a SentencePiece tokenizer on the corpus")
    used = {SENTENCEPIECE: ("--tokenizer-model",), HUGGINGFACE: ("--tokenizer-model",),
            GPT2BPE: ("--vocab-file", "--merge-file"), NULL: ()}[tokenizer_type]
    unused = {flag: value for flag, value in given.items() if flag not in used}
    if any(value is not None for value in unused.values()):
        raise StagError(f"--tokenizer-type {tokenizer_type} reads {_named(used) or 'no files'}"
                        f", not {_named(unused)}{where}", f"drop {_named(unused)}")
    if tokenizer_type == NULL:
        return _null_source(vocab_size, where)
    missing = [flag for flag in used if given[flag] is None]
    if missing:
        raise StagError(f"--tokenizer-type {tokenizer_type} needs {' and '.join(missing)}"
                        f"{where}", f"pass {' and '.join(f'{f} PATH' for f in missing)}")
    if tokenizer_type == HUGGINGFACE:
        return _huggingface_source(Path(tokenizer_model), where)
    if tokenizer_type == GPT2BPE:
        return _gpt2_source(Path(vocab_file), Path(merge_file), where)
    return TokenizerSource(SENTENCEPIECE, {SP_MODEL: _file(tokenizer_model, "--tokenizer-model",
                                                           where)})


def _named(flags) -> str:
    """'--a and --b': the flags of a tuple, or those of a dict whose value is not None."""
    names = [flag for flag in flags if not isinstance(flags, dict) or flags[flag] is not None]
    return " and ".join(names)


def _file(path, flag: str, where: str) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "missing"
        raise StagError(f"{flag} {path}{where} is {what}, not a file",
                        f"pass the path of the file as {flag}")
    return path


def _null_source(vocab_size, where: str) -> TokenizerSource:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise StagError(f"--tokenizer-type NullTokenizer needs --vocab-size >= 2{where}, got "
                        f"{vocab_size!r}", "pass --vocab-size N: N ids, the last (N - 1) the "
                        "end of document")
    return TokenizerSource(NULL, {}, {"vocab_size": vocab_size})


def _gpt2_source(vocab_file: Path, merge_file: Path, where: str) -> TokenizerSource:
    vocab_file = _file(vocab_file, "--vocab-file", where)
    merge_file = _file(merge_file, "--merge-file", where)
    try:
        vocab = json.loads(vocab_file.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise StagError(f"--vocab-file {vocab_file}{where} is not a JSON vocabulary ({err})",
                        "pass GPT-2's vocab.json (token -> id)") from err
    if not isinstance(vocab, dict) or GPT2_EOD not in vocab:
        raise StagError(f"--vocab-file {vocab_file}{where} has no {GPT2_EOD} token, "
                        "GPT2BPETokenizer's end of document", "pass a GPT-2 style vocab.json "
                        f"that holds {GPT2_EOD}")
    config = json.dumps(GPT2_CONFIG, indent=1, sort_keys=True).encode("utf-8")
    return TokenizerSource(GPT2BPE, {"vocab.json": vocab_file, "merges.txt": merge_file,
                                     "tokenizer_config.json": config},
                           _hf_kwargs())


def _huggingface_source(folder: Path, where: str) -> TokenizerSource:
    if not folder.is_dir():
        raise StagError(f"--tokenizer-model {folder}{where} is not a folder "
                        f"({'a file' if folder.is_file() else 'missing'})",
                        "pass a local Hugging Face tokenizer folder (tokenizer.json, "
                        "tokenizer_config.json, ...); hub names are not downloaded")
    files = {name: folder / name for name in HF_FILES if (folder / name).is_file()}
    if not any(name in files for name in HF_VOCABULARIES):
        raise StagError(f"--tokenizer-model {folder}{where} is not a Hugging Face tokenizer "
                        f"folder: it holds none of {', '.join(HF_VOCABULARIES)}",
                        "pass the folder `tokenizer.save_pretrained(folder)` writes")
    return TokenizerSource(HUGGINGFACE, files, _hf_kwargs())


def _hf_kwargs() -> dict:
    from stag_plugin.compat.megatron import HF_TOKENIZER_KWARGS

    return dict(HF_TOKENIZER_KWARGS)


# ---------------------------------------------------------------------------- building


def materialize(source: TokenizerSource, folder: Path):
    """Write `source` as a tokenizer folder (atomically; an existing one of the same identity
    is reused, one that no longer loads, e.g. a file changed, is written again) and return the
    tokenizer built from it."""
    folder = Path(folder)
    if (folder / SPEC_FILE).is_file():
        try:
            tokenizer = load_folder(folder)
        except StagError:
            tokenizer = None  # damaged (or saved by other versions): replaced below
        if tokenizer is not None and tokenizer.spec.identity == source.identity:
            return tokenizer
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for name, data in source.files.items():
            if isinstance(data, bytes):
                (tmp / name).write_bytes(data)
            else:
                shutil.copyfile(data, tmp / name)
        hashes = {name: _sha256(tmp / name) for name in source.files}
        inner = _build_inner(source.type, tmp, source.options)
        spec = _spec_of_inner(source.type, hashes, source.options, inner)
        (tmp / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=1) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_folder(folder)


def _build_inner(kind: str, folder: Path, options: dict):
    """megatron-core's tokenizer of `kind` over the files in `folder`."""
    from megatron.core.tokenizers import MegatronTokenizer

    from stag_plugin.compat import megatron as compat

    if kind == NULL:
        return compat.null_tokenizer(options["vocab_size"])
    flag = "--tokenizer-model" if kind != GPT2BPE else "--vocab-file / --merge-file"
    try:
        if kind == SENTENCEPIECE:
            return MegatronTokenizer.from_pretrained(tokenizer_path=str(folder / SP_MODEL),
                                                     metadata_path={"library": "sentencepiece"})
        _require_transformers(kind)
        return MegatronTokenizer.from_pretrained(tokenizer_path=str(folder),
                                                 metadata_path={"library": "huggingface"},
                                                 **options)
    except (ValueError, RuntimeError, OSError, TypeError) as err:
        raise StagError(f"megatron-core cannot build a {kind} from the {flag} files "
                        f"({_first_line(err)})", f"pass the files of a working {kind}") from err


def _require_transformers(kind: str) -> None:
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        raise StagError(f"--tokenizer-type {kind} needs Hugging Face transformers, which is "
                        "not installed", "pip install -e '.[hf]' (or pip install transformers)")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:300] if text else ''}"


def _spec_of_inner(kind: str, hashes: dict, options: dict, inner) -> TokenizerSpec:
    """The spec of a freshly built megatron-core tokenizer; its end of document is required."""
    eod = _id_of(lambda: inner.eod)
    if eod is None:
        raise StagError(f"the {kind} has no end-of-document token (eos), which ends every "
                        "document in the datasets and every generation",
                        f"use a {kind} whose model or tokenizer_config.json defines an eos "
                        "token")
    bos = None if kind == NULL else _id_of(lambda: inner.bos)
    pad = None if kind == NULL else _id_of(lambda: inner.pad)
    return TokenizerSpec(kind, hashes, options, int(inner.vocab_size), eod, bos, pad)


def _id_of(getter) -> Optional[int]:
    """A special token's id, None when the tokenizer has none (missing, None or negative)."""
    try:
        value = getter()
    except (AttributeError, NotImplementedError, NameError, IndexError, KeyError):
        return None
    return int(value) if value is not None and int(value) >= 0 else None


# ---------------------------------------------------------------------------- loading, saving


def load_folder(folder: Path):
    """The tokenizer a tokenizer folder (stag_tokenizer.json + files) describes, its files
    checked against their sha256 and its ids against the spec."""
    folder = Path(folder)
    spec = read_spec(folder)
    for name, sha in spec.files.items():
        path = folder / name
        if not path.is_file() or _sha256(path) != sha:
            raise StagError(f"{path} is {'changed' if path.is_file() else 'missing'} (its "
                            f"sha256 is in {folder / SPEC_FILE})", "copy the tokenizer folder "
                            "again from where it was written")
    if spec.type == STAG:
        return StagTokenizer(folder / SP_MODEL)
    inner = _build_inner(spec.type, folder, spec.options)
    built = _spec_of_inner(spec.type, spec.files, spec.options, inner)
    if built != spec:
        raise StagError(f"the {spec.type} in {folder} now gives other ids than when it was "
                        f"saved ({built.to_json()} instead of {spec.to_json()})",
                        "use the megatron-core / transformers versions it was saved with")
    return MegatronTextTokenizer(spec, folder, inner)


def read_spec(folder: Path) -> TokenizerSpec:
    path = Path(folder) / SPEC_FILE
    try:
        entries = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as err:
        raise StagError(f"{path} cannot be read ({type(err).__name__}: {err})",
                        "pass a tokenizer folder written by the plugin") from err
    return TokenizerSpec.from_json(entries, str(path))


def spec_of(tokenizer) -> TokenizerSpec:
    """The spec of a tokenizer the plugin built (StagTokenizer or MegatronTextTokenizer)."""
    if isinstance(tokenizer, StagTokenizer):
        return TokenizerSpec(STAG, {SP_MODEL: tokenizer.model_sha256}, {}, tokenizer.vocab_size,
                             tokenizer.eod, tokenizer.bos, tokenizer.pad)
    return tokenizer.spec


def fingerprint(tokenizer) -> str:
    """What PreparedData.tokenizer_sha256 holds for this tokenizer: the SentencePiece model's
    sha256 for the embedded default (as before), the spec's identity otherwise."""
    if isinstance(tokenizer, StagTokenizer):
        return tokenizer.model_sha256
    return tokenizer.spec.identity


def save_tokenizer(tokenizer, folder: Path) -> TokenizerSpec:
    """Write `tokenizer` as a tokenizer folder at `folder` (which must not exist)."""
    folder = Path(folder)
    spec = spec_of(tokenizer)
    folder.mkdir(parents=True)
    for name in spec.files:
        source = Path(tokenizer.path) if spec.type == STAG else tokenizer.folder / name
        shutil.copyfile(source, folder / name)
    (folder / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=1) + "\n")
    return spec


def source_of_folder(folder: Path) -> TokenizerSource:
    """The source a tokenizer folder was made from (its copies), to tokenize other data with
    the very same tokenizer."""
    spec = read_spec(folder)
    return TokenizerSource(spec.type, {name: Path(folder) / name for name in spec.files},
                           dict(spec.options))


def saved_tokenizer_folder(folder: Path) -> Optional[Path]:
    """The tokenizer folder inside a checkpoint iteration or inference folder, if any."""
    path = Path(folder) / CHECKPOINT_DIR
    return path if (path / SPEC_FILE).is_file() else None


def load_saved(folder: Path, legacy_file: str = SP_MODEL):
    """The tokenizer saved in a checkpoint iteration folder or an inference folder:
    `<folder>/tokenizer/`, or (saved before tokenizer types) `<folder>/tokenizer.model`, the
    plugin's own SentencePiece. StagError when there is none."""
    inside = saved_tokenizer_folder(folder)
    if inside is not None:
        return load_folder(inside)
    legacy = Path(folder) / legacy_file
    if legacy.is_file():
        return StagTokenizer(legacy)
    raise StagError(f"{folder} holds no tokenizer ({CHECKPOINT_DIR}/{SPEC_FILE} or "
                    f"{legacy_file}), so its token ids cannot be turned into text",
                    "use a folder written by stag train or stag convert (they save the "
                    "tokenizer)")


def saved_spec(folder: Path) -> Optional[TokenizerSpec]:
    """The spec of the tokenizer saved in `folder` (as `load_saved`), None when there is none."""
    inside = saved_tokenizer_folder(folder)
    if inside is not None:
        return read_spec(inside)
    legacy = Path(folder) / SP_MODEL
    return spec_of(StagTokenizer(legacy)) if legacy.is_file() else None


def load_prepared(prepared):
    """The tokenizer of a PreparedData (its SentencePiece model, or its tokenizer folder)."""
    path = Path(prepared.tokenizer_path)
    return load_folder(path.parent) if path.name == SPEC_FILE else StagTokenizer(path)


# ---------------------------------------------------------------------------- the tokenizer


class MegatronTextTokenizer(MegatronTokenizerBase):
    """One of Megatron-LM's tokenizer types, built by megatron-core from a tokenizer folder,
    behind the interface the plugin uses: tokenize(text) -> ids, tokenize_many(texts),
    detokenize(ids) -> text (special tokens left out), vocab_size, eod, bos, pad (-1: none,
    Megatron's datasets' convention) and `unique_identifiers` without paths (the spec's
    identity), so Megatron's dataset caches do not depend on where the folder lies."""

    def __init__(self, spec: TokenizerSpec, folder: Path, inner) -> None:
        super().__init__(str(folder), {"library": spec.type})
        self.spec, self.folder, self.inner = spec, Path(folder), inner

    def tokenize(self, text: str) -> list:
        if not isinstance(text, str):
            raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
        if self.spec.type != NULL:
            return list(self.inner.tokenize(text))
        words = text.split()
        try:
            return self.inner.tokenize(" ".join(words)) if words else []
        except ValueError as err:
            raise StagError(f"NullTokenizer reads text as whitespace-separated token ids, not "
                            f"{text[:60]!r}", "give ids such as '17 4 250', or use a text "
                            "tokenizer (--tokenizer-type)") from err

    def tokenize_many(self, texts) -> list:
        return [self.tokenize(text) for text in texts]

    def detokenize(self, ids) -> str:
        from stag_plugin.compat.megatron import detokenize_text

        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return detokenize_text(self.inner, [int(i) for i in ids])

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("the plugin trains on plain text; no chat template")

    @property
    def vocab(self):
        return self.inner.vocab

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def eod(self) -> int:
        return self.spec.eod

    @property
    def bos(self) -> Optional[int]:
        return self.spec.bos

    @property
    def pad(self) -> int:
        return -1 if self.spec.pad is None else self.spec.pad

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict([("class", f"{type(self).__module__}.{type(self).__qualname__}"),
                            ("type", self.spec.type), ("identity", self.spec.identity)])
