"""Command-line flags of `stag train` / `stag eval` / `stag demo`, and their one mapping onto
`StagFormerConfig`.

Every flag `stag train` shares with Megatron-LM has Megatron-LM's name, meaning and default
(`--num-layers`, `--lr`, `--hidden-dropout 0.1`, `--lr-decay-style linear`, ...; a flag
Megatron-LM requires is required here too, see `check_trainable`). A Megatron-LM flag
`stag train` does not implement is refused naming the Megatron-LM entry, which takes them all
(`megatron_lm_flags`). StagFormer's own options are the `--stag-*` flags, declared once in
`STAG_FLAGS` next to the config field each one sets; `add_stag_args(parser)` adds just those to
any argparse parser (e.g. Megatron-LM's, as an `extra_args_provider`). A YAML preset
(`--config configs/tiny_cpu.yaml`) sets defaults by flag name (`num_layers: 4`); flags on the
command line override it.

`finalize_args(args)` fills derived values as Megatron-LM's validate_args does,
`config_from_args(args)` is the only place where flag values become a `StagFormerConfig`, and
`architecture_of(args)` the only definition of which flags fix a checkpoint's shapes.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from stag_plugin.errors import NotSupported, StagError


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


STAG_FLAGS = (
    # (flag, StagFormerConfig field, argparse kwargs)
    ("--stag-num-sections", "num_sections", dict(
        type=int, default=2, help="p: number of time-staggered sections (1 = plain GPT)")),
    ("--stag-weight-sharing", "weight_sharing", dict(
        choices=("separate", "shared"), default="separate",
        help="separate layers per section, or one shared stack")),
    ("--stag-cross-attention-window", "cross_attention_window", dict(
        type=int, default=None, help="memory slots each query sees (default: all earlier)")),
    ("--stag-output-combination", "output_combination", dict(
        choices=("last", "learned"), default="last",
        help="head reads the last section, or a learned sum of all sections")),
    ("--stag-cross-attention-rope", "cross_attention_rope", dict(
        action=argparse.BooleanOptionalAction, default=True,
        help="RoPE in cross-attention (memory slots at their token positions)")),
    ("--stag-memory-norm", "memory_norm", dict(
        action=argparse.BooleanOptionalAction, default=False,
        help="every section ends in a final norm and the next section's memory is that "
             "normalised output (default: the memory is the section's output before any norm; "
             "only the last section has a final norm); see docs/quality.md")),
    ("--stag-cross-attention-zero-init", "cross_attention_zero_init", dict(
        action=argparse.BooleanOptionalAction, default=False,
        help="start every cross-attention output projection at zero (initialisation only)")),
    ("--stag-fp8-attention-fallback", "fp8_attention_fallback", dict(
        choices=("bf16", "error"), default="bf16",
        help="with FP8 attention, an attention Transformer Engine has no FP8 kernel for (see "
             "docs/transformer_engine.md): run it in bf16 (saying so once), or refuse")),
)
# --stag-* flags that leave a checkpoint's shapes and function alone
STAG_RUN_FIELDS = ("fp8_attention_fallback", "cross_attention_zero_init")

# Flags whose values fix the parameter shapes or the function a checkpoint computes.
ARCHITECTURE_FLAGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "group_query_attention", "num_query_groups", "kv_channels", "normalization", "norm_epsilon",
    "swiglu", "disable_bias_linear", "qk_layernorm", "untie_embeddings_and_output_weights",
    "position_embedding_type", "rotary_base", "rotary_percent", "max_position_embeddings",
) + tuple(_dest(flag) for flag, field, _ in STAG_FLAGS if field not in STAG_RUN_FIELDS)

# Architecture flags a run record (stag_run.json) or Megatron-LM checkpoint may lack, with the
# value such a checkpoint was trained with (`with_unrecorded`).
UNRECORDED = {"stag_memory_norm": True}

_FLAG_OF_FIELD = {field: flag for flag, field, _ in STAG_FLAGS} | {
    "num_layers": "--num-layers", "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads", "num_query_groups": "--num-query-groups",
    "position_embedding_type": "--position-embedding-type", "rotary_base": "--rotary-base",
    "rotary_percent": "--rotary-percent", "ffn_hidden_size": "--ffn-hidden-size",
    "pipeline_model_parallel_size": "--pipeline-model-parallel-size",
    "virtual_pipeline_model_parallel_size": "--num-layers-per-virtual-pipeline-stage",
    "sequence_parallel": "--sequence-parallel", "transformer_impl": "--transformer-impl",
    "fp8": "--fp8-format", "fp8_dot_product_attention": "--fp8-dot-product-attention",
}

# Flags of the learning-rate / weight-decay schedule, checked on resume (see train.check_resume).
SCHEDULE_FLAGS = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_iters", "lr_decay_style",
                  "weight_decay", "train_samples", "lr_warmup_init", "lr_warmup_samples",
                  "lr_warmup_fraction", "lr_decay_samples", "lr_wsd_decay_style",
                  "lr_wsd_decay_iters", "lr_wsd_decay_samples", "start_weight_decay",
                  "end_weight_decay", "weight_decay_incr_style")

DEFAULT_CACHE = Path(os.environ.get("STAG_CACHE", Path.home() / ".cache" / "stag_plugin"))


# FP8 attention: Megatron's TransformerConfig fields, which Megatron-LM's parser leaves without
# a flag; these flags have the fields' names (what Megatron-LM's generated flags would be).
FP8_ATTENTION_FLAGS = (
    ("--fp8-dot-product-attention", "FP8 dot-product attention (Transformer Engine)"),
    ("--fp8-multi-head-attention", "FP8 multi-head attention (Transformer Engine)"),
)


def add_stag_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `--stag-*` flags and the FP8 attention switches (usable as Megatron-LM's
    `extra_args_provider`; a parser that already has an FP8 attention flag keeps its own)."""
    group = parser.add_argument_group("StagFormer")
    for flag, _, kwargs in STAG_FLAGS:
        group.add_argument(flag, **kwargs)
    have = {option for action in parser._actions for option in action.option_strings}
    for flag, help_text in FP8_ATTENTION_FLAGS:
        if flag not in have:
            group.add_argument(flag, action="store_true", help=help_text)
    return parser


REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size",
            "lr")  # Megatron-LM has no default for these either (its validate_args requires them)
DEFAULT_VOCAB_SIZE = 8192  # the SentencePiece trained on the corpus, without --tokenizer-type


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (Megatron-LM's names, meanings and defaults)")
    g.add_argument("--num-layers", type=int, default=None, help="total depth: sections x layers")
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="default 4 x hidden; with --swiglu, 8/3 x hidden rounded down to a "
                        "multiple of 64")
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1,
                   help="key/value heads with --group-query-attention")
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="default: --seq-length (Megatron-LM requires it)")
    g.add_argument("--position-embedding-type", default="learned_absolute",
                   choices=("learned_absolute", "rope", "none"),
                   help="StagFormer's default --stag-cross-attention-rope needs rope")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--normalization", default="LayerNorm", choices=("LayerNorm", "RMSNorm"))
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--qk-layernorm", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--transformer-impl", default="transformer_engine",
                   choices=("local", "transformer_engine", "inference_optimized"),
                   help="transformer_engine (needs Transformer Engine and a GPU) or local "
                        "(Megatron's local layers, CPU and GPU); inference_optimized is refused")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages; with p sections, p stages puts one section on each")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved pipeline (not supported by StagGPTModel; refused)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split norms/dropout activations over the tensor-parallel ranks")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and compute")
    add_fp8_args(parser)
    add_stag_args(parser)
    add_runtime_args(parser)


def add_fp8_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's FP8 flags (Transformer Engine; the FP8 attention switches come with
    add_stag_args)."""
    g = parser.add_argument_group("FP8 (Megatron-LM's names, meanings and defaults; needs "
                                  "--transformer-impl transformer_engine)")
    g.add_argument("--fp8-format", dest="fp8", default=None, choices=("e4m3", "hybrid"),
                   help="train with FP8 GEMMs in this format")
    g.add_argument("--fp8-recipe", default="delayed",
                   choices=("tensorwise", "delayed", "mxfp8", "blockwise"))
    g.add_argument("--fp8-margin", type=int, default=0)
    g.add_argument("--fp8-amax-history-len", type=int, default=1)
    g.add_argument("--fp8-amax-compute-algo", default="most_recent",
                   choices=("most_recent", "max"))


def add_runtime_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM flags that choose kernels, workers or backends, not what is computed: the
    local implementation runs unfused kernels and the SDPA attention whatever they say."""
    g = parser.add_argument_group("kernels and backends (Megatron-LM's; the results do not "
                                  "depend on them)")
    for flag, dest in (("--no-masked-softmax-fusion", "masked_softmax_fusion"),
                       ("--no-bias-gelu-fusion", "bias_gelu_fusion"),
                       ("--no-bias-swiglu-fusion", "bias_swiglu_fusion"),
                       ("--no-bias-dropout-fusion", "bias_dropout_fusion"),
                       ("--no-rope-fusion", "apply_rope_fusion"),
                       ("--no-gradient-accumulation-fusion", "gradient_accumulation_fusion")):
        g.add_argument(flag, action="store_false", dest=dest,
                       help="accepted: stag train runs no fused kernel")
    g.add_argument("--no-persist-layer-norm", action="store_true",
                   help="accepted: the norms are torch's")
    g.add_argument("--disable-jit-fuser", action="store_true",
                   help="accepted: stag train compiles no JIT fusion")
    g.add_argument("--use-mcore-models", action="store_true", dest="deprecated_use_mcore_models",
                   help="accepted: ignored, as in Megatron-LM (deprecated there)")
    g.add_argument("--use-flash-attn", action="store_true",
                   help="accepted: with --transformer-impl local Megatron-LM ignores it too; "
                        "Transformer Engine picks its attention kernel itself")
    g.add_argument("--attention-backend", default="auto",
                   choices=("flash", "fused", "unfused", "auto"),
                   help="accepted: with --transformer-impl local Megatron-LM ignores it too; "
                        "Transformer Engine picks its attention kernel itself (NVTE_* variables "
                        "steer it)")
    g.add_argument("--distributed-backend", default="nccl", choices=("nccl", "gloo"),
                   help="collectives on GPUs (gloo without GPUs)")
    g.add_argument("--ckpt-format", default="torch_dist",
                   choices=("torch", "torch_dist", "torch_dcp", "fsdp_dtensor"),
                   help="only torch_dist is implemented")
    g.add_argument("--num-workers", type=int, default=2,
                   help="accepted: samples are read in the training process")


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None, metavar="PATH",
                   help="JSONL files (one {'text': ...} per line), text files or folders; or "
                        "Megatron .bin/.idx prefixes, optionally weighted (`0.3 a 0.7 b`); "
                        "default: the Python standard library of this interpreter")
    g.add_argument("--split", default=None,
                   help="train,valid,test shares of each .bin/.idx prefix's documents "
                        "(default '969, 30, 1', Megatron-LM's)")
    g.add_argument("--mock-data", action="store_true",
                   help="megatron-core's MockGPTDataset instead of --data-path (needs "
                        "--tokenizer-type, e.g. NullTokenizer --vocab-size N)")
    g.add_argument("--json-keys", nargs=1, default=["text"], metavar="KEY",
                   help="JSONL field holding the text (Megatron-LM preprocess_data's name)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="NullTokenizer: its ids; without --tokenizer-type: the pieces of the "
                        f"SentencePiece trained on the corpus (default {DEFAULT_VOCAB_SIZE})")
    g.add_argument("--data-cache-dir", type=Path, default=DEFAULT_CACHE / "data",
                   help="tokenizer and indexed datasets, reused when the corpus is unchanged")
    g.add_argument("--valid-fraction", type=float, default=0.05)
    g.add_argument("--test-fraction", type=float, default=0.05)
    from stag_plugin.training.data.tokenizers import add_tokenizer_args  # Megatron-LM's flags
    add_tokenizer_args(g)


def add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training (Megatron-LM's names, meanings and defaults)")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro x dp")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None,
                   help="instead of --train-iters: iterations = samples / global batch")
    g.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving) once the iteration is a multiple of this")
    add_schedule_args(g)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=None,
                   help="validate every this many iterations (default: at the end only)")
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--distributed-timeout-minutes", type=float, default=10.0,
                   help="a collective waiting longer than this for a rank that stopped "
                        "answering fails, naming the rank")
    add_checkpoint_args(g)
    g.add_argument("--metrics-log", type=Path, default=None,
                   help="JSON-lines log (default: <save>/metrics.jsonl when --save is given)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_schedule_args(g) -> None:
    """Learning rate and weight decay, as Megatron-LM's OptimizerParamScheduler takes them."""
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warm-up as a fraction of the decay steps")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-samples", type=int, default=None,
                   help="default: --train-samples")
    g.add_argument("--lr-decay-style", default="linear",
                   choices=("constant", "linear", "cosine", "inverse-square-root", "WSD"))
    g.add_argument("--lr-wsd-decay-style", default="exponential",
                   choices=("exponential", "linear", "cosine", "minus_sqrt"))
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD: the final decay's iterations")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None,
                   help="WSD with --train-samples: the final decay's samples")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--start-weight-decay", type=float, default=None)
    g.add_argument("--end-weight-decay", type=float, default=None)
    g.add_argument("--weight-decay-incr-style", default="constant",
                   choices=("constant", "linear", "cosine"))


def add_checkpoint_args(g) -> None:
    g.add_argument("--save", type=Path, default=None, help="checkpoint folder")
    g.add_argument("--overwrite", action="store_true",
                   help="--save may hold another run: its checkpoints are replaced (removed once "
                        "this run has saved its first one) and its metrics log restarted")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", type=Path, default=None, help="resume from this checkpoint folder")
    g.add_argument("--no-load-optim", action="store_true", default=None)
    g.add_argument("--no-load-rng", action="store_true", default=None)
    add_trust_arg(g)
    g.add_argument("--finetune", action="store_true",
                   help="on --load, take the model weights only: iteration 0, fresh optimizer")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state over data-parallel ranks (Megatron's "
                        "DistributedOptimizer)")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on --load, use this command's learning-rate schedule flags instead of "
                        "requiring the checkpoint's")


TRUST_HELP = ("unpickle the checkpoint fully instead of admitting only the types torch and "
              "Megatron write there: a crafted checkpoint can then run code. Only for "
              "checkpoints whose origin you trust")


def add_trust_arg(parser) -> None:
    """--trust-checkpoint-code, for every command that loads a checkpoint."""
    parser.add_argument("--trust-checkpoint-code", action="store_true", help=TRUST_HELP)


def add_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, metavar="YAML",
                        help="preset of flag values (see configs/); command-line flags win")


def parse_with_preset(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse `argv`, taking defaults from the `--config` YAML preset when one is given. A
    Megatron-LM flag the parser lacks is refused naming the Megatron-LM entry (NotSupported);
    any other unknown flag gets argparse's own error."""
    known, extra = parser.parse_known_args(argv)
    refuse_megatron_lm_flags(extra)
    if getattr(known, "config", None) is not None:
        parser.set_defaults(**load_preset(known.config, parser))
    return parser.parse_args(argv)


def refuse_megatron_lm_flags(words) -> None:
    """NotSupported for the first Megatron-LM flag among `words` (--flag or --flag=value)."""
    from stag_plugin.training import megatron_lm_flags

    for word in words:
        if megatron_lm_flags.is_megatron_lm_flag(word):
            raise NotSupported(
                f"{word.split('=', 1)[0]} is a Megatron-LM flag that stag train does not "
                "implement", f"use {megatron_lm_flags.ENTRY} (the Megatron-LM entry), which "
                "takes all of Megatron-LM's flags")


def load_preset(path: Path, parser: argparse.ArgumentParser) -> dict:
    import yaml

    if not Path(path).is_file():
        raise StagError(f"--config {path}: no such file", "pass a YAML file such as "
                         "configs/tiny_cpu.yaml")
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise StagError(f"--config {path} is not valid YAML{where} "
                        f"({getattr(err, 'problem', None) or err})",
                        "fix the file: one `flag_name: value` per line") from err
    if not isinstance(values, dict):
        raise StagError(f"--config {path}: expected a mapping of flag names to values",
                        "write one `flag_name: value` per line, e.g. `num_layers: 4`")
    actions = {action.dest: action for action in parser._actions}
    values = {str(key).replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(set(values) - set(actions))
    refuse_megatron_lm_flags("--" + key.replace("_", "-") for key in unknown)
    if unknown:
        raise StagError(f"--config {path}: unknown keys {unknown}", "use flag names "
                         "without dashes, e.g. `num_layers: 4` for --num-layers")
    return {key: preset_value(path, key, value, actions[key]) for key, value in values.items()}


def preset_value(path, key: str, value, action: argparse.Action):
    """A preset's `key: value`, checked against the flag's type the way its command-line form
    is (a YAML boolean for a switch, an integer for an int flag, ...), and converted."""
    if value is None:
        return None
    expected = _expected_type(action)
    if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 0):
        items = value if isinstance(value, list) else [value]
        return [_typed(path, key, item, action, expected) for item in items]
    return _typed(path, key, value, action, expected)


def _expected_type(action: argparse.Action):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                           argparse.BooleanOptionalAction)):
        return bool
    return action.type or str


def _typed(path, key: str, value, action, expected):
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str), Path: lambda v: isinstance(v, str)}[expected]
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             Path: "a path (a string)"}
    if not ok(value) or (action.choices is not None and value not in action.choices):
        wanted = (f"one of {list(action.choices)}" if action.choices is not None
                  else names[expected])
        raise StagError(f"--config {path}: {key}: {value!r} ({type(value).__name__}) is not "
                        f"{wanted}", f"write `{key}: <{wanted}>`")
    return Path(value) if expected is Path else (float(value) if expected is float else value)


_AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
_ABOVE_0 = (lambda v: v > 0, "> 0")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
# Values torch would only reject deep inside the optimizer or the model, checked up front.
RANGES = {"lr": _AT_LEAST_0, "min_lr": _AT_LEAST_0, "weight_decay": _AT_LEAST_0,
          "clip_grad": _AT_LEAST_0, "adam_beta1": _FRACTION, "adam_beta2": _FRACTION,
          "adam_eps": _ABOVE_0, "init_method_std": _ABOVE_0, "hidden_dropout": _FRACTION,
          "attention_dropout": _FRACTION, "valid_fraction": _FRACTION,
          "test_fraction": _FRACTION, "lr_warmup_init": _AT_LEAST_0,
          "lr_warmup_fraction": _FRACTION, "start_weight_decay": _AT_LEAST_0,
          "end_weight_decay": _AT_LEAST_0}
# Counts that must be >= 1 when given (warm-ups may be 0).
POSITIVE = ("train_iters", "train_samples", "seq_length", "micro_batch_size", "eval_iters",
            "log_interval", "eval_interval", "lr_decay_iters", "lr_decay_samples",
            "lr_wsd_decay_iters", "lr_wsd_decay_samples")


def check_ranges(args: argparse.Namespace) -> None:
    for name, (valid, span) in RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and valid(value)):
            raise StagError(f"--{name.replace('_', '-')} {value} is out of range",
                            f"pass a value {span}")
    for name in POSITIVE:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise StagError(f"--{_flag(name)} must be >= 1, got {value}",
                            f"pass --{_flag(name)} 1 or more")


def _flag(dest: str) -> str:
    return dest.replace("_", "-")


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults the way Megatron-LM's validate_args does; reject inconsistent
    flags. Flags Megatron-LM requires may still be missing (`check_trainable` names them)."""
    check_ranges(args)
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    if args.ffn_hidden_size is None and args.swiglu and args.hidden_size:
        args.ffn_hidden_size = int(4 * args.hidden_size * 2 / 3 / 64) * 64  # Megatron-LM's
    if args.vocab_size is None and getattr(args, "tokenizer_type", None) is None:
        args.vocab_size = DEFAULT_VOCAB_SIZE
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size
    if args.micro_batch_size and args.global_batch_size % args.micro_batch_size:
        raise StagError(f"--global-batch-size {args.global_batch_size} is not a multiple of "
                         f"--micro-batch-size {args.micro_batch_size}", "make it one")
    finalize_schedule(args)
    if args.seq_length and args.seq_length > args.max_position_embeddings:
        raise StagError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                         f"{args.max_position_embeddings}", "raise the latter")
    if args.save_interval is not None and args.save is None:
        raise StagError("--save-interval needs --save DIR", "add --save")
    return args


# (training length, warm-up, decay, WSD decay) flags, counted in iterations or in samples
UNITS = {"iterations": ("train_iters", "lr_warmup_iters", "lr_decay_iters", "lr_wsd_decay_iters"),
         "samples": ("train_samples", "lr_warmup_samples", "lr_decay_samples",
                     "lr_wsd_decay_samples")}


def unit_of(args) -> str:
    """"samples" with --train-samples, else "iterations" (Megatron-LM's two kinds of run)."""
    return "samples" if getattr(args, "train_samples", None) is not None else "iterations"


def finalize_schedule(args: argparse.Namespace) -> None:
    """Megatron-LM's iteration- or sample-based schedule: the other kind's flags refused,
    --train-iters from --train-samples, the decay length defaulting to the training length."""
    if args.train_iters is not None and args.train_samples is not None:
        raise StagError("both --train-iters and --train-samples given",
                        "pass one of them (Megatron-LM takes one)")
    unit = unit_of(args)
    other = "iterations" if unit == "samples" else "samples"
    for ours, theirs in zip(UNITS[unit][1:], UNITS[other][1:]):
        if getattr(args, theirs) not in (None, 0):
            raise StagError(f"--{_flag(theirs)} counts {other}, but this run counts {unit} "
                            f"(--{_flag(UNITS[unit][0])})", f"use --{_flag(ours)}")
    length, warmup, decay, wsd = UNITS[unit]
    if unit == "samples" and args.global_batch_size:
        args.train_iters = _iterations_of(args.train_samples, args.global_batch_size)
    if getattr(args, decay) is None:
        setattr(args, decay, getattr(args, length))
    if args.lr_warmup_fraction is not None and getattr(args, warmup):
        raise StagError(f"both --lr-warmup-fraction and --{_flag(warmup)} given",
                        "pass one of them")
    if args.lr_decay_style == "WSD" and getattr(args, wsd) is None:
        raise StagError("--lr-decay-style WSD needs the length of its final decay",
                        f"pass --{_flag(wsd)} N (--lr-wsd-decay-style picks its shape)")
    _check_warmup(args, warmup, decay)
    _check_weight_decay(args)


def _iterations_of(samples: int, global_batch: int) -> int:
    if samples < global_batch:
        raise StagError(f"--train-samples {samples} is less than one global batch "
                        f"({global_batch})", "train more samples or use a smaller batch")
    return samples // global_batch


def _check_warmup(args, warmup: str, decay: str) -> None:
    steps = schedule_steps(args)
    if steps["decay"] is None or args.lr_decay_style == "constant":
        return
    if steps["warmup"] >= steps["decay"]:
        raise StagError(f"the warm-up ({steps['warmup']} {unit_of(args)}) must be shorter than "
                        f"--{_flag(decay)} {steps['decay']} (default: the training length)",
                        "shorten the warm-up or train longer")
    if steps["wsd"] is not None and steps["wsd"] > steps["decay"]:
        raise StagError(f"the WSD decay ({steps['wsd']}) is longer than --{_flag(decay)} "
                        f"{steps['decay']}", "shorten it")


def _check_weight_decay(args) -> None:
    """Megatron-LM: --start/--end-weight-decay go with a non-constant increment style only."""
    given = [f for f in ("start_weight_decay", "end_weight_decay") if getattr(args, f) is not None]
    if args.weight_decay_incr_style == "constant" and given:
        raise StagError(f"--{_flag(given[0])} needs --weight-decay-incr-style linear or "
                        "cosine", "use --weight-decay for a constant weight decay")
    if args.weight_decay_incr_style != "constant" and len(given) < 2:
        raise StagError(f"--weight-decay-incr-style {args.weight_decay_incr_style} needs "
                        "--start-weight-decay and --end-weight-decay", "pass both")


def schedule_steps(args) -> dict:
    """OptimizerParamScheduler's lengths as Megatron-LM's get_optimizer_param_scheduler derives
    them: "train", "warmup", "decay", "wsd" and "increment" (the steps of one iteration). With
    --train-samples they count samples, an iteration one global batch; otherwise iterations
    (Megatron-LM counts those in samples too, iterations x global batch: the same rates)."""
    unit = unit_of(args)
    train, warmup, decay, wsd = (getattr(args, flag, None) for flag in UNITS[unit])
    if getattr(args, "lr_warmup_fraction", None) is not None and decay is not None:
        warmup = args.lr_warmup_fraction * decay
    increment = args.global_batch_size if unit == "samples" else 1
    return dict(train=train, warmup=warmup or 0, decay=decay, wsd=wsd, increment=increment)


def check_trainable(args: argparse.Namespace) -> None:
    """What `stag train` needs on top of finalize_args: every flag Megatron-LM requires, and
    only what stag train implements (--transformer-impl local or transformer_engine, the latter
    with Transformer Engine installed; --ckpt-format torch_dist)."""
    missing = [f"--{_flag(name)}" for name in REQUIRED if getattr(args, name) is None]
    if args.train_iters is None:
        missing.append("--train-iters (or --train-samples)")
    if missing:
        raise StagError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required "
                        "(Megatron-LM has no default either)", "pass them, or start from a "
                        "preset: --config configs/tiny_cpu.yaml (command-line flags win)")
    if args.transformer_impl == "inference_optimized":
        raise NotSupported("--transformer-impl inference_optimized is not implemented by "
                           "StagGPTModel", "pass --transformer-impl transformer_engine or local")
    if args.transformer_impl == "transformer_engine":
        from stag_plugin.compat.megatron import require_transformer_engine

        require_transformer_engine("--transformer-impl transformer_engine (Megatron-LM's "
                                   "default)")
    if args.ckpt_format != "torch_dist":
        raise NotSupported(f"--ckpt-format {args.ckpt_format} is not implemented: stag train "
                           "writes torch_dist checkpoints", "drop it (torch_dist is Megatron-LM's "
                           "default)")


def config_from_args(args: argparse.Namespace):
    """The StagFormerConfig these flags describe (raises ValueError naming a bad flag value)."""
    from stag_plugin.core.config import ConfigError, StagFormerConfig

    kwargs = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels, normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon, gated_linear_unit=args.swiglu,
        add_bias_linear=not args.disable_bias_linear, qk_layernorm=args.qk_layernorm,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        rotary_percent=args.rotary_percent, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=_virtual_pipeline_size(args),
        sequence_parallel=args.sequence_parallel, transformer_impl=args.transformer_impl,
        bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
        **{field: getattr(args, field, default) for field, default in FP8_FIELDS.items()},
    )
    if args.swiglu:
        kwargs["activation_func"] = torch.nn.functional.silu
    kwargs.update({field: getattr(args, _dest(flag)) for flag, field, _ in STAG_FLAGS})
    try:
        return StagFormerConfig(**kwargs)
    except ConfigError as err:
        flag = _FLAG_OF_FIELD.get(err.field)
        raise StagError(f"{flag}: {err.problem}" if flag else err.problem, err.fix) from err
    except ValueError as err:  # Megatron's own TransformerConfig checks
        raise StagError(f"the flags give a configuration Megatron-Core refuses: {err}",
                        "change the flags it names (stag train --help)") from err


# Config fields set by the FP8 flags (their dests), with Megatron's defaults for args without them.
FP8_FIELDS = {"fp8": None, "fp8_recipe": "delayed", "fp8_margin": 0, "fp8_amax_history_len": 1,
              "fp8_amax_compute_algo": "most_recent", "fp8_dot_product_attention": False,
              "fp8_multi_head_attention": False}


def _virtual_pipeline_size(args):
    per_stage = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    if per_stage is None:
        return None
    return max(1, args.num_layers // (args.pipeline_model_parallel_size * per_stage))


def architecture_of(args: argparse.Namespace, padded_vocab_size: int) -> dict:
    """The flag values a checkpoint's tensors depend on (compared on --load); --num-query-groups
    only with --group-query-attention (Megatron-LM ignores it otherwise)."""
    arch = {flag: getattr(args, flag) for flag in ARCHITECTURE_FLAGS}
    if not args.group_query_attention:
        arch["num_query_groups"] = None
    if args.stag_num_sections == 1:
        arch["stag_memory_norm"] = None  # one section: no memory
    arch["padded_vocab_size"] = padded_vocab_size
    return arch


def with_unrecorded(saved: dict, architecture: bool = False) -> dict:
    """A checkpoint's saved flags (or, with `architecture`, its saved architecture), by flag
    dest, with the `UNRECORDED` flags it lacks set to the values it was trained with."""
    filled = {**UNRECORDED, **saved}
    if architecture and filled.get("stag_num_sections") == 1:
        filled["stag_memory_norm"] = None  # as architecture_of records one section
    return filled


def padded_vocab_size(vocab_size: int, args: argparse.Namespace) -> int:
    """Megatron-LM's padding: a multiple of make_vocab_size_divisible_by x TP size."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)
