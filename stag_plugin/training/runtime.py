"""The runtime every entry point starts from: `stag train`, `stag eval`, `stag generate`,
`stag convert reshard` and `stag convert from-gpt` all come up the same way.

    start(tp, pp, timeout, seed)       torch.distributed + Megatron's parallel state (torchrun's
                                       world or a world of one), the CPU compatibility layer,
                                       every random generator
    saved_args(record, tp, pp)         a checkpoint's flags (stag_run.json), under a layout
    build_model(args, vocab)           StagGPTModel in Megatron's DDP (and Float16Module for bf16)
    build_optimizer(args, model)       Megatron's optimizer and learning-rate schedule
    load_weights(model, root)          a checkpoint's model weights, resharded to this layout
    checkpoint_state(...)              what a checkpoint holds, to save or to load into
    run_record(args, ...)              stag_run.json for a checkpoint

`model` is Megatron's list of model chunks (one: the plugin has no virtual pipeline stages).
"""

from __future__ import annotations

import argparse
import os
import random
from datetime import timedelta
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from stag_plugin.compat.cpu import apply_cpu_compat, seed_model_parallel_rng
from stag_plugin.errors import StagError
from stag_plugin.training import arguments, checkpointing


def start(tensor_parallel: int = 1, pipeline_parallel: int = 1, timeout_minutes: float = 10.0,
          seed: Optional[int] = None, backend: str = "nccl") -> None:
    """Bring the process up: distributed world and parallel state, CPU compatibility, seeds.
    `backend`: the collectives' on GPUs (--distributed-backend); gloo without GPUs."""
    setup_distributed(tensor_parallel, pipeline_parallel, timeout_minutes, backend)
    apply_cpu_compat()
    if seed is not None:
        set_seed(seed)


def setup_distributed(tensor_parallel: int, pipeline_parallel: int = 1,
                      timeout_minutes: float = 10.0, backend: str = "nccl") -> None:
    """Use torchrun's world when launched by it, else a world of one; (re)build parallel state.

    Data parallel takes the rest of the world. Every collective (gloo or NCCL) fails after
    `timeout_minutes`, so a dead rank ends the job instead of hanging it."""
    from megatron.core import parallel_state

    from stag_plugin.compat.megatron import initialize_single_process

    world = (torch.distributed.get_world_size() if torch.distributed.is_initialized()
             else int(os.environ.get("WORLD_SIZE", "1")))
    model_parallel = tensor_parallel * pipeline_parallel
    if world % model_parallel:
        raise StagError(f"--tensor-model-parallel-size {tensor_parallel} x "
                        f"--pipeline-model-parallel-size {pipeline_parallel} = {model_parallel} "
                        f"does not divide the world size {world}",
                        f"launch a multiple of {model_parallel} processes (e.g. torchrun "
                        f"--nproc-per-node {model_parallel} ...)")
    if not torch.distributed.is_initialized():
        if world == 1:
            initialize_single_process(tensor_parallel)
            return
        backend = backend if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():  # one GPU per process: torchrun's LOCAL_RANK
            local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
            torch.cuda.set_device(local % torch.cuda.device_count())
        torch.distributed.init_process_group(backend=backend,
                                             timeout=timedelta(minutes=timeout_minutes))
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size()) == (
                tensor_parallel, pipeline_parallel):
            return  # reuse: rebuilding creates new process groups, whose threads never end
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        distributed_timeout_minutes=timeout_minutes)  # Megatron builds a timedelta from it


def set_seed(seed: int) -> None:
    """Python, numpy, torch and Megatron's model-parallel generator (CUDA, or its CPU twin)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        from megatron.core import tensor_parallel

        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        seed_model_parallel_rng(seed)


# ---------------------------------------------------------------------------- flags of a run


def default_args() -> argparse.Namespace:
    """`stag train`'s defaults for every flag."""
    from stag_plugin.training import train

    return train.build_parser().parse_args([])


def saved_args(record: dict, tensor_parallel: int = 1,
               pipeline_parallel: int = 1) -> argparse.Namespace:
    """A checkpoint's flags (its stag_run.json `record`; trainer defaults for flags newer than
    the record) under the layout given here: the architecture does not depend on the layout,
    and distributed checkpoints reshard on load."""
    args = argparse.Namespace(**{**vars(default_args()),
                                 **arguments.with_unrecorded(record["args"])})
    args.tensor_model_parallel_size = tensor_parallel
    args.pipeline_model_parallel_size = pipeline_parallel
    args.num_layers_per_virtual_pipeline_stage = None
    args.sequence_parallel = bool(args.sequence_parallel) and tensor_parallel > 1
    return args


def run_record(args, iteration: int, padded_vocab: int, tokenizer: dict) -> dict:
    """stag_run.json: the flags, the architecture they fix and the tokenizer of a checkpoint
    (`tokenizer`: TokenizerSpec.to_json(), with "type", "vocab_size", "eod", ...; records
    written before tokenizer types hold {"vocab_size": ..., "eod": ...} only)."""
    return {"iteration": iteration, "args": vars(args),
            "architecture": arguments.architecture_of(args, padded_vocab), "tokenizer": tokenizer}


# ---------------------------------------------------------------------------- model, optimizer


def build_model(args, vocab: int, config=None) -> list:
    """This rank's StagGPTModel (its pipeline stage, its tensor-parallel shard) for `args`,
    wrapped as Megatron trains it: Float16Module under --bf16, then DDP."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    from stag_plugin.core.model import StagGPTModel
    from stag_plugin.core.specs import get_stag_layer_spec

    config = config or arguments.config_from_args(args)
    model = StagGPTModel(
        config, vocab_size=vocab, max_sequence_length=args.max_position_embeddings,
        transformer_layer_spec=get_stag_layer_spec(config.transformer_impl, args.qk_layernorm),
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)
    if args.bf16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=args.use_distributed_optimizer)
    chunk = DistributedDataParallel(config, ddp_config, model)
    chunk.broadcast_params()
    return [chunk]


def build_optimizer(args, model: list):
    """Megatron's optimizer and schedule for `model`, and the training hooks on its config:
    Megatron's finalize_model_grads plus the pipeline-replica gradient sum, loss scaling, and
    DDP's no_sync."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from stag_plugin.parallel.pipeline import with_replica_sync

    lr = args.lr if args.lr is not None else 0.0  # none given: a conversion (no training)
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer=args.optimizer, lr=lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16,
        use_distributed_optimizer=args.use_distributed_optimizer,
        params_dtype=torch.bfloat16 if args.bf16 else torch.float32), model)
    scheduler = build_scheduler(args, optimizer)
    config = model[0].config
    config.finalize_model_grads_func = with_replica_sync(finalize_model_grads)
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model[0].no_sync
    return optimizer, scheduler


def build_scheduler(args, optimizer):
    """Megatron's OptimizerParamScheduler as Megatron-LM's get_optimizer_param_scheduler builds
    it (lengths: arguments.schedule_steps; --start/--end-weight-decay default --weight-decay)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    steps = arguments.schedule_steps(args)
    start_wd, end_wd = (args.weight_decay if value is None else value
                        for value in (args.start_weight_decay, args.end_weight_decay))
    if args.lr is None or steps["decay"] is None:  # no schedule asked for (a conversion that
        return OptimizerParamScheduler(            # writes a fresh optimizer): a rate of 0
            optimizer, init_lr=0.0, max_lr=0.0, min_lr=0.0, lr_warmup_steps=0, lr_decay_steps=1,
            lr_decay_style="constant", start_wd=start_wd, end_wd=end_wd, wd_incr_steps=1,
            wd_incr_style="constant")
    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=steps["warmup"], lr_decay_steps=steps["decay"],
        lr_decay_style=args.lr_decay_style, start_wd=start_wd, end_wd=end_wd,
        wd_incr_steps=steps["train"], wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=not args.override_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        wsd_decay_steps=steps["wsd"], lr_wsd_decay_style=args.lr_wsd_decay_style)


def unwrap(chunk):
    """The StagGPTModel inside Megatron's DDP / Float16Module wrappers (global key names)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


# ---------------------------------------------------------------------------- checkpoints


def checkpoint_state(model: list, optimizer=None, scheduler=None, iteration: int = 0,
                     consumed_samples: int = 0, rng: bool = True, loading: bool = False) -> dict:
    """What a checkpoint holds, as the sharded state to save, or (`loading`) the template that
    `dist_checkpointing.load` fills: the model; the optimizer and its schedule when given (the
    distributed optimizer's state reshardable over TP / PP / DP layouts); this rank's RNG
    streams unless `rng` is False (another TP / PP layout cannot use them)."""
    model_state = unwrap(model[0]).sharded_state_dict()
    state = {"model": model_state, "iteration": iteration, "consumed_samples": consumed_samples}
    if rng:
        state["rng_state"] = checkpointing.sharded_rng_state()
    if optimizer is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    return state


def load_weights(model: list, root: Path, trusted: bool = False) -> int:
    """Load the latest checkpoint's model weights under this run's layout (resharded);
    `trusted`: unpickle it fully (--trust-checkpoint-code)."""
    inner = unwrap(model[0])
    iteration, state = checkpointing.load_checkpoint(root, {"model": inner.sharded_state_dict()},
                                                     trusted)
    inner.load_state_dict(state["model"])
    return iteration
