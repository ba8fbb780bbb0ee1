"""Megatron-LM integration (stag_plugin.integrations.megatron_lm): flags, calling conventions,
model providers and builders, without running a training loop (tests/test_megatron_lm_training.py
runs Megatron-LM's own loop).

Tests taking `megatron_args` need Megatron-LM's `megatron.training`: from a checkout
(MEGATRON_LM_PATH, of the installed megatron-core's release line), or the copy megatron-core 0.19
installs (so they run in CI on `.venv-mcore`). The others run always.
"""

import argparse
import contextlib
import inspect
import io
import os
import sys
from pathlib import Path

import pytest
import torch

from stag_plugin import StagFormerConfig, StagGPTModel
from stag_plugin.compat.megatron import megatron_lm_pretrain_api
from stag_plugin.integrations import megatron_lm
from stag_plugin.integrations.megatron_lm import entry
from stag_plugin.training.arguments import STAG_FLAGS, add_stag_args

from megatron_lm_cpu import install_override_shim

CHECKOUT = os.environ.get("MEGATRON_LM_PATH")
install_override_shim()  # Megatron-LM 0.19's files on Python 3.11 (test-only)

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


@pytest.mark.parametrize("pretrain, expected", [(pretrain_0_16, "positional"),
                                                (pretrain_0_18, "config"),
                                                (pretrain_0_19, "model_config")])
def test_pretrain_api_from_signature(pretrain, expected):
    assert megatron_lm_pretrain_api(pretrain) == expected


def test_pretrain_api_unknown_signature_is_refused():
    with pytest.raises(TypeError, match="unrecognised Megatron-LM pretrain"):
        megatron_lm_pretrain_api(lambda config, providers: None)


def _providers():
    return dict(train_valid_test_dataset_provider=lambda n: None,
                forward_step_func=lambda it, m: None)


def test_run_pretrain_positional_api_passes_the_stag_flags():
    from megatron.core.enums import ModelType

    providers = _providers()
    called = megatron_lm.run_pretrain(*providers.values(), pretrain=pretrain_0_16,
                                      args_defaults={"tokenizer_type": "NullTokenizer"})
    assert called["api"] == "positional"
    assert called["extra_args_provider"] is add_stag_args
    assert called["args_defaults"] == {"tokenizer_type": "NullTokenizer"}
    assert called["model_type"] == ModelType.encoder_or_decoder
    assert called["model_provider"] is megatron_lm.model_provider
    assert called["get_embedding_ranks"] is megatron_lm.get_embedding_ranks
    for name, provider in providers.items():
        assert called[name] is provider


@pytest.mark.parametrize("pretrain, with_model_config", [(pretrain_0_18, False),
                                                         (pretrain_0_19, True)])
def test_run_pretrain_config_api_builds_the_container(pretrain, with_model_config,
                                                      monkeypatch):
    """0.18: a container without a model config, the model from model_provider; 0.19: a
    container holding the StagGPTModelConfig, no model provider (deprecated there)."""
    seen = {}

    def container(extra_args_provider, args_defaults, with_model_config):
        seen.update(extra=extra_args_provider, defaults=args_defaults, model=with_model_config)
        return "container"

    monkeypatch.setattr(entry, "pretrain_config_container", container)
    called = megatron_lm.run_pretrain(*_providers().values(), pretrain=pretrain)
    assert called["cfg_container"] == "container"
    assert seen == dict(extra=add_stag_args, defaults={}, model=with_model_config)
    expected_provider = None if with_model_config else megatron_lm.model_provider
    assert called["model_provider"] is expected_provider
    assert called["get_embedding_ranks"] is megatron_lm.get_embedding_ranks


def test_embedding_ranks_are_the_first_stage_alone():
    assert megatron_lm.get_embedding_ranks([3, 5, 7]) == [3]


def test_opt_in_flags_keep_a_gpt_script_a_gpt():
    """A patched pretrain_gpt.py parses the --stag-* flags with --stag-num-sections 1 by
    default: without them it trains its GPT."""
    parser = megatron_lm.add_stag_args_opt_in(argparse.ArgumentParser())
    assert not megatron_lm.uses_stag_model(parser.parse_args([]))
    assert megatron_lm.uses_stag_model(parser.parse_args(["--stag-num-sections", "2"]))
    assert megatron_lm.uses_stag_model(add_stag_args(argparse.ArgumentParser()).parse_args([]))


def test_model_provider_refuses_virtual_pipeline():
    with pytest.raises(NotImplementedError, match="interleaved .virtual. pipeline"):
        megatron_lm.model_provider(pre_process=True, post_process=False, vp_stage=0)
    with pytest.raises(NotImplementedError, match="interleaved .virtual. pipeline"):
        megatron_lm.model.refuse_virtual_stage(1)
    args = argparse.Namespace(virtual_pipeline_model_parallel_size=2)
    with pytest.raises(NotImplementedError, match="--num-layers-per-virtual-pipeline-stage"):
        megatron_lm.check_megatron_lm_args(args)


@pytest.mark.parametrize("name", ["mtp_num_layers", "spec", "decoder_first_pipeline_num_layers"])
def test_unsupported_megatron_lm_options_are_refused(name):
    args = argparse.Namespace(virtual_pipeline_model_parallel_size=None, **{name: 1})
    with pytest.raises(NotImplementedError, match=f"--{name.replace('_', '-')}"):
        megatron_lm.check_megatron_lm_args(args)


def test_transformer_impl_chooses_the_layers():
    """--transformer-impl transformer_engine (Megatron-LM's default) builds Transformer Engine
    layers (refused with the install where TE is missing: never local layers instead);
    inference_optimized is refused by name (tests/test_transformer_engine.py has the rest)."""
    from stag_plugin.compat.megatron import transformer_engine_available
    from stag_plugin.errors import MissingDependency

    def args(impl):
        return argparse.Namespace(virtual_pipeline_model_parallel_size=None,
                                  transformer_impl=impl)

    if not transformer_engine_available():
        with pytest.raises(MissingDependency, match="--transformer-impl transformer_engine.*"
                                                    "needs NVIDIA Transformer Engine"):
            megatron_lm.check_megatron_lm_args(args("transformer_engine"))
    with pytest.raises(NotImplementedError, match="--transformer-impl inference_optimized"):
        megatron_lm.check_megatron_lm_args(args("inference_optimized"))
    megatron_lm.check_megatron_lm_args(argparse.Namespace(transformer_impl="local"))


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


# ------------------------------------------------------------------ with megatron.training


@pytest.fixture(scope="module")
def megatron_training():
    """Megatron-LM's megatron.training: the checkout's, else the installed one, else skip."""
    import importlib.util

    import megatron.core

    if CHECKOUT:
        path = Path(CHECKOUT).resolve()
        text = (path / "megatron" / "core" / "package_info.py").read_text()
        if f"MINOR = {megatron.core.__version__.split('.')[1]}\n" not in text:
            pytest.skip(f"MEGATRON_LM_PATH={CHECKOUT} is another release line than "
                        f"megatron-core {megatron.core.__version__}")
        sys.path.insert(0, str(path))
        yield path
        sys.path.remove(str(path))
        return
    if importlib.util.find_spec("megatron.training") is None:
        pytest.skip("megatron.training is not importable: set MEGATRON_LM_PATH to a Megatron-LM "
                    "checkout of the installed megatron-core's release (megatron-core 0.19 "
                    "installs it)")
    yield None


@pytest.fixture(scope="module")
def megatron_args(megatron_training):
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


def _assert_same_model(built: StagGPTModel, vocab: int) -> None:
    """`built` (seeded 7) equals a StagGPTModel built directly from _equivalent_config()."""
    torch.manual_seed(7)
    direct = StagGPTModel(_equivalent_config(), vocab_size=vocab, max_sequence_length=32).eval()
    assert isinstance(built, StagGPTModel)
    ours, theirs = built.eval().state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        if isinstance(ours[key], torch.Tensor):
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(32).expand(2, 32)
    with torch.no_grad():
        logits = built(tokens, positions)
        torch.testing.assert_close(logits, direct(tokens, positions), rtol=0, atol=1e-6)
    assert logits.shape == (2, 32, vocab)


def test_model_provider_matches_a_directly_built_model(megatron_args):
    torch.manual_seed(7)
    built = megatron_lm.model_provider(pre_process=True, post_process=True, config=None,
                                       pg_collection=None)
    _assert_same_model(built, megatron_args.padded_vocab_size)


def test_model_builder_matches_a_directly_built_model(megatron_args):
    """Megatron-LM 0.19's path: the args -> StagGPTModelConfig (through Megatron-LM's own
    gpt_config_from_args) -> its builder class, as pretrain() resolves and calls it."""
    from megatron.training import pretrain

    if megatron_lm_pretrain_api(pretrain) != "model_config":
        pytest.skip("Megatron-LM < 0.19 has no model-config path")
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.argument_utils import pretrain_cfg_container_from_args

    container = pretrain_cfg_container_from_args(megatron_args,
                                                 megatron_lm.stag_model_config(megatron_args))
    cfg = container.model
    assert isinstance(cfg, megatron_lm.StagGPTModelConfig)
    assert isinstance(cfg.transformer, StagFormerConfig)
    assert cfg.transformer.cross_attention_window == 8
    builder_cls = cfg.get_builder_cls()  # how pretrain() finds the builder
    assert builder_cls is megatron_lm.StagGPTModelBuilder
    torch.manual_seed(7)  # the conftest's parallel state: TP = PP = 1
    built = builder_cls(cfg).build_model(ProcessGroupCollection.use_mpu_process_groups())
    _assert_same_model(built, megatron_args.padded_vocab_size)


def test_model_config_refuses_a_plain_transformer_config(megatron_args):
    from megatron.training import pretrain

    if megatron_lm_pretrain_api(pretrain) != "model_config":
        pytest.skip("Megatron-LM < 0.19 has no model-config path")
    from megatron.core.transformer import TransformerConfig

    cfg = megatron_lm.stag_model_config(megatron_args)
    cfg.transformer = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    with pytest.raises(Exception, match="not a StagFormerConfig"):
        cfg.finalize()


def test_entry_picks_the_installed_api(megatron_training):
    """The calling convention run_pretrain will use with this megatron.training."""
    from megatron.training import pretrain

    params = inspect.signature(pretrain).parameters
    expected = ("positional" if "cfg_container" not in params else
                "model_config" if params["model_provider"].default is None else "config")
    assert megatron_lm_pretrain_api(pretrain) == expected
