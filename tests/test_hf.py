"""Hugging Face transformers: an inference folder loads with AutoModelForCausalLM and equals the
reference model (logits, loss, greedy and sampled generate), with and without stag_plugin; the
KV cache and padding equal the reference's full forward and its cached decoder
(ReferenceDecoder).

No Megatron: reference models with random weights are written with save_inference_folder. Every
run draws fresh seeds; each test prints its seed (shown by pytest on failure). Logits are
compared in fp32; greedy tokens of two different computations (cached against recomputed) in
fp64, so that no near-tie between two logits can flip an argmax.
"""

import atexit
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stag_plugin.convert.hf import AUTO_MAP, REMOTE_CODE_FILES
from stag_plugin.convert.inference_folder import load_inference_folder, save_inference_folder
from stag_plugin.reference.decode import ReferenceDecoder
from stag_plugin.reference.model import ReferenceConfig, StagFormer

# transformers copies remote code into HF_MODULES_CACHE, read once at its import: a private one.
_MODULES_CACHE = tempfile.mkdtemp(prefix="stag-hf-modules-")
atexit.register(shutil.rmtree, _MODULES_CACHE, True)
os.environ.setdefault("HF_MODULES_CACHE", _MODULES_CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
if HAVE_TRANSFORMERS:  # installed but broken: an import error, not a skip
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, StaticCache
needs_transformers = pytest.mark.skipif(
    not HAVE_TRANSFORMERS, reason="transformers is not installed (pip install -e '.[hf]')")

REPO = Path(__file__).resolve().parents[1]
BASE = dict(vocab_size=61, max_sequence_length=24, num_layers=4, hidden_size=32,
            num_attention_heads=4, num_query_groups=4, ffn_hidden_size=48, head_dim=8)
VARIANTS = {
    "p1_gpt": dict(num_sections=1, num_layers=2),
    "p2_separate": dict(),
    "p2_shared": dict(weight_sharing="shared"),
    "p3_window1_learned": dict(num_sections=3, num_layers=3, cross_attention_window=1,
                               output_combination="learned"),
    "p3_shared_window2_learned": dict(num_sections=3, num_layers=6, weight_sharing="shared",
                                      cross_attention_window=2, output_combination="learned"),
    "p3_raw_memory_learned": dict(num_sections=3, num_layers=3, memory_norm=False,
                                  output_combination="learned"),
    "p2_shared_raw_memory": dict(weight_sharing="shared", memory_norm=False),
    "gqa_rmsnorm_swiglu_nobias": dict(num_query_groups=2, normalization="RMSNorm",
                                      gated_linear_unit=True, activation="silu",
                                      linear_bias=False, qkv_bias=False, rotary_percent=0.5),
    "learned_positions_untied": dict(position_embedding_type="learned_absolute",
                                     tie_embeddings=False, cross_attention_rope=False),
}
GENERATE_VARIANTS = ["p1_gpt", "p2_separate", "p3_shared_window2_learned",
                     "learned_positions_untied", "p3_raw_memory_learned", "p2_shared_raw_memory"]
PADDING_VARIANTS = ["p2_shared", "p3_window1_learned", "p3_shared_window2_learned",
                    "p3_raw_memory_learned",
                    "gqa_rmsnorm_swiglu_nobias", "learned_positions_untied"]


def fresh_seed() -> int:
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed={seed}")  # pytest shows it when the test fails
    return seed


def random_reference(seed: int, **overrides) -> StagFormer:
    """A reference model in eval mode whose every parameter (null memory, alpha, norms) is
    random."""
    torch.manual_seed(seed)
    model = StagFormer(ReferenceConfig(**{**BASE, **overrides}))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
    return model.eval()


def write_folder(path: Path, model: StagFormer, dtype=torch.float32, **metadata) -> Path:
    return save_inference_folder(path, model.cfg, model.state_dict(), dtype=dtype,
                                 metadata=metadata)


def random_ids(seed: int, batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def load_remote(folder: Path, **kwargs):
    """AutoModelForCausalLM with the folder's own code; checks every weight was loaded."""
    model, info = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                       output_loading_info=True, **kwargs)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                    "error_msgs": []}, info
    assert type(model).__module__.startswith("transformers_modules."), type(model)
    return model


def reference_greedy(model: StagFormer, ids: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


def returned_cache(output):
    """The cache of a model output ("cache"; "past_key_values" in older transformers 5)."""
    return output["cache"] if "cache" in output else output["past_key_values"]


def input_lengths(model) -> list:
    """Records the length of input_ids at every forward of `model` (a list that grows)."""
    lengths = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]),
        with_kwargs=True)
    return lengths


def left_padded(prompts: list, pad: int = 0):
    """Prompts [1, s_i] -> (ids [n, max s_i], attention_mask): padding on the left."""
    width = max(p.shape[1] for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - prompt.shape[1]:] = prompt[0]
        mask[row, width - prompt.shape[1]:] = 1
    return ids, mask


# ---------------------------------------------------------------------------- the folder's code


def test_folder_ships_model_code_identical_to_the_package(tmp_path):
    """One source of truth: the folder's code files are byte copies of the plugin's modules,
    and config.json points transformers at them."""
    folder = write_folder(tmp_path / "folder", random_reference(0))
    for name, source in REMOTE_CODE_FILES.items():
        assert (folder / name).read_bytes() == source.read_bytes(), name
    assert set(REMOTE_CODE_FILES) == {"configuration_stagformer.py", "modeling_stagformer.py",
                                      "reference.py"}
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    for target in AUTO_MAP.values():
        module, cls = target.rsplit(".", 1)
        assert f"\nclass {cls}(" in (folder / f"{module}.py").read_text(), target


def test_saving_a_folder_needs_no_transformers(tmp_path):
    code = f"""
        import sys
        sys.modules["transformers"] = None  # any import of transformers now fails
        import torch
        from stag_plugin.convert.inference_folder import (load_inference_folder,
                                                          save_inference_folder)
        from stag_plugin.reference.model import ReferenceConfig, StagFormer
        model = StagFormer(ReferenceConfig(**{BASE!r}))
        save_inference_folder({str(tmp_path / 'f')!r}, model.cfg, model.state_dict())
        print(type(load_inference_folder({str(tmp_path / 'f')!r}).model).__name__)
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "StagFormer"


# ---------------------------------------------------------------------------- parity


@needs_transformers
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_and_loss_match_reference(tmp_path, variant):
    seed = fresh_seed()
    reference = random_reference(seed, **VARIANTS[variant])
    folder = write_folder(tmp_path / "folder", reference)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    assert config.model_type == "stagformer"
    assert vars(config.to_reference_config()) == vars(reference.cfg)  # another class: a copy
    model = load_remote(folder)
    state = model.state_dict()
    assert sorted(state) == sorted(reference.state_dict()), seed  # the safetensors keys
    if reference.cfg.tie_embeddings:
        assert "lm_head.weight" not in state and model.get_output_embeddings() is None
    else:
        assert model.get_output_embeddings() is model.lm_head
    assert model.get_input_embeddings() is model.tok_emb

    ids = random_ids(seed + 2, 2, random.Random(seed).randint(5, 16), BASE["vocab_size"])
    labels = ids.clone()
    labels[0, 1] = labels[1, -1] = -100  # ignored positions
    with torch.no_grad():
        expected = reference(ids)
        output = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    assert output.logits.dtype == torch.float32
    diff = (output.logits - expected).abs().max().item()
    assert diff < 1e-5, f"seed={seed}: logits differ by {diff}"
    manual = F.cross_entropy(expected[:, :-1].reshape(-1, expected.shape[-1]),
                             labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(output.loss.item() - manual.item()) < 1e-5, f"seed={seed}"
    loss, logits = model(ids, labels=labels, return_dict=False)
    assert torch.equal(logits, output.logits) and torch.equal(loss, output.loss)


@needs_transformers
@pytest.mark.parametrize("variant", GENERATE_VARIANTS)
def test_greedy_generate_matches_reference_loop(tmp_path, variant):
    seed = fresh_seed()
    reference = random_reference(seed, **VARIANTS[variant])
    model = load_remote(write_folder(tmp_path / "folder", reference))
    ids = random_ids(seed + 2, 2, random.Random(seed).randint(3, 10), BASE["vocab_size"])
    steps = BASE["max_sequence_length"] - ids.shape[1]  # up to the learned positions' limit
    output = model.generate(ids, do_sample=False, max_new_tokens=steps)
    expected = reference_greedy(reference, ids, steps)
    assert torch.equal(output, expected), f"seed={seed}\n{output}\n{expected}"


@needs_transformers
def test_seeded_sampling_matches_reference_sampling(tmp_path):
    """generate(do_sample=True) draws from softmax(logits) of the full forward: with one torch
    seed it reproduces a plain multinomial loop over the reference model."""
    seed = fresh_seed()
    reference = random_reference(seed, **VARIANTS["p3_window1_learned"])
    model = load_remote(write_folder(tmp_path / "folder", reference))
    ids = random_ids(seed + 2, 3, 4, BASE["vocab_size"])

    def sample_hf(sample_seed):
        torch.manual_seed(sample_seed)
        return model.generate(ids, do_sample=True, top_k=0, top_p=1.0, temperature=4.0,
                              max_new_tokens=12)

    torch.manual_seed(seed + 3)
    expected = ids
    with torch.no_grad():
        for _ in range(12):
            probs = (reference(expected)[:, -1] / 4.0).softmax(dim=-1)
            expected = torch.cat([expected, torch.multinomial(probs, 1)], dim=1)
    first = sample_hf(seed + 3)
    assert torch.equal(first, expected), f"seed={seed}\n{first}\n{expected}"
    assert torch.equal(sample_hf(seed + 3), first)  # reproducible
    assert not torch.equal(sample_hf(seed + 4), first)  # and random (12 x 3 draws of 61)


@needs_transformers
def test_bf16_folder_loads_as_bf16(tmp_path):
    seed = fresh_seed()
    reference = random_reference(seed, **VARIANTS["p2_shared"])
    folder = write_folder(tmp_path / "folder", reference, dtype=torch.bfloat16)
    model = load_remote(folder)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = random_ids(seed + 2, 2, 12, BASE["vocab_size"])
    with torch.no_grad():
        logits = model(ids).logits
        same_weights = load_inference_folder(folder).model(ids)  # the reference model, bf16
        exact = reference(ids)
    assert logits.dtype == torch.bfloat16
    assert torch.equal(logits, same_weights), f"seed={seed}"
    error = (logits.float() - exact).abs().max().item()
    assert error < 0.05 * exact.abs().max().item(), f"seed={seed}: bf16 error {error}"
    generated = model.generate(ids, do_sample=False, max_new_tokens=4)
    assert generated.shape == (2, 16)


# ---------------------------------------------------------------------------- KV cache, padding


@needs_transformers
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_forward_matches_reference(tmp_path, variant):
    """A prompt, then chunks of 1 or more tokens, each through the cache the previous call
    returned: the logits equal the reference's full forward; the cache holds the self K/V of
    every section and layer and the memory (null + one entry a token) of sections 2..p."""
    seed = fresh_seed()
    reference = random_reference(seed, **VARIANTS[variant])
    model = load_remote(write_folder(tmp_path / "folder", reference))
    rng = random.Random(seed)
    ids = random_ids(seed + 2, 2, BASE["max_sequence_length"], BASE["vocab_size"])
    cuts = [rng.randint(1, 8)]  # the prompt, then one token (a decode step), then chunks
    cuts.append(cuts[0] + 1)
    while cuts[-1] < ids.shape[1]:
        cuts.append(min(ids.shape[1], cuts[-1] + rng.choice([1, 2, 3, 5])))
    with torch.no_grad():
        expected = reference(ids)
        output = model(ids[:, :cuts[0]], use_cache=True)
        cache, logits = returned_cache(output), [output.logits]
        for start, stop in zip(cuts, cuts[1:]):
            output = model(ids[:, start:stop], cache=cache)
            assert returned_cache(output) is cache
            logits.append(output.logits)
    diff = (torch.cat(logits, dim=1) - expected).abs().max().item()
    assert diff < 1e-4, f"seed={seed} cuts={cuts}: logits differ by {diff}"
    cfg = reference.cfg
    p, per_section = cfg.num_sections, cfg.layers_per_section
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    assert lengths == [ids.shape[1]] * (p * per_section) \
        + [ids.shape[1] + 1] * ((p - 1) * per_section), lengths
    assert cache.layers[0].keys.shape == (2, cfg.num_query_groups, ids.shape[1], cfg.head_dim)


@needs_transformers
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_generate_matches_reference_decoder(tmp_path, variant):
    """generate(use_cache=True): a prefill, then one token a forward; its greedy tokens equal
    stag_plugin's ReferenceDecoder and a greedy loop over the reference forward."""
    seed = fresh_seed()
    reference = random_reference(seed, **VARIANTS[variant]).double()
    model = load_remote(write_folder(tmp_path / "folder", reference), dtype=torch.float64)
    ids = random_ids(seed + 2, 2, random.Random(seed).randint(3, 10), BASE["vocab_size"])
    steps = BASE["max_sequence_length"] - ids.shape[1]
    lengths = input_lengths(model)
    output = model.generate(ids, do_sample=False, max_new_tokens=steps, use_cache=True)
    assert lengths == [ids.shape[1]] + [1] * (steps - 1), lengths
    decoder = ReferenceDecoder(reference, 2, BASE["max_sequence_length"])
    assert output[:, ids.shape[1]:].tolist() == decoder.generate(ids, steps), f"seed={seed}"
    expected = reference_greedy(reference, ids, steps)
    assert torch.equal(output, expected), f"seed={seed}\n{output}\n{expected}"


@needs_transformers
@pytest.mark.parametrize("variant", PADDING_VARIANTS)
def test_left_padded_batch_matches_each_prompt_alone(tmp_path, variant):
    """Prompts of different lengths, left-padded into one batch: each row's logits, and its
    greedy tokens with and without the cache, are those of its prompt alone, unpadded."""
    seed = fresh_seed()
    reference = random_reference(seed, **VARIANTS[variant]).double()
    model = load_remote(write_folder(tmp_path / "folder", reference), dtype=torch.float64)
    rng = random.Random(seed)
    prompts = [random_ids(seed + row, 1, rng.randint(1, 10), BASE["vocab_size"])
               for row in range(3)]
    ids, mask = left_padded(prompts, pad=rng.randrange(BASE["vocab_size"]))
    steps = BASE["max_sequence_length"] - ids.shape[1]
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    cached = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=steps,
                            use_cache=True)
    recomputed = model.generate(ids, attention_mask=mask, do_sample=False,
                                max_new_tokens=steps, use_cache=False)
    for row, prompt in enumerate(prompts):
        length = prompt.shape[1]
        with torch.no_grad():
            diff = (logits[row, -length:] - reference(prompt)[0]).abs().max().item()
        assert diff < 1e-10, f"seed={seed} row {row}: logits differ by {diff}"
        alone = reference_greedy(reference, prompt, steps)[0, length:]
        assert torch.equal(cached[row, ids.shape[1]:], alone), f"seed={seed} row {row}"
        assert torch.equal(recomputed[row, ids.shape[1]:], alone), f"seed={seed} row {row}"


@needs_transformers
def test_right_padded_batch_logits_and_loss(tmp_path):
    """Right padding (labels -100 there): each row's logits are its sequence's alone, and the
    loss is the mean cross-entropy over the rows' tokens."""
    seed = fresh_seed()
    reference = random_reference(seed, **VARIANTS["p3_window1_learned"])
    model = load_remote(write_folder(tmp_path / "folder", reference))
    rng = random.Random(seed)
    rows = [random_ids(seed + row, 1, rng.randint(2, 12), BASE["vocab_size"])[0]
            for row in range(3)]
    width = max(len(row) for row in rows)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        output = model(ids, attention_mask=mask, labels=labels)
        alone = [reference(row[None])[0] for row in rows]
    for i, row in enumerate(rows):
        diff = (output.logits[i, :len(row)] - alone[i]).abs().max().item()
        assert diff < 1e-4, f"seed={seed} row {i}: logits differ by {diff}"
    manual = F.cross_entropy(torch.cat([logits[:-1] for logits in alone]),
                             torch.cat([row[1:] for row in rows]))
    assert abs(output.loss.item() - manual.item()) < 1e-4, f"seed={seed}"


@needs_transformers
def test_beam_search_and_sampling_with_the_cache(tmp_path):
    """Beam search reorders the cache between steps; seeded sampling draws the same tokens with
    the cache as without (fp64)."""
    seed = fresh_seed()
    reference = random_reference(seed, **VARIANTS["p3_shared_window2_learned"]).double()
    model = load_remote(write_folder(tmp_path / "folder", reference), dtype=torch.float64)
    ids = random_ids(seed + 2, 2, 5, BASE["vocab_size"])
    beams = {use_cache: model.generate(ids, do_sample=False, num_beams=3, max_new_tokens=10,
                                       use_cache=use_cache) for use_cache in (True, False)}
    assert torch.equal(beams[True], beams[False]), f"seed={seed}\n{beams}"
    samples = {}
    for use_cache in (True, False):
        torch.manual_seed(seed + 3)
        samples[use_cache] = model.generate(ids, do_sample=True, top_k=0, temperature=3.0,
                                            max_new_tokens=10, use_cache=use_cache)
    assert torch.equal(samples[True], samples[False]), f"seed={seed}\n{samples}"


@needs_transformers
def test_use_cache_default_follows_the_config(tmp_path):
    """A converted folder says "use_cache": true; "use_cache": false recomputes the sequence at
    each step unless generate is passed use_cache=True; without the entry, generate uses the
    cache."""
    seed = fresh_seed()
    folder = write_folder(tmp_path / "folder", random_reference(seed))
    ids = random_ids(seed + 2, 1, 4, BASE["vocab_size"])
    path = folder / "config.json"
    assert json.loads(path.read_text())["use_cache"] is True  # what a conversion writes
    for written, default_lengths in ((False, [4, 5, 6]), (None, [4, 1, 1]), (True, [4, 1, 1])):
        config = json.loads(path.read_text())
        config.pop("use_cache", None)
        if written is not None:
            config["use_cache"] = written
        path.write_text(json.dumps(config))
        model = load_remote(folder)
        lengths = input_lengths(model)
        default = model.generate(ids, do_sample=False, max_new_tokens=3)
        assert lengths == default_lengths, (written, lengths)
        lengths.clear()
        cached = model.generate(ids, do_sample=False, max_new_tokens=3, use_cache=True)
        assert lengths == [4, 1, 1] and torch.equal(cached, default), (written, lengths)


# ---------------------------------------------------------------------------- what is refused


@needs_transformers
def test_unsupported_inputs_are_refused(tmp_path):
    reference = random_reference(fresh_seed())
    model = load_remote(write_folder(tmp_path / "folder", reference))
    ids = random_ids(0, 2, 6, BASE["vocab_size"])
    with pytest.raises(ValueError, match="inputs_embeds is not supported"):
        model(inputs_embeds=torch.zeros(2, 6, BASE["hidden_size"]))
    with pytest.raises(ValueError, match="other position_ids are not supported"):
        model(ids, position_ids=torch.arange(1, 7)[None])
    model(ids, position_ids=torch.arange(6)[None])  # the positions the mask gives are fine
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(ids, output_attentions=True)
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
    cache = returned_cache(model(ids[:, :4], use_cache=True))
    with pytest.raises(ValueError, match=r"attention_mask must be .* = \[2, 6\]"):
        model(ids[:, 4:], cache=cache, attention_mask=torch.ones(2, 2, dtype=torch.long))
    p, per_section = reference.cfg.num_sections, reference.cfg.layers_per_section
    for wrong in (DynamicCache(config=model.config),  # p * L layers, no room for the memory
                  StaticCache(config=model.config, max_cache_len=8)):
        with pytest.raises(ValueError, match=f"DynamicCache of {(2 * p - 1) * per_section} "):
            model.generate(ids, cache=wrong, max_new_tokens=2)


@needs_transformers
def test_learned_positions_refuse_longer_sequences(tmp_path):
    reference = random_reference(fresh_seed(), **VARIANTS["learned_positions_untied"])
    model = load_remote(write_folder(tmp_path / "folder", reference))
    ids = random_ids(0, 1, 20, BASE["vocab_size"])
    with pytest.raises(ValueError, match="exceed the learned position embeddings"):
        model.generate(ids, do_sample=False, max_new_tokens=10)


# ---------------------------------------------------------------------------- other ways in


@needs_transformers
def test_fresh_model_matches_reference_init_and_names():
    from stag_plugin.convert.hf import StagFormerConfig, StagFormerForCausalLM

    cfg = ReferenceConfig(**{**BASE, **VARIANTS["p3_window1_learned"]})
    model = StagFormerForCausalLM(StagFormerConfig(**vars(cfg)))
    reference = StagFormer(cfg)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}
    assert torch.equal(model.null_memory, reference.null_memory)  # zeros
    assert torch.equal(model.alpha, reference.alpha)  # (0, 0, 1)
    assert isinstance(model, StagFormer) and model.cfg == cfg


@needs_transformers
def test_save_pretrained_round_trip(tmp_path):
    """A folder written by transformers' save_pretrained loads again both ways."""
    seed = fresh_seed()
    reference = random_reference(seed, **VARIANTS["learned_positions_untied"])
    model = load_remote(write_folder(tmp_path / "folder", reference))
    model.save_pretrained(tmp_path / "saved")
    ids = random_ids(seed + 2, 2, 9, BASE["vocab_size"])
    with torch.no_grad():
        expected = reference(ids)
        again = load_remote(tmp_path / "saved")(ids).logits
        plain = load_inference_folder(tmp_path / "saved").model(ids)
    assert torch.equal(again, expected) and torch.equal(plain, expected), f"seed={seed}"


def run_python(code: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(cwd / "hf_modules")
    env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=240)


BLOCK_STAG_PLUGIN = """
    import importlib.abc, sys

    class BlockStagPlugin(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "stag_plugin":
                raise ImportError(f"stag_plugin is blocked in this test ({name})")

    sys.meta_path.insert(0, BlockStagPlugin())
    try:
        import stag_plugin
    except ImportError:
        pass
    else:
        raise SystemExit("could not block stag_plugin")
"""

CHECK_EXPECTED = """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    folder, expected = sys.argv[1], torch.load(sys.argv[2])
    config = AutoConfig.from_pretrained(folder, **LOAD)
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **LOAD)
    assert not any(info.values()), info
    with torch.no_grad():
        diff = (model(expected["ids"]).logits - expected["logits"]).abs().max().item()
    assert diff < 1e-5, diff
    for use_cache in (False, True):
        greedy = model.generate(expected["ids"], do_sample=False, max_new_tokens=6,
                                use_cache=use_cache)
        assert torch.equal(greedy, expected["greedy"]), (use_cache, greedy, expected["greedy"])
    print("loaded", type(config).__module__, type(model).__module__)
    print("stag_plugin modules:", sorted(m for m in sys.modules if m.startswith("stag_plugin")))
"""


def expected_outputs(tmp_path: Path, reference: StagFormer, seed: int) -> Path:
    ids = random_ids(seed + 2, 2, 7, BASE["vocab_size"])
    with torch.no_grad():
        expected = {"ids": ids, "logits": reference(ids),
                    "greedy": reference_greedy(reference, ids, 6)}
    torch.save(expected, tmp_path / "expected.pt")
    return tmp_path / "expected.pt"


@needs_transformers
def test_loads_where_stag_plugin_is_not_installed(tmp_path):
    """trust_remote_code: the folder's own code suffices; importing stag_plugin is blocked."""
    seed = fresh_seed()
    reference = random_reference(seed, **VARIANTS["p3_shared_window2_learned"])
    folder = write_folder(tmp_path / "folder", reference)
    expected = expected_outputs(tmp_path, reference, seed)
    code = BLOCK_STAG_PLUGIN + "    LOAD = dict(trust_remote_code=True)\n" + CHECK_EXPECTED
    result = run_python(code, tmp_path, str(folder), str(expected))
    assert result.returncode == 0, f"seed={seed}\n{result.stdout}\n{result.stderr}"
    assert "loaded transformers_modules.folder." in result.stdout, result.stdout
    assert "stag_plugin modules: []" in result.stdout, result.stdout


@needs_transformers
def test_register_loads_without_trust_remote_code(tmp_path):
    """stag_plugin.convert.hf.register(): the plugin's classes, no remote code (own process, so the
    registration does not leak into the other tests)."""
    seed = fresh_seed()
    reference = random_reference(seed, **VARIANTS["gqa_rmsnorm_swiglu_nobias"])
    folder = write_folder(tmp_path / "folder", reference)
    expected = expected_outputs(tmp_path, reference, seed)
    code = """
    import sys
    import stag_plugin.convert.hf
    stag_plugin.convert.hf.register()
    LOAD = {}
""" + CHECK_EXPECTED
    result = run_python(code, tmp_path, str(folder), str(expected))
    assert result.returncode == 0, f"seed={seed}\n{result.stdout}\n{result.stderr}"
    assert ("loaded stag_plugin.convert.hf.configuration_stagformer "
            "stag_plugin.convert.hf.modeling_stagformer") in result.stdout, result.stdout
