"""StepRunner (stag_plugin.reference.step_runner) on the CPU: a fixed-shape step that writes a
preallocated cache in place at a position tensor returns the same outputs and leaves the same
cache eagerly and under torch.compile (one small compilation); CUDA graphs are refused on a CPU
device with a clear error. The CUDA graph path itself needs a GPU (bench/gpu/)."""

import pytest
import torch

from stag_plugin.errors import StagError
from stag_plugin.reference.kv_cache import KVCache
from stag_plugin.reference.step_runner import StepRunner

from stag_testing import fresh_seed


class TinyStep:
    """Attention of one query over a KVCache written at `index`: the shape of a decode step."""

    def __init__(self, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(8, 8, generator=generator)
        self.cache = KVCache(rows=2, groups=1, size=5, head_dim=8, limit=5,
                             dtype=torch.float32, device="cpu")

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x [2, 8] at position index [1] -> [2, 8]."""
        kv = (x @ self.weight)[:, None, None]  # [2, 1, 1, 8]
        self.cache.write(slice(0, 2), index, kv, kv)
        visible = torch.arange(self.cache.size)[None] <= index[:, None]  # [1, 5]
        out = torch.nn.functional.scaled_dot_product_attention(
            x[:, None, None], self.cache.k, self.cache.v, attn_mask=visible)
        return out[:, 0, 0]


def test_compiled_step_equals_eager_step():
    seed = fresh_seed()
    eager, compiled = TinyStep(seed), TinyStep(seed)
    run_eager = StepRunner(eager)
    run_compiled = StepRunner(compiled, compile=True)
    inputs = torch.randn(7, 2, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for t in range(7):  # past the cache's 5 entries: the ring wraps
            index = torch.tensor([t])
            a, b = run_eager(inputs[t], index), run_compiled(inputs[t], index)
            assert (a - b).abs().max().item() < 1e-5, f"seed {seed}, position {t}"
            assert torch.allclose(eager.cache.k, compiled.cache.k, atol=1e-5), f"seed {seed}"
        again = run_compiled(inputs[6], torch.tensor([6]))  # idempotent for equal inputs
    assert torch.allclose(again, b) and torch.allclose(eager.cache.v, compiled.cache.v, atol=1e-5)


def test_cuda_graph_is_refused_on_cpu():
    with pytest.raises(StagError, match="captures CUDA graphs, and the model is on cpu. Fix"):
        StepRunner(TinyStep(0), cuda_graph=True, device="cpu")
    with pytest.raises(StagError, match="captures CUDA graphs"):
        StepRunner(TinyStep(0), compile=True, cuda_graph=True)  # no device: the CPU
