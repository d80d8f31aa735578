"""Shared fixtures for harden's tests: one torch thread, a fresh global seed, a run directory."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """The test models are tiny: one intra-op thread is as fast when the machine is idle and
    many times faster when other processes compete for the cores (OpenMP threads spin)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Every test starts from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def tmp_run(tmp_path):
    """A run directory (not created yet) inside the test's own tmp_path."""
    return tmp_path / "run"
