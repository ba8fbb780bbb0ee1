"""StagFormer behind Megatron-LM's own training entry (`megatron.training.pretrain`), 0.16 - 0.19.

For users who launch Megatron-LM scripts: `examples/megatron_lm/pretrain_stag.py` (an entry that
needs no patch) or their own pretrain_gpt.py with the patch of its release (`patches/`).
Megatron-LM's training code comes from a checkout on PYTHONPATH (or, from 0.19, with the
megatron-core package). Nothing here imports `megatron.training` until a function that needs it
is called, so this package imports without it.

    config        --stag-* flags for Megatron-LM's parser; its args -> StagFormerConfig; what
                  StagGPTModel refuses (add_stag_args, add_stag_args_opt_in,
                  chain_args_providers, uses_stag_model, stag_config_from_megatron_args,
                  check_megatron_lm_args, check_boundary_shapes)
    model         the `model_provider` path, 0.16 - 0.18 (model_provider, model_provider_or,
                  install_replica_grad_sync, get_embedding_ranks, embedding_ranks_or)
    model_config  the model-config path, 0.19+ (StagGPTModelConfig, StagGPTModelBuilder,
                  stag_model_config)
    data          the whole batch on every pipeline stage (get_batch, whole_batch,
                  is_dataset_built_on_rank)
    entry         pretrain() under each calling convention (run_pretrain,
                  pretrain_config_container)
"""

from stag_plugin.integrations.megatron_lm.config import (
    add_stag_args,
    add_stag_args_opt_in,
    chain_args_providers,
    check_boundary_shapes,
    check_megatron_lm_args,
    stag_config_from_megatron_args,
    uses_stag_model,
)
from stag_plugin.integrations.megatron_lm.data import (
    BATCH_KEYS,
    get_batch,
    is_dataset_built_on_rank,
    whole_batch,
)
from stag_plugin.integrations.megatron_lm.entry import pretrain_config_container, run_pretrain
from stag_plugin.integrations.megatron_lm.model import (
    embedding_ranks_or,
    get_embedding_ranks,
    install_replica_grad_sync,
    model_provider,
    model_provider_or,
)

_MODEL_CONFIG = ("StagGPTModelConfig", "StagGPTModelBuilder", "stag_model_config")

__all__ = [
    "add_stag_args", "add_stag_args_opt_in", "chain_args_providers", "uses_stag_model",
    "stag_config_from_megatron_args", "check_megatron_lm_args", "check_boundary_shapes",
    "model_provider", "model_provider_or", "install_replica_grad_sync", "get_embedding_ranks",
    "embedding_ranks_or", "is_dataset_built_on_rank", "get_batch", "whole_batch", "BATCH_KEYS",
    "run_pretrain", "pretrain_config_container", *_MODEL_CONFIG,
]


def __getattr__(name):
    """The 0.19 model-config names, imported on first use (they need megatron.training.models)."""
    if name not in _MODEL_CONFIG:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from stag_plugin.integrations.megatron_lm import model_config

    return getattr(model_config, name)
