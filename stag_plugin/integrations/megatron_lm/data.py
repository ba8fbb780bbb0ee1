"""The batch on every pipeline stage, for Megatron-LM's datasets and forward step.

Megatron-LM's pretrain_gpt gives token and position ids to the first pipeline stage and labels
to the last only. A StagFormer stage that starts a section re-embeds the token ids
(docs/design.md), so every stage reads the batch:

    is_dataset_built_on_rank   datasets on TP-rank 0 of *every* pipeline stage
    get_batch                  (tokens, labels, loss_mask, attention_mask, position_ids)
    whole_batch                the same batch in any key order (pretrain_gpt's BATCH_KEYS)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from megatron.core import parallel_state

from stag_plugin.errors import NotSupported, StagError

BATCH_KEYS = ("tokens", "labels", "loss_mask", "attention_mask", "position_ids")
_DTYPES = dict(tokens=torch.int64, labels=torch.int64, loss_mask=torch.float32,
               attention_mask=torch.bool, position_ids=torch.int64)


def is_dataset_built_on_rank(vp_stage: Optional[int] = None, **unused) -> bool:
    """`is_built_on_rank` for BlendedMegatronDatasetBuilder: tensor-parallel rank 0 of every
    pipeline stage builds the datasets (pretrain_gpt's builds them on the first and last only)."""
    return parallel_state.get_tensor_model_parallel_rank() == 0


def get_batch(data_iterator, vp_stage: Optional[int] = None):
    """The whole micro-batch on every pipeline stage.

    Returns (tokens, labels, loss_mask, attention_mask, position_ids), each [b, s] (the mask
    [b, 1, s, s] bool with True = masked, or None without --create-attention-mask-in-dataloader).
    """
    return whole_batch(data_iterator, BATCH_KEYS)


def whole_batch(data_iterator, keys: Sequence[str]) -> list:
    """The micro-batch as a list in the order of `keys` (keys StagGPTModel does not use, such
    as pretrain_gpt's `cu_seqlens`, are None).

    Tensor-parallel rank 0 reads `data_iterator`; the tensors are broadcast within the
    tensor-parallel group, as Megatron-LM's `get_batch_on_this_tp_rank` does.
    """
    from megatron.training import get_args

    args = get_args()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    if parallel_state.get_tensor_model_parallel_rank() == 0:
        batch = _read_batch(data_iterator, args, device)
    else:
        batch = _empty_batch(args, device)
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        for key in BATCH_KEYS:
            if batch[key] is not None:
                torch.distributed.broadcast(
                    batch[key], parallel_state.get_tensor_model_parallel_src_rank(),
                    group=parallel_state.get_tensor_model_parallel_group())
    return [batch.get(key) for key in keys]


def _read_batch(data_iterator, args, device) -> dict:
    if data_iterator is None:
        raise StagError("get_batch: no data iterator on tensor-parallel rank 0 of this "
                        "pipeline stage", "build the datasets with is_built_on_rank="
                        "stag_plugin.integrations.megatron_lm.is_dataset_built_on_rank")
    data = next(data_iterator)
    if data.get("cu_seqlens") is not None:
        raise NotSupported("packed sequences (cu_seqlens, e.g. --sft) are not supported by "
                           "StagGPTModel", "train on unpacked sequences")
    if ("attention_mask" in data) != bool(args.create_attention_mask_in_dataloader):
        raise StagError("the dataset's attention mask does not match "
                        "--create-attention-mask-in-dataloader",
                        "build the datasets from the same args as the training loop")
    return {key: None if data.get(key) is None  # contiguous: broadcast sends the storage
            else data[key].to(device=device, dtype=_DTYPES[key], non_blocking=True).contiguous()
            for key in BATCH_KEYS}


def _empty_batch(args, device) -> dict:
    """Receive buffers on the other tensor-parallel ranks."""
    shape = (args.micro_batch_size, args.seq_length)
    batch = {key: torch.empty(shape, dtype=_DTYPES[key], device=device) for key in BATCH_KEYS}
    batch["attention_mask"] = (
        torch.empty((shape[0], 1, shape[1], shape[1]), dtype=torch.bool, device=device)
        if args.create_attention_mask_in_dataloader else None)
    return batch
