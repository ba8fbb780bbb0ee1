"""Megatron-Core training code on a machine without CUDA: one explicit compatibility layer.

Megatron's model code runs on CPU (see `megatron_compat`), but its DDP buffers, optimizer, gradient
clipping and checkpoint saver allocate scratch tensors with `device="cuda"` /
`torch.cuda.current_device()`, call `torch.cuda.synchronize()`, and check parameter types against
`'torch.cuda.FloatTensor'`. `apply_cpu_compat()` adapts exactly those places, and only when CUDA
is unavailable (on a GPU it does nothing):

1. `CUDA_TENSOR_MODULES`: each listed Megatron module gets, as its module-global `torch`, a view of
   torch whose tensor factories map a CUDA device to the CPU and whose `torch.cuda` answers
   `current_device()` with "cpu" and makes `synchronize()` / `empty_cache()` no-ops. Everything
   else is torch itself, so the rest of the module runs unchanged.
2. `CUDA_TYPE_NAME_CALLS`: the listed functions run while CPU tensors report CUDA type names
   (`'torch.FloatTensor'` -> `'torch.cuda.FloatTensor'`), which is what their type checks test.

Spots and line numbers are those of megatron-core 0.16.1, listed in ../shared/MEGATRON_CPU.md.
Megatron's checkpoint saver also starts a spawn-context `multiprocessing.Manager`: scripts that
save must guard their entry point with `if __name__ == "__main__":` (all of ours do).
"""

from __future__ import annotations

import functools
import importlib
import types

import torch

CUDA_TENSOR_MODULES = (
    "megatron.core.utils",  # local multi-tensor l2 norm / scale scratch buffers
    "megatron.core.distributed.param_and_grad_buffer",  # grad/param buffers on current_device
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",  # found_inf / scale / dummy overflow buffers
    "megatron.core.optimizer.clip_grads",  # norm buffers, dummy overflow buffer
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.pipeline_parallel.schedules",  # total_num_tokens on "cuda"
    "megatron.core.dist_checkpointing.strategies.filesystem_async",  # synchronize after D2H
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",  # failure flag broadcast
    "megatron.core.dist_checkpointing.strategies.async_utils",
)

CUDA_TYPE_NAME_CALLS = (
    # (module, attribute path): `param.type() == 'torch.cuda.FloatTensor'` style checks inside
    ("megatron.core.optimizer.optimizer", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.clip_grads", "clip_grad_by_total_norm_fp32"),
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params.__init__"),
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
        for module, path in CUDA_TYPE_NAME_CALLS:
            _wrap_attribute(importlib.import_module(module), path, _with_cuda_type_names)
        _applied = True
    return True


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


def _with_cuda_type_names(fn):
    """Run `fn` while `Tensor.type()` names CPU tensors as CUDA ones (restored afterwards)."""
    if getattr(fn, "_stag_cpu_compat", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous, torch.Tensor.type = torch.Tensor.type, _cuda_type_name
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type = previous

    wrapper._stag_cpu_compat = True
    return wrapper


def _wrap_attribute(module, path: str, wrap) -> None:
    *owners, name = path.split(".")
    owner = module
    for part in owners:
        owner = getattr(owner, part)
    setattr(owner, name, wrap(getattr(owner, name)))


def quiet_known_warnings() -> None:
    """Silence notices about absent apex / Transformer Engine and Megatron's own deprecations.

    Entry points call this before importing megatron; stag_plugin's own warnings stay visible.
    """
    import warnings

    for category in (UserWarning, DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"megatron\..*")
        warnings.filterwarnings("ignore", category=category, module=r"torch\.distributed\..*")
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed")
