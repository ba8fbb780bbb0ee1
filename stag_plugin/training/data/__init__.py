"""Data pipeline: corpus -> split -> tokenizer (SentencePiece trained on the corpus, or a
Megatron-LM --tokenizer-type) -> Megatron datasets.

    from stag_plugin.training.data import prepare_data, build_gpt_datasets, batch_from_samples
    prepared = prepare_data(None, "runs/data")            # the Python stdlib, vocab 8192
    tokenizer = StagTokenizer.load(prepared.tokenizer_path)
    train_ds, valid_ds, test_ds = build_gpt_datasets(prepared, tokenizer, 512, 1234, (n, m, k))
    batch = batch_from_samples([train_ds[i] for i in range(4)])   # tokens [4, 512], ...

Modules: `corpus` (documents and the hash split, no Megatron import), `tokenizer` (SentencePiece
training, cache and `StagTokenizer`, the embedded default), `tokenizers` (Megatron-LM's
--tokenizer-type tokenizers through megatron-core, and the description every checkpoint keeps),
`indexed` (`prepare_data`, GPTDataset, collate), `megatron_data` (Megatron-LM's --data-path
prefixes with weights and --split, --mock-data: data tokenized already). Names are imported
lazily so `stag_plugin.training.data.corpus` stays light.
"""

_LAZY = {
    "DataError": "stag_plugin.training.data.corpus",
    "Document": "stag_plugin.training.data.corpus",
    "Corpus": "stag_plugin.training.data.corpus",
    "load_corpus": "stag_plugin.training.data.corpus",
    "split_documents": "stag_plugin.training.data.corpus",
    "split_of": "stag_plugin.training.data.corpus",
    "stdlib_root": "stag_plugin.training.data.corpus",
    "StagTokenizer": "stag_plugin.training.data.tokenizer",
    "train_tokenizer": "stag_plugin.training.data.tokenizer",
    "tokenizer_cache_key": "stag_plugin.training.data.tokenizer",
    "PreparedData": "stag_plugin.training.data.indexed",
    "prepare_data": "stag_plugin.training.data.indexed",
    "write_indexed_dataset": "stag_plugin.training.data.indexed",
    "build_gpt_datasets": "stag_plugin.training.data.indexed",
    "batch_from_samples": "stag_plugin.training.data.indexed",
    "MegatronData": "stag_plugin.training.data.megatron_data",
    "uses_megatron_data": "stag_plugin.training.data.megatron_data",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'stag_plugin.training.data' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
