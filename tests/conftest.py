"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture()
def one_thread():
    """Run a test on one torch thread (training results depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
