"""`stag convert reshard`: rewrite a training checkpoint for another TP / PP layout, and prove it.

    stag convert reshard --load runs/tiny --out runs/tiny-pp2 --pipeline-model-parallel-size 2
    torchrun --nproc-per-node 4 -m stag_plugin convert reshard --load runs/tiny \
        --out runs/tiny-tp2pp2 --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

Launched as one process it starts the T x P processes itself (torchrun; gloo on CPU, NCCL on GPU);
under torchrun it uses the launched world (T x P must divide it). Each rank builds the model and
optimizer of the new layout with the trainer's own code (stag_plugin.training.runtime), loads the
source into them (Megatron's distributed checkpoints reshard on load; the distributed optimizer is
saved "fully_reshardable"), and saves them with the trainer's save path, the run record's flags
updated to the new layout: `stag train --load OUT` resumes under that layout and `stag eval` / `stag
generate` read it. RNG streams restart from the run's seed (RNG states of one layout do not map onto
another).

The output is written to `.OUT.partial/`; rank 0 then reads every tensor of it and of the
source back whole and requires them equal (model and optimizer state, same keys) before
renaming it to OUT. The source is only read.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from stag_plugin.compat.pickles import checkpoint_reads
from stag_plugin.convert import source
from stag_plugin.convert.common import ConvertError, check_out, partial_path, say
from stag_plugin.training import arguments, runtime


@dataclass
class Plan:
    """What a reshard will do, checked before any process starts or any file is written."""

    ckpt: source.Checkpoint
    record: dict
    args: argparse.Namespace  # the run's flags under the new layout
    vocab: int  # padded vocabulary (unchanged by the new layout)
    with_optimizer: bool

    @property
    def size(self) -> int:
        return self.args.tensor_model_parallel_size * self.args.pipeline_model_parallel_size


def build_parser(prog: str = "stag convert reshard") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--load", type=Path, required=True,
                        help="run folder (the latest iteration) or an iter_XXXXXXX folder")
    parser.add_argument("--out", type=Path, required=True, help="run folder to write")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                        help="pipeline stages; p stages put one section on each")
    parser.add_argument("--no-load-optim", action="store_true",
                        help="write a fresh optimizer state instead of resharding the source's")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    arguments.add_trust_arg(parser)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv) -> int:
    options = build_parser().parse_args(argv)
    with checkpoint_reads(trusted=options.trust_checkpoint_code):
        plan = prepare(options)
        if int(os.environ.get("WORLD_SIZE", "1")) == 1 and plan.size > 1:
            launch(argv, options, plan.size)
        else:
            reshard(options, plan)
    return 0


def prepare(options: argparse.Namespace) -> Plan:
    """Every check that needs no process group: source, layout, vocabulary, output."""
    ckpt = source.locate(options.load)
    record = source.read_record(ckpt)
    source.check_record(record, runtime.saved_args(record), ckpt.folder)
    args = runtime.saved_args(record, options.tensor_model_parallel_size,
                             options.pipeline_model_parallel_size)
    arguments.config_from_args(args)  # a layout the model cannot take fails here
    vocab = record["architecture"]["padded_vocab_size"]
    padded = arguments.padded_vocab_size(record["tokenizer"]["vocab_size"], args)
    if padded != vocab:
        raise ConvertError(
            f"at tensor-parallel size {args.tensor_model_parallel_size} the vocabulary would be "
            f"padded to {padded} rows, but the checkpoint has {vocab}",
            f"use a tensor-parallel size that divides {vocab // args.make_vocab_size_divisible_by}")
    with_optimizer = not options.no_load_optim
    if with_optimizer and not any(k.startswith("optimizer.") for k in source.tensor_index(
            ckpt.folder)):
        raise ConvertError(f"{ckpt.folder} holds no optimizer state",
                           "pass --no-load-optim to write a fresh optimizer state")
    check_out(options.out, options.overwrite, ckpt.sources())
    return Plan(ckpt, record, args, vocab, with_optimizer)


def launch(argv, options: argparse.Namespace, nprocs: int) -> None:
    """Run this same command on `nprocs` local processes (torchrun) and wait for them."""
    from stag_plugin.compat.megatron import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
           str(nprocs), "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "stag_plugin", "convert", "reshard", *map(str, argv)]
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env.setdefault("OMP_NUM_THREADS", "1")  # the ranks share the machine's cores
    say(f"starting {nprocs} processes (torchrun) for TP {options.tensor_model_parallel_size} "
        f"x PP {options.pipeline_model_parallel_size}")
    try:
        code = subprocess.call(cmd, env=env)
    finally:
        shutil.rmtree(partial_path(options.out), ignore_errors=True)  # gone after a success
    if code != 0:
        raise ConvertError(f"the {nprocs} resharding processes failed (exit code {code}; their "
                           "output is above)", "fix what they report and run again; --out was "
                           "not written")


@dataclass
class Target:
    """The new layout's model, optimizer and schedule, and where the source left them."""

    model: list
    optimizer: object
    scheduler: object
    iteration: int = 0
    consumed_samples: int = 0


def reshard(options: argparse.Namespace, plan: Plan) -> None:
    """On every rank: load the source under the new layout, save, verify (rank 0), publish."""
    from stag_plugin.training import checkpointing

    target = build(plan)
    load_source(target, plan, options)
    partial = partial_path(options.out)
    rank0 = _rank() == 0
    if rank0:
        shutil.rmtree(partial, ignore_errors=True)
    args = copy.copy(plan.args)
    args.load, args.save = str(plan.ckpt.folder), str(options.out)
    error = None
    try:
        state = runtime.checkpoint_state(target.model, target.optimizer, target.scheduler,
                                         target.iteration, target.consumed_samples)
        tokenizer, described = source_tokenizer(plan) if rank0 else (None, None)
        record = runtime.run_record(args, target.iteration, plan.vocab, described)
        checkpointing.save_checkpoint(partial, target.iteration, state, record,
                                      tokenizer=tokenizer)
        if rank0:
            error = publish(checkpointing.iteration_dir(partial, target.iteration), options, plan)
    except BaseException:
        if rank0:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    _raise_on_any_rank(error)


def source_tokenizer(plan: Plan) -> tuple:
    """(the tokenizer saved with the source, its description for the run record); a source
    without one keeps its record's description (the output then has none either)."""
    from stag_plugin.training.data import tokenizers

    if tokenizers.saved_spec(plan.ckpt.folder) is None:
        return None, plan.record["tokenizer"]
    tokenizer = tokenizers.load_saved(plan.ckpt.folder)
    return tokenizer, tokenizers.spec_of(tokenizer).to_json()


def build(plan: Plan) -> Target:
    """The new layout's model, optimizer and scheduler, built by the trainer's own code."""
    args = plan.args
    runtime.start(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                  args.distributed_timeout_minutes, seed=args.seed)
    model = runtime.build_model(args, plan.vocab)
    return Target(model, *runtime.build_optimizer(args, model))


def load_source(target: Target, plan: Plan, options: argparse.Namespace) -> None:
    """Load the source checkpoint into the new layout (model, optimizer, scheduler, counters);
    the RNG streams of another layout do not map onto this one and are not read."""
    from stag_plugin.training import checkpointing

    optimizer = target.optimizer if plan.with_optimizer else None
    sharded = runtime.checkpoint_state(target.model, optimizer, target.scheduler, rng=False,
                                       loading=True)
    if _rank() == 0 and not options.no_progress:
        say(f"loading {plan.ckpt.folder} at TP {plan.args.tensor_model_parallel_size} x PP "
            f"{plan.args.pipeline_model_parallel_size}")
    state = checkpointing.load_folder(plan.ckpt.folder, sharded,
                                      trusted=options.trust_checkpoint_code)
    runtime.unwrap(target.model[0]).load_state_dict(state["model"])
    if plan.with_optimizer:
        target.optimizer.load_state_dict(state["optimizer"])
        target.scheduler.load_state_dict(state["opt_param_scheduler"])
    target.iteration = int(state["iteration"])
    target.consumed_samples = int(state["consumed_samples"])


def publish(written: Path, options: argparse.Namespace, plan: Plan):
    """Rank 0: verify the written iteration against the source, then rename its run folder to
    --out. Returns the error as (problem, fix), shared with the other ranks, or None."""
    from stag_plugin.training import checkpointing

    partial = written.parent
    try:
        count = source.verify_same_tensors(written, plan.ckpt.folder, plan.with_optimizer,
                                           progress=not options.no_progress)
    except ConvertError as err:
        shutil.rmtree(partial, ignore_errors=True)
        return err.problem, err.fix
    checkpointing.replace_dir(partial, Path(options.out))
    say(f"wrote {options.out} (TP {plan.args.tensor_model_parallel_size} x PP "
        f"{plan.args.pipeline_model_parallel_size}); verified {count} tensors equal to the source")
    return None


def _raise_on_any_rank(error) -> None:
    """Rank 0's verdict, raised on every rank (no rank waits for one that has given up)."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        box = [error]
        torch.distributed.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ConvertError(*error)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
