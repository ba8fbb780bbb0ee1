"""Import paths of modules that moved into the role folders (core/, parallel/, reference/,
decode/, training/, convert/, compat/, integrations/) keep working for one release: importing
an old path gives a DeprecationWarning and a module that forwards every attribute to the new one.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

MOVED = {
    "stag_plugin.config": "stag_plugin.core.config",
    "stag_plugin.specs": "stag_plugin.core.specs",
    "stag_plugin.attention": "stag_plugin.core.attention",
    "stag_plugin.model": "stag_plugin.core.model",
    "stag_plugin.layout": "stag_plugin.parallel.layout",
    "stag_plugin.pipeline": "stag_plugin.parallel.pipeline",
    "stag_plugin.reference_decode": "stag_plugin.reference.decode",
    "stag_plugin.sampling": "stag_plugin.reference.sampling",
    "stag_plugin.name_map": "stag_plugin.reference.name_map",
    "stag_plugin.inference": "stag_plugin.decode.engine",
    "stag_plugin.inference_folder": "stag_plugin.convert.inference_folder",
    "stag_plugin.hf": "stag_plugin.convert.hf",
    "stag_plugin.train": "stag_plugin.training.train",
    "stag_plugin.evaluate": "stag_plugin.training.evaluate",
    "stag_plugin.demo": "stag_plugin.training.demo",
    "stag_plugin.arguments": "stag_plugin.training.arguments",
    "stag_plugin.checkpointing": "stag_plugin.training.checkpointing",
    "stag_plugin.data": "stag_plugin.training.data",
    "stag_plugin.megatron_compat": "stag_plugin.compat.megatron",
    "stag_plugin.cpu_compat": "stag_plugin.compat.cpu",
    "stag_plugin.megatron_lm": "stag_plugin.integrations.megatron_lm",
}


class _Forward(types.ModuleType):
    """Stands at an old path: every attribute is the new module's."""

    def __init__(self, old: str, new: str):
        super().__init__(old, f"Moved to {new}.")
        self._new = new

    def __getattr__(self, name):
        return getattr(importlib.import_module(self._new), name)

    def __dir__(self):
        return dir(importlib.import_module(self._new))


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old import path goes away in the next "
                      f"release. Fix: import {new}", DeprecationWarning, stacklevel=3)
        return _Forward(spec.name, new)

    def exec_module(self, module):
        importlib.import_module(module._new)  # fail here, not at the first attribute


def install() -> None:
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
