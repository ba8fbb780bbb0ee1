"""StagGPTModel behaviour: shapes, loss, causality, stagger, window reach, weight sharing,
and the distributed-checkpoint view."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from stag_plugin import StagGPTModel, get_stag_layer_spec

from stag_testing import (
    VOCAB,
    build_model,
    fresh_seed,
    parameter_count,
    random_tokens,
    tiny_config,
    variant_id,
)

VARIANTS = [
    dict(num_sections=1),
    dict(num_sections=2),
    dict(num_sections=2, weight_sharing="shared"),
    dict(num_sections=2, cross_attention_window=1),
    dict(num_sections=3, cross_attention_window=3, output_combination="learned"),
    dict(num_sections=3, weight_sharing="shared", output_combination="learned"),
    dict(num_sections=2, num_query_groups=2, cross_attention_rope=False,
         position_embedding_type="learned_absolute"),
]


def test_forward_shapes_and_per_token_loss():
    model = build_model(tiny_config())
    tokens, positions = random_tokens(3, 10, seed=fresh_seed())
    logits = model(tokens, positions)
    assert logits.shape == (3, 10, VOCAB)
    loss = model(tokens, positions, labels=tokens)
    assert loss.shape == (3, 10)
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), tokens.reshape(-1), reduction="none")
    torch.testing.assert_close(loss, expected.view(3, 10), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_causality(variant):
    """Changing token j never changes logits before j (and does change them at j)."""
    model = build_model(tiny_config(**variant))
    seed = fresh_seed()
    tokens, positions = random_tokens(2, 12, seed)
    base = model(tokens, positions)
    for j in (0, 5, 11):
        changed = tokens.clone()
        changed[:, j] = (changed[:, j] + 1 + seed % (VOCAB - 1)) % VOCAB
        out = model(changed, positions)
        assert torch.allclose(out[:, :j], base[:, :j], atol=1e-6, rtol=0), f"seed {seed}, j={j}"
        assert (out[:, j] - base[:, j]).abs().max().item() > 1e-4, f"seed {seed}, j={j}"


def section_outputs_with_perturbation(model, tokens, positions, section, position, delta):
    """Run the model, adding `delta` to sections[section]'s output at `position`; return every
    section's output [s, b, h] as seen by the next module."""
    outputs = {}

    def capture(k):
        def hook(module, args, output):
            if k == section and delta is not None:
                output = output.clone()
                output[position] += delta
            outputs[k] = output.detach()
            return output
        return hook

    handles = [s.register_forward_hook(capture(k)) for k, s in enumerate(model.sections)]
    try:
        model(tokens, positions)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def changed_positions(a, b, tol=1e-6):
    """Positions (dim 0) where two [s, b, h] tensors differ by more than tol."""
    return [i for i in range(a.shape[0]) if (a[i] - b[i]).abs().max().item() > tol]


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v["num_sections"] > 1], ids=variant_id)
def test_stagger_next_section_sees_only_the_past(variant):
    """Perturbing section k-1's output at i leaves section k at <= i unchanged, changes i+1."""
    model = build_model(tiny_config(**variant))
    seq_len, seed = 12, fresh_seed()
    tokens, positions = random_tokens(2, seq_len, seed)
    delta = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    base = section_outputs_with_perturbation(model, tokens, positions, 0, 0, None)
    for k, i in itertools.product(range(1, model.config.num_sections), (0, 4, seq_len - 2)):
        out = section_outputs_with_perturbation(model, tokens, positions, k - 1, i, delta)
        changed = changed_positions(out[k], base[k])
        assert changed and min(changed) == i + 1, f"seed {seed}, k={k}, i={i}: {changed}"


@pytest.mark.parametrize("window,sections,shared", [(1, 2, False), (3, 2, False), (2, 3, True),
                                                    (4, 3, False)])
def test_window_reach_with_one_layer_sections(window, sections, shared):
    """One layer per section, window w: exactly positions i+1..i+w of section k change."""
    cfg = tiny_config(num_sections=sections, num_layers=sections, cross_attention_window=window,
                      weight_sharing="shared" if shared else "separate")
    model = build_model(cfg)
    seq_len, seed = 14, fresh_seed()
    tokens, positions = random_tokens(2, seq_len, seed)
    delta = torch.randn(cfg.hidden_size, generator=torch.Generator().manual_seed(seed))
    base = section_outputs_with_perturbation(model, tokens, positions, 0, 0, None)
    for k, i in itertools.product(range(1, sections), (0, 3, seq_len - 3)):
        out = section_outputs_with_perturbation(model, tokens, positions, k - 1, i, delta)
        expected = [t for t in range(i + 1, i + window + 1) if t < seq_len]
        assert changed_positions(out[k], base[k]) == expected, f"seed {seed}, k={k}, i={i}"


def test_full_memory_reaches_every_later_position():
    cfg = tiny_config(num_layers=2, cross_attention_window=None)
    model = build_model(cfg)
    tokens, positions = random_tokens(1, 10, fresh_seed())
    delta = torch.ones(cfg.hidden_size)
    base = section_outputs_with_perturbation(model, tokens, positions, 0, 0, None)
    out = section_outputs_with_perturbation(model, tokens, positions, 0, 2, delta)
    assert changed_positions(out[1], base[1]) == list(range(3, 10))


@pytest.mark.parametrize("memory_norm", [False, True])
def test_shared_weights_share_parameters_but_not_section_objects(memory_norm):
    separate = build_model(tiny_config(num_sections=2, memory_norm=memory_norm))
    shared2 = build_model(tiny_config(num_sections=2, weight_sharing="shared",
                                      memory_norm=memory_norm))
    shared3 = build_model(tiny_config(num_sections=3, weight_sharing="shared",
                                      memory_norm=memory_norm))
    # Shared = separate minus section 1's own stack; more sections add no parameters.
    expected = parameter_count(separate) - parameter_count(separate.sections[0])
    assert parameter_count(shared2) == expected
    assert parameter_count(shared3) == parameter_count(shared2)
    s = shared3.sections
    assert len({id(section) for section in s}) == 3
    for k in (1, 2):
        qkv = s[k].layers[0].self_attention.linear_qkv
        assert qkv.weight is s[0].layers[0].self_attention.linear_qkv.weight
        assert s[k].layers[1].mlp.linear_fc1.weight is s[0].layers[1].mlp.linear_fc1.weight
    if memory_norm:  # one final norm, run by every section
        assert all(b.final_layernorm.weight is s[0].final_layernorm.weight for b in s)
    else:  # the last section's alone
        assert [b.final_layernorm is None for b in s] == [True, True, False]
    kv = s[2].layers[0].cross_attention.linear_kv
    assert kv.weight is s[1].layers[0].cross_attention.linear_kv.weight
    assert not hasattr(s[0].layers[0].cross_attention, "linear_kv")  # section 1 has no cross-attn
    # Separate weights really are separate.
    assert separate.sections[1].layers[0].self_attention.linear_qkv.weight is not \
        separate.sections[0].layers[0].self_attention.linear_qkv.weight


def test_shared_equals_separate_with_copied_weights_and_sums_gradients():
    """A shared model equals a separate one holding copies of its weights; the shared
    gradient is the sum of the copies' gradients (every section contributes)."""
    shared = build_model(tiny_config(num_sections=3, weight_sharing="shared")).train()
    separate = build_model(tiny_config(num_sections=3), seed=7).train()
    separate.load_state_dict(shared.state_dict())  # shared state dict lists every alias
    tokens, positions = random_tokens(2, 9, fresh_seed())
    out_shared = shared(tokens, positions, labels=tokens)
    out_separate = separate(tokens, positions, labels=tokens)
    torch.testing.assert_close(out_shared, out_separate, atol=1e-6, rtol=1e-6)
    out_shared.sum().backward()
    out_separate.sum().backward()

    def grad(model, k, path):
        module = model.sections[k].layers[1]
        for name in path.split("."):
            module = getattr(module, name)
        return module.grad

    qkv = "self_attention.linear_qkv.weight"
    kv = "cross_attention.linear_kv.weight"
    torch.testing.assert_close(grad(shared, 0, qkv),
                               sum(grad(separate, k, qkv) for k in range(3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad(shared, 1, kv),
                               grad(separate, 1, kv) + grad(separate, 2, kv), atol=1e-5, rtol=1e-4)
    assert grad(separate, 2, kv).abs().sum() > 0


def test_sharded_state_dict_covers_every_parameter_once():
    for variant in VARIANTS:
        cfg = tiny_config(**variant)
        model = build_model(cfg, share_embeddings_and_output_weights=False)
        sharded = model.sharded_state_dict()
        tensors = [v.data for v in sharded.values()
                   if isinstance(getattr(v, "data", None), torch.Tensor)]
        assert len({id(t) for t in tensors}) == len(tensors), variant
        assert {id(t) for t in tensors} == {id(p) for p in model.parameters()}, variant
        if cfg.num_sections > 1:
            assert "null_memory" in sharded
        if cfg.output_combination == "learned":
            assert "combination_weights" in sharded
        assert all(key.startswith(("embedding.", "sections.", "output_layer.", "null_memory",
                                   "combination_weights")) for key in sharded)


def test_sharded_state_dict_names_layers_by_section():
    model = build_model(tiny_config(num_sections=2, weight_sharing="shared"))
    keys = {v.key for v in model.sharded_state_dict().values() if hasattr(v, "key")}
    assert "sections.0.layers.1.self_attention.linear_qkv.weight" in keys
    assert "sections.1.layers.1.cross_attention.linear_kv.weight" in keys
    assert "sections.1.layers.1.self_attention.linear_qkv.weight" not in keys  # shared: saved once


def test_constructor_errors():
    cfg = tiny_config()
    with pytest.raises(ValueError, match="vocab_size"):
        StagGPTModel(cfg, vocab_size=0, max_sequence_length=16)
    with pytest.raises(TypeError, match="StagLayerSpecs"):
        StagGPTModel(cfg, vocab_size=96, max_sequence_length=16,
                     transformer_layer_spec=get_stag_layer_spec().first_section)
    with pytest.raises(ValueError, match="post_process=False do not match pipeline stage 0"):
        StagGPTModel(cfg, vocab_size=96, max_sequence_length=16, post_process=False)
    with pytest.raises(TypeError, match="StagFormerConfig"):
        from megatron.core.transformer.transformer_config import TransformerConfig
        StagGPTModel(TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4),
                     vocab_size=96, max_sequence_length=16)


def test_attention_mask_restricts_cross_attention_too():
    """With a document-boundary mask, section 2 must not read memory from the other document.
    (Cross-attention RoPE is off here: with it, the null slot sits before the *sequence* start,
    so a document's null-slot distance depends on where the document begins.)"""
    model = build_model(tiny_config(num_sections=2, cross_attention_rope=False))
    tokens, positions = random_tokens(1, 8, fresh_seed())
    doc = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    causal = torch.arange(8)[None, :] <= torch.arange(8)[:, None]
    mask = ~((doc[:, None] == doc[None, :]) & causal)
    mask = mask[None, None]  # [1, 1, s, s], True = masked
    full = model(tokens, positions, attention_mask=mask)
    second = model(tokens[:, 4:], positions[:, :4])
    torch.testing.assert_close(full[:, 4:], second, atol=1e-5, rtol=1e-5)


def test_cross_attention_without_mask_is_the_causal_mask():
    """Mask None (no window, no per-sample mask: the kernel's causal mask, no [s, s] tensor)
    gives the outputs and gradients of the explicit cross-attention mask; None with fewer
    queries than slots is the bottom-right causal mask."""
    from stag_plugin.core.attention import bottom_right_causal_mask, cross_attention_mask

    model = build_model(tiny_config(num_sections=2))
    assert model._cross_mask(8, torch.device("cpu"), None) is None
    attention = model.sections[1].layers[0].cross_attention
    gen = torch.Generator().manual_seed(fresh_seed())
    hidden, memory = (torch.randn(8, 2, 64, generator=gen, requires_grad=True)
                      for _ in range(2))
    masks = (None, cross_attention_mask(8, None, hidden.device))
    outs, grads = [], []
    for mask in masks:
        out, _ = attention(hidden, mask, key_value_states=memory)
        outs.append(out)
        grads.append(torch.autograd.grad(out.square().sum(), (hidden, memory)))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    last = bottom_right_causal_mask(3, 8, hidden.device)
    torch.testing.assert_close(attention(hidden[5:], None, key_value_states=memory)[0],
                               attention(hidden[5:], last, key_value_states=memory)[0])
    assert torch.equal(last[0, 0], torch.arange(8)[None, :] > torch.arange(5, 8)[:, None])


@pytest.mark.parametrize("overrides,mask", [(dict(cross_attention_window=2), None),
                                            (dict(), torch.zeros(1, 1, 8, 8, dtype=torch.bool))])
def test_cross_mask_tensor_kept_where_not_causal(overrides, mask):
    from stag_plugin.core.attention import cross_attention_mask

    model = build_model(tiny_config(num_sections=2, **overrides))
    window = model.config.cross_attention_window
    got = model._cross_mask(8, torch.device("cpu"), mask)
    assert torch.equal(got, cross_attention_mask(8, window, torch.device("cpu"), mask))
