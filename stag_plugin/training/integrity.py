"""What makes a checkpoint load either whole and right, or not at all.

    manifest.json    every file of an iteration folder (its tokenizer/ folder included, by
                     relative path) with its size and SHA-256, written by the saver after the
                     last byte (stag_plugin.training.checkpointing); a load
                     verifies it before any tensor is used and names a damaged, missing or
                     truncated file. Folders without one (older, or written by Megatron-LM) load
                     with a warning.
    check_keys       a load fills every tensor the model asks for and finds no model tensor it
                     does not expect (a run record edited to another architecture, a checkpoint
                     of another model): the names, not a silent partial load.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Dict, Iterable

from stag_plugin.errors import StagError

MANIFEST = "manifest.json"
NON_MODEL_PREFIXES = ("optimizer.", "rng_state", "common_state", "content_metadata")
_CHUNK = 8 * 2**20


class DamagedCheckpoint(StagError):
    """A checkpoint file is missing, truncated or changed since it was saved."""


def write_manifest(folder: Path) -> Path:
    """manifest.json for every file below `folder`, by posix path relative to it (written
    last, atomically)."""
    folder = Path(folder)
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / MANIFEST]
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": digest}
             for p, digest in zip(paths, _parallel(file_sha256, paths))}
    path = folder / MANIFEST
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=1))
    os.replace(tmp, path)
    return path


def verify_manifest(folder: Path) -> bool:
    """Check every file `folder`'s manifest lists; False (and a warning) without a manifest."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        warnings.warn(f"{folder} has no {MANIFEST} (saved by an older version or another "
                      "program): its files cannot be checked for damage before loading",
                      stacklevel=2)
        return False
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedCheckpoint(f"{path} is not a readable manifest ({err})",
                                "copy the checkpoint again from where it was written") from err
    list(_parallel(lambda item: _check_file(folder / item[0], item[1]), list(files.items())))
    return True


def _parallel(fn, items: list) -> list:
    """fn over items on a few threads (hashlib releases the GIL: files hash side by side)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(items) or 1, os.cpu_count() or 1, 8)) as pool:
        return list(pool.map(fn, items))


def _check_file(path: Path, expected: dict) -> None:
    fix = "copy the checkpoint again from where it was written, or load another iteration"
    if not path.is_file():
        raise DamagedCheckpoint(f"{path} is missing (the manifest lists it)", fix)
    size = path.stat().st_size
    if size != expected["bytes"]:
        raise DamagedCheckpoint(f"{path} has {size} bytes, {expected['bytes']} were saved "
                                "(truncated or overwritten)", fix)
    if file_sha256(path) != expected["sha256"]:
        raise DamagedCheckpoint(f"{path} has changed since it was saved (SHA-256 differs): "
                                "the file is corrupted", fix)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_keys(folder: Path, present: Iterable[str], requested: Iterable[str]) -> None:
    """Every requested model tensor is in the checkpoint, and every model tensor of the
    checkpoint is requested (optimizer and other non-model entries are not compared)."""
    present = {k for k in present if not k.startswith(NON_MODEL_PREFIXES)}
    requested = set(requested)
    missing, unexpected = sorted(requested - present), sorted(present - requested)
    if missing or unexpected:
        raise StagError(
            f"{folder} does not hold the model being loaded: {_names(missing)} missing, "
            f"{_names(unexpected)} not expected",
            "load it with the architecture it was saved with (its stag_run.json as written by "
            "the saver, or the flags of that run)")


def _names(keys: list) -> str:
    shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    return f"{len(keys)} tensors ({shown})" if keys else "no tensors"


def requested_tensors(sharded_state: dict) -> Dict[str, object]:
    """The tensor keys `sharded_state["model"]` asks for: its ShardedTensors, and the keys of
    its ShardedTensorFactories (e.g. a gated MLP's fused [gate | up] weight)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return {value.key: value for value in nested_values(sharded_state.get("model", {}))
            if isinstance(value, (ShardedTensor, ShardedTensorFactory))}
