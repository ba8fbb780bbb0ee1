"""Data pipeline: corpus, hash split, tokenizer round trip and cache, indexed datasets, GPTDataset
windows, collate, and input errors that leave a prepared folder untouched.

Expectations are computed independently of the code under test where possible: the stdlib file
list by os.walk, the split by re-hashing ids, dataset contents by decoding back to the documents.
"""

import hashlib
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from stag_plugin.errors import StagError
from stag_plugin.training.data import (
    DataError,
    Document,
    StagTokenizer,
    batch_from_samples,
    build_gpt_datasets,
    load_corpus,
    prepare_data,
    split_documents,
    train_tokenizer,
)
from stag_plugin.training.data import indexed as indexed_mod
from stag_plugin.training.data import tokenizer as tokenizer_mod

from stag_testing import snapshot

STDLIB = Path(sysconfig.get_paths()["stdlib"])
EXCLUDED = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
SPLITS = ("train", "valid", "test")
EOD = 2

TRICKY = [
    "def f(x):\n\tif x:\n\t\treturn 1   \n\n\n\n    pass\t \n",
    "trailing spaces   \n   \n\t\n",
    "no newline at end",
    "\n\n\n",
    " leading space and  two  spaces",
    "non-ASCII: héllo wörld, Straße, αβγ, 中文, русский",
    "emoji 😀🚀 and ZWJ 👩‍💻, flags 🇫🇷",
    "literal meta \u2581 char \u2581\u2581 and ' \u2581 '",
    "windows\r\nline\r\nends\r\n",
    "nul \x00 and form feed \x0c and bell \x07",
    "\u00a0non-breaking\u3000ideographic space",
    "combining e\u0301 vs é",
    "",
    " ",
    "0123456789 3.14159 1e-10 0xFF",
]


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_corpus():
    return load_corpus(None)


@pytest.fixture(scope="module")
def stdlib_splits(stdlib_corpus):
    return split_documents(stdlib_corpus.documents)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The real default: stdlib corpus, vocabulary 8192, 5% valid, 5% test."""
    return prepare_data(None, tmp_path_factory.mktemp("stdlib_data"), progress=False)


@pytest.fixture(scope="module")
def tokenizer(prepared):
    return StagTokenizer.load(prepared.tokenizer_path)


@pytest.fixture(scope="module")
def mini_dir(tmp_path_factory, stdlib_splits):
    """A user directory of 40 small stdlib files (train split), as `.py` files."""
    root = tmp_path_factory.mktemp("user") / "mini"
    root.mkdir()
    docs = [d for d in stdlib_splits["train"] if 2_000 <= len(d.text) <= 20_000][:40]
    for doc in docs:
        (root / doc.doc_id.replace("/", "__")).write_text(doc.text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def mini_prepared(tmp_path_factory, mini_dir):
    out = tmp_path_factory.mktemp("mini_out")
    return prepare_data(
        [str(mini_dir)], out, vocab_size=400, valid_fraction=0.3, test_fraction=0.2, progress=False
    )


def _expected_stdlib_ids() -> set:
    """Independent walk of the stdlib: non-empty UTF-8 .py files outside excluded folders."""
    found = set()
    for dirpath, _, filenames in os.walk(STDLIB):
        parts = Path(dirpath).relative_to(STDLIB).parts
        if EXCLUDED.intersection(parts):
            continue
        for name in filenames:
            if not name.endswith(".py"):
                continue
            try:
                text = Path(dirpath, name).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            if text.strip():
                found.add("/".join(parts + (name,)))
    return found


def _hash_split(doc_id: str, valid: float = 0.05, test: float = 0.05) -> str:
    u = int(hashlib.sha256(doc_id.encode()).hexdigest()[:16], 16) / 2**64
    return "valid" if u < valid else "test" if u < valid + test else "train"


# ---------------------------------------------------------------------------------------------
# corpus and split
# ---------------------------------------------------------------------------------------------


def test_stdlib_corpus_is_the_filtered_stdlib(stdlib_corpus):
    ids = [doc.doc_id for doc in stdlib_corpus.documents]
    assert ids == sorted(ids)
    assert set(ids) == _expected_stdlib_ids()
    assert 500 <= len(ids) <= 1500
    assert all(not EXCLUDED.intersection(i.split("/")[:-1]) for i in ids)
    candidates = ("test", "idlelib/idle_test", "lib2to3/tests", "site-packages")
    excluded_on_disk = [p for p in candidates if (STDLIB / p).is_dir()]
    if not excluded_on_disk:
        pytest.skip("this interpreter ships no test/site-packages folders to exclude")
    for folder in excluded_on_disk:
        some = next((STDLIB / folder).rglob("*.py"), None)
        if some is not None:
            assert some.relative_to(STDLIB).as_posix() not in ids
    doc = stdlib_corpus.documents[ids.index("json/decoder.py")]
    assert doc.text == (STDLIB / "json" / "decoder.py").read_bytes().decode("utf-8")


def test_split_follows_the_hash_rule_and_is_disjoint_and_covering(stdlib_corpus, stdlib_splits):
    ids = [doc.doc_id for doc in stdlib_corpus.documents]
    got = {split: [d.doc_id for d in stdlib_splits[split]] for split in SPLITS}
    assert sorted(sum(got.values(), [])) == sorted(ids)  # covering and disjoint
    for split in SPLITS:
        assert got[split], f"{split} split is empty"
        assert all(_hash_split(i) == split for i in got[split])
    assert 0.02 < len(got["valid"]) / len(ids) < 0.10
    assert split_documents(stdlib_corpus.documents) == stdlib_splits


def test_split_is_the_same_in_a_fresh_process(stdlib_splits):
    code = (
        "import json; from stag_plugin.training.data.corpus import load_corpus, split_documents\n"
        "s = split_documents(load_corpus().documents)\n"
        "print(json.dumps({k: [d.doc_id for d in v] for k, v in s.items()}))"
    )
    env = dict(os.environ, PYTHONHASHSEED="4321")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == {k: [d.doc_id for d in v] for k, v in stdlib_splits.items()}


def test_user_inputs_jsonl_text_and_directories(tmp_path):
    jsonl = tmp_path / "data.jsonl"
    records = [{"content": "first\n", "id": 1}, {"content": "sec\tond  \r\n"}]
    jsonl.write_text(json.dumps(records[0]) + "\n\n" + json.dumps(records[1]) + "\n")
    notes = tmp_path / "notes.md"
    notes.write_bytes("# t\u00e9tle\r\n\n".encode())
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "b.txt").write_text("bee")
    (folder / "a.py").write_text("a = 1\n")
    (folder / ".hidden").write_text("skip me")
    (folder / "blob.bin").write_bytes(b"\xff\xfe\x00bad")
    corpus = load_corpus([str(jsonl), str(notes), str(folder)], json_key="content")
    got = [(d.doc_id, d.text) for d in corpus.documents]
    assert got == [
        ("data.jsonl:1", "first\n"),
        ("data.jsonl:3", "sec\tond  \r\n"),
        ("notes.md", "# t\u00e9tle\r\n\n"),
        ("d/a.py", "a = 1\n"),
        ("d/sub/b.txt", "bee"),
    ]
    assert corpus.skipped == {"not UTF-8": 1}


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------


def test_default_tokenizer_round_trips_every_held_out_file(prepared, tokenizer, stdlib_splits):
    assert tokenizer.vocab_size == 8192 == prepared.vocab_size
    assert (tokenizer.eod, tokenizer.pad, tokenizer.unk, tokenizer.bos) == (2, 3, 0, 1)
    assert tokenizer.vocab["\n"] == tokenizer.tokenize("\n")[0]
    held_out = stdlib_splits["valid"] + stdlib_splits["test"]
    n_chars = n_tokens = 0
    for doc in held_out:
        ids = tokenizer.tokenize(doc.text)
        assert tokenizer.detokenize(ids) == doc.text, doc.doc_id
        n_chars, n_tokens = n_chars + len(doc.text), n_tokens + len(ids)
    assert n_tokens < 0.5 * n_chars  # real subword merges, not bytes/characters


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_tokenizer_round_trips_tricky_strings(tokenizer, text):
    ids = tokenizer.tokenize(text)
    assert tokenizer.detokenize(ids) == text
    assert tokenizer.detokenize(np.array(ids)) == text
    assert tokenizer.eod not in ids and all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.tokenize_many([text, "x"]) == [ids, tokenizer.tokenize("x")]


def test_tokenizer_is_cached_by_content(tmp_path, monkeypatch, stdlib_splits):
    docs = stdlib_splits["train"][:40]
    path = train_tokenizer(docs, tmp_path, vocab_size=600)
    assert path.parent.parent == tmp_path and path.parent.name.startswith("tokenizer-")
    assert StagTokenizer.load(path.parent).vocab_size == 600
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(tokenizer_mod, "_train_model_bytes", no_training)
    assert train_tokenizer(list(reversed(docs)), tmp_path, vocab_size=600) == path
    assert path.stat().st_mtime_ns == mtime
    changed = [Document(docs[0].doc_id, docs[0].text + "#")] + docs[1:]
    for other_docs, vocab in ((changed, 600), (docs, 601), (docs[1:], 600)):
        with pytest.raises(AssertionError, match="trained again"):
            train_tokenizer(other_docs, tmp_path, vocab_size=vocab)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.parent.name]


def test_interrupted_training_leaves_no_model(tmp_path, monkeypatch, stdlib_splits):
    def crash(**kwargs):
        kwargs["model_writer"].write(b"half a model")
        raise RuntimeError("INTERNAL: killed")

    monkeypatch.setattr(tokenizer_mod.spm.SentencePieceTrainer, "train", crash)
    with pytest.raises(DataError, match="could not train"):
        train_tokenizer(stdlib_splits["train"][:5], tmp_path / "cache", vocab_size=500)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_vocab_too_large_names_a_size_that_works(tmp_path, stdlib_splits):
    docs = stdlib_splits["train"][:10]
    with pytest.raises(DataError, match=r"vocabulary size 50000 is too large") as info:
        train_tokenizer(docs, tmp_path, vocab_size=50000)
    bound = int(info.value.args[0].split("--vocab-size <= ")[1].split(",")[0])
    assert StagTokenizer(train_tokenizer(docs, tmp_path, vocab_size=bound)).vocab_size == bound


# ---------------------------------------------------------------------------------------------
# indexed datasets and GPTDataset
# ---------------------------------------------------------------------------------------------


def test_indexed_datasets_hold_each_document_then_eod(prepared, tokenizer, stdlib_splits):
    for split in SPLITS:
        ds = IndexedDataset(prepared.prefixes[split])
        docs = stdlib_splits[split]
        assert len(ds) == len(docs) == prepared.num_documents[split]
        assert ds.index.dtype == np.uint16
        assert int(ds.sequence_lengths.sum()) == prepared.num_tokens[split]
        step = 1 if split != "train" else 25
        for i in range(0, len(docs), step):
            ids = ds[i].tolist()
            assert ids[-1] == EOD and EOD not in ids[:-1]
            assert ids == tokenizer.tokenize(docs[i].text) + [EOD]
            assert tokenizer.detokenize(ids[:-1]) == docs[i].text


def test_prepare_data_reuses_an_up_to_date_folder(prepared, monkeypatch):
    before = snapshot(prepared.output_dir)

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(indexed_mod, "train_tokenizer", fail)
    monkeypatch.setattr(indexed_mod, "write_indexed_dataset", fail)
    again = prepare_data(None, prepared.output_dir, progress=False)
    assert again == prepared
    assert snapshot(prepared.output_dir) == before


def _document_tokens(prefix: str) -> list:
    ds = IndexedDataset(prefix)
    return [tuple(ds[i].tolist()) for i in range(len(ds))]


def _is_window_of_documents(window: list, docs: list) -> bool:
    """True if `window` = suffix of a doc, whole docs, prefix of a doc (each doc ends in eod)."""
    cuts = [i + 1 for i, t in enumerate(window) if t == EOD]
    if not cuts:
        needle = np.array(window, "<u4").tobytes()
        return any(np.array(d, "<u4").tobytes().find(needle) % 4 == 0 for d in docs)
    pieces = [window[a:b] for a, b in zip([0] + cuts, cuts + [len(window)])]
    first, middle, last = tuple(pieces[0]), pieces[1:-1], tuple(pieces[-1])
    whole = set(docs)
    return (
        any(d[-len(first):] == first for d in docs)
        and all(tuple(p) in whole for p in middle)
        and (not last or any(d[: len(last)] == last for d in docs))
    )


def test_gpt_samples_are_windows_of_the_document_stream(prepared, tokenizer):
    seq = 512
    assert torch.distributed.is_initialized()  # like the trainer: a gloo world of one (conftest)
    train_ds, valid_ds, test_ds = build_gpt_datasets(prepared, tokenizer, seq, 7, (40, 10, 10))
    assert len(train_ds) >= 40 and len(valid_ds) >= 10 and len(test_ds) >= 10
    crossing = 0  # samples that span a document boundary
    for ds, split, count in ((train_ds, "train", 40), (valid_ds, "valid", 10)):
        docs = _document_tokens(prepared.prefixes[split])
        for i in range(count):
            sample = ds[i]
            tokens, labels = sample["tokens"].tolist(), sample["labels"].tolist()
            assert len(tokens) == len(labels) == seq and tokens[1:] == labels[:-1]
            assert _is_window_of_documents(tokens + labels[-1:], docs), (split, i)
            assert torch.equal(sample["position_ids"], torch.arange(seq))
            assert torch.equal(sample["loss_mask"], torch.ones(seq))
            crossing += EOD in tokens + labels[-1:]
    assert crossing >= 2
    same = build_gpt_datasets(prepared, None, seq, 7, (40, 10, 10))[0]
    assert all(torch.equal(same[i]["tokens"], train_ds[i]["tokens"]) for i in range(10))
    other = build_gpt_datasets(prepared, tokenizer, seq, 8, (40, 10, 10))[0]
    assert any(not torch.equal(other[i]["tokens"], train_ds[i]["tokens"]) for i in range(10))


def test_window_check_rejects_what_is_not_a_window():
    docs = [(5, 6, 7, EOD), (8, 9, EOD)]
    assert _is_window_of_documents([6, 7, EOD, 8, 9, EOD, 5], docs)
    assert _is_window_of_documents([6, 7], docs)
    assert not _is_window_of_documents([7, 6], docs)
    assert not _is_window_of_documents([6, 7, EOD, 9, EOD], docs)
    assert not _is_window_of_documents([6, EOD, 8], docs)


def test_batch_from_samples_shapes_and_masks(prepared, tokenizer):
    train_ds = build_gpt_datasets(prepared, tokenizer, 32, 1, (8, 4, 4))[0]
    batch = batch_from_samples([train_ds[i] for i in range(3)])
    for name in ("tokens", "labels", "position_ids"):
        assert batch[name].shape == (3, 32) and batch[name].dtype == torch.int64
    assert batch["loss_mask"].shape == (3, 32) and batch["loss_mask"].dtype == torch.float32
    assert batch["attention_mask"] is None
    assert torch.equal(batch["tokens"][2], train_ds[2]["tokens"])
    masked_ds = build_gpt_datasets(prepared, tokenizer, 32, 1, (8, 4, 4), True)[0]
    mask = batch_from_samples([masked_ds[i] for i in range(3)])["attention_mask"]
    assert mask.shape == (3, 1, 32, 32) and mask.dtype == torch.bool
    causal_masked_out = torch.triu(torch.ones(32, 32, dtype=torch.bool), diagonal=1)
    assert torch.equal(mask[1, 0], causal_masked_out)


def test_user_jsonl_end_to_end_without_test_split(tmp_path, stdlib_splits):
    texts = [d.text for d in stdlib_splits["train"][:60]]
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    out = tmp_path / "out"
    prep = prepare_data(
        [str(jsonl)], out, 500, valid_fraction=0.2, test_fraction=0.0, json_key="body",
        progress=False,
    )
    assert "test" not in prep.prefixes and not (out / "test_text_document.bin").exists()
    tok = StagTokenizer.load(prep.tokenizer_path)
    expected = {s: [t for n, t in enumerate(texts, 1) if _hash_split(f"corpus.jsonl:{n}", 0.2, 0)
                    == s] for s in ("train", "valid")}
    for split in ("train", "valid"):
        ds = IndexedDataset(prep.prefixes[split])
        assert [tok.detokenize(ds[i][:-1]) for i in range(len(ds))] == expected[split]
    train_ds, valid_ds, test_ds = build_gpt_datasets(prep, tok, 16, 1, (4, 2, None))
    assert test_ds is None and len(train_ds) >= 4 and len(valid_ds) >= 2


def test_changed_inputs_rewrite_the_folder_and_a_crash_never_leaves_a_stale_manifest(
    tmp_path, mini_dir, monkeypatch
):
    out = tmp_path / "out"
    first = prepare_data([str(mini_dir)], out, 400, 0.3, 0.2, progress=False)
    real_write, calls = indexed_mod.write_indexed_dataset, []

    def crash_on_valid(prefix, *args):
        calls.append(prefix)
        if prefix.endswith("valid_text_document"):
            raise KeyboardInterrupt("interrupted while writing valid")
        return real_write(prefix, *args)

    monkeypatch.setattr(indexed_mod, "write_indexed_dataset", crash_on_valid)
    with pytest.raises(KeyboardInterrupt):
        prepare_data([str(mini_dir)], out, 400, 0.3, 0.0, progress=False)
    assert [Path(c).name for c in calls] == ["train_text_document", "valid_text_document"]
    assert not (out / "manifest.json").exists()  # train was rewritten for other inputs
    monkeypatch.setattr(indexed_mod, "write_indexed_dataset", real_write)
    again = prepare_data([str(mini_dir)], out, 400, 0.3, 0.2, progress=False)
    assert again == first and (out / "manifest.json").exists()
    tok = StagTokenizer.load(again.tokenizer_path)
    corpus = load_corpus([str(mini_dir)])
    for split, docs in split_documents(corpus.documents, 0.3, 0.2).items():
        ds = IndexedDataset(again.prefixes[split])
        assert [tok.detokenize(ds[i][:-1]) for i in range(len(ds))] == [d.text for d in docs]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


# ---------------------------------------------------------------------------------------------
# errors leave an existing prepared folder untouched
# ---------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


def _mkdir(path: Path) -> str:
    path.mkdir(parents=True)
    return str(path)


BAD_INPUTS = {
    "missing path": (lambda d: [str(d / "nope.jsonl")], {}, r"'.*nope\.jsonl' does not exist"),
    "empty directory": (lambda d: [_mkdir(d / "empty")], {}, r"corpus is empty.*0 documents"),
    "only blank files": (lambda d: [_write(d / "b" / "x.txt", "  \n\t\n")], {},
                         r"corpus is empty.*1 documents, none with any text"),
    "invalid json": (lambda d: [_write(d / "bad.jsonl", '{"text": "a"}\n{"text": oops}\n')], {},
                     r"bad\.jsonl:2 is not valid JSON"),
    "missing text key": (lambda d: [_write(d / "k.jsonl", '{"content": "x", "id": 3}\n')], {},
                         r"k\.jsonl:1: .*no 'text' key \(its keys: 'content', 'id'\).*--json-key"),
    "non-string text": (lambda d: [_write(d / "n.jsonl", '{"text": 5}\n')], {},
                        r"n\.jsonl:1: 'text' must be a string, got int"),
    "not an object": (lambda d: [_write(d / "l.jsonl", "[1, 2]\n")], {},
                      r"l\.jsonl:1 is a JSON list, not an object"),
    "no valid split": (lambda d: [_write(d / "single.txt", "just one document\n")], {},
                       r"the valid split is empty: 1 documents.*raise --valid-fraction"),
    "no train split": (lambda d: [_write(d / "one.txt", "just one document\n")], {},
                       r"the train split is empty: 1 documents.*lower --valid-fraction"),
    "bad fraction": (None, {"valid_fraction": 0.0}, r"valid_fraction must be in \(0, 1\)"),
    "vocab too large": (None, {"vocab_size": 100_000},
                        r"vocabulary size 100000 is too large.*Fix: use --vocab-size <= \d+"),
    "vocab too small": (None, {"vocab_size": 50}, r"vocabulary size 50 is too small.*>= \d+"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_raise_and_leave_the_folder_untouched(case, tmp_path, mini_dir, mini_prepared):
    make_paths, options, message = BAD_INPUTS[case]
    paths = make_paths(tmp_path) if make_paths else [str(mini_dir)]
    kwargs = {"vocab_size": 400, "valid_fraction": 0.3, "test_fraction": 0.2, **options}
    before = snapshot(mini_prepared.output_dir)
    with pytest.raises(DataError, match=message):
        prepare_data(paths, mini_prepared.output_dir, progress=False, **kwargs)
    assert snapshot(mini_prepared.output_dir) == before
    assert isinstance(DataError("x", "y"), StagError)
    assert isinstance(DataError("x", "y"), ValueError)


def test_mini_prepared_folder_is_sane(mini_prepared, mini_dir):
    assert set(mini_prepared.prefixes) == set(SPLITS)
    assert sum(mini_prepared.num_documents.values()) == len(list(mini_dir.iterdir()))
    assert mini_prepared.vocab_size == 400
