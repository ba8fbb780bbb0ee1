"""Hugging Face `transformers` support for inference folders (docs/huggingface.md).

Two ways to load a folder written by `stag convert to-inference`:

    # anywhere transformers is installed (the folder carries its model code):
    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

    # where stag_plugin is installed, without remote code:
    stag_plugin.convert.hf.register()
    AutoModelForCausalLM.from_pretrained(folder)

`REMOTE_CODE_FILES` names the files every inference folder carries: this package's two modules
and the reference model they build on, copied byte for byte (one source of truth). Importing
this package does not import transformers; `StagFormerConfig` and `StagFormerForCausalLM` are
loaded on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

_HERE = Path(__file__).resolve().parent

# folder file name -> the plugin module it is a copy of
REMOTE_CODE_FILES: Dict[str, Path] = {
    "configuration_stagformer.py": _HERE / "configuration_stagformer.py",
    "modeling_stagformer.py": _HERE / "modeling_stagformer.py",
    "reference.py": _HERE.parents[1] / "reference" / "model.py",
}
# config.json "auto_map": which class of the folder's code each Auto class loads
AUTO_MAP = {
    "AutoConfig": "configuration_stagformer.StagFormerConfig",
    "AutoModelForCausalLM": "modeling_stagformer.StagFormerForCausalLM",
}

_LAZY = {
    "StagFormerConfig": "stag_plugin.convert.hf.configuration_stagformer",
    "StagFormerForCausalLM": "stag_plugin.convert.hf.modeling_stagformer",
}
__all__ = ["AUTO_MAP", "REMOTE_CODE_FILES", "register"] + sorted(_LAZY)


def register() -> None:
    """Register StagFormerConfig / StagFormerForCausalLM (model_type "stagformer") with
    AutoConfig and AutoModelForCausalLM, so folders load without trust_remote_code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from stag_plugin.convert.hf.configuration_stagformer import StagFormerConfig
    from stag_plugin.convert.hf.modeling_stagformer import StagFormerForCausalLM

    AutoConfig.register(StagFormerConfig.model_type, StagFormerConfig, exist_ok=True)
    AutoModelForCausalLM.register(StagFormerConfig, StagFormerForCausalLM, exist_ok=True)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'stag_plugin.convert.hf' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
