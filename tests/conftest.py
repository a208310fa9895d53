"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run, so that CI's verdict does not depend on
# the draw; HYPOTHESIS_PROFILE=explore draws fresh random examples (and keeps failures in the
# local example database) for hunting new counterexamples.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture()
def one_thread():
    """Run a test on one torch thread (training results depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
