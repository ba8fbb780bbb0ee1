"""`stag train` / `stag eval` end to end, in-process: exact resume, learning, checkpoint layout and
atomicity, evaluation of a checkpoint, input errors that leave existing folders untouched, YAML
presets, the CPU compatibility layer and the `stag` dispatcher.

Expectations come from outside the code under test: an uninterrupted run is the reference for a
resumed one, log(vocabulary) for the loss at initialisation, `torch.nn.utils.clip_grad_norm_` for
Megatron's clipping, the YAML file read with `yaml.safe_load` for the presets, and file snapshots
(names, mtimes, sha256) for "nothing was touched".

Every run shares one prepared data folder (a 40-file slice of the standard library, vocabulary
512) and a 4-layer, hidden-32 model, so the whole file takes about a minute on 2 cores.
"""

import hashlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stag_plugin import cli
from stag_plugin.compat.cpu import apply_cpu_compat
from stag_plugin.compat.megatron import free_port
from stag_plugin.training import arguments, checkpointing, evaluate, train

from distributed import run_command
from stag_testing import TINY_TRAIN_DEFAULTS, prepared_cache, small_corpus, snapshot

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512  # a multiple of 128: Megatron's padding leaves it unchanged
EVAL_ITERS = 2


# ---------------------------------------------------------------------------------------------
# fixtures and helpers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """40 top-level standard-library modules of 4-20 kB, copied into a user data folder."""
    return small_corpus(tmp_path_factory, "train")


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory, corpus) -> Path:
    """The prepared folder every run reuses through --data-cache-dir (same corpus and fractions)."""
    out, prepared = prepared_cache(tmp_path_factory, corpus, VOCAB)
    assert prepared.vocab_size == VOCAB and all(prepared.num_tokens[s] > 10_000
                                                for s in ("train", "valid", "test"))
    return out


@pytest.fixture(scope="module")
def base_flags(corpus, data_cache) -> list:
    """A tiny StagFormer (2 sections x 2 layers, hidden 32) on the shared data folder (after
    the defaults the tests were written for)."""
    return [*TINY_TRAIN_DEFAULTS, "--num-layers", "4", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "4",
            "--vocab-size", str(VOCAB),
            "--data-path", str(corpus), "--data-cache-dir", str(data_cache),
            "--valid-fraction", "0.2", "--test-fraction", "0.2",
            "--lr-warmup-iters", "2", "--log-interval", "1", "--eval-iters", str(EVAL_ITERS),
            "--no-progress"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, base_flags) -> Path:
    """6 iterations, saved and validated every 2: the folder later tests read (never write)."""
    save = tmp_path_factory.mktemp("finished") / "run"
    run_ok(base_flags + ["--train-iters", "6", "--save-interval", "2", "--eval-interval", "2",
                         "--save", str(save)])
    return save


def run_ok(argv) -> None:
    code = cli.main(["train", *map(str, argv)])
    assert code == 0, f"stag train {' '.join(map(str, argv))} exited with {code}"


def records(folder: Path) -> list:
    """The JSON-lines metrics of every run that wrote into `folder`, in order."""
    lines = (Path(folder) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def training_steps(folder: Path) -> dict:
    """iteration -> training record (the records that carry a learning rate)."""
    return {r["iteration"]: r for r in records(folder) if "lr" in r}


def validations(folder: Path) -> list:
    """(iteration, loss) of every validation record, in order."""
    return [(r["iteration"], r["loss"]) for r in records(folder) if r.get("split") == "valid"]


def eval_loss(capsys, *argv) -> float:
    """Run `stag eval` and read the loss from the line it prints."""
    capsys.readouterr()
    code = cli.main(["eval", *map(str, argv)])
    out = capsys.readouterr().out
    assert code == 0, out
    match = re.search(r"(valid|test) loss (\S+) \|", out)
    assert match, out
    return float(match.group(2))


def eval_result(argv) -> dict:
    """`stag eval`'s numbers at full precision (the printed line has 4 decimals)."""
    return evaluate.evaluate_checkpoint(evaluate.build_parser().parse_args([str(a) for a in argv]))


def complete_iteration_dirs(root: Path) -> list:
    return sorted(p for p in Path(root).iterdir() if re.fullmatch(r"iter_\d{7}", p.name))


def assert_complete_checkpoint(folder: Path, iteration: int, tokenizer_model: Path) -> None:
    """A folder Megatron can load (torch_dist metadata, shards, common state) plus our files:
    the run record and tokenizer/, a byte copy of the data's SentencePiece model and the
    description (stag_tokenizer.json) the record repeats."""
    from megatron.core import dist_checkpointing

    assert folder.name == f"iter_{iteration:07d}"
    names = {p.name for p in folder.iterdir()}
    assert {"metadata.json", ".metadata", "stag_run.json", "tokenizer"} <= names
    assert "tokenizer.model" not in names  # the layout before tokenizer/
    assert any(name.endswith(".distcp") for name in names), names
    assert isinstance(dist_checkpointing.load_common_state_dict(str(folder)), dict)
    run = json.loads((folder / "stag_run.json").read_text())
    assert run["iteration"] == iteration
    saved = folder / "tokenizer"
    assert sorted(p.name for p in saved.iterdir()) == ["stag_tokenizer.json", "tokenizer.model"]
    assert (saved / "tokenizer.model").read_bytes() == tokenizer_model.read_bytes()
    spec = json.loads((saved / "stag_tokenizer.json").read_text())
    assert spec["type"] == "StagTokenizer" and spec["vocab_size"] == VOCAB and spec["eod"] == 2
    assert spec["files"] == {"tokenizer.model": sha256(tokenizer_model)}
    assert run["tokenizer"] == spec


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tokenizer_model(data_cache: Path) -> Path:
    (model,) = Path(data_cache).glob("tokenizer-*/spm.model")
    return model


# ---------------------------------------------------------------------------------------------
# 1. resume exactness
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharing", ["separate", "shared"])
def test_resumed_run_matches_uninterrupted_run(tmp_path, base_flags, sharing):
    """8 iterations in one go == 4, exit, resume to 8: same losses, learning rates, grad norms
    and final validation loss. Dropout makes the RNG state part of what must be restored; a
    resume that skips it (--no-load-rng) must differ, which shows the comparison can fail."""
    flags = base_flags + ["--train-iters", "8", "--hidden-dropout", "0.1",
                          "--stag-weight-sharing", sharing]
    whole, split, no_rng = tmp_path / "whole", tmp_path / "split", tmp_path / "no_rng"
    run_ok(flags + ["--save", whole])
    run_ok(flags + ["--save", split, "--exit-interval", "4"])
    assert checkpointing.latest_iteration(split) == 4
    assert max(training_steps(split)) == 4
    run_ok(flags + ["--load", split, "--save", no_rng, "--no-load-rng"])
    run_ok(flags + ["--load", split, "--save", split])

    reference, resumed = training_steps(whole), training_steps(split)
    assert sorted(reference) == sorted(resumed) == list(range(1, 9))
    for it in range(1, 9):
        for key in ("loss", "lr", "grad_norm", "consumed_samples"):
            assert resumed[it][key] == pytest.approx(reference[it][key], rel=1e-6, abs=1e-7), \
                (it, key)
    assert validations(split)[-1] == (8, pytest.approx(validations(whole)[-1][1], abs=1e-6))
    assert checkpointing.latest_iteration(split) == 8

    control = training_steps(no_rng)
    assert sorted(control) == [5, 6, 7, 8]  # it did resume at iteration 4 ...
    assert max(abs(control[it]["loss"] - reference[it]["loss"]) for it in control) > 1e-4


# ---------------------------------------------------------------------------------------------
# 2. learning
# ---------------------------------------------------------------------------------------------


def test_training_lowers_the_validation_loss(tmp_path, base_flags):
    """Starts at the uniform-prediction loss log(vocab) and ends well below it."""
    save = tmp_path / "run"
    result = train.train(arguments.finalize_args(arguments.parse_with_preset(
        train.build_parser(), base_flags + ["--train-iters", "30", "--lr", "5e-3",
                                            "--micro-batch-size", "8", "--lr-warmup-iters", "3",
                                            "--eval-interval", "10", "--save", str(save)])))
    steps, valid = training_steps(save), validations(save)
    assert steps[1]["loss"] == pytest.approx(math.log(VOCAB), abs=0.1)  # near-uniform at init
    assert [it for it, _ in valid] == [10, 20, 30]
    assert result.iterations == 30 and result.valid_loss == valid[-1][1]
    assert valid[-1][1] < math.log(VOCAB) - 0.8, valid
    assert valid[-1][1] < valid[0][1], valid
    assert all(math.isfinite(r["loss"]) for r in steps.values())


# ---------------------------------------------------------------------------------------------
# 3. checkpoint layout and atomicity
# ---------------------------------------------------------------------------------------------


def test_checkpoint_layout(finished_run, data_cache):
    root = finished_run
    assert (root / checkpointing.TRACKER).read_text().strip() == "6"
    dirs = complete_iteration_dirs(root)
    assert [d.name for d in dirs] == ["iter_0000002", "iter_0000004", "iter_0000006"]
    for folder, iteration in zip(dirs, (2, 4, 6)):
        assert_complete_checkpoint(folder, iteration, tokenizer_model(data_cache))
    assert not [p for p in root.iterdir() if p.name.endswith((".incomplete", ".old", ".tmp"))]
    run = json.loads((dirs[-1] / "stag_run.json").read_text())
    assert run["architecture"]["num_layers"] == 4 and run["architecture"]["hidden_size"] == 32
    assert run["architecture"]["padded_vocab_size"] == VOCAB
    saves = [r["iteration"] for r in records(root) if r.get("event") == "save"]
    assert saves == [2, 4, 6]


def _crash_second_dist_save(monkeypatch):
    """The second `dist_checkpointing.save` writes part of a shard, then the 'disk fills up'."""
    from megatron.core import dist_checkpointing

    real_save, calls = dist_checkpointing.save, []

    def save(state, directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 2:
            (Path(directory) / "__0_0.distcp").write_bytes(b"half a shard")
            raise OSError(28, "No space left on device (simulated)")
        return real_save(state, directory, *args, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "save", save)
    return calls


def _crash_second_rename(monkeypatch):
    """The second checkpoint is fully written but the process dies before it is renamed."""
    real_replace, calls = checkpointing.replace_dir, []

    def replace(source, target):
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed during save (simulated)")
        return real_replace(source, target)

    monkeypatch.setattr(checkpointing, "replace_dir", replace)
    return calls


@pytest.mark.parametrize("crash", [_crash_second_dist_save, _crash_second_rename],
                         ids=["during-dist-save", "before-rename"])
def test_crash_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys, base_flags,
                                                     data_cache, crash):
    save = tmp_path / "run"
    flags = base_flags + ["--train-iters", "6", "--save-interval", "2", "--eval-interval", "2",
                          "--save", save]
    calls = crash(monkeypatch)
    capsys.readouterr()
    code = cli.main(["train", *map(str, flags)])
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert len(calls) == 2
    if crash is _crash_second_dist_save:  # a full disk: said so, the previous checkpoint kept
        assert code == 2 and "No space left on device" in err, err
        assert "the previous checkpoint is kept" in err and "Fix: free space" in err, err
    else:  # Ctrl-C: one line, no traceback
        assert code == 130 and "stag train: interrupted" in err and "Traceback" not in err, err

    assert checkpointing.latest_iteration(save) == 2
    (complete,) = complete_iteration_dirs(save)  # nothing half-written under a final name
    assert_complete_checkpoint(complete, 2, tokenizer_model(data_cache))
    assert not (save / "iter_0000004").exists()
    assert validations(save)[0][0] == 2
    assert eval_result(["--load", save, "--eval-iters", EVAL_ITERS])["loss"] == pytest.approx(
        validations(save)[0][1], abs=1e-5)

    run_ok(flags + ["--load", save, "--train-iters", "6"])  # resume over the debris
    assert checkpointing.latest_iteration(save) == 6
    assert [d.name for d in complete_iteration_dirs(save)] == [
        "iter_0000002", "iter_0000004", "iter_0000006"]
    assert not [p for p in save.iterdir() if p.name.endswith(".incomplete")]
    assert [r["iteration"] for r in records(save) if r.get("event") == "load"] == [2]


# ---------------------------------------------------------------------------------------------
# 4. stag eval
# ---------------------------------------------------------------------------------------------


def test_eval_reproduces_the_logged_validation_loss(finished_run, capsys):
    before = snapshot(finished_run)
    final_iteration, logged = validations(finished_run)[-1]
    assert final_iteration == 6
    valid = eval_result(["--load", finished_run, "--eval-iters", EVAL_ITERS])
    assert valid["iteration"] == 6
    assert valid["loss"] == pytest.approx(logged, abs=1e-5)
    assert eval_loss(capsys, "--load", finished_run, "--eval-iters", EVAL_ITERS) == \
        pytest.approx(logged, abs=1e-4)  # the printed line (4 decimals)

    test = eval_result(["--load", finished_run, "--split", "test", "--eval-iters", EVAL_ITERS])
    assert math.isfinite(test["loss"]) and abs(test["loss"] - valid["loss"]) > 1e-4
    assert test["loss"] < math.log(VOCAB) + 0.5
    assert snapshot(finished_run) == before  # evaluation writes nothing into the run


# ---------------------------------------------------------------------------------------------
# 5. bad inputs: exit code 2, a message naming problem and fix, nothing touched
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad")
    (root / "empty").mkdir()
    (root / "empty" / "nothing.txt").write_text("")
    (root / "no_text.jsonl").write_text('{"content": "def f(): pass"}\n' * 3)
    (root / "tiny").mkdir()
    for i in range(10):  # a few hundred characters: far too few for 512 pieces
        (root / "tiny" / f"doc{i}.py").write_text(f"x{i} = {i}\n")
    (root / "unknown_key.yaml").write_text("num_layers: 4\nnum_layerz: 8\n")
    return {name: root / name for name in ("empty", "no_text.jsonl", "tiny", "unknown_key.yaml")}


def _bad(id_, extra, words, marks=()):
    """A bad `stag train` input: extra flags and the words its message must contain."""
    return pytest.param(extra, words, id=id_, marks=marks)


BAD_TRAIN_INPUTS = [
    _bad("missing-data-path", ["--data-path", "{bad}/no/such/dir"],
         ["{bad}/no/such/dir", "does not exist", "Fix"]),
    _bad("empty-corpus", ["--data-path", "{bad}/empty"], ["corpus is empty", "Fix"]),
    _bad("jsonl-without-text", ["--data-path", "{bad}/no_text.jsonl"],
         ["no_text.jsonl", "'text'", "'content'", "--json-key"]),
    _bad("vocab-too-large", ["--data-path", "{bad}/tiny"],
         ["vocabulary size 512", "too large", "--vocab-size <="]),
    _bad("other-num-layers", ["--load", "{run}", "--num-layers", "2"],
         ["another architecture", "num_layers", "checkpoint 4", "this run 2", "Fix"]),
    _bad("other-weight-sharing", ["--load", "{run}", "--stag-weight-sharing", "shared"],
         ["another architecture", "stag_weight_sharing", "'separate'", "'shared'"]),
    _bad("window-zero", ["--stag-cross-attention-window", "0"],
         ["--stag-cross-attention-window", "0", ">= 1", "Fix"]),
    _bad("sections-do-not-divide-layers", ["--stag-num-sections", "3"],
         ["--num-layers", "not divisible", "num_sections=3", "Fix"]),
    _bad("unknown-yaml-key", ["--config", "{bad}/unknown_key.yaml"],
         ["unknown keys", "num_layerz", "Fix"]),
    _bad("missing-yaml", ["--config", "{bad}/missing.yaml"],
         ["--config", "missing.yaml", "no such file"]),
    _bad("warmup-not-below-train-iters", ["--train-iters", "5", "--lr-warmup-iters", "5"],
         ["warm-up (5 iterations)", "--lr-decay-iters 5", "training length", "Fix"]),
    _bad("batch-not-a-multiple", ["--global-batch-size", "6"],
         ["--global-batch-size 6", "--micro-batch-size 4", "multiple"]),
    _bad("tp-larger-than-world", ["--tensor-model-parallel-size", "2"],
         ["--tensor-model-parallel-size 2", "world size 1", "Fix"]),
    _bad("micro-batch-zero", ["--micro-batch-size", "0"], ["--micro-batch-size", ">= 1"]),
    _bad("schedule-changed-on-resume", ["--load", "{run}", "--lr", "0.5"],
         ["--lr 0.5", "--override-opt-param-scheduler", "Fix"]),
    _bad("unknown-tokenizer-type", ["--tokenizer-type", "Llama2Tokenizer"],
         ["--tokenizer-type Llama2Tokenizer", "not supported", "GPT2BPETokenizer", "Fix"]),
    _bad("tokenizer-file-missing", ["--tokenizer-type", "GPTSentencePieceTokenizer",
                                    "--tokenizer-model", "{bad}/none.model"],
         ["--tokenizer-model {bad}/none.model", "missing", "Fix"]),
]


@pytest.mark.parametrize("extra, words", BAD_TRAIN_INPUTS)
def test_bad_train_input_is_a_clear_error_that_touches_nothing(extra, words, base_flags,
                                                               finished_run, data_cache,
                                                               bad_files, capsys):
    def fill(text):
        return text.format(bad=bad_files["empty"].parent, run=finished_run)

    before_run, before_data = snapshot(finished_run), snapshot(data_cache)
    capsys.readouterr()
    code = cli.main(["train", *base_flags, "--train-iters", "6", "--save", str(finished_run),
                     "--overwrite", *[fill(a) for a in extra]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("stag train: error: ") and "Traceback" not in err, err
    for word in words:
        assert fill(word) in err, (word, err)
    assert snapshot(finished_run) == before_run
    assert snapshot(data_cache) == before_data


def test_command_line_process_reports_a_bad_tensor_parallel_size(base_flags):
    """The real entry point, in its own process (no process group exists beforehand)."""
    code, output = run_command([sys.executable, "-m", "stag_plugin", "train", *base_flags,
                                "--train-iters", "4", "--tensor-model-parallel-size", "2"],
                               cwd=REPO, timeout=600)
    assert code == 2, output[-2000:]
    assert "stag train: error: --tensor-model-parallel-size 2" in output
    assert "Traceback" not in output


def test_json_key_fix_in_the_message_is_a_real_flag(base_flags, bad_files, capsys):
    """The flag the JSONL error recommends reads another field when given to `stag train`."""
    code = cli.main(["train", *base_flags, "--data-path", str(bad_files["no_text.jsonl"])])
    err = capsys.readouterr().err
    assert code == 2
    flag = re.search(r"(--json-\S+) NAME", err).group(1)
    args = arguments.parse_with_preset(train.build_parser(), base_flags + [flag, "content"])
    assert args.json_keys == ["content"]


@pytest.mark.parametrize("which", ["empty-folder", "missing-folder"])
def test_eval_without_checkpoint_is_a_clear_error(tmp_path, capsys, which):
    folder = tmp_path / "ckpt"
    if which == "empty-folder":
        folder.mkdir()
    code = cli.main(["eval", "--load", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("stag eval: error: ") and "Traceback" not in err, err
    assert str(folder) in err and "Fix" in err
    assert ("no complete checkpoint" if which == "empty-folder" else "does not exist") in err
    assert sorted(tmp_path.rglob("*")) == ([folder] if which == "empty-folder" else [])


# ---------------------------------------------------------------------------------------------
# 6. YAML presets
# ---------------------------------------------------------------------------------------------

PRESETS = sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_preset_parses_into_a_valid_config(preset):
    values = yaml.safe_load(preset.read_text())
    args = arguments.finalize_args(arguments.parse_with_preset(
        train.build_parser(), ["--config", str(preset)]))
    for key, value in values.items():
        assert getattr(args, key.replace("-", "_")) == value, key
    config = arguments.config_from_args(args)
    assert config.num_layers == args.num_layers and config.hidden_size == args.hidden_size
    assert config.num_sections == args.stag_num_sections
    assert config.weight_sharing == args.stag_weight_sharing
    assert config.num_attention_heads == args.num_attention_heads


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_command_line_flags_override_the_preset(preset):
    values = yaml.safe_load(preset.read_text())
    parser = train.build_parser()
    new_hidden = 2 * values.get("hidden_size", parser.get_default("hidden_size"))
    new_iters = values.get("train_iters", parser.get_default("train_iters")) + 7
    for argv in (["--config", str(preset), "--hidden-size", str(new_hidden)],
                 ["--hidden-size", str(new_hidden), "--config", str(preset)]):
        args = arguments.parse_with_preset(train.build_parser(), argv + ["--train-iters",
                                                                         str(new_iters)])
        assert args.hidden_size == new_hidden and args.train_iters == new_iters
        untouched = {k: v for k, v in values.items() if k not in ("hidden_size", "train_iters")}
        for key, value in untouched.items():
            assert getattr(args, key.replace("-", "_")) == value, key


# ---------------------------------------------------------------------------------------------
# 7. the CPU compatibility layer
# ---------------------------------------------------------------------------------------------


def test_cpu_compat_is_idempotent_and_clips_like_torch():
    from megatron.core.optimizer import clip_grads

    original_type = torch.Tensor.type
    assert apply_cpu_compat() is True
    clip = clip_grads.clip_grad_by_total_norm_fp32
    assert apply_cpu_compat() is True
    assert clip_grads.clip_grad_by_total_norm_fp32 is clip  # not wrapped twice

    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator))
              for shape in [(7, 5), (5,), (3, 4, 2)]]
    for p in params:
        p.grad = 3.0 * torch.randn(p.shape, generator=generator)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for c, p in zip(copies, params):
        c.grad = p.grad.clone()

    expected_norm = torch.nn.utils.clip_grad_norm_(copies, max_norm=1.0)
    total = clip_grads.get_grad_norm_fp32([p.grad for p in params])
    assert total == pytest.approx(expected_norm.item(), rel=1e-5)
    assert total > 1.0  # so clipping really scales
    clip(params, max_norm=1.0, total_norm=total)
    for p, c in zip(params, copies):
        torch.testing.assert_close(p.grad, c.grad, rtol=1e-5, atol=1e-7)

    assert torch.Tensor.type is original_type
    assert torch.zeros(2).type() == "torch.FloatTensor"
    wrong = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    wrong.grad = torch.ones(2, dtype=torch.float64)
    with pytest.raises(AssertionError):  # Megatron's type check fails inside the wrapper ...
        clip([wrong], max_norm=1.0, total_norm=10.0)
    assert torch.Tensor.type is original_type  # ... which still restores Tensor.type
    assert torch.zeros(2).type() == "torch.FloatTensor"


# ---------------------------------------------------------------------------------------------
# 8. bf16
# ---------------------------------------------------------------------------------------------


def test_bf16_run_trains(tmp_path, base_flags):
    save = tmp_path / "run"
    run_ok(base_flags + ["--bf16", "--train-iters", "6", "--lr", "5e-3", "--save", save])
    losses = [r["loss"] for _, r in sorted(training_steps(save).items())]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.15)
    assert losses[-1] < losses[0] - 0.05, losses
    assert not any(r["skipped"] for r in training_steps(save).values())


# ---------------------------------------------------------------------------------------------
# 9. the `stag` dispatcher
# ---------------------------------------------------------------------------------------------


def test_cli_dispatcher(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("train", "eval", "demo"))
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err
    assert cli.main([]) == 2
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--help"])
    assert exit_info.value.code == 0
    assert "--load" in capsys.readouterr().out


def test_tensor_parallel_run_matches_and_its_checkpoint_loads_at_tp1(tmp_path, base_flags):
    """`stag train` under torchrun with TP 2 (two gloo processes) reproduces the TP 1 losses, and
    its distributed checkpoint, resharded on load, evaluates at TP 1 to the loss TP 2 logged."""
    flags = [str(a) for a in base_flags + ["--train-iters", "4", "--eval-interval", "100",
                                           "--hidden-dropout", "0.0"]]
    tp2, tp1 = tmp_path / "tp2", tmp_path / "tp1"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
              "--master-port", str(free_port()), "-m", "stag_plugin", "train"]
    code, output = run_command(launch + flags + ["--tensor-model-parallel-size", "2",
                                                 "--save", str(tp2)], cwd=REPO, timeout=900)
    assert code == 0, output[-3000:]
    run_ok(flags + ["--save", str(tp1)])
    steps2, steps1 = training_steps(tp2), training_steps(tp1)
    assert sorted(steps2) == sorted(steps1) == [1, 2, 3, 4]
    for it in steps1:
        assert steps2[it]["loss"] == pytest.approx(steps1[it]["loss"], abs=1e-5)
    logged = validations(tp2)[-1][1]
    result = eval_result(["--load", tp2, "--eval-iters", EVAL_ITERS,
                          "--tensor-model-parallel-size", "1"])
    assert result["loss"] == pytest.approx(logged, abs=1e-5)
