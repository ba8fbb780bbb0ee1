"""Megatron-LM integration (stag_plugin.integrations.megatron_lm, examples/megatron_lm, patches/).

Tests marked `checkout` need a Megatron-LM checkout: set MEGATRON_LM_PATH to one at tag
core_v0.16.1 (plus `pip install six regex einops pyyaml pydantic triton`). The others run always.
"""

import argparse
import contextlib
import importlib.util
import inspect
import io
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

from stag_plugin import StagFormerConfig, StagGPTModel
from stag_plugin.compat.megatron import megatron_lm_pretrain_api
from stag_plugin.integrations import megatron_lm
from stag_plugin.training.arguments import STAG_FLAGS, add_stag_args

REPO = Path(__file__).resolve().parents[1]
ENTRY = REPO / "examples" / "megatron_lm" / "pretrain_stag.py"
PATCH = REPO / "patches" / "pretrain_gpt.patch"
CHECKOUT = os.environ.get("MEGATRON_LM_PATH")
NEEDS_CHECKOUT = ("set MEGATRON_LM_PATH to a Megatron-LM checkout at tag core_v0.16.1 (and "
                  "`pip install six regex einops pyyaml pydantic triton`) to run this test")

COMMAND_LINE = (
    "--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 32 "
    "--max-position-embeddings 32 --micro-batch-size 2 --global-batch-size 4 --train-iters 2 "
    "--lr 1e-3 --tokenizer-type NullTokenizer --vocab-size 128 --mock-data "
    "--position-embedding-type rope --no-rope-fusion --transformer-impl local "
    "--no-gradient-accumulation-fusion "
    "--stag-num-sections 2 --stag-weight-sharing shared --stag-cross-attention-window 8"
).split()


# ------------------------------------------------------------------ no checkout needed

# pretrain() signatures of Megatron-LM releases (parameters only; bodies do not matter).
def pretrain_0_16(train_valid_test_dataset_provider, model_provider, model_type,
                  forward_step_func, process_non_loss_data_func=None, extra_args_provider=None,
                  args_defaults={}, get_embedding_ranks=None,  # noqa: B006 (Megatron-LM's) get_position_embedding_ranks=None,
                  non_loss_data_func=None, store=None, inprocess_call_wrapper=None):
    return dict(api="positional", **{k: v for k, v in locals().items()})


def pretrain_0_18(cfg_container, train_valid_test_dataset_provider, model_provider, model_type,
                  forward_step_func, process_non_loss_data_func=None, get_embedding_ranks=None,
                  get_position_embedding_ranks=None, non_loss_data_func=None, store=None,
                  inprocess_call_wrapper=None):
    return dict(api="config", **{k: v for k, v in locals().items()})


def pretrain_0_19(cfg_container, train_valid_test_dataset_provider, model_type, forward_step_func,
                  model_provider=None, process_non_loss_data_func=None, get_embedding_ranks=None,
                  get_position_embedding_ranks=None, non_loss_data_func=None, store=None,
                  inprocess_call_wrapper=None, p2p_communicator=None, pg_collection=None,
                  skip_model_parallel_init=False):
    return dict(api="config", **{k: v for k, v in locals().items()})


@pytest.mark.parametrize("pretrain", [pretrain_0_16, pretrain_0_18, pretrain_0_19])
def test_pretrain_api_from_signature(pretrain):
    expected = "positional" if pretrain is pretrain_0_16 else "config"
    assert megatron_lm_pretrain_api(pretrain) == expected


def test_pretrain_api_unknown_signature_is_refused():
    with pytest.raises(TypeError, match="unrecognised Megatron-LM pretrain"):
        megatron_lm_pretrain_api(lambda config, providers: None)


def _providers():
    return dict(train_valid_test_dataset_provider=lambda n: None,
                model_provider=megatron_lm.model_provider, forward_step_func=lambda it, m: None)


def test_run_pretrain_positional_api_passes_the_stag_flags():
    from megatron.core.enums import ModelType

    providers = _providers()
    called = megatron_lm.run_pretrain(*providers.values(), pretrain=pretrain_0_16,
                                      args_defaults={"tokenizer_type": "NullTokenizer"})
    assert called["api"] == "positional"
    assert called["extra_args_provider"] is add_stag_args
    assert called["args_defaults"] == {"tokenizer_type": "NullTokenizer"}
    assert called["model_type"] == ModelType.encoder_or_decoder
    for name, provider in providers.items():
        assert called[name] is provider


@pytest.mark.parametrize("pretrain", [pretrain_0_18, pretrain_0_19])
def test_run_pretrain_config_api_builds_the_container(pretrain, monkeypatch):
    seen = {}

    def container(extra_args_provider, args_defaults):
        seen.update(extra_args_provider=extra_args_provider, args_defaults=args_defaults)
        return "container"

    monkeypatch.setattr(megatron_lm, "pretrain_config_container", container)
    providers = _providers()
    called = megatron_lm.run_pretrain(*providers.values(), pretrain=pretrain)
    assert called["cfg_container"] == "container"
    assert called["model_provider"] is megatron_lm.model_provider  # by keyword, in 0.19 too
    assert seen == dict(extra_args_provider=add_stag_args, args_defaults={})


def test_model_provider_refuses_virtual_pipeline():
    with pytest.raises(NotImplementedError, match="interleaved .virtual. pipeline"):
        megatron_lm.model_provider(pre_process=True, post_process=False, vp_stage=0)
    args = argparse.Namespace(virtual_pipeline_model_parallel_size=2)
    with pytest.raises(NotImplementedError, match="--num-layers-per-virtual-pipeline-stage"):
        megatron_lm.check_megatron_lm_args(args)


@pytest.mark.parametrize("name", ["mtp_num_layers", "spec", "decoder_first_pipeline_num_layers"])
def test_unsupported_megatron_lm_options_are_refused(name):
    args = argparse.Namespace(virtual_pipeline_model_parallel_size=None, **{name: 1})
    with pytest.raises(NotImplementedError, match=f"--{name.replace('_', '-')}"):
        megatron_lm.check_megatron_lm_args(args)


@pytest.mark.parametrize("pipeline, sections, combination, refused", [
    (2, 2, "last", False),     # one section per stage: each boundary carries the memory
    (2, 4, "last", False),     # two sections per stage
    (4, 2, "last", True),      # a boundary inside section 2 carries hidden + memory
    (2, 2, "learned", True),   # memory + the running output combination
])
def test_megatron_lm_needs_one_tensor_per_stage_boundary(pipeline, sections, combination,
                                                         refused):
    config = StagFormerConfig(num_layers=4, hidden_size=64, num_attention_heads=4,
                              num_sections=sections, output_combination=combination,
                              pipeline_model_parallel_size=pipeline)
    if not refused:
        megatron_lm.check_boundary_shapes(config)
        return
    with pytest.raises(NotImplementedError, match="one .s, b, h. tensor per boundary"):
        megatron_lm.check_boundary_shapes(config)


def test_extra_args_providers_return_the_parser():
    parser = argparse.ArgumentParser()
    assert add_stag_args(parser) is parser
    other = lambda p: p.add_argument("--other", type=int, default=0) and p  # noqa: E731
    chained = megatron_lm.chain_args_providers(add_stag_args, None, other)
    args = chained(argparse.ArgumentParser()).parse_args(["--stag-num-sections", "3",
                                                         "--other", "1"])
    assert (args.stag_num_sections, args.other) == (3, 1)
    assert megatron_lm.uses_stag_model(args)
    assert not megatron_lm.uses_stag_model(argparse.Namespace(stag_num_sections=1))


# ------------------------------------------------------------------ with a Megatron-LM checkout


@pytest.fixture(scope="module")
def checkout():
    if not CHECKOUT:
        pytest.skip(NEEDS_CHECKOUT)
    path = str(Path(CHECKOUT).resolve())
    if not (Path(path) / "megatron" / "training").is_dir():
        pytest.fail(f"MEGATRON_LM_PATH={CHECKOUT} is not a Megatron-LM checkout "
                    "(no megatron/training). " + NEEDS_CHECKOUT)
    sys.path.insert(0, path)
    yield Path(path)
    sys.path.remove(path)


@pytest.fixture(scope="module")
def megatron_args(checkout):
    """A real Megatron-LM command line, parsed and validated, set as Megatron-LM's global args."""
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.global_vars import set_global_variables, unset_global_variables

    argv, sys.argv = sys.argv, ["pretrain_stag.py"] + COMMAND_LINE
    try:
        args = parse_args(extra_args_provider=add_stag_args, ignore_unknown_args=False)
    finally:
        sys.argv = argv
    with contextlib.redirect_stdout(io.StringIO()):  # Megatron-LM prints every argument
        validate_args(args, {})
        set_global_variables(args)  # also builds the tokenizer: args.padded_vocab_size
    yield args
    unset_global_variables()


def test_megatron_lm_parses_the_stag_flags(megatron_args):
    args = megatron_args
    assert (args.stag_num_sections, args.stag_weight_sharing) == (2, "shared")
    assert (args.stag_cross_attention_window, args.stag_output_combination) == (8, "last")
    assert args.stag_cross_attention_rope is True
    config = megatron_lm.stag_config_from_megatron_args(args)
    assert isinstance(config, StagFormerConfig)
    for flag, field, _ in STAG_FLAGS:
        assert getattr(config, field) == getattr(args, flag[2:].replace("-", "_")), field
    assert (config.num_layers, config.hidden_size, config.layers_per_section) == (4, 64, 2)
    assert config.position_embedding_type == "rope"
    assert not hasattr(args, "num_sections")  # Megatron-LM's namespace is left alone


def test_model_provider_installs_the_replica_gradient_sum(megatron_args):
    """Megatron-LM's train() sets config.finalize_model_grads_func to its module's
    finalize_model_grads: building the model wraps that function once with the pipeline-replica
    sum (stag_plugin.parallel.pipeline), however often the provider runs."""
    from megatron.training import training

    from stag_plugin.parallel import pipeline

    original = training.finalize_model_grads
    try:
        megatron_lm.model_provider()
        megatron_lm.model_provider()
        wrapped = training.finalize_model_grads
        assert getattr(wrapped, "_stag_replica_sync", False)
        assert wrapped.func is pipeline.finalize_model_grads and wrapped.args == (original,)
    finally:
        training.finalize_model_grads = original


def test_megatron_lm_arg_errors_name_the_flag(megatron_args):
    args = argparse.Namespace(**vars(megatron_args))
    args.position_embedding_type = "learned_absolute"  # Megatron-LM's default
    with pytest.raises(ValueError, match="--stag-cross-attention-rope: .*needs position_emb"):
        megatron_lm.stag_config_from_megatron_args(args)


def _equivalent_config() -> StagFormerConfig:
    """The StagFormerConfig COMMAND_LINE describes, written out by hand."""
    return StagFormerConfig(
        num_layers=4, hidden_size=64, num_attention_heads=4, num_sections=2,
        weight_sharing="shared", cross_attention_window=8, position_embedding_type="rope",
        hidden_dropout=0.1, attention_dropout=0.1, bias_activation_fusion=True,
        bias_dropout_fusion=True, use_cpu_initialization=True,
    )


def test_model_provider_matches_a_directly_built_model(megatron_args):
    torch.manual_seed(7)
    via_megatron_lm = megatron_lm.model_provider(pre_process=True, post_process=True,
                                                 config=None, pg_collection=None).eval()
    torch.manual_seed(7)
    direct = StagGPTModel(_equivalent_config(), vocab_size=megatron_args.padded_vocab_size,
                          max_sequence_length=32).eval()
    assert isinstance(via_megatron_lm, StagGPTModel)
    ours, theirs = via_megatron_lm.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        if isinstance(ours[key], torch.Tensor):
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(32).expand(2, 32)
    with torch.no_grad():
        logits = via_megatron_lm(tokens, positions)
        torch.testing.assert_close(logits, direct(tokens, positions), rtol=0, atol=1e-6)
    assert logits.shape == (2, 32, megatron_args.padded_vocab_size)


def _checkout_version(checkout: Path) -> str:
    info = {}
    exec((checkout / "megatron" / "core" / "package_info.py").read_text(), info)
    return info["__version__"]


@pytest.fixture(scope="module")
def patched_script(checkout, tmp_path_factory):
    """The checkout's pretrain_gpt.py with patches/pretrain_gpt.patch applied (a copy)."""
    version = _checkout_version(checkout)
    if not version.startswith("0.16."):
        pytest.skip(f"patches/pretrain_gpt.patch targets core_v0.16.x; checkout is {version}")
    folder = tmp_path_factory.mktemp("patched")
    (folder / "pretrain_gpt.py").write_bytes((checkout / "pretrain_gpt.py").read_bytes())
    check = subprocess.run(["git", "apply", "--check", "-v", str(PATCH)], cwd=folder,
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    subprocess.run(["git", "apply", str(PATCH)], cwd=folder, check=True)
    return folder / "pretrain_gpt.py"


def _import(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mock_batches(datasets_provider, args):
    with contextlib.redirect_stdout(io.StringIO()):
        train, _, _ = datasets_provider([8, 4, 4])
    return iter(torch.utils.data.DataLoader(train, batch_size=args.micro_batch_size))


def _check_one_step(forward_step, batches, model):
    output, loss_func = forward_step(batches, model)
    assert output.shape == (2, 32)  # per-token losses [b, s]
    loss, num_tokens, report = loss_func(output)
    assert torch.isfinite(loss) and int(num_tokens) > 0 and "lm loss" in report


def test_patched_pretrain_gpt_trains_a_stagformer(patched_script, megatron_args, monkeypatch):
    """The patch applies; its model provider builds a StagGPTModel for --stag-num-sections 2
    (and Megatron's GPT for 1), and its datasets, batch and loss run one micro-batch."""
    script = _import(patched_script, "pretrain_gpt_patched")

    def whole_batch_on_cpu(data_iterator, mtp_on_this_rank=False):
        """Megatron-LM's get_batch_on_this_tp_rank (which moves the batch to CUDA), on CPU."""
        assert mtp_on_this_rank, "the patched get_batch must ask for the whole batch"
        data = next(data_iterator)
        return {key: data.get(key) for key in megatron_lm.BATCH_KEYS}  # Megatron-LM's order

    monkeypatch.setattr(script, "get_batch_on_this_tp_rank", whole_batch_on_cpu)
    gpt_provider = partial(script.model_provider, script.gpt_builder)
    provider = megatron_lm.model_provider_or(gpt_provider)
    torch.manual_seed(0)
    model = provider(pre_process=True, post_process=True, config=None, pg_collection=None)
    assert isinstance(model, StagGPTModel)
    megatron_args.stag_num_sections = 1
    try:
        assert megatron_lm.model_provider_or(lambda **kw: "gpt")(pre_process=True) == "gpt"
    finally:
        megatron_args.stag_num_sections = 2
    _check_one_step(script.forward_step,
                    _mock_batches(script.train_valid_test_datasets_provider, megatron_args), model)


@pytest.fixture(scope="module")
def entry(checkout):
    return _import(ENTRY, "pretrain_stag")


def test_entry_script_imports_and_picks_the_checkouts_api(entry, checkout):
    from megatron.training import pretrain

    expected = "config" if "cfg_container" in inspect.signature(pretrain).parameters \
        else "positional"
    assert megatron_lm_pretrain_api(pretrain) == expected
    if _checkout_version(checkout).startswith(("0.16.", "0.17.")):
        assert expected == "positional"
    assert callable(entry.main) and entry.train_valid_test_datasets_provider.is_distributed


def test_entry_forward_step_on_mock_data(entry, megatron_args):
    """The entry's datasets, batch and loss on one micro-batch of Megatron's mock data."""
    batches = _mock_batches(entry.train_valid_test_datasets_provider, megatron_args)
    torch.manual_seed(0)
    _check_one_step(entry.forward_step, batches, megatron_lm.model_provider())
