"""StagGPTModel for Megatron-LM's model-building paths (up to 0.18: a `model_provider`).

    model_provider              the `model_provider` pretrain() / get_model call: a StagGPTModel
    model_provider_or           StagGPTModel when the args ask for one, else a fallback provider
    install_replica_grad_sync   pipeline-replica gradients summed in Megatron-LM's train()
    get_embedding_ranks         pretrain()'s `get_embedding_ranks` for a StagFormer
    embedding_ranks_or          the same, else a fallback (pretrain_gpt's)

Megatron-LM 0.19's model-config path (a ModelConfig and its builder) is in `model_config`.
"""

from __future__ import annotations

from typing import Callable, List, Optional

from stag_plugin.core.config import StagFormerConfig
from stag_plugin.core.model import StagGPTModel
from stag_plugin.errors import NotSupported
from stag_plugin.integrations.megatron_lm.config import (
    check_boundary_shapes,
    check_loaded_stag_options,
    check_megatron_lm_args,
    stag_config_from_megatron_args,
    uses_stag_model,
)
from stag_plugin.parallel.pipeline import with_replica_sync


def model_provider(pre_process: bool = True, post_process: bool = True,
                   vp_stage: Optional[int] = None, config=None, pg_collection=None,
                   **unused) -> StagGPTModel:
    """Build this pipeline stage's StagGPTModel from Megatron-LM's global args.

    The signature of Megatron-LM 0.16's `model_provider` as `get_model` calls it; later keyword
    arguments are accepted and ignored. `config` is used when it is a StagFormerConfig, else
    built from the args. `pg_collection` is ignored: StagGPTModel uses Megatron's global
    parallel_state groups, which is what pretrain() passes by default.
    """
    refuse_virtual_stage(vp_stage)
    from megatron.training import get_args

    args = get_args()
    check_megatron_lm_args(args)
    check_loaded_stag_options(args)
    if not isinstance(config, StagFormerConfig):
        config = stag_config_from_megatron_args(args)
    return build_stage(config, args.padded_vocab_size, args.max_position_embeddings,
                       pre_process, post_process,
                       tied=not args.untie_embeddings_and_output_weights)


def build_stage(config: StagFormerConfig, vocab_size: int, max_sequence_length: int,
                pre_process: bool, post_process: bool, tied: bool,
                parallel_output: bool = True) -> StagGPTModel:
    """This pipeline stage's StagGPTModel, as Megatron-LM's training loop needs it: one tensor
    per stage boundary, the replica-gradient sum installed, `vp_stage` set (pretrain_gpt's
    forward_step looks it up on the model, as on GPTModel)."""
    from megatron.training import print_rank_0

    check_boundary_shapes(config)
    install_replica_grad_sync()
    print_rank_0(f"building StagGPTModel ({config.num_sections} sections, "
                 f"{config.weight_sharing} weights) ...")
    model = StagGPTModel(config=config, vocab_size=vocab_size,
                         max_sequence_length=max_sequence_length, pre_process=pre_process,
                         post_process=post_process, share_embeddings_and_output_weights=tied,
                         parallel_output=parallel_output)
    model.vp_stage = None
    return model


def refuse_virtual_stage(vp_stage: Optional[int]) -> None:
    if vp_stage is not None:
        raise NotSupported(
            f"vp_stage={vp_stage}: StagGPTModel does not support the interleaved (virtual) "
            "pipeline schedule", "drop --num-layers-per-virtual-pipeline-stage")


def install_replica_grad_sync() -> None:
    """Megatron-LM's train() installs `megatron.training.training.finalize_model_grads` as the
    model config's finalize_model_grads_func; wrap that function (once, explicitly) so that the
    gradients of pipeline replicas are summed after Megatron's own finalisation
    (stag_plugin.parallel.pipeline). A no-op for layouts without replicas."""
    from megatron.training import training

    training.finalize_model_grads = with_replica_sync(training.finalize_model_grads)


def model_provider_or(fallback: Callable) -> Callable:
    """A model_provider building a StagGPTModel when --stag-num-sections > 1, else calling
    `fallback` (e.g. pretrain_gpt's `partial(model_provider, gpt_builder)`). Decided when
    called, since pretrain() parses the command line after the providers are passed."""

    def provider(*args, **kwargs):
        from megatron.training import get_args

        chosen = model_provider if uses_stag_model(get_args()) else fallback
        return chosen(*args, **kwargs)

    return provider


def get_embedding_ranks(pp_ranks: List[int]) -> List[int]:
    """Ranks of Megatron's embedding group for a StagFormer: the first stage alone.

    Megatron's group ties the first stage's word embeddings to the last stage's head by summing
    their gradients. A StagFormer holds word embeddings on every stage that starts a section
    and keeps those copies equal itself (pipeline replicas, stag_plugin.parallel.pipeline), so
    Megatron's group must not sum them a second time."""
    return [pp_ranks[0]]


def embedding_ranks_or(fallback: Callable) -> Callable:
    """`get_embedding_ranks` for pretrain(): the StagFormer's when --stag-num-sections > 1,
    else `fallback` (e.g. pretrain_gpt's own)."""

    def ranks(pp_ranks: List[int]) -> List[int]:
        from megatron.training import get_args

        return (get_embedding_ranks if uses_stag_model(get_args()) else fallback)(pp_ranks)

    return ranks
