"""harden.evaluate: verify and certify a model trained elsewhere, from a plain weights file, without training."""

import json

import pytest
import torch
import yaml
from torch import nn

import harden
from harden.checkpoint import weights_sha256
from harden.evaluate import EvaluateResult, evaluate
from harden.integrity import inspect_certificate
from harden.models import Normalized
from harden.testing import TinyCNN, synthetic_bundle, tiny_policy

#: the cheapest suite that still attacks: one FGSM, one eps of the sweep, no checks
FAST = {
    "verify": {
        "attacks": [{"name": "fgsm"}],
        "n_examples": 24,
        "eps_sweep": [0.1],
        "check_steps": 1,
        "checks": False,
    },
    "certify": {"saliency_examples": 2},
}


@pytest.fixture(scope="module")
def bundle():
    return synthetic_bundle(48, 24)


def _source(seed):
    torch.manual_seed(seed)
    return TinyCNN(num_classes=3).eval()


def test_evaluate_a_plain_state_dict_end_to_end(tmp_path, bundle):
    src, base = _source(1), _source(2)
    weights, base_weights = tmp_path / "mine.pth", tmp_path / "plain.pth"
    torch.save(src.state_dict(), weights)  # a plain state_dict, as a training script saves it
    torch.save({"state_dict": {f"module.{k}": v for k, v in base.state_dict().items()}}, base_weights)
    out, lines = tmp_path / "eval", []
    result = evaluate(
        "harden.testing:TinyCNN",
        tiny_policy(**FAST),
        weights=weights,
        mean=[0.5],
        std=[0.25],
        data=bundle,
        out=out,
        baseline_weights=base_weights,
        progress=False,
        say=lines.append,
    )
    assert isinstance(result, EvaluateResult)
    assert lines[0] == "normalization: mean (0.5), std (0.25)" == f"normalization: {result.normalization}"
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():  # the file's weights, behind the stated normalization: the same logits
        assert torch.equal(result.model(x), src((x - 0.5) / 0.25))
    cert = result.certificate
    assert result.certificate_path == out / "certificate.json" and cert.training == []
    assert cert.n == 24 and cert.weights_sha256 == weights_sha256(result.model)
    assert set(cert.saliency[0].maps) == {"hardened", "baseline"}  # the baseline was loaded and measured
    report = json.loads((out / "report.json").read_text())
    assert report["n"] == 24 and report["clean_accuracy"] == result.report.clean_accuracy
    evaluated = yaml.safe_load((out / "policy.yaml").read_text())["model"]
    assert (evaluated["mean"], evaluated["std"], evaluated["pretrained_file"]) == ([0.5], [0.25], None)
    _, checks = inspect_certificate(out / "certificate.json")  # the folder checks like a run's
    assert [c.item for c in checks if not c.ok] == []


def test_evaluate_without_normalization_says_so_and_writes_nothing_without_out(bundle):
    lines = []
    result = evaluate(_source(3), tiny_policy(**FAST), data=bundle, progress=False, say=lines.append)
    assert lines[0] == "normalization: none: the model sees pixels in [0, 1]"
    assert result.certificate_path is None and not result.model.has_norm and result.report.n == 24


def test_a_head_smaller_than_the_data_is_blamed_on_the_model(bundle):
    torch.manual_seed(0)
    with pytest.raises(harden.ModelError) as info:
        evaluate(TinyCNN(num_classes=2), tiny_policy(**FAST), data=bundle, progress=False)
    assert str(info.value) == (
        "expected the model to output 3 logits (the data has 3 classes), got 2: set model.num_classes / "
        "the classifier size to the data's classes"
    )


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = TinyCNN(num_classes=3)

    def forward(self, x):
        return {"logits": self.body(x)}


def test_a_model_returning_a_dict_needs_output_and_works_with_it(bundle):
    with pytest.raises(harden.ModelError, match=r"got a dict with keys \['logits'\]; set model\.output"):
        evaluate(_DictOut(), tiny_policy(**FAST), data=bundle, progress=False)
    result = evaluate(_DictOut(), tiny_policy(**FAST), output="logits", data=bundle, progress=False)
    assert result.model.output == "logits" and result.report.n == 24


def test_evaluate_refuses_a_used_folder_before_attacking(tmp_path, bundle):
    (tmp_path / "certificate.json").write_text("{}")
    with pytest.raises(harden.RunFolderError, match="--overwrite"):
        evaluate(_source(4), tiny_policy(**FAST), data=bundle, out=tmp_path, progress=False)
    assert (tmp_path / "certificate.json").read_text() == "{}"


def test_evaluate_refuses_a_wrapped_file_of_another_normalization(tmp_path, bundle):
    path = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in Normalized(_source(5), (0.5,), (0.25,)).state_dict().items()}, str(path))
    with pytest.raises(harden.ModelError, match=r"--mean 0\.5 --std 0\.25"):
        evaluate("harden.testing:TinyCNN", tiny_policy(**FAST), weights=path, data=bundle, progress=False)
