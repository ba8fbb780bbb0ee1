"""Training checkpoints: Megatron distributed checkpoints (torch_dist) in Megatron-LM's layout.

    <save>/latest_checkpointed_iteration.txt      the last complete iteration, e.g. "200"
    <save>/iter_0000200/                          dist_checkpointing folder (any TP layout)
    <save>/iter_0000200/stag_run.json             flags, architecture, tokenizer of the run
    <save>/iter_0000200/tokenizer.model           the SentencePiece model the ids refer to

A save never damages the previous checkpoint: it writes `iter_XXXXXXX.incomplete/`, renames it
when every rank has finished, and only then rewrites the tracker file (atomically). A run killed
during a save leaves the previous iteration and tracker untouched.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from stag_plugin.errors import StagError

TRACKER = "latest_checkpointed_iteration.txt"
RUN_FILE = "stag_run.json"
TOKENIZER_FILE = "tokenizer.model"


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
    run_file = iteration_dir(root, iteration) / RUN_FILE
    if not run_file.is_file():
        raise CheckpointError(f"{run_file} is missing: {root} was not written by stag train",
                              "pass the --save folder of a stag train run")
    return iteration, json.loads(run_file.read_text())


def check_architecture(root: Path, expected: dict) -> None:
    """Refuse to load a checkpoint whose architecture differs from this run's flags."""
    _, run = read_run(root)
    saved = run["architecture"]
    diffs = [f"{key}: checkpoint {saved.get(key)!r}, this run {value!r}"
             for key, value in expected.items() if saved.get(key) != value]
    if diffs:
        raise CheckpointError(
            f"--load {root} has another architecture ({'; '.join(diffs)})", "use the "
            "checkpoint's flags (or its --config), or a fresh --save folder without --load")


def save_checkpoint(root: Path, iteration: int, state: dict, run: dict,
                    tokenizer_model: Optional[Path] = None) -> Path:
    """Save `state` (sharded + common entries) collectively; atomic with respect to failures."""
    from megatron.core import dist_checkpointing

    root, rank = Path(root), _rank()
    final = iteration_dir(root, iteration)
    partial = final.with_name(final.name + ".incomplete")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(state, str(partial))
    if rank == 0:
        (partial / RUN_FILE).write_text(json.dumps(run, indent=1, default=str))
        if tokenizer_model is not None:
            shutil.copyfile(tokenizer_model, partial / TOKENIZER_FILE)
        replace_dir(partial, final)
        _write_atomic(root / TRACKER, f"{iteration}\n")
    _barrier()
    return final


def load_checkpoint(root: Path, sharded_state: dict) -> tuple[int, dict]:
    """Load the latest checkpoint under `root` into the layout `sharded_state` describes."""
    from megatron.core import dist_checkpointing

    iteration, _ = read_run(root)
    return iteration, dist_checkpointing.load(sharded_state, str(iteration_dir(root, iteration)))


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
