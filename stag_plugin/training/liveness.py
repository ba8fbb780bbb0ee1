"""A training job that stops when asked, and ends with a name when a rank stops answering.

    stop_signals()   SIGINT and SIGTERM ask the training loop to stop: it finishes the step and
                     the save in progress, then raises errors.Stopped (all ranks at the same
                     iteration); a second signal raises it at once, abandoning a save in
                     progress (its partial folder is removed, the previous checkpoint stays
                     the latest). The command ends with one line saying what was kept, its
                     child processes with it
    Heartbeats       every rank writes the time into the job's key-value store every few
                     seconds from a daemon thread; when a collective fails (a rank died, or
                     stopped answering and the --distributed-timeout-minutes ran out), the ranks
                     whose heartbeat went quiet are the ones named
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Iterator, List

import torch

from stag_plugin.errors import Stopped

HEARTBEAT_SECONDS = 2.0


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
            flag = torch.tensor([signum], dtype=torch.int64)
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


class Heartbeats:
    """This rank's heartbeat in the default process group's store, and everyone's age."""

    def __init__(self):
        from torch.distributed import distributed_c10d

        self.store = distributed_c10d._get_default_store()
        self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="stag-heartbeat", daemon=True)
        self._thread.start()

    @staticmethod
    def key(rank: int) -> str:
        return f"stag_heartbeat/{rank}"

    def _beat(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # the store may be gone at shutdown
                self.store.set(self.key(self.rank), repr(time.time()))
            self._stop.wait(HEARTBEAT_SECONDS)

    def silent(self, for_seconds: float = 5 * HEARTBEAT_SECONDS) -> List[int]:
        """Ranks (this one excluded) with no heartbeat for `for_seconds`."""
        now, quiet = time.time(), []
        for rank in range(self.world):
            if rank == self.rank:
                continue
            try:
                beat = (float(self.store.get(self.key(rank)))
                        if self.store.check([self.key(rank)]) else 0.0)
            except Exception:
                beat = 0.0
            if now - beat > for_seconds:
                quiet.append(rank)
        return quiet

    def stop(self) -> None:
        self._stop.set()
