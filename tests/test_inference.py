"""StagDecoder (stag_plugin.decode.engine) against the teacher-forced forward of the same model:
prefill + one step per token must give the logits of `model(tokens, positions)` at every
position (fp32, max abs difference < 1e-4) for every variant, prompt length and the modes that
equal it (sequential on the model's modules, batched on the fused step, for any weight sharing).
The fused step's own cases (fixed shapes, compile, bf16, Transformer Engine layers, kernel count)
are in tests/test_fused_decode.py."""

import copy
import itertools
import types

import pytest
import torch

from stag_plugin.core.attention import cross_attention_mask
from stag_plugin.decode.engine import Sampler, StagDecoder
from stag_plugin.errors import StagError

from stag_testing import (
    build_model,
    decode_logits,
    fresh_seed,
    random_tokens,
    tiny_config,
    variant_id,
)

LENGTH = 12  # tokens per test sequence
PROMPTS = (1, 5)  # a single token, and longer than every window tested

GRID = [dict(num_sections=1)] + [
    dict(num_sections=p, weight_sharing=w, cross_attention_window=win)
    for p, w, win in itertools.product((2, 3), ("separate", "shared"), (1, 3, None))
]
EXTRA = [
    dict(num_sections=2, num_query_groups=2, gated_linear_unit=True),
    dict(num_sections=3, num_query_groups=1, weight_sharing="shared", cross_attention_window=2,
         output_combination="learned"),
    dict(num_sections=3, output_combination="learned", cross_attention_window=3),
    dict(num_sections=2, cross_attention_rope=False),
    dict(num_sections=2, position_embedding_type="learned_absolute", cross_attention_rope=False),
    dict(num_sections=2, normalization="RMSNorm", add_bias_linear=False),
    dict(num_sections=2, rotary_percent=0.5, kv_channels=32),
    dict(num_sections=2, qk_layernorm=True, weight_sharing="shared"),
    dict(num_sections=3, qk_layernorm=True, num_query_groups=2, add_qkv_bias=True,
         add_bias_linear=False),
]
EXACT_MODES = ("sequential", "batched")  # the modes whose logits equal the forward's


@pytest.mark.parametrize("variant", GRID + EXTRA, ids=variant_id)
def test_decode_matches_teacher_forced_forward(variant):
    seed = fresh_seed()
    model = build_model(tiny_config(**variant), seed=seed % 1000)
    tokens, positions = random_tokens(2, LENGTH, seed)
    with torch.no_grad():
        expected = model(tokens, positions)  # [b, s, vocab]
    for mode, prompt in itertools.product(EXACT_MODES, PROMPTS):
        decoder = StagDecoder(model, max_batch_size=2, max_sequence_length=16, mode=mode)
        got = decode_logits(decoder, tokens, prompt)
        diff = (got - expected[:, prompt - 1:]).abs().max().item()
        assert diff < 1e-4, f"seed {seed}, mode {mode}, prompt {prompt}: max abs diff {diff}"


@pytest.mark.parametrize("variant", [dict(num_sections=2), dict(num_sections=3,
                         weight_sharing="shared", cross_attention_window=1)], ids=variant_id)
def test_greedy_tokens_match_teacher_forced_argmax(variant):
    seed = fresh_seed()
    model = build_model(tiny_config(**variant), perturb=0.5, seed=seed % 1000)
    prompt, _ = random_tokens(2, 4, seed)
    for mode in EXACT_MODES:
        decoder = StagDecoder(model, max_batch_size=2, max_sequence_length=16, mode=mode)
        new = torch.tensor(decoder.generate(prompt, 8, Sampler()))  # [b, 8]
        full = torch.cat([prompt, new], dim=1)
        positions = torch.arange(full.shape[1]).expand_as(full)
        with torch.no_grad():
            argmax = model(full, positions).argmax(dim=-1)[:, 3:-1]
        assert torch.equal(new, argmax), f"seed {seed}, mode {mode}"


@pytest.mark.parametrize("sharing", ["separate", "shared"])
def test_batched_equals_sequential_step_by_step(sharing):
    """The fused batched step against the model's modules run section by section, at every
    step of the same decoding (both fed the same tokens)."""
    seed = fresh_seed()
    model = build_model(tiny_config(num_sections=3, weight_sharing=sharing, num_query_groups=2,
                                    cross_attention_window=2, output_combination="learned"),
                        perturb=0.5, seed=seed % 1000)
    tokens, _ = random_tokens(2, LENGTH, seed)
    decoders = [StagDecoder(model, 2, 16, mode=mode) for mode in ("sequential", "batched")]
    for t in range(3, LENGTH + 1):  # logits at position t - 1
        logits = [d.prefill(tokens[:, :t]) if t == 3 else d.step(tokens[:, t - 1])
                  for d in decoders]
        diff = (logits[0] - logits[1]).abs().max().item()
        assert diff < 1e-4 * max(1.0, logits[0].abs().max().item()), f"seed {seed}, t {t}"


def test_smaller_batch_than_allocated_and_untied_head():
    seed = fresh_seed()
    model = build_model(tiny_config(num_sections=2, weight_sharing="shared",
                                    cross_attention_window=2, output_combination="learned"),
                        seed=seed % 1000, share_embeddings_and_output_weights=False)
    tokens, positions = random_tokens(1, LENGTH, seed)
    with torch.no_grad():
        expected = model(tokens, positions)
    for mode in ("sequential", "batched"):
        decoder = StagDecoder(model, max_batch_size=3, max_sequence_length=LENGTH, mode=mode)
        diff = (decode_logits(decoder, tokens, 4) - expected[:, 3:]).abs().max().item()
        assert diff < 1e-4, f"seed {seed}, mode {mode}: {diff}"


def test_cross_cache_size_is_fixed_by_the_window():
    def sizes(window, max_len):
        model = build_model(tiny_config(num_sections=2, cross_attention_window=window))
        return StagDecoder(model, 2, max_len).cache_bytes()

    short, long = sizes(1, 16), sizes(1, 64)
    assert long["cross"] == short["cross"] > 0
    assert long["self"] == 4 * short["self"]
    # 2 layers x (K, V) x batch 2 x 4 groups x 1 slot x 16 dims x 4 bytes
    assert short["cross"] == 2 * 2 * 2 * 4 * 1 * 16 * 4
    assert sizes(None, 64)["cross"] == 4 * sizes(None, 16)["cross"]
    plain = build_model(tiny_config(num_sections=1))
    assert StagDecoder(plain, 2, 16).cache_bytes()["cross"] == 0


def test_generate_stops_each_sequence_at_its_own_stop_token():
    seed = fresh_seed()
    model = build_model(tiny_config(num_sections=2, cross_attention_window=3), perturb=0.5,
                        seed=seed % 1000)
    prompt, _ = random_tokens(2, 3, seed)
    decoder = StagDecoder(model, 2, 16)
    free = decoder.generate(prompt, 10, Sampler(temperature=1.0, seed=seed))
    assert [len(seq) for seq in free] == [10, 10]
    first, second = free
    # seq 0 stops at its first token, seq 1 at the last token that is new in its list.
    stop_at = max(j for j in range(10) if second.index(second[j]) == j)
    stops = [{first[0]}, {second[stop_at]}]
    stopped = decoder.generate(prompt, 10, Sampler(temperature=1.0, seed=seed), stops)
    assert stopped == [first[:1], second[:stop_at + 1]], f"seed {seed}"
    shared = decoder.generate(prompt, 10, Sampler(temperature=1.0, seed=seed), [first[0]])
    assert shared[0] == first[:1]
    expected = second[:second.index(first[0]) + 1] if first[0] in second else second
    assert shared[1] == expected


@pytest.mark.parametrize("memory_norm", [False, True])
def test_recurrent_mode_reads_its_own_outputs(memory_norm):
    """Recurrent decode against a direct computation with section 2's block: memory slots of
    the prompt come from section 1, later slots from the pass's own earlier outputs (before its
    final norm, without memory_norm)."""
    seed = fresh_seed()
    model = build_model(tiny_config(num_sections=2, weight_sharing="shared",
                                    memory_norm=memory_norm), seed=seed % 1000)
    before_norm = []  # the input of section 2's final norm: its raw output
    model.sections[1].final_layernorm.register_forward_hook(
        lambda module, args, out: before_norm.append(args[0]))
    tokens, positions = random_tokens(2, 8, seed)
    prompt = 3
    decoder = StagDecoder(model, 2, 16, mode="recurrent")
    got = decode_logits(decoder, tokens, prompt)  # positions 2..7
    with torch.no_grad():
        embedded = model.embedding(input_ids=tokens, position_ids=positions)  # [s, b, h]
        rotary = model.rotary_pos_emb(8)
        first = model.sections[0](hidden_states=embedded, attention_mask=None,
                                  rotary_pos_emb=rotary)
        null = model.null_memory.view(1, 1, -1).expand(1, 2, -1)
        memory = torch.cat([null, first[:prompt]], dim=0)  # slots 0..prompt
        expected = []
        for t in range(prompt - 1, 8):
            n = t + 1
            out = model.sections[1](hidden_states=embedded[:n], attention_mask=None,
                                    rotary_pos_emb=rotary[:n], context=memory[:n],
                                    context_mask=cross_attention_mask(n, None, tokens.device))
            logits, _ = model.output_layer(out[-1:], weight=model._output_weight())
            expected.append(logits[0])
            if t >= prompt:
                own = out if memory_norm else before_norm[-1]
                memory = torch.cat([memory, own[-1:]], dim=0)  # own output at t -> slot t+1
    expected = torch.stack(expected, dim=1)
    assert (got - expected).abs().max().item() < 1e-4, f"seed {seed}"
    # Prefill is as in training; later steps differ from the staggered decode by design.
    sequential = decode_logits(StagDecoder(model, 2, 16), tokens, prompt)
    assert torch.allclose(got[:, :2], sequential[:, :2], atol=1e-5)


def _pipelined(model):
    fake = types.SimpleNamespace(config=copy.copy(model.config))
    fake.config.pipeline_model_parallel_size = 2
    return fake


def _prefilled(decoder, length: int):
    decoder.prefill(random_tokens(2, length, 0)[0])
    return decoder


SEPARATE, SHARED_P1 = dict(num_sections=2), dict(num_sections=1, weight_sharing="shared")
# (model config, what to do with it (m: the model) -> raises, the message it must give)
ERRORS = [
    (SEPARATE, lambda m: StagDecoder(m, 2, 16, mode="recurrent"),
     "weight_sharing='shared'.*Fix: use mode='batched' or 'sequential'"),
    (SEPARATE, lambda m: StagDecoder(m, 2, 16, compile=True),
     "compile runs the fixed-shape fused step.*Fix: use mode='batched'"),
    (SEPARATE, lambda m: StagDecoder(m, 2, 16, mode="batched", cuda_graph=True),
     "captures CUDA graphs, and the model is on cpu"),
    (SEPARATE, lambda m: StagDecoder(m, 2, 16, dtype="fp8"),
     "dtype='fp8' is not a floating-point torch dtype nor one of"),
    (SEPARATE, lambda m: StagDecoder(m, 2, 16, dtype=torch.int8), "not a floating-point"),
    (dict(num_sections=2, fp32_residual_connection=True),
     lambda m: StagDecoder(m, 2, 16, mode="batched"),
     "fused decode step.*fp32_residual_connection.*Fix: decode with mode='sequential'"),
    (SEPARATE, lambda m: StagDecoder(m, 2, 16, mode="parallel"), "not one of"),
    (SEPARATE, lambda m: StagDecoder(m, 2, 16, mode="pipeline"), "Fix: build a PipelineDecoder"),
    (SHARED_P1, lambda m: StagDecoder(m, 2, 16, mode="recurrent"), "num_sections >= 2"),
    (SEPARATE, lambda m: StagDecoder(_pipelined(m), 2, 16),
     "every section on this process.*Fix: decode it with .*PipelineDecoder"),
    (SEPARATE, lambda m: StagDecoder(m, 0, 16), "must both be >= 1"),
    (SEPARATE, lambda m: StagDecoder(m, 2, 8).step(torch.zeros(2, dtype=torch.long)),
     "Fix: call prefill\\(prompt\\) before step"),
    (SEPARATE, lambda m: StagDecoder(m, 2, 8).prefill(random_tokens(2, 9, 0)[0]),
     "max_sequence_length=8. Fix:.*larger"),
    (SEPARATE, lambda m: StagDecoder(m, 2, 8).prefill(random_tokens(3, 4, 0)[0]),
     "max_batch_size=2. Fix:.*max_batch_size >= 3"),
    (SEPARATE, lambda m: StagDecoder(m, 2, 8).generate(random_tokens(2, 4, 0)[0], 6, Sampler()),
     "prompt \\+ max_new_tokens - 1 needs 9"),
    (SEPARATE, lambda m: _prefilled(StagDecoder(m, 2, 8), 8).step(torch.zeros(2, dtype=torch.long)),
     "needs 9 positions"),
    (SEPARATE, lambda m: _prefilled(StagDecoder(m, 2, 8), 4).step(torch.zeros(1, dtype=torch.long)),
     "one token per sequence"),
]


@pytest.mark.parametrize("config, action, message", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_clear_errors(config, action, message):
    with pytest.raises(StagError, match=message):
        action(build_model(tiny_config(**config)))


def test_longest_generation_that_fits():
    decoder = StagDecoder(build_model(tiny_config(num_sections=2)), 2, 8)
    tokens, _ = random_tokens(2, 4, 0)
    assert [len(seq) for seq in decoder.generate(tokens, 5, Sampler())] == [5, 5]  # 8 positions
