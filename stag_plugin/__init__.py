"""stag_plugin: StagFormer (time-staggered decoder-only transformers) for Megatron-Core.

Megatron-backed names are imported lazily, so `stag_plugin.reference` (plain PyTorch) works on
a machine without megatron-core.
"""

from stag_plugin import _moved

__version__ = "0.1.0"

_LAZY = {
    "StagFormerConfig": "stag_plugin.core.config",
    "StagGPTModel": "stag_plugin.core.model",
    "StagLayerSpecs": "stag_plugin.core.specs",
    "get_stag_layer_spec": "stag_plugin.core.specs",
    "StagCrossAttention": "stag_plugin.core.attention",
    "SDPAttention": "stag_plugin.core.attention",
    "initialize_single_process": "stag_plugin.compat.megatron",
}

__all__ = sorted(_LAZY) + ["__version__"]

_moved.install()  # old flat import paths (stag_plugin.model, ...) forward, with a warning


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'stag_plugin' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
