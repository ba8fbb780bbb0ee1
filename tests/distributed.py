"""Run a test function on N real processes (spawned), gloo over loopback, with a deadline."""

from __future__ import annotations

import os
import time

import torch
import torch.multiprocessing as mp

from stag_plugin.compat.megatron import free_port


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


def run_command(cmd, timeout: float, env=None, cwd=None):
    """Run `cmd` in its own process group; on the deadline kill the whole group (workers and
    any helper processes they started), so a hung job can never hang pytest.

    Returns (returncode, output). subprocess.run(timeout=...) is not enough: after killing the
    direct child it waits for pipes that surviving grandchildren keep open."""
    import os
    import signal
    import subprocess

    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, cwd=cwd, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise TimeoutError(f"{' '.join(map(str, cmd[:6]))} ... did not finish within {timeout} s; "
                           f"output tail:\n{output[-3000:]}") from None
    finally:
        _kill_group(process.pid)
    return process.returncode, output


def _kill_group(pgid: int) -> None:
    import os
    import signal

    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
