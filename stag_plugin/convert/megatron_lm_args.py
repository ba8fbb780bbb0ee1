"""Megatron-LM's stored args (the `args` namespace in a checkpoint's common state) -> the flags
of `stag train` that describe the same model. Declarative: every architecture field Megatron-LM
stores is read under the name Megatron-LM stores it (which is not always its flag's dest:
`--norm-epsilon` is stored as `layernorm_epsilon`, `--apply-layernorm-1p` as
`layernorm_zero_centered_gamma`), and every stored option the plugin's model cannot honour is
refused naming its Megatron-LM flag. Checked against the args Megatron-LM core_v0.16.1 and
core_v0.19.0 save.

    STAG_FLAG_OF_STORED   stag train flag <- Megatron-LM stored arg, same meaning
    DERIVED               stag train flag <- a function of the stored args
    REFUSED               (stored arg, Megatron-LM flag, the value the plugin implements)
    args_from_megatron_lm(margs, vocab_size) -> stag train's argparse.Namespace
"""

from __future__ import annotations

import argparse

from stag_plugin.convert.common import ConvertError
from stag_plugin.training.arguments import STAG_FLAGS, _dest

STAG_FLAG_OF_STORED = {  # stag train dest: Megatron-LM's stored name
    "num_layers": "num_layers", "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size", "num_attention_heads": "num_attention_heads",
    "group_query_attention": "group_query_attention", "num_query_groups": "num_query_groups",
    "kv_channels": "kv_channels", "seq_length": "seq_length",
    "max_position_embeddings": "max_position_embeddings",
    "position_embedding_type": "position_embedding_type", "rotary_base": "rotary_base",
    "rotary_percent": "rotary_percent", "normalization": "normalization",
    "norm_epsilon": "layernorm_epsilon", "swiglu": "swiglu",
    "untie_embeddings_and_output_weights": "untie_embeddings_and_output_weights",
    "init_method_std": "init_method_std", "hidden_dropout": "hidden_dropout",
    "attention_dropout": "attention_dropout", "bf16": "bf16",
    # a StagFormer trained through Megatron-LM (stag_plugin.integrations.megatron_lm): the
    # --stag-* flags, stored under their own dests
    **{_dest(flag): _dest(flag) for flag, _, _ in STAG_FLAGS},
}
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "padded_vocab_size")
DERIVED = {
    "disable_bias_linear": lambda margs: not getattr(margs, "add_bias_linear", True),
    # Megatron-LM pads the vocabulary to a multiple of make_vocab_size_divisible_by x its TP
    # size; the plugin pads by its own TP size (1 after conversion), so the multiple carries.
    "make_vocab_size_divisible_by": lambda margs: getattr(
        margs, "make_vocab_size_divisible_by", 128) * getattr(
        margs, "tensor_model_parallel_size", 1),
}
REFUSED = (  # (stored name, Megatron-LM flag, the only value StagGPTModel implements)
    ("layernorm_zero_centered_gamma", "--apply-layernorm-1p", False),
    ("apply_layernorm_1p", "--apply-layernorm-1p", False),
    ("qk_layernorm", "--qk-layernorm", False),
    ("qk_l2_norm", "--qk-l2-norm", False),
    ("rotary_interleaved", "--rotary-interleaved", False),
    ("use_rope_scaling", "--use-rope-scaling", False),
    ("rotary_seq_len_interpolation_factor", "--rotary-seq-len-interpolation-factor", None),
    ("no_rope_freq", "--no-rope-freq", None),
    ("num_experts", "--num-experts", None),
    ("multi_latent_attention", "--multi-latent-attention", False),
    ("experimental_attention_variant", "--experimental-attention-variant", None),
    ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path", None),
    ("mtp_num_layers", "--mtp-num-layers", None),
    ("window_size", "--window-size", None),
    ("softmax_type", "--softmax-type", "vanilla"),
    ("attention_output_gate", "--attention-output-gate", False),
    ("squared_relu", "--squared-relu", False),
    ("openai_gelu", "--openai-gelu", False),
    ("quick_geglu", "--quick-geglu", False),
    ("onnx_safe", "--onnx-safe", None),
    ("apply_residual_connection_post_layernorm",
     "--apply-residual-connection-post-layernorm", False),
    ("use_mup", "--use-mup", False),
    ("spec", "--spec", None),
    ("use_legacy_models", "--use-legacy-models", False),
    ("fp16", "--fp16", False),
)
SUPPORTED_POSITIONS = ("rope", "learned_absolute", "none")


def refused(margs) -> list:
    """`--flag=value` for every stored option the plugin's model cannot honour."""
    found = [f"{flag}={getattr(margs, name)!r}" for name, flag, value in REFUSED
             if not _honoured(getattr(margs, name, None), value)]
    if getattr(margs, "add_qkv_bias", False) and not getattr(margs, "add_bias_linear", True):
        found.append("--add-qkv-bias=True (with --disable-bias-linear)")
    position = getattr(margs, "position_embedding_type", "learned_absolute")
    if position not in SUPPORTED_POSITIONS:
        found.append(f"--position-embedding-type={position!r}")
    return sorted(set(found))


def _honoured(stored, implemented) -> bool:
    """An absent (None) option is the default; an off switch may be stored as None or False."""
    if stored is None:
        return True
    if implemented in (None, False):
        return not stored
    return stored == implemented


def args_from_megatron_lm(margs, vocab_size: int, where) -> argparse.Namespace:
    """stag train flags describing the model Megatron-LM's args `margs` describe (the plugin's
    defaults for everything else). `vocab_size`: the tokenizer's. A GPT (no --stag-* args)
    becomes --stag-num-sections 1."""
    from stag_plugin.training import arguments, runtime

    missing = [name for name in REQUIRED if getattr(margs, name, None) is None]
    if missing:
        raise ConvertError(f"Megatron-LM's args in the common state of {where} lack {missing}",
                           "pass a checkpoint written by Megatron-LM's training loop")
    bad = refused(margs)
    if bad:
        raise ConvertError(f"the Megatron-LM model in {where} was trained with "
                           f"{', '.join(bad)}, which StagGPTModel does not implement",
                           "convert a model trained without these options")
    args = runtime.default_args()
    args.stag_num_sections = 1
    args.transformer_impl = "local"  # built here from local layers: the tensors are the same
    if getattr(margs, "stag_num_sections", None) is not None:  # a StagFormer's stored args
        vars(args).update(arguments.with_unrecorded({}))
    for flag, stored in STAG_FLAG_OF_STORED.items():
        if getattr(margs, stored, None) is not None:
            setattr(args, flag, getattr(margs, stored))
    for flag, derive in DERIVED.items():
        setattr(args, flag, derive(margs))
    args.vocab_size = vocab_size
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    return arguments.finalize_args(args)  # derived defaults, as stag train fills them
