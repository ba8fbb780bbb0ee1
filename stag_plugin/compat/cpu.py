"""Megatron-Core training code on a machine without CUDA: one explicit compatibility layer.

Megatron's model code runs on CPU (see `megatron_compat`), but its pipeline p2p, pipeline
schedules, DDP buffers, optimizers, gradient clipping and checkpoint saver allocate tensors with
`device="cuda"` / `torch.cuda.current_device()`, call `torch.cuda.synchronize()`, move tensors
with `.cuda()` and check parameter types against `'torch.cuda.FloatTensor'`. `apply_cpu_compat()`
adapts exactly the spots listed below, and only when CUDA is unavailable (on a GPU it does
nothing). Two mechanisms, each with its one list:

1. `CUDA_TENSOR_MODULES`: each listed Megatron module gets, as its module-global `torch`, a view of
   torch whose tensor factories map a CUDA device to the CPU and whose `torch.cuda` answers
   `current_device()` with "cpu" and makes `synchronize()` / `empty_cache()` no-ops. Everything
   else is torch itself, so the rest of the module runs unchanged.
2. `CUDA_TENSOR_METHOD_CALLS`: the listed functions run while CPU tensors report CUDA type names
   (`'torch.FloatTensor'` -> `'torch.cuda.FloatTensor'`), which is what their type checks test,
   and while `Tensor.cuda()` returns the (CPU) tensor itself. Both are restored on return.

One option combination is wrong rather than unsupported on CPU: the interleaved pipeline schedule
with batched p2p runs over gloo but gives wrong losses. `check_cpu_pipeline_options(config)`
refuses it with the fix; entry points call it once they have a config.

Line numbers are those of megatron-core 0.16.1; 0.19 has the same spots (at other lines) and
one more kind, CUDA stream waits in DDP's gradient sync (`param_and_grad_buffer.py`
`start_grad_sync`/`finish_grad_sync`: `torch.cuda.current_stream()`), which the CPU view answers
with a stream whose waits do nothing. docs/megatron_versions.md lists them for users.
Megatron's checkpoint saver also starts a spawn-context `multiprocessing.Manager`: scripts that
save must guard their entry point with `if __name__ == "__main__":` (all of ours do).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types

import torch

from stag_plugin.errors import StagError

# Every patched spot, with why. Modules whose global `torch` becomes the CPU view (mechanism 1):
CUDA_TENSOR_MODULES = (
    # pipeline_parallel/p2p_communication.py:313/321 receive buffers on current_device();
    # :190-202 shape-exchange tensors; :242 and :398 torch.cuda.synchronize() after batched p2p
    "megatron.core.pipeline_parallel.p2p_communication",
    # pipeline_parallel/schedules.py:596/983/2138 `total_num_tokens` on device "cuda"
    "megatron.core.pipeline_parallel.schedules",
    # utils.py:1207 local multi-tensor l2 norm returns its result on "cuda"
    "megatron.core.utils",
    # tensor_parallel/mappings.py:181 and the other sequence-parallel all-gather /
    # reduce-scatter outputs allocated on torch.cuda.current_device()
    "megatron.core.tensor_parallel.mappings",
    # tensor_parallel/layers.py:552 sequence-parallel all-gather buffer in the linear layers'
    # backward (and :597/:607 gradient-accumulation buffers) on current_device()
    "megatron.core.tensor_parallel.layers",
    # distributed/param_and_grad_buffer.py:800/806 param and grad buffers on current_device();
    # (0.19) start_grad_sync / finish_grad_sync wait on torch.cuda.current_stream()
    "megatron.core.distributed.param_and_grad_buffer",
    # distributed/distributed_data_parallel.py:588/594/611 synchronize / empty_cache
    "megatron.core.distributed.distributed_data_parallel",
    # distributed/finalize_model_grads.py: num-token and norm scratch tensors on current_device()
    "megatron.core.distributed.finalize_model_grads",
    # optimizer/optimizer.py:473/481/485/907 found_inf / overflow / scale tensors on "cuda"
    "megatron.core.optimizer.optimizer",
    # optimizer/clip_grads.py:90/103/115/174/207 norm and overflow buffers on "cuda"
    "megatron.core.optimizer.clip_grads",
    # optimizer/distrib_optimizer.py:791/1077 state gather buffers on current_device()
    "megatron.core.optimizer.distrib_optimizer",
    # dist_checkpointing/strategies/filesystem_async.py:230 synchronize after the D2H copy
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    # dist_checkpointing/strategies/state_dict_saver.py:252 failure flag broadcast on "cuda"
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
)

# Functions run with CUDA type names and `Tensor.cuda()` = identity (mechanism 2):
CUDA_TENSOR_METHOD_CALLS = (
    # (module, attribute path): why
    # clip_grads.py:167 asserts `param.grad.type() == 'torch.cuda.FloatTensor'`
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    # optimizer.py:671-699 sorts params by `param.type()`, raises TypeError for CPU names
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
    # distrib_optimizer.py:361/420-431 (via _build_model_and_main_param_groups) and :582 sort
    # params by `param.type()`, raise TypeError for CPU names (use_distributed_optimizer=True)
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer.__init__"),
    # distrib_optimizer.py:1089 `send_tensor.cuda()` when gathering optimizer state for a
    # reshardable checkpoint
    ("megatron.core.optimizer.distrib_optimizer",
     "DistributedOptimizer.get_parameter_state_dp_zero"),
    # language_module.py:244 `weight.data.cuda()` before the all-reduce that gives the last
    # pipeline stage the tied embedding weights (share_embeddings_and_output_weights, PP > 1)
    ("megatron.core.models.common.language_module.language_module",
     "LanguageModule.setup_embeddings_and_output_layer"),
)

_TENSOR_FACTORIES = (
    "tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "ones_like", "empty_like",
)
_applied = False


def apply_cpu_compat() -> bool:
    """Adapt Megatron's CUDA-only training spots to the CPU; returns True when it did anything.

    Idempotent. A no-op when CUDA is available, so GPU runs use Megatron unchanged.
    """
    global _applied
    if torch.cuda.is_available():
        return False
    if not _applied:
        view = _CpuTorch()
        for name in CUDA_TENSOR_MODULES:
            importlib.import_module(name).torch = view
        for module, path in CUDA_TENSOR_METHOD_CALLS:
            _wrap_attribute(importlib.import_module(module), path, _with_cuda_tensor_methods)
        _applied = True
    return True


def check_cpu_pipeline_options(config) -> None:
    """Refuse pipeline options that give wrong results on CPU (gloo); a no-op with CUDA.

    `config` is a Megatron ModelParallelConfig / TransformerConfig (or anything with its fields).
    The interleaved schedule (virtual pipeline) with batched p2p runs over gloo but computes wrong
    losses; the same schedule with unbatched p2p, and 1F1B either way, are correct.
    """
    if torch.cuda.is_available():
        return
    virtual = getattr(config, "virtual_pipeline_model_parallel_size", None)
    if virtual is not None and getattr(config, "batch_p2p_comm", False):
        raise StagError(
            f"virtual_pipeline_model_parallel_size={virtual} with batch_p2p_comm=True gives wrong "
            "losses on CPU: the interleaved pipeline schedule's batched send/receive is not "
            "correct over gloo", "set batch_p2p_comm=False and overlap_p2p_comm=False, "
            "or drop the virtual pipeline, or run on a GPU.")


def _cpu_device(device):
    """A CUDA device (string, int index or torch.device) becomes the CPU; others pass through."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    device = torch.device(device)
    return torch.device("cpu") if device.type == "cuda" else device


class _CpuCuda(types.ModuleType):
    """`torch.cuda` as seen by adapted modules: current device is the CPU, syncs do nothing."""

    def __init__(self):
        super().__init__("torch.cuda[cpu]")

    def __getattr__(self, name):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs):
        return None

    @staticmethod
    def empty_cache():
        return None

    @staticmethod
    def current_stream(*args, **kwargs):
        return _CPU_STREAM

    @staticmethod
    def stream(*args, **kwargs):
        return contextlib.nullcontext()


class _CpuStream:
    """The CPU's one "stream": work is done when a call returns, so every wait is a no-op."""

    def wait_event(self, event):
        return None

    def wait_stream(self, stream):
        return None

    def synchronize(self):
        return None


_CPU_STREAM = _CpuStream()


class _CpuTorch(types.ModuleType):
    """`torch` as seen by adapted modules: factories put CUDA-device tensors on the CPU."""

    def __init__(self):
        super().__init__("torch[cpu]")
        self.cuda = _CpuCuda()
        for name in _TENSOR_FACTORIES:
            setattr(self, name, _on_cpu(getattr(torch, name)))

    def __getattr__(self, name):
        return getattr(torch, name)


def _on_cpu(factory):
    @functools.wraps(factory)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return factory(*args, **kwargs)

    return wrapper


_tensor_type = torch.Tensor.type


def _cuda_type_name(tensor, *args, **kwargs):
    name = _tensor_type(tensor, *args, **kwargs)
    if args or kwargs or not name.startswith("torch.") or name.startswith("torch.cuda."):
        return name
    return "torch.cuda." + name[len("torch."):]


def _cpu_tensor_cuda(tensor, *args, **kwargs):
    """`Tensor.cuda()` inside the listed calls: the CPU is the device, so the tensor stays."""
    return tensor


def _with_cuda_tensor_methods(fn):
    """Run `fn` while `Tensor.type()` names CPU tensors as CUDA ones and `Tensor.cuda()` keeps
    them where they are (both restored afterwards, also when `fn` raises)."""
    if getattr(fn, "_stag_cpu_compat", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = torch.Tensor.type, torch.Tensor.cuda
        torch.Tensor.type, torch.Tensor.cuda = _cuda_type_name, _cpu_tensor_cuda
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type, torch.Tensor.cuda = previous

    wrapper._stag_cpu_compat = True
    return wrapper


def _wrap_attribute(module, path: str, wrap) -> None:
    *owners, name = path.split(".")
    owner = module
    for part in owners:
        owner = getattr(owner, part)
    setattr(owner, name, wrap(getattr(owner, name)))


def seed_model_parallel_rng(seed: int) -> None:
    """CPU counterpart of Megatron's `model_parallel_cuda_manual_seed` (which needs CUDA).

    Megatron draws tensor-parallel-rank-specific randomness (dropout under sequence
    parallelism, sharded weight init) inside `get_cuda_rng_tracker().fork()`. Without CUDA the
    tracker is replaced by one that forks the CPU generator, seeded as Megatron seeds it
    (seed + 2718 + tensor-parallel rank)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as megatron_random

    tracker = CpuRNGStatesTracker()
    megatron_random._CUDA_RNG_STATE_TRACKER = tracker
    megatron_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    tracker.add(megatron_random._MODEL_PARALLEL_RNG_TRACKER_NAME,
                seed + 2718 + parallel_state.get_tensor_model_parallel_rank())


def _cpu_tracker_class():
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    class _CpuRNGStatesTracker(CudaRNGStatesTracker):
        """Megatron's RNG-state tracker over the CPU generator."""

        def add(self, name, seed):
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            original = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(original)

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            original = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(original)

    return _CpuRNGStatesTracker


def CpuRNGStatesTracker():  # noqa: N802 - a class built on first use (megatron imported late)
    return _cpu_tracker_class()()


def quiet_known_warnings() -> None:
    """Silence notices about absent apex / Transformer Engine and Megatron's own deprecations.

    Entry points call this before importing megatron; stag_plugin's own warnings stay visible.
    """
    import warnings

    for category in (UserWarning, DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"megatron\..*")
        warnings.filterwarnings("ignore", category=category, module=r"torch\.distributed\..*")
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed")
