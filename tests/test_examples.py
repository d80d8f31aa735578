import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _root_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


@pytest.mark.slow
@pytest.mark.serial
def test_quickstart_example_runs(tmp_path):
    from examples.quickstart import main

    cert = main(epochs=2, out=str(tmp_path / "qs"))
    assert (tmp_path / "qs" / "certificate.json").is_file()
    assert (tmp_path / "qs" / "model.onnx").is_file()
    assert cert.onnx_sha256 is not None
    # a "learned" bar, not a tolerance: 10 classes, n ~ 360: P(> 0.5 right | chance 0.1) < 1e-60
    assert cert.clean_accuracy > 0.5
    assert cert.robust_accuracy <= cert.clean_accuracy


@pytest.mark.slow
@pytest.mark.serial
def test_custom_model_example_runs(tmp_path):
    from examples.custom_model import main

    report = main(epochs=2, out=str(tmp_path / "custom"))
    assert report.n == 397
    assert report.clean_accuracy > 0.5  # 10 classes, n = 397: a "learned" bar far above chance (~0.16)
    assert report.robust_accuracy <= report.clean_accuracy
    assert "examples.custom_model" in sys.modules
