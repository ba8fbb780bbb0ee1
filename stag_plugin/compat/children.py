"""Child processes that never outlive the command that started them.

Megatron's checkpoint saver keeps its write results in a `multiprocessing.Manager` queue: a
separate server process (and, through it, multiprocessing's resource tracker) that survives a
trainer killed by SIGKILL; its write workers are forked children that can outlive it too.
`saver_results_queue()` gives Megatron a queue whose server process, and every child forked
from then on, asks the kernel (Linux prctl PR_SET_PDEATHSIG) to kill it when its parent dies,
however the parent dies. This module imports nothing heavy: the server process imports it on start.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child process: be killed when the parent process dies (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


_manager = None


def saver_results_queue():
    """A spawn-context Manager queue whose server process dies with this one; from the first
    call on, every forked child (the saver's write workers) dies with this process too."""
    global _manager
    if _manager is None:
        os.register_at_fork(after_in_child=die_with_parent)
        import multiprocessing
        from multiprocessing.managers import SyncManager

        _manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
        _manager.start(initializer=die_with_parent)
    return _manager.Queue()
