"""Scale-out on real processes (gloo on loopback): every layout reproduces one process.

Each parallel run starts from the weights the one-process reference run saved at iteration 0 (loaded
with --finetune, i.e. resharded into the run's layout), trains 3 Adam steps of 8 sequences through
`stag_plugin.training.train` (Megatron's 1F1B schedule, DDP, optimizer) and must log the reference's
losses within 1e-5 (fp32; the differences seen are ~1e-7). The TP 2 layout is tested in
test_train.py (it also reloads at TP 1).

    A  2 sections x 2 layers, separate weights, learned output combination, RoPE, tied head
       TP2 x PP2 with sequence parallelism (4 processes) -> its checkpoint loads at TP1 x PP1
       with the same logits;  DP2 with the distributed optimizer (2 processes)
    B  2 sections x 2 layers, shared weights, learned positions, untied head
       PP2 (one section per stage) and PP4 (sections split over stages: the boundary tensor
       carries hidden state and memory; shared layers are replicas on two stages each)

Failure handling: a rank killed while a checkpoint is being written ends the job with an error
within a bounded time, and the previous checkpoint still loads.
"""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stag_plugin import cli
from stag_plugin.compat.megatron import free_port
from stag_plugin.training import checkpointing, evaluate
from stag_plugin.training.data import prepare_data

from distributed import run_command
from stag_testing import TINY_TRAIN_DEFAULTS, small_corpus

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "workers" / "layout_worker.py"
VOCAB = 512
DEADLINE = 900  # seconds; a quiet host needs 20-60 per launch, a loaded one far more
TOLERANCE = 1e-5

MODEL_A = ["--stag-output-combination", "learned"]
MODEL_B = ["--stag-weight-sharing", "shared", "--position-embedding-type", "learned_absolute",
           "--no-stag-cross-attention-rope", "--untie-embeddings-and-output-weights"]


def _load_worker():
    spec = importlib.util.spec_from_file_location("layout_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def flags(tmp_path_factory) -> list:
    """Tiny 2 x 2-layer model on 40 standard-library files (vocabulary 512)."""
    corpus = small_corpus(tmp_path_factory, "parallel")
    cache = tmp_path_factory.mktemp("data")
    prepare_data([str(corpus)], cache, vocab_size=VOCAB, valid_fraction=0.2, test_fraction=0.2,
                 progress=False)
    return [*TINY_TRAIN_DEFAULTS, "--num-layers", "4", "--hidden-size", "32",
            "--num-attention-heads", "4", "--seq-length", "32", "--micro-batch-size", "2",
            "--global-batch-size", "8",
            "--vocab-size", str(VOCAB), "--data-path", str(corpus), "--data-cache-dir",
            str(cache), "--valid-fraction", "0.2", "--test-fraction", "0.2", "--lr", "3e-3",
            "--lr-warmup-iters", "1", "--train-iters", "3", "--log-interval", "1",
            "--eval-interval", "100", "--eval-iters", "1", "--no-progress",
            "--distributed-timeout-minutes", "2"]


def reference(root: Path, flags: list, model: list) -> dict:
    """One process, in this one: saves its initial weights, trains, logs losses."""
    out = root / "one-process"
    _load_worker().main([str(out), "--save-init", str(root / "init"), "--", *flags, *model,
                         "--metrics-log", str(out / "metrics.jsonl")])
    return {"init": root / "init", "losses": losses(out / "metrics.jsonl")}


@pytest.fixture(scope="module")
def ref_a(tmp_path_factory, flags):
    return reference(tmp_path_factory.mktemp("A"), flags, MODEL_A)


@pytest.fixture(scope="module")
def ref_b(tmp_path_factory, flags):
    return reference(tmp_path_factory.mktemp("B"), flags, MODEL_B)


def launch(nprocs: int, out: Path, flags: list, init: Path, extra: list, save: bool = True):
    """torchrun the worker on `nprocs` processes from the reference's initial weights."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nprocs),
           "--master-port", str(free_port()), str(WORKER), str(out), "--", *flags, *extra,
           "--load", str(init), "--finetune", "--metrics-log", str(out / "metrics.jsonl")]
    if save:
        cmd += ["--save", str(out / "checkpoint")]
    code, output = run_command(cmd, timeout=DEADLINE, cwd=REPO,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert code == 0, output[-4000:]
    return losses(out / "metrics.jsonl")


def losses(path: Path) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["iteration"]: r["loss"] for r in records if "loss" in r and "split" not in r}


def assert_same_losses(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for it in expected:
        assert got[it] == pytest.approx(expected[it], abs=TOLERANCE), (it, got, expected)
    assert expected[3] < expected[1]  # the steps did train


# ---------------------------------------------------------------------------------------------


def test_tp2_pp2_sequence_parallel_matches_one_process_and_reshards_to_tp1_pp1(
        tmp_path, flags, ref_a):
    got = launch(4, tmp_path / "tp2pp2", flags, ref_a["init"], MODEL_A + [
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
        "--sequence-parallel"])
    assert_same_losses(got, ref_a["losses"])
    parallel_logits = torch.load(tmp_path / "tp2pp2" / "logits.pt")
    # The TP2 x PP2 checkpoint, loaded by one process (TP1 x PP1): same logits.
    one = tmp_path / "tp1pp1"
    _load_worker().main([str(one), "--logits-only", "--", *flags, *MODEL_A,
                         "--load", str(tmp_path / "tp2pp2" / "checkpoint"), "--finetune"])
    logits = torch.load(one / "logits.pt")
    assert logits.shape == parallel_logits.shape == (2, 32, VOCAB)
    torch.testing.assert_close(logits, parallel_logits, atol=1e-5, rtol=1e-5)


def test_dp2_distributed_optimizer_matches_one_process(tmp_path, flags, ref_a):
    got = launch(2, tmp_path / "dp2", flags, ref_a["init"], MODEL_A + [
        "--use-distributed-optimizer"])
    assert_same_losses(got, ref_a["losses"])
    assert checkpointing.latest_iteration(tmp_path / "dp2" / "checkpoint") == 3


@pytest.mark.parametrize("stages", [2, 4], ids=["pp2-section-per-stage", "pp4-split-sections"])
def test_pipeline_shared_weights_matches_one_process(tmp_path, flags, ref_b, stages):
    got = launch(stages, tmp_path / f"pp{stages}", flags, ref_b["init"], MODEL_B + [
        "--pipeline-model-parallel-size", str(stages)], save=False)
    assert_same_losses(got, ref_b["losses"])


def test_rank_killed_during_save_ends_the_job_and_keeps_the_previous_checkpoint(tmp_path, flags):
    """Two pipeline stages started the way Slurm's srun starts ranks (no torchrun agent to
    clean up): rank 1 is killed while iteration 2's checkpoint is being written. Rank 0 must
    fail within the collective timeout instead of hanging, iteration 1's checkpoint must stay
    the latest and load, and the half-written folder must not be mistaken for a checkpoint."""
    save = tmp_path / "run"
    port = free_port()
    cmd = [sys.executable, "-m", "stag_plugin", "train", *flags, *MODEL_A,
           "--pipeline-model-parallel-size", "2", "--train-iters", "50", "--save", str(save),
           "--save-interval", "1", "--distributed-timeout-minutes", "0.5"]
    ranks = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, start_new_session=True,
                              env=dict(os.environ, RANK=str(r), LOCAL_RANK=str(r),
                                       WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                       MASTER_PORT=str(port), OMP_NUM_THREADS="1"))
             for r in range(2)]
    try:
        partial = save / "iter_0000002.incomplete"
        deadline = time.monotonic() + DEADLINE
        while not partial.exists():
            assert time.monotonic() < deadline, "no second checkpoint started"
            assert all(r.poll() is None for r in ranks), ranks[0].communicate()[0][-3000:]
            time.sleep(0.02)
        ranks[1].kill()
        started = time.monotonic()
        output, _ = ranks[0].communicate(timeout=DEADLINE)
        waited = time.monotonic() - started
    finally:
        for r in ranks:
            try:
                os.killpg(r.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert ranks[0].returncode != 0, output[-3000:]
    assert waited < DEADLINE
    assert checkpointing.latest_iteration(save) == 1
    result = evaluate.evaluate_checkpoint(evaluate.build_parser().parse_args(
        ["--load", str(save), "--eval-iters", "1", "--tensor-model-parallel-size", "1"]))
    assert result["iteration"] == 1 and torch.isfinite(torch.tensor(result["loss"]))


@pytest.mark.parametrize("extra,words", [
    (["--pipeline-model-parallel-size", "2"], "does not divide the world size 1"),
    (["--pipeline-model-parallel-size", "3"], "--pipeline-model-parallel-size: "
     "StagFormerConfig.pipeline_model_parallel_size=3: does not divide num_layers=4"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
     "virtual (interleaved) pipeline stages are not supported"),
    (["--sequence-parallel"], "needs tensor parallelism"),
], ids=["world", "layer-boundary", "virtual", "sequence-parallel-without-tp"])
def test_invalid_layouts_are_refused_with_the_fix(tmp_path, flags, capsys, extra, words):
    code = cli.main(["train", *flags, "--save", str(tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and words in err and "Fix:" in err, err
    assert not (tmp_path / "run").exists()
