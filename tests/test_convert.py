"""`stag convert to-inference` and `stag convert reshard`, on one shared TP2 x PP2 training run.

The run (4 gloo processes under torchrun, 3 Adam steps) uses a model that exercises every fused
layout of the name map: SwiGLU (linear_fc1 = [gate | up], split over TP by Megatron's GLU
factory), grouped-query attention (linear_qkv grouped per key/value group), the learned output
combination and an untied head.

Expectations come from outside the converter: Megatron's own loader at TP1 (generate.load_model)
for the logits, Megatron's `load_plain_tensors` for "every tensor equal", `stag eval` and a
resumed `stag train` for "the resharded checkpoint is the same run".
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from stag_plugin import cli, generate
from stag_plugin.compat.megatron import free_port
from stag_plugin.convert import source
from stag_plugin.convert.inference_folder import load_inference_folder
from stag_plugin.training import checkpointing, evaluate, runtime

from convert_testing import (
    VOCAB,
    assert_convert_error,
    convert_interrupted,
    convert_ok,
    edit_index,
    iteration_folder,
    plain_tensors,
    prepare_flags,
    random_batch,
    resign,
    truncate_within,
)
from distributed import run_command
from stag_testing import fresh_seed, snapshot

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 900  # seconds per launch; a quiet host needs 15-40
MODEL = ["--num-layers", "4", "--swiglu", "--group-query-attention", "--num-query-groups", "2",
         "--stag-output-combination", "learned", "--untie-embeddings-and-output-weights"]
ITERS = 3


@pytest.fixture(scope="module")
def flags(tmp_path_factory) -> list:
    return prepare_flags(tmp_path_factory) + MODEL


def torchrun(nprocs: int, module_args: list) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nprocs),
           "--master-port", str(free_port()), "-m", *map(str, module_args)]
    code, output = run_command(cmd, timeout=DEADLINE, cwd=REPO,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert code == 0, output[-4000:]
    return output


@pytest.fixture(scope="module")
def tp2pp2(tmp_path_factory, flags) -> Path:
    """The shared source: 3 training steps at TP2 x PP2, saved (read, never written, by tests)."""
    save = tmp_path_factory.mktemp("tp2pp2") / "run"
    torchrun(4, ["stag_plugin", "train", *flags, "--train-iters", ITERS,
                 "--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2,
                 "--save", save])
    assert checkpointing.latest_iteration(save) == ITERS
    return save


@pytest.fixture
def damaged(tmp_path, tp2pp2) -> Path:
    """A private copy of the source run, for tests that break it."""
    return Path(shutil.copytree(tp2pp2, tmp_path / "copy"))


def megatron_logits(root: Path, tokens, positions) -> torch.Tensor:
    """Logits of the checkpoint loaded by Megatron at TP1 x PP1 (the trainer's loader)."""
    loaded = generate.load_model(root)
    with torch.no_grad():
        return loaded.model(tokens, positions).float()


# --------------------------------------------------------------------------- to-inference


def test_to_inference_gives_the_megatron_logits(tmp_path, tp2pp2):
    out = tmp_path / "model"
    convert_ok("to-inference", "--load", tp2pp2, "--out", out)
    folder = load_inference_folder(out)
    seed = fresh_seed()
    tokens, positions = random_batch(seed)
    with torch.no_grad():
        reference = folder.model(tokens)
    expected = megatron_logits(tp2pp2, tokens, positions)
    assert reference.shape == expected.shape == (2, tokens.shape[1], VOCAB)
    diff = (reference - expected).abs().max().item()
    assert diff < 1e-5, f"seed {seed}: max abs difference {diff}"
    # The metadata names its source; the tokenizer is the checkpoint's (tokenizer/, byte for
    # byte), with its transformers form next to it.
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == 2 and config["torch_dtype"] == "float32"
    assert config["source"]["iteration"] == ITERS
    assert config["source"]["architecture"]["stag_output_combination"] == "learned"
    assert str(iteration_folder(tp2pp2).resolve()) in (out / "README.md").read_text()
    assert files_of(out / "tokenizer") == files_of(iteration_folder(tp2pp2) / "tokenizer")
    assert not (out / "tokenizer.model").exists()
    described = json.loads((out / "tokenizer" / "stag_tokenizer.json").read_text())
    assert {k: v for k, v in config["tokenizer"].items() if k != "transformers"} == described
    assert described["type"] == "StagTokenizer" and described["eod"] == 2
    assert config["tokenizer"]["transformers"]["exact"] is True
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()


def files_of(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_to_inference_accepts_the_iteration_folder_and_stores_bf16(tmp_path, tp2pp2):
    from safetensors.torch import load_file

    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    convert_ok("to-inference", "--load", tp2pp2, "--out", fp32)
    convert_ok("to-inference", "--load", iteration_folder(tp2pp2), "--out", bf16,
               "--dtype", "bf16")
    full, half = load_file(fp32 / "model.safetensors"), load_file(bf16 / "model.safetensors")
    assert full.keys() == half.keys()
    assert {t.dtype for t in half.values()} == {torch.bfloat16}
    for key in full:
        assert torch.equal(half[key], full[key].to(torch.bfloat16)), key
    tokens, _ = random_batch(fresh_seed())
    with torch.no_grad():
        exact = load_inference_folder(fp32).model(tokens)
        rounded = load_inference_folder(bf16, dtype=torch.float32).model(tokens)
    assert (rounded - exact).abs().max().item() < 0.05 * exact.abs().max().item()


# --------------------------------------------------------------------------- reshard


def test_reshard_any_layout_to_one_process_and_back_to_pp2(tmp_path, flags, tp2pp2):
    """TP2 x PP2 -> TP1 x PP1 (in this process) -> PP2 (the command launches 2 processes);
    every tensor (model and optimizer) equals the source's, the records name the new layouts,
    `stag eval` reads the result, and `stag train` resumes it under PP2 exactly as the TP1
    copy resumes in one process."""
    tp1, pp2 = tmp_path / "tp1", tmp_path / "pp2"
    convert_ok("reshard", "--load", tp2pp2, "--out", tp1)
    convert_ok("reshard", "--load", tp1, "--out", pp2, "--pipeline-model-parallel-size", 2)
    source_tensors = plain_tensors(tp2pp2)
    assert any(k.startswith("optimizer.") for k in source_tensors)
    for out, layout in ((tp1, (1, 1)), (pp2, (1, 2))):
        tensors = plain_tensors(out)
        assert tensors.keys() == source_tensors.keys()
        assert all(torch.equal(tensors[k], source_tensors[k]) for k in tensors)
        _, record = checkpointing.read_run(out)
        assert (record["args"]["tensor_model_parallel_size"],
                record["args"]["pipeline_model_parallel_size"]) == layout
        assert record["iteration"] == ITERS
        assert files_of(iteration_folder(out) / "tokenizer") == files_of(
            iteration_folder(tp2pp2) / "tokenizer")
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    losses = [evaluate.evaluate_checkpoint(evaluate.build_parser().parse_args(
        ["--load", str(root), "--eval-iters", "1", "--tensor-model-parallel-size", "1"]))["loss"]
        for root in (tp2pp2, pp2)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    resume = [*flags, "--train-iters", ITERS + 1, "--lr-decay-iters", ITERS]
    torchrun(2, ["stag_plugin", "train", *resume, "--pipeline-model-parallel-size", 2,
                 "--load", pp2, "--save", tmp_path / "pp2-resumed"])
    one_process = resume + ["--load", tp1, "--save", tmp_path / "resumed"]
    assert cli.main(["train", *map(str, one_process)]) == 0
    step = [step_loss(tmp_path / name, ITERS + 1) for name in ("pp2-resumed", "resumed")]
    assert step[0] == pytest.approx(step[1], abs=1e-5)


def step_loss(folder: Path, iteration: int) -> float:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if r.get("iteration") == iteration and "lr" in r)


# --------------------------------------------------------------------------- errors


def test_missing_or_empty_checkpoint_folder(capsys, tmp_path):
    for command in ("to-inference", "reshard"):
        assert_convert_error(capsys, [command, "--load", tmp_path / "nope", "--out",
                                      tmp_path / "out"], "does not exist", out=tmp_path / "out")
    (tmp_path / "empty").mkdir()
    assert_convert_error(capsys, ["to-inference", "--load", tmp_path / "empty", "--out",
                                  tmp_path / "out"], "holds no checkpoint", out=tmp_path / "out")


def test_truncated_tensor_file(capsys, tmp_path, damaged):
    shard = truncate_within(iteration_folder(damaged), "embedding.word_embeddings.weight")
    assert_convert_error(capsys, ["to-inference", "--load", damaged, "--out", tmp_path / "out"],
                         shard.name, "truncated", out=tmp_path / "out")
    resign(iteration_folder(damaged))  # a checkpoint truncated before its manifest was written
    assert_convert_error(capsys, ["to-inference", "--load", damaged, "--out", tmp_path / "out"],
                         "truncated or corrupted", out=tmp_path / "out")


def test_checkpoint_without_its_tokenizer(capsys, tmp_path, damaged):
    """The ids cannot be decoded without the tokenizer: a changed tokenizer file (even with a
    manifest that matches it) and a missing tokenizer/ are clear errors, nothing written."""
    saved = iteration_folder(damaged) / "tokenizer"
    model = saved / "tokenizer.model"
    model.write_bytes(model.read_bytes()[:-1] + bytes([model.read_bytes()[-1] ^ 1]))
    resign(iteration_folder(damaged))
    assert_convert_error(capsys, ["to-inference", "--load", damaged, "--out", tmp_path / "out"],
                         "tokenizer.model is changed", out=tmp_path / "out")
    shutil.rmtree(saved)
    resign(iteration_folder(damaged))
    assert_convert_error(capsys, ["to-inference", "--load", damaged, "--out", tmp_path / "out"],
                         "holds no tokenizer", "tokenizer/", out=tmp_path / "out")


def test_corrupted_index(capsys, tmp_path, damaged):
    (iteration_folder(damaged) / ".metadata").write_bytes(b"\x80\x04 not a pickle")
    assert_convert_error(capsys, ["to-inference", "--load", damaged, "--out", tmp_path / "out"],
                         ".metadata", "truncated or overwritten", out=tmp_path / "out")
    resign(iteration_folder(damaged))
    assert_convert_error(capsys, ["to-inference", "--load", damaged, "--out", tmp_path / "out"],
                         ".metadata", "truncated or corrupted", out=tmp_path / "out")


def test_missing_key(capsys, tmp_path, damaged):
    edit_index(iteration_folder(damaged), lambda index: index.pop("null_memory"))
    assert_convert_error(capsys, ["to-inference", "--load", damaged, "--out", tmp_path / "out"],
                         "1 missing tensors: null_memory", out=tmp_path / "out")


def test_shape_mismatch(capsys, tmp_path, damaged):
    key = "sections.1.layers.0.cross_attention.linear_kv.weight"

    def widen(index):
        index[key].size = torch.Size([index[key].size[0] + 2, index[key].size[1]])

    edit_index(iteration_folder(damaged), widen)
    assert_convert_error(capsys, ["to-inference", "--load", damaged, "--out", tmp_path / "out"],
                         "1 shape mismatches", key, out=tmp_path / "out")


def test_dtype_mismatch(capsys, tmp_path, damaged):
    def to_bf16(index):
        index["null_memory"].properties.dtype = torch.bfloat16

    edit_index(iteration_folder(damaged), to_bf16)
    assert_convert_error(capsys, ["to-inference", "--load", damaged, "--out", tmp_path / "out"],
                         "1 tensors not torch.float32: null_memory", out=tmp_path / "out")


def test_run_record_that_does_not_describe_the_tensors(capsys, tmp_path, damaged):
    run_file = iteration_folder(damaged) / "stag_run.json"
    record = json.loads(run_file.read_text())
    record["args"]["stag_num_sections"] = record["architecture"]["stag_num_sections"] = 4
    run_file.write_text(json.dumps(record))
    resign(iteration_folder(damaged))
    assert_convert_error(capsys, ["to-inference", "--load", damaged, "--out", tmp_path / "out"],
                         "do not fit the model its configuration describes", "missing tensors",
                         out=tmp_path / "out")
    record["args"]["stag_num_sections"] = 2  # the architecture still says 4
    run_file.write_text(json.dumps(record))
    resign(iteration_folder(damaged))
    assert_convert_error(capsys, ["reshard", "--load", damaged, "--out", tmp_path / "out"],
                         "contradicts itself", "stag_num_sections", out=tmp_path / "out")


def test_invalid_target_layout(capsys, tmp_path, tp2pp2):
    assert_convert_error(capsys, ["reshard", "--load", tp2pp2, "--out", tmp_path / "out",
                                  "--pipeline-model-parallel-size", 3],
                         "pipeline_model_parallel_size=3", out=tmp_path / "out")


@pytest.mark.parametrize("command", ["to-inference", "reshard"])
def test_existing_output_needs_overwrite(capsys, tmp_path, tp2pp2, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(out)
    assert_convert_error(capsys, [command, "--load", tp2pp2, "--out", out],
                         "already exists", "--overwrite")
    assert snapshot(out) == before
    assert_convert_error(capsys, [command, "--load", tp2pp2, "--out", tp2pp2 / "inside",
                                  "--overwrite"], "overlaps the source")


def test_interrupted_to_inference_leaves_no_output(monkeypatch, tmp_path, tp2pp2):
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def save_then_die(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)  # the weights file is complete...
        raise KeyboardInterrupt  # ...and the process is interrupted before the rest

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_die)
    convert_interrupted("to-inference", "--load", tp2pp2, "--out", tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "config.json").write_text("{}")
    before = snapshot(existing)
    convert_interrupted("to-inference", "--load", tp2pp2, "--out", existing, "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert snapshot(existing) == before


def test_interrupted_reshard_leaves_no_output(monkeypatch, tmp_path, tp2pp2):
    def die(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(source, "verify_same_tensors", die)  # after the save, before the rename
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "latest_checkpointed_iteration.txt").write_text("7\n")
    before = snapshot(existing)
    for out, extra in ((tmp_path / "new", []), (existing, ["--overwrite"])):
        convert_interrupted("reshard", "--load", tp2pp2, "--out", out, *extra)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert snapshot(existing) == before


def test_reshard_that_does_not_verify_is_not_published(capsys, monkeypatch, tmp_path, tp2pp2):
    """A conversion bug (here: one tensor altered before saving) fails loudly, no output."""
    from stag_plugin.convert import reshard

    real_load = reshard.load_source

    def load_then_corrupt(holder, plan, options):
        real_load(holder, plan, options)
        with torch.no_grad():
            runtime.unwrap(holder.model[0]).null_memory.add_(1.0)

    monkeypatch.setattr(reshard, "load_source", load_then_corrupt)
    assert_convert_error(capsys, ["reshard", "--load", tp2pp2, "--out", tmp_path / "out"],
                         "is not the source", "null_memory differs", out=tmp_path / "out")
