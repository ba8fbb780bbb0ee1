"""Megatron StagGPTModel vs the independent plain-PyTorch reference, same weights through the
name map, fresh random inputs, fp32: max abs difference below 1e-5 for every variant."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from stag_plugin.reference.model import ReferenceConfig, StagFormer
from stag_plugin.reference.name_map import megatron_to_reference, reference_to_megatron

from stag_testing import (
    MAX_LEN,
    VOCAB,
    build_model,
    fresh_seed,
    random_tokens,
    tiny_config,
    variant_id,
)

GRID = [
    dict(num_sections=p, weight_sharing=w, cross_attention_window=win, output_combination=c,
         memory_norm=norm)
    for p, w, win, c, norm in itertools.product((2, 3), ("separate", "shared"), (1, 3, None),
                                                ("last", "learned"), (False, True))
]
EXTRA = [
    dict(num_sections=1),
    dict(num_sections=2, num_query_groups=2, gated_linear_unit=True),
    dict(num_sections=3, num_query_groups=1, weight_sharing="shared", cross_attention_window=2),
    dict(num_sections=2, cross_attention_rope=False),
    dict(num_sections=2, position_embedding_type="learned_absolute", cross_attention_rope=False),
    dict(num_sections=2, normalization="RMSNorm", add_bias_linear=False),
    dict(num_sections=2, rotary_percent=0.5, kv_channels=32),
]


def reference_for(model):
    cfg = ReferenceConfig.from_megatron(model.config, VOCAB, MAX_LEN,
                                        tie_embeddings=model.share_embeddings_and_output_weights)
    reference = StagFormer(cfg).eval()
    reference.load_state_dict(megatron_to_reference(model.state_dict(), cfg))
    return reference, cfg


@pytest.mark.parametrize("variant", GRID + EXTRA, ids=variant_id)
def test_megatron_matches_reference(variant):
    seed = fresh_seed()
    model = build_model(tiny_config(**variant), seed=seed % 1000)
    reference, _ = reference_for(model)
    tokens, positions = random_tokens(2, 17, seed)
    with torch.no_grad():
        diff = (model(tokens, positions) - reference(tokens)).abs().max().item()
    assert diff < 1e-5, f"seed {seed}: max abs difference {diff}"


def test_untied_head_and_loss_match_reference():
    seed = fresh_seed()
    model = build_model(tiny_config(num_sections=2, output_combination="learned"),
                        share_embeddings_and_output_weights=False)
    reference, _ = reference_for(model)
    assert hasattr(reference, "lm_head")
    tokens, positions = random_tokens(2, 11, seed)
    with torch.no_grad():
        loss = model(tokens, positions, labels=tokens)
        logits = reference(tokens)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), tokens.reshape(-1), reduction="none")
    assert (loss - expected.view_as(loss)).abs().max().item() < 1e-5, f"seed {seed}"


@pytest.mark.parametrize("variant", [
    dict(num_sections=2), dict(num_sections=3, weight_sharing="shared"),
    dict(num_sections=2, gated_linear_unit=True, num_query_groups=2)], ids=variant_id)
def test_name_map_round_trip(variant):
    model = build_model(tiny_config(**variant))
    megatron = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    reference, cfg = reference_for(model)
    back = reference_to_megatron(reference.state_dict(), cfg, list(megatron))
    assert back.keys() == megatron.keys()
    for key, value in megatron.items():
        assert torch.equal(back[key], value), key


def test_name_map_hard_checks():
    model = build_model(tiny_config(num_sections=2))
    cfg = ReferenceConfig.from_megatron(model.config, VOCAB, MAX_LEN)
    state = dict(model.state_dict())
    missing = {k: v for k, v in state.items() if "final_layernorm.bias" not in k}
    with pytest.raises(KeyError, match="missing"):
        megatron_to_reference(missing, cfg)
    wrong_shape = dict(state, null_memory=torch.zeros(3))
    with pytest.raises(ValueError, match="null_memory: shape"):
        megatron_to_reference(wrong_shape, cfg)
    unknown = dict(state, **{"sections.0.layers.0.mystery.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="no reference name"):
        megatron_to_reference(unknown, cfg)
    three_sections = ReferenceConfig.from_megatron(tiny_config(num_sections=3), VOCAB, MAX_LEN)
    with pytest.raises(KeyError, match="missing"):
        megatron_to_reference(state, three_sections)


def test_name_map_rejects_diverged_shared_copies():
    model = build_model(tiny_config(num_sections=2, weight_sharing="shared"))
    cfg = ReferenceConfig.from_megatron(model.config, VOCAB, MAX_LEN)
    state = {k: v.clone() if torch.is_tensor(v) else v for k, v in model.state_dict().items()}
    state["sections.1.layers.0.mlp.linear_fc2.weight"] += 1.0
    with pytest.raises(ValueError, match="should equal"):
        megatron_to_reference(state, cfg)


def test_reference_config_rejects_what_it_does_not_implement():
    with pytest.raises(ValueError, match="qk_layernorm"):
        ReferenceConfig.from_megatron(tiny_config(qk_layernorm=True), VOCAB, MAX_LEN)
