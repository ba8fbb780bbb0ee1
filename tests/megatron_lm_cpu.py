"""Megatron-LM's training scripts on CPU processes, for tests only.

    python tests/megatron_lm_cpu.py SCRIPT [Megatron-LM flags ...]

runs SCRIPT (Megatron-LM's pretrain_gpt.py, a patched copy of it, or
examples/megatron_lm/pretrain_stag.py) as `__main__` in this process, one rank of a gloo job
(env: RANK, WORLD_SIZE, MASTER_PORT; MEGATRON_LM_PATH, the checkout whose `megatron.training`
is used, else the one megatron-core >= 0.19 installs). `launch()` starts the ranks and
returns their logs. With STAG_TEST_LOGITS=PATH, the last rank saves the trained model's logits
on a fixed batch there (`{"tokens": [2, s], "logits": [2, s, vocab]}`, pipeline size 1 only).
With STAG_TEST_NO_REPLICA_SYNC=1 the plugin's pipeline-replica gradient sum is left out (to show
that a test of it can fail).

Megatron-LM's `pretrain()` needs CUDA. These test-only stubs let it run on CPU; what they
replace is what only a GPU run covers (docs/megatron_lm.md):

 1. `typing.override` from typing_extensions (Megatron-LM 0.19's files need Python 3.12).
 2. Megatron-LM's training modules see a torch whose CUDA tensors are CPU tensors, whose streams
    and events do nothing, whose CUDA RNG state is the CPU's and whose memory statistics are
    zero; `Module.cuda()` / `Tensor.cuda()` leave tensors where they are.
 3. `initialize_megatron(allow_no_cuda=True)`; torch.distributed (gloo) and Megatron's model
    parallel groups are set up before it (Megatron-LM skips its own set-up without GPUs), and
    Megatron's RNG tracker forks the CPU generator (stag_plugin.compat.cpu).
 4. No compilation of Megatron's dataset helpers (megatron-core ships them compiled) or of its
    CUDA fused kernels, and no JIT-fusion warm-up (CUDA kernels).
Megatron-Core's own CUDA spots are adapted by stag_plugin.compat.cpu, as in `stag train`.
"""

from __future__ import annotations

import functools
import os
import re
import runpy
import subprocess
import sys
import types
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
LOSS_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.E+-]+) \|")
GRAD_LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| grad norm: ([0-9.E+-]+) \|")
VALID_LINE = re.compile(r"on validation set \| lm loss value: ([0-9.E+-]+) \|")
VIEWED = ("megatron.core.rerun_state_machine", "megatron.core.timers",
          "megatron.core.models.common.embeddings.rotary_pos_embedding",
          "megatron.core.transformer.dot_product_attention", "megatron.core.transformer.utils",
          "pretrain_gpt", "gpt_builders",
          "model_provider")
TRAINED = []  # [model chunks] built by setup_model_and_optimizer in this process


# ---------------------------------------------------------------------------- the stubs


def install_override_shim() -> None:
    """`typing.override` (Python 3.12) from typing_extensions, for Megatron-LM 0.19's files."""
    import typing

    import typing_extensions

    if not hasattr(typing, "override"):
        typing.override = typing_extensions.override


def training_code(checkout: Optional[Path]) -> None:
    """Megatron-LM's `megatron.training`: from `checkout`, else as installed (megatron-core
    0.19 ships it). megatron-core itself always comes from site-packages (compiled helpers)."""
    install_override_shim()
    import megatron.core  # noqa: F401

    if checkout is not None and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))


def install_stubs(checkout: Optional[Path], script: Path) -> None:
    """The test-only stubs of the module docstring (call before importing Megatron-LM)."""
    training_code(checkout)
    import stag_plugin  # noqa: F401
    from stag_plugin.compat import cpu
    from stag_plugin.compat.megatron import install_saver_queue

    sys.path.insert(0, str(script.parent))
    cpu.apply_cpu_compat()
    install_saver_queue()
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    _adapt_training_modules(_cpu_torch(cpu))
    if os.environ.get("STAG_TEST_NO_REPLICA_SYNC") == "1":
        from stag_plugin.integrations.megatron_lm import model

        model.install_replica_grad_sync = lambda: None


def _cpu_torch(cpu):
    view = cpu._CpuTorch()
    fake_event = types.SimpleNamespace(record=lambda *a: None, synchronize=lambda: None,
                                       wait=lambda *a: None, elapsed_time=lambda *a: 0.0)
    view.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    view.cuda.set_rng_state = lambda *args, **kwargs: None
    view.cuda.device_count = lambda: 0
    view.cuda.is_available = lambda: False
    view.cuda.Stream = lambda *args, **kwargs: cpu._CPU_STREAM
    view.cuda.Event = lambda *args, **kwargs: fake_event
    view.cuda.memory_stats = lambda *args, **kwargs: {}
    for stat in ("max_memory_allocated", "memory_allocated", "memory_reserved",
                 "max_memory_reserved"):
        setattr(view.cuda, stat, lambda *args, **kwargs: 0)
    return view


def _adapt_training_modules(view) -> None:
    import megatron.core.datasets.utils as dataset_utils
    import megatron.core.models.common.embeddings.rotary_pos_embedding  # noqa: F401
    import megatron.core.transformer.dot_product_attention  # noqa: F401
    import megatron.core.transformer.utils  # noqa: F401
    from megatron.training import checkpointing, initialize, training  # noqa: F401

    for name, module in list(sys.modules.items()):
        if (name.startswith("megatron.training") or name in VIEWED) and \
                getattr(module, "torch", None) is torch:
            module.torch = view
    no_cuda_init = functools.partial(initialize.initialize_megatron, allow_no_cuda=True)
    training.initialize_megatron = no_cuda_init
    dataset_utils.compile_helpers = lambda: None
    initialize.fused_kernels = types.SimpleNamespace(load=lambda args: None)
    training.set_jit_fusion_options = lambda *args, **kwargs: None
    setup = training.setup_model_and_optimizer

    def recording_setup(*args, **kwargs):
        built = setup(*args, **kwargs)
        TRAINED.append(built[0])
        return built

    training.setup_model_and_optimizer = recording_setup


def start_ranks(argv: list) -> None:
    """torch.distributed (gloo) and Megatron's parallel groups, before Megatron-LM's init."""
    from megatron.core import parallel_state

    from stag_plugin.compat import cpu

    def flag(name: str, default: int) -> int:
        return int(argv[argv.index(name) + 1]) if name in argv else default

    torch.distributed.init_process_group(
        "gloo", rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)))
    parallel_state.initialize_model_parallel(flag("--tensor-model-parallel-size", 1),
                                             flag("--pipeline-model-parallel-size", 1))
    cpu.seed_model_parallel_rng(flag("--seed", 1234))


def save_logits(path: str, vocab: int, seq: int) -> None:
    """The trained model's logits on a fixed random batch [2, seq] (last rank, PP 1)."""
    model = TRAINED[-1][0]
    while hasattr(model, "module"):
        model = model.module
    tokens = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(11))
    positions = torch.arange(seq).expand(2, seq)
    model.eval()
    with torch.no_grad():
        logits = model(tokens, positions, None)
    torch.save({"tokens": tokens, "logits": logits.float()}, path)


def main() -> None:
    script, *argv = sys.argv[1:]
    script = Path(script).resolve()
    checkout = os.environ.get("MEGATRON_LM_PATH")
    install_stubs(Path(checkout).resolve() if checkout else None, script)
    start_ranks(argv)
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")
    if os.environ.get("STAG_TEST_LOGITS") and torch.distributed.get_rank() == \
            torch.distributed.get_world_size() - 1:
        save_logits(os.environ["STAG_TEST_LOGITS"],
                    int(argv[argv.index("--vocab-size") + 1]),
                    int(argv[argv.index("--seq-length") + 1]))


# ---------------------------------------------------------------------------- launching


def launch(script, argv: list, checkout: Optional[Path], world: int = 1, port: int = 0,
           timeout: float = 600, env: dict = None) -> list:
    """Run `script` on `world` CPU ranks; returns each rank's combined output (fails the test
    with every rank's output tail when one exits non-zero)."""
    from stag_plugin.compat.megatron import free_port

    base = dict(os.environ, WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port or free_port()),
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", **(env or {}))
    base.pop("MEGATRON_LM_PATH", None)
    if checkout is not None:
        base["MEGATRON_LM_PATH"] = str(checkout)
    ranks = [subprocess.Popen([sys.executable, __file__, str(script), *map(str, argv)],
                              env=dict(base, RANK=str(rank)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    try:
        outputs = [rank.communicate(timeout=timeout)[0] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    failed = [(i, rank.returncode) for i, rank in enumerate(ranks) if rank.returncode]
    if failed:
        tails = "\n".join(f"--- rank {i} (exit {code}):\n" + outputs[i][-4000:]
                          for i, code in failed)
        raise AssertionError(f"{Path(script).name} failed on ranks {failed}:\n{tails}")
    return outputs


def losses(outputs: list) -> dict:
    """iteration -> 'lm loss' as Megatron-LM logged it (the last rank logs). Megatron-LM logs
    the first iteration of a run without resetting its sums, so with --log-interval 1 the
    second logged loss of a run is the mean of its first two iterations."""
    found = {int(it): float(loss) for it, loss in LOSS_LINE.findall(outputs[-1])}
    assert found, "no training iteration was logged:\n" + outputs[-1][-3000:]
    return found


def grad_norms(outputs: list) -> dict:
    """iteration -> 'grad norm' as Megatron-LM logged it (not averaged over iterations)."""
    return {int(it): float(norm) for it, norm in GRAD_LINE.findall(outputs[-1])}


def validation_loss(outputs: list) -> float:
    """The last 'lm loss value' of Megatron-LM's validation set (not the test set)."""
    found = VALID_LINE.findall(outputs[-1])
    assert found, "no validation loss was logged:\n" + outputs[-1][-3000:]
    return float(found[-1])


if __name__ == "__main__":
    main()
