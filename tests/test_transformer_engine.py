"""The Transformer Engine backend on a CPU, without Transformer Engine.

- Specs: every slot names megatron-core's TE class (section 1 is Megatron's own GPT TE layer),
  the cross-attention StagFormer's TE slots.
- Wiring: with torch stand-ins for the TE classes (tests/te_stand_ins.py), a TE-layout model
  given a local model's weights through the name map computes the same logits, saves the same
  checkpoint names, decodes, and hands its cross-attention core the causal mask and its window.
- FP8: every rule of stag_plugin.core.fp8 says why (warning or refusal); the cross-attention
  leaves the FP8 region where only it has no kernel; a shared module runs once per FP8 region.
- Flags: stag train's and Megatron-LM's FP8 / --transformer-impl flags reach the config; without
  Transformer Engine the backend is refused with the install.

What needs Transformer Engine and a GPU (its kernels, FP8 numerics) is bench/gpu/te_check.py's.
"""

import argparse
import contextlib
import dataclasses
import functools
import itertools

import pytest
import torch

from stag_plugin import StagGPTModel, get_stag_layer_spec
from stag_plugin.compat import megatron as compat
from stag_plugin.core import fp8
from stag_plugin.core.attention import (
    StagCrossAttention,
    StagTEDotProductAttention,
    cross_core_config,
    cross_mask_type,
    te_window,
)
from stag_plugin.core.config import ConfigError
from stag_plugin.decode.engine import StagDecoder
from stag_plugin.errors import MissingDependency, NotSupported
from stag_plugin.reference.model import ReferenceConfig
from stag_plugin.reference.name_map import (
    local_key,
    megatron_shapes,
    megatron_to_reference,
    reference_to_megatron,
)

import te_stand_ins
from stag_testing import (
    MAX_LEN,
    VOCAB,
    build_model,
    decode_logits,
    fresh_seed,
    modes_for,
    random_tokens,
    tiny_config,
    variant_id,
)

TE_AVAILABLE = compat.transformer_engine_available()
NEEDS_NO_TE = pytest.mark.skipif(TE_AVAILABLE, reason="Transformer Engine is installed here")

VARIANTS = [
    dict(num_sections=1),
    dict(num_sections=2),
    dict(num_sections=2, weight_sharing="shared"),
    dict(num_sections=2, cross_attention_window=1),
    dict(num_sections=3, cross_attention_window=3, output_combination="learned"),
    dict(num_sections=3, weight_sharing="shared", cross_attention_window=2),
    dict(num_sections=2, num_query_groups=2, cross_attention_rope=False,
         position_embedding_type="learned_absolute"),
    dict(num_sections=2, normalization="RMSNorm", add_bias_linear=False, gated_linear_unit=True),
    dict(num_sections=2, qk_layernorm=True, weight_sharing="shared"),
]


@pytest.fixture
def te_reported(monkeypatch):
    """Transformer Engine reported installed (>= 1.9); megatron-core's TE classes unchanged."""
    from megatron.core.extensions import transformer_engine_spec_provider

    monkeypatch.setattr(compat, "transformer_engine_available", lambda: True)
    monkeypatch.setattr(transformer_engine_spec_provider, "is_te_min_version",
                        lambda *args, **kwargs: True)


@pytest.fixture
def te_layers(monkeypatch):
    """megatron-core's TE classes replaced by torch stand-ins (tests/te_stand_ins.py)."""
    te_stand_ins.install(monkeypatch)


def te_classes():
    from megatron.core.extensions import transformer_engine as te

    return te


# ------------------------------------------------------------------ specs


def describe(spec):
    """A spec tree as plain values (ModuleSpec / partial / submodule dataclasses unfolded;
    classes compared by identity), for slot-by-slot comparison."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, ModuleSpec):
        return ("spec", spec.module, spec.params, describe(spec.submodules))
    if isinstance(spec, functools.partial):
        return ("partial", spec.func, spec.args, describe(spec.keywords))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return {f.name: describe(getattr(spec, f.name)) for f in dataclasses.fields(spec)}
    if isinstance(spec, dict):
        return {k: describe(v) for k, v in spec.items()}
    return spec


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_te_spec_names_megatron_classes_slot_by_slot(te_reported, qk_layernorm):
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp

    te = te_classes()
    specs = get_stag_layer_spec("transformer_engine", qk_layernorm=qk_layernorm)
    assert specs.final_layernorm is te.TENorm
    for spec in (specs.first_section, specs.later_sections):
        layer = spec.submodules
        assert layer.input_layernorm is IdentityOp and layer.pre_mlp_layernorm is IdentityOp
        attn = layer.self_attention
        assert attn.module is SelfAttention and attn.params == {"attn_mask_type":
                                                               AttnMaskType.causal}
        slots = attn.submodules
        assert slots.linear_qkv is te.TELayerNormColumnParallelLinear
        assert slots.core_attention is te.TEDotProductAttention
        assert slots.linear_proj is te.TERowParallelLinear
        qk = te.TENorm if qk_layernorm else IdentityOp
        assert slots.q_layernorm is qk and slots.k_layernorm is qk
        fc1, fc2 = mlp_slots(layer.mlp)  # pre_mlp_layernorm fused into linear_fc1
        assert fc1 is te.TELayerNormColumnParallelLinear and fc2 is te.TERowParallelLinear
    first, later = specs.first_section.submodules, specs.later_sections.submodules
    assert first.cross_attention is IdentityOp and first.pre_cross_attn_layernorm is IdentityOp
    assert later.pre_cross_attn_layernorm is IdentityOp  # fused into linear_q
    cross = later.cross_attention
    assert cross.module is StagCrossAttention
    assert cross.params == {"attn_mask_type": AttnMaskType.causal}
    assert cross.submodules.linear_q is te.TELayerNormColumnParallelLinear
    assert cross.submodules.linear_kv is te.TEColumnParallelLinear
    assert cross.submodules.core_attention is StagTEDotProductAttention
    assert cross.submodules.linear_proj is te.TERowParallelLinear
    assert later.cross_attn_bda is get_bias_dropout_add


def mlp_slots(mlp):
    """(linear_fc1, linear_fc2) of an MLP spec (a ModuleSpec in 0.16, a partial in 0.19)."""
    submodules = mlp.submodules if hasattr(mlp, "submodules") else mlp.keywords["submodules"]
    return submodules.linear_fc1, submodules.linear_fc2


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_section_one_is_megatrons_gpt_te_layer(te_reported, monkeypatch, qk_layernorm):
    """Section 1's layer is what get_gpt_layer_with_transformer_engine_spec builds, slot by slot
    (its keys map, for TE's operation-fuser MLP names, does not apply: no fuser here)."""
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.models.gpt import gpt_layer_specs

    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", TESpecProvider, raising=False)
    megatron = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
        qk_layernorm=qk_layernorm)
    ours = get_stag_layer_spec("transformer_engine", qk_layernorm=qk_layernorm).first_section
    assert megatron.module is ours.module
    theirs, mine = describe(megatron.submodules), describe(ours.submodules)
    theirs.pop("sharded_state_dict_keys_map"), mine.pop("sharded_state_dict_keys_map")
    assert mine == theirs


def test_cross_attention_core_has_its_own_window_and_causal_mask():
    from megatron.core.transformer.enums import AttnMaskType

    assert te_window(None) is None and te_window(1) == (0, 0) and te_window(4) == (3, 0)
    for window in (None, 1, 5):
        cfg = tiny_config(cross_attention_window=window)
        core = cross_core_config(cfg)
        assert core.window_size == te_window(window) and core.window_attn_skip_freq is None
        assert cfg.window_size is None  # the model's own config is untouched
    assert cross_mask_type(7, 7) == AttnMaskType.causal  # training, prefill
    assert cross_mask_type(1, 7) == AttnMaskType.causal_bottom_right  # a step over a cache


@NEEDS_NO_TE
def test_without_transformer_engine_the_backend_names_the_install():
    with pytest.raises(MissingDependency, match=r"Transformer Engine backend.*needs NVIDIA "
                                                r"Transformer Engine.*pip install"):
        get_stag_layer_spec("transformer_engine")
    with pytest.raises(ImportError):  # (also an ImportError)
        get_stag_layer_spec("transformer_engine")
    with pytest.raises(MissingDependency, match="transformer_impl='local'"):
        StagGPTModel(tiny_config(transformer_impl="transformer_engine"), VOCAB, MAX_LEN)


def test_unknown_backend_is_refused():
    with pytest.raises(ConfigError, match="transformer_impl='inference_optimized'"):
        tiny_config(transformer_impl="inference_optimized")


# ------------------------------------------------------------------ wiring (stand-ins)


def te_twin(local: StagGPTModel, **overrides) -> StagGPTModel:
    """A TE-layout StagGPTModel holding `local`'s weights (each TE key read under its local
    name, stag_plugin.reference.name_map.local_key)."""
    config = dataclasses.replace(local.config, transformer_impl="transformer_engine",
                                 **overrides)
    twin = StagGPTModel(config, VOCAB, MAX_LEN).eval()
    weights = local.state_dict()
    twin.load_state_dict({key: value if key.endswith("_extra_state")
                          else weights[local_key(key)]
                          for key, value in twin.state_dict().items()})
    return twin


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_te_layout_matches_local_model_on_the_same_weights(te_layers, variant):
    seed = fresh_seed()
    local = build_model(tiny_config(**variant), seed=seed % 1000)
    twin = te_twin(local)
    assert any(k.endswith("linear_qkv.layer_norm_weight") for k in twin.state_dict())
    tokens, positions = random_tokens(2, 11, seed)
    with torch.no_grad():
        torch.testing.assert_close(twin(tokens, positions), local(tokens, positions),
                                   atol=1e-5, rtol=1e-5, msg=f"seed {seed}")


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_te_layout_saves_the_local_checkpoint_names(te_layers, variant):
    """Distributed checkpoints name every tensor the same in both backends (fused norms under
    the norms' names), so every reader of checkpoints (convert, the name map) reads both."""
    local = build_model(tiny_config(**variant))
    twin = te_twin(local)

    def tensors(model):  # the names written to the checkpoint (tensors, tensor factories)
        return {v.key: tuple(v.data.shape) for v in model.sharded_state_dict().values()
                if isinstance(getattr(v, "data", None), torch.Tensor)}

    assert tensors(twin) == tensors(local)
    assert {twin.checkpoint_key(name) for name, _ in twin.named_parameters()} <= set(
        tensors(local))
    if not local.config.qk_layernorm:  # (the reference model has no q/k norms)
        cfg = ReferenceConfig.from_megatron(local.config, VOCAB, MAX_LEN, True)
        assert set(megatron_shapes(cfg)) == set(tensors(twin))
        ours, theirs = (megatron_to_reference(m.state_dict(), cfg) for m in (twin, local))
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
        back = reference_to_megatron(ours, cfg, list(twin.state_dict()))
        assert all(torch.equal(back[k], v) for k, v in twin.state_dict().items()
                   if not k.endswith("_extra_state"))


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v["num_sections"] > 1][:6],
                         ids=variant_id)
def test_te_layout_decodes_as_it_trains(te_layers, variant):
    """StagDecoder over TE-layout modules (norms fused into linear_qkv / linear_q / linear_fc1,
    norm slots IdentityOp) gives the teacher-forced logits."""
    seed = fresh_seed()
    twin = te_twin(build_model(tiny_config(**variant), seed=seed % 1000))
    tokens, positions = random_tokens(2, 10, seed)
    with torch.no_grad():
        expected = twin(tokens, positions)
    for mode, prompt in itertools.product(modes_for(variant), (1, 4)):
        got = decode_logits(StagDecoder(twin, 2, 16, mode=mode), tokens, prompt)
        diff = (got - expected[:, prompt - 1:]).abs().max().item()
        assert diff < 1e-4, f"seed {seed}, mode {mode}, prompt {prompt}: {diff}"


@pytest.mark.parametrize("window", [None, 3])
def test_cross_attention_core_is_called_causal_with_its_window_and_no_mask(te_layers, window):
    from megatron.core.transformer.enums import AttnMaskType

    twin = te_twin(build_model(tiny_config(num_sections=2, cross_attention_window=window)))
    layer = twin.sections[1].layers[0]
    seen = []
    layer.cross_attention.core_attention.register_forward_pre_hook(
        lambda module, args: seen.append(args[3]))
    tokens, positions = random_tokens(1, 9, seed=3)
    with torch.no_grad():
        twin(tokens, positions)
    assert seen == [None]  # the causal kernel masks; no [s, s] tensor is passed
    assert layer.cross_attention.core_attention.calls == [(AttnMaskType.causal,
                                                           te_window(window))]
    assert layer.self_attention.core_attention.calls == [(AttnMaskType.causal, None)]


def test_a_step_over_a_cache_sees_the_window_ending_at_its_slot(te_layers):
    """The TE core attention of the cross-attention, one query over t + 1 cached slots (what a
    decode step would ask): bottom-right aligned, the last w slots."""
    window, slots = 3, 7
    cfg = tiny_config(num_sections=2, cross_attention_window=window)
    core = StagTEDotProductAttention(cfg, layer_number=1, attn_mask_type=None,
                                     attention_type="cross")
    query = torch.randn(1, 1, 4, 16)
    key, value = torch.randn(slots, 1, 4, 16), torch.randn(slots, 1, 4, 16)
    got = core(query, key, value, None)
    seen = value[slots - window:]  # only the last `window` slots
    weights = torch.softmax(torch.einsum("bhd,shd->hs", query[0], key[slots - window:, 0])
                            * 16**-0.5, dim=-1)
    expected = torch.einsum("hs,shd->hd", weights, seen[:, 0]).reshape(1, 1, 64)
    torch.testing.assert_close(got, expected)


def test_shared_weights_run_each_module_once_per_section_region(te_layers):
    """Each section's TransformerBlock is one FP8 region (Megatron's get_fp8_context); with
    shared weights every shared module with weights (what keeps FP8 scaling state) runs once
    in each, never twice in one."""
    twin = te_twin(build_model(tiny_config(num_sections=3, weight_sharing="shared")))
    calls, current = [], {}

    for block in twin.sections:  # a block's forward is its FP8 region
        block.register_forward_pre_hook(lambda b, args: current.update(block=b))
        block.register_forward_hook(lambda b, args, out: current.update(block=None))
    for module in twin.modules():
        if list(module.parameters(recurse=False)):
            module.register_forward_hook(
                lambda m, a, o: calls.append((current.get("block"), id(m))))
    tokens, positions = random_tokens(1, 6, seed=1)
    with torch.no_grad():
        twin(tokens, positions)
    per_region = {}
    for region, module in calls:
        if region is not None:
            per_region.setdefault(id(region), []).append(module)
    assert len(per_region) == 3
    shared = set(per_region[id(twin.sections[1])]) & set(per_region[id(twin.sections[2])])
    assert shared  # the same modules run in both later sections...
    for modules in per_region.values():  # ...once in each region
        assert len(modules) == len(set(modules))


FP8_TE = dict(transformer_impl="transformer_engine", fp8="hybrid", bf16=False)


def test_forward_inside_an_open_fp8_region_is_refused_with_shared_weights(te_layers,
                                                                          monkeypatch):
    monkeypatch.setattr(compat, "fp8_region_open", lambda: True)
    tokens, positions = random_tokens(1, 4, seed=2)
    shared = StagGPTModel(tiny_config(weight_sharing="shared", **FP8_TE), VOCAB, MAX_LEN)
    with pytest.raises(NotSupported, match="inside an FP8 region.*call the model outside "
                                           "fp8_autocast"):
        shared(tokens, positions)
    StagGPTModel(tiny_config(**FP8_TE), VOCAB, MAX_LEN)(tokens, positions)  # separate: fine


@pytest.mark.parametrize("capability, bf16", [((9, 0), True), ((10, 0), False)])
def test_cross_attention_core_leaves_the_fp8_region_only_without_a_kernel(
        te_layers, monkeypatch, capability, bf16):
    """FP8 attention with a cross-attention window: on Hopper the cross-attention's core alone
    runs outside FP8 (one warning at start-up); on Blackwell it stays FP8."""
    monkeypatch.setattr(compat, "cuda_capability", lambda: capability)
    entered = []

    @contextlib.contextmanager
    def disabled():
        entered.append(True)
        yield

    monkeypatch.setattr(compat, "fp8_disabled", disabled)
    settings = dict(num_sections=2, hidden_size=256, num_attention_heads=2,
                    cross_attention_window=4, fp8_dot_product_attention=True, **FP8_TE)
    with contextlib.ExitStack() as stack:
        if bf16:
            stack.enter_context(pytest.warns(fp8.FP8AttentionWarning,
                                             match="cross_attention_window=4"))
        cfg = tiny_config(**settings)
    assert cfg.fp8_dot_product_attention  # self-attention keeps FP8 attention
    model = StagGPTModel(cfg, VOCAB, MAX_LEN)
    assert model.sections[1].layers[0].cross_attention.core_attention.bf16_in_fp8 is bf16
    tokens, positions = random_tokens(1, 8, seed=4)
    model(tokens, positions)
    assert len(entered) == (cfg.layers_per_section if bf16 else 0)


# ------------------------------------------------------------------ FP8 rules


HEAD_128 = dict(num_sections=2, hidden_size=256, num_attention_heads=2)
RULES = [  # (capability, overrides, scope of the finding, what its message names)
    ((8, 9), {}, "all", "compute capability 8.9 has no FP8 fused attention"),
    ((9, 0), dict(fp8_recipe="tensorwise"), "all", "fp8_recipe='tensorwise': below compute "
                                                   "capability 10.0"),
    ((9, 0), dict(fp8_recipe="mxfp8"), "all", "fp8_recipe='mxfp8'"),
    ((10, 0), dict(fp8_recipe="blockwise"), "all", "'blockwise' has no FP8 attention kernel"),
    ((9, 0), dict(hidden_size=128), "all", "head dim 64: Transformer Engine's FP8 attention "
                                           "trains with head dim 128 only"),
    (None, dict(hidden_size=128), "all", "head dim 64"),  # no GPU: the rule still applies
    ((9, 0), dict(cross_attention_window=4), "cross", "cross_attention_window=4: below compute "
                                                      "capability 10.0"),
]


def fp8_config(capability, monkeypatch, **overrides):
    monkeypatch.setattr(compat, "cuda_capability", lambda: capability)
    return tiny_config(**{**HEAD_128, **FP8_TE, "fp8_dot_product_attention": True,
                          **overrides})


@pytest.mark.parametrize("capability, overrides, scope, said", RULES)
def test_each_fp8_attention_rule_says_why_and_keeps_that_attention_bf16(
        monkeypatch, capability, overrides, scope, said):
    with pytest.warns(fp8.FP8AttentionWarning) as caught:
        cfg = fp8_config(capability, monkeypatch, **overrides)
    messages = [str(w.message) for w in caught]
    assert any(said in m for m in messages), messages
    which = "every attention of the model" if scope == "all" else "the cross-section attention"
    assert any(which + " runs in bf16" in m and "--stag-fp8-attention-fallback error" in m
               for m in messages), messages
    assert cfg.fp8 == "hybrid"  # the linear layers stay FP8
    assert cfg.fp8_dot_product_attention is (scope == "cross")
    assert fp8.cross_attention_in_bf16(cfg, capability) is (scope == "cross")


@pytest.mark.parametrize("capability, overrides, scope, said", RULES)
def test_each_fp8_attention_rule_refuses_on_request(monkeypatch, capability, overrides, scope,
                                                    said):
    with pytest.raises(ConfigError, match="no FP8 attention kernel for this model") as err:
        fp8_config(capability, monkeypatch, fp8_attention_fallback="error", **overrides)
    assert said in str(err.value) and "--stag-fp8-attention-fallback bf16" in str(err.value)


@pytest.mark.parametrize("capability, overrides", [
    ((9, 0), {}),                                        # Hopper, delayed, head dim 128
    ((10, 0), dict(fp8_recipe="tensorwise", cross_attention_window=4)),  # Blackwell
    ((9, 0), dict(fp8_dot_product_attention=False, cross_attention_window=4)),  # no FP8 attn.
    ((9, 0), dict(num_sections=1, num_layers=2, cross_attention_window=4)),  # no cross-attn.
])
def test_fp8_attention_where_transformer_engine_has_a_kernel(monkeypatch, capability,
                                                             overrides):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", fp8.FP8AttentionWarning)
        cfg = fp8_config(capability, monkeypatch, **overrides)
    assert fp8.attention_findings(cfg, capability) == []


def test_fp8_config_refusals():
    with pytest.raises(ConfigError, match="FP8 runs through Transformer Engine's layers.*"
                                          "--transformer-impl transformer_engine"):
        tiny_config(fp8="e4m3")
    with pytest.raises(ConfigError, match="first_last_layers_bf16.*numbers the layers of each "
                                          "section"):
        tiny_config(first_last_layers_bf16=True, **FP8_TE)
    with pytest.raises(ConfigError, match="fp8_attention_fallback='fp16'"):
        tiny_config(fp8_attention_fallback="fp16")


# ------------------------------------------------------------------ flags


def stag_train_args(*extra):
    from stag_plugin.training import arguments, train

    argv = ["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "2",
            "--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e-3",
            "--train-iters", "2", "--position-embedding-type", "rope", *extra]
    return arguments.finalize_args(arguments.parse_with_preset(train.build_parser(), argv))


def test_stag_train_fp8_flags_reach_the_config():
    from stag_plugin.training import arguments

    args = stag_train_args("--transformer-impl", "transformer_engine", "--bf16",
                           "--fp8-format", "hybrid", "--fp8-recipe", "delayed",
                           "--fp8-dot-product-attention", "--fp8-multi-head-attention",
                           "--fp8-margin", "1", "--fp8-amax-history-len", "16",
                           "--fp8-amax-compute-algo", "max",
                           "--stag-fp8-attention-fallback", "error")
    cfg = arguments.config_from_args(args)
    assert cfg.transformer_impl == "transformer_engine"
    assert (cfg.fp8, fp8.recipe_name(cfg), cfg.fp8_margin) == ("hybrid", "delayed", 1)
    assert (cfg.fp8_amax_history_len, cfg.fp8_amax_compute_algo) == (16, "max")
    assert cfg.fp8_dot_product_attention and cfg.fp8_multi_head_attention
    assert cfg.fp8_attention_fallback == "error"
    assert "stag_fp8_attention_fallback" not in arguments.ARCHITECTURE_FLAGS  # not a shape
    local = arguments.config_from_args(stag_train_args("--transformer-impl", "local"))
    assert (local.transformer_impl, local.fp8, local.fp8_dot_product_attention) == (
        "local", None, False)


def test_stag_train_fp8_flag_errors_name_the_flag():
    from stag_plugin.errors import StagError
    from stag_plugin.training import arguments

    with pytest.raises(StagError, match=r"^--fp8-format: .*FP8 runs through Transformer "
                                        r"Engine's layers"):
        arguments.config_from_args(stag_train_args("--transformer-impl", "local",
                                                   "--fp8-format", "e4m3"))


@NEEDS_NO_TE
def test_stag_train_without_transformer_engine_names_the_install(capsys, tmp_path):
    from stag_plugin import cli

    argv = ["train", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--micro-batch-size", "2", "--lr", "1e-3", "--train-iters",
            "2", "--data-cache-dir", str(tmp_path), "--no-progress"]
    assert cli.main(argv) == 2  # Megatron-LM's default --transformer-impl transformer_engine
    err = capsys.readouterr().err
    assert ("stag train: error: --transformer-impl transformer_engine (Megatron-LM's default) "
            "needs NVIDIA Transformer Engine") in err
    assert "pip install" in err and "--transformer-impl local" in err


def test_stag_train_takes_transformer_engine_where_it_is_installed(te_reported):
    from stag_plugin.training import arguments

    arguments.check_trainable(stag_train_args("--transformer-impl", "transformer_engine"))
    with pytest.raises(NotSupported, match="inference_optimized"):
        arguments.check_trainable(stag_train_args("--transformer-impl", "inference_optimized"))


def test_megatron_lm_entry_takes_transformer_engine(te_reported):
    from stag_plugin.integrations import megatron_lm

    def args(**values):
        return argparse.Namespace(virtual_pipeline_model_parallel_size=None, **values)

    megatron_lm.check_megatron_lm_args(args(transformer_impl="transformer_engine"))
    with pytest.raises(NotSupported, match="--reset-attention-mask"):
        megatron_lm.check_megatron_lm_args(args(transformer_impl="transformer_engine",
                                                reset_attention_mask=True))
    with pytest.raises(NotSupported, match="--transformer-impl inference_optimized"):
        megatron_lm.check_megatron_lm_args(args(transformer_impl="inference_optimized"))


@NEEDS_NO_TE
def test_megatron_lm_entry_without_transformer_engine_names_the_install():
    from stag_plugin.integrations import megatron_lm

    with pytest.raises(MissingDependency, match="needs NVIDIA Transformer Engine.*pip install"):
        megatron_lm.check_megatron_lm_args(argparse.Namespace(
            virtual_pipeline_model_parallel_size=None, transformer_impl="transformer_engine"))


def test_megatron_lm_fp8_flags_reach_the_config(monkeypatch):
    """Megatron-LM's own parser with the plugin's extra args: --fp8-format / --fp8-recipe are
    Megatron-LM's, the FP8 attention switches the plugin's (fields without a flag there)."""
    import contextlib as ctx
    import importlib.util
    import io
    import os
    import sys

    if os.environ.get("MEGATRON_LM_PATH"):  # a checkout of the installed release line
        monkeypatch.syspath_prepend(os.path.abspath(os.environ["MEGATRON_LM_PATH"]))
    if importlib.util.find_spec("megatron.training") is None:
        pytest.skip("megatron.training is not importable: megatron-core 0.19 installs it, or "
                    "set MEGATRON_LM_PATH to a Megatron-LM checkout")
    from megatron_lm_cpu import install_override_shim

    install_override_shim()
    from megatron.training.arguments import parse_args, validate_args

    from stag_plugin.integrations import megatron_lm

    argv = ("--num-layers 4 --hidden-size 256 --num-attention-heads 2 --seq-length 32 "
            "--max-position-embeddings 32 --micro-batch-size 2 --train-iters 2 --lr 1e-3 "
            "--tokenizer-type NullTokenizer --vocab-size 128 --mock-data --bf16 "
            "--position-embedding-type rope --no-rope-fusion --no-gradient-accumulation-fusion "
            "--transformer-impl transformer_engine --fp8-format hybrid --fp8-recipe delayed "
            "--fp8-dot-product-attention --stag-num-sections 2 "
            "--stag-fp8-attention-fallback error").split()
    saved, sys.argv = sys.argv, ["pretrain_stag.py", *argv]
    try:
        args = parse_args(extra_args_provider=megatron_lm.add_stag_args,
                          ignore_unknown_args=False)
    finally:
        sys.argv = saved
    with ctx.redirect_stdout(io.StringIO()):
        validate_args(args, {})
    cfg = megatron_lm.stag_config_from_megatron_args(args)
    assert (cfg.transformer_impl, cfg.fp8, fp8.recipe_name(cfg)) == (
        "transformer_engine", "hybrid", "delayed")
    assert cfg.fp8_dot_product_attention and cfg.fp8_attention_fallback == "error"


# ------------------------------------------------------------------ the GPU check


def gpu_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "te_check.py"
    spec = importlib.util.spec_from_file_location("te_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@NEEDS_NO_TE
def test_gpu_check_reduced_form_runs_without_transformer_engine(tmp_path):
    import json

    out = tmp_path / "te_check.json"
    assert gpu_check().main(["--size", "tiny", "--steps", "3", "--variants", "shared",
                             "--out", str(out)]) == 0
    rows = {row["row"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["local-bf16"]["ok"] and len(rows["local-bf16"]["losses"]) == 3
    assert all("Transformer Engine is not installed" in rows[name]["skipped"]
               for name in ("te-bf16", "te-fp8", "te-fp8-attn"))


def test_gpu_check_te_rows_run_on_stand_ins(te_layers, tmp_path):
    """The check's own plumbing (weights through the name map, logits and decoder checks, loss
    parity) on the torch stand-ins; FP8 rows need a GPU."""
    import json

    out = tmp_path / "te_check.json"
    assert gpu_check().main(["--size", "tiny", "--steps", "3", "--variants", "window",
                             "--out", str(out)]) == 0
    rows = {row["row"]: row for row in json.loads(out.read_text())["rows"]}
    te = rows["te-bf16"]
    assert te["ok"] and set(te["checks"]) == {"logits", "decode", "loss_fell",
                                              "final_loss_vs_local_bf16"}
    assert te["checks"]["logits"]["max_abs_diff"] <= te["checks"]["logits"]["bound"]
    assert "no FP8" in rows["te-fp8"]["skipped"]

