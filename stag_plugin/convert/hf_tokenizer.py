"""An inference folder's tokenizer in the form Hugging Face `transformers` loads:
`AutoTokenizer.from_pretrained(folder)(text).input_ids` gives the plugin tokenizer's ids.

    StagTokenizer (the default)      tokenizer.json built from its SentencePiece model, exact on
                                     every text (a literal U+2581 too: the pieces' U+2581 are
                                     written as spaces, so that character is left to the byte
                                     pieces, as StagTokenizer.tokenize does)
    GPTSentencePieceTokenizer        tokenizer.json built from a SentencePiece BPE model (its
                                     normalizer, dummy prefix, extra-whitespace removal,
                                     user-defined pieces, byte fallback); checked on probe texts
                                     when written (docs/huggingface.md lists the known gaps)
    HuggingFaceTokenizer,            the tokenizer's own `save_pretrained` files
    GPT2BPETokenizer
    NullTokenizer                    nothing: it has no text (config.json says so)

`export(tokenizer)` returns the files for the folder's top level (name -> bytes) and the note
config.json keeps under "tokenizer" -> "transformers". The tokenizer.json is built with the
`tokenizers` library (part of transformers); without it the folder gets no transformers
tokenizer and the note says why. The SentencePiece model is read with a small protobuf reader
(`read_sentencepiece`), so the `protobuf` package is not needed.
"""

from __future__ import annotations

import json
import random
import re
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from stag_plugin.training.data import tokenizers as stag_tokenizers

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # piece types
BPE = 2  # TrainerSpec.model_type
META = "\u2581"  # SentencePiece's space
PROBE_TEXTS = 400


# ---------------------------------------------------------------------------- the model file


@dataclass
class SentencePieceModel:
    """The fields of a SentencePiece ModelProto the conversion reads (proto field numbers in
    `read_sentencepiece`); defaults are the proto's."""

    pieces: List[Tuple[str, float, int]] = field(default_factory=list)  # (piece, score, type)
    model_type: int = 1
    byte_fallback: bool = False
    unk_piece: str = "<unk>"
    treat_whitespace_as_suffix: bool = False
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _wire_fields(data: bytes) -> Iterator[Tuple[int, object]]:
    """(field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = data[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def _varint(data: bytes, i: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[i]
        i += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return result, i


def read_sentencepiece(data: bytes) -> SentencePieceModel:
    """ModelProto: pieces = 1 (piece 1, score 2, type 3), trainer_spec = 2 (model_type 3,
    treat_whitespace_as_suffix 24, byte_fallback 35, unk_piece 45), normalizer_spec = 3
    (precompiled_charsmap 2, add_dummy_prefix 3, remove_extra_whitespaces 4,
    escape_whitespaces 5)."""
    model = SentencePieceModel()
    trainer = {3: "model_type", 24: "treat_whitespace_as_suffix", 35: "byte_fallback",
               45: "unk_piece"}
    normalizer = {2: "precompiled_charsmap", 3: "add_dummy_prefix",
                  4: "remove_extra_whitespaces", 5: "escape_whitespaces"}
    for number, value in _wire_fields(data):
        if number == 1:
            piece = {1: b"", 2: struct.pack("<f", 0.0), 3: NORMAL, **dict(_wire_fields(value))}
            model.pieces.append((piece[1].decode("utf-8"), struct.unpack("<f", piece[2])[0],
                                 piece[3]))
        for spec_number, names in ((2, trainer), (3, normalizer)):
            if number == spec_number:
                for inner, inner_value in _wire_fields(value):
                    if inner in names:
                        setattr(model, names[inner], _typed(model, names[inner], inner_value))
    return model


def _typed(model: SentencePieceModel, name: str, value):
    current = getattr(model, name)
    if isinstance(current, bool):
        return bool(value)
    return value.decode("utf-8") if isinstance(current, str) else value


# ---------------------------------------------------------------------------- tokenizer.json


def sentencepiece_tokenizer(model: SentencePieceModel, real_spaces: bool = False):
    """A `tokenizers.Tokenizer` encoding like SentencePiece's BPE `encode` of `model`.

    `real_spaces`: the pieces' U+2581 become spaces and the text is not escaped (identity
    normalization, no dummy prefix), so a literal U+2581 in the text falls back to bytes."""
    from tokenizers import Tokenizer, models

    if model.model_type != BPE or model.treat_whitespace_as_suffix:
        raise ValueError("only SentencePiece BPE models (whitespace as prefix) are converted")
    names = [_piece_name(piece, kind, real_spaces) for piece, _, kind in model.pieces]
    user = [name for name, (_, _, kind) in zip(names, model.pieces) if kind == USER_DEFINED]
    tokenizer = Tokenizer(models.BPE(
        vocab={name: i for i, name in enumerate(names)}, merges=_merges(model, names),
        unk_token=model.unk_piece, fuse_unk=True, byte_fallback=model.byte_fallback,
        ignore_merges=any(len(name) > 1 for name in user)))  # user pieces are emitted whole
    _add_text_steps(tokenizer, model, user, real_spaces)
    return tokenizer


def _piece_name(piece: str, kind: int, real_spaces: bool) -> str:
    return piece.replace(META, " ") if real_spaces and kind in (NORMAL, USER_DEFINED) else piece


def _merges(model: SentencePieceModel, names: List[str]) -> List[Tuple[str, str]]:
    """Every split of every normal piece into two normal pieces, ranked as SentencePiece
    merges: the higher the merged piece's score the earlier (then by id, then split point)."""
    normal = {name: (score, i) for i, (name, (_, score, kind)) in
              enumerate(zip(names, model.pieces)) if kind == NORMAL}
    ranked = []
    for name, (score, i) in normal.items():
        for cut in range(1, len(name)):
            left, right = name[:cut], name[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, cut, left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def _add_text_steps(tokenizer, model: SentencePieceModel, user: List[str],
                    real_spaces: bool) -> None:
    """Normalizer, pre-tokenizer (user-defined pieces isolated) and decoder, in
    SentencePiece's order."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    steps = []
    if model.precompiled_charsmap:
        steps.append(normalizers.Precompiled(model.precompiled_charsmap))
    if model.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""),
                  normalizers.Replace(Regex(" {2,}"), " ")]
    if model.escape_whitespaces and not real_spaces:
        steps.append(normalizers.Replace(" ", META))
    if model.add_dummy_prefix and not real_spaces:
        steps.append(normalizers.Prepend(META if model.escape_whitespaces else " "))
    if steps:
        tokenizer.normalizer = normalizers.Sequence(steps)
    if user:
        pattern = "|".join(re.escape(name) for name in sorted(user, key=len, reverse=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    back = [] if real_spaces else [decoders.Replace(META, " ")]
    back += [decoders.ByteFallback(), decoders.Fuse()]
    if model.add_dummy_prefix and not real_spaces:
        back.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(back)


def _tokenizer_config(model: SentencePieceModel, spec) -> bytes:
    """tokenizer_config.json: a plain fast tokenizer over tokenizer.json, its special tokens
    named, never matched in text (SentencePiece never does), nothing added around the ids."""
    def piece(i):
        return model.pieces[i][0] if i is not None and 0 <= i < len(model.pieces) else None

    unk = next((i for i, (_, _, kind) in enumerate(model.pieces) if kind == UNKNOWN), None)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "split_special_tokens": True,
              "clean_up_tokenization_spaces": False, "add_bos_token": False,
              "add_eos_token": False, "eos_token": piece(spec.eod)}
    for name, i in (("bos_token", spec.bos), ("unk_token", unk), ("pad_token", spec.pad)):
        if piece(i) is not None:
            config[name] = piece(i)
    return (json.dumps(config, indent=1) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------- export


def export(tokenizer) -> Tuple[Dict[str, bytes], dict]:
    """(files for the inference folder's top level, config.json's note on them) for a
    tokenizer the plugin built."""
    spec = stag_tokenizers.spec_of(tokenizer)
    if spec.type == stag_tokenizers.NULL:
        return {}, {"written": False, "why": "NullTokenizer has no text: its ids are the text "
                    "(prompts are whitespace-separated ids)"}
    if spec.type in (stag_tokenizers.HUGGINGFACE, stag_tokenizers.GPT2BPE):
        return _saved_pretrained(tokenizer), {"written": True, "exact": True,
                                              "from": "the tokenizer's save_pretrained"}
    try:
        import tokenizers  # noqa: F401 - the library the conversion writes with
    except ImportError:
        return {}, {"written": False, "why": "the `tokenizers` library is not installed "
                    "(pip install -e '.[hf]')"}
    return _sentencepiece_files(tokenizer, spec)


def _sentencepiece_files(tokenizer, spec) -> Tuple[Dict[str, bytes], dict]:
    path = (Path(tokenizer.path) if spec.type == stag_tokenizers.STAG
            else tokenizer.folder / stag_tokenizers.SP_MODEL)
    model = read_sentencepiece(path.read_bytes())
    try:
        converted = sentencepiece_tokenizer(model, real_spaces=spec.type == stag_tokenizers.STAG)
    except ValueError as err:
        return {}, {"written": False, "why": str(err)}
    files = {"tokenizer.json": converted.to_str(pretty=True).encode("utf-8"),
             "tokenizer_config.json": _tokenizer_config(model, spec)}
    differs = first_difference(tokenizer, converted, probe_texts(model))
    note = {"written": True, "exact": differs is None, "from": "the SentencePiece model"}
    if differs is not None:
        note["differs_on"] = differs
    return files, note


def _saved_pretrained(tokenizer) -> Dict[str, bytes]:
    with tempfile.TemporaryDirectory(prefix="stag-hf-tokenizer-") as tmp:
        tokenizer.inner.save_pretrained(tmp)
        return {path.name: path.read_bytes() for path in sorted(Path(tmp).iterdir())
                if path.is_file()}


def probe_texts(model: SentencePieceModel, count: int = PROBE_TEXTS, seed: int = 0) -> list:
    """Texts mixing the model's own pieces with spaces, newlines, tabs, rare characters, its
    user-defined and special pieces, and U+2581 (deterministic)."""
    rng = random.Random(seed)
    pieces = [p.replace(META, " ") for p, _, kind in model.pieces if kind == NORMAL]
    extra = [p for p, _, kind in model.pieces if kind in (USER_DEFINED, CONTROL, UNKNOWN)]
    extra += [" ", "  ", "   ", "\n", "\n\n", "\t", " \n", "\r\n", "é", "中", "😀", META,
              "0", "12", "\u00a0", "ﬁ"]
    texts = ["", " ", "  x", "x  ", "\n"]
    for _ in range(count):
        texts.append("".join(rng.choice(pieces if rng.random() < 0.7 else extra)
                             for _ in range(rng.randrange(1, 24))))
    return texts


def first_difference(tokenizer, converted, texts) -> Optional[str]:
    """The first text whose ids (or decoded text) differ between the plugin's tokenizer and
    the converted one, or None."""
    for text in texts:
        ids = tokenizer.tokenize(text)
        if converted.encode(text).ids != ids or converted.decode(ids) != tokenizer.detokenize(ids):
            return text
    return None
