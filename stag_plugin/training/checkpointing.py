"""Training checkpoints: Megatron distributed checkpoints (torch_dist) in Megatron-LM's layout.

    <save>/latest_checkpointed_iteration.txt      the last complete iteration, e.g. "200"
    <save>/iter_0000200/                          dist_checkpointing folder (any TP layout)
    <save>/iter_0000200/stag_run.json             flags, architecture, tokenizer of the run
    <save>/iter_0000200/tokenizer/                the tokenizer the ids refer to: its files and
                                                  stag_tokenizer.json (data.tokenizers); older
                                                  checkpoints hold tokenizer.model instead
    <save>/iter_0000200/manifest.json             every file's size and SHA-256 (integrity)

A save never damages the previous checkpoint: it writes `iter_XXXXXXX.incomplete/`, renames it
when every rank has finished, and only then rewrites the tracker file (atomically). A run killed
during a save leaves the previous iteration and tracker untouched.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from stag_plugin.errors import StagError, disk_error
from stag_plugin.training import integrity

TRACKER = "latest_checkpointed_iteration.txt"
RUN_FILE = "stag_run.json"
TOKENIZER_FILE = "tokenizer.model"  # the tokenizer of checkpoints saved before tokenizer/


class CheckpointError(StagError):
    """A checkpoint that cannot be used for what was asked (message names the fix)."""


def iteration_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: Path) -> Optional[int]:
    """The iteration the tracker names, or None when `root` holds no complete checkpoint."""
    tracker = Path(root) / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker} holds {text!r}, not an iteration number", "write "
                              "the iteration of a complete iter_XXXXXXX folder into it")
    return int(text)


def saved_iterations(root: Path) -> list:
    """The iterations of the complete checkpoints under `root` (iter_XXXXXXX folders)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.iterdir()
                  if p.is_dir() and re.fullmatch(r"iter_\d{7}", p.name))


def remove_iterations(root: Path, keep: int) -> None:
    """Delete every complete checkpoint under `root` but iteration `keep` (rank 0)."""
    if _rank() == 0:
        for iteration in saved_iterations(root):
            if iteration != keep:
                shutil.rmtree(iteration_dir(root, iteration), ignore_errors=True)


def read_run(root: Path) -> tuple[int, dict]:
    """(iteration, run record) of the latest checkpoint under `root`, without loading tensors."""
    root = Path(root)
    if not root.exists():
        raise CheckpointError(f"checkpoint folder {root} does not exist", "pass the --save "
                              "folder of a finished run")
    iteration = latest_iteration(root)
    if iteration is None:
        raise CheckpointError(f"{root} holds no complete checkpoint (no {TRACKER})", "pass "
                              "the --save folder of a run that saved at least once")
    folder = iteration_dir(root, iteration)
    if not folder.is_dir():
        raise CheckpointError(f"{root / TRACKER} names iteration {iteration}, but {folder} does "
                              "not exist", f"write the iteration of a complete iter_XXXXXXX "
                              f"folder of {root} into {TRACKER}")
    run_file = folder / RUN_FILE
    if not run_file.is_file():
        raise CheckpointError(f"{run_file} is missing: {root} was not written by stag train",
                              "pass the --save folder of a stag train run")
    try:
        run = json.loads(run_file.read_text())
        run["args"], run["architecture"]  # noqa: B018 - both must be there
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{run_file} is not a valid run record ({type(err).__name__}: "
                              f"{err})", "restore the file stag train wrote with this "
                              "checkpoint") from err
    return iteration, run


def check_architecture(root: Path, expected: dict) -> None:
    """Refuse to load a checkpoint whose architecture differs from this run's flags."""
    from stag_plugin.training.arguments import with_unrecorded

    _, run = read_run(root)
    saved = with_unrecorded(run["architecture"], architecture=True)
    diffs = [f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}"
             for key, value in expected.items() if saved.get(key) != value]
    if diffs:
        raise CheckpointError(
            f"--load {root} has another architecture ({'; '.join(diffs)})", "use the "
            "checkpoint's flags (or its --config), or a fresh --save folder without --load")


def save_checkpoint(root: Path, iteration: int, state: dict, run: dict,
                    tokenizer=None) -> Path:
    """Save `state` (sharded + common entries) collectively, the run record and (a tokenizer
    the plugin built) `tokenizer` as `tokenizer/`; atomic with respect to failures."""
    from megatron.core import dist_checkpointing

    from stag_plugin.compat.megatron import install_saver_queue
    from stag_plugin.training.data import tokenizers

    install_saver_queue()
    root, rank = Path(root), _rank()
    final = iteration_dir(root, iteration)
    partial = final.with_name(final.name + ".incomplete")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    try:
        dist_checkpointing.save(state, str(partial))
        if rank == 0:
            (partial / RUN_FILE).write_text(json.dumps(run, indent=1, default=str))
            if tokenizer is not None:
                tokenizers.save_tokenizer(tokenizer, partial / tokenizers.CHECKPOINT_DIR)
            integrity.write_manifest(partial)  # every file, now that the last one is written
            replace_dir(partial, final)
            _write_atomic(root / TRACKER, f"{iteration}\n")
    except BaseException as err:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)  # the previous checkpoint stays the latest
        disk = disk_error(err)
        if disk is not None:
            raise CheckpointError(f"saving iteration {iteration} to {root} failed, "
                                  f"{disk.problem}; the previous checkpoint is kept",
                                  disk.fix) from err
        raise
    _barrier()
    return final


def load_checkpoint(root: Path, sharded_state: dict, trusted: bool = False) -> tuple[int, dict]:
    """Load the latest checkpoint under `root` into the layout `sharded_state` describes,
    admitting only the Python types torch and Megatron write unless `trusted`
    (stag_plugin.compat.pickles)."""
    iteration, _ = read_run(root)
    return iteration, load_folder(iteration_dir(root, iteration), sharded_state, trusted)


def load_folder(folder: Path, sharded_state: dict, trusted: bool = False) -> dict:
    """dist_checkpointing.load of one iteration folder, collectively: its files checked against
    the manifest (on rank 0), its model tensors against the ones requested by all ranks, and
    its pickles read by the restricted readers (stag_plugin.compat.pickles; a refused type is
    one clear error, however torch wrapped it)."""
    from megatron.core import dist_checkpointing

    from stag_plugin.compat.pickles import checkpoint_reads, refusal

    _on_rank0_for_all(lambda: integrity.verify_manifest(folder))
    with checkpoint_reads(trusted):
        try:
            integrity.check_keys(folder, _tensor_keys(folder),
                                 _all_ranks(integrity.requested_tensors(sharded_state)))
            return dist_checkpointing.load(sharded_state, str(folder))
        except (KeyboardInterrupt, SystemExit, StagError):
            raise
        except BaseException as err:  # torch wraps a rank's failure (CheckpointException)
            refused = refusal(err, str(folder))
            if refused is not None:
                raise refused from err
            raise CheckpointError(f"{folder} cannot be loaded into this model ({_last_line(err)})",
                                  "check that the checkpoint is complete and was saved with these "
                                  "flags; load another iteration otherwise") from err


def _last_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1][:300] if lines else ''}"


def _tensor_keys(folder: Path) -> list:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except FileNotFoundError as err:
        raise CheckpointError(f"{folder} has no tensor index (.metadata)", "load a complete "
                              "checkpoint (the tracker names the last complete one)") from err
    return [key for key, entry in metadata.state_dict_metadata.items()
            if isinstance(entry, TensorStorageMetadata)]


def _all_ranks(keys) -> set:
    """The union of `keys` over all ranks (each pipeline stage requests its own tensors)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return set(keys)
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, sorted(keys))
    return set().union(*gathered)


def _on_rank0_for_all(check) -> None:
    """Run `check` on rank 0; its StagError (or success) is raised on every rank."""
    error = None
    if _rank() == 0:
        try:
            check()
        except StagError as err:
            error = err
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    from megatron.core import tensor_parallel

    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state["tracker"] = dict(tensor_parallel.get_cuda_rng_tracker().get_states())
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    from megatron.core import tensor_parallel

    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    if "tracker" in state:
        tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["tracker"]))


def sharded_rng_state():
    """This rank's RNG state as one shard of a (pipeline x tensor-parallel) grid, replicated
    over data-parallel ranks (Megatron-LM's layout): each model-parallel rank resumes its own
    streams. A checkpoint resumed under another layout skips it (see `same_layout`)."""
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(
        "rng_state", rng_state(),
        (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
        replica_id=ps.get_data_parallel_rank())


def same_layout(root: Path, args) -> bool:
    """Whether the checkpoint in `root` was saved with this run's TP and PP sizes."""
    saved = read_run(root)[1]["args"]
    return (saved.get("tensor_model_parallel_size", 1) == args.tensor_model_parallel_size
            and saved.get("pipeline_model_parallel_size", 1) == args.pipeline_model_parallel_size)


def replace_dir(source: Path, target: Path) -> None:
    """Move `source` to `target`; an existing `target` is removed only after the move."""
    old = target.with_name(target.name + ".old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
