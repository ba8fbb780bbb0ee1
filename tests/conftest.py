"""Megatron test idiom: one gloo process group and one parallel state (TP = PP = 1) per session.

The state is built once and reused by every test: re-initialising Megatron's parallel state per
test creates ~30 new gloo process groups each time, which torch never frees (each keeps its own
threads), so a full run ended with thousands of threads and a crawling machine.
"""

import pytest
import torch

from stag_plugin.compat import megatron as compat

import stag_testing


@pytest.fixture(autouse=True)
def _forget_seeds():
    stag_testing.SEEDS.clear()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test lists the fresh seeds it drew, and how to replay one."""
    report = (yield).get_result()
    if report.when == "call" and report.failed and stag_testing.SEEDS:
        report.sections.append(("fresh seeds", f"drawn: {stag_testing.SEEDS}; replay with "
                                               "STAG_TEST_SEED=<seed> pytest ..."))


def pytest_report_header(config):
    import megatron.core

    return f"megatron-core {megatron.core.__version__}, torch {torch.__version__}"


@pytest.fixture(autouse=True)
def megatron_tp1():
    """Tensor/pipeline parallel size 1 in this process (initialised on first use)."""
    compat.initialize_single_process()
    torch.manual_seed(1234)
    yield
