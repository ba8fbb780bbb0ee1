"""A training job that stops when asked, and ends with a name when a rank or a node is lost.

    stop_signals()   SIGINT and SIGTERM ask the training loop to stop: it finishes the step and
                     the save in progress, then raises errors.Stopped (all ranks at the same
                     iteration); a second signal raises it at once, abandoning a save in
                     progress (its partial folder is removed, the previous checkpoint stays
                     the latest). The command ends with one line saying what was kept, its
                     child processes with it
    Watchdog         every rank of a multi-rank job writes a heartbeat (a counter) into the
                     job's key-value store every HEARTBEAT_SECONDS from a daemon thread, so
                     long steps (a slow save, rank 0 preparing the data) keep beating. One rank
                     per node (local rank 0) watches everyone's heartbeat: ranks whose counter
                     has not moved for STAG_HEARTBEAT_TIMEOUT seconds (default 60; 0: no
                     watching) end the job with one line naming them, their node, and whether
                     the whole node is gone; the other ranks follow within a heartbeat. A node
                     that cannot reach the store for that long says so, naming the node that
                     holds it, and ends there, its torchrun agent with it (the agent would wait
                     on the store for good). When a collective fails (a peer's connections
                     closed), the rank waits up to CONFIRM_SECONDS for the heartbeats to tell
                     which ranks are gone, and names them instead of showing the backend's
                     error. A rank that fails on its own says so in the store, so its peers end
                     quietly
    agree()          a check each rank makes (e.g. "does this node see rank 0's --save
                     folder?") gathered on rank 0, whose verdict every rank reads: a job-wide
                     error raised on every rank and printed once
    Ages are measured on each watcher's own clock (how long a counter has not changed), so the
    nodes' clocks need not agree.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from typing import Callable, Iterator, Optional

import torch

from stag_plugin.errors import StagError, Stopped

HEARTBEAT_SECONDS = 2.0
TIMEOUT_ENV = "STAG_HEARTBEAT_TIMEOUT"
DEFAULT_TIMEOUT = 60.0  # seconds without a heartbeat before a rank counts as lost
CONFIRM_SECONDS = 5 * HEARTBEAT_SECONDS  # after a failed collective: quiet this long = lost
STORE_OP_SECONDS = 10.0  # the watchdog's own store connection gives up an operation after this
EXIT_CODE = 2  # a job ended by the watchdog exits as a StagError does
DONE = b"done"  # the heartbeat of a rank that has finished


class StopRequest:
    """The first SIGINT / SIGTERM is remembered (`check` raises it at the next step boundary);
    a second one raises Stopped at once."""

    def __init__(self):
        self.signum = 0

    def __call__(self, signum, frame) -> None:
        if self.signum:
            raise Stopped(signum)
        self.signum = signum

    def check(self) -> None:
        """Raise Stopped if any rank was asked to stop (a collective when there are several)."""
        signum = self.signum
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            on_gpu = torch.distributed.get_backend() == "nccl"  # (NCCL reduces GPU tensors)
            flag = torch.tensor([signum], dtype=torch.int64,
                                device=torch.cuda.current_device() if on_gpu else "cpu")
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            raise Stopped(signum)


@contextlib.contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Within (main thread only): SIGINT / SIGTERM are StopRequests."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def heartbeat_timeout() -> float:
    """STAG_HEARTBEAT_TIMEOUT: seconds a rank may stay quiet before the job ends (0: never)."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise StagError(f"{TIMEOUT_ENV}={text!r} is not a number of seconds",
                        f"set it to a number >= {3 * HEARTBEAT_SECONDS:.0f} (default "
                        f"{DEFAULT_TIMEOUT:.0f}), or 0 to switch the node watchdog off")
    if 0 < value < 3 * HEARTBEAT_SECONDS:
        raise StagError(f"{TIMEOUT_ENV}={text} s is shorter than three heartbeats "
                        f"({3 * HEARTBEAT_SECONDS:.0f} s): a healthy rank would count as lost",
                        f"set at least {3 * HEARTBEAT_SECONDS:.0f}")
    return value


def _ranks(ranks) -> str:
    ranks = sorted(ranks)
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def _default_store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _get_many(store, keys: list) -> list:
    if not keys:
        return []
    if hasattr(store, "multi_get"):  # one round trip
        return store.multi_get(keys)
    return [store.get(key) for key in keys]


def _store_is_here() -> bool:
    """Whether the job's store (MASTER_ADDR) is on this machine."""
    address = os.environ.get("MASTER_ADDR")
    if not address:
        return torch.distributed.get_rank() == 0
    try:
        from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname

        return _matches_machine_hostname(address)
    except Exception:
        return address == socket.gethostname()


class Watchdog:
    """This rank's heartbeat, and (one rank per node, or any rank once a collective failed) the
    watch over everyone's. `kept()` says what the job keeps (its last checkpoint), for the
    message; `phase` says where the job is ("start-up", "iteration 7")."""

    def __init__(self, kept: Callable[[], str] = lambda: "", timeout: Optional[float] = None,
                 prog: str = "stag train"):
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.timeout = heartbeat_timeout() if timeout is None else timeout
        self.kept, self.prog, self.phase = kept, prog, "start-up"
        base = _default_store()
        if hasattr(base, "clone"):
            # its own connection (a store client is not shared between threads), with a short
            # operation timeout (an operation on a silent connection may still block: the
            # judge thread below watches the clock)
            self.store = base.clone()
            with contextlib.suppress(Exception):
                self.store.set_timeout(timedelta(seconds=STORE_OP_SECONDS))
        else:  # a torch without Store.clone: the job's own connection, timeout unchanged
            self.store = base
        self.prefix = f"stag_liveness/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID"))
        self.watcher = local is None or local == "0"
        self.host = socket.gethostname()
        self.store.set(self._key("host", self.rank), json.dumps(
            {"host": self.host, "store": _store_is_here()}))
        self.hosts: Optional[dict] = None  # rank -> host, once every rank has published it
        self.store_host: Optional[str] = None
        with contextlib.suppress(Exception):  # every rank is starting now: read the table
            self.store.wait([self._key("host", r) for r in range(self.world)],
                            timedelta(seconds=max(self.timeout, DEFAULT_TIMEOUT)))
            self._read_hosts()
        self._count = 0
        self._seen: dict = {}  # rank -> (counter value, monotonic time it last changed)
        self._since = time.monotonic()  # start of watching: the age of a never-seen rank
        self._last_ok = time.monotonic()  # the end of the last round that reached the store
        self._store_failing = False  # no round has reached the store for too long
        self._store_broken = False  # a store operation failed (the connection is gone)
        self._suspect = threading.Event()  # a collective failed: watch everyone, briefly
        self._waiting = threading.Event()  # the main thread waits for the verdict (explain)
        self._alive = threading.Event()  # since then, every other rank's heartbeat moved
        self._baseline: Optional[dict] = None  # the heartbeats when the collective failed
        self._verdict = threading.Event()
        self._lock = threading.Lock()
        self.verdict: Optional[StagError] = None  # ranks lost (None: aborted by another rank)
        self.aborted: Optional[str] = None  # the abort note another rank left in the store
        self._stop = threading.Event()
        # two threads: one talks to the store (an operation on a silent connection may block
        # for good), the other only looks at the clock and ends the job when the first is stuck
        for target, name in ((self._run, "stag-heartbeat"), (self._judge, "stag-watchdog")):
            threading.Thread(target=target, name=name, daemon=True).start()

    def _key(self, kind: str, rank: Optional[int] = None) -> str:
        return self.prefix + kind + ("" if rank is None else f"/{rank}")

    # -------------------------------------------------------------------- the thread

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._store_broken:  # a client does not reconnect: one error is final
                try:
                    self._tick()
                    self._last_ok = time.monotonic()
                except Exception:
                    self._store_broken = True  # the judge ends the job (torch said why)
            if self._verdict.is_set() and not self._waiting.is_set():
                self._end()  # the main thread is not waiting for the verdict: end here
            self._stop.wait(HEARTBEAT_SECONDS)

    def _judge(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            silent = time.monotonic() - self._last_ok  # every rank watches its own link
            limit = CONFIRM_SECONDS if self._store_broken else self._limit()
            if (self.timeout > 0 or self._suspect.is_set()) and \
                    silent > limit + HEARTBEAT_SECONDS:
                self._store_failing = True
                self._decide(self._store_lost(silent))
            if self._verdict.is_set() and not self._waiting.is_set():
                self._end()

    def _watching(self) -> bool:
        return self._suspect.is_set() or (self.watcher and self.timeout > 0)

    def _limit(self) -> float:
        return CONFIRM_SECONDS if self._suspect.is_set() else self.timeout

    def _tick(self) -> None:
        self._count += 1
        self.store.set(self._key("beat", self.rank), str(self._count))
        if self.store.check([self._key("abort")]):
            self.aborted = self.store.get(self._key("abort")).decode(errors="replace")
            self._decide(None)
            return
        if self.hosts is None:
            self._read_hosts()
        if not self._watching() or self._verdict.is_set():
            return
        now = time.monotonic()
        others = [r for r in range(self.world) if r != self.rank]
        for rank in [r for r in others if r not in self._seen]:
            if self.store.check([self._key("beat", rank)]):
                self._seen[rank] = (None, self._since)
        known = [r for r in others if r in self._seen]
        for rank, value in zip(known, _get_many(self.store, [self._key("beat", r) for r in known])):
            if value != self._seen[rank][0]:
                self._seen[rank] = (value, now)
        ages = {r: now - self._seen.get(r, (None, self._since))[1] for r in others
                if self._seen.get(r, (None,))[0] != DONE}  # a rank that finished is not lost
        if self._suspect.is_set():
            current = {r: self._seen.get(r, (None,))[0] for r in ages}
            if self._baseline is None:
                self._baseline = current
            elif all(value is not None and value != self._baseline.get(r)
                     for r, value in current.items()):
                self._alive.set()  # nobody is lost: this rank's error is its own
        if ages and max(ages.values()) > self._limit():  # lost; with it, the ranks that went
            near = max(self._limit() / 2, 3 * HEARTBEAT_SECONDS)  # quiet with it (a node's
            quiet = [r for r, age in ages.items() if age > near]  # beats are out of phase)
            self._decide(self._lost(quiet, max(ages.values())))

    def _read_hosts(self) -> None:
        keys = [self._key("host", r) for r in range(self.world)]
        if not self.store.check(keys):
            return
        table = [json.loads(v) for v in _get_many(self.store, keys)]
        self.hosts = {rank: entry["host"] for rank, entry in enumerate(table)}
        self.store_host = next((e["host"] for e in table if e["store"]), None)

    # -------------------------------------------------------------------- verdicts

    def _nodes(self, ranks: list) -> str:
        """'node node1 is lost (all its ranks: 2, 3)', or 'rank 1 stopped answering (on node
        node0)' when the node's other ranks still answer."""
        if self.hosts is None:
            return f"{_ranks(ranks)} stopped answering (their nodes are not known yet)"
        parts = []
        for host in sorted({self.hosts[r] for r in ranks}):
            on_host = [r for r in self.hosts if self.hosts[r] == host]
            lost = [r for r in ranks if self.hosts[r] == host]
            if lost == on_host:
                which = "its only rank" if len(lost) == 1 else "all its ranks"
                parts.append(f"node {host} is lost ({which}: {', '.join(map(str, lost))})")
            else:
                parts.append(f"{_ranks(lost)} stopped answering (on node {host})")
        return "; ".join(parts)

    def _lost(self, quiet: list, age: float) -> StagError:
        return StagError(
            f"{self._nodes(quiet)}: no heartbeat for {age:.0f} s, at {self.phase}; the job "
            f"ends. {self.kept()}", "check the node named (its processes, memory, network "
            "link), then resume with the same command")

    def _store_lost(self, age: float) -> StagError:
        address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        host = self.store_host
        ranks = [r for r, h in (self.hosts or {}).items() if h == host]
        where = (f"node {host} ({_ranks(ranks)}), which holds the job's store ({address}), "
                 f"is lost or cut off" if host and ranks
                 else f"the job's store ({address}) is lost or cut off")
        return StagError(f"{where}: this node ({self.host}) has not reached it for {age:.0f} s, "
                         f"at {self.phase}; the job ends here (this node's torchrun with it). "
                         f"{self.kept()}",
                         "check that node (its processes, network link), then resume with the "
                         "same command")

    def _decide(self, verdict: Optional[StagError]) -> None:
        """Record the verdict (None: another rank ended the job) and, when it is this rank's,
        claim the job's one report (the first rank to write the abort note prints)."""
        if self._verdict.is_set():
            return
        if verdict is not None and self._store_failing:
            verdict.report = False  # nobody else can be told: each cut-off node says it here
            if self.watcher:
                print(f"{self.prog}: error: {verdict}", file=sys.stderr, flush=True)
                if "TORCHELASTIC_RUN_ID" in os.environ and not self._store_broken:
                    with contextlib.suppress(OSError):  # this node's torchrun agent waits
                        os.kill(os.getppid(), signal.SIGKILL)  # on the silent store for good
        elif verdict is not None:
            verdict.report = False
            with contextlib.suppress(Exception):
                note = f"{self.prog}: error: {verdict}"
                won = self.store.compare_set(self._key("abort"), "", note)
                verdict.report = (won.decode(errors="replace") if isinstance(won, bytes)
                                  else won) == note
        with self._lock:
            if not self._verdict.is_set():
                self.verdict = verdict
                self._verdict.set()

    def _end(self) -> None:
        """End this process now (the main thread may be stuck in a collective)."""
        if not self._lock.acquire(blocking=False):
            return  # the other thread is ending it
        if self.verdict is not None and self.verdict.report:
            print(f"{self.prog}: error: {self.verdict}", file=sys.stderr, flush=True)
        elif self.verdict is None:
            time.sleep(HEARTBEAT_SECONDS)  # let a failing rank's own message come out first
        if self._stop.is_set():
            return  # the main thread is ending the process itself
        sys.stderr.flush()
        os._exit(EXIT_CODE)

    # -------------------------------------------------------------------- main thread

    def explain(self, error: BaseException) -> Optional[StagError]:
        """After `error` left the training loop: the lost ranks behind it (a StagError to raise,
        reported by one rank), a quiet StagError when another rank ended the job, or None when
        no rank is lost (this rank failed on its own: the others are told so)."""
        self._waiting.set()
        self._since = time.monotonic()
        self._suspect.set()
        deadline = self._since + CONFIRM_SECONDS + 3 * HEARTBEAT_SECONDS + STORE_OP_SECONDS
        while not (self._verdict.is_set() or self._alive.is_set()) and \
                time.monotonic() < deadline:
            self._verdict.wait(0.2)
        if self._verdict.is_set():
            if self.verdict is not None:
                return self.verdict
            quiet = StagError(f"ended by another rank: {self.aborted}", "see that message")
            quiet.report = False
            return quiet
        self.fail(error)
        return None

    def fail(self, error: BaseException) -> None:
        """Tell the other ranks that this one failed on its own (they end quietly); this rank
        ends by itself."""
        with contextlib.suppress(Exception):
            _default_store().compare_set(
                self._key("abort"), "", f"rank {self.rank} on {self.host} failed: {error}"[:2000])
        self._stop.set()

    def finish(self) -> None:
        """This rank is done: its peers stop watching it."""
        self._stop.set()
        with contextlib.suppress(Exception):
            _default_store().set(self._key("beat", self.rank), DONE)

    def stop(self) -> None:
        self._stop.set()


def agree(name: str, problem: Optional[str], timeout: timedelta) -> list:
    """Every rank's answer to check `name` (`problem`: None when fine), gathered by rank 0 in
    the job's store; returns [(rank, host, problem)] of the ranks with a problem, the same list
    on every rank. A single rank returns its own."""
    host = socket.gethostname()
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return [] if problem is None else [(0, host, problem)]
    store, rank = _default_store(), torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    prefix = f"stag_agree/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{name}/"
    store.set(f"{prefix}{rank}", json.dumps([host, problem]))
    if rank == 0:
        keys = [f"{prefix}{r}" for r in range(world)]
        store.wait(keys, timeout)
        answers = [json.loads(v) for v in _get_many(store, keys)]
        bad = [(r, h, p) for r, (h, p) in enumerate(answers) if p is not None]
        store.set(f"{prefix}verdict", json.dumps(bad))
        return bad
    store.wait([f"{prefix}verdict"], timeout)
    return [tuple(entry) for entry in json.loads(store.get(f"{prefix}verdict"))]


def by_node(bad: list) -> str:
    """'node1 (ranks 2, 3): <problem>; node2 (rank 4): <problem>' from agree()'s list."""
    groups: dict = {}
    for rank, host, problem in bad:
        groups.setdefault((host, problem), []).append(rank)
    return "; ".join(f"{host} ({_ranks(ranks)}): {problem}"
                     for (host, problem), ranks in groups.items())


def quiet_ranks_error(error: StagError) -> StagError:
    """`error` printed by rank 0 only (every rank raises it)."""
    error.report = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    return error


