"""harden.onnx_accuracy: logits through onnxruntime, parity with torch, and re-measured accuracy of a converted model."""

import json

import onnx
import pytest
import torch
from helpers_data import nan_above_half
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import harden
from harden.attacks.base import save_modes
from harden.export import INPUT_NAME, OUTPUT_NAME
from harden.onnx_accuracy import ConvertedAccuracy, logit_parity, measure_converted, onnx_logits
from harden.quantize import to_fp16, to_int8
from harden.testing import TinyCNN

THREAT = harden.ThreatModel(eps=0.1)  # the threat model of the PGD inputs of the ``exported`` fixture


def linear_classifier(path, weight, bias):
    """``flatten(pixels) @ weight.T + bias`` as a hand-built ONNX file (no exporter) and as a torch module."""
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", [INPUT_NAME], ["flat"]),
            helper.make_node("Gemm", ["flat", "w", "b"], [OUTPUT_NAME], transB=1),
        ],
        "linear",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", weight.shape[0]])],
        [numpy_helper.from_array(weight.numpy(), "w"), numpy_helper.from_array(bias.numpy(), "b")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    net = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0]))
    with torch.no_grad():
        net[1].weight.copy_(weight)
        net[1].bias.copy_(bias)
    return path, net


def exact_case(tmp_path):
    """Weights in {-1, 0, 1}, pixels and biases on a 1/8 grid: every logit is exact in float32, in any order."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randint(-1, 2, (3, 64), generator=gen).float()
    bias = torch.tensor([0.25, -0.5, 0.0])
    x = torch.randint(0, 9, (10, 1, 8, 8), generator=gen).float() / 8
    path, net = linear_classifier(tmp_path / "linear.onnx", weight, bias)
    return path, net, x


def test_logit_parity_of_identical_logits_is_zero(tmp_path):
    path, net, x = exact_case(tmp_path)
    got = onnx_logits(path, x, batch_size=3)  # batches of 3, 3, 3 and 1
    assert got.dtype == torch.float32 and got.device.type == "cpu" and got.shape == (10, 3)
    with torch.no_grad():
        assert torch.equal(got, net(x))
    assert logit_parity(path, net, x) == (0.0, 1.0)


def test_logit_parity_is_the_largest_difference_and_the_argmax_agreement(tmp_path):
    path, net, x = exact_case(tmp_path)
    onnx_pred = onnx_logits(path, x).argmax(1)
    with torch.no_grad():
        net[1].bias[1] += 100.0  # the torch side now always answers class 1, its logit 100 higher
    diff, agree = logit_parity(path, net, x)
    assert diff == 100.0
    assert agree == float((onnx_pred == 1).float().mean())
    assert 0.0 < agree < 1.0  # the case is not degenerate: the ONNX side answers other classes too


def test_measure_converted_compares_with_the_float32_model(exported, tmp_path):
    model, src, x, y, x_adv = exported
    with torch.no_grad():
        torch_clean = float((model(x).argmax(1) == y).float().mean())
        torch_adv = float((model(x_adv).argmax(1) == y).float().mean())
    fp32 = measure_converted(src, x, y, THREAT, adversarial=x_adv)
    assert isinstance(fp32, ConvertedAccuracy) and fp32.precision == "fp32" and fp32.n == 96
    assert fp32.clean_accuracy == pytest.approx(torch_clean, abs=1e-9)
    assert fp32.transfer_accuracy == pytest.approx(torch_adv, abs=1e-9)
    assert 0.0 <= fp32.noise_accuracy <= 1.0
    assert json.loads(json.dumps(fp32.to_dict()))["threat"]["eps"] == 0.1
    for convert, name in ((to_fp16, "fp16"), (to_int8, "int8")):
        got = measure_converted(convert(src, tmp_path / f"{name}.onnx"), x, y, THREAT, adversarial=x_adv)
        assert got.precision == name
        assert abs(got.clean_accuracy - fp32.clean_accuracy) <= 0.05
        assert abs(got.transfer_accuracy - fp32.transfer_accuracy) <= 0.05
        assert abs(got.noise_accuracy - fp32.noise_accuracy) <= 0.1


def test_measure_converted_is_seeded_and_leaves_global_rng_alone(exported):
    _model, src, x, y, _ = exported
    torch.manual_seed(5)
    state = torch.get_rng_state()
    a = measure_converted(src, x[:32], y[:32], harden.ThreatModel(eps=0.3), noise_samples=3, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    b = measure_converted(src, x[:32], y[:32], harden.ThreatModel(eps=0.3), noise_samples=3, seed=1)
    assert a.noise_accuracy == b.noise_accuracy
    assert a.transfer_accuracy is None
    none = measure_converted(src, x[:8], y[:8], THREAT, noise_samples=0)
    assert none.noise_accuracy is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"x": torch.rand(0, 1, 8, 8), "y": torch.zeros(0, dtype=torch.long)}, "non-empty"),
        ({"y": torch.zeros(3, dtype=torch.long)}, "integer labels"),
        ({"y": torch.zeros(8)}, "integer labels"),
        ({"adversarial": torch.rand(2, 1, 8, 8)}, "shape of x"),
        ({"noise_samples": -1}, "noise_samples"),
        ({"threat": {"eps": 0.1}}, "ThreatModel"),
        ({"onnx_path": "/nonexistent/m.onnx"}, "no such file"),
    ],
)
def test_measure_converted_refuses_bad_inputs(exported, kwargs, match):
    _model, src, *_ = exported
    args = {"onnx_path": src, "x": torch.rand(8, 1, 8, 8), "y": torch.zeros(8, dtype=torch.long), "threat": THREAT}
    with pytest.raises(harden.ExportError, match=match):
        measure_converted(**{**args, **kwargs})


def test_logit_parity_restores_modes(exported):
    _model, src, x, *_ = exported
    model = TinyCNN(num_classes=3).train()
    before = save_modes(model)
    logit_parity(src, model, x[:4])
    assert save_modes(model) == before


def test_non_finite_onnx_logits_are_scored_wrong(tmp_path):
    path = nan_above_half(tmp_path / "nan.onnx")
    x = torch.cat([torch.full((3, 1, 8, 8), 0.25), torch.full((5, 1, 8, 8), 0.75)])
    y = torch.zeros(8, dtype=torch.long)  # argmax of the NaN rows is 0: the label
    logits = onnx_logits(path, x)
    assert bool(torch.isnan(logits[3:]).all()) and bool(torch.isfinite(logits[:3]).all())
    acc = measure_converted(path, x, y, harden.ThreatModel(eps=0.1), adversarial=x.flip(0), noise_samples=2)
    assert acc.clean_accuracy == 3 / 8
    assert acc.transfer_accuracy == 3 / 8
    assert acc.noise_accuracy == 3 / 8  # noise of 0.1 keeps each mean on its side of 0.5
