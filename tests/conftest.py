"""Shared test fixtures. RTL models are built once per process and cached on disk
(``$FP8NPU_CACHE``, default ``~/.cache/fp8npu``), so repeated runs skip Verilator builds."""

import numpy as np
import pytest


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def report(r):
    """Print a check's summary so the run log records how many vectors were checked."""
    print(r.summary())
    for ex in r.examples:
        print("  mismatch:", ex)
