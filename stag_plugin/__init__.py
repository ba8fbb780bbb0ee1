"""stag_plugin: StagFormer (time-staggered decoder-only transformers) for Megatron-Core.

Megatron-backed names are imported lazily, so `stag_plugin.reference` (plain PyTorch) works on a
machine without megatron-core.
"""

__version__ = "0.1.0"

_LAZY = {
    "StagFormerConfig": "stag_plugin.config",
    "StagGPTModel": "stag_plugin.model",
    "StagLayerSpecs": "stag_plugin.specs",
    "get_stag_layer_spec": "stag_plugin.specs",
    "StagCrossAttention": "stag_plugin.attention",
    "SDPAttention": "stag_plugin.attention",
    "initialize_single_process": "stag_plugin.megatron_compat",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'stag_plugin' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
