"""Shared pytest set-up: fixed per-test seeds, poisoned op outputs, the `cuda` marker."""

import random
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # `import helpers`
# `import peers`: the peers' formulations that the benchmarks run, shared with the tests.
sys.path.insert(1, str(Path(__file__).parent.parent / "benchmarks"))

from helpers import poison_outputs  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_poison(request):
    # A fixed seed per test (stable across runs, different between tests), and every output an
    # op allocates filled with NaN first, so an element a kernel forgets to write fails the test.
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    with poison_outputs(True):
        yield
