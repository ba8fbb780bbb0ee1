"""Run a test function on N real processes (spawned), gloo over loopback, with a deadline."""

from __future__ import annotations

import os
import time

import torch
import torch.multiprocessing as mp

from stag_plugin.megatron_compat import free_port


def _entry(rank, fn, world_size, port, tensor_parallel, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the ranks share the machine's cores
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel)
    try:
        fn(rank, *args)
    finally:
        parallel_state.destroy_model_parallel()
        torch.distributed.destroy_process_group()


def run_workers(fn, world_size: int, tensor_parallel: int, args=(), timeout: float = 300):
    """Call fn(rank, *args) on `world_size` processes; raise if any fails or the deadline passes."""
    context = mp.start_processes(_entry, args=(fn, world_size, free_port(), tensor_parallel, args),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"distributed test did not finish within {timeout} s")
