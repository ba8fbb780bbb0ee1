"""Megatron test idiom: one gloo process group per session, parallel state per test."""

import pytest
import torch

from stag_plugin import megatron_compat as compat
from megatron.core import parallel_state


@pytest.fixture(autouse=True)
def megatron_tp1():
    """Tensor/pipeline parallel size 1 in this process, set up and torn down around each test."""
    compat.initialize_single_process()
    torch.manual_seed(1234)
    yield
    parallel_state.destroy_model_parallel()
