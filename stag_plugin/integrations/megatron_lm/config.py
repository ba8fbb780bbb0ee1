"""Megatron-LM's parsed args -> StagFormerConfig, and what StagGPTModel refuses of them.

    add_stag_args                   the --stag-* flags (--stag-num-sections defaults to 2)
    add_stag_args_opt_in            the same flags with --stag-num-sections defaulting to 1, so
                                    a script that also trains GPTs stays a GPT without them
    chain_args_providers            several extra_args_providers as one
    uses_stag_model                 whether the args ask for a StagFormer
    stag_config_from_megatron_args  Megatron-LM's args -> StagFormerConfig
    check_megatron_lm_args          Megatron-LM options StagGPTModel cannot honour, by flag
    check_loaded_stag_options       --load of a StagFormer trained with other --stag-* options
    check_boundary_shapes           pipeline layouts Megatron-LM's schedule cannot carry
"""

from __future__ import annotations

import argparse
import re
from typing import Callable, Optional

import torch

from stag_plugin.core.config import StagFormerConfig
from stag_plugin.errors import NotSupported, StagError
from stag_plugin.parallel.layout import pipeline_stages
from stag_plugin.training.arguments import (
    STAG_FLAGS,
    STAG_RUN_FIELDS,
    _dest,
    add_stag_args,
    with_unrecorded,
)

# Megatron-LM flag of a StagFormerConfig field, where it is not "--" + field with dashes.
_FLAG_OF_FIELD = {field: flag for flag, field, _ in STAG_FLAGS} | {
    "num_moe_experts": "--num-experts", "layernorm_epsilon": "--norm-epsilon",
    "gated_linear_unit": "--swiglu", "add_bias_linear": "--disable-bias-linear",
}

# Megatron-LM options StagGPTModel cannot honour: (args attribute, what to do instead).
_UNSUPPORTED_ARGS = (
    ("use_legacy_models", "drop --use-legacy-models (StagGPTModel is a Megatron-Core model)"),
    ("spec", "drop --spec: StagGPTModel builds its own layer specs (stag_plugin.core.specs)"),
    ("yaml_cfg", "drop --yaml-cfg: pass the model flags on the command line"),
    ("multi_latent_attention", "drop --multi-latent-attention (MLA is not supported)"),
    ("heterogeneous_layers_config_path", "drop --heterogeneous-layers-config-path"),
    ("mtp_num_layers", "drop --mtp-num-layers (multi-token prediction is not supported)"),
    ("experimental_attention_variant", "drop --experimental-attention-variant"),
    ("sft", "drop --sft: StagGPTModel does not take packed sequences"),
    ("decoder_first_pipeline_num_layers", "drop it: the plugin splits layers evenly"),
    ("decoder_last_pipeline_num_layers", "drop it: the plugin splits layers evenly"),
    ("pipeline_model_parallel_layout", "drop it: stag_plugin.parallel.layout decides"),
    ("account_for_embedding_in_pipeline_split", "drop it: the plugin splits layers evenly"),
    ("account_for_loss_in_pipeline_split", "drop it: the plugin splits layers evenly"),
)


def add_stag_args_opt_in(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`add_stag_args` with --stag-num-sections defaulting to 1 (a plain GPT): for scripts such
    as a patched pretrain_gpt.py, which must train the GPT they trained before unless a
    --stag-* flag asks for a StagFormer."""
    add_stag_args(parser)
    parser.set_defaults(stag_num_sections=1)
    return parser


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
    return (getattr(args, "stag_num_sections", 1) or 1) > 1


def stag_config_from_megatron_args(args) -> StagFormerConfig:
    """The StagFormerConfig of a Megatron-LM args namespace (parsed with `add_stag_args`).

    Megatron-LM's `core_transformer_config_from_args` fills every TransformerConfig field from
    the args of the same name; the --stag-* values (dests `stag_num_sections`, ...) are put
    under their config field names first; so are --transformer-impl (the layers:
    stag_plugin.core.specs), Megatron-LM's FP8 flags and the FP8 attention switches
    (`add_stag_args`). Two settings are the plugin's, not the flags': its local norms are torch's,
    so apex's persistent LayerNorm kernel (Megatron-LM's default unless
    --no-persist-layer-norm) is off; without CUDA, weights are initialised on the CPU. Raises
    ValueError naming the Megatron-LM flag of a rejected value.
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
    impl = getattr(args, "transformer_impl", "local")
    if impl not in (None, "local", "transformer_engine"):
        raise NotSupported(f"--transformer-impl {impl} is not implemented for StagGPTModel",
                           "pass --transformer-impl transformer_engine (Megatron-LM's default) "
                           "or local")
    if impl == "transformer_engine":
        _check_transformer_engine_args(args)


def check_loaded_stag_options(args) -> None:
    """Refuse --load of a StagFormer checkpoint (distributed format) whose stored --stag-*
    options that fix the model differ from this run's, naming each. Megatron-LM compares none of
    them, and its distributed-checkpoint load leaves out tensors the model lacks (e.g. the final
    norms of a model trained with --stag-memory-norm), so it would otherwise resume another
    model. Stored args that predate an option count as the value they were trained with
    (stag_plugin.training.arguments.UNRECORDED)."""
    from stag_plugin.convert import source

    load = getattr(args, "load", None)
    folder = _distributed_checkpoint(load) if load else None
    if folder is None:  # nothing saved, or not in the distributed format: Megatron-LM decides
        return
    stored = source.read_common(folder).get("args")
    if getattr(stored, "stag_num_sections", None) is None:  # not trained as a StagFormer
        return
    saved, mine = _stag_architecture(vars(stored)), _stag_architecture(vars(args))
    diffs = [f"{_flag(dest)} {value!r} (this run: {mine[dest]!r})"
             for dest, value in saved.items() if value != mine[dest]]
    if diffs:
        raise StagError(f"--load {load} holds a StagFormer trained with {'; '.join(diffs)}",
                        "pass the checkpoint's values of these flags")


def _distributed_checkpoint(load: str):
    """The iteration folder Megatron-LM's tracker names under `load`, when it is a distributed
    checkpoint; else None."""
    from pathlib import Path

    from stag_plugin.convert import source
    from stag_plugin.training import checkpointing

    try:
        iteration = checkpointing.latest_iteration(Path(load))
    except checkpointing.CheckpointError:  # e.g. "release"
        return None
    if iteration is None:
        return None
    folder = checkpointing.iteration_dir(Path(load), iteration)
    return folder if (folder / source.INDEX_FILE).is_file() else None


def _stag_architecture(values: dict) -> dict:
    """The --stag-* values (by dest) that fix what a model computes, as a run record's
    architecture holds them (`with_unrecorded`: unrecorded values filled, none for p = 1)."""
    filled = with_unrecorded(values, architecture=True)
    return {_dest(flag): filled.get(_dest(flag)) for flag, field, _ in STAG_FLAGS
            if field not in STAG_RUN_FIELDS}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_transformer_engine_args(args) -> None:
    """What the Transformer Engine layers of StagGPTModel need of Megatron-LM's args."""
    from stag_plugin.compat.megatron import require_transformer_engine

    require_transformer_engine("--transformer-impl transformer_engine (Megatron-LM's default)")
    if getattr(args, "reset_attention_mask", False):
        raise NotSupported("--reset-attention-mask with Transformer Engine layers: their "
                           "attention is causal over the whole sequence and would not read "
                           "the document-boundary mask",
                           "drop --reset-attention-mask, or pass --transformer-impl local")
    if getattr(args, "tp_comm_overlap", False):
        raise NotSupported("--tp-comm-overlap: the cross-attention's projections have no "
                           "userbuffers", "drop --tp-comm-overlap")


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
