"""`stag train` speaks Megatron-LM: every flag it shares with Megatron-LM has Megatron-LM's name,
meaning and default; Megatron-LM's data flags (.bin/.idx prefixes with weights, --split,
--mock-data), --train-samples and WSD decay train; a Megatron-LM flag stag train does not
implement is refused naming the Megatron-LM entry; the launch scripts give the same model
through stag train's parser and Megatron-LM's; the presets and the demo keep their values.

The tests taking the `megatron_lm` fixture read Megatron-LM's own parser
(`megatron.training.arguments`): megatron-core 0.19 ships it; with 0.16 set MEGATRON_LM_PATH to
a Megatron-LM checkout at core_v0.16.1. They skip with that instruction otherwise.
"""

import argparse
import contextlib
import dataclasses
import enum
import functools
import io
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from stag_plugin import cli
from stag_plugin.training import arguments, demo, megatron_lm_flags, runtime, train

REPO = Path(__file__).resolve().parents[1]
NEEDS_PARSER = ("Megatron-LM's parser (megatron.training.arguments) is not importable: use "
                "megatron-core >= 0.19 (it ships megatron.training), or set MEGATRON_LM_PATH to "
                "a Megatron-LM checkout at core_v0.16.1")
ENTRY = "examples/megatron_lm/pretrain_stag.py"


# ------------------------------------------------------------------ Megatron-LM's own parser


@pytest.fixture(scope="module")
def megatron_lm():
    """Megatron-LM's megatron.training.arguments (installed, or MEGATRON_LM_PATH's)."""
    import typing

    import typing_extensions

    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override  # Megatron-LM 0.19's files: Python 3.12
    import megatron.core  # noqa: F401  (the installed megatron-core before a checkout)

    checkout = os.environ.get("MEGATRON_LM_PATH")
    path = str(Path(checkout).resolve()) if checkout else None
    if path:
        sys.path.insert(0, path)
    try:
        from megatron.training import arguments as module
    except ImportError as err:
        pytest.skip(f"{NEEDS_PARSER} ({err})")
    yield module
    if path:
        sys.path.remove(path)


def megatron_parser(module) -> argparse.ArgumentParser:
    from stag_plugin.integrations.megatron_lm import add_stag_args

    parser = argparse.ArgumentParser(allow_abbrev=False)
    module.add_megatron_arguments(parser)
    return add_stag_args(parser)


def actions(parser) -> dict:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def plain(value):
    """An enum by its name, a path as a string: how a flag's value reads on the command line."""
    if isinstance(value, enum.Enum):
        return value.name
    return str(value) if isinstance(value, Path) else value


def shared_flags(module) -> list:
    """(flag, stag train's action, Megatron-LM's action) of every flag both parsers have."""
    ours, theirs = actions(train.build_parser()), actions(megatron_parser(module))
    return [(flag, ours[flag], theirs[flag]) for flag in sorted(set(ours) & set(theirs))
            if flag.startswith("--") and flag != "--help" and "-stag-" not in flag]


def test_the_flag_table_holds_every_megatron_lm_flag(megatron_lm):
    found = {flag for flag in actions(megatron_parser(megatron_lm)) if flag.startswith("--")}
    missing = sorted(found - megatron_lm_flags.FLAGS - set(actions(train.build_parser())))
    assert not missing, f"add to stag_plugin/training/megatron_lm_flags.py: {missing}"


def test_every_shared_flag_has_megatron_lm_default(megatron_lm):
    wrong = []
    for flag, ours, theirs in shared_flags(megatron_lm):
        if (ours.nargs == 0) != (theirs.nargs == 0):
            wrong.append(f"{flag}: a switch in one parser only")
        elif ours.nargs == 0 and type(ours) is not type(theirs):  # --disable-bias-linear
            if ours.default == theirs.default:  # store_true vs store_false of the opposite
                wrong.append(f"{flag}: absent means {ours.default} vs {theirs.default}")
        elif plain(ours.default) != plain(theirs.default):
            wrong.append(f"{flag}: default {ours.default!r}, Megatron-LM {theirs.default!r}")
        if ours.choices and theirs.choices and not {plain(c) for c in ours.choices} <= {
                plain(c) for c in theirs.choices}:
            wrong.append(f"{flag}: choices {ours.choices} not Megatron-LM's")
    assert not wrong, "\n".join(wrong)


def test_shared_flags_are_more_than_the_model_flags(megatron_lm):
    """The comparison above sees the flags of every group (a guard against an empty test)."""
    flags = {flag for flag, _, _ in shared_flags(megatron_lm)}
    assert {"--num-layers", "--lr", "--hidden-dropout", "--lr-decay-style", "--data-path",
            "--split", "--mock-data", "--train-samples", "--transformer-impl",
            "--lr-wsd-decay-iters", "--no-rope-fusion", "--eval-iters", "--use-mcore-models",
            "--disable-jit-fuser"} <= flags


# ------------------------------------------------------------------ the launch scripts


from test_launch_scripts import (  # noqa: E402  (the launch scripts' dry-run helpers)
    MODELS,
    SCRIPTS,
    fake_bin,  # noqa: F401, F811  (a fixture)
    launched,
    printed_command,
    run_script,
)

# Kernels Megatron-LM fuses by default through Transformer Engine or apex, absent on a CPU: the
# Megatron-LM parser's model would refuse them there. Both parsers take these flags.
CPU_FLAGS = ["--no-rope-fusion", "--no-gradient-accumulation-fusion"]

# StagFormerConfig fields that are not the model's function (each with why).
NOT_THE_MODEL = {
    # kernel choices: the same math fused or not (stag train runs no fused kernel)
    "bias_activation_fusion", "masked_softmax_fusion", "bias_dropout_fusion",
    "apply_rope_fusion", "gradient_accumulation_fusion", "persist_layer_norm",
    # read by Megatron's DotProductAttention only; the plugin's attention is torch's SDPA
    "attention_softmax_in_fp32",
    # Megatron-LM's training loop and inference runtime, not the model
    "pipeline_dtype", "deallocate_pipeline_outputs", "cp_comm_type",
    "tensor_parallel_num_weight_shards", "expert_tensor_parallel_num_weight_shards",
    "inference_sampling_seed",
}
# Shared flags whose parsed values differ though they mean the same (each with why).
FILLED_LATER = {
    "ffn_hidden_size", "kv_channels",  # Megatron-LM fills them in args; stag train's config does
    "lr_decay_iters",  # stag train fills it in args; Megatron-LM when it builds its scheduler
    "start_weight_decay", "end_weight_decay",  # the reverse: both from --weight-decay
    "vocab_size",  # stag train's SentencePiece size (no --tokenizer-type here)
    "bias_gelu_fusion", "bias_swiglu_fusion",  # Megatron-LM turns some off by --swiglu; unused
}


def comparable(value):
    if isinstance(value, functools.partial):
        return value.func, value.args, sorted(value.keywords.items())
    return plain(value)


def trainer_flags(fake_bin, model: str) -> list:  # noqa: F811
    """The trainer's flags of the three launch scripts for MODEL (all the same), plus CPU_FLAGS."""
    found = []
    for script in SCRIPTS:
        nproc = "8" if model != "tiny" else "2" if script == "train_single_node.sh" else "1"
        result = run_script(script, fake_bin, MODEL=model, GPUS_PER_NODE=nproc)
        found.append(launched(script, printed_command(result))[1])
    assert all(flags == found[0] for flags in found)
    return found[0] + CPU_FLAGS


def megatron_lm_args(module, argv: list, world: int):
    """Megatron-LM's parse_args and validate_args of `argv`, as rank 0 of `world` processes."""
    from stag_plugin.integrations.megatron_lm import add_stag_args

    saved_argv, saved_env = sys.argv, dict(os.environ)
    sys.argv = ["pretrain_stag.py", *argv]
    os.environ.update(WORLD_SIZE=str(world), RANK="0")
    try:
        margs = module.parse_args(extra_args_provider=add_stag_args)
        with contextlib.redirect_stdout(io.StringIO()):  # Megatron-LM prints every argument
            module.validate_args(margs, {})
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
    return margs


@pytest.mark.parametrize("model", MODELS)
def test_launch_scripts_give_one_model_in_both_parsers(model, megatron_lm, fake_bin):  # noqa: F811
    from stag_plugin.integrations.megatron_lm import stag_config_from_megatron_args

    argv = trainer_flags(fake_bin, model)
    args = arguments.finalize_args(arguments.parse_with_preset(train.build_parser(), argv))
    arguments.check_trainable(args)
    margs = megatron_lm_args(megatron_lm, argv, world=2 if model == "tiny" else 8)
    ours, theirs = arguments.config_from_args(args), stag_config_from_megatron_args(margs)

    fields = [f.name for f in dataclasses.fields(ours) if f.name not in NOT_THE_MODEL]
    assert len(fields) > 100  # every field of Megatron's TransformerConfig and StagFormer's
    wrong = [f"{name}: {getattr(ours, name)!r} vs {getattr(theirs, name)!r}" for name in fields
             if name != "add_qkv_bias"
             and comparable(getattr(ours, name)) != comparable(getattr(theirs, name))]
    qkv_bias = [c.add_bias_linear or c.add_qkv_bias for c in (ours, theirs)]
    assert not wrong and qkv_bias[0] == qkv_bias[1], "\n".join(wrong)
    assert (ours.num_layers, ours.num_sections) == (MODELS[model][1], MODELS[model][2])

    dests = {ours_.dest for _, ours_, theirs_ in shared_flags(megatron_lm)
             if ours_.dest == theirs_.dest} - FILLED_LATER
    wrong = [f"{d}: {getattr(args, d)!r} vs {getattr(margs, d)!r}" for d in sorted(dests)
             if plain(getattr(args, d)) != plain(getattr(margs, d))]
    assert not wrong, "\n".join(wrong)
    assert not margs.add_bias_linear == args.disable_bias_linear


# ------------------------------------------------------------------ refusals


def base_flags(tmp_path, *extra) -> list:
    """A tiny model: every required flag and every value that is not Megatron-LM's default."""
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e-3",
            "--transformer-impl", "local", "--position-embedding-type", "rope",
            "--data-cache-dir", str(tmp_path / "cache"), "--eval-iters", "1",
            "--log-interval", "1", "--no-progress", *map(str, extra)]


def runtime_has_transformer_engine() -> bool:
    from stag_plugin.compat.megatron import transformer_engine_available

    return transformer_engine_available()


def error_of(capsys, argv) -> str:
    """`stag train argv` fails before training with one `stag train: error:` line."""
    assert cli.main(["train", *map(str, argv)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("stag train: error: ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("flag", ["--fp16", "--tensorboard-dir", "--rampup-batch-size=16",
                                  "--num-experts"])
def test_a_megatron_lm_flag_stag_train_lacks_is_refused_by_name(capsys, tmp_path, flag):
    line = error_of(capsys, base_flags(tmp_path, "--train-iters", 2, flag, "8"))
    name = flag.split("=")[0]
    assert f"error: {name} is a Megatron-LM flag that stag train does not implement" in line
    assert f"use {ENTRY} (the Megatron-LM entry), which takes all of Megatron-LM's flags" in line


def test_a_megatron_lm_key_in_a_preset_is_refused_by_name(capsys, tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("num_layers: 2\nfp16: true\n")
    line = error_of(capsys, ["--config", preset])
    assert "--fp16 is a Megatron-LM flag that stag train does not implement" in line


def test_an_unknown_flag_keeps_argparse_error(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", *base_flags(tmp_path, "--train-iters", 2, "--no-such-flag")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --no-such-flag" in err and "Megatron-LM" not in err


def test_abbreviations_are_not_taken(capsys, tmp_path):
    """As in Megatron-LM (allow_abbrev=False): --train-iter is not --train-iters."""
    with pytest.raises(SystemExit):
        cli.main(["train", *base_flags(tmp_path, "--train-iter", 2)])
    assert "unrecognized arguments: --train-iter" in capsys.readouterr().err


@pytest.mark.skipif(runtime_has_transformer_engine(), reason="Transformer Engine is installed")
def test_missing_transformer_engine_is_said_clearly(capsys, tmp_path):
    argv = base_flags(tmp_path, "--train-iters", 2)
    del argv[argv.index("--transformer-impl"):argv.index("--transformer-impl") + 2]
    line = error_of(capsys, argv)  # Megatron-LM's default: transformer_engine
    assert ("--transformer-impl transformer_engine (Megatron-LM's default) needs NVIDIA "
            "Transformer Engine") in line
    assert "pip install" in line and "--transformer-impl local" in line


def test_flags_megatron_lm_requires_are_required(capsys, tmp_path):
    line = error_of(capsys, ["--transformer-impl", "local"])
    assert ("--num-layers, --hidden-size, --num-attention-heads, --seq-length, "
            "--micro-batch-size, --lr, --train-iters (or --train-samples) are required") in line
    assert "--config configs/tiny_cpu.yaml" in line


KERNEL_FLAGS = ["--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion",
                "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
                "--no-persist-layer-norm", "--disable-jit-fuser", "--use-mcore-models",
                "--use-flash-attn", "--attention-backend", "flash", "--distributed-backend",
                "gloo", "--ckpt-format", "torch_dist", "--num-workers", "8"]


def test_kernel_and_backend_flags_are_accepted_and_change_nothing(tmp_path):
    def config(*extra):
        args = arguments.finalize_args(arguments.parse_with_preset(
            train.build_parser(), base_flags(tmp_path, "--train-iters", 2, *extra)))
        arguments.check_trainable(args)
        return arguments.config_from_args(args)

    plain_config, with_flags = config(), config(*KERNEL_FLAGS)
    assert all(comparable(getattr(plain_config, f.name)) == comparable(getattr(with_flags, f.name))
               for f in dataclasses.fields(plain_config))


@pytest.mark.parametrize("extra, words", [
    (["--train-iters", 4, "--train-samples", 8], "both --train-iters and --train-samples"),
    (["--train-samples", 8, "--lr-decay-iters", 4], "--lr-decay-iters counts iterations"),
    (["--train-iters", 4, "--lr-warmup-samples", 2], "--lr-warmup-samples counts samples"),
    (["--train-iters", 4, "--lr-decay-style", "WSD"], "WSD needs the length of its final"),
    (["--train-samples", 1], "--train-samples 1 is less than one global batch"),
    (["--train-iters", 4, "--start-weight-decay", 0.1], "--start-weight-decay needs"),
    (["--train-iters", 4, "--ckpt-format", "torch"], "--ckpt-format torch is not implemented"),
])
def test_inconsistent_schedule_flags_are_refused(capsys, tmp_path, extra, words):
    assert words in error_of(capsys, base_flags(tmp_path, *extra))


# ------------------------------------------------------------------ Megatron-LM's data flags


VOCAB = 64  # NullTokenizer ids


def write_prefix(prefix: Path, low: int, high: int, documents: int = 40) -> str:
    """A Megatron indexed dataset `prefix.bin/.idx` of documents with ids in [low, high)."""
    rng = np.random.default_rng(low)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for _ in range(documents):
        ids = rng.integers(low, high, int(rng.integers(20, 40))).tolist() + [VOCAB - 1]
        builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def run_training(argv: list):
    """`stag train argv` in this process; returns (the finished Run, its TrainResult)."""
    args = arguments.finalize_args(arguments.parse_with_preset(train.build_parser(), argv))
    run = train.setup(args)
    try:
        return run, train.train_loop(run)
    finally:
        run.log.close()


def step_rates(result) -> list:
    return [record["lr"] for record in result.history if "lr" in record]


def test_weighted_prefixes_train(tmp_path):
    low = write_prefix(tmp_path / "low_text_document", 1, 30)
    high = write_prefix(tmp_path / "high_text_document", 30, VOCAB - 1)
    argv = base_flags(tmp_path, "--data-path", 0.25, low, 0.75, high, "--split", "80,20,0",
                      "--tokenizer-type", "NullTokenizer", "--vocab-size", VOCAB,
                      "--train-iters", 2)
    run, result = run_training(argv)
    assert result.iterations == 2 and math.isfinite(result.valid_loss)
    assert type(run.train_ds).__name__ == "BlendedDataset"
    assert [d.dataset.path_prefix for d in run.train_ds.datasets] == [low, high]
    assert run.train_ds.weights == pytest.approx([0.25, 0.75])
    assert run.args.split == "80,20,0" and run.tokenizer.vocab_size == VOCAB
    tokens = np.concatenate([run.train_ds[i]["tokens"].numpy() for i in range(4)])
    assert tokens.max() < VOCAB


def test_prefixes_without_split_take_megatron_lm_default(tmp_path):
    only = write_prefix(tmp_path / "only_text_document", 1, VOCAB - 1, documents=200)
    run, result = run_training(base_flags(
        tmp_path, "--data-path", only, "--tokenizer-type", "NullTokenizer", "--vocab-size",
        VOCAB, "--train-iters", 1))
    assert run.args.split == "969, 30, 1" and result.iterations == 1


@pytest.mark.parametrize("data, words", [
    (["0.5", "a_prefix"], "prefix a_prefix: no a_prefix.bin and a_prefix.idx"),
    (["0.5", "PREFIX", "b"], "prefix 0.5: no 0.5.bin and 0.5.idx"),  # odd: prefixes alone
    (["0", "PREFIX"], "weights [0.0] must be >= 0 and not all 0"),
])
def test_bad_data_paths_are_named(capsys, tmp_path, data, words):
    prefix = write_prefix(tmp_path / "p", 1, 30)
    data = [prefix if word == "PREFIX" else word for word in data]
    line = error_of(capsys, base_flags(tmp_path, "--data-path", *data, "--tokenizer-type",
                                       "NullTokenizer", "--vocab-size", VOCAB,
                                       "--train-iters", 1))
    assert words in line


def test_prefixes_need_a_tokenizer_type(capsys, tmp_path):
    prefix = write_prefix(tmp_path / "p", 1, 30)
    line = error_of(capsys, base_flags(tmp_path, "--data-path", prefix, "--train-iters", 1))
    assert "holds token ids already" in line and "--tokenizer-type" in line


def test_mock_data_trains(tmp_path):
    run, result = run_training(base_flags(
        tmp_path, "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", VOCAB,
        "--train-iters", 2))
    assert type(run.train_ds).__name__ == "MockGPTDataset"
    assert result.iterations == 2 and math.isfinite(result.valid_loss)


def test_train_samples_sets_the_iterations_and_counts_the_schedule_in_samples(tmp_path):
    prefix = write_prefix(tmp_path / "p", 1, VOCAB - 1)
    run, result = run_training(base_flags(
        tmp_path, "--data-path", prefix, "--split", "80,20,0", "--tokenizer-type",
        "NullTokenizer", "--vocab-size", VOCAB, "--train-samples", 9, "--lr-warmup-samples", 4,
        "--lr-decay-style", "linear"))
    assert result.iterations == run.args.train_iters == 4  # 9 // global batch 2, as Megatron-LM
    assert run.consumed_samples == 8 and run.args.lr_decay_samples == 9
    # samples consumed before each step: 0, 2, 4, 6; warm-up over 4 samples, then linear to 9
    expected = [1e-3 * s / 4 if s <= 4 else 1e-3 * (1 - (s - 4) / 5) for s in (0, 2, 4, 6)]
    assert step_rates(result) == pytest.approx(expected)


def wsd_rate(step: float, lr: float, min_lr: float, warmup: float, decay: float, wsd: float,
             style: str) -> float:
    """Warm-up, stable, decay: linear warm-up from 0, `lr` until the last `wsd` of `decay`
    steps, then down to min_lr in `style` (Megatron-Core's definitions of the four shapes)."""
    if warmup > 0 and step <= warmup:
        return lr * step / warmup
    if step > decay:
        return min_lr
    ratio = max(0.0, step - (decay - wsd)) / wsd
    coeff = {"linear": 1 - ratio, "cosine": 0.5 * (math.cos(math.pi * ratio) + 1),
             "exponential": 2 * 0.5 ** ratio - 1, "minus_sqrt": 1 - math.sqrt(ratio)}[style]
    return min_lr + coeff * (lr - min_lr)


@pytest.mark.parametrize("style", ["exponential", "linear", "cosine", "minus_sqrt"])
@pytest.mark.parametrize("unit", ["iters", "samples"])
def test_wsd_gives_the_expected_learning_rates(tmp_path, style, unit):
    batch = 4
    length = (["--train-iters", 40, "--lr-warmup-iters", 5, "--lr-wsd-decay-iters", 10]
              if unit == "iters" else
              ["--train-samples", 40 * batch, "--lr-warmup-samples", 5 * batch,
               "--lr-wsd-decay-samples", 10 * batch])
    args = arguments.finalize_args(arguments.parse_with_preset(train.build_parser(), base_flags(
        tmp_path, *length, "--global-batch-size", batch, "--min-lr", "1e-5", "--lr-decay-style",
        "WSD", "--lr-wsd-decay-style", style)))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    scheduler = runtime.build_scheduler(args, optimizer)
    rates = []
    for _ in range(40):
        rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step(increment=arguments.schedule_steps(args)["increment"])
    expected = [wsd_rate(i, 1e-3, 1e-5, 5, 40, 10, style) for i in range(40)]
    assert rates == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert rates[10] == rates[30] == pytest.approx(1e-3)  # stable until the last 10


def test_wsd_in_a_training_run(tmp_path):
    prefix = write_prefix(tmp_path / "p", 1, VOCAB - 1)
    _, result = run_training(base_flags(
        tmp_path, "--data-path", prefix, "--split", "80,20,0", "--tokenizer-type",
        "NullTokenizer", "--vocab-size", VOCAB, "--train-iters", 6, "--lr-warmup-iters", 1,
        "--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear", "--lr-wsd-decay-iters", 3))
    assert step_rates(result) == pytest.approx([0.0, 1e-3, 1e-3, 1e-3, 2e-3 / 3, 1e-3 / 3])


# ------------------------------------------------------------------ model flags


def test_group_query_attention_without_groups_has_one_group(tmp_path):
    """Megatron-LM's --num-query-groups default: 1 (multi-query attention)."""
    from stag_plugin.core.model import StagGPTModel

    args = arguments.finalize_args(arguments.parse_with_preset(train.build_parser(), base_flags(
        tmp_path, "--train-iters", 1, "--group-query-attention")))
    config = arguments.config_from_args(args)
    assert config.num_query_groups == 1
    model = StagGPTModel(config, vocab_size=128, max_sequence_length=16)
    qkv = next(value for key, value in model.state_dict().items()
               if key.endswith("self_attention.linear_qkv.weight"))
    assert qkv.shape[0] == 32 + 2 * 8  # queries of 4 heads of 8, one key and one value head
    args.group_query_attention = False
    assert arguments.architecture_of(args, 128)["num_query_groups"] is None


def test_swiglu_ffn_size_is_megatron_lm_default(tmp_path):
    args = arguments.finalize_args(arguments.parse_with_preset(train.build_parser(), base_flags(
        tmp_path, "--train-iters", 1, "--swiglu", "--hidden-size", 96)))
    assert args.ffn_hidden_size == 256  # int(4 * 96 * 2 / 3 / 64) * 64


# ------------------------------------------------------------------ presets and demo unchanged


# The presets' and the demo's chosen values for every flag whose default changed to
# Megatron-LM's (most were stag train's defaults before): they must keep training as before.
KEPT = dict(transformer_impl="local", position_embedding_type="rope", hidden_dropout=0.0,
            attention_dropout=0.0, weight_decay=0.1, adam_beta2=0.95, lr_decay_style="cosine")
PAPER = dict(KEPT, seq_length=1024, micro_batch_size=4, global_batch_size=1024,
             train_iters=250000, lr=3e-4, min_lr=3e-5, lr_warmup_iters=2000, log_interval=10,
             eval_interval=1000, eval_iters=50, num_attention_heads=16, hidden_size=2048)
PRESETS = {
    "tiny_cpu.yaml": dict(KEPT, num_layers=4, hidden_size=128, num_attention_heads=4,
                          seq_length=128, micro_batch_size=8, train_iters=100, lr=3e-3,
                          min_lr=3e-4, lr_warmup_iters=10, log_interval=5, eval_interval=25,
                          eval_iters=4, vocab_size=4096, distributed_timeout_minutes=2.0),
    "paper_gpt_18l.yaml": dict(PAPER, num_layers=18),
    "paper_gpt_36l.yaml": dict(PAPER, num_layers=36),
    "paper_stag_2x18_separate.yaml": dict(PAPER, num_layers=36),
    "paper_stag_2x18_shared.yaml": dict(PAPER, num_layers=36),
}
DEMO = {
    "default": dict(KEPT, hidden_size=128, num_attention_heads=4, seq_length=128,
                    micro_batch_size=16, train_iters=1200, lr=2e-3, min_lr=2e-4,
                    lr_warmup_iters=60, eval_interval=150, eval_iters=8, vocab_size=2048,
                    log_interval=1, seed=1234),
    "small": dict(KEPT, hidden_size=64, num_attention_heads=4, seq_length=64,
                  micro_batch_size=4, train_iters=12, lr=3e-3, min_lr=3e-4, lr_warmup_iters=2,
                  eval_interval=6, eval_iters=2, vocab_size=1024, log_interval=1, seed=1234),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_keep_their_values(preset):
    path = REPO / "configs" / preset
    assert set(PRESETS) == {p.name for p in (REPO / "configs").glob("*.yaml")}
    args = arguments.finalize_args(arguments.parse_with_preset(train.build_parser(),
                                                               ["--config", str(path)]))
    arguments.check_trainable(args)
    assert {key: getattr(args, key) for key in PRESETS[preset]} == PRESETS[preset]
    assert set(KEPT) <= set(yaml.safe_load(path.read_text()))  # said in the file itself


@pytest.mark.parametrize("size", sorted(DEMO))
def test_the_demo_keeps_its_values(size, tmp_path):
    options = argparse.Namespace(seed=1234, data_cache_dir=tmp_path, out=tmp_path,
                                 data_path=None, no_progress=True)
    for name, flags in demo.model_variants(demo.SIZES[size]["layers"],
                                           demo.SIZES[size]["window"]):
        argv = demo.train_flags(name, flags, demo.SIZES[size], options)
        args = arguments.finalize_args(arguments.parse_with_preset(train.build_parser(), argv))
        arguments.check_trainable(args)
        assert {key: getattr(args, key) for key in DEMO[size]} == DEMO[size], name
