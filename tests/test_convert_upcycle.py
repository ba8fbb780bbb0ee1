"""`stag convert from-gpt`: upcycling a plain GPT into a StagFormer.

Two sources: the plugin's own p = 1 checkpoint (`stag train --stag-num-sections 1`, 2 steps)
and a real Megatron-Core GPTModel (Megatron's own local layer spec, every weight perturbed)
saved the way Megatron-LM saves it (stacked layer keys, the args in the common state). The
expectation for `duplicate` comes from the source itself: its logits, computed by its own
model class (GPTModel for the Megatron-LM source), must be reproduced bitwise (the zeroed
cross-attention adds exact zeros).
"""

import json
from pathlib import Path

import pytest
import torch
from test_gpt_parity import megatron_gpt

from stag_plugin import cli, generate
from stag_plugin.compat.megatron import initialize_single_process
from stag_plugin.convert import from_gpt, gpt_source
from stag_plugin.training import checkpointing, evaluate
from stag_plugin.training.data import StagTokenizer, tokenizers

from convert_testing import (
    SEQ,
    VOCAB,
    assert_convert_error,
    convert_interrupted,
    convert_ok,
    megatron_lm_args,
    plain_tensors,
    prepare_flags,
    random_batch,
    save_megatron_lm,
    tokenizer_of,
)
from stag_testing import fresh_seed, perturb_parameters, snapshot, tiny_config

STAG_LAYERS, MEGATRON_LAYERS = 2, 4
VARIANTS = [("separate", 2), ("shared", 2), ("separate", 3), ("shared", 3)]


@pytest.fixture(scope="module")
def flags(tmp_path_factory) -> list:
    return prepare_flags(tmp_path_factory)


@pytest.fixture(scope="module")
def batch():
    return random_batch(fresh_seed())


@pytest.fixture(scope="module")
def stag_source(tmp_path_factory, flags, batch) -> dict:
    """A 2-layer plain GPT trained by stag train (p = 1) for 2 steps, and its logits."""
    save = tmp_path_factory.mktemp("stag-gpt") / "run"
    argv = flags + ["--num-layers", STAG_LAYERS, "--stag-num-sections", 1, "--train-iters", 2,
                    "--save", save]
    assert cli.main(["train", *map(str, argv)]) == 0
    tokenizer = tokenizers.saved_spec(checkpointing.iteration_dir(save, 2))
    return {"load": save, "extra": [], "logits": logits_of(save, batch), "layers": STAG_LAYERS,
            "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def megatron_source(tmp_path_factory, flags, batch) -> dict:
    """A 4-layer Megatron GPTModel (untied head), random weights, in Megatron-LM's layout."""
    initialize_single_process()
    config = tiny_config(num_sections=1, num_layers=MEGATRON_LAYERS, hidden_size=32)
    torch.manual_seed(0)
    gpt = megatron_gpt(config, tie=False, vocab=VOCAB, max_len=SEQ)
    perturb_parameters(gpt, 0.05, seed=3)
    root = save_megatron_lm(gpt, tmp_path_factory.mktemp("megatron-gpt") / "run", 7,
                            megatron_lm_args(config, tie=False))
    tokens, positions = batch
    with torch.no_grad():
        logits = gpt(tokens, positions, None)
    # --tokenizer-model without --tokenizer-type: the plugin's own SentencePiece layout
    tokenizer = tokenizers.spec_of(StagTokenizer(tokenizer_of(flags)))
    return {"load": root, "extra": ["--tokenizer-model", tokenizer_of(flags)],
            "logits": logits, "layers": MEGATRON_LAYERS, "gpt": gpt, "tokenizer": tokenizer}


@pytest.fixture(params=["stag_source", "megatron_source"], ids=["stag-p1", "megatron-lm"])
def gpt(request):
    return request.getfixturevalue(request.param)


def logits_of(root: Path, batch) -> torch.Tensor:
    """Logits of a trainer checkpoint, loaded by the trainer's loader (TP1 x PP1)."""
    tokens, positions = batch
    model = generate.load_model(root).model  # built outside no_grad (Megatron's DDP needs it)
    with torch.no_grad():
        return model(tokens, positions)


def upcycle(gpt: dict, out: Path, recipe: str, sections: int, sharing="separate", *extra):
    convert_ok("from-gpt", "--load", gpt["load"], "--out", out, "--recipe", recipe,
               "--stag-num-sections", sections, "--stag-weight-sharing", sharing,
               "--no-progress", *gpt["extra"], *extra)
    return out


# --------------------------------------------------------------------------- duplicate


@pytest.mark.parametrize("sharing,sections", VARIANTS, ids=lambda v: str(v))
def test_duplicate_reproduces_the_gpt(tmp_path, gpt, batch, sharing, sections):
    out = upcycle(gpt, tmp_path / "stag", "duplicate", sections, sharing)
    _, record = checkpointing.read_run(out)
    assert record["iteration"] == 0
    assert record["architecture"]["stag_num_sections"] == sections
    assert record["architecture"]["num_layers"] == sections * gpt["layers"]
    assert record["architecture"]["stag_weight_sharing"] == sharing
    # the GPT's tokenizer (files by sha256, ids) goes with it, as the record says
    saved = tokenizers.saved_spec(checkpointing.iteration_dir(out, 0))
    assert saved == gpt["tokenizer"] and saved.to_json() == record["tokenizer"]
    # Bitwise: every section runs the GPT's layers with the same Megatron kernels, and each
    # zeroed cross-attention adds exact zeros (also against GPTModel, a separate class).
    logits = logits_of(out, batch)
    diff = (logits - gpt["logits"]).abs().max().item()
    assert torch.equal(logits, gpt["logits"]), f"max abs difference {diff}"
    tensors = plain_tensors(out)
    cross = [k for k in tensors if ".cross_attention." in k]
    assert cross and all(tensors[k].abs().max() == 0 for k in cross if ".linear_proj." in k)
    assert all(tensors[k].abs().max() > 0 for k in cross if ".linear_q.weight" in k)


def test_learned_combination_and_window_keep_the_gpt(tmp_path, stag_source, batch):
    out = upcycle(stag_source, tmp_path / "stag", "duplicate", 3, "separate",
                  "--stag-output-combination", "learned", "--stag-cross-attention-window", 2)
    assert torch.equal(logits_of(out, batch), stag_source["logits"])


def test_duplicate_is_the_gpt_for_stag_eval_and_fine_tunes(tmp_path, flags, stag_source):
    """The upcycled run evaluates to the GPT's validation loss, and `stag train --finetune`
    (with the architecture preset written next to it) trains it."""
    out = upcycle(stag_source, tmp_path / "stag", "duplicate", 2)
    losses = [evaluate.evaluate_checkpoint(evaluate.build_parser().parse_args(
        ["--load", str(root), "--eval-iters", "2"]))["loss"] for root in (stag_source["load"], out)]
    assert losses[0] == losses[1]
    tuned = tmp_path / "tuned"
    argv = flags + ["--config", out / "architecture.yaml", "--load", out, "--finetune",
                    "--train-iters", 2, "--save", tuned]
    assert cli.main(["train", *map(str, argv)]) == 0
    records = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "lr" in r] == [1, 2]
    assert checkpointing.read_run(tuned)[1]["architecture"] == checkpointing.read_run(out)[1][
        "architecture"]


@pytest.mark.parametrize("sharing", ["separate", "shared"])
def test_duplicate_rules_whatever_the_fresh_init(sharing):
    """The recipe alone, with a fresh init that is random everywhere (Megatron's happens to zero
    biases and the null memory): the cross-attention output projection, weight AND bias, and
    the null memory are zeroed by the recipe; the rest of the cross-attention keeps the init;
    every other tensor is the GPT's layer of the same index, or its final norm."""
    from stag_plugin.convert import recipes
    from stag_plugin.reference.model import ReferenceConfig, StagFormer

    def random_state(sections):
        cfg = ReferenceConfig(vocab_size=16, max_sequence_length=8, num_layers=2 * sections,
                              hidden_size=8, num_attention_heads=2, num_query_groups=2,
                              ffn_hidden_size=16, head_dim=4, num_sections=sections,
                              weight_sharing=sharing)
        return {k: torch.randn(v.shape) for k, v in StagFormer(cfg).state_dict().items()}

    gpt, init = random_state(1), random_state(3)
    out = recipes.upcycle("duplicate", gpt, init, layers_per_section=2)
    assert out.keys() == init.keys()
    for key, value in out.items():
        if ".cross_attn.o." in key or key == "null_memory":
            assert torch.equal(value, torch.zeros_like(value)), key
        elif ".cross_attn." in key or ".ln_cross." in key:
            assert torch.equal(value, init[key]), key
        else:
            source = key if key.startswith("tok_emb") else "stacks.0." + key.split(".", 2)[2]
            assert torch.equal(value, gpt[source]), (key, source)


# --------------------------------------------------------------------------- split


def test_split_takes_consecutive_blocks(tmp_path, megatron_source):
    """4 GPT layers into 2 sections: section k layer i = GPT layer 2k + i; every final norm is
    the GPT's; embeddings and head copied; cross-attention freshly initialised (not zero)."""
    out = upcycle(megatron_source, tmp_path / "stag", "split", 2)
    gpt = {k: v.detach() for k, v in megatron_source["gpt"].state_dict().items()
           if not k.endswith("_extra_state")}
    got = plain_tensors(out)
    model = {k: v for k, v in got.items() if not k.startswith("optimizer.")}
    checked = set()
    for key, value in model.items():
        if key.startswith("sections.") and ".cross_attention." not in key \
                and "pre_cross_attn" not in key:
            parts = key.split(".")
            if parts[2] == "layers":
                k, i = int(parts[1]), int(parts[3])
                source = f"decoder.layers.{2 * k + i}.{'.'.join(parts[4:])}"
            else:
                source = f"decoder.{'.'.join(parts[2:])}"
            assert torch.equal(value, gpt[source]), (key, source)
            checked.add(key)
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        assert torch.equal(model[key], gpt[key])
    # 2 sections x 2 layers x 12 tensors, and the final norm (weight, bias) of the last section,
    # the only one that has a final norm
    assert len(checked) == 2 * 2 * 12 + 2
    assert "sections.1.final_layernorm.weight" in checked
    assert model["sections.1.layers.0.cross_attention.linear_proj.weight"].abs().max() > 0
    assert model["null_memory"].abs().max() == 0


# --------------------------------------------------------------------------- sources


def test_megatron_lm_layer_keys_stacked_per_layer_and_te_named():
    f32 = torch.float32
    index = {"decoder.layers.self_attention.linear_qkv.layer_norm_weight": ((3, 8), f32),
             "decoder.layers.1.mlp.linear_fc1.layer_norm_bias": ((8,), f32),
             "decoder.layers.2.mlp.linear_fc2.weight": ((8, 32), f32),
             "decoder.final_layernorm.weight": ((8,), f32), "mystery": ((1,), f32)}
    entries = gpt_source.stag_entries(index, 3, Path("ckpt"))
    assert entries == {
        **{f"sections.0.layers.{i}.input_layernorm.weight": (
            "decoder.layers.self_attention.linear_qkv.layer_norm_weight", i, (8,), f32)
           for i in range(3)},
        "sections.0.layers.1.pre_mlp_layernorm.bias": (
            "decoder.layers.1.mlp.linear_fc1.layer_norm_bias", None, (8,), f32),
        "sections.0.layers.2.mlp.linear_fc2.weight": (
            "decoder.layers.2.mlp.linear_fc2.weight", None, (8, 32), f32),
        "sections.0.final_layernorm.weight": ("decoder.final_layernorm.weight", None, (8,), f32),
        "mystery": ("mystery", None, (1,), f32)}


# --------------------------------------------------------------------------- errors


def test_split_needs_layers_divisible_by_sections(capsys, tmp_path, stag_source):
    out = tmp_path / "out"
    assert_convert_error(capsys, ["from-gpt", "--load", stag_source["load"], "--out", out,
                                  "--recipe", "split", "--stag-num-sections", 3],
                         "2 layers to divide into 3 sections", out=out)
    assert_convert_error(capsys, ["from-gpt", "--load", stag_source["load"], "--out", out,
                                  "--recipe", "split", "--stag-num-sections", 2,
                                  "--stag-weight-sharing", "shared"], "shared weights", out=out)


def test_source_must_be_a_plain_gpt(capsys, tmp_path, stag_source):
    stag = upcycle(stag_source, tmp_path / "stag", "duplicate", 2)
    out = tmp_path / "out"
    assert_convert_error(capsys, ["from-gpt", "--load", stag, "--out", out, "--recipe",
                                  "duplicate", "--stag-num-sections", 2],
                         "StagFormer with 2 sections, not a plain GPT", out=out)
    assert_convert_error(capsys, ["from-gpt", "--load", stag_source["load"], "--out", out,
                                  "--recipe", "duplicate", "--stag-num-sections", 1],
                         "at least 2 sections", out=out)


def test_megatron_lm_source_errors(capsys, tmp_path, flags, megatron_source):
    out, load = tmp_path / "out", megatron_source["load"]
    base = ["from-gpt", "--load", load, "--out", out, "--recipe", "duplicate",
            "--stag-num-sections", 2]
    assert_convert_error(capsys, base, "args name no tokenizer", "--tokenizer-type",
                         "--tokenizer-model", out=out)
    assert_convert_error(capsys, [*base, "--tokenizer-model", load], "--tokenizer-model",
                         "is not a file", out=out)
    # args that disagree with the tensors (the common state of another model)
    config = tiny_config(num_sections=1, num_layers=MEGATRON_LAYERS, hidden_size=32)
    wrong = save_megatron_lm(megatron_source["gpt"], tmp_path / "wrong", 1,
                             megatron_lm_args(config, tie=False, num_layers=3))
    assert_convert_error(capsys, ["from-gpt", "--load", wrong, "--out", out, "--recipe",
                                  "duplicate", "--stag-num-sections", 2,
                                  "--tokenizer-model", tokenizer_of(flags)],
                         "stacks 4 layers", "num_layers=3", out=out)
    for stored, flag in (("layernorm_zero_centered_gamma", "--apply-layernorm-1p"),
                         ("qk_layernorm", "--qk-layernorm"), ("num_experts", "--num-experts")):
        other = save_megatron_lm(megatron_source["gpt"], tmp_path / stored, 1,
                                 megatron_lm_args(config, tie=False, **{stored: 8}))
        assert_convert_error(capsys, ["from-gpt", "--load", other, "--out", out, "--recipe",
                                      "duplicate", "--stag-num-sections", 2,
                                      "--tokenizer-model", tokenizer_of(flags)],
                             f"{flag}=8", "does not implement", out=out)


def test_megatron_lm_norm_epsilon_is_read_under_its_stored_name(tmp_path, flags, batch):
    """Megatron-LM stores --norm-epsilon as `layernorm_epsilon`: a GPT trained with 1e-2
    upcycles into a StagFormer with 1e-2 (its logits are the GPT's)."""
    initialize_single_process()
    config = tiny_config(num_sections=1, num_layers=2, hidden_size=32, layernorm_epsilon=1e-2)
    torch.manual_seed(1)
    gpt = megatron_gpt(config, tie=True, vocab=VOCAB, max_len=SEQ)
    perturb_parameters(gpt, 0.05, seed=5)
    root = save_megatron_lm(gpt, tmp_path / "gpt", 3, megatron_lm_args(config, tie=True))
    out = upcycle({"load": root, "extra": ["--tokenizer-model", tokenizer_of(flags)]},
                  tmp_path / "out", "duplicate", 2)
    tokens, positions = batch
    with torch.no_grad():
        expected = gpt(tokens, positions, None)
    torch.testing.assert_close(logits_of(out, batch), expected, rtol=1e-5, atol=1e-5)


def test_megatron_lm_args_with_other_python_objects(capsys, tmp_path, flags, megatron_source,
                                                    batch):
    """A common state whose args hold a type the weights-only loader refuses: a clear error, and
    with --trust-checkpoint-code the conversion works (full unpickling, as Megatron-LM does)."""
    import datetime

    config = tiny_config(num_sections=1, num_layers=MEGATRON_LAYERS, hidden_size=32)
    load = save_megatron_lm(megatron_source["gpt"], tmp_path / "paths", 1,
                            megatron_lm_args(config, tie=False,
                                             timeout=datetime.timedelta(minutes=5)))
    out = tmp_path / "out"
    argv = ["from-gpt", "--load", load, "--out", out, "--recipe", "duplicate",
            "--stag-num-sections", 2, "--tokenizer-model", tokenizer_of(flags)]
    assert_convert_error(capsys, argv, "datetime.timedelta", "--trust-checkpoint-code", out=out)
    convert_ok(*argv, "--trust-checkpoint-code")
    assert torch.equal(logits_of(out, batch), megatron_source["logits"])


def test_existing_output_and_interruption(capsys, monkeypatch, tmp_path, stag_source):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(out)
    argv = ["from-gpt", "--load", stag_source["load"], "--out", out, "--recipe", "duplicate",
            "--stag-num-sections", 2]
    assert_convert_error(capsys, argv, "already exists", "--overwrite")

    def die(*args, **kwargs):  # after the checkpoint is saved and verified, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(from_gpt, "write_preset", die)
    for target, extra in ((tmp_path / "new", []), (out, ["--overwrite"])):
        convert_interrupted(*[target if a is out else a for a in argv], *extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert snapshot(out) == before
