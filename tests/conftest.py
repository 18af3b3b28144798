"""Fixtures the test modules share; plain builders live in ``support.py`` and the per-primitive
mask table in ``mask_cases.py``.

``ATTNCC_UPDATE_GOLDEN=1`` rewrites the golden files under ``tests/golden/`` instead of comparing.
"""

from __future__ import annotations

import pytest
import torch

from attncc.config import config
from attncc.counters import counters


@pytest.fixture
def fresh_compiler():
    """A fresh Dynamo cache and zeroed attncc counters around the test; dumps skip the
    ahead-of-time GPU compiles and the MLIR export (tens of seconds on a small CPU: the tests of
    those two switches turn them back on)."""
    torch._dynamo.reset()
    counters.clear()
    with config.scope(dump_aot=False, dump_mlir=False):
        yield
    torch._dynamo.reset()
