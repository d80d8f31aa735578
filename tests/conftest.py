"""Shared fixtures for harden's tests: one torch thread, a fresh global seed, a run directory."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with the reason, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="module")
def trained():
    """A TinyCNN trained 3 seeded epochs on 512 synthetic images (3 classes), in eval mode."""
    import torch.nn.functional as F

    from harden.testing import TinyCNN, synthetic_tensors

    torch.manual_seed(0)
    model = TinyCNN(num_classes=3)
    x, y = synthetic_tensors(512, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for i in range(0, 512, 64):
            loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()
