"""The memory and cross-attention initialisation options: what each builds, and checkpoints
whose run record, Megatron-LM args or inference config.json predate `memory_norm`."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from stag_plugin import StagGPTModel, cli
from stag_plugin.convert.megatron_lm_args import args_from_megatron_lm
from stag_plugin.errors import StagError
from stag_plugin.parallel.layout import pipeline_stages, shared_layer_stages
from stag_plugin.reference.model import ReferenceConfig
from stag_plugin.training import arguments, integrity

from convert_testing import iteration_folder, megatron_lm_args, save_megatron_lm
from stag_testing import VOCAB, prepared_cache, small_corpus, tiny_config, tiny_train_flags

TRAIN_VOCAB = 512


def build(seed: int = 0, **overrides) -> StagGPTModel:
    torch.manual_seed(seed)
    return StagGPTModel(tiny_config(**overrides), vocab_size=VOCAB, max_sequence_length=32)


# ---------------------------------------------------------------------------- the model


@pytest.mark.parametrize("sharing", ["separate", "shared"])
def test_only_the_last_section_has_a_final_norm_without_memory_norm(sharing):
    raw = build(num_sections=3, weight_sharing=sharing)
    assert [block.final_layernorm is None for block in raw.sections] == [True, True, False]
    normed = build(num_sections=3, weight_sharing=sharing, memory_norm=True)
    assert all(block.final_layernorm is not None for block in normed.sections)


def test_the_memory_is_the_output_of_the_section_before(monkeypatch):
    """Section 1's TransformerBlock output (no final norm) is shifted into section 2's memory
    as it is."""
    model = build(num_sections=2).eval()
    outputs, memories = [], []
    model.sections[0].register_forward_hook(lambda module, args, out: outputs.append(out))
    shift = model.shift_memory
    monkeypatch.setattr(model, "shift_memory", lambda out: memories.append(out) or shift(out))
    tokens = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        model(tokens, torch.arange(9).expand(2, 9))
    assert len(memories) == 1 and memories[0] is outputs[0]
    # not normalised: a LayerNorm output has mean 0 and std ~1 over the hidden dimension
    assert memories[0].std(dim=-1).sub(1).abs().max() > 0.1


def test_zero_init_zeroes_the_cross_attention_output_and_draws_the_rest_alike():
    zeroed = dict(build(seed=3, cross_attention_zero_init=True).named_parameters())
    plain = dict(build(seed=3).named_parameters())
    assert zeroed.keys() == plain.keys()
    proj = [name for name in plain if ".cross_attention.linear_proj." in name]
    assert proj and all(torch.count_nonzero(zeroed[name]) == 0 for name in proj)
    assert any(torch.count_nonzero(plain[name]) > 0 for name in proj)
    for name in set(plain) - set(proj):
        assert torch.equal(zeroed[name], plain[name]), name


def test_shared_final_norm_lives_on_the_stages_that_run_it():
    for memory_norm, holders in ((True, (0, 1)), (False, (1,))):
        stages = pipeline_stages(2, 2, 2, memory_norm=memory_norm)
        assert shared_layer_stages(stages)[("final_norm", 0)] == holders


# ---------------------------------------------------------------------------- old checkpoints


@pytest.fixture(scope="module")
def flags(tmp_path_factory) -> list:
    corpus = small_corpus(tmp_path_factory, "memory")
    cache, _ = prepared_cache(tmp_path_factory, corpus, TRAIN_VOCAB)
    return [*tiny_train_flags(corpus, cache, TRAIN_VOCAB), "--micro-batch-size", "4",
            "--train-iters", "2"]


@pytest.fixture(scope="module")
def unrecorded_run(tmp_path_factory, flags) -> tuple:
    """A run trained with normalised memory whose record then loses the flag (as a record
    written before it existed), and its validation loss before that."""
    from stag_plugin.training import evaluate

    save = tmp_path_factory.mktemp("normed") / "run"
    assert cli.main(["train", *flags, "--stag-memory-norm", "--save", str(save)]) == 0
    argv = ["--load", str(save), "--eval-iters", "1"]
    loss = evaluate.evaluate_checkpoint(evaluate.build_parser().parse_args(argv))["loss"]
    folder = iteration_folder(save)
    record = json.loads((folder / "stag_run.json").read_text())
    assert record["args"].pop("stag_memory_norm") is True
    assert record["architecture"].pop("stag_memory_norm") is True
    (folder / "stag_run.json").write_text(json.dumps(record))
    integrity.write_manifest(folder)
    return save, loss


def test_a_record_without_the_flag_loads_as_normalised_memory(unrecorded_run):
    from stag_plugin.training import evaluate

    save, loss = unrecorded_run
    argv = ["--load", str(save), "--eval-iters", "1"]
    assert evaluate.evaluate_checkpoint(evaluate.build_parser().parse_args(argv))["loss"] == \
        pytest.approx(loss, abs=1e-6)


def test_resuming_it_needs_the_flag_it_was_trained_with(unrecorded_run, flags, tmp_path,
                                                        capsys):
    import shutil

    save = Path(shutil.copytree(unrecorded_run[0], tmp_path / "run"))
    common = [*flags, "--train-iters", "3", "--override-opt-param-scheduler", "--load",
              str(save), "--save", str(save)]
    capsys.readouterr()
    assert cli.main(["train", *common]) == 2
    err = capsys.readouterr().err
    assert "stag_memory_norm: checkpoint True, this run False" in err, err
    assert cli.main(["train", *common, "--stag-memory-norm"]) == 0


def test_its_inference_folder_says_normalised_memory(unrecorded_run, tmp_path):
    out = tmp_path / "folder"
    assert cli.main(["convert", "to-inference", "--load", str(unrecorded_run[0]), "--out",
                     str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["memory_norm"] is True


def test_a_config_json_without_the_field_means_normalised_memory():
    fields = dict(vocab_size=8, max_sequence_length=8, num_layers=2, hidden_size=8,
                  num_attention_heads=2, num_query_groups=2, ffn_hidden_size=8, head_dim=4)
    assert ReferenceConfig(**fields).memory_norm is True


def test_megatron_lm_args_of_a_stagformer_without_the_flag_mean_normalised_memory():
    stored = dict(num_layers=4, hidden_size=32, num_attention_heads=4, padded_vocab_size=128,
                  seq_length=32, max_position_embeddings=32, stag_num_sections=2)
    args = args_from_megatron_lm(argparse.Namespace(**stored), 100, "ckpt")
    assert args.stag_memory_norm is True
    args = args_from_megatron_lm(argparse.Namespace(**stored, stag_memory_norm=False), 100,
                                 "ckpt")
    assert args.stag_memory_norm is False


def stag_dests(**values) -> dict:
    """Every --stag-* dest at its default, `values` overriding."""
    return {arguments._dest(flag): kwargs["default"] for flag, _, kwargs in arguments.STAG_FLAGS
            } | values


def test_megatron_lm_resume_refuses_other_stag_options(tmp_path):
    """A StagFormer saved by Megatron-LM with normalised memory, its args from before the
    flag: resuming it needs --stag-memory-norm; a window it lacks is refused too."""
    from stag_plugin.integrations.megatron_lm.config import check_loaded_stag_options

    model = build(memory_norm=True)
    stored = stag_dests(stag_num_sections=2)
    del stored["stag_memory_norm"]
    save_megatron_lm(model, tmp_path / "run", 3, megatron_lm_args(model.config, True, **stored))
    run = argparse.Namespace(load=str(tmp_path / "run"), **stag_dests(stag_num_sections=2))
    with pytest.raises(StagError, match=r"--stag-memory-norm True \(this run: False\)"):
        check_loaded_stag_options(run)
    run.stag_memory_norm = True
    check_loaded_stag_options(run)
    run.stag_cross_attention_window = 4
    with pytest.raises(StagError, match=r"--stag-cross-attention-window None \(this run: 4\)"):
        check_loaded_stag_options(run)
    run.stag_cross_attention_window, run.stag_cross_attention_zero_init = None, True
    check_loaded_stag_options(run)  # initialisation only
    run.load = str(tmp_path / "empty")
    check_loaded_stag_options(run)  # a first run: nothing saved yet


def test_a_plain_gpt_records_no_memory_option():
    args = argparse.Namespace(**{**vars(arguments.finalize_args(
        arguments.parse_with_preset(_parser(), ["--num-layers", "2", "--hidden-size", "32",
                                                "--num-attention-heads", "4",
                                                "--seq-length", "32", "--micro-batch-size", "1",
                                                "--lr", "1e-3", "--stag-num-sections", "1"])))})
    assert arguments.architecture_of(args, 128)["stag_memory_norm"] is None
    old = {"stag_num_sections": 1, "padded_vocab_size": 128}
    assert arguments.with_unrecorded(old, architecture=True)["stag_memory_norm"] is None


def _parser():
    from stag_plugin.training import train

    return train.build_parser()

