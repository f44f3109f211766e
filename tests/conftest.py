"""Suite-wide isolation between test modules."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import warnings

import pytest

# Without a GPU, Triton kernels run in Triton's interpreter (numpy on the CPU), so the GPU
# attention kernel and the engine's Triton path are tested on every machine (tests/gpu). Set
# before any test module imports Triton: the interpreter is chosen when a kernel is defined.
if "TRITON_INTERPRET" not in os.environ and importlib.util.find_spec("triton") is not None:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True, scope="module")
def _ray_ends_with_its_module():
    """Every module that starts a local Ray shuts it down in its own teardown. One whose
    teardown was cut short (a timeout) would leave Ray initialized, and every later module's
    ``ray.init(address="local")`` would fail with "called ray.init twice": one module's
    failure must stay that module's. Torn down after the module's own fixtures."""
    yield
    ray = sys.modules.get("ray")  # never imported here: unit modules stay Ray-free
    if ray is not None and ray.is_initialized():
        warnings.warn("a test module left Ray running; shut down after it", stacklevel=1)
        ray.shutdown()


@pytest.fixture(autouse=True)
def _root_logger_restored():
    """A test that configures logging in-process (``cluster.cli.main``: ``migrate``,
    ``tenants``) points the root logger at its own captured stderr, which pytest closes
    after it: every later record, from any test or thread, then failed with "I/O operation
    on closed file". The root logger's handlers and level come back after each test."""
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
