"""Command-line flags of `stag train` / `stag eval` / `stag demo`, and their one mapping onto
`StagFormerConfig`.

Flags use Megatron-LM's names and meanings wherever Megatron-LM has the same option
(`--num-layers`, `--hidden-size`, `--lr`, `--save`, ...). StagFormer's own options are the
`--stag-*` flags, declared once in `STAG_FLAGS` next to the config field each one sets;
`add_stag_args(parser)` adds just those to any argparse parser (e.g. Megatron-LM's, as an
`extra_args_provider`). A YAML preset (`--config configs/tiny_cpu.yaml`) sets defaults by flag
name (`num_layers: 4`); flags on the command line override it.

`config_from_args(args)` is the only place where flag values become a `StagFormerConfig`, and
`architecture_of(args)` the only definition of which flags fix a checkpoint's shapes.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

from stag_plugin.errors import StagError


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
)

# Flags whose values fix the parameter shapes or the function a checkpoint computes.
ARCHITECTURE_FLAGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
    "group_query_attention", "num_query_groups", "kv_channels", "normalization", "norm_epsilon",
    "swiglu", "disable_bias_linear", "qk_layernorm", "untie_embeddings_and_output_weights",
    "position_embedding_type", "rotary_base", "rotary_percent", "max_position_embeddings",
) + tuple(_dest(flag) for flag, _, _ in STAG_FLAGS)

_FLAG_OF_FIELD = {field: flag for flag, field, _ in STAG_FLAGS} | {
    "num_layers": "--num-layers", "hidden_size": "--hidden-size",
    "num_attention_heads": "--num-attention-heads", "num_query_groups": "--num-query-groups",
    "position_embedding_type": "--position-embedding-type", "rotary_base": "--rotary-base",
    "rotary_percent": "--rotary-percent", "ffn_hidden_size": "--ffn-hidden-size",
    "pipeline_model_parallel_size": "--pipeline-model-parallel-size",
    "virtual_pipeline_model_parallel_size": "--num-layers-per-virtual-pipeline-stage",
    "sequence_parallel": "--sequence-parallel",
}

# Flags of the learning-rate / weight-decay schedule, checked on resume (see train.check_resume).
SCHEDULE_FLAGS = ("lr", "min_lr", "lr_warmup_iters", "lr_decay_iters", "lr_decay_style",
                  "weight_decay")

DEFAULT_CACHE = Path(os.environ.get("STAG_CACHE", Path.home() / ".cache" / "stag_plugin"))


def add_stag_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `--stag-*` flags (usable as Megatron-LM's `extra_args_provider`)."""
    group = parser.add_argument_group("StagFormer")
    for flag, _, kwargs in STAG_FLAGS:
        group.add_argument(flag, **kwargs)
    return parser


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (Megatron-LM names)")
    g.add_argument("--num-layers", type=int, default=4, help="total depth: sections x layers")
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=256)
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="default: --seq-length")
    g.add_argument("--position-embedding-type", default="rope",
                   choices=("rope", "learned_absolute", "none"))
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--normalization", default="LayerNorm", choices=("LayerNorm", "RMSNorm"))
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--qk-layernorm", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages; with p sections, p stages puts one section on each")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved pipeline (not supported by StagGPTModel; refused)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split norms/dropout activations over the tensor-parallel ranks")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and compute")
    add_stag_args(parser)


def add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None, metavar="PATH",
                   help="JSONL files (one {'text': ...} per line), text files or folders; "
                        "default: the Python standard library of this interpreter")
    g.add_argument("--json-keys", nargs=1, default=["text"], metavar="KEY",
                   help="JSONL field holding the text (Megatron-LM preprocess_data's name)")
    g.add_argument("--vocab-size", type=int, default=8192, help="SentencePiece BPE vocabulary")
    g.add_argument("--data-cache-dir", type=Path, default=DEFAULT_CACHE / "data",
                   help="tokenizer and indexed datasets, reused when the corpus is unchanged")
    g.add_argument("--valid-fraction", type=float, default=0.05)
    g.add_argument("--test-fraction", type=float, default=0.05)


# A rank that stopped answering ends the job after this long (Megatron-LM's default on GPUs;
# a CPU job's collectives take seconds, so it need not wait ten minutes to notice).
DEFAULT_TIMEOUT_MINUTES = 10.0 if torch.cuda.is_available() else 2.0


def add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training (Megatron-LM names)")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro x dp")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=1e-4)
    g.add_argument("--lr-warmup-iters", type=int, default=10)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-decay-style", default="cosine",
                   choices=("constant", "linear", "cosine", "inverse-square-root"))
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--eval-interval", type=int, default=50)
    g.add_argument("--eval-iters", type=int, default=10)
    g.add_argument("--save", type=Path, default=None, help="checkpoint folder")
    g.add_argument("--overwrite", action="store_true",
                   help="--save may hold another run: its checkpoints are replaced (removed once "
                        "this run has saved its first one) and its metrics log restarted")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", type=Path, default=None, help="resume from this checkpoint folder")
    g.add_argument("--no-load-optim", action="store_true")
    add_trust_arg(g)
    g.add_argument("--finetune", action="store_true",
                   help="on --load, take the model weights only: iteration 0, fresh optimizer")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state over data-parallel ranks (Megatron's "
                        "DistributedOptimizer)")
    g.add_argument("--distributed-timeout-minutes", type=float, default=DEFAULT_TIMEOUT_MINUTES,
                   help="a collective waiting longer than this for a rank that stopped "
                        "answering fails, naming the rank (default: Megatron-LM's 10 minutes "
                        "on GPUs, 2 on CPU)")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--override-opt-param-scheduler", action="store_true",
                   help="on --load, use this command's learning-rate schedule flags instead of "
                        "requiring the checkpoint's")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving) once the iteration is a multiple of this")
    g.add_argument("--metrics-log", type=Path, default=None,
                   help="JSON-lines log (default: <save>/metrics.jsonl when --save is given)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    """Parse `argv`, taking defaults from the `--config` YAML preset when one is given."""
    known, _ = parser.parse_known_args(argv)
    if getattr(known, "config", None) is not None:
        parser.set_defaults(**load_preset(known.config, parser))
    return parser.parse_args(argv)


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
          "test_fraction": _FRACTION}


def check_ranges(args: argparse.Namespace) -> None:
    for name, (valid, span) in RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not (math.isfinite(value) and valid(value)):
            raise StagError(f"--{name.replace('_', '-')} {value} is out of range",
                            f"pass a value {span}")


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill derived defaults the way Megatron-LM does; reject inconsistent training flags."""
    check_ranges(args)
    for flag in ("train_iters", "seq_length", "micro_batch_size", "eval_iters", "log_interval",
                 "eval_interval"):
        if getattr(args, flag) < 1:
            raise StagError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}",
                            f"pass --{flag.replace('_', '-')} 1 or more")
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size
    if args.global_batch_size % args.micro_batch_size:
        raise StagError(f"--global-batch-size {args.global_batch_size} is not a multiple of "
                         f"--micro-batch-size {args.micro_batch_size}", "make it one")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters >= args.lr_decay_iters and args.lr_decay_style != "constant":
        raise StagError(f"--lr-warmup-iters {args.lr_warmup_iters} must be below "
                        f"--lr-decay-iters {args.lr_decay_iters} (default: --train-iters)",
                        "shorten the warm-up or train longer")
    if args.seq_length > args.max_position_embeddings:
        raise StagError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                         f"{args.max_position_embeddings}", "raise the latter")
    if args.save_interval is not None and args.save is None:
        raise StagError("--save-interval needs --save DIR", "add --save")
    return args


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
        sequence_parallel=args.sequence_parallel,
        bf16=args.bf16, params_dtype=torch.bfloat16 if args.bf16 else torch.float32,
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


def _virtual_pipeline_size(args):
    per_stage = getattr(args, "num_layers_per_virtual_pipeline_stage", None)
    if per_stage is None:
        return None
    return max(1, args.num_layers // (args.pipeline_model_parallel_size * per_stage))


def architecture_of(args: argparse.Namespace, padded_vocab_size: int) -> dict:
    """The flag values a checkpoint's tensors depend on (compared on --load)."""
    arch = {flag: getattr(args, flag) for flag in ARCHITECTURE_FLAGS}
    arch["padded_vocab_size"] = padded_vocab_size
    return arch


def padded_vocab_size(vocab_size: int, args: argparse.Namespace) -> int:
    """Megatron-LM's padding: a multiple of make_vocab_size_divisible_by x TP size."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)
