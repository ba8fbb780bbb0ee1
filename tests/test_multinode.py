"""Multi-node pretraining on two simulated nodes (tests/cluster_testing.py: network namespaces
node0 and node1, joined by a veth pair), through the shipped launch scripts:

- examples/launch/train_multi_node.sh on each node (torchrun, c10d rendezvous between them):
  PP 2 and DP 2 over the two nodes log the losses of the one-node run of the same world size
  (examples/launch/train_single_node.sh) and save the same checkpoint, bit for bit; so does a
  node0 whose own name resolves to a loopback address (the script finds MASTER_ADDR on its
  interface);
- a node lost mid-run (all its processes SIGKILLed, or its link down so its connections go
  silent) ends the job on the other node within a bounded time, with one line naming the lost
  node and its ranks; the cut-off node ends too;
- a node whose save folder or data cache is not rank 0's fails the job at start-up, named;
- examples/launch/train_slurm.sbatch through a real Slurm (slurm-wlm: slurmctld on node0, one
  slurmd per node): `sbatch --nodes 2` completes with the one-node losses and checkpoint; a
  node killed mid-run fails the job, named.

Heavy (a minute or more each on two cores): they run when STAG_CLUSTER_TESTS=1, which
`make test-cluster` sets (`make test` runs it once). They skip, saying why, when network
namespaces cannot be made (needs root) or slurm-wlm cannot be installed.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

from cluster_testing import Cluster, Slurm, wait_all
from stag_testing import prepared_cache, small_corpus

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "examples" / "launch"
VOCAB = 512
ITERS = 4
RUN_SECONDS = 600  # one tiny launch: ~15 s on an idle 2-core machine, far more when loaded
LOST_WITHIN = 90  # seconds from the fault to the end of the job (HEARTBEAT_TIMEOUT=20)
PORTS = itertools.count(29400)  # a fresh rendezvous port per job (the namespaces are private)

pytestmark = [
    pytest.mark.skipif(os.environ.get("STAG_CLUSTER_TESTS") != "1",
                       reason="the multi-node and Slurm tests run with `make test-cluster` "
                              "(STAG_CLUSTER_TESTS=1)"),
    pytest.mark.timeout(1200),  # a loaded machine: each launch may take minutes
]


@pytest.fixture(scope="module")
def cluster():
    with Cluster() as nodes:
        yield nodes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The corpus, and its data cache prepared once (shared by both nodes)."""
    corpus = small_corpus(tmp_path_factory, "multinode")
    cache, _ = prepared_cache(tmp_path_factory, corpus, VOCAB)
    return corpus, cache


def launch_env(out: Path, corpus: Path, **extra) -> dict:
    """The environment of a launch script: the tiny model, ITERS steps, losses logged."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
           and not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               OMP_NUM_THREADS="1", MODEL="tiny", TRAIN_ITERS=str(ITERS), LOG_INTERVAL="1",
               EVAL_INTERVAL="1000", EVAL_ITERS="1", SAVE_INTERVAL="1000",
               DATA_PATH=str(corpus), VOCAB_SIZE=str(VOCAB), SAVE_DIR=str(out / "save"),
               HEARTBEAT_TIMEOUT="20", DISTRIBUTED_TIMEOUT_MINUTES="5", REPO_DIR=str(REPO))
    env.update(extra)
    return env


def trainer_flags(out: Path, cache: Path) -> list:
    return ["--data-cache-dir", str(cache), "--valid-fraction", "0.2", "--test-fraction", "0.2",
            "--metrics-log", str(out / "metrics.jsonl"), "--no-progress"]


def losses(out: Path) -> dict:
    """{iteration: training loss} and {"valid": the final validation loss}."""
    path = out / "metrics.jsonl"
    assert path.is_file(), f"no {path}"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    found = {r["iteration"]: r["loss"] for r in records if "loss" in r and "split" not in r}
    found.update(valid=[r["loss"] for r in records if r.get("split") == "valid"][-1])
    return found


def log_of(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def checkpoint(out: Path) -> dict:
    """Every tensor of the run's last checkpoint (model, optimizer), by name."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    save = out / "save"
    folder = save / f"iter_{int((save / 'latest_checkpointed_iteration.txt').read_text()):07d}"
    dcp_to_torch_save(folder, out / "checkpoint.pt")
    tensors = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, torch.Tensor):
            tensors[prefix] = value

    walk("", torch.load(out / "checkpoint.pt", weights_only=False))  # (this test's own file)
    return tensors


def same_tensors(got: dict, expected: dict) -> None:
    import torch

    assert sorted(got) == sorted(expected) and len(got) > 100
    different = [name for name in got if not torch.equal(got[name], expected[name])]
    assert not different, different[:10]


def one_node(out: Path, data, **env) -> dict:
    """train_single_node.sh, two processes on this machine: the reference losses."""
    import subprocess

    corpus, cache = data
    out.mkdir(parents=True)
    result = subprocess.run(
        ["bash", str(LAUNCH / "train_single_node.sh"), *trainer_flags(out, cache)],
        env=launch_env(out, corpus, GPUS_PER_NODE="2", **env), cwd=REPO,
        capture_output=True, text=True, timeout=RUN_SECONDS)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return {"losses": losses(out), "checkpoint": checkpoint(out)}


def two_nodes(cluster: Cluster, out: Path, data, private: tuple = ({}, {}), **env) -> list:
    """train_multi_node.sh on node0 and node1 (one process each), started; their Popen."""
    corpus, cache = data
    out.mkdir(parents=True, exist_ok=True)
    full = launch_env(out, corpus, **{"NNODES": "2", "GPUS_PER_NODE": "1",
                                      "MASTER_ADDR": "node0", "MASTER_PORT": str(next(PORTS)),
                                      "JOB_ID": out.name, **env})
    return [cluster.start(node, ["bash", LAUNCH / "train_multi_node.sh",
                                 *trainer_flags(out, cache)],
                          out / f"node{node}.log", env=full, cwd=REPO, private=private[node])
            for node in (0, 1)]


def finished(cluster: Cluster, out: Path, jobs: list, seconds: float = RUN_SECONDS) -> list:
    try:
        return wait_all(jobs, seconds)
    except TimeoutError:
        raise AssertionError(f"the job did not end within {seconds} s:\n" + logs(out)) from None


def logs(out: Path) -> str:
    return "\n".join(f"--- {p.name}\n{log_of(p)[-3000:]}" for p in sorted(out.glob("*.log")))


def wait_for_steps(out: Path, jobs: list, steps: int, seconds: float = RUN_SECONDS) -> None:
    """Until the metrics log holds `steps` training records (the job is training)."""
    deadline = time.monotonic() + seconds
    path = out / "metrics.jsonl"
    while not (path.is_file() and len(path.read_text().splitlines()) >= steps):
        assert all(job.poll() is None for job in jobs), "a node ended early:\n" + logs(out)
        assert time.monotonic() < deadline, "no training steps:\n" + logs(out)
        time.sleep(0.2)


def error_lines(text: str) -> list:
    return [line for line in text.splitlines() if "stag train: error:" in line]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """The one-node losses of PP 2 and of DP 2 (two processes each)."""
    root = tmp_path_factory.mktemp("one-node")
    return {"pp2": one_node(root / "pp2", data, PP="2"), "dp2": one_node(root / "dp2", data)}


# ---------------------------------------------------------------------------------------------
# torchrun on two nodes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, env", [("pp2", {"PP": "2"}), ("dp2", {})])
def test_two_nodes_give_the_one_node_losses(cluster, data, reference, tmp_path, layout, env):
    out = tmp_path / layout
    jobs = two_nodes(cluster, out, data, **env)
    assert finished(cluster, out, jobs) == [0, 0], logs(out)
    got = losses(out)
    assert sorted(k for k in got if k != "valid") == list(range(1, ITERS + 1))
    assert got == reference[layout]["losses"], (got, reference[layout])  # bit for bit
    same_tensors(checkpoint(out), reference[layout]["checkpoint"])  # weights and Adam state
    pp = int(env.get("PP", "1"))
    assert f"TP=1 PP={pp} DP={2 // pp}" in log_of(out / "node0.log")


def test_rendezvous_host_found_by_its_address(cluster, data, reference, tmp_path):
    """On node0 its own name resolves to 127.0.1.1 (as Debian's /etc/hosts has it) and
    MASTER_ADDR is its routable address: torchrun's guess would make both agents clients of a
    store nobody hosts; the script finds the address on node0's interface and says is_host=1."""
    hosts = Path(f"/etc/netns/{cluster.namespaces[0]}/hosts")
    saved = hosts.read_text()
    hosts.write_text(f"127.0.1.1 node0\n{saved}")  # the first match wins
    try:
        out = tmp_path / "by-address"
        jobs = two_nodes(cluster, out, data, MASTER_ADDR=cluster.addresses[0],
                         GLOO_SOCKET_IFNAME="eth0")  # (gloo too would pick 127.0.1.1)
        assert finished(cluster, out, jobs) == [0, 0], logs(out)
    finally:
        hosts.write_text(saved)
    assert losses(out) == reference["dp2"]["losses"]


def test_killed_node_ends_the_job_naming_it(cluster, data, tmp_path):
    """Two ranks per node (PP 2 x DP 2); node1 dies: one line on node0 names it, both ranks."""
    out = tmp_path / "kill"
    jobs = two_nodes(cluster, out, data, TRAIN_ITERS="100000", GPUS_PER_NODE="2", PP="2")
    wait_for_steps(out, jobs, 3)
    cluster.kill_node(1)  # every process of node1 at once: its connections close
    killed = time.monotonic()
    finished(cluster, out, jobs[:1], LOST_WITHIN)
    elapsed = time.monotonic() - killed
    node0 = log_of(out / "node0.log")
    named = error_lines(node0)
    assert len(named) == 1, node0[-4000:]
    assert "node node1 is lost (all its ranks: 2, 3)" in named[0], named[0]
    assert jobs[0].returncode != 0
    print(f"node1 killed: node0's job ended {elapsed:.1f} s later")


def test_node_cut_off_ends_both_sides_naming_the_other(cluster, data, tmp_path):
    """node0 (the rendezvous and store host) loses its link: nothing is closed, so only the
    heartbeats tell. node0 names node1, node1 names node0 (the store's node); both end."""
    out = tmp_path / "link"
    jobs = two_nodes(cluster, out, data, TRAIN_ITERS="100000")
    wait_for_steps(out, jobs, 3)
    cluster.link_down(0)
    cut = time.monotonic()
    try:
        finished(cluster, out, jobs, LOST_WITHIN)
    finally:
        cluster.link_up(0)
    elapsed = time.monotonic() - cut
    node0, node1 = log_of(out / "node0.log"), log_of(out / "node1.log")
    assert [line for line in error_lines(node0) if "node node1 is lost" in line], node0[-4000:]
    named = [line for line in error_lines(node1) if "node node0 (rank 0), which holds the "
             "job's store" in line]
    assert len(named) == 1, node1[-4000:]
    assert jobs[0].returncode != 0 and jobs[1].returncode != 0
    print(f"node0 cut off: both nodes ended {elapsed:.1f} s later")


def test_unshared_save_and_cache_fail_at_start_naming_the_node(cluster, data, tmp_path):
    """node1 sees its own empty folders where rank 0's save folder and data cache are."""
    out = tmp_path / "unshared"
    corpus, cache = data
    alone = {}
    for name in ("save", "cache"):
        (tmp_path / f"node1-{name}").mkdir()
        alone[name] = tmp_path / f"node1-{name}"
    (out / "save").mkdir(parents=True)
    jobs = two_nodes(cluster, out, data, private=(
        {}, {out / "save": alone["save"], cache: alone["cache"]}))
    codes = finished(cluster, out, jobs)
    assert codes[0] != 0 and codes[1] != 0
    node0 = log_of(out / "node0.log")
    named = error_lines(node0)
    assert len(named) == 1, node0[-4000:]
    assert "the nodes do not share the job's folders with rank 0 (on node0): node1 (rank 1): " \
           f"does not see rank 0's --save folder {out / 'save'} and holds no prepared data " \
           f"in --data-cache-dir {cache}" in named[0], named[0]
    assert not (out / "metrics.jsonl").exists()  # nothing trained
    assert not list(alone["save"].iterdir()) and not list(alone["cache"].iterdir())


def test_other_data_in_a_node_cache_is_refused(cluster, data, tmp_path, tmp_path_factory):
    """node1's own cache holds data prepared from another corpus (a stale copy)."""
    out = tmp_path / "stale"
    corpus, cache = data
    other = small_corpus(tmp_path_factory, "other")
    for path in sorted(other.iterdir())[20:]:
        path.unlink()  # another corpus: half of it
    stale, _ = prepared_cache(tmp_path_factory, other, VOCAB)
    jobs = two_nodes(cluster, out, data, private=({}, {cache: stale}))
    codes = finished(cluster, out, jobs)
    assert codes[0] != 0 and codes[1] != 0
    node0 = log_of(out / "node0.log")
    named = error_lines(node0)
    assert len(named) == 1, node0[-4000:]
    assert re.search(r"the nodes do not all read the data rank 0 prepared: node1 \(rank 1\): "
                     r"its --data-cache-dir \S+ holds other prepared data \(key \w{12}, rank "
                     r"0's \w{12}\)", named[0]), named[0]


# ---------------------------------------------------------------------------------------------
# Slurm
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm(cluster, tmp_path_factory):
    with Slurm(cluster, tmp_path_factory.mktemp("slurm")) as running:
        yield running


def submit(slurm: Slurm, out: Path, data, *sbatch: str, **env) -> int:
    corpus, cache = data
    out.mkdir(parents=True)
    return slurm.sbatch(
        ["--nodes", "2", "--gpus-per-node=0", "--cpus-per-task=1", "--job-name", out.name,
         f"--output={out}/slurm-%j.log", *sbatch, LAUNCH / "train_slurm.sbatch",
         *trainer_flags(out, cache)],
        env=launch_env(out, corpus, MASTER_PORT=str(next(PORTS)), **env), cwd=REPO)


def test_slurm_two_nodes_give_the_one_node_losses(slurm, data, reference, tmp_path):
    out = tmp_path / "sbatch"
    job = submit(slurm, out, data)
    state = slurm.wait(job, RUN_SECONDS)
    assert state == "COMPLETED", f"{state}\n{logs(out)}\n{slurm.logs()}"
    assert losses(out) == reference["dp2"]["losses"]
    same_tensors(checkpoint(out), reference["dp2"]["checkpoint"])
    text = log_of(next(out.glob("slurm-*.log")))
    assert "TP=1 PP=1 DP=2" in text and "no GPU on node0: GPUS_PER_NODE=1" in text


def test_slurm_lost_node_fails_the_job_naming_it(slurm, cluster, data, tmp_path):
    """node1 dies (its slurmd with it) mid-run: node0's trainer names it within seconds, and
    the job fails once slurmctld has marked node1 down (SlurmdTimeout=30 here). Without
    --no-requeue, Slurm would requeue the job, which then resumes from SAVE_DIR."""
    out = tmp_path / "sbatch-kill"
    job = submit(slurm, out, data, "--no-requeue", TRAIN_ITERS="100000")
    wait_for(lambda: len(_lines(out / "metrics.jsonl")) >= 3, RUN_SECONDS,
             lambda: logs(out) + slurm.logs())
    cluster.kill_node(1)  # the job's processes and slurmd: the node is gone
    killed = time.monotonic()
    wait_for(lambda: error_lines(logs(out)), LOST_WITHIN, lambda: logs(out))
    named = time.monotonic() - killed
    try:
        state = slurm.wait(job, LOST_WITHIN)
    except TimeoutError as err:
        raise AssertionError(f"{err}\n{logs(out)}\n{slurm.logs()}") from None
    ended = time.monotonic() - killed
    assert state in ("FAILED", "NODE_FAIL", "CANCELLED"), state
    lines = error_lines(logs(out))
    assert len(lines) == 1 and "node node1 is lost (its only rank: 1)" in lines[0], logs(out)
    print(f"node1 killed under Slurm: named after {named:.1f} s, job {state} after "
          f"{ended:.1f} s")


def _lines(path: Path) -> list:
    return path.read_text().splitlines() if path.is_file() else []


def wait_for(condition, seconds: float, describe) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for it:\n{describe()}"
        time.sleep(0.5)


def test_cleanup_leaves_nothing(tmp_path):
    """A cluster's namespaces and /etc/netns entries are gone after it closes."""
    with Cluster() as nodes:
        names = list(nodes.namespaces)
        nodes.start(0, ["sleep", "600"], tmp_path / "sleep.log")
    listed = __import__("subprocess").run(["ip", "netns", "list"], capture_output=True,
                                          text=True).stdout
    assert not [n for n in names if n in listed]
    assert not [n for n in names if Path("/etc/netns", n).exists()]
    assert shutil.which("ip")
