"""Shared fixtures for harden's tests: one torch thread, a fresh global seed, a run directory, trained tiny models."""

import platform
from pathlib import Path

import pytest
import torch


def _cpu_name() -> str:
    """The CPU's model name (tolerances must hold on any x86-64: the header says which one ran)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _machine_line() -> str:
    isa = torch.backends.cpu.get_cpu_capability()
    return f"cpu: {_cpu_name()} ({platform.machine()}, torch CPU kernels: {isa}), torch {torch.__version__}"


def pytest_report_header(config):
    """Name the CPU, torch's build and its CPU kernels in the header, so a CI log says where a number came from."""
    return [_machine_line()]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The same line at the end: ``make test`` runs ``pytest -q``, which prints no header."""
    terminalreporter.write_line(_machine_line())


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


@pytest.fixture(scope="module")
def trained_xy():
    """A TinyCNN trained 3 seeded epochs on 384 synthetic images (3 classes), in eval mode, and 96 held-out
    images ``(model, x_test, y_test)``."""
    import torch.nn.functional as F

    from harden.testing import TinyCNN, synthetic_tensors

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyCNN(num_classes=3)
        x, y = synthetic_tensors(384, seed=1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model.train()
        for _ in range(3):
            for i in range(0, 384, 64):
                opt.zero_grad()
                F.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
                opt.step()
        model.eval()
    x_test, y_test = synthetic_tensors(96, seed=2)
    return model, x_test, y_test


@pytest.fixture(scope="session")
def synthetic_cnn():
    """TinyCNN trained (Adam, 2 seeded epochs) on the 3-class synthetic data, and 96 held-out images.

    Shared by the Square and FAB-T tests; a test that changes the model's modes restores eval mode.
    """
    from helpers_attacks import fit

    from harden.testing import TinyCNN, synthetic_tensors

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyCNN(num_classes=3)
    x, y = synthetic_tensors(384, seed=1)
    fit(model, x, y, epochs=2, lr=0.01)
    xt, yt = synthetic_tensors(96, seed=2)
    return model, xt, yt


@pytest.fixture(scope="session")
def digits_cnn():
    """A 10-class TinyCNN trained quickly on sklearn digits, and the 359 test images.

    Shared by the Square and FAB-T tests; a test that changes the model's modes restores eval mode.
    """
    from helpers_attacks import fit
    from torch.utils.data import DataLoader

    from harden.data import load_data
    from harden.policy import DataSpec
    from harden.testing import TinyCNN

    bundle = load_data(DataSpec(name="digits"))
    xtr, ytr = next(iter(DataLoader(bundle.train, batch_size=len(bundle.train))))
    xte, yte = next(iter(DataLoader(bundle.test, batch_size=len(bundle.test))))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TinyCNN(num_classes=10, in_chans=1, width=16)
    fit(model, xtr, ytr, epochs=6, lr=0.01)
    return model, xte, yte


@pytest.fixture(scope="session")
def fitted(tmp_path_factory):
    """One short training run (2 epochs of ce on synthetic data) shared by the verify and certify tests.

    Returns ``(policy, FitResult)``; the policy verifies with its attack suite only (no sanity
    checks, no eps sweep). Tests must not change the model or its run directory.
    """
    import harden
    from harden.testing import tiny_policy

    run_dir = tmp_path_factory.mktemp("fit") / "run"
    policy = tiny_policy(verify={"checks": False, "eps_sweep": []}, train={"epochs": 2}, objectives=[{"name": "ce"}])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        result = harden.fit(None, policy, run_dir=run_dir, progress=False)
    return policy, result


@pytest.fixture
def user_module(monkeypatch):
    """A module ``faulty`` importable by ``module:attr`` names, holding the bad data functions and model below.

    Shared by the train, fit_setup and fit_loop tests.
    """
    import sys
    import types

    from torch.utils.data import TensorDataset

    from harden.testing import TinyCNN, synthetic_tensors

    mod = types.ModuleType("faulty")
    x, y = synthetic_tensors(96, seed=1)
    xt, yt = synthetic_tensors(32, seed=2)

    def pair(xa=x, ya=y, xb=xt, yb=yt):
        def data():
            return TensorDataset(xa, ya), TensorDataset(xb, yb)

        data.__module__ = "faulty"  # defined "in" faulty: harden imports only code of the package it names
        return data

    nan_late = x.clone()
    nan_late[50, 0, 3, 3] = float("nan")
    y_test_big = yt.clone()
    y_test_big[0] = 9
    mod.pixels_255 = pair(xa=x * 255)
    mod.nan_pixel = pair(xa=nan_late)
    mod.label_out_of_range = pair(yb=y_test_big)
    mod.negative_label = pair(ya=y - 1)
    mod.empty_train = pair(xa=x[:0], ya=y[:0])
    mod.rgb_net = type("RgbNet", (TinyCNN,), {"__module__": "faulty"})(num_classes=3, in_chans=3)
    monkeypatch.setitem(sys.modules, "faulty", mod)
    return mod


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """A trained TinyCNN (with normalization) exported with policy and certificate metadata.

    Returns ``(model, onnx_path, x, y, x_adv)``: 96 synthetic images and their PGD counterparts
    (linf eps 0.1, 5 steps). Shared by the quantize and onnx_accuracy tests; tests must not change
    the model or the file.
    """
    import harden
    from harden.attacks import ATTACKS
    from harden.certify import Certificate
    from harden.models import Normalized
    from harden.testing import TinyCNN, synthetic_tensors, tiny_policy

    root = tmp_path_factory.mktemp("q")
    policy = tiny_policy(train={"epochs": 2}, objectives=[{"name": "ce"}])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        result = harden.fit(
            Normalized(TinyCNN(num_classes=3), (0.5,), (0.25,)), policy, run_dir=root / "run", progress=False
        )
        model = result.model.eval()
        cert = Certificate.model_construct(verdict="EMPIRICAL", robust_accuracy=0.5, clean_accuracy=0.9)
        path = harden.export_onnx(
            model, root / "model.onnx", policy=policy, certificate=cert, input_shape=(1, 8, 8)
        ).path
        x, y = synthetic_tensors(96, seed=7)
        attack = ATTACKS.get("pgd")(harden.ThreatModel(eps=0.1), {"steps": 5})
        torch.manual_seed(0)
        x_adv = attack(model, x, y)
    return model, path, x, y, x_adv


@pytest.fixture(scope="module")
def onnx_path(trained, tmp_path_factory):
    """``trained`` exported to ONNX (no metadata); shared by the runtime and verify_onnx tests."""
    import harden

    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    harden.export_onnx(trained, path, input_shape=(1, 8, 8))
    return path


@pytest.fixture(scope="module")
def clf(onnx_path):
    """An onnxruntime CPU session (:class:`harden.runtime.OnnxClassifier`, one thread) of ``onnx_path``."""
    from harden.runtime import load_onnx

    return load_onnx(onnx_path, "cpu", threads=1)


@pytest.fixture(scope="module")
def data():
    """48 synthetic images and labels (seed 3) for the runtime and verify_onnx tests."""
    from harden.testing import synthetic_tensors

    return synthetic_tensors(48, seed=3)


@pytest.fixture
def probe_sequence(monkeypatch):
    """Make the per-epoch probe report the robust accuracies given, epoch by epoch (clean: 0.9)."""
    import harden.fit_loop

    def use(values):
        def fake(run):
            return {"val_clean_acc": 0.9, "val_pgd_acc": values[len(run.history)]}

        monkeypatch.setattr(harden.fit_loop, "_evaluate", fake)

    return use
