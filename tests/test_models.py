"""Model adapters: Normalized, prepare_model, check_model, model_device, the output adapters."""

import types

import pytest
import torch
from torch import nn

import harden
from harden.models import Normalized, check_model, prepare_model
from harden.policy import ModelSpec
from harden.testing import SoftmaxHead, TinyCNN, TinyMLP


def test_normalized_equals_manual_normalization():
    inner = TinyCNN(num_classes=4, in_chans=3).eval()
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    net = Normalized(inner, mean, std).eval()
    x = torch.rand(5, 3, 8, 8)
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(net.normalize(x), manual, rtol=0, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(net(x), inner(manual), rtol=0, atol=1e-6)
    assert net.mean_values == pytest.approx(mean)
    assert net.std_values == pytest.approx(std)
    assert net.has_norm


def test_normalized_without_mean_std_is_the_identity():
    inner = TinyMLP(num_classes=2)
    net = Normalized(inner)
    x = torch.rand(3, 1, 8, 8)
    assert net.normalize(x) is x
    assert torch.equal(net(x), inner(x))
    assert (net.mean_values, net.std_values, net.has_norm) == (None, None, False)


def test_normalization_is_in_the_state_dict():
    net = Normalized(TinyMLP(num_classes=2), (0.5,), (0.25,))
    state = net.state_dict()
    assert torch.equal(state["mean"], torch.tensor([0.5]).view(1, 1, 1, 1))
    assert torch.equal(state["std"], torch.tensor([0.25]).view(1, 1, 1, 1))


@pytest.mark.parametrize(
    ("mean", "std", "match"),
    [
        ((0.5, 0.5), (0.2,), "equal length"),
        ((0.5,), None, "both mean and std"),
        (None, (0.5,), "both mean and std"),
        ((0.5,), (0.0,), "std > 0"),
        ((0.5,), (-1.0,), "std > 0"),
    ],
)
def test_normalized_rejects_bad_mean_std(mean, std, match):
    with pytest.raises(harden.ModelError, match=match):
        Normalized(TinyMLP(num_classes=2), mean, std)


def test_prepare_model_wraps_once():
    inner = TinyMLP(num_classes=2)
    wrapped = prepare_model(inner)
    assert isinstance(wrapped, Normalized)
    assert wrapped.model is inner
    assert prepare_model(wrapped) is wrapped
    assert prepare_model(prepare_model(wrapped)) is wrapped
    spec = ModelSpec(name="harden.testing:TinyMLP", mean=(0.5,), std=(0.5,))
    with_norm = prepare_model(TinyMLP(num_classes=2), spec)
    assert with_norm.mean_values == (0.5,)
    with pytest.raises(harden.ModelError, match=r"torch\.nn\.Module"):
        prepare_model(lambda x: x)


def test_model_has_no_side_effects_on_input():
    net = Normalized(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), (0.5,), (0.25,))
    x = torch.rand(1, 1, 2, 2)
    x0 = x.clone()
    net(x)
    assert torch.equal(x, x0)


def test_check_model_names_a_channel_mismatch():
    with pytest.raises(harden.ModelError) as info:
        check_model(TinyCNN(num_classes=3, in_chans=3), torch.rand(1, 1, 8, 8))
    assert "expected a model that accepts the data's images (a batch of shape (1, 1, 8, 8)), got RuntimeError" in str(
        info.value
    )


def test_check_model_blames_a_head_too_small_for_the_data_and_keeps_modes():
    net = TinyCNN(num_classes=5).train()
    with pytest.raises(harden.ModelError) as info:
        check_model(net, torch.rand(1, 1, 8, 8), num_classes=10)
    assert str(info.value) == (
        "expected the model to output 10 logits (the data has 10 classes), got 5: set model.num_classes / "
        "the classifier size to the data's classes"
    )
    assert net.training and all(m.training for m in net.modules())


def test_check_model_warns_about_a_softmax_head():
    net = SoftmaxHead(TinyMLP(num_classes=3), temperature=1.0)
    with pytest.warns(RuntimeWarning, match="expected logits from the model, got probabilities"):
        assert check_model(net, torch.rand(2, 1, 8, 8), num_classes=3) == 3


def test_model_device_follows_the_model_when_it_moves():
    from harden.models import has_state, model_device

    model = torch.nn.Linear(2, 2)
    assert model_device(model) == torch.device("cpu")
    model.to("meta")
    assert model_device(model) == torch.device("meta")  # read afresh on every call, never cached
    assert has_state(model) and not has_state(torch.nn.ReLU())
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")


def test_check_model_asks_one_class_data_for_two_logits_not_one():
    with pytest.raises(harden.ModelError, match=r"expected at least 2 logits per image from the model, got 1$"):
        check_model(TinyCNN(num_classes=1), torch.rand(2, 1, 8, 8), num_classes=1)


# --- output adapters ------------------------------------------------------------------------------


class DictOut(nn.Module):
    """Returns ``{"logits": ..., "features": ...}`` like many detection / HF-style heads."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyMLP(num_classes=3)

    def forward(self, x):
        return {"features": x.flatten(1), "logits": self.body(x)}


class TupleOut(DictOut):
    def forward(self, x):
        return (self.body(x), x.flatten(1))


class ObjectOut(DictOut):
    def forward(self, x):
        return types.SimpleNamespace(logits=self.body(x), hidden=x)


class NamesOut(DictOut):
    def forward(self, x):
        return {"logits": self.body(x), "names": ["cat", "dog"]}


@pytest.mark.parametrize(("cls", "output"), [(DictOut, "logits"), (TupleOut, 0), (ObjectOut, "logits")])
def test_the_output_adapter_reads_the_logits_out_of_a_dict_a_tuple_or_an_object(cls, output):
    inner = cls()
    net = Normalized(inner, (0.5,), (0.25,), output=output).eval()
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(net(x), inner.body((x - 0.5) / 0.25))
    assert check_model(net, x, num_classes=3) == 3
    assert prepare_model(inner, ModelSpec(name="harden.testing:TinyMLP", output=output)).output == output


@pytest.mark.parametrize(
    ("cls", "got", "hint"),
    [
        (DictOut, "a dict with keys ['features', 'logits']", "`model.output: logits`; output='logits' in Python"),
        (TupleOut, "a tuple of 2 items", "`model.output: 0`; output=0 in Python"),
        (ObjectOut, "a SimpleNamespace with attribute .logits", "`model.output: logits`"),
    ],
)
def test_a_model_that_returns_no_tensor_asks_for_model_output_in_one_line(cls, got, hint):
    with pytest.raises(harden.ModelError) as info:
        check_model(Normalized(cls()), torch.rand(2, 1, 8, 8), num_classes=3)
    message = str(info.value)
    assert message.startswith(f"expected logits (a tensor) from the model, got {got}; set model.output to ")
    assert hint in message and "\n" not in message


def test_a_wrong_output_adapter_names_what_came_back():
    with pytest.raises(
        harden.ModelError, match=r"model.output: expected 'scores' in what the model returns, got a dict"
    ):
        Normalized(DictOut(), output="scores")(torch.rand(1, 1, 8, 8))
    with pytest.raises(
        harden.ModelError, match=r"model.output: expected 2 in what the model returns, got a tuple of 2"
    ):
        Normalized(TupleOut(), output=2)(torch.rand(1, 1, 8, 8))
    with pytest.raises(harden.ModelError, match=r"model.output: expected the logits tensor at 'names', got list"):
        Normalized(NamesOut(), output="names")(torch.rand(1, 1, 8, 8))
    for bad in (-1, True, 1.5, ""):
        with pytest.raises(harden.ModelError, match=r"model\.output"):
            Normalized(DictOut(), output=bad)


def test_a_model_with_an_output_adapter_exports_to_onnx_with_parity(tmp_path):
    from harden.export import export_onnx

    torch.manual_seed(0)
    net = Normalized(DictOut(), (0.5,), (0.25,), output="logits")
    result = export_onnx(net, tmp_path / "dict.onnx", input_shape=(1, 8, 8))
    assert result.path.is_file() and result.parity_argmax_agreement == 1.0
    assert result.exporter == "dynamo"  # traced as it is: no fallback to TorchScript
    assert result.parity_max_abs_diff <= 1e-4


def test_describe_normalization_is_one_line():
    assert Normalized(TinyMLP()).describe_normalization() == "none: the model sees pixels in [0, 1]"
    net = Normalized(TinyMLP(in_chans=3), (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert net.describe_normalization() == "mean (0.4914, 0.4822, 0.4465), std (0.247, 0.2435, 0.2616)"
