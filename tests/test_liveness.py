"""Bounded failure: SIGTERM stops training with one line saying what was kept, and no child
process outlives `stag train` (also after SIGKILL); a frozen rank ends a multi-rank job within
the distributed timeout plus torchrun's shutdown, with one message naming the rank."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from stag_plugin.compat.megatron import free_port

from stag_testing import small_corpus, tiny_train_flags

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flags(tmp_path_factory) -> list:
    corpus = small_corpus(tmp_path_factory, "liveness")
    return [*tiny_train_flags(corpus, tmp_path_factory.mktemp("data"), 512),
            "--micro-batch-size", "2", "--eval-interval", "1000", "--train-iters", "100000",
            "--save-interval", "2"]


def start(argv: list, env_extra: dict = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items()  # (this process's own single-rank world)
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(predicate, seconds: float, process: subprocess.Popen) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.2)


def descendants(pid: int) -> list:
    return psutil.Process(pid).children(recursive=True)


def training_ranks(pid: int) -> dict:
    """The `stag_plugin` rank processes under `pid`, by RANK; short-lived helper processes that
    exit while being read are skipped."""
    ranks = {}
    for process in descendants(pid):
        try:
            rank, command = process.environ().get("RANK"), " ".join(process.cmdline())
        except psutil.Error:
            continue
        if rank is not None and "stag_plugin" in command:
            ranks[rank] = process
    return ranks


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def gone(processes: list, seconds: float = 10.0) -> list:
    """The processes still alive after `seconds`."""
    _, alive = psutil.wait_procs(processes, timeout=seconds)
    return alive


def trainer_with_a_checkpoint(flags: list, save: Path):
    """`stag train` started, and running with its first checkpoint saved; its children."""
    trainer = start(["-m", "stag_plugin", "train", *flags, "--save", str(save)])
    wait_for(lambda: (save / "latest_checkpointed_iteration.txt").exists(), 240, trainer)
    return trainer, descendants(trainer.pid)


def test_sigterm_stops_training_cleanly(tmp_path, flags):
    save = tmp_path / "run"
    trainer, children = trainer_with_a_checkpoint(flags, save)
    try:
        assert children, "the checkpoint saver's process was expected"
        trainer.send_signal(signal.SIGTERM)
        output, _ = trainer.communicate(timeout=120)
        assert trainer.returncode == 128 + signal.SIGTERM, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        lines = [line for line in output.splitlines() if line.startswith("stag train: SIGTERM:")]
        assert len(lines) == 1 and "kept: " in lines[0] and str(save) in lines[0], output[-2000:]
        assert not gone(children), "a child process outlived stag train"
        assert not list(save.glob("*.incomplete"))
    finally:
        kill_group(trainer)


def test_sigkill_takes_the_saver_process_with_it(tmp_path, flags):
    trainer, children = trainer_with_a_checkpoint(flags, tmp_path / "run")
    try:
        trainer.send_signal(signal.SIGKILL)
        trainer.communicate(timeout=60)
        assert not gone(children), "a child process outlived the killed trainer"
    finally:
        kill_group(trainer)


def test_a_frozen_rank_ends_the_job_naming_it(tmp_path, flags):
    """Two data-parallel ranks; rank 1 is frozen (SIGSTOP) mid-run. The job ends within the
    distributed timeout (here 0.3 minutes) plus torchrun's shutdown, and one line names rank 1."""
    save = tmp_path / "run"
    job = start(["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                 str(free_port()), "-m", "stag_plugin", "train", *flags, "--save", str(save),
                 "--distributed-timeout-minutes", "0.3", "--global-batch-size", "4"])
    frozen = None
    try:
        wait_for(lambda: (save / "latest_checkpointed_iteration.txt").exists(), 300, job)
        frozen = training_ranks(job.pid)["1"]
        frozen.send_signal(signal.SIGSTOP)
        stopped_at = time.time()
        output, _ = job.communicate(timeout=240)
        elapsed = time.time() - stopped_at
        named = [line for line in output.splitlines() if "stopped answering" in line]
        assert len(named) == 1 and "rank 1 stopped answering" in named[0], output[-4000:]
        assert named[0].lstrip("[default0]:").startswith("stag train: error: "), named[0]
        assert elapsed < 0.3 * 60 + 90, elapsed
    finally:
        if frozen is not None:
            with __import__("contextlib").suppress(psutil.Error):
                frozen.send_signal(signal.SIGKILL)
        kill_group(job)
