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


# The digits test splits have about 360 images (20 % of 1797, stratified), 10 classes. A "learned" bar, not a
# tolerance: P(more than half right | chance 0.1, n > 300) <= exp(-n KL(0.5 || 0.1)) = exp(-0.51 n) < 1e-60.
# Robust accuracy counts the images right both clean and attacked, so it cannot exceed clean; it must be
# strictly lower: an apgd_ce that breaks none of ~360 images of a model hardened for three epochs at eps 0.1
# would be a broken attack.


@pytest.mark.slow
@pytest.mark.serial
def test_own_loop_example_learns_and_is_attacked():
    from examples.own_loop import main

    result = main(epochs=3)
    assert result["n"] == 360
    assert result["clean_accuracy"] > 0.5
    assert result["robust_accuracy"] < result["clean_accuracy"]


@pytest.mark.slow
@pytest.mark.serial
def test_lightning_example_learns_and_checkpoints_the_loss_state(tmp_path):
    import math

    import torch

    import harden
    from examples.lightning_loop import HardenedClassifier, main
    from harden.data import load_data
    from harden.testing import TinyCNN

    ckpt = tmp_path / "last.ckpt"
    result = main(epochs=3, checkpoint=str(ckpt))
    assert result["n"] > 300  # the policy's digits test split (the bar above holds for any n > 300)
    assert result["clean_accuracy"] > 0.5
    assert result["robust_accuracy"] < result["clean_accuracy"]
    saved = torch.load(ckpt, weights_only=True)
    policy = harden.load_policy(ROOT / "policies" / "digits-trades.yaml")
    steps = 3 * math.ceil(len(load_data(policy.data).train) / 64)  # after_step once per batch
    assert int(saved["hardening_loss"]["objectives"]["steps_done"]) == steps
    resumed = HardenedClassifier(TinyCNN(num_classes=10), policy)
    resumed.on_load_checkpoint(saved)
    assert int(resumed.loss_fn.state_dict()["objectives"]["steps_done"]) == steps


@pytest.mark.slow
@pytest.mark.serial
def test_evaluate_model_example_runs(tmp_path):
    from examples.evaluate_model import main

    result = main(str(tmp_path / "evaluated"), progress=False)
    cert, out = result.certificate, tmp_path / "evaluated"
    assert (out / "certificate.json").is_file() and (out / "report.json").is_file()
    assert result.normalization == "mean (0.3), std (0.4)" and cert.training == [] and cert.n == 200
    assert cert.clean_accuracy > 0.5  # 10 classes, n = 200: P(> 0.5 right | chance 0.1) < 1e-40
    assert cert.robust_accuracy <= cert.clean_accuracy
