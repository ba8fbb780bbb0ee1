"""Data pipeline of the main job: corpus -> split -> SentencePiece tokenizer -> Megatron datasets.

    from stag_plugin.data import prepare_data, build_gpt_datasets, batch_from_samples
    prepared = prepare_data(None, "runs/data")            # the Python stdlib, vocab 8192
    tokenizer = StagTokenizer.load(prepared.tokenizer_path)
    train_ds, valid_ds, test_ds = build_gpt_datasets(prepared, tokenizer, 512, 1234, (n, m, k))
    batch = batch_from_samples([train_ds[i] for i in range(4)])   # tokens [4, 512], ...

Modules: `corpus` (documents and the hash split, no Megatron import), `tokenizer` (SentencePiece
training, cache and `StagTokenizer`), `indexed` (`prepare_data`, GPTDataset, collate). Names are
imported lazily so `stag_plugin.data.corpus` stays light.
"""

_LAZY = {
    "DataError": "stag_plugin.data.corpus",
    "Document": "stag_plugin.data.corpus",
    "Corpus": "stag_plugin.data.corpus",
    "load_corpus": "stag_plugin.data.corpus",
    "split_documents": "stag_plugin.data.corpus",
    "split_of": "stag_plugin.data.corpus",
    "stdlib_root": "stag_plugin.data.corpus",
    "StagTokenizer": "stag_plugin.data.tokenizer",
    "train_tokenizer": "stag_plugin.data.tokenizer",
    "tokenizer_cache_key": "stag_plugin.data.tokenizer",
    "PreparedData": "stag_plugin.data.indexed",
    "prepare_data": "stag_plugin.data.indexed",
    "write_indexed_dataset": "stag_plugin.data.indexed",
    "build_gpt_datasets": "stag_plugin.data.indexed",
    "batch_from_samples": "stag_plugin.data.indexed",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'stag_plugin.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
