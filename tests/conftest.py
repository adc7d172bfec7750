"""Shared test setup: one CPU thread, a fixed seed per test, a float64 switch."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from .export_fixtures import exports  # noqa: F401  (session-scoped exports shared by the export tests)

# The CI machine has 2 cores shared with other jobs: intra-op threads only oversubscribe them.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def float64():
    """Make float64 the default dtype for the duration of a test."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield torch.float64
    torch.set_default_dtype(previous)
