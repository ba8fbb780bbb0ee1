"""The plain GPT that `stag convert from-gpt` upcycles, read as a p = 1 StagGPTModel.

Two kinds of source, told apart by the run record:

    stag train --stag-num-sections 1     stag_run.json + tokenizer.model; keys as StagGPTModel's
    Megatron-LM GPTModel                 no stag_run.json; args in the common state; GPTModel keys

Megatron-LM's GPTModel keys map onto the p = 1 StagGPTModel keys by the tables below.
Megatron's TransformerBlock saves its (homogeneous) layers STACKED: one key
`decoder.layers.<module>.<param>` holding all L layers along a leading dimension [L, ...]; a
checkpoint saved with per-layer keys (`decoder.layers.{i}.<module>.<param>`) is read as well.
The pre-attention and pre-MLP norms are saved under the names of the Transformer Engine spec,
which fuses them into the next linear layer (`linear_qkv.layer_norm_weight`,
`linear_fc1.layer_norm_weight`), by Megatron's local spec too (its
`sharded_state_dict_keys_map`); both map onto StagGPTModel's separate norms.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from stag_plugin.convert import source
from stag_plugin.convert.common import ConvertError
from stag_plugin.training import checkpointing, runtime

GPT_KEYS = {  # Megatron-LM GPTModel -> StagGPTModel with one section
    "embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "embedding.position_embeddings.weight": "embedding.position_embeddings.weight",
    "output_layer.weight": "output_layer.weight",
    "decoder.final_layernorm.weight": "sections.0.final_layernorm.weight",
    "decoder.final_layernorm.bias": "sections.0.final_layernorm.bias",
}
GPT_LAYERS = ("decoder.layers.", "sections.0.layers.{i}.")  # + "<module>.<param>"
TE_FUSED_NORMS = {  # Transformer Engine layer spec -> local spec, within a layer
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
_PER_LAYER_RE = re.compile(r"^(\d+)\.(.+)$")

# Megatron-LM args -> stag train flags. Same name and meaning unless derived below.
MEGATRON_LM_ARGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "group_query_attention", "num_query_groups", "kv_channels", "seq_length",
    "max_position_embeddings", "position_embedding_type", "rotary_base", "rotary_percent",
    "normalization", "norm_epsilon", "swiglu", "qk_layernorm",
    "untie_embeddings_and_output_weights", "init_method_std", "hidden_dropout",
    "attention_dropout", "bf16",
)
MEGATRON_LM_REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")
DERIVED_ARGS = {
    "disable_bias_linear": lambda margs: not getattr(margs, "add_bias_linear", True),
    # Megatron-LM pads the vocabulary to a multiple of make_vocab_size_divisible_by x its TP
    # size; the trainer pads by its own TP size (1 here), so the multiple is carried over.
    "make_vocab_size_divisible_by": lambda margs: getattr(
        margs, "make_vocab_size_divisible_by", 128) * getattr(
        margs, "tensor_model_parallel_size", 1),
}
UNSUPPORTED_ARGS = {  # Megatron-LM arg -> the only value the plugin's model implements
    "add_qkv_bias": False, "apply_layernorm_1p": False, "rotary_interleaved": False,
    "num_experts": None, "multi_latent_attention": False, "fp16": False,
    "apply_residual_connection_post_layernorm": False, "squared_relu": False,
    "openai_gelu": False, "onnx_safe": None, "use_rope_scaling": False,
}


@dataclass
class GPTSource:
    """A plain GPT as the p = 1 StagGPTModel it is equivalent to."""

    kind: str  # "stag" (stag train, p = 1) or "megatron-lm"
    ckpt: source.Checkpoint
    args: argparse.Namespace  # stag train flags describing it (p = 1)
    reference_cfg: object  # its ReferenceConfig (p = 1)
    state: Dict[str, torch.Tensor]  # StagGPTModel owner keys, whole tensors
    tokenizer_model: Path
    tokenizer: dict  # {"vocab_size": ..., "eod": ...}

    @property
    def num_layers(self) -> int:
        return self.args.num_layers


def read_gpt(ckpt: source.Checkpoint, tokenizer_model: Optional[Path],
             progress: bool = True, trust_code: bool = False) -> GPTSource:
    """The GPT in `ckpt`, of either kind, checked (keys, shapes, dtypes) and read whole."""
    if (ckpt.folder / checkpointing.RUN_FILE).is_file():
        if tokenizer_model is not None:
            raise ConvertError(f"--tokenizer-model is for Megatron-LM sources; {ckpt.folder} "
                               "carries its own tokenizer.model", "drop --tokenizer-model")
        return read_stag_gpt(ckpt, progress)
    return read_megatron_lm_gpt(ckpt, tokenizer_model, progress, trust_code)


# ---------------------------------------------------------------------------- stag train p = 1


def read_stag_gpt(ckpt: source.Checkpoint, progress: bool) -> GPTSource:
    from stag_plugin.convert import to_inference

    record = source.read_record(ckpt)
    args = runtime.saved_args(record)
    source.check_record(record, args, ckpt.folder)
    if args.stag_num_sections != 1:
        raise ConvertError(f"{ckpt.folder} is a StagFormer with {args.stag_num_sections} "
                           "sections, not a plain GPT (p = 1)",
                           "upcycle a checkpoint trained with --stag-num-sections 1, or a "
                           "Megatron-LM GPT checkpoint")
    cfg = to_inference.reference_config(args, record)
    state = to_inference.read_model(ckpt, cfg, source.params_dtype(args), progress)
    if ckpt.tokenizer_model is None:
        raise ConvertError(f"{ckpt.folder} has no tokenizer.model",
                           "upcycle a checkpoint saved by stag train (it stores its tokenizer)")
    return GPTSource("stag", ckpt, args, cfg, state, ckpt.tokenizer_model, record["tokenizer"])


# ---------------------------------------------------------------------------- Megatron-LM GPT


def read_megatron_lm_gpt(ckpt: source.Checkpoint, tokenizer_model: Optional[Path],
                         progress: bool, trust_code: bool = False) -> GPTSource:
    from stag_plugin.convert import to_inference
    from stag_plugin.reference import name_map

    margs = source.read_common(ckpt.folder, trusted=trust_code).get("args")
    if margs is None:
        raise ConvertError(f"{ckpt.folder} has neither a stag_run.json nor Megatron-LM's args "
                           "(the common state's 'args'), so the model's configuration is unknown",
                           "pass a checkpoint written by stag train or by Megatron-LM")
    tokenizer, tokenizer_info = _tokenizer(tokenizer_model, ckpt)
    args = args_from_megatron_lm(margs, tokenizer_info["vocab_size"])
    record = {"architecture": {"padded_vocab_size": margs.padded_vocab_size}}
    cfg = to_inference.reference_config(args, record)
    index = source.model_tensors(source.tensor_index(ckpt.folder))
    entries = stag_entries(index, args.num_layers, ckpt.folder)
    source.check_tensors({k: (shape, dtype) for k, (_, _, shape, dtype) in entries.items()},
                         name_map.megatron_shapes(cfg), source.params_dtype(args), ckpt.folder,
                         "pass the Megatron-LM checkpoint as it was saved: the args in its "
                         "common state must describe these tensors")
    whole = source.read_tensors(ckpt.folder, index, sorted({g for g, *_ in entries.values()}),
                                progress)
    state = {key: whole[gpt_key] if layer is None else whole[gpt_key][layer].clone()
             for key, (gpt_key, layer, _, _) in entries.items()}  # [L, ...] -> layer's [...]
    return GPTSource("megatron-lm", ckpt, args, cfg, state, tokenizer, tokenizer_info)


def stag_entries(index: source.TensorIndex, num_layers: int, where: Path) -> Dict[str, Tuple]:
    """StagGPTModel key -> (GPTModel key, layer within a stacked tensor or None, shape, dtype).
    Keys the tables do not know are kept under their own name (reported as unexpected)."""
    prefix = GPT_LAYERS[0]
    entries: Dict[str, Tuple] = {}
    for key, (shape, dtype) in index.items():
        if key in GPT_KEYS:
            found = {GPT_KEYS[key]: (key, None, shape, dtype)}
        elif key.startswith(prefix):
            found = _layer_entries(key, key[len(prefix):], shape, dtype, num_layers, where)
        else:
            found = {key: (key, None, shape, dtype)}
        for stag_key in found:
            if stag_key in entries:
                raise ConvertError(f"{where}: {key} and {entries[stag_key][0]} both hold "
                                   f"{stag_key}", "pass a checkpoint of one layer spec")
        entries.update(found)
    return entries


def _layer_entries(key, rest, shape, dtype, num_layers, where) -> Dict[str, Tuple]:
    template = GPT_LAYERS[1]
    per_layer = _PER_LAYER_RE.match(rest)
    if per_layer:  # decoder.layers.{i}.<module>.<param>
        module = TE_FUSED_NORMS.get(per_layer.group(2), per_layer.group(2))
        return {template.format(i=per_layer.group(1)) + module: (key, None, shape, dtype)}
    if not shape or shape[0] != num_layers:  # stacked: [L, ...]
        raise ConvertError(f"{where}: {key} stacks {shape[0] if shape else 0} layers, but the "
                           f"checkpoint's args say num_layers={num_layers}",
                           "pass the checkpoint as it was saved, with its own common state")
    module = TE_FUSED_NORMS.get(rest, rest)
    return {template.format(i=i) + module: (key, i, tuple(shape[1:]), dtype)
            for i in range(num_layers)}


def args_from_megatron_lm(margs, vocab_size: int) -> argparse.Namespace:
    """stag train flags describing a Megatron-LM GPT (trainer defaults for the rest)."""
    from stag_plugin.training import arguments

    missing = [name for name in MEGATRON_LM_REQUIRED if getattr(margs, name, None) is None]
    if missing:
        raise ConvertError(f"Megatron-LM's args in the common state lack {missing}",
                           "pass a checkpoint written by Megatron-LM's training loop")
    unsupported = [f"{name}={getattr(margs, name)!r}" for name, value in UNSUPPORTED_ARGS.items()
                   if getattr(margs, name, value) not in (value, None)]
    if unsupported:
        raise ConvertError(f"the Megatron-LM model uses {', '.join(unsupported)}, which "
                           "StagGPTModel does not implement", "upcycle a GPT without them")
    args = runtime.default_args()
    for name in MEGATRON_LM_ARGS:
        if getattr(margs, name, None) is not None:
            setattr(args, name, getattr(margs, name))
    for name, derive in DERIVED_ARGS.items():
        setattr(args, name, derive(margs))
    args.stag_num_sections, args.vocab_size = 1, vocab_size
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    return arguments.finalize_args(args)  # derived defaults, as stag train fills them


def _tokenizer(path: Optional[Path], ckpt: source.Checkpoint) -> Tuple[Path, dict]:
    from stag_plugin.training.data import StagTokenizer

    if path is None:
        raise ConvertError(f"{ckpt.folder} is a Megatron-LM checkpoint without a tokenizer of "
                           "this plugin", "pass --tokenizer-model PATH (the SentencePiece model "
                           "whose ids the GPT was trained on)")
    tokenizer = StagTokenizer.load(path)  # DataError (a ValueError) names the fix
    return Path(path), {"vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod}
