"""Model adapters: Normalized, build_model from timm / module:attr, weights, name checks."""

import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import harden
from harden.models import (
    Normalized,
    build_model,
    check_model,
    check_timm_name,
    import_object,
    prepare_model,
)
from harden.policy import ModelSpec
from harden.testing import SoftmaxHead, TinyCNN, TinyMLP

HERE = Path(__file__).resolve().parent


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


def test_build_model_timm_resnet10t():
    net = build_model(ModelSpec(name="timm:resnet10t", num_classes=10, in_chans=1), num_classes=10, in_chans=1)
    assert isinstance(net, Normalized)
    assert not net.has_norm  # no pretrained weights: no normalization unless the policy sets it
    net.eval()
    with torch.no_grad():
        out = net(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


def test_build_model_timm_with_policy_mean_std():
    net = build_model(ModelSpec(name="timm:resnet10t", mean=(0.1307,), std=(0.3081,)), num_classes=10, in_chans=1)
    assert net.mean_values == pytest.approx((0.1307,))
    assert net.std_values == pytest.approx((0.3081,))


def test_build_model_checks_spec_against_data():
    with pytest.raises(harden.ModelError, match="num_classes"):
        build_model(ModelSpec(name="harden.testing:TinyCNN", num_classes=5), num_classes=10, in_chans=1)
    with pytest.raises(harden.ModelError, match="in_chans"):
        build_model(ModelSpec(name="harden.testing:TinyCNN", in_chans=3), num_classes=10, in_chans=1)
    with pytest.raises(harden.ModelError, match="ModelSpec"):
        build_model({"name": "harden.testing:TinyCNN"}, num_classes=10, in_chans=1)


def test_build_model_timm_bad_args():
    with pytest.raises(harden.ModelError, match="arguments timm accepts"):
        build_model(ModelSpec(name="timm:resnet10t", args={"no_such_argument": 1}), num_classes=10, in_chans=1)


def test_build_model_module_attr_class():
    net = build_model(ModelSpec(name="harden.testing:TinyCNN", args={"width": 4}), num_classes=3, in_chans=2)
    assert isinstance(net.model, TinyCNN)
    assert net.model.head.out_features == 3
    assert net.model.features[0].in_channels == 2
    assert net.model.features[0].out_channels == 4
    assert net(torch.rand(2, 2, 8, 8)).shape == (2, 3)


def _fake_module(monkeypatch, name: str, source: str) -> types.ModuleType:
    """A module ``name`` (in ``sys.modules`` for this test only) whose code is ``source``."""
    module = types.ModuleType(name)
    exec(compile(source, f"<{name}>", "exec"), module.__dict__)  # its classes and functions get __module__ = name
    monkeypatch.setitem(sys.modules, name, module)
    return module


@pytest.fixture
def fake_pkgs(monkeypatch):
    """``evilpkg_h.models``: its own model class, instance and factory, and what it imported from elsewhere."""
    other = _fake_module(
        monkeypatch,
        "otherpkg_h",
        "from torch import nn\nCALLS = []\ndef record(**kw):\n    CALLS.append(kw)\n    return nn.Linear(1, 2)\n",
    )
    _fake_module(monkeypatch, "evilpkg_h.helpers", "from torch import nn\nclass Helper(nn.Flatten):\n    pass\n")
    models = _fake_module(
        monkeypatch,
        "evilpkg_h.models",
        "import os\nfrom os import system\nfrom torch import nn\nfrom otherpkg_h import record\n"
        "from evilpkg_h.helpers import Helper\n"
        "class Net(nn.Sequential):\n"
        "    def __init__(self, num_classes=3, in_chans=1):\n"
        "        super().__init__(nn.Flatten(), nn.Linear(in_chans * 64, num_classes))\n"
        "NET = Net()\nFOREIGN = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))\n"
        "def oom(**kw):\n    raise MemoryError()\n"
        "def huge(**kw):\n    raise RuntimeError('DefaultCPUAllocator: can\\'t allocate memory: you tried 9 EB\\nmore')\n",
    )
    return models, other


def test_build_model_module_attr_instance(fake_pkgs, monkeypatch):
    models, _ = fake_pkgs
    net = build_model(ModelSpec(name="evilpkg_h.models:NET"), num_classes=3, in_chans=1)
    assert net.model is models.NET  # used as it is, not copied
    assert net(torch.rand(2, 1, 8, 8)).shape == (2, 3)
    # an instance of a class from another package is not the named package's code
    monkeypatch.syspath_prepend(str(HERE))
    with pytest.raises(
        harden.ModelError, match=r"defined in package 'helpers_data', got an object from 'harden\.tiny'"
    ):
        build_model(ModelSpec(name="helpers_data:TINY_MLP"), num_classes=3, in_chans=1)


def test_import_object_refuses_what_the_module_only_imported_before_calling_it(fake_pkgs):
    models, other = fake_pkgs
    spec = ModelSpec(name="evilpkg_h.models:record", args={"command": "echo pwned"})
    with pytest.raises(harden.ModelError) as info:
        build_model(spec, num_classes=3, in_chans=1)
    assert str(info.value) == (
        "expected 'evilpkg_h.models:record' to be defined in package 'evilpkg_h', got an object from 'otherpkg_h'; "
        "name the code where it is defined"
    )
    assert other.CALLS == []  # refused before anything was called
    with pytest.raises(
        harden.ModelError,
        match=r"^expected 'evilpkg_h\.models:system' to be defined in package "
        r"'evilpkg_h', got an object from '(posix|nt)'; name the code where it is defined$",
    ):
        build_model(ModelSpec(name="evilpkg_h.models:system", args={"command": "x"}), num_classes=3, in_chans=1)
    with pytest.raises(harden.ModelError, match=r"got the module 'os'"):
        import_object("evilpkg_h.models:os")
    with pytest.raises(harden.ModelError, match=r"got an object from 'torch\.nn\.modules\.container'; name a function"):
        import_object("evilpkg_h.models:FOREIGN")
    with pytest.raises(harden.ModelError, match=r"got the module '(posixpath|ntpath)'"):  # a module is no one's code
        import_object("os:path")
    assert import_object("evilpkg_h.models:Net") is models.Net
    assert import_object("evilpkg_h.models:Helper") is models.Helper  # another module of the same package: fine


def test_import_object_takes_one_public_name_even_from_python():
    for bad in (
        "harden.checkpoint:os.system",
        "harden.models:Normalized.normalize",
        "harden.testing:__all__",
        "harden.testing:_merge",
        "harden.testing",
    ):
        with pytest.raises(harden.ModelError, match=r"^expected 'package\.module:Name' \(one public name"):
            import_object(bad)
    with pytest.raises(harden.ModelError, match="got the module 'os'"):
        import_object("harden.checkpoint:os")  # allowing harden allows harden's code, not what it imports


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"act_layer": "zzz"}, "KeyError: no such name 'zzz'"),
        ({"global_pool": "bogus"}, "AssertionError: Invalid pool type: bogus"),
        ({"output_stride": 3}, "AssertionError"),
        ({"no_such_arg": 1}, "TypeError: "),
    ],
)
def test_bad_timm_args_are_one_line_naming_model_args(args, error):
    with pytest.raises(harden.ModelError) as info:
        build_model(ModelSpec(name="timm:resnet10t", args=args), num_classes=3, in_chans=1)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("model.args: expected arguments timm accepts for 'timm:resnet10t'"), msg
    assert f"(given: {next(iter(args))}), got {error}" in msg, msg


@pytest.mark.parametrize(
    ("name", "args", "error"),
    [
        ("harden.testing:TinyCNN", {"widht": 8}, "TypeError: TinyCNN.__init__() got an unexpected keyword argument"),
        ("evilpkg_h.models:oom", {"width": 10**8}, "MemoryError;"),
        ("evilpkg_h.models:huge", {"width": 10**8}, "RuntimeError: DefaultCPUAllocator: can't allocate memory"),
    ],
)
def test_a_failing_factory_call_is_one_line_naming_model_args(fake_pkgs, name, args, error):
    with pytest.raises(harden.ModelError) as info:
        build_model(ModelSpec(name=name, args=args), num_classes=3, in_chans=1)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"model.args: expected arguments the factory accepts for {name!r}"), msg
    assert f"(given: {next(iter(args))}), got {error}" in msg, msg


def test_build_model_module_attr_errors():
    with pytest.raises(harden.ModelError, match="importable module"):
        build_model(ModelSpec(name="no_such_pkg_xyz:Net"), num_classes=3, in_chans=1)
    with pytest.raises(harden.ModelError, match="no attribute 'Nope'"):
        build_model(ModelSpec(name="harden.testing:Nope"), num_classes=3, in_chans=1)
    with pytest.raises(harden.ModelError, match=r"return an nn\.Module"):
        build_model(ModelSpec(name="harden.testing:synthetic_tensors"), num_classes=3, in_chans=1)


def test_import_object():
    assert import_object("harden.testing:TinyCNN") is TinyCNN  # defined in harden.tiny: the same package
    assert import_object("harden.models:Normalized") is Normalized
    with pytest.raises(harden.ModelError, match=r"package\.module:Name"):
        import_object("harden.testing")


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


def test_missing_pretrained_file_raises(tmp_path):
    missing = tmp_path / "nope.safetensors"
    spec = ModelSpec(name="harden.testing:TinyCNN", pretrained_file=str(missing))
    with pytest.raises(harden.ModelError, match="does not exist") as info:
        build_model(spec, num_classes=3, in_chans=1)
    assert str(missing) in str(info.value)


def test_build_model_with_pretrained_timm_file_uses_timm_normalization(tmp_path):
    src = build_model(ModelSpec(name="timm:resnet10t"), num_classes=10, in_chans=1)
    path = tmp_path / "resnet.safetensors"
    save_file(src.model.state_dict(), str(path))
    net = build_model(ModelSpec(name="timm:resnet10t", pretrained_file=str(path)), num_classes=10, in_chans=1)
    assert torch.equal(net.model.conv1[0].weight, src.model.conv1[0].weight)
    # one input channel: the mean of timm's RGB statistics
    assert net.mean_values == pytest.approx(((0.485 + 0.456 + 0.406) / 3,))
    assert net.std_values == pytest.approx(((0.229 + 0.224 + 0.225) / 3,))


def test_check_timm_name():
    assert check_timm_name("resnet10t") is None
    with pytest.raises(harden.UnknownNameError) as info:
        check_timm_name("resnet10x")
    assert isinstance(info.value, KeyError)
    assert "resnet10t" in info.value.suggestions
    assert "did you mean" in str(info.value)
    with pytest.raises(harden.UnknownNameError) as info:
        check_timm_name("qqqqqqqqqqqq")
    assert info.value.suggestions == ()


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


def test_check_model_refuses_too_few_logits_and_keeps_modes():
    net = TinyCNN(num_classes=2).train()
    with pytest.raises(harden.ModelError, match=r"expected at least 3 \(the data's classes\) logits per image"):
        check_model(net, torch.rand(1, 1, 8, 8), num_classes=3)
    assert net.training and all(m.training for m in net.modules())


def test_check_model_warns_about_a_softmax_head():
    net = SoftmaxHead(TinyMLP(num_classes=3), temperature=1.0)
    with pytest.warns(RuntimeWarning, match="expected logits from the model, got probabilities"):
        assert check_model(net, torch.rand(2, 1, 8, 8), num_classes=3) == 3


def test_unknown_timm_model_suggests_close_names(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("objectives: [{name: ce}]\n" + "model: {name: 'timm:resnet10'}\n")
    with pytest.raises(harden.PolicyError) as info:
        harden.load_policy(path)
    message = str(info.value)
    assert "model.name: expected a timm model name, got 'resnet10'; did you mean " in message
    assert "'resnet10t'" in message


def test_model_device_follows_the_model_when_it_moves():
    from harden.models import has_state, model_device

    model = torch.nn.Linear(2, 2)
    assert model_device(model) == torch.device("cpu")
    model.to("meta")
    assert model_device(model) == torch.device("meta")  # read afresh on every call, never cached
    assert has_state(model) and not has_state(torch.nn.ReLU())
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")


def test_build_model_starts_a_timm_model_of_fewer_classes_from_a_file_and_says_so(tmp_path):
    src = build_model(ModelSpec(name="timm:resnet10t"), num_classes=10, in_chans=1)
    path = tmp_path / "resnet.safetensors"
    save_file(src.model.state_dict(), str(path))
    with pytest.warns(
        UserWarning, match=r"skipped the classifier fc\.bias, fc\.weight \(shape differs: 10 → 3 classes\)"
    ):
        net = build_model(ModelSpec(name="timm:resnet10t", pretrained_file=str(path)), num_classes=3, in_chans=1)
    assert torch.equal(net.model.conv1[0].weight, src.model.conv1[0].weight)
    assert net.model.fc.weight.shape == (3, src.model.fc.weight.shape[1])


def test_check_model_asks_one_class_data_for_two_logits_not_one():
    with pytest.raises(harden.ModelError, match=r"expected at least 2 logits per image from the model, got 1$"):
        check_model(TinyCNN(num_classes=1), torch.rand(2, 1, 8, 8), num_classes=1)
