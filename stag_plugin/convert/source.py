"""Reading a Megatron distributed checkpoint in one process, without building a model.

A torch_dist checkpoint stores every tensor under a global key with its global shape, whatever
TP / PP layout wrote it: the tensor index (`.metadata`) lists them and each is read back whole,
in the layout a single process (TP = PP = 1) would hold. Model tensors are the keys outside the
optimizer's namespace; RNG states and `_extra_state` entries are objects, not tensors, and are
never read.

    locate(--load)         run folder or iter_XXXXXXX folder -> Checkpoint(folder, iteration)
    read_record(ckpt)      its stag_run.json (flags, architecture, tokenizer)
    tensor_index(folder)   key -> (global shape, dtype), from the index alone
    check_tensors(...)     missing / unexpected keys, shapes and dtypes, all named at once
    read_tensors(...)      the chosen tensors, whole
"""

from __future__ import annotations

import argparse
import io
import json
import re
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch

from stag_plugin.compat import megatron as compat
from stag_plugin.compat.pickles import NewerMegatron, load_payload, missing_megatron_global
from stag_plugin.convert.common import ConvertError, say
from stag_plugin.errors import StagError
from stag_plugin.training import checkpointing, integrity

NON_MODEL_PREFIXES = ("optimizer.",)  # everything else in the tensor index is a model tensor
INDEX_FILE = ".metadata"
_ITER_RE = re.compile(r"^iter_(\d{7})$")
READ_GROUP_BYTES = 256 * 2**20  # tensors read per call (bounds the memory of one read)

TensorIndex = Dict[str, Tuple[Tuple[int, ...], torch.dtype]]


@dataclass
class Checkpoint:
    """One saved iteration: its folder, iteration and (when --load named it) the run folder."""

    folder: Path
    iteration: int
    root: Optional[Path] = None

    def sources(self) -> list:
        """Folders an output must stay out of."""
        return [self.folder] + ([self.root] if self.root is not None else [])


# ---------------------------------------------------------------------------- locating


def locate(load: Path) -> Checkpoint:
    """--load may be a run folder (its tracker names the iteration) or an iter_XXXXXXX folder."""
    load = Path(load)
    if not load.is_dir():
        raise ConvertError(f"checkpoint folder {load} does not exist",
                           "pass the --save folder of a run, or one of its iter_XXXXXXX folders")
    named = _ITER_RE.match(load.name)
    if named and not (load / checkpointing.TRACKER).exists():
        ckpt = Checkpoint(load, int(named.group(1)))
    else:
        try:
            iteration = checkpointing.latest_iteration(load)
        except checkpointing.CheckpointError as err:
            raise ConvertError(err.problem, "rewrite the tracker file with "
                               "the iteration of a complete iter_XXXXXXX folder") from err
        if iteration is None:
            raise ConvertError(f"{load} holds no checkpoint (neither {checkpointing.TRACKER} "
                               "nor an iter_XXXXXXX folder name)",
                               "pass the --save folder of a run that saved at least once, or "
                               "one of its iter_XXXXXXX folders")
        ckpt = Checkpoint(checkpointing.iteration_dir(load, iteration), iteration, load)
    if not (ckpt.folder / INDEX_FILE).is_file():
        raise ConvertError(f"{ckpt.folder} is not a complete distributed checkpoint (no "
                           f"{INDEX_FILE} tensor index)",
                           "pass a folder written by stag train or Megatron-LM (torch_dist "
                           "format); an interrupted save leaves an .incomplete folder instead")
    integrity.verify_manifest(ckpt.folder)  # before any tensor is read
    return ckpt


def read_record(ckpt: Checkpoint) -> dict:
    """The run record (stag_run.json) that stag train saved next to the tensors."""
    path = ckpt.folder / checkpointing.RUN_FILE
    if not path.is_file():
        raise ConvertError(f"{path} is missing, so the model's configuration is unknown",
                           "pass a checkpoint written by stag train (a Megatron-LM GPT "
                           "checkpoint is read by `stag convert from-gpt`)")
    try:
        record = json.loads(path.read_text())
        record["args"], record["architecture"], record["tokenizer"]  # noqa: B018 - presence
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ConvertError(f"{path} is not a valid run record ({type(err).__name__}: {err})",
                           "restore the file stag train wrote with this checkpoint") from err
    return record


def check_record(record: dict, args: argparse.Namespace, where: Path) -> None:
    """The record's architecture must be what its own flags say (a hand-edited or mixed-up
    stag_run.json otherwise builds a model the tensors do not fit)."""
    from stag_plugin.training import arguments

    saved = arguments.with_unrecorded(record["architecture"], architecture=True)
    expected = arguments.architecture_of(args, saved.get("padded_vocab_size"))
    diffs = [f"{key}: architecture {saved.get(key)!r}, args {value!r}"
             for key, value in expected.items() if saved.get(key) != value]
    if diffs:
        raise ConvertError(f"{where / checkpointing.RUN_FILE} contradicts itself "
                           f"({'; '.join(diffs[:4])})",
                           "restore the run record stag train wrote with this checkpoint")


def params_dtype(args: argparse.Namespace) -> torch.dtype:
    return torch.bfloat16 if getattr(args, "bf16", False) else torch.float32


# ---------------------------------------------------------------------------- tensors


def tensor_index(folder: Path) -> TensorIndex:
    """Every tensor in the checkpoint: global shape and dtype, from the index file alone."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except StagError:  # a refused type (stag_plugin.compat.pickles)
        raise
    except Exception as err:  # unpickling a damaged index raises almost anything
        raise _corrupted(folder / INDEX_FILE, err) from err
    return {key: (tuple(entry.size), entry.properties.dtype)
            for key, entry in metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata)}


def model_tensors(index: TensorIndex) -> TensorIndex:
    return {k: v for k, v in index.items() if not k.startswith(NON_MODEL_PREFIXES)}


def check_tensors(found: TensorIndex, expected: Dict[str, Tuple[int, ...]],
                  dtype: torch.dtype, where: Path, fix: str) -> None:
    """Exactly the expected keys, each with its shape and `dtype`; every problem named."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [f"{k} {found[k][0]} (expected {tuple(expected[k])})" for k in sorted(expected)
              if k in found and tuple(found[k][0]) != tuple(expected[k])]
    dtypes = [f"{k} {found[k][1]}" for k in sorted(expected)
              if k in found and found[k][1] != dtype]
    problems = [f"{len(items)} {what}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}"
                for what, items in (("missing tensors", missing),
                                    ("unexpected tensors", unexpected),
                                    ("shape mismatches", shapes),
                                    (f"tensors not {dtype}", dtypes)) if items]
    if problems:
        raise ConvertError(f"the tensors in {where} do not fit the model its configuration "
                           f"describes ({'; '.join(problems)})", fix)


def read_tensors(folder: Path, index: TensorIndex, keys: Iterable[str],
                 progress: bool = True) -> Dict[str, torch.Tensor]:
    """The tensors `keys`, each read whole (in groups of at most READ_GROUP_BYTES)."""
    from tqdm.auto import tqdm

    keys = list(keys)
    groups, out = _groups(index, keys), {}
    if progress:
        size = sum(_nbytes(index[k]) for k in keys)
        say(f"reading {len(keys)} tensors ({size / 2**20:.1f} MiB) from {folder}")
    for group in tqdm(groups, desc="read", unit="group", disable=not progress or len(groups) < 2):
        out.update(_read_group(folder, index, group))
    return out


def _groups(index: TensorIndex, keys: list) -> list:
    groups, current, size = [], [], 0
    for key in keys:
        if current and size + _nbytes(index[key]) > READ_GROUP_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += _nbytes(index[key])
    return groups + ([current] if current else [])


def _nbytes(entry) -> int:
    shape, dtype = entry
    return int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()


def _read_group(folder: Path, index: TensorIndex, keys: list) -> Dict[str, torch.Tensor]:
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.api import CheckpointException

    state = {k: torch.empty(index[k][0], dtype=index[k][1]) for k in keys}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in")
            load(state, storage_reader=FileSystemReader(str(folder)), no_dist=True)
    except (Exception, CheckpointException) as err:  # (the latter is a BaseException)
        raise _corrupted(folder, err) from err
    return state


def _corrupted(path: Path, err: Exception) -> ConvertError:
    reason = str(err).strip().splitlines()[-1][:300] if str(err).strip() else ""
    return ConvertError(f"{path} cannot be read ({type(err).__name__}: {reason}): a file of "
                        "the checkpoint is truncated or corrupted",
                        "convert another iteration, or copy the checkpoint again from where it "
                        "was written")


# ---------------------------------------------------------------------------- common state


def read_common(folder: Path, trusted: bool = False) -> dict:
    """The checkpoint's common state (the non-tensor entries: Megatron-LM stores its args there;
    common.pt or, from megatron-core 0.19, an entry of the distributed checkpoint), unpickled
    with torch's weights-only loader and Megatron's safe types (stag_plugin.compat.pickles);
    `trusted`: full unpickling (arbitrary Python objects, as Megatron-LM itself loads it)."""
    try:
        stored = compat.read_common_state(folder)
    except FileNotFoundError as err:
        raise ConvertError(f"the common state is missing: {err}",
                           "pass a complete distributed checkpoint") from err
    except StagError:
        raise
    except Exception as err:
        raise _corrupted(folder, err) from err
    full = lambda payload: torch.load(io.BytesIO(payload), map_location="cpu",
                                      weights_only=False)
    try:
        common = stored.load(full if trusted else partial(load_payload, where=stored.where))
    except StagError:
        raise
    except Exception as err:
        missing = missing_megatron_global(err)
        if missing is not None:
            raise NewerMegatron(stored.where, missing) from err
        raise _corrupted(stored.where, err) from err
    if not isinstance(common, dict):
        raise ConvertError(f"{stored.where} does not hold a dict", "pass a Megatron checkpoint")
    return common


# ---------------------------------------------------------------------------- verification


def verify_same_tensors(written: Path, original: Path, with_optimizer: bool,
                        progress: bool = True) -> int:
    """Every tensor of checkpoint `written` equals the one of `original` under the same key
    (both read whole), and both hold the same keys: the model's, plus the optimizer's when
    `with_optimizer`. Returns the number compared; raises naming the differences."""
    from tqdm.auto import tqdm

    select = (lambda index: index) if with_optimizer else model_tensors
    new, old = select(tensor_index(written)), select(tensor_index(original))
    problems = _index_differences(new, old)
    groups = _groups(new, sorted(new)) if not problems else []
    for group in tqdm(groups, desc="verify", unit="group",
                      disable=not progress or len(groups) < 2):
        a, b = _read_group(written, new, group), _read_group(original, old, group)
        problems += [f"{key} differs" for key in group if not torch.equal(a[key], b[key])]
    if problems:
        raise ConvertError(f"the written checkpoint {written} is not the source {original} "
                           f"({len(problems)} problems: {', '.join(problems[:4])})",
                           "this is a bug in the conversion; nothing was published to --out, "
                           "report it with the command line")
    return len(new)


def verify_tensors(written: Path, expected: Dict[str, torch.Tensor]) -> None:
    """The model tensors of checkpoint `written` are exactly `expected` (keys and values)."""
    index = model_tensors(tensor_index(written))
    problems = _index_differences(index, {k: (tuple(v.shape), v.dtype)
                                          for k, v in expected.items()})
    if not problems:
        found = read_tensors(written, index, sorted(index), progress=False)
        problems = [f"{k} differs" for k in sorted(index) if not torch.equal(found[k],
                                                                           expected[k])]
    if problems:
        raise ConvertError(f"the written checkpoint {written} does not hold the converted "
                           f"weights ({len(problems)} problems: {', '.join(problems[:4])})",
                           "this is a bug in the conversion; nothing was published to --out, "
                           "report it with the command line")


def _index_differences(new: TensorIndex, old: TensorIndex) -> list:
    problems = [f"{k} only in the output" for k in sorted(set(new) - set(old))]
    problems += [f"{k} missing from the output" for k in sorted(set(old) - set(new))]
    return problems + [f"{k} {new[k]} vs {old[k]}" for k in sorted(set(new) & set(old))
                       if new[k] != old[k]]
