"""The fused decode step of StagDecoder (stag_plugin.decode.fused; modes batched and recurrent)
beyond the parity grid of tests/test_inference.py:

- fixed shapes: the step compile and cuda_graph run (position tensor, whole-cache reads under a
  mask, in-place writes, the window's ring), run eagerly, gives the teacher-forced logits (fp32,
  max abs diff < 1e-4), equals the eager recurrent step, and leaves the caches as running it
  once when it runs twice (what CUDA graph capture relies on);
- torch.compile of that step (CPU; two small cases: compiling costs seconds) against the forward;
- one batched computation: a step has the matrix products and attention calls of one section,
  whatever p and the weight sharing; separate weights are held once (the model's parameters
  become views of the stacks);
- bf16: logits within 5% of the largest fp32 logit of the same model decoded in fp32;
- Transformer Engine layers (torch stand-ins, tests/te_stand_ins.py): norms read from the linear
  layers they are fused into.
"""

import collections
import itertools

import pytest
import torch
from test_transformer_engine import te_twin
from torch.utils._python_dispatch import TorchDispatchMode

from stag_plugin.decode.engine import StagDecoder
from stag_plugin.reference.step_runner import StepRunner

import te_stand_ins
from stag_testing import (
    build_model,
    decode_logits,
    fresh_seed,
    random_tokens,
    tiny_config,
    variant_id,
)

LENGTH = 10
BF16_TOLERANCE = 0.05  # bf16 vs fp32: max abs diff / largest fp32 logit


def fixed_shape(model, max_len: int, mode: str, batch: int = 2) -> StagDecoder:
    """A decoder stepping through the fixed-shape step (with its caches) that compile and
    cuda_graph run, run eagerly: built for compile (which compiles lazily), then given an
    uncompiled runner."""
    decoder = StagDecoder(model, batch, max_len, mode=mode, compile=True)
    decoder._runner = StepRunner(decoder._fixed_step)
    return decoder


def forward_logits(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    with torch.no_grad():
        return model(tokens, positions)  # [b, s, vocab]


FIXED = [
    dict(num_sections=1),
    dict(num_sections=2, cross_attention_window=1),
    dict(num_sections=3, cross_attention_window=3, num_query_groups=2,
         output_combination="learned"),
    dict(num_sections=3, weight_sharing="shared", cross_attention_window=2),
    dict(num_sections=3, weight_sharing="shared", memory_norm=True),
    dict(num_sections=3, output_combination="learned", memory_norm=True),
    dict(num_sections=2, position_embedding_type="learned_absolute", cross_attention_rope=False,
         gated_linear_unit=True),
]


@pytest.mark.parametrize("variant", FIXED, ids=variant_id)
def test_fixed_shape_step_matches_forward(variant):
    """max_sequence_length = the decoded length: the last step's memory slot falls past the
    caches (kept out of them); a window of 1-3 makes the memory a ring."""
    seed = fresh_seed()
    model = build_model(tiny_config(**variant), seed=seed % 1000)
    tokens, _ = random_tokens(2, LENGTH, seed)
    expected = forward_logits(model, tokens)
    for prompt in (1, 4):
        decoder = fixed_shape(model, LENGTH, "batched", batch=3)
        diff = (decode_logits(decoder, tokens, prompt) - expected[:, prompt - 1:]).abs().max()
        assert diff.item() < 1e-4, f"seed {seed}, prompt {prompt}: {diff.item()}"


def test_fixed_shape_recurrent_step_equals_eager():
    seed = fresh_seed()
    model = build_model(tiny_config(num_sections=3, weight_sharing="shared",
                                    cross_attention_window=2), seed=seed % 1000)
    tokens, _ = random_tokens(2, LENGTH, seed)
    eager = decode_logits(StagDecoder(model, 2, LENGTH, mode="recurrent"), tokens, 3)
    fixed = decode_logits(fixed_shape(model, LENGTH, "recurrent"), tokens, 3)
    assert (eager - fixed).abs().max().item() < 1e-5, f"seed {seed}"


def cache_tensors(decoder):
    return [t.clone() for c in decoder.caches.self_kv + decoder.caches.cross_kv
            for t in (c.k, c.v)]


@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("mode", ["batched", "recurrent"])
def test_fixed_shape_step_run_twice_leaves_the_caches_as_once(window, mode):
    """At the last position (its memory slot falls past the caches) and before it."""
    seed = fresh_seed()
    model = build_model(tiny_config(num_sections=2, weight_sharing="shared",
                                    cross_attention_window=window), seed=seed % 1000)
    tokens, _ = random_tokens(2, 8, seed)
    for prompt in (5, 7):
        once, twice = (fixed_shape(model, 8, mode) for _ in range(2))
        for decoder in (once, twice):
            decoder.prefill(tokens[:, :prompt])
        index = torch.tensor([prompt])
        logits = once._fixed_step(tokens[:, prompt], index)
        twice._fixed_step(tokens[:, prompt], index)
        again = twice._fixed_step(tokens[:, prompt], index)
        assert torch.equal(logits, again), f"seed {seed}, prompt {prompt}"
        for a, b in zip(cache_tensors(once), cache_tensors(twice)):
            assert torch.equal(a, b), f"seed {seed}, prompt {prompt}"


COMPILED = [
    (dict(num_sections=3, cross_attention_window=2, num_query_groups=2,
          output_combination="learned"), "batched"),
    (dict(num_sections=2, weight_sharing="shared", cross_attention_window=3), "recurrent"),
]


@pytest.mark.parametrize("variant, mode", COMPILED, ids=[m for _, m in COMPILED])
def test_compiled_step_matches_eager_decoding(variant, mode):
    """torch.compile of the fixed-shape step (batched: also against the forward)."""
    seed = fresh_seed()
    model = build_model(tiny_config(**variant), seed=seed % 1000)
    tokens, _ = random_tokens(2, LENGTH, seed)
    eager = decode_logits(StagDecoder(model, 2, LENGTH, mode=mode), tokens, 3)
    compiled = decode_logits(StagDecoder(model, 2, LENGTH, mode=mode, compile=True), tokens, 3)
    assert (compiled - eager).abs().max().item() < 1e-5, f"seed {seed}"
    if mode == "batched":
        diff = (compiled - forward_logits(model, tokens)[:, 2:]).abs().max().item()
        assert diff < 1e-4, f"seed {seed}: {diff}"


class Calls(TorchDispatchMode):
    """Counts the aten calls made under it."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def count(self, *names) -> int:
        return sum(n for name, n in self.counts.items() if name.startswith(names))


@pytest.mark.parametrize("p, sharing", list(itertools.product((1, 2, 3), ("separate", "shared"))))
def test_a_batched_step_has_the_products_of_one_section(p, sharing):
    """Per layer: qkv, attention output, MLP in and out (plus cross-attention query, output and
    the new memory slot's key/value when p > 1), then the LM head; one self- (and one cross-)
    attention call per layer, whatever p."""
    model = build_model(tiny_config(num_sections=p, weight_sharing=sharing))
    decoder = StagDecoder(model, 2, 8, mode="batched")
    tokens, _ = random_tokens(2, 5, 0)
    decoder.prefill(tokens[:, :4])
    with Calls() as calls:
        decoder.step(tokens[:, 4])
    layers, cross = model.config.layers_per_section, p > 1
    assert calls.count("mm", "addmm", "bmm", "baddbmm") == layers * (4 + 3 * cross) + 1
    assert calls.count("_scaled_dot_product") == layers * (1 + cross)


def test_separate_weights_are_stacked_once_and_the_model_reads_them():
    seed = fresh_seed()
    model = build_model(tiny_config(num_sections=3, output_combination="learned"),
                        seed=seed % 1000)
    tokens, _ = random_tokens(2, LENGTH, seed)
    before = forward_logits(model, tokens)
    decoder = StagDecoder(model, 2, LENGTH, mode="batched")
    qkv = decoder.weights.layers[1].qkv.weight  # [p, out, h]
    assert qkv.shape[0] == 3
    for k, block in enumerate(model.sections):
        weight = block.layers[1].self_attention.linear_qkv.weight
        assert weight.data_ptr() == qkv[k].data_ptr()  # a view of the stack, not a copy
    assert torch.equal(forward_logits(model, tokens), before)
    assert (decode_logits(decoder, tokens, 2) - before[:, 1:]).abs().max().item() < 1e-4


def test_bf16_decode_is_close_to_fp32():
    """A model decoded with dtype=torch.bfloat16 (cast in place) against the same weights in
    fp32: every logit within BF16_TOLERANCE of the largest fp32 logit (bf16 keeps 8 bits of
    mantissa; a wrong mask or slot moves logits by their own size)."""
    seed = fresh_seed()
    for variant, modes in [
            (dict(num_sections=3, cross_attention_window=2, output_combination="learned"),
             ("sequential", "batched")),
            (dict(num_sections=2, weight_sharing="shared", num_query_groups=2),
             ("batched", "recurrent")),
            (dict(num_sections=1), ("batched",))]:
        tokens, _ = random_tokens(2, LENGTH, seed)
        for mode in modes:
            full = decode_logits(StagDecoder(build_model(tiny_config(**variant), seed=seed % 1000),
                                             2, LENGTH, mode=mode), tokens, 4)
            decoder = StagDecoder(build_model(tiny_config(**variant), seed=seed % 1000), 2,
                                  LENGTH, mode=mode, dtype=torch.bfloat16)
            half = decode_logits(decoder, tokens, 4)
            assert half.dtype == decoder.caches.self_kv[0].k.dtype == torch.bfloat16
            diff, scale = (half.float() - full).abs().max().item(), full.abs().max().item()
            assert diff < BF16_TOLERANCE * scale, f"seed {seed}, {variant}, {mode}: {diff}"


TE_VARIANTS = [
    dict(num_sections=2),
    dict(num_sections=3, cross_attention_window=2, output_combination="learned"),
    dict(num_sections=2, normalization="RMSNorm", add_bias_linear=False, gated_linear_unit=True,
         num_query_groups=2),
    dict(num_sections=2, qk_layernorm=True, weight_sharing="shared"),
]


@pytest.fixture
def te_layers(monkeypatch):
    te_stand_ins.install(monkeypatch)


@pytest.mark.parametrize("variant", TE_VARIANTS, ids=variant_id)
def test_fused_step_on_transformer_engine_layers(te_layers, variant):
    seed = fresh_seed()
    twin = te_twin(build_model(tiny_config(**variant), seed=seed % 1000))
    tokens, _ = random_tokens(2, LENGTH, seed)
    expected = forward_logits(twin, tokens)
    got = decode_logits(StagDecoder(twin, 2, 16, mode="batched"), tokens, 3)
    assert (got - expected[:, 2:]).abs().max().item() < 1e-4, f"seed {seed}"
