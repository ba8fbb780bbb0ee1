"""StepRunner: run a fixed-shape decode step eagerly, under torch.compile, or as a captured CUDA
graph (gpt-fast's approach). Plain PyTorch; used by both decode engines.

A step function here is `fn(*tensors) -> Tensor or tuple of Tensors` whose shapes do not
change from call to call (the position is a tensor, caches are preallocated and updated in
place). It must be
idempotent for equal inputs: running it twice with the same inputs leaves the caches as running
it once does (it writes only the slots of the current position). CUDA graph capture relies on
that: the warm-up runs and the capture use the real inputs of the first call.

    runner = StepRunner(fn, compile=True, cuda_graph=False, device=device)
    out = runner(ids, position)       # same call, whichever way it runs

With `cuda_graph`, the graph is captured per distinct input shape (e.g. per batch size) on the
first call with that shape, then replayed: inputs are copied into static buffers, and the
returned tensors are copies of the graph's static outputs.
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple, Union

import torch
from torch import Tensor

from stag_plugin.errors import StagError

WARMUP_RUNS = 2  # eager (or compiled) runs on a side stream before capture, as torch advises


class StepRunner:
    """Calls `fn` eagerly, compiled (`compile`) and/or replayed from a CUDA graph
    (`cuda_graph`, CUDA devices only)."""

    def __init__(self, fn: Callable[..., Tensor], compile: bool = False,
                 cuda_graph: bool = False, device=None):
        device = torch.device(device) if device is not None else torch.device("cpu")
        if cuda_graph and device.type != "cuda":
            raise StagError(f"cuda_graph=True captures CUDA graphs, and the model is on "
                            f"{device}", "move the model to a CUDA device, or decode without "
                            "cuda_graph (compile=True works on CPU)")
        if compile:
            _allow_recompiles()
        self.fn = torch.compile(fn, dynamic=False) if compile else fn
        self.compile, self.cuda_graph = compile, cuda_graph
        self._graphs: Dict[Tuple, "_Graph"] = {}

    def __call__(self, *inputs: Tensor) -> Union[Tensor, Tuple[Tensor, ...]]:
        if not self.cuda_graph:
            return self.fn(*inputs)
        key = tuple((tuple(x.shape), x.dtype) for x in inputs)
        if key not in self._graphs:
            self._graphs[key] = _Graph(self.fn, inputs)
        return self._graphs[key].replay(inputs)


def _allow_recompiles(limit: int = 256) -> None:
    """Every decoder compiles its own step (its caches and weights are other tensors), and
    torch.compile counts those as recompiles of one function: past its limit (8) it would fall
    back to eager steps without an error. Raise the limit to torch's limit over all functions
    (never lower it)."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(dynamo_config, name, limit) < limit:
            setattr(dynamo_config, name, limit)


class _Graph:
    """One CUDA graph of `fn` over static copies of the inputs of its first call."""

    def __init__(self, fn: Callable[..., Tensor], inputs: Tuple[Tensor, ...]):
        self.inputs = [x.detach().clone() for x in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_RUNS):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def replay(self, inputs: Tuple[Tensor, ...]) -> Tensor:
        for static, x in zip(self.inputs, inputs):
            static.copy_(x)
        self.graph.replay()
        if isinstance(self.output, Tensor):
            return self.output.clone()
        return tuple(x.clone() for x in self.output)
