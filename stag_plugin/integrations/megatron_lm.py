"""StagFormer behind Megatron-LM's own training entry (`megatron.training.pretrain`).

For users who launch Megatron-LM scripts. Megatron-LM is not a pip package: put a checkout on
PYTHONPATH (see examples/megatron_lm/README.md). Nothing here imports `megatron.training` until
a function that needs it is called, so this module imports without a checkout.

    add_stag_args                   the --stag-* flags; Megatron-LM's `extra_args_provider`
    chain_args_providers            several extra_args_providers as one
    stag_config_from_megatron_args  Megatron-LM's parsed args -> StagFormerConfig
    model_provider                  the `model_provider` pretrain() calls: a StagGPTModel
    check_megatron_lm_args, check_boundary_shapes   what model_provider refuses, and why
    install_replica_grad_sync       pipeline-replica gradients summed in Megatron-LM's train()
    model_provider_or               StagGPTModel when --stag-num-sections > 1, else a fallback
    is_dataset_built_on_rank        datasets on TP-rank 0 of *every* pipeline stage
    get_batch                       the whole micro-batch on every pipeline stage
    run_pretrain                    pretrain() under either API (positional <= 0.17, config >= 0.18)

Why every stage gets the batch: Megatron-LM's pretrain_gpt gives token and position ids to the
first pipeline stage and labels to the last only. A StagFormer stage that starts a section
re-embeds the token ids (docs/design.md), so every stage reads the batch.
"""

from __future__ import annotations

import argparse
import re
from typing import Callable, Optional

import torch
from megatron.core import parallel_state  # noqa: E402

from stag_plugin.compat import megatron as compat
from stag_plugin.core.config import StagFormerConfig
from stag_plugin.core.model import StagGPTModel
from stag_plugin.errors import NotSupported, StagError
from stag_plugin.parallel.layout import pipeline_stages
from stag_plugin.parallel.pipeline import with_replica_sync
from stag_plugin.training.arguments import STAG_FLAGS, _dest, add_stag_args

__all__ = [
    "add_stag_args", "chain_args_providers", "stag_config_from_megatron_args", "uses_stag_model",
    "model_provider", "model_provider_or", "install_replica_grad_sync", "check_megatron_lm_args",
    "check_boundary_shapes",
    "is_dataset_built_on_rank", "get_batch", "run_pretrain", "pretrain_config_container",
    "BATCH_KEYS",
]

# Megatron-LM flag of a StagFormerConfig field, where it is not "--" + field with dashes.
_FLAG_OF_FIELD = {field: flag for flag, field, _ in STAG_FLAGS} | {
    "num_moe_experts": "--num-experts", "layernorm_epsilon": "--norm-epsilon",
    "gated_linear_unit": "--swiglu", "add_bias_linear": "--disable-bias-linear",
}

# Megatron-LM options StagGPTModel cannot honour: (args attribute, what to do instead).
_UNSUPPORTED_ARGS = (
    ("use_legacy_models", "drop --use-legacy-models (StagGPTModel is a Megatron-Core model)"),
    ("spec", "drop --spec: StagGPTModel builds its own layer specs (stag_plugin.core.specs)"),
    ("multi_latent_attention", "drop --multi-latent-attention (MLA is not supported)"),
    ("heterogeneous_layers_config_path", "drop --heterogeneous-layers-config-path"),
    ("mtp_num_layers", "drop --mtp-num-layers (multi-token prediction is not supported)"),
    ("decoder_first_pipeline_num_layers", "drop it: the plugin splits layers evenly"),
    ("decoder_last_pipeline_num_layers", "drop it: the plugin splits layers evenly"),
    ("pipeline_model_parallel_layout", "drop it: stag_plugin.parallel.layout decides"),
    ("account_for_embedding_in_pipeline_split", "drop it: the plugin splits layers evenly"),
    ("account_for_loss_in_pipeline_split", "drop it: the plugin splits layers evenly"),
)


def chain_args_providers(*providers: Optional[Callable]) -> Callable:
    """One `extra_args_provider` calling each given provider (None entries are skipped)."""

    def provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        for add in providers:
            if add is not None:
                parser = add(parser) or parser
        return parser

    return provider


def uses_stag_model(args) -> bool:
    """Whether Megatron-LM's parsed args ask for a StagFormer (--stag-num-sections > 1)."""
    return getattr(args, "stag_num_sections", 1) > 1


# ------------------------------------------------------------------ config and model


def stag_config_from_megatron_args(args) -> StagFormerConfig:
    """The StagFormerConfig of a Megatron-LM args namespace (parsed with `add_stag_args`).

    Megatron-LM's `core_transformer_config_from_args` fills every TransformerConfig field from
    the args of the same name; the --stag-* values (dests `stag_num_sections`, ...) are put
    under their config field names first. Two settings are the plugin's, not the flags': its
    norms are torch's (stag_plugin.core.specs), so apex's persistent LayerNorm kernel (Megatron-LM's
    default unless --no-persist-layer-norm) is off; without CUDA, weights are initialised on
    the CPU. Raises ValueError naming the Megatron-LM flag of a rejected value.
    """
    from megatron.training.arguments import core_transformer_config_from_args

    missing = [_dest(flag) for flag, _, _ in STAG_FLAGS if not hasattr(args, _dest(flag))]
    if missing:
        raise StagError(f"args lack the StagFormer flags {missing}", "parse with "
                         "extra_args_provider=stag_plugin.integrations.megatron_lm.add_stag_args")
    view = argparse.Namespace(**vars(args))  # Megatron-LM's args stay untouched
    for flag, field, _ in STAG_FLAGS:
        setattr(view, field, getattr(args, _dest(flag)))
    view.no_persist_layer_norm = True
    if not torch.cuda.is_available():
        view.use_cpu_initialization = True
    try:
        return core_transformer_config_from_args(view, config_class=StagFormerConfig)
    except ValueError as err:
        field = re.match(r"StagFormerConfig\.(\w+)=", str(err))
        if not field:
            raise
        flag = _FLAG_OF_FIELD.get(field.group(1), "--" + field.group(1).replace("_", "-"))
        raise ValueError(f"{flag}: {err}") from err


def check_megatron_lm_args(args) -> None:
    """Refuse Megatron-LM options StagGPTModel cannot honour, naming the flag."""
    if getattr(args, "virtual_pipeline_model_parallel_size", None) is not None:
        raise NotSupported(
            "StagGPTModel does not support the interleaved (virtual) pipeline schedule",
            "drop --num-layers-per-virtual-pipeline-stage / --num-virtual-stages-per-pipeline-"
            "rank; --pipeline-model-parallel-size alone is supported")
    for name, fix in _UNSUPPORTED_ARGS:
        if getattr(args, name, None):
            raise NotSupported(f"StagGPTModel does not support --{name.replace('_', '-')}"
                               f"={getattr(args, name)!r}", fix)


def check_boundary_shapes(config: StagFormerConfig) -> None:
    """Refuse pipeline layouts whose stage boundaries carry more than one stream.

    Megatron-LM's train_step and evaluate give the pipeline schedule no `adjust_tensor_shapes_fn`,
    so every stage boundary must carry one [s, b, h] tensor. A boundary inside a later section
    (hidden + memory) or after a section with the learned output combination (memory +
    combined) carries two or three (stag_plugin.parallel.layout).
    """
    stages = pipeline_stages(config.num_sections, config.layers_per_section,
                             config.pipeline_model_parallel_size,
                             config.output_combination == "learned")
    wide = [(st.index, st.sends) for st in stages if len(st.sends) > 1]
    if wide:
        index, streams = wide[0]
        raise NotSupported(
            f"pipeline stage {index} would send {len(streams)} streams {streams} to the next "
            "stage, but Megatron-LM's training loop sends one [s, b, h] tensor per boundary",
            "use a --pipeline-model-parallel-size that divides --stag-num-sections "
            f"({config.num_sections} puts one section on each stage) with "
            "--stag-output-combination last, or train with `stag train`")


def model_provider(pre_process: bool = True, post_process: bool = True,
                   vp_stage: Optional[int] = None, config=None, pg_collection=None,
                   **unused) -> StagGPTModel:
    """Build this pipeline stage's StagGPTModel from Megatron-LM's global args.

    The signature of Megatron-LM 0.16's `model_provider` as `get_model` calls it; later keyword
    arguments are accepted and ignored. `config` is used when it is a StagFormerConfig, else
    built from the args. `pg_collection` is ignored: StagGPTModel uses Megatron's global
    parallel_state groups, which is what pretrain() passes by default.
    """
    if vp_stage is not None:
        raise NotSupported(
            f"model_provider(vp_stage={vp_stage}): StagGPTModel does not support the interleaved "
            "(virtual) pipeline schedule", "drop --num-layers-per-virtual-pipeline-stage")
    from megatron.training import get_args, print_rank_0

    args = get_args()
    check_megatron_lm_args(args)
    if not isinstance(config, StagFormerConfig):
        config = stag_config_from_megatron_args(args)
    check_boundary_shapes(config)
    install_replica_grad_sync()
    print_rank_0(f"building StagGPTModel ({config.num_sections} sections, "
                 f"{config.weight_sharing} weights) ...")
    model = StagGPTModel(
        config=config,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        parallel_output=True,
    )
    model.vp_stage = None  # pretrain_gpt's forward_step looks it up on the model, as on GPTModel
    return model


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


# ------------------------------------------------------------------ data


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
    return tuple(batch[key] for key in BATCH_KEYS)


def _read_batch(data_iterator, args, device) -> dict:
    if data_iterator is None:
        raise StagError("get_batch: no data iterator on tensor-parallel rank 0 of this "
                        "pipeline stage", "build the datasets with "
                           "is_built_on_rank=stag_plugin.integrations.megatron_lm.is_dataset_built_on_rank")
    data = next(data_iterator)
    if data.get("cu_seqlens") is not None:
        raise NotImplementedError("packed sequences (cu_seqlens, e.g. --sft) are not supported "
                                  "by StagGPTModel")
    if ("attention_mask" in data) != bool(args.create_attention_mask_in_dataloader):
        raise ValueError("the dataset's attention mask does not match "
                         "--create-attention-mask-in-dataloader")
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


# ------------------------------------------------------------------ entry


def run_pretrain(train_valid_test_dataset_provider: Callable, model_provider: Callable,
                 forward_step_func: Callable, *, extra_args_provider: Optional[Callable] = None,
                 args_defaults: Optional[dict] = None, pretrain: Optional[Callable] = None,
                 **pretrain_kwargs):
    """Call Megatron-LM's `pretrain()` with these providers, under either of its APIs.

    extra_args_provider defaults to `add_stag_args`. `pretrain` defaults to
    `megatron.training.pretrain`; the API is told by `megatron_compat.megatron_lm_pretrain_api`.
    With the config API (>= 0.18) the command line is parsed here and the container's model
    config left empty, so Megatron-LM builds the model through `model_provider`.
    """
    from megatron.core.enums import ModelType

    if pretrain is None:
        from megatron.training import pretrain
    extra_args_provider = extra_args_provider or add_stag_args
    providers = dict(train_valid_test_dataset_provider=train_valid_test_dataset_provider,
                     model_provider=model_provider, model_type=ModelType.encoder_or_decoder,
                     forward_step_func=forward_step_func, **pretrain_kwargs)
    if compat.megatron_lm_pretrain_api(pretrain) == "positional":
        return pretrain(extra_args_provider=extra_args_provider,
                        args_defaults=args_defaults or {}, **providers)
    container = pretrain_config_container(extra_args_provider, args_defaults or {})
    return pretrain(cfg_container=container, **providers)


def pretrain_config_container(extra_args_provider: Callable, args_defaults: dict):
    """Megatron-LM >= 0.18: parse and validate the command line (this sets the global args)
    and build the PretrainConfigContainer, with no model config (model_provider builds it)."""
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(extra_args_provider=extra_args_provider,
                                   args_defaults=args_defaults)
    return pretrain_cfg_container_from_args(args)
