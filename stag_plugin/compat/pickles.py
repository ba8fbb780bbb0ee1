"""Reading distributed checkpoints without running code from them.

torch's distributed-checkpoint reader unpickles a checkpoint's index (`.metadata`) with
`pickle.load`, and every byte entry (RNG states, megatron-core 0.19's common state, ...) with
`torch.load(weights_only=False)`: a crafted file runs arbitrary code on load. Inside
`checkpoint_reads()` both are restricted instead:

    .metadata      a pickle.Unpickler that admits only the classes torch writes there
                   (METADATA_GLOBALS: the checkpoint metadata and plan dataclasses, torch.Size,
                   dtypes, layouts)
    byte entries   torch's weights-only loader with Megatron-Core's own list of safe types
                   (`megatron.core.safe_globals`), the list it uses for `common.pt`

Anything else is refused with UntrustedCheckpoint, naming the class and the file;
`checkpoint_reads(trusted=True)` (the commands' --trust-checkpoint-code) unpickles fully, as
torch and Megatron-LM do. Outside the context torch is unchanged.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import types
from typing import Iterator, Optional

import torch
import torch.distributed.checkpoint.default_planner as default_planner
import torch.distributed.checkpoint.filesystem as filesystem

from stag_plugin.errors import StagError, causes

# (module, name) pairs torch's FileSystemWriter pickles into .metadata (torch 2.6 - 2.13).
METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    *(("torch.distributed.checkpoint.planner", name) for name in (
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")),
}
TRUST_FIX = ("if you trust where this checkpoint comes from, rerun with --trust-checkpoint-code "
             "(full unpickling, as torch and Megatron-LM load it)")


_REPORTED = re.compile(r"(\S+) holds a Python object of type (\S+), which is not among")


class UntrustedCheckpoint(StagError):
    """A checkpoint file holds a Python object the restricted loaders do not admit."""

    def __init__(self, where: str, what: str):
        super().__init__(f"{where} holds a Python object of type {what}, which is not among "
                         "the types torch and Megatron write into checkpoints", TRUST_FIX)


@contextlib.contextmanager
def checkpoint_reads(trusted: bool = False) -> Iterator[None]:
    """Within: torch's distributed-checkpoint reads are restricted (see the module docstring);
    `trusted`: nothing changes."""
    if trusted:
        yield
        return
    saved = filesystem.pickle, default_planner.DefaultLoadPlanner.load_bytes
    filesystem.pickle = _RestrictedPickle()
    default_planner.DefaultLoadPlanner.load_bytes = _load_bytes
    try:
        with allowing(safe_globals()):
            yield
    finally:
        filesystem.pickle, default_planner.DefaultLoadPlanner.load_bytes = saved


def refusal(err: BaseException, where: str) -> Optional[StagError]:
    """The refused type behind `err`, or the newer Megatron type it needs, however torch or
    Megatron wrapped it (a distributed load reports each rank's failure inside a
    CheckpointException), or None."""
    for cause in causes(err):
        if isinstance(cause, (UntrustedCheckpoint, NewerMegatron)):
            return cause
        missing = missing_megatron_global(cause)
        if missing is not None:
            return NewerMegatron(where, missing)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(cause))
        if isinstance(cause, pickle.UnpicklingError) and found:
            return UntrustedCheckpoint(where, found.group(1))
        reported = _REPORTED.search(str(cause))  # Megatron re-raises some as text only
        if reported:
            return UntrustedCheckpoint(reported.group(1), reported.group(2))
    return None


def allowing(types: list):
    """torch's weights-only loader admits `types` within the context. Types registered as safe
    before (e.g. by `import megatron.core`) stay registered after it: torch's own
    `safe_globals` context unregisters every type it was given on exit, so it is given only
    the types not registered yet."""
    registered = torch.serialization.get_safe_globals()
    return torch.serialization.safe_globals([t for t in types if t not in registered])


def safe_globals() -> list:
    """Megatron-Core's list of types it considers safe in checkpoints, plus argparse.Namespace
    and the enums Megatron-LM's args may hold."""
    import argparse

    from megatron.core.enums import Fp4Recipe, Fp8Recipe, ModelType
    from megatron.core.safe_globals import SAFE_GLOBALS
    from megatron.core.transformer.enums import AttnBackend, AttnMaskType, LayerType

    return [argparse.Namespace, AttnBackend, AttnMaskType, LayerType, ModelType, Fp8Recipe,
            Fp4Recipe, *SAFE_GLOBALS]


class NewerMegatron(StagError):
    """A checkpoint refers to a Megatron type the installed megatron-core does not have: it
    was written by a newer release."""

    def __init__(self, where: str, name: str):
        from megatron.core import __version__

        super().__init__(
            f"{where} was written by a newer Megatron than the megatron-core {__version__} "
            f"installed here: it refers to {name}, which this release does not have",
            "read it with the megatron-core release that wrote it or a later one (a checkpoint "
            "without common.pt comes from megatron-core 0.19 or later: `pip install "
            "megatron-core>=0.19`, or this repository's .venv-mcore)")


def missing_megatron_global(err: BaseException) -> Optional[str]:
    """The `megatron.*` class an unpickling failure could not find in the installed Megatron
    (e.g. an enum added in a later release), or None when `err` is about something else."""
    text = str(err)
    found = (re.search(r"Unsupported global: GLOBAL (megatron\.\S+)", text)
             or re.search(r"Can't get attribute '(\w+)' on <module '(megatron[\w.]*)'", text)
             or re.search(r"No module named '(megatron[\w.]*)'", text))
    if found is None:
        return None
    name = found.group(1) if found.lastindex == 1 else f"{found.group(2)}.{found.group(1)}"
    return None if _resolves(name) else name


def _resolves(name: str) -> bool:
    import importlib

    module, _, attr = name.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), attr)
    except ImportError:
        return False


def load_payload(data: bytes, where: str):
    """A torch.save payload, unpickled by the weights-only loader with `safe_globals()`."""
    try:
        with allowing(safe_globals()):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found is None:
            raise
        missing = missing_megatron_global(err)
        if missing is not None:
            raise NewerMegatron(where, missing) from err
        raise UntrustedCheckpoint(where, found.group(1)) from err


def load_metadata(stream, where: str):
    """A `.metadata` pickle, admitting only METADATA_GLOBALS."""
    try:
        return _MetadataUnpickler(stream).load()
    except _Refused as err:
        raise UntrustedCheckpoint(where, str(err)) from err


class _Refused(pickle.UnpicklingError):
    pass


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise _Refused(f"{module}.{name}")


class _RestrictedPickle(types.SimpleNamespace):
    """What torch's filesystem module sees as `pickle` inside checkpoint_reads: `load` is
    restricted, everything else is the standard module."""

    def __getattr__(self, name):
        return getattr(pickle, name)

    @staticmethod
    def load(stream, *args, **kwargs):
        return load_metadata(stream, getattr(stream, "name", ".metadata"))


def _load_bytes(self, read_item, value: io.BytesIO) -> None:
    """DefaultLoadPlanner.load_bytes with the weights-only loader instead of full unpickling."""
    fqn = read_item.dest_index.fqn
    loaded = load_payload(value.getvalue(), f"checkpoint entry {fqn!r}")
    if self.flatten_state_dict:
        default_planner.set_element(self.original_state_dict, self.mappings[fqn], loaded)
    else:
        self.state_dict[fqn] = loaded
