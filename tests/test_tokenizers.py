"""Megatron-LM's tokenizer types (--tokenizer-type): built from their flags through megatron-core,
kept as tokenizer folders, trained on, saved with checkpoints, exported for transformers'
AutoTokenizer, and carried through upcycling.

Every tokenizer is made here, offline, from a corpus of random text drawn from a fresh seed: a
SentencePiece BPE model (sentencepiece's trainer), a Hugging Face tokenizer folder and GPT-2
vocab.json / merges.txt (the `tokenizers` library). The expected ids come from outside the
plugin and megatron-core: `sentencepiece.SentencePieceProcessor` on the model file,
`transformers.AutoTokenizer` on the Hugging Face folder, transformers' GPT2Tokenizer and a
plain-Python GPT-2 byte-level BPE (OpenAI's algorithm) on the two GPT-2 files.
"""

import argparse
import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from stag_plugin import cli
from stag_plugin.convert import hf_tokenizer
from stag_plugin.errors import StagError
from stag_plugin.training import checkpointing, integrity, train
from stag_plugin.training.data import tokenizers
from stag_plugin.training.data.corpus import Document
from stag_plugin.training.data.tokenizer import StagTokenizer, train_tokenizer

from stag_testing import SEEDS, fresh_seed, small_corpus, snapshot, tiny_train_flags

pytest.importorskip("transformers", reason="the tokenizer types need transformers")
spm = pytest.importorskip("sentencepiece")

# The text every tokenizer is trained on and tested with: words of several scripts, numbers,
# code, runs of whitespace; the test texts add characters the corpus never has.
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "token", "izer",
         "data", "déjà", "vu", "naïve", "café", "Straße", "αβγ", "中文", "русский", "😀", "42",
         "3.14", "1e-10", "0xFF", "2024", "def", "return", "self", "(x)", "x[i]", "==", "it's",
         "we'll", "#", "{}", "-->"]
SEPARATORS = [" "] * 8 + ["  ", "   ", "\n", "\n\n", "\t", " \n", "\r\n", ""]
UNSEEN = ["ﬁ", "Ω", "🙂", "\u00a0", "\u2581", "\u3000", "e\u0301", "ŉ", "\x0c"]
GPT2_EOD = "<|endoftext|>"


def random_text(rng: random.Random, words: int, extra=()) -> str:
    pool = WORDS + UNSEEN + list(extra)
    return "".join(rng.choice(pool) + rng.choice(SEPARATORS) for _ in range(words))


def random_texts(seed: int, count: int = 60, extra=()) -> list:
    rng = random.Random(seed)
    return ["", " ", "\n", "   x  ", *extra] + [random_text(rng, rng.randrange(1, 40), extra)
                                                 for _ in range(count)]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The tokenizer files of this session, made from a corpus drawn from a fresh seed."""
    seed = fresh_seed()
    rng = random.Random(seed)
    root = tmp_path_factory.mktemp("tokenizer-files")
    lines = [random_text(rng, rng.randrange(3, 16)).replace("\n", " ") for _ in range(600)]
    (root / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    made = argparse.Namespace(seed=seed, root=root, lines=lines)
    made.sp = train_sentencepiece(root, "llama", byte_fallback=True, split_digits=True,
                                  normalization_rule_name="identity", add_dummy_prefix=True,
                                  remove_extra_whitespaces=False,
                                  allow_whitespace_only_pieces=True)
    made.sp_nfkc = train_sentencepiece(root, "nfkc", byte_fallback=True)  # the trainer's defaults
    made.hf = make_hf_folder(root / "hf", lines)
    made.vocab, made.merges = make_gpt2_files(root / "gpt2", lines)
    return made


@pytest.fixture
def files(made):
    SEEDS.append(made.seed)  # listed with the test's own seeds when it fails
    return made


def train_sentencepiece(root: Path, name: str, vocab_size: int = 360, **settings) -> Path:
    """A Llama-like SentencePiece model: unk 0, bos 1, eos 2, no pad."""
    settings = {**dict(model_type="bpe", vocab_size=vocab_size, character_coverage=1.0,
                       unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2),
                **settings}
    spm.SentencePieceTrainer.train(input=str(root / "corpus.txt"),
                                   model_prefix=str(root / name), **settings)
    return root / f"{name}.model"


def make_hf_folder(folder: Path, lines: list, eos: bool = True) -> Path:
    """A byte-level BPE saved by transformers (tokenizer.json + tokenizer_config.json) whose
    post-processor puts <s> before every text, as Llama's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    specials = dict(bos_token="<s>", unk_token="<unk>", **({"eos_token": "</s>"} if eos else {}))
    PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(str(folder))
    return folder


def make_gpt2_files(folder: Path, lines: list) -> tuple:
    """GPT-2 style vocab.json / merges.txt of a byte-level BPE trained on `lines`, with
    <|endoftext|> the last id, as in GPT-2's own files."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(lines, vocab_size=400, special_tokens=[GPT2_EOD], show_progress=False)
    folder.mkdir()
    tok.save_model(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text("utf-8"))
    order = sorted((i, token) for token, i in vocab.items() if token != GPT2_EOD)
    vocab = {token: n for n, (_, token) in enumerate(order)}
    vocab[GPT2_EOD] = len(vocab)
    assert len(vocab) == 400  # 385 - 512 ids: padded to 512, the upcycled GPT's embedding
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), "utf-8")
    return folder / "vocab.json", folder / "merges.txt"


def parse(argv) -> argparse.Namespace:
    """`stag train`'s own parser over `argv` (its tokenizer and --vocab-size flags)."""
    return train.build_parser().parse_args([str(a) for a in argv])


def build(argv, folder: Path):
    """The tokenizer `stag train argv` would use, written as a tokenizer folder at `folder`."""
    return tokenizers.materialize(tokenizers.source_from_args(parse(argv)), folder)


def flags_of(files, kind: str) -> list:
    return {"GPTSentencePieceTokenizer": ["--tokenizer-model", files.sp],
            "HuggingFaceTokenizer": ["--tokenizer-model", files.hf],
            "GPT2BPETokenizer": ["--vocab-file", files.vocab, "--merge-file", files.merges],
            "NullTokenizer": ["--vocab-size", 300]}[kind]


def built_by_megatron_core(tokenizer) -> None:
    from megatron.core.tokenizers import MegatronTokenizerBase

    assert isinstance(tokenizer, MegatronTokenizerBase)
    assert isinstance(tokenizer.inner, MegatronTokenizerBase)
    assert type(tokenizer.inner._tokenizer).__module__.startswith("megatron.core.tokenizers.")


# ---------------------------------------------------------------------------- the GPT-2 reference


def gpt2_reference(vocab_file: Path, merges_file: Path):
    """OpenAI's GPT-2 encoder (bytes -> unicode, the pre-tokenizer regex, rank-ordered merges)
    over the two files; <|endoftext|> in the text is that token."""
    import regex

    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)  # 188 printable bytes keep their character
    byte_char = {b: chr(c) for b, c in zip(bs, cs)}
    vocab = json.loads(Path(vocab_file).read_text("utf-8"))
    lines = [line for line in Path(merges_file).read_text("utf-8").splitlines()
             if line and not line.startswith("#version")]
    ranks = {tuple(line.split(" ")): i for i, line in enumerate(lines)}
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                            r"""|\s+(?!\S)|\s+""")

    def bpe(word: list) -> list:
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, len(ranks)))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return word

    def encode(text: str) -> list:
        ids = []
        for n, part in enumerate(text.split(GPT2_EOD)):
            if n:
                ids.append(vocab[GPT2_EOD])
            for chunk in pattern.findall(part):
                ids += [vocab[p] for p in bpe([byte_char[b] for b in chunk.encode("utf-8")])]
        return ids

    return encode


# ---------------------------------------------------------------------------- the four types


def test_sentencepiece_type_gives_sentencepiece_ids(files, tmp_path):
    sp = spm.SentencePieceProcessor(model_file=str(files.sp))
    tok = build(["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", files.sp],
                tmp_path / "tok")
    built_by_megatron_core(tok)
    assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (sp.get_piece_size(), sp.eos_id(),
                                                          sp.bos_id(), -1)
    assert tok.spec.type == "GPTSentencePieceTokenizer"
    for text in random_texts(fresh_seed(), extra=["<s>", "</s>", "<unk>"]):
        ids = tok.tokenize(text)
        assert ids == sp.encode(text), text  # no bos / eos, as Megatron-LM's
        assert tok.detokenize(ids) == sp.decode(ids), text
    assert tok.tokenize_many(["a b", "c"]) == [sp.encode("a b"), sp.encode("c")]


def test_huggingface_type_gives_autotokenizer_ids(files, tmp_path):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(files.hf))
    tok = build(["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", files.hf],
                tmp_path / "tok")
    built_by_megatron_core(tok)
    assert (tok.vocab_size, tok.eod, tok.bos) == (len(reference), reference.eos_token_id,
                                                  reference.bos_token_id)
    for text in random_texts(fresh_seed(), extra=["<s>", "</s>"]):
        ids = tok.tokenize(text)
        assert ids == reference(text).input_ids, text  # with the bos: Megatron-LM's default
        assert ids[0] == reference.bos_token_id
        assert tok.detokenize(ids) == reference.decode(ids, skip_special_tokens=True), text


def test_gpt2_type_gives_gpt2_ids(files, tmp_path):
    from transformers import GPT2Tokenizer

    vocab = json.loads(files.vocab.read_text("utf-8"))
    merges = [tuple(line.split(" ")) for line in files.merges.read_text("utf-8").splitlines()
              if line and not line.startswith("#version")]
    transformers_gpt2 = GPT2Tokenizer(vocab=vocab, merges=merges)
    openai_gpt2 = gpt2_reference(files.vocab, files.merges)
    tok = build(["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", files.vocab,
                 "--merge-file", files.merges], tmp_path / "tok")
    built_by_megatron_core(tok)
    assert tok.vocab_size == len(vocab) and tok.eod == vocab[GPT2_EOD] == len(vocab) - 1
    for text in random_texts(fresh_seed(), extra=[GPT2_EOD]):
        ids = tok.tokenize(text)
        assert ids == transformers_gpt2(text).input_ids == openai_gpt2(text), text
        assert tok.detokenize(ids) == text.replace(GPT2_EOD, ""), text


def test_null_type_reads_ids(tmp_path):
    rng = random.Random(fresh_seed())
    size = rng.randrange(50, 5000)
    tok = build(["--tokenizer-type", "NullTokenizer", "--vocab-size", size], tmp_path / "tok")
    assert (tok.vocab_size, tok.eod, tok.bos, tok.pad) == (size, size - 1, None, -1)
    ids = [rng.randrange(size) for _ in range(rng.randrange(1, 30))]
    text = "".join(str(i) + rng.choice([" ", "  ", "\n", "\t"]) for i in ids)
    assert tok.tokenize(text) == ids and tok.tokenize("  \n") == []
    assert tok.detokenize(ids) == " ".join(map(str, ids))
    with pytest.raises(StagError) as err:
        tok.tokenize("def f(x):")
    assert "NullTokenizer" in err.value.problem and "--tokenizer-type" in err.value.fix


# ---------------------------------------------------------------------------- bad flags


def _bad(id_, argv, problem, fix):
    return pytest.param(argv, problem, fix, id=id_)


BAD_FLAGS = [
    _bad("unknown-type", ["--tokenizer-type", "Llama2Tokenizer"],
         ["--tokenizer-type Llama2Tokenizer", "not supported"],
         ["GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer",
          "NullTokenizer"]),
    _bad("files-without-type", ["--vocab-file", "{vocab}"], ["--vocab-file", "without"],
         ["--tokenizer-type"]),
    _bad("missing-model-file", ["--tokenizer-type", "GPTSentencePieceTokenizer",
                                "--tokenizer-model", "{tmp}/none.model"],
         ["--tokenizer-model", "none.model", "missing"], ["--tokenizer-model"]),
    _bad("model-is-a-folder", ["--tokenizer-type", "GPTSentencePieceTokenizer",
                               "--tokenizer-model", "{hf}"],
         ["--tokenizer-model", "a folder, not a file"], ["--tokenizer-model"]),
    _bad("no-model", ["--tokenizer-type", "GPTSentencePieceTokenizer"],
         ["GPTSentencePieceTokenizer needs --tokenizer-model"], ["--tokenizer-model PATH"]),
    _bad("no-merge-file", ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "{vocab}"],
         ["needs --merge-file"], ["--merge-file PATH"]),
    _bad("missing-merge-file", ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                                "{vocab}", "--merge-file", "{tmp}/merges.txt"],
         ["--merge-file", "missing"], ["--merge-file"]),
    _bad("gpt2-given-a-model", ["--tokenizer-type", "GPT2BPETokenizer", "--tokenizer-model",
                                "{sp}", "--vocab-file", "{vocab}", "--merge-file", "{merges}"],
         ["GPT2BPETokenizer reads --vocab-file and --merge-file", "not --tokenizer-model"],
         ["drop --tokenizer-model"]),
    _bad("sentencepiece-given-gpt2-files", ["--tokenizer-type", "GPTSentencePieceTokenizer",
                                            "--tokenizer-model", "{sp}", "--merge-file",
                                            "{merges}"],
         ["reads --tokenizer-model", "not --merge-file"], ["drop --merge-file"]),
    _bad("null-given-files", ["--tokenizer-type", "NullTokenizer", "--vocab-size", "9",
                              "--tokenizer-model", "{sp}"],
         ["NullTokenizer reads no files", "--tokenizer-model"], ["drop --tokenizer-model"]),
    _bad("null-vocab-size-1", ["--tokenizer-type", "NullTokenizer", "--vocab-size", "1"],
         ["NullTokenizer needs --vocab-size >= 2", "got 1"], ["--vocab-size N"]),
    _bad("hf-folder-without-vocabulary", ["--tokenizer-type", "HuggingFaceTokenizer",
                                          "--tokenizer-model", "{empty}"],
         ["--tokenizer-model", "not a Hugging Face tokenizer folder", "tokenizer.json"],
         ["save_pretrained"]),
    _bad("hf-given-a-file", ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                             "{sp}"], ["--tokenizer-model", "not a folder (a file)"],
         ["local Hugging Face tokenizer folder"]),
    _bad("hf-without-eos", ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                            "{no_eos}"], ["HuggingFaceTokenizer has no end-of-document"],
         ["eos token"]),
    _bad("gpt2-vocab-without-eod", ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                                    "{no_eod}", "--merge-file", "{merges}"],
         ["--vocab-file", GPT2_EOD], [GPT2_EOD]),
    _bad("gpt2-vocab-not-json", ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "{sp}",
                                 "--merge-file", "{merges}"],
         ["--vocab-file", "not a JSON vocabulary"], ["vocab.json"]),
    _bad("model-not-sentencepiece", ["--tokenizer-type", "GPTSentencePieceTokenizer",
                                     "--tokenizer-model", "{vocab}"],
         ["cannot build a GPTSentencePieceTokenizer", "--tokenizer-model"],
         ["GPTSentencePieceTokenizer"]),
]


@pytest.mark.parametrize("argv, problem, fix", BAD_FLAGS)
def test_bad_tokenizer_flags_name_the_flag_and_the_fix(files, tmp_path, argv, problem, fix):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no tokenizer here\n")
    vocab = json.loads(files.vocab.read_text("utf-8"))
    del vocab[GPT2_EOD]
    (tmp_path / "no_eod.json").write_text(json.dumps(vocab))
    places = dict(tmp=tmp_path, sp=files.sp, hf=files.hf, vocab=files.vocab,
                  merges=files.merges, empty=tmp_path / "empty", no_eod=tmp_path / "no_eod.json")
    if "{no_eos}" in argv:
        places["no_eos"] = make_hf_folder(tmp_path / "no_eos", files.lines[:50], eos=False)
    out = tmp_path / "out" / "tokenizer"
    with pytest.raises(StagError) as err:
        build([str(a).format(**places) for a in argv], out)
    for word in problem:
        assert word.format(**places) in err.value.problem, (word, str(err.value))
    for word in fix:
        assert word in err.value.fix, (word, str(err.value))
    assert not out.exists() and not list((tmp_path / "out").glob("*"))  # nothing left


def test_null_tokenizer_without_vocab_size(tmp_path):
    """`stag convert from-gpt` has Megatron-LM's --vocab-size (no default): NullTokenizer
    without it names the flag."""
    from stag_plugin.convert import from_gpt

    options = from_gpt.build_parser().parse_args(
        ["--load", str(tmp_path), "--out", str(tmp_path / "out"), "--recipe", "duplicate",
         "--tokenizer-type", "NullTokenizer"])
    with pytest.raises(StagError) as err:
        tokenizers.source_from_args(options)
    assert "NullTokenizer needs --vocab-size" in err.value.problem
    assert "--vocab-size N" in err.value.fix


# ---------------------------------------------------------------------------- tokenizer folders


@pytest.mark.parametrize("kind", tokenizers.TYPES)
def test_tokenizer_folder_round_trips_whatever_its_path(files, tmp_path, kind):
    """A folder holds the spec and byte copies of the files; it loads to the same tokenizer
    wherever it lies, and its identity names no path."""
    argv = ["--tokenizer-type", kind, *flags_of(files, kind)]
    source = tokenizers.source_from_args(parse(argv))
    first = tokenizers.materialize(source, tmp_path / "a" / "tokenizer")
    spec = first.spec
    assert spec.identity == source.identity and spec.type == kind
    names = {p.name for p in first.folder.iterdir()}
    assert names == {tokenizers.SPEC_FILE, *spec.files}
    originals = {"tokenizer.model": files.sp, "vocab.json": files.vocab,
                 "merges.txt": files.merges, "tokenizer.json": files.hf / "tokenizer.json",
                 "tokenizer_config.json": files.hf / "tokenizer_config.json"}
    for name, digest in spec.files.items():
        assert digest == sha256(first.folder / name)
        if name in originals and (kind, name) != ("GPT2BPETokenizer", "tokenizer_config.json"):
            assert (first.folder / name).read_bytes() == originals[name].read_bytes(), name
    assert str(tmp_path) not in (first.folder / tokenizers.SPEC_FILE).read_text()

    # The same files elsewhere, under other names: the same identity.
    elsewhere = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(files.root, elsewhere)
    moved = {"GPTSentencePieceTokenizer": ["--tokenizer-model", elsewhere / files.sp.name],
             "HuggingFaceTokenizer": ["--tokenizer-model", elsewhere / "hf"],
             "GPT2BPETokenizer": ["--vocab-file", elsewhere / "gpt2" / "vocab.json",
                                  "--merge-file", elsewhere / "gpt2" / "merges.txt"],
             "NullTokenizer": ["--vocab-size", 300]}[kind]
    assert tokenizers.source_from_args(parse(["--tokenizer-type", kind, *moved])).identity == \
        spec.identity

    copy = Path(shutil.copytree(first.folder, tmp_path / "copy" / "x" / "tokenizer"))
    again = tokenizers.load_folder(copy)
    assert again.spec == spec and again.unique_identifiers == first.unique_identifiers
    assert str(tmp_path) not in json.dumps(again.unique_identifiers)
    texts = random_texts(fresh_seed(), 20) if kind != "NullTokenizer" else ["1 2 3", "299 0"]
    assert [again.tokenize(t) for t in texts] == [first.tokenize(t) for t in texts]

    saved = tmp_path / "saved" / "tokenizer"
    assert tokenizers.save_tokenizer(again, saved) == spec
    assert snapshot_bytes(saved) == snapshot_bytes(first.folder)
    assert tokenizers.source_of_folder(saved).identity == spec.identity
    before = snapshot(first.folder)
    tokenizers.materialize(tokenizers.source_of_folder(saved), first.folder)  # reused as is
    assert snapshot(first.folder) == before


def snapshot_bytes(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


def test_a_changed_or_missing_file_is_detected(files, tmp_path):
    tok = build(["--tokenizer-type", "GPT2BPETokenizer", *flags_of(files, "GPT2BPETokenizer")],
                tmp_path / "tokenizer")
    merges = tok.folder / "merges.txt"
    lines = merges.read_text("utf-8").splitlines()
    rng = random.Random(fresh_seed())
    i, j = sorted(rng.sample(range(1, len(lines)), 2))  # two merges swap ranks
    lines[i], lines[j] = lines[j], lines[i]
    original = merges.read_bytes()
    merges.write_text("\n".join(lines) + "\n", "utf-8")
    with pytest.raises(StagError) as err:
        tokenizers.load_folder(tok.folder)
    assert "merges.txt is changed" in err.value.problem and "sha256" in err.value.problem
    # ... and the changed files are another tokenizer
    other = tokenizers.source_from_flags("GPT2BPETokenizer", vocab_file=files.vocab,
                                         merge_file=merges)
    assert other.identity != tok.spec.identity
    merges.unlink()
    with pytest.raises(StagError) as err:
        tokenizers.load_folder(tok.folder)
    assert "merges.txt is missing" in err.value.problem
    # materialize (which writes data caches' and checkpoints' folders) puts a damaged one right
    source = tokenizers.source_from_flags("GPT2BPETokenizer", vocab_file=files.vocab,
                                          merge_file=files.merges)
    assert tokenizers.materialize(source, tok.folder).spec == tok.spec
    assert merges.read_bytes() == original
    assert tokenizers.load_folder(tok.folder).spec == tok.spec
    # a materialize over a folder of another tokenizer replaces it
    null = tokenizers.materialize(tokenizers.source_from_flags("NullTokenizer", vocab_size=7),
                                  tok.folder)
    assert null.spec.type == "NullTokenizer" and sorted(p.name for p in tok.folder.iterdir()) \
        == [tokenizers.SPEC_FILE]
    (tok.folder / tokenizers.SPEC_FILE).write_text("{not json")
    with pytest.raises(StagError, match="cannot be read"):
        tokenizers.load_folder(tok.folder)


def test_legacy_tokenizer_model_loads_as_the_default(tmp_path, stag_model):
    """An iteration saved before tokenizer types holds tokenizer.model: the default tokenizer."""
    shutil.copyfile(stag_model, tmp_path / "tokenizer.model")
    tok = tokenizers.load_saved(tmp_path)
    assert isinstance(tok, StagTokenizer)
    assert tokenizers.saved_spec(tmp_path).type == tokenizers.STAG
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(StagError, match="holds no tokenizer"):
        tokenizers.load_saved(tmp_path)
    assert tokenizers.saved_spec(tmp_path) is None


# ---------------------------------------------------------------------------- transformers export


def exported_folder(tokenizer, folder: Path):
    """The transformers files `stag convert to-inference` writes for `tokenizer`, in `folder`,
    loaded by AutoTokenizer; and the note."""
    from transformers import AutoTokenizer

    files, note = hf_tokenizer.export(tokenizer)
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return (AutoTokenizer.from_pretrained(str(folder)) if files else None), note


@pytest.fixture(scope="module")
def stag_model(tmp_path_factory):
    """The plugin's default tokenizer (data.tokenizer.train_tokenizer) on standard-library files
    and random text."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [Document(p.name, p.read_text("utf-8")) for p in sorted(stdlib.glob("*.py"))[:12]]
    rng = random.Random(fresh_seed())
    docs.append(Document("random", "\n".join(random_text(rng, 12) for _ in range(300))))
    return train_tokenizer(docs, tmp_path_factory.mktemp("stag-tokenizer"), vocab_size=700)


@pytest.mark.parametrize("layout", ["llama", "nfkc"])
def test_sentencepiece_export_matches_sentencepiece(files, tmp_path, layout):
    model = files.sp if layout == "llama" else files.sp_nfkc
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = tokenizers.materialize(tokenizers.source_from_flags(
        "GPTSentencePieceTokenizer", tokenizer_model=model), tmp_path / "tokenizer")
    auto, note = exported_folder(tok, tmp_path / "hf")
    assert note == {"written": True, "exact": True, "from": "the SentencePiece model"}
    assert (auto.eos_token_id, auto.bos_token_id) == (sp.eos_id(), sp.bos_id())
    for text in random_texts(fresh_seed(), 150, extra=["<s>", "</s>", "<unk>", "▁▁"]):
        ids = auto(text).input_ids
        assert ids == sp.encode(text), text
        assert auto.decode(ids) == sp.decode(ids), text


def test_default_tokenizer_export_matches_it(tmp_path, stag_model):
    tok = StagTokenizer(stag_model)
    auto, note = exported_folder(tok, tmp_path / "hf")
    assert note["written"] and note["exact"], note
    assert auto.eos_token_id == tok.eod
    for text in random_texts(fresh_seed(), 150, extra=["def f(x):\n\t\treturn x  \n", "▁"]):
        ids = auto(text).input_ids
        assert ids == tok.tokenize(text), text
        assert auto.decode(ids) == text == tok.detokenize(ids), text


def test_export_says_when_it_is_not_exact(files, tmp_path):
    """A BPE model without byte fallback decodes unknown characters otherwise (the note says
    so, with a text where the two differ); a unigram model is not converted (the note says
    why); a NullTokenizer has no text."""
    no_bytes = train_sentencepiece(files.root, "no-bytes", vocab_size=200)
    unigram = train_sentencepiece(files.root, "unigram", vocab_size=120, model_type="unigram",
                                 hard_vocab_limit=False)
    tok = tokenizers.materialize(tokenizers.source_from_flags(
        "GPTSentencePieceTokenizer", tokenizer_model=no_bytes), tmp_path / "a")
    auto, note = exported_folder(tok, tmp_path / "a-hf")
    assert note["written"] and note["exact"] is False, note
    text = note["differs_on"]
    ids = auto(text).input_ids
    assert ids != tok.tokenize(text) or auto.decode(ids) != tok.detokenize(ids), text
    tok = tokenizers.materialize(tokenizers.source_from_flags(
        "GPTSentencePieceTokenizer", tokenizer_model=unigram), tmp_path / "b")
    assert hf_tokenizer.export(tok) == ({}, {"written": False, "why": "only SentencePiece BPE "
                                             "models (whitespace as prefix) are converted"})
    for kind in ("HuggingFaceTokenizer", "GPT2BPETokenizer"):
        tok = build(["--tokenizer-type", kind, *flags_of(files, kind)], tmp_path / kind)
        auto, note = exported_folder(tok, tmp_path / f"{kind}-hf")
        assert note["written"] and note["exact"]
        texts = random_texts(fresh_seed(), 30)
        assert [auto(t).input_ids for t in texts] == [tok.tokenize(t) for t in texts]
    null = tokenizers.materialize(tokenizers.source_from_flags("NullTokenizer", vocab_size=9),
                                  tmp_path / "null")
    files_, note = hf_tokenizer.export(null)
    assert files_ == {} and note["written"] is False and "NullTokenizer" in note["why"]


# ---------------------------------------------------------------------------- prepared data


def test_prepared_data_is_keyed_by_the_tokenizer(files, tmp_path):
    """prepare_data with a given tokenizer copies it into the folder and writes its ids; the
    same tokenizer reuses the folder, another one (same vocabulary size) rewrites it, and
    datasets are not built with a tokenizer the data was not prepared with."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from stag_plugin.training.data import DataError, build_gpt_datasets, prepare_data

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(fresh_seed())
    for i in range(30):
        text = random_text(rng, rng.randrange(40, 120)).replace("\r", "")
        (corpus / f"doc{i}.txt").write_text(text, "utf-8")
    source = tokenizers.source_from_flags("GPT2BPETokenizer", vocab_file=files.vocab,
                                          merge_file=files.merges)

    def prepare(tokenizer):
        return prepare_data([str(corpus)], tmp_path / "data", valid_fraction=0.2,
                            test_fraction=0.2, progress=False, tokenizer=tokenizer)

    prepared = prepare(source)
    tok = tokenizers.load_prepared(prepared)
    assert tok.spec.identity == source.identity == prepared.tokenizer_sha256
    assert prepared.vocab_size == tok.vocab_size and tok.folder.parent == tmp_path / "data"
    reference = gpt2_reference(files.vocab, files.merges)
    documents = {tuple(reference(p.read_text("utf-8")) + [tok.eod]) for p in corpus.iterdir()}
    dataset = IndexedDataset(prepared.prefixes["train"])  # kept: its items view its mmap
    assert len(dataset) == prepared.num_documents["train"] > 0
    assert all(tuple(dataset[i].tolist()) in documents for i in range(len(dataset)))
    before = snapshot(tmp_path / "data")
    assert prepare(source) == prepared and snapshot(tmp_path / "data") == before

    lines = files.merges.read_text("utf-8").splitlines()
    lines[-1], lines[-2] = lines[-2], lines[-1]
    (tmp_path / "merges.txt").write_text("\n".join(lines) + "\n", "utf-8")
    other = tokenizers.source_from_flags("GPT2BPETokenizer", vocab_file=files.vocab,
                                         merge_file=tmp_path / "merges.txt")
    with pytest.raises(DataError, match="is not the one"):
        build_gpt_datasets(prepared, tokenizers.materialize(other, tmp_path / "other"), 16, 1,
                           (4, 2, 2))
    again = prepare(other)
    assert again.key != prepared.key and again.tokenizer_sha256 == other.identity


# ---------------------------------------------------------------------------- stag train, convert


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, made):
    """`stag train --tokenizer-type GPT2BPETokenizer` on 40 standard-library files: a 4-step
    run that exits (and saves) after step 2."""
    corpus = small_corpus(tmp_path_factory, "tokenizers")
    cache = tmp_path_factory.mktemp("gpt2-data")
    save = tmp_path_factory.mktemp("gpt2-run") / "run"
    flags = [*tiny_train_flags(corpus, cache, 512), "--micro-batch-size", "4",
             "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(made.vocab),
             "--merge-file", str(made.merges), "--train-iters", "4"]
    assert cli.main(["train", *flags, "--exit-interval", "2", "--save", str(save)]) == 0
    assert checkpointing.latest_iteration(save) == 2
    return argparse.Namespace(save=save, flags=flags, cache=cache, corpus=corpus)


def test_training_saves_the_tokenizer_in_the_checkpoint(files, gpt2_run):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    folder = checkpointing.iteration_dir(gpt2_run.save, 2)
    saved = folder / "tokenizer"
    assert not (folder / "tokenizer.model").exists()
    assert sorted(p.name for p in saved.iterdir()) == sorted(
        ["merges.txt", "vocab.json", "tokenizer_config.json", tokenizers.SPEC_FILE])
    assert (saved / "vocab.json").read_bytes() == files.vocab.read_bytes()
    assert (saved / "merges.txt").read_bytes() == files.merges.read_bytes()
    manifest = (folder / integrity.MANIFEST).read_text()
    assert "tokenizer/vocab.json" in manifest and "tokenizer/merges.txt" in manifest
    tok = tokenizers.load_saved(folder)
    record = json.loads((folder / checkpointing.RUN_FILE).read_text())
    assert record["tokenizer"] == tok.spec.to_json()
    assert tok.spec.type == "GPT2BPETokenizer" and tok.eod == tok.vocab_size - 1
    assert record["architecture"]["padded_vocab_size"] == 512
    # the datasets hold the GPT-2 ids of each document, then its end of document
    (prefix,) = gpt2_run.cache.glob("valid_text_document.idx")
    reference = gpt2_reference(files.vocab, files.merges)
    dataset = IndexedDataset(str(prefix.with_suffix("")))  # kept: its items view its mmap
    first = dataset[0].tolist()
    assert first[-1] == tok.eod and tok.eod not in first[:-1]
    texts = [p.read_text("utf-8") for p in sorted(gpt2_run.corpus.iterdir())]
    assert first[:-1] in [reference(text) for text in texts]


def test_resume_with_another_tokenizer_is_refused(files, gpt2_run, tmp_path, capsys):
    """Same vocabulary size, two merges swapped: another tokenizer, so another identity."""
    lines = files.merges.read_text("utf-8").splitlines()
    lines[-1], lines[-2] = lines[-2], lines[-1]
    (tmp_path / "merges.txt").write_text("\n".join(lines) + "\n", "utf-8")
    flags = [a if a != str(files.merges) else str(tmp_path / "merges.txt")
             for a in gpt2_run.flags]
    flags[flags.index("--data-cache-dir") + 1] = str(tmp_path / "data")
    before = snapshot(gpt2_run.save)
    capsys.readouterr()
    code = cli.main(["train", *flags, "--load", str(gpt2_run.save),
                     "--save", str(tmp_path / "resumed")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("stag train: error: "), err
    assert "is not the one saved with --load" in err and "GPT2BPETokenizer" in err, err
    assert snapshot(gpt2_run.save) == before and not (tmp_path / "resumed").exists()
    # the checkpoint's own tokenizer files resume it
    own = checkpointing.iteration_dir(gpt2_run.save, 2) / "tokenizer"
    flags = [{str(files.vocab): str(own / "vocab.json"),
              str(files.merges): str(own / "merges.txt")}.get(a, a) for a in gpt2_run.flags]
    assert cli.main(["train", *flags, "--load", str(gpt2_run.save),
                     "--save", str(tmp_path / "resumed")]) == 0
    assert checkpointing.latest_iteration(tmp_path / "resumed") == 4


def test_inference_folder_tokenizer_is_the_checkpoints_for_transformers(gpt2_run, tmp_path,
                                                                       capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "model"
    assert cli.main(["convert", "to-inference", "--load", str(gpt2_run.save), "--out",
                     str(out), "--no-progress"]) == 0
    saved = checkpointing.iteration_dir(gpt2_run.save, 2) / "tokenizer"
    assert snapshot_bytes(out / "tokenizer") == snapshot_bytes(saved)
    plugin = tokenizers.load_saved(out)
    config = json.loads((out / "config.json").read_text())
    assert config["tokenizer"]["identity"] == plugin.spec.identity
    assert config["tokenizer"]["transformers"]["exact"] is True
    assert config["eos_token_id"] == plugin.eod
    auto = AutoTokenizer.from_pretrained(str(out))
    assert auto.eos_token_id == plugin.eod
    for text in random_texts(fresh_seed(), 80, extra=[GPT2_EOD]):
        assert auto(text).input_ids == plugin.tokenize(text), text
    for load in (out, gpt2_run.save):
        capsys.readouterr()
        code = cli.main(["generate", "--load", str(load), "--prompt", "def main(args):\n",
                         "--max-new-tokens", "4", "--seed", "1", "--temperature", "1"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "tokens | prefill" in captured.err, captured.err


def swap_tokenizer(run: Path, tmp_path: Path, tokenizer) -> Path:
    """A copy of `run` whose latest iteration holds `tokenizer` instead (manifest rewritten):
    a checkpoint of a run trained with that tokenizer, as far as the conversion can tell."""
    copy = Path(shutil.copytree(run, tmp_path / "run"))
    folder = checkpointing.iteration_dir(copy, checkpointing.latest_iteration(copy))
    shutil.rmtree(folder / "tokenizer")
    tokenizers.save_tokenizer(tokenizer, folder / "tokenizer")
    integrity.write_manifest(folder)
    return copy


def test_inference_folder_says_when_transformers_files_are_not_exact(files, gpt2_run, tmp_path,
                                                                     capsys):
    no_bytes = train_sentencepiece(files.root, "no-bytes-2", vocab_size=200)
    tok = tokenizers.materialize(tokenizers.source_from_flags(
        "GPTSentencePieceTokenizer", tokenizer_model=no_bytes), tmp_path / "tokenizer")
    run = swap_tokenizer(gpt2_run.save, tmp_path, tok)
    out = tmp_path / "model"
    capsys.readouterr()
    assert cli.main(["convert", "to-inference", "--load", str(run), "--out", str(out),
                     "--no-progress"]) == 0
    assert "note: the transformers tokenizer differs" in capsys.readouterr().err
    note = json.loads((out / "config.json").read_text())["tokenizer"]["transformers"]
    assert note["written"] is True and note["exact"] is False and "differs_on" in note
    assert (out / "tokenizer.json").is_file()


def test_null_tokenizer_run_converts_and_generates_from_ids(gpt2_run, tmp_path, capsys):
    null = tokenizers.materialize(tokenizers.source_from_flags("NullTokenizer", vocab_size=500),
                                  tmp_path / "tokenizer")
    run = swap_tokenizer(gpt2_run.save, tmp_path, null)
    out = tmp_path / "model"
    assert cli.main(["convert", "to-inference", "--load", str(run), "--out", str(out),
                     "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["tokenizer"]["transformers"]["written"] is False
    assert config["eos_token_id"] == 499
    assert not (out / "tokenizer.json").exists() and (out / "tokenizer").is_dir()
    capsys.readouterr()
    code = cli.main(["generate", "--load", str(out), "--prompt", "17 4 250",
                     "--max-new-tokens", "3", "--temperature", "1", "--seed", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert all(0 <= int(i) < 500 for i in captured.out.split()), captured.out


# ---------------------------------------------------------------------------- upcycling


@pytest.mark.filterwarnings("ignore:.*has no manifest.json")  # Megatron-LM writes none
def test_upcycling_a_megatron_lm_gpt_carries_its_tokenizer_type(files, tmp_path, capsys):
    """A Megatron-LM GPT trained with GPT2BPETokenizer: `stag convert from-gpt` reads the type
    and files from the checkpoint's args (or the flags), and the StagFormer it writes carries
    that tokenizer; files the args name that are not here are a clear error."""
    from test_gpt_parity import megatron_gpt

    from stag_plugin.compat.megatron import initialize_single_process

    from convert_testing import assert_convert_error, megatron_lm_args, save_megatron_lm
    from stag_testing import tiny_config

    initialize_single_process()
    config = tiny_config(num_sections=1, num_layers=2, hidden_size=32)
    torch.manual_seed(fresh_seed())
    gpt = megatron_gpt(config, tie=True, vocab=512, max_len=32)
    margs = megatron_lm_args(config, tie=True, tokenizer_type="GPT2BPETokenizer",
                             vocab_file=str(files.vocab), merge_file=str(files.merges),
                             tokenizer_model=None)
    root = save_megatron_lm(gpt, tmp_path / "gpt", 5, margs)
    base = ["from-gpt", "--load", root, "--recipe", "duplicate", "--stag-num-sections", 2,
            "--no-progress"]

    out = tmp_path / "stag"
    assert cli.main(["convert", *map(str, base), "--out", str(out)]) == 0
    folder = checkpointing.iteration_dir(out, 0)
    record = json.loads((folder / checkpointing.RUN_FILE).read_text())
    assert record["tokenizer"]["type"] == "GPT2BPETokenizer"
    assert (folder / "tokenizer" / "vocab.json").read_bytes() == files.vocab.read_bytes()
    assert (folder / "tokenizer" / "merges.txt").read_bytes() == files.merges.read_bytes()
    assert tokenizers.load_saved(folder).spec == tokenizers.TokenizerSpec.from_json(
        record["tokenizer"], "stag_run.json")

    out = tmp_path / "null"  # a flag of another type wins over the stored args
    assert cli.main(["convert", *map(str, base), "--out", str(out), "--tokenizer-type",
                     "NullTokenizer", "--vocab-size", "450"]) == 0
    spec = tokenizers.saved_spec(checkpointing.iteration_dir(out, 0))
    assert (spec.type, spec.vocab_size, spec.eod) == ("NullTokenizer", 450, 449)

    moved = save_megatron_lm(gpt, tmp_path / "moved", 5, argparse.Namespace(**{
        **vars(margs), "vocab_file": str(tmp_path / "elsewhere" / "vocab.json")}))
    argv = ["from-gpt", "--load", moved, "--recipe", "duplicate", "--stag-num-sections", 2,
            "--out", tmp_path / "out"]
    assert_convert_error(capsys, argv, "--vocab-file", "does not exist here",
                         out=tmp_path / "out")
    assert cli.main(["convert", *map(str, argv), "--vocab-file", str(files.vocab)]) == 0

    # Args that name no tokenizer: --tokenizer-model alone is the plugin's own SentencePiece
    # layout; any other SentencePiece model needs its type, and must fit the embedding.
    plain = save_megatron_lm(gpt, tmp_path / "plain", 5, megatron_lm_args(config, tie=True))
    argv = ["from-gpt", "--load", plain, "--recipe", "duplicate", "--stag-num-sections", 2,
            "--out", tmp_path / "out2", "--tokenizer-model", files.sp]
    assert_convert_error(capsys, argv, "not this plugin's SentencePiece layout",
                         "--tokenizer-type GPTSentencePieceTokenizer", out=tmp_path / "out2")
    assert_convert_error(capsys, [*argv, "--tokenizer-type", "GPTSentencePieceTokenizer"],
                         "360 ids pad to 384 rows", "512", out=tmp_path / "out2")
