"""p = 1 is a plain GPT: StagGPTModel equals Megatron's GPTModel holding the same weights."""

import dataclasses

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

from stag_plugin.compat import megatron as compat
from stag_plugin.core.attention import SDPAttention

from stag_testing import MAX_LEN, VOCAB, build_model, fresh_seed, random_tokens, tiny_config


def megatron_gpt(config, tie: bool, vocab: int = VOCAB, max_len: int = MAX_LEN) -> GPTModel:
    """GPTModel with Megatron's own local layer spec; only the core attention is swapped for the
    SDPA one and RoPE for the CPU-safe subclass (Megatron's own ones need CUDA)."""
    spec = get_gpt_layer_local_spec(normalization=config.normalization)
    attention = spec.submodules.self_attention
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, self_attention=dataclasses.replace(
            attention, submodules=dataclasses.replace(attention.submodules,
                                                      core_attention=SDPAttention))))
    gpt = GPTModel(config, spec, vocab_size=vocab, max_sequence_length=max_len,
                   position_embedding_type=config.position_embedding_type,
                   rotary_base=config.rotary_base, rotary_percent=config.rotary_percent,
                   share_embeddings_and_output_weights=tie)
    if config.position_embedding_type == "rope":
        gpt.rotary_pos_emb = compat.rotary_embedding(config)
    return gpt.eval()


def gpt_state_from_stag(state):
    return {k.replace("sections.0.", "decoder.", 1): v for k, v in state.items()}


@pytest.mark.parametrize("overrides,tie", [
    (dict(), True),
    (dict(num_query_groups=2, gated_linear_unit=True, normalization="RMSNorm"), False),
    (dict(position_embedding_type="learned_absolute", cross_attention_rope=False), True),
])
def test_p1_equals_megatron_gpt(overrides, tie):
    config = tiny_config(num_sections=1, num_layers=3, **overrides)
    stag = build_model(config, share_embeddings_and_output_weights=tie)
    gpt = megatron_gpt(config, tie)
    gpt.load_state_dict(gpt_state_from_stag(stag.state_dict()), strict=True)
    seed = fresh_seed()
    tokens, positions = random_tokens(2, 13, seed)
    with torch.no_grad():
        torch.testing.assert_close(stag(tokens, positions), gpt(tokens, positions, None),
                                   atol=1e-6, rtol=1e-6, msg=lambda m: f"seed {seed}: {m}")
        torch.testing.assert_close(stag(tokens, positions, labels=tokens),
                                   gpt(tokens, positions, None, labels=tokens),
                                   atol=1e-6, rtol=1e-6)


def test_p1_has_no_stagformer_parameters():
    stag = build_model(tiny_config(num_sections=1, num_layers=2))
    names = [n for n, _ in stag.named_parameters()]
    assert not any("cross" in n or "null_memory" in n for n in names)
