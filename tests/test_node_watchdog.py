"""The node watchdog (stag_plugin.training.liveness.Watchdog) on its own: a long healthy step is
not a lost rank, the setting is checked, and the messages name ranks and nodes. Lost ranks and
nodes themselves are tested on real processes in test_liveness.py (a frozen rank) and
test_multinode.py (a node killed or cut off)."""

import time

import pytest
import torch

from stag_plugin.errors import StagError
from stag_plugin.training import liveness

from distributed import run_workers


def _long_step(rank: int, seconds: float) -> None:
    """Rank 0 computes (pure Python, holding the GIL between switches) then sleeps, each for
    longer than the heartbeat timeout, while rank 1 waits in a collective; both then finish."""
    watchdog = liveness.Watchdog(timeout=3 * liveness.HEARTBEAT_SECONDS)
    if rank == 0:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sum(i * i for i in range(10_000))
        time.sleep(seconds)
    torch.distributed.barrier()
    assert watchdog.verdict is None and not watchdog._verdict.is_set()
    watchdog.finish()
    torch.distributed.barrier()


def test_a_long_healthy_step_is_not_a_lost_rank():
    """A watchdog that misjudged would end its process (exit code 2): run_workers raises."""
    run_workers(_long_step, 2, 1, args=(1.5 * 3 * liveness.HEARTBEAT_SECONDS,), timeout=300)


@pytest.mark.parametrize("value, expected", [("", liveness.DEFAULT_TIMEOUT), ("0", 0.0),
                                             ("45", 45.0), ("7.5", 7.5)])
def test_heartbeat_timeout_setting(value, expected, monkeypatch):
    monkeypatch.setenv(liveness.TIMEOUT_ENV, value)
    assert liveness.heartbeat_timeout() == expected


@pytest.mark.parametrize("value, message", [("soon", "is not a number of seconds"),
                                            ("-1", "is not a number of seconds"),
                                            ("2", "shorter than three heartbeats")])
def test_bad_heartbeat_timeout_is_refused(value, message, monkeypatch):
    monkeypatch.setenv(liveness.TIMEOUT_ENV, value)
    with pytest.raises(StagError, match=message):
        liveness.heartbeat_timeout()


def _watchdog(hosts: dict, store_host: str = "node0") -> liveness.Watchdog:
    """A Watchdog's naming part, without a job (no store, no threads)."""
    watchdog = object.__new__(liveness.Watchdog)
    watchdog.hosts, watchdog.store_host, watchdog.host = hosts, store_host, "node1"
    watchdog.phase, watchdog.kept = "iteration 7", lambda: "kept: runs/x/iter_0000006"
    return watchdog


def test_messages_name_the_lost_node_and_ranks():
    hosts = {0: "node0", 1: "node0", 2: "node1", 3: "node1"}
    lost = str(_watchdog(hosts)._lost([2, 3], 21.4))
    assert lost.startswith("node node1 is lost (all its ranks: 2, 3): no heartbeat for 21 s, "
                           "at iteration 7; the job ends. kept: runs/x/iter_0000006. Fix: ")
    assert str(_watchdog(hosts)._lost([1], 18)).startswith(
        "rank 1 stopped answering (on node node0): no heartbeat for 18 s")
    both = str(_watchdog(hosts)._lost([1, 2, 3], 10))
    assert "rank 1 stopped answering (on node node0); node node1 is lost (all its ranks: 2, 3)" \
        in both
    single = {0: "node0", 1: "node1"}
    assert "node node1 is lost (its only rank: 1)" in str(_watchdog(single)._lost([1], 10))
    cut = str(_watchdog(single)._store_lost(22))
    assert cut.startswith("node node0 (rank 0), which holds the job's store (")
    assert "this node (node1) has not reached it for 22 s, at iteration 7" in cut


def test_agree_and_by_node_on_one_rank():
    """One process: agree() returns this rank's own answer; by_node groups hosts."""
    from datetime import timedelta

    assert liveness.agree("x", None, timedelta(seconds=1)) == []
    assert liveness.by_node([(2, "node1", "bad"), (3, "node1", "bad"), (5, "node2", "bad")]) \
        == "node1 (ranks 2, 3): bad; node2 (rank 5): bad"
