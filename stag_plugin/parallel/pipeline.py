"""Pipeline-parallel plumbing for StagGPTModel: boundary tensors, pipeline replicas, schedules.

Layout decisions live in `stag_plugin.parallel.layout`; this module does the communication they
imply.

* Boundary tensor: the streams of `layout.Stage.sends` packed along the hidden dimension,
  [s, b, n * h]; `adjust_tensor_shapes` tells Megatron's 1F1B schedule each stage's shapes.
* Pipeline replicas: parameters held by several stages (re-embedding stages' word/position
  embeddings, the tied head on the last stage, the null memory slot, the learned combination,
  and with shared weights the shared layers). Each carries `stag_replica_stages`, the stages
  holding a copy. At build time the copies take the first holder's values; after every backward
  their gradients are summed over the holders (`sync_replica_grads`), so they stay equal - the
  way Megatron ties the first and last stage's embeddings, generalised to any set of stages.
  Non-first copies are marked `shared` so gradient norms count each weight once, and every
  replica gets its own DDP bucket (`shared_embedding`) so distributed-optimizer shards line up.
* `finalize_model_grads`: Megatron's, then `sync_replica_grads`; `with_replica_sync` wraps
  Megatron's function once, where a trainer installs it (stag_plugin.training.runtime,
  stag_plugin.integrations.megatron_lm.install_replica_grad_sync).
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch
from megatron.core import parallel_state
from torch import Tensor

REPLICA_ATTR = "stag_replica_stages"

_GROUPS: Dict[Tuple[int, ...], object] = {}  # global ranks -> process group


# ------------------------------------------------------------------ boundary tensors

def pack(carry: Dict[str, Tensor], streams: Sequence[str]) -> Tensor:
    """The one tensor crossing a stage boundary: `streams` of `carry` side by side [s, b, n*h]."""
    return torch.cat([carry[name] for name in streams], dim=-1)


def unpack(tensor: Tensor, streams: Sequence[str]) -> Dict[str, Tensor]:
    """Inverse of `pack`."""
    parts = torch.chunk(tensor, len(streams), dim=-1)
    return dict(zip(streams, parts))


def adjust_tensor_shapes(stage) -> Callable:
    """`adjust_tensor_shapes_fn` for Megatron's 1F1B schedule: this stage's receive and send
    shapes, [s, b, n * h] with n the number of streams crossing each boundary."""

    def adjust(recv_shapes: List[tuple], send_shapes: List[tuple]):
        (seq, batch, hidden), = recv_shapes
        recv = [(seq, batch, hidden * max(1, len(stage.receives)))]
        send = [(seq, batch, hidden * max(1, len(stage.sends)))]
        return recv, send

    return adjust


# ------------------------------------------------------------------ pipeline replicas

def mark_replica(param: Tensor, stages: Iterable[int], this_stage: int) -> None:
    """Tag `param` as a copy held by `stages` (this stage among them)."""
    stages = tuple(sorted(stages))
    if len(stages) < 2:
        return
    assert this_stage in stages, (this_stage, stages)
    setattr(param, REPLICA_ATTR, stages)
    param.shared_embedding = True  # own DDP bucket: same shard ranges on every holder
    if this_stage != stages[0]:
        param.shared = True  # counted once in gradient norms (on the first holder)


def replica_params(model: torch.nn.Module) -> Dict[Tuple[int, ...], List[Tensor]]:
    """Replicated parameters of `model`, grouped by holder stages (each tensor once)."""
    groups: Dict[Tuple[int, ...], List[Tensor]] = {}
    seen = set()
    for param in model.parameters():
        stages = getattr(param, REPLICA_ATTR, None)
        if stages is not None and id(param) not in seen:
            seen.add(id(param))
            groups.setdefault(stages, []).append(param)
    return groups


def create_replica_groups(holder_sets: Iterable[Tuple[int, ...]]) -> None:
    """Create a process group for every pipeline's copy of each holder set.

    Collective over the whole world (`new_group` must be called by every rank in the same
    order): call it on every rank with the same `holder_sets`, e.g. from the model constructor.
    """
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if pp_group.size() == 1:
        return
    mine = tuple(torch.distributed.get_process_group_ranks(pp_group))
    pipelines = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(pipelines, mine)
    for holders in sorted(set(h for h in holder_sets if len(h) > 1)):
        for pipeline in sorted(set(pipelines)):
            ranks = tuple(pipeline[s] for s in holders)
            if ranks not in _GROUPS:
                _GROUPS[ranks] = torch.distributed.new_group(list(ranks))


def _group_for(stages: Tuple[int, ...]):
    pipeline = torch.distributed.get_process_group_ranks(
        parallel_state.get_pipeline_model_parallel_group())
    ranks = tuple(pipeline[s] for s in stages)
    if ranks not in _GROUPS:
        raise RuntimeError(f"no process group for pipeline stages {stages}: the model was built "
                           "without stag_plugin.parallel.pipeline.create_replica_groups")
    return ranks, _GROUPS[ranks]


@torch.no_grad()
def broadcast_replicas(model: torch.nn.Module) -> None:
    """Give every copy of a replicated parameter the first holder's values."""
    for stages, params in sorted(replica_params(model).items()):
        ranks, group = _group_for(stages)
        flat = torch.cat([p.data.reshape(-1) for p in params])
        torch.distributed.broadcast(flat, src=ranks[0], group=group)
        _scatter_flat(flat, [p.data for p in params])


@torch.no_grad()
def sync_replica_grads(model_chunks: Sequence[torch.nn.Module]) -> None:
    """Sum the gradients of every replicated parameter over the stages holding it."""
    groups: Dict[Tuple[int, ...], List[Tensor]] = {}
    for chunk in model_chunks:
        for stages, params in replica_params(chunk).items():
            groups.setdefault(stages, []).extend(params)
    for stages, params in sorted(groups.items()):
        grads = [_grad_of(p) for p in params]
        _, group = _group_for(stages)
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, group=group)
        _scatter_flat(flat, grads)


def _grad_of(param: Tensor) -> Tensor:
    grad = getattr(param, "main_grad", None)
    if grad is None:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        grad = param.grad
    return grad


def _scatter_flat(flat: Tensor, tensors: List[Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def finalize_model_grads(megatron_finalize, model, *args, **kwargs):
    """Megatron's finalize_model_grads followed by the pipeline-replica gradient sum."""
    result = megatron_finalize(model, *args, **kwargs)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        sync_replica_grads(model if isinstance(model, (list, tuple)) else [model])
    return result


def with_replica_sync(finalize):
    """Wrap a finalize_model_grads function (idempotent)."""
    if finalize is None or getattr(finalize, "_stag_replica_sync", False):
        return finalize
    wrapped = functools.partial(finalize_model_grads, finalize)
    wrapped._stag_replica_sync = True
    return wrapped
