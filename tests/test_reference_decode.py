"""ReferenceDecoder (stag_plugin.reference.decode), the Megatron-free decoder of the reference
StagFormer, held to:
  (a) the reference model's teacher-forced forward (fp32, max abs diff < 1e-4; same greedy
      tokens) for every variant, mode and prompt length, with eager steps and with the
      fixed-shape step (whole caches under a mask; run eagerly here), and once compiled;
      batched steps equal to sequential ones, logits and caches, step by step;
  (b) StagDecoder on the same weights (a Megatron StagGPTModel mapped with name_map), step by
      step, in modes sequential, batched and recurrent;
  (c) generate with per-sequence stops, and cross caches sized by the window;
  (d) bf16 decoding (dtype=) within a stated distance of fp32;
  (e) clear errors.
Random weights and tokens come from a fresh seed per test (printed on failure)."""

import copy
import itertools

import pytest
import torch

from stag_plugin.errors import StagError
from stag_plugin.reference.decode import ReferenceDecoder
from stag_plugin.reference.model import ReferenceConfig, StagFormer
from stag_plugin.reference.sampling import Sampler

from stag_testing import (
    decode_logits,
    fp32_bound,
    fresh_seed,
    perturb_parameters,
    random_tokens,
    variant_id,
)

VOCAB, MAX_LEN = 96, 64
LENGTH = 12  # tokens per test sequence
PROMPTS = (1, 5)  # a single token, and longer than every window tested

GRID = [dict(num_sections=1)] + [
    dict(num_sections=p, weight_sharing=w, cross_attention_window=win, memory_norm=norm)
    for p, w, win, norm in itertools.product((2, 3), ("separate", "shared"), (1, 3, None),
                                             (True, False))
]
EXTRA = [
    dict(num_sections=2, num_query_groups=2),  # GQA
    dict(num_sections=3, num_query_groups=1, weight_sharing="shared", cross_attention_window=2,
         output_combination="learned"),
    dict(num_sections=3, output_combination="learned", cross_attention_window=3),
    dict(num_sections=3, output_combination="learned", memory_norm=False),
    dict(num_sections=2, position_embedding_type="learned_absolute", cross_attention_rope=False),
    dict(num_sections=2, cross_attention_rope=False),
    dict(num_sections=2, normalization="RMSNorm", linear_bias=False, qkv_bias=False),
    dict(num_sections=2, gated_linear_unit=True, activation="silu", num_query_groups=2),
    dict(num_sections=2, rotary_percent=0.5, head_dim=32),
    dict(num_sections=2, weight_sharing="shared", tie_embeddings=False,
         output_combination="learned", cross_attention_window=2),
]


def tiny_reference(seed: int, perturb: float = 0.05, **overrides) -> StagFormer:
    """A reference StagFormer, 2 layers per section, hidden 64, every parameter random."""
    sections = overrides.get("num_sections", 2)
    settings = dict(vocab_size=VOCAB, max_sequence_length=MAX_LEN, num_layers=2 * sections,
                    hidden_size=64, num_attention_heads=4, num_query_groups=4,
                    ffn_hidden_size=256, head_dim=16)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = StagFormer(ReferenceConfig(**settings))
    perturb_parameters(model, perturb, seed)
    return model.eval()


FORWARD_MODES = ("sequential", "batched")  # logits = the teacher-forced forward's, any weights


def fixed_shape(model: StagFormer, *args, **kwargs) -> ReferenceDecoder:
    """A decoder built for fixed-shape steps (compile=True: the layout of compile / cuda_graph)
    whose step runs eagerly instead (torch.compile is lazy: nothing is compiled), and twice per
    call, as a CUDA graph capture runs it: whole caches under a mask from the position tensor,
    and a step that must be idempotent."""
    decoder = ReferenceDecoder(model, *args, compile=True, **kwargs)

    def twice(ids, index):
        decoder._fixed_step(ids, index)
        return decoder._fixed_step(ids, index)

    decoder._runner = twice
    return decoder


# ---------------------------------------------------------------------------- (a) forward


@pytest.mark.parametrize("variant", GRID + EXTRA, ids=variant_id)
def test_decode_matches_teacher_forced_forward(variant):
    seed = fresh_seed()
    model = tiny_reference(seed % 1000, **variant)
    tokens, _ = random_tokens(2, LENGTH, seed)
    with torch.no_grad():
        expected = model(tokens)  # [b, s, vocab]
    for mode, prompt, fixed in itertools.product(FORWARD_MODES, PROMPTS, (False, True)):
        build = fixed_shape if fixed else ReferenceDecoder
        decoder = build(model, max_batch_size=2, max_sequence_length=16, mode=mode)
        got = decode_logits(decoder, tokens, prompt)
        diff = (got - expected[:, prompt - 1:]).abs().max().item()
        assert diff < 1e-4, (f"seed {seed}, mode {mode}, prompt {prompt}, fixed shape {fixed}: "
                             f"max abs diff {diff}")


STEP_VARIANTS = [
    dict(num_sections=1),
    dict(num_sections=2),
    dict(num_sections=3, cross_attention_window=2, num_query_groups=2,
         output_combination="learned"),
    dict(num_sections=3, weight_sharing="shared", cross_attention_window=1,
         output_combination="learned"),
    dict(num_sections=3, output_combination="learned", memory_norm=False),
    dict(num_sections=3, weight_sharing="shared", memory_norm=False),
    dict(num_sections=2, position_embedding_type="learned_absolute", cross_attention_rope=False,
         normalization="RMSNorm", gated_linear_unit=True, activation="silu"),
]


@pytest.mark.parametrize("variant", STEP_VARIANTS, ids=variant_id)
def test_batched_steps_equal_sequential_steps(variant):
    """One pass over the stacked weights ([p, ...] separate, [1, ...] shared) computes what the
    sections one after another compute: the same logits and the same caches after every step
    (in fp64, so that only a real difference, not fp32 rounding, shows)."""
    seed = fresh_seed()
    model = tiny_reference(seed % 1000, perturb=0.5, **variant)
    tokens, _ = random_tokens(2, LENGTH, seed)
    sequential, batched = (ReferenceDecoder(model, 2, 16, mode=mode, dtype=torch.float64)
                           for mode in ("sequential", "batched"))
    p, shared = model.cfg.num_sections, variant.get("weight_sharing") == "shared"
    layer = batched.layers[0]
    assert layer.qkv.weight.shape[0] == layer.down.weight.shape[0] == (1 if shared else p)
    if p > 1:
        assert layer.cross_q.weight.shape[0] == (1 if shared else p - 1)
    for t in range(3, LENGTH + 1):
        if t == 3:
            a, b = sequential.prefill(tokens[:, :3]), batched.prefill(tokens[:, :3])
        else:
            a, b = sequential.step(tokens[:, t - 1]), batched.step(tokens[:, t - 1])
        scale = a.abs().max().item()
        assert (a - b).abs().max().item() < 1e-10 * scale, f"seed {seed}, position {t - 1}"
        for x, y in zip(cache_tensors(sequential), cache_tensors(batched)):
            assert (x - y).abs().max().item() < 1e-10 * max(1.0, x.abs().max().item()), \
                f"seed {seed}, caches after position {t - 1}"


def cache_tensors(decoder: ReferenceDecoder) -> list:
    return [t for c in decoder.self_caches + decoder.cross_caches for t in (c.k, c.v)]


def test_compiled_step_matches_teacher_forced_forward():
    """torch.compile of the fixed-shape step (CPU: one compilation, kept small): separate
    weights stacked, three sections, GQA, a window of 2 that the ring wraps many times."""
    seed = fresh_seed()
    model = tiny_reference(seed % 1000, num_sections=3, cross_attention_window=2,
                           num_query_groups=2, output_combination="learned")
    tokens, _ = random_tokens(2, LENGTH, seed)
    with torch.no_grad():
        expected = model(tokens)
    decoder = ReferenceDecoder(model, 2, 16, mode="batched", compile=True)
    got = decode_logits(decoder, tokens, 3)
    diff = (got - expected[:, 2:]).abs().max().item()
    assert diff < 1e-4, f"seed {seed}: max abs diff {diff}"
    eager = ReferenceDecoder(model, 2, 16, mode="batched")
    assert decoder.generate(tokens[:, :3], 8) == eager.generate(tokens[:, :3], 8), f"seed {seed}"


@pytest.mark.parametrize("variant", [dict(num_sections=1), dict(num_sections=2),
                                     dict(num_sections=3, weight_sharing="shared",
                                          cross_attention_window=1)], ids=variant_id)
def test_greedy_tokens_match_teacher_forced_argmax(variant):
    seed = fresh_seed()
    model = tiny_reference(seed % 1000, perturb=0.5, **variant)
    prompt, _ = random_tokens(2, 4, seed)
    for mode in FORWARD_MODES:
        decoder = ReferenceDecoder(model, max_batch_size=2, max_sequence_length=16, mode=mode)
        new = torch.tensor(decoder.generate(prompt, 8))  # greedy, [b, 8]
        full = torch.cat([prompt, new], dim=1)
        with torch.no_grad():
            argmax = model(full).argmax(dim=-1)[:, 3:-1]
        assert torch.equal(new, argmax), f"seed {seed}, mode {mode}"


@pytest.mark.parametrize("memory_norm", [True, False])
def test_recurrent_mode_reads_its_own_outputs(memory_norm):
    """Recurrent decode against its definition computed with the reference's Stack: the last
    section over tokens 0..t with memory [null, section p-1's outputs over the prompt, its own
    outputs at the generated tokens (before its final norm, without memory_norm)]."""
    seed = fresh_seed()
    model = tiny_reference(seed % 1000, num_sections=3, weight_sharing="shared",
                           cross_attention_window=3, output_combination="learned",
                           memory_norm=memory_norm)
    tokens, _ = random_tokens(2, 9, seed)
    prompt = 3
    expected = recurrent_by_definition(model, tokens, prompt)
    for fixed in (False, True):
        decoder = (fixed_shape if fixed else ReferenceDecoder)(model, 2, 16, mode="recurrent")
        got = decode_logits(decoder, tokens, prompt)
        assert (got - expected).abs().max().item() < 1e-4, f"seed {seed}, fixed shape {fixed}"


@torch.no_grad()
def recurrent_by_definition(model, tokens, prompt):
    cfg, (b, n) = model.cfg, tokens.shape
    outs = model.section_outputs(tokens[:, :prompt])
    memory = torch.cat([model.null_memory.expand(b, 1, -1), outs[-2]], dim=1)  # slots 0..P
    x = model.tok_emb(tokens)
    logits = [model.head(outs[-1][:, -1])]
    for t in range(prompt, n):
        pos = torch.arange(t + 1)
        causal = pos[None, :] <= pos[:, None]
        window = causal & (pos[None, :] > pos[:, None] - cfg.cross_attention_window)
        raw = model.stack(cfg.num_sections - 1)(
            x[:, :t + 1], causal, _angles(cfg, pos), memory[:, :t + 1], window,
            (_angles(cfg, pos + 1), _angles(cfg, pos)))
        out = model.stack(0).ln_out(raw)
        logits.append(model.head(out[:, -1]))
        own = out if cfg.memory_norm else raw
        memory = torch.cat([memory, own[:, -1:]], dim=1)  # own output at t -> slot t + 1
    return torch.stack(logits, dim=1)


def _angles(cfg, positions):
    from stag_plugin.reference.model import rope_angles

    return rope_angles(cfg, positions)


# ---------------------------------------------------------------------------- (b) StagDecoder


MEGATRON_CASES = [  # (config overrides, modes)
    (dict(num_sections=1), ("sequential", "batched")),
    (dict(num_sections=2, num_query_groups=2, gated_linear_unit=True),
     ("sequential", "batched")),
    (dict(num_sections=2, weight_sharing="shared"), ("sequential", "batched", "recurrent")),
    (dict(num_sections=2, weight_sharing="shared", memory_norm=True),
     ("sequential", "batched", "recurrent")),
    (dict(num_sections=3, memory_norm=True, output_combination="learned"),
     ("sequential", "batched")),
    (dict(num_sections=3, weight_sharing="shared", cross_attention_window=2,
          output_combination="learned"), ("sequential", "batched", "recurrent")),
    (dict(num_sections=3, output_combination="learned", position_embedding_type=
          "learned_absolute", cross_attention_rope=False), ("sequential", "batched")),
]


@pytest.mark.parametrize("overrides, modes", MEGATRON_CASES,
                         ids=[variant_id(c[0]) for c in MEGATRON_CASES])
def test_reference_decoder_equals_stag_decoder(overrides, modes):
    from stag_plugin.decode.engine import StagDecoder
    from stag_plugin.reference.name_map import megatron_to_reference

    from stag_testing import build_model, tiny_config

    seed = fresh_seed()
    megatron = build_model(tiny_config(**overrides), perturb=0.5, seed=seed % 1000)
    cfg = ReferenceConfig.from_megatron(megatron.config, VOCAB, MAX_LEN)
    reference = StagFormer(cfg).eval()
    reference.load_state_dict(megatron_to_reference(megatron.state_dict(), cfg))
    exact = copy.deepcopy(reference).double()  # the same model in fp64: the rounding yardstick
    tokens, _ = random_tokens(2, LENGTH, seed)
    for mode in modes:
        ours = ReferenceDecoder(reference, 2, 16, mode=mode)
        theirs = StagDecoder(megatron, 2, 16, mode=mode)
        for prompt in PROMPTS:
            a, b = decode_logits(ours, tokens, prompt), decode_logits(theirs, tokens, prompt)
            bound = fp32_bound(a, decode_logits(ReferenceDecoder(exact, 2, 16, mode=mode),
                                                tokens, prompt))
            diff = (a - b).abs().max().item()
            assert diff < bound, f"seed {seed}, mode {mode}, prompt {prompt}: {diff} > {bound}"
        assert ours.generate(tokens[:, :4], 8) == theirs.generate(tokens[:, :4], 8, Sampler()), \
            f"seed {seed}, mode {mode}"


# ---------------------------------------------------------------------------- (c) generate, caches


def test_generate_stops_each_sequence_at_its_own_stop_token():
    seed = fresh_seed()
    model = tiny_reference(seed % 1000, perturb=0.5, num_sections=2, cross_attention_window=3)
    prompt, _ = random_tokens(2, 3, seed)
    decoder = ReferenceDecoder(model, 2, 16)
    free = decoder.generate(prompt, 10, Sampler(temperature=1.0, seed=seed))
    assert [len(seq) for seq in free] == [10, 10]
    first, second = free
    # seq 0 stops at its first token, seq 1 at the last token that is new in its list
    stop_at = max(j for j in range(10) if second.index(second[j]) == j)
    stopped = decoder.generate(prompt, 10, Sampler(temperature=1.0, seed=seed),
                               [{first[0]}, {second[stop_at]}])
    assert stopped == [first[:1], second[:stop_at + 1]], f"seed {seed}"
    # the sequences after a stop are those of a decode without stops (the others went on)
    assert free == decoder.generate(prompt, 10, Sampler(temperature=1.0, seed=seed))


def test_cross_cache_size_is_fixed_by_the_window():
    def sizes(window, max_len, sections=2, **options):
        model = tiny_reference(0, num_sections=sections, cross_attention_window=window)
        return ReferenceDecoder(model, 2, max_len, **options).cache_bytes()

    short, long = sizes(3, 16), sizes(3, 64)
    assert long["cross"] == short["cross"] > 0
    assert long["self"] == 4 * short["self"]
    # 2 layers x (K, V) x (1 section x batch 2) x 4 groups x 3 slots x 16 dims x 4 bytes
    assert short["cross"] == 2 * 2 * 2 * 4 * 3 * 16 * 4
    assert sizes(3, 16, sections=3)["cross"] == 2 * short["cross"]
    assert sizes(None, 64)["cross"] == 4 * sizes(None, 16)["cross"]
    assert sizes(None, 16, sections=1)["cross"] == 0
    # fixed-shape steps: one spare ring entry, so a step never overwrites a slot it reads
    assert sizes(3, 16, compile=True)["cross"] == short["cross"] * 4 // 3
    assert sizes(None, 16, compile=True)["cross"] == sizes(None, 16)["cross"] * 17 // 16


@pytest.mark.parametrize("window", [2, None])
def test_ring_decodes_to_the_last_position(window):
    """40 positions, all the caches hold: a window of 2 slots wraps its ring many times, and the
    last step writes slot 40 (= max_len, never read); still the forward's logits."""
    seed = fresh_seed()
    model = tiny_reference(seed % 1000, num_sections=2, cross_attention_window=window)
    tokens, _ = random_tokens(1, 40, seed)
    with torch.no_grad():
        expected = model(tokens)
    for build in (ReferenceDecoder, fixed_shape):
        got = decode_logits(build(model, 1, 40, mode="batched"), tokens, 3)
        assert (got - expected[:, 2:]).abs().max().item() < 1e-4, f"seed {seed}, {build}"


BF16_TOLERANCE = 0.02  # bf16 logits within 2% of the largest fp32 logit (seen: up to 0.6%)


@pytest.mark.parametrize("variant", [
    dict(num_sections=2, weight_sharing="shared", cross_attention_window=3,
         output_combination="learned"),
    dict(num_sections=3, num_query_groups=2, cross_attention_window=2)], ids=variant_id)
def test_bf16_decode_is_close_to_fp32(variant):
    """dtype=bf16 on an fp32 model (the decoder casts its own weights; the model stays fp32),
    and a model cast to bf16 beforehand (dtype None: the model's), against fp32 decoding."""
    seed = fresh_seed()
    model = tiny_reference(seed % 1000, **variant)
    half_model = copy.deepcopy(model).to(torch.bfloat16)
    tokens, _ = random_tokens(2, LENGTH, seed)
    modes = FORWARD_MODES + (("recurrent",) if variant.get("weight_sharing") == "shared" else ())
    for mode in modes:
        full = decode_logits(ReferenceDecoder(model, 2, 16, mode=mode), tokens, 4)
        scale = full.abs().max().item()
        for source, dtype in ((model, torch.bfloat16), (model, "bf16"), (half_model, None)):
            decoder = ReferenceDecoder(source, 2, 16, mode=mode, dtype=dtype)
            half = decode_logits(decoder, tokens, 4)
            assert half.dtype == decoder.self_caches[0].k.dtype == torch.bfloat16
            diff = (half.float() - full).abs().max().item()
            assert diff < BF16_TOLERANCE * scale, \
                f"seed {seed}, mode {mode}, dtype {dtype}: bf16 vs fp32 {diff} ({scale})"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    fp32 = ReferenceDecoder(half_model, 2, 16, dtype=torch.float32)  # and back up to fp32
    assert decode_logits(fp32, tokens, 4).dtype == torch.float32


# ---------------------------------------------------------------------------- (d) errors


def _prefilled(decoder, length: int):
    decoder.prefill(random_tokens(2, length, 0)[0])
    return decoder


SEPARATE = dict(num_sections=2)
# (model overrides, what to do with it (m: the reference model) -> raises, the message)
ERRORS = [
    (SEPARATE, lambda m: ReferenceDecoder(m, 2, 16, mode="recurrent"),
     "weight_sharing='shared'.*Fix: use mode='batched' or 'sequential'"),
    (SEPARATE, lambda m: ReferenceDecoder(m, 2, 16, mode="batched", cuda_graph=True),
     "captures CUDA graphs, and the model is on cpu. Fix"),
    (SEPARATE, lambda m: ReferenceDecoder(m, 2, 16, dtype="int8"),
     "dtype='int8' is not a floating-point.*Fix"),
    (SEPARATE, lambda m: ReferenceDecoder(m, 2, 16, dtype=torch.int64),
     "dtype=torch.int64 is not a floating-point.*Fix"),
    (SEPARATE, lambda m: ReferenceDecoder(m, 2, 16, mode="pipeline"), "not one of.*Fix"),
    (dict(num_sections=1, weight_sharing="shared"),
     lambda m: ReferenceDecoder(m, 2, 16, mode="recurrent"),
     "num_sections >= 2.*Fix: use mode=.sequential."),
    (dict(position_embedding_type="learned_absolute", cross_attention_rope=False),
     lambda m: ReferenceDecoder(m, 1, 65), "64 learned positions. Fix: use at most 64"),
    (SEPARATE, lambda m: ReferenceDecoder(m, 0, 8), "max_batch_size=0.*Fix"),
    (SEPARATE, lambda m: ReferenceDecoder(m, 2, 8).step(torch.zeros(2, dtype=torch.long)),
     "nothing was prefilled. Fix: call prefill"),
    (SEPARATE, lambda m: ReferenceDecoder(m, 2, 8).prefill(random_tokens(2, 9, 0)[0]),
     "prompt needs 9 positions.*max_sequence_length=8. Fix"),
    (SEPARATE, lambda m: ReferenceDecoder(m, 2, 8).prefill(random_tokens(3, 4, 0)[0]),
     "3 prompts.*max_batch_size=2. Fix"),
    (SEPARATE, lambda m: ReferenceDecoder(m, 2, 8).generate(random_tokens(2, 4, 0)[0], 6),
     "max_new_tokens - 1 needs 9.*Fix"),
    (SEPARATE, lambda m: _prefilled(ReferenceDecoder(m, 2, 8), 8).step(
        torch.zeros(2, dtype=torch.long)), "needs 9 positions.*Fix"),
    (SEPARATE, lambda m: _prefilled(ReferenceDecoder(m, 2, 8), 4).step(
        torch.zeros(1, dtype=torch.long)), "one token per prefilled sequence.*Fix"),
]


@pytest.mark.parametrize("overrides, action, message", ERRORS,
                         ids=[e[2][:40] for e in ERRORS])
def test_clear_errors(overrides, action, message):
    with pytest.raises(StagError, match=message):
        action(tiny_reference(0, **overrides))


def test_a_model_that_is_not_the_reference_is_refused():
    with pytest.raises(TypeError, match="Fix"):
        ReferenceDecoder(torch.nn.Linear(2, 2), 1, 8)
