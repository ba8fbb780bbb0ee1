"""The StagFormer in plain PyTorch, with no Megatron import anywhere in this folder.

    model.py      the reference model: the parity target of every fast path, and the model of
                  inference folders (copied into them as reference.py)
    kv_cache.py   KVCache, the one key/value cache of both decode engines
    sampling.py   Sampler and the token generator every decoder's generate loop runs
    decode.py     ReferenceDecoder: prefill / step / generate on the reference model
    name_map.py   the declarative map between Megatron state dicts and reference names
    sharing.py    the shared-weights ownership rule (which section stores a shared tensor)

May import: torch, numpy, the standard library. Never imports megatron or another stag_plugin
folder (test: tests/test_structure.py).
"""
