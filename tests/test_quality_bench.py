"""bench/quality.py's bookkeeping, without training: held-out windows and shares, the summary's
mean and spread, and a resumed run refusing other settings."""

import importlib.util
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class WordTokenizer:
    """One id per whitespace-separated word (ids from a growing table); eod = 0."""
    eod = 0

    def __init__(self):
        self.ids = {}

    def tokenize(self, text):
        return [self.ids.setdefault(word, len(self.ids) + 1) for word in text.split()]


def test_windows_are_consecutive_next_token_pairs(quality):
    ids = list(range(100, 131))  # 31 ids: 3 windows of 8 (+1 label each), the rest dropped
    samples = quality.windows(ids, 8)
    assert len(samples) == 3
    for n, sample in enumerate(samples):
        assert sample["tokens"].tolist() == ids[8 * n:8 * n + 8]
        assert sample["labels"].tolist() == ids[8 * n + 1:8 * n + 9]
        assert sample["position_ids"].tolist() == list(range(8))
        assert sample["loss_mask"].sum() == 8


def test_heldout_takes_an_even_share_from_each_root(quality, tmp_path):
    for name, words in (("a", 50), ("b", 400)):
        (tmp_path / name).mkdir()
        for k in range(3):
            (tmp_path / name / f"f{k}.py").write_text(" ".join(f"{name}{k}_{i}" for i in
                                                                range(words)))
    options = SimpleNamespace(heldout=[tmp_path / "a", tmp_path / "b"],
                              shape={"heldout_tokens": 200})
    tokenizer = WordTokenizer()
    ids = quality.heldout_ids(tokenizer, options)
    words = {v: k for k, v in tokenizer.ids.items()}
    first, second = ids[:100], ids[100:]
    assert len(ids) == 200
    assert all(i == 0 or words[i].startswith("a") for i in first)  # 3 files of 50 (+eod)
    assert all(i == 0 or words[i].startswith("b") for i in second)
    assert first.count(0) == 1 and second.count(0) == 0  # documents end with eod


def unit(variant, seed, valid, test, heldout, curve):
    return {"variant": variant, "seed": seed, "parameters": 10, "tokens_per_second": 5.0,
            "train_seconds": 2.0, "curve": curve,
            "ppl": {"valid": valid, "test": test, "heldout": heldout}}


def test_summary_means_and_spreads_over_seeds(quality, tmp_path):
    options = SimpleNamespace(variants=["gpt-L", "stag-sep"], heldout=[tmp_path],
                              shape=dict(quality.PRESETS["smoke"]))
    (tmp_path / "x.py").write_text("x")
    units = [unit("gpt-L", 1, 10.0, 11.0, 20.0, [(5, 3.0), (10, 2.0)]),
             unit("gpt-L", 2, 12.0, 13.0, 22.0, [(5, 3.5), (10, 2.5)]),
             unit("stag-sep", 1, 9.0, 9.5, 19.0, [(5, 3.1)]),
             unit("stag-sep", 2, 9.5, 10.5, 21.0, [(5, 3.3)])]
    summary = quality.summarise(options, units)
    gpt, stag = summary["variants"]
    assert gpt["valid"]["ppl_mean"] == pytest.approx(11.0)
    assert (gpt["valid"]["ppl_min"], gpt["valid"]["ppl_max"]) == (10.0, 12.0)
    assert stag["heldout"]["ppl_mean"] == pytest.approx(20.0)
    assert gpt["curve"] == [(5, pytest.approx(3.25)), (10, pytest.approx(2.25))]
    assert "gpt-L" in quality.format_table(summary) and "9.25 [9.00-9.50]" in \
        quality.format_table(summary)
    json.dumps(summary)  # the JSON report holds only plain values
    assert math.isclose(summary["tokens_per_model"],
                        options.shape["train_iters"] * options.shape["micro_batch_size"] *
                        options.shape["seq_length"])


def test_a_resumed_run_refuses_other_settings(quality, tmp_path):
    (tmp_path / "text.py").write_text("x = 1")
    out = tmp_path / "run"
    first = quality.parse_args(["--out", str(out), "--preset", "smoke", "--heldout",
                                str(tmp_path / "text.py")])
    out.mkdir()
    quality.check_settings(first)
    quality.check_settings(first)  # the same settings resume
    other = quality.parse_args(["--out", str(out), "--preset", "smoke", "--heldout",
                                str(tmp_path / "text.py"), "--lr", "0.01"])
    with pytest.raises(SystemExit, match="holds a run with other settings"):
        quality.check_settings(other)


def test_odd_depth_is_refused(quality):
    with pytest.raises(SystemExit):
        quality.parse_args(["--layers", "3"])


def test_markdown_gaps_are_mean_loss_differences(quality, tmp_path):
    options = SimpleNamespace(variants=["gpt-L", "gpt-L/2", "stag-sep"], heldout=[tmp_path],
                              shape=dict(quality.PRESETS["smoke"]))
    (tmp_path / "x.py").write_text("x")
    e = math.exp
    units = [unit("gpt-L", 1, e(3.0), e(3.0), e(4.0), []),
             unit("gpt-L", 2, e(3.2), e(3.0), e(4.0), []),
             unit("gpt-L/2", 1, e(3.5), e(3.1), e(4.2), []),
             unit("gpt-L/2", 2, e(3.5), e(3.1), e(4.2), []),
             unit("stag-sep", 1, e(3.2), e(3.0), e(4.1), []),
             unit("stag-sep", 2, e(3.2), e(3.0), e(4.1), [])]
    table = quality.format_markdown(quality.summarise(options, units))
    stag = next(line for line in table.splitlines() if line.startswith("| stag-sep "))
    assert "| -0.3000 / -0.1000 / -0.1000 | +0.1000 / +0.0000 / +0.1000 |" in stag


def test_the_fixed_null_ablation_acts_only_while_building(quality):
    """The experiment-only change acts on a StagGPTModel built inside `ablated`, and a model
    built afterwards is the plugin's own again."""
    from stag_plugin import StagGPTModel

    from stag_testing import VOCAB, tiny_config

    def build():
        return StagGPTModel(tiny_config(), vocab_size=VOCAB, max_sequence_length=32)

    with quality.ablated("stag-sep-fixednull"):
        frozen = build()
    assert not frozen.null_memory.requires_grad
    assert build().null_memory.requires_grad


# variant -> (weight sharing, memory_norm, cross_attention_zero_init, window, combination)
EXPECTED_OPTIONS = {
    "stag-sep": ("separate", True, False, None, "last"),
    "stag-shared": ("shared", True, False, None, "last"),
    "stag-sep-window": ("separate", True, False, 4, "last"),
    "stag-sep-learned": ("separate", True, False, None, "learned"),
    "stag-sep-fixednull": ("separate", True, False, None, "last"),
    "stag-sep-rawmemory": ("separate", False, False, None, "last"),
    "stag-sep-zerocross": ("separate", True, True, None, "last"),
    "stag-shared-rawmemory": ("shared", False, False, None, "last"),
    "stag-sep-rawzero": ("separate", False, True, None, "last"),
    "stag-shared-rawzero": ("shared", False, True, None, "last"),
    "stag-sep-rawmemory-window": ("separate", False, False, 4, "last"),
}


@pytest.mark.parametrize("variant", sorted(EXPECTED_OPTIONS))
def test_each_variant_sets_its_options_explicitly(quality, variant, tmp_path, monkeypatch):
    """A variant's flags fix every ablated option, whatever the plugin's defaults are."""
    from stag_plugin.training import arguments, train

    options = quality.parse_args(["--out", str(tmp_path), "--preset", "smoke"])
    for _, _, kwargs in arguments.STAG_FLAGS:  # other defaults must not leak in
        if isinstance(kwargs.get("default"), bool):
            monkeypatch.setitem(kwargs, "default", not kwargs["default"])
    argv = quality.train_flags(options, variant, 1234)
    args = arguments.finalize_args(arguments.parse_with_preset(train.build_parser(), argv))
    config = arguments.config_from_args(args)
    got = (config.weight_sharing, config.memory_norm, config.cross_attention_zero_init,
           config.cross_attention_window, config.output_combination)
    assert got == EXPECTED_OPTIONS[variant]
