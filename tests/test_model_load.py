"""Loading models: build_model from timm / module:attr, import_object, check_timm_name, weights, load_model."""

import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import harden
from harden.model_load import (
    build_model,
    check_timm_name,
    import_object,
    load_classifier_weights,
    load_model,
)
from harden.models import Normalized
from harden.policy import ModelSpec
from harden.testing import TinyCNN, TinyMLP, tiny_policy

HERE = Path(__file__).resolve().parent


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


def test_missing_pretrained_file_raises(tmp_path):
    missing = tmp_path / "nope.safetensors"
    spec = ModelSpec(name="harden.testing:TinyCNN", pretrained_file=str(missing))
    with pytest.raises(harden.ModelError, match="does not exist") as info:
        build_model(spec, num_classes=3, in_chans=1)
    assert str(missing) in str(info.value)


def test_a_timm_pretrained_file_never_switches_the_normalization_and_the_warning_says_how(tmp_path):
    src = build_model(ModelSpec(name="timm:resnet10t"), num_classes=10, in_chans=1)
    path = tmp_path / "resnet.safetensors"
    save_file(src.model.state_dict(), str(path))
    with pytest.warns(UserWarning, match="harden applies no normalization") as caught:
        net = build_model(ModelSpec(name="timm:resnet10t", pretrained_file=str(path)), num_classes=10, in_chans=1)
    assert torch.equal(net.model.conv1[0].weight, src.model.conv1[0].weight)
    assert (net.has_norm, net.describe_normalization()) == (False, "none: the model sees pixels in [0, 1]")
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():  # the pixels reach the network as they are
        assert torch.equal(net.eval()(x), src.model.eval()(x))
    # one input channel: timm's RGB statistics averaged, named with how to apply them
    mean, std = (0.485 + 0.456 + 0.406) / 3, (0.229 + 0.224 + 0.225) / 3
    (message,) = [str(w.message) for w in caught if "normalization" in str(w.message)]
    assert f"set model.mean: [{mean:.6g}] and model.std: [{std:.6g}] (or --mean/--std)" in message
    assert "\n" not in message


def test_a_timm_pretrained_file_with_a_stated_normalization_keeps_it_without_warning(tmp_path, recwarn):
    src = build_model(ModelSpec(name="timm:resnet10t"), num_classes=10, in_chans=1)
    path = tmp_path / "resnet.safetensors"
    save_file(src.model.state_dict(), str(path))
    spec = ModelSpec(name="timm:resnet10t", pretrained_file=str(path), mean=(0.5,), std=(0.25,))
    net = build_model(spec, num_classes=10, in_chans=1)
    assert (net.mean_values, net.std_values) == ((0.5,), (0.25,))
    assert not [w for w in recwarn if "normalization" in str(w.message)]


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


def test_unknown_timm_model_suggests_close_names(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("objectives: [{name: ce}]\n" + "model: {name: 'timm:resnet10'}\n")
    with pytest.raises(harden.PolicyError) as info:
        harden.load_policy(path)
    message = str(info.value)
    assert "model.name: expected a timm model name, got 'resnet10'; did you mean " in message
    assert "'resnet10t'" in message


def test_build_model_starts_a_timm_model_of_fewer_classes_from_a_file_and_says_so(tmp_path):
    src = build_model(ModelSpec(name="timm:resnet10t"), num_classes=10, in_chans=1)
    path = tmp_path / "resnet.safetensors"
    save_file(src.model.state_dict(), str(path))
    with pytest.warns(
        UserWarning, match=r"skipped the classifier fc\.bias, fc\.weight \(shape differs: 10 → 3 classes\)"
    ):
        spec = ModelSpec(name="timm:resnet10t", pretrained_file=str(path), mean=(0.5,), std=(0.25,))
        net = build_model(spec, num_classes=3, in_chans=1)
    assert torch.equal(net.model.conv1[0].weight, src.model.conv1[0].weight)
    assert net.model.fc.weight.shape == (3, src.model.fc.weight.shape[1])


def test_build_model_passes_the_output_adapter():
    net = build_model(ModelSpec(name="harden.testing:TinyMLP", output=0), num_classes=3, in_chans=1)
    assert net.output == 0


class TupleOut(nn.Module):
    """Returns ``(logits, features)``: the logits are item 0."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinyMLP(num_classes=3)

    def forward(self, x):
        return (self.body(x), x.flatten(1))


# --- load_classifier_weights, load_model ----------------------------------------------------------


def _trained_tiny(seed=1):
    torch.manual_seed(seed)
    src = TinyCNN(num_classes=3)
    with torch.no_grad():  # non-default BatchNorm statistics: the buffers must load too
        src.features[1].running_mean.uniform_(-0.5, 0.5)
        src.features[1].running_var.uniform_(0.5, 2.0)
    return src.eval()


def _logits(net, x):
    with torch.no_grad():
        return net.eval()(x)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_plain_state_dict_loads_and_gives_the_originals_logits(tmp_path, suffix):
    src = _trained_tiny()
    path = tmp_path / f"plain{suffix}"
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    net = Normalized(TinyCNN(num_classes=3), (0.5,), (0.25,))
    load_classifier_weights(net, path)
    x = torch.rand(4, 1, 8, 8)
    # the same weights and the same operations on the same input: bit for bit the same logits
    assert torch.equal(_logits(net, x), _logits(src, (x - 0.5) / 0.25))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda k: f"module.{k}",
        lambda k: f"_orig_mod.{k}",
        lambda k: f"net.{k}",  # a LightningModule holding the model as self.net
        lambda k: f"model._orig_mod.{k}",
    ],
)
def test_prefixed_keys_load(tmp_path, wrap):
    src = _trained_tiny()
    path = tmp_path / "prefixed.pth"
    torch.save({"state_dict": {wrap(k): v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    net = Normalized(TinyCNN(num_classes=3))
    load_classifier_weights(net, path)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(_logits(net, x), _logits(src, x))


def test_harden_wrapped_weights_load_when_the_normalization_agrees(tmp_path):
    src = Normalized(_trained_tiny(), (0.5,), (0.25,))
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    net = Normalized(TinyCNN(num_classes=3), (0.5,), (0.25,))
    load_classifier_weights(net, path)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(_logits(net, x), _logits(src, x))
    bare = Normalized(_trained_tiny(2))  # without normalization, into a model without: fine too
    save_file({k: v.contiguous() for k, v in bare.state_dict().items()}, str(path))
    plain = Normalized(TinyCNN(num_classes=3))
    load_classifier_weights(plain, path)
    assert torch.equal(_logits(plain, x), _logits(bare, x)) and not plain.has_norm


@pytest.mark.parametrize(
    ("file_norm", "model_norm", "got"),
    [
        (((0.5,), (0.25,)), (None, None), "got mean (0.5), std (0.25) in the file and none: the model sees pixels"),
        (((0.5,), (0.25,)), ((0.1307,), (0.3081,)), "and mean (0.1307), std (0.3081) for the model"),
        ((None, None), ((0.5,), (0.25,)), "got none in the file and mean (0.5), std (0.25) for the model"),
    ],
)
def test_a_wrapped_file_of_another_normalization_is_refused_naming_both(tmp_path, file_norm, model_norm, got):
    path = tmp_path / "model.safetensors"
    save_file(
        {k: v.contiguous() for k, v in Normalized(TinyCNN(num_classes=3), *file_norm).state_dict().items()}, str(path)
    )
    net = Normalized(TinyCNN(num_classes=3), *model_norm)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(harden.ModelError) as info:
        load_classifier_weights(net, path)
    message = str(info.value)
    assert got in message and "never changes it silently" in message and "\n" not in message
    if file_norm[0] is not None:
        assert "--mean 0.5 --std 0.25 (or model.mean/model.std in the policy)" in message
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing loaded


def test_wrong_keys_are_one_line_listing_a_few(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(TinyMLP(num_classes=3).state_dict(), path)
    with pytest.raises(harden.ModelError) as info:
        load_classifier_weights(Normalized(TinyCNN(num_classes=3)), path)
    message = str(info.value)
    assert message.startswith(f"expected the model's keys in {str(path)!r}, got 11 missing (first: 'features.0.bias'")
    assert "and 4 unexpected (first: 'net.1.bias', 'net.1.weight', 'net.3.bias' ...)" in message
    assert "\n" not in message and "Error(s) in loading" not in message


def test_a_mis_shaped_classifier_is_named(tmp_path):
    path = tmp_path / "five.safetensors"
    save_file({k: v.contiguous() for k, v in TinyCNN(num_classes=5).state_dict().items()}, str(path))
    with pytest.raises(
        harden.ModelError, match=r"2 mis-shaped \(first: 'head.bias' is \(5,\) in the file, \(10,\) in the model\)"
    ):
        load_classifier_weights(Normalized(TinyCNN(num_classes=10)), path)


def test_a_pickled_object_file_is_refused_in_one_line(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": TinyCNN(num_classes=3)}, path)
    with pytest.raises(harden.ModelError, match="holding pickled Python objects") as info:
        load_classifier_weights(Normalized(TinyCNN(num_classes=3)), path)
    assert "\n" not in str(info.value)


def test_load_model_by_name_with_weights_and_explicit_normalization(tmp_path, caplog):
    src = _trained_tiny()
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    policy = tiny_policy(model={"name": "harden.testing:TinyMLP", "mean": [0.1], "std": [0.2]})
    with caplog.at_level("INFO", logger="harden"):
        net = load_model(
            "harden.testing:TinyCNN", policy, num_classes=3, in_chans=1, weights=path, mean=[0.5], std=[0.25]
        )
    assert (net.describe_normalization(), net.training) == ("mean (0.5), std (0.25)", False)
    assert "normalization: mean (0.5), std (0.25)" in caplog.text
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(_logits(net, x), _logits(src, (x - 0.5) / 0.25))
    # neither mean nor std: the policy's
    assert load_model(None, policy, num_classes=3, in_chans=1).mean_values == pytest.approx((0.1,))
    with pytest.raises(harden.ModelError, match="both mean and std"):
        load_model(None, policy, num_classes=3, in_chans=1, mean=[0.5])


def test_load_model_wraps_a_module_and_refuses_to_renormalize_a_wrapped_one():
    policy = tiny_policy(model={"mean": [0.1], "std": [0.2], "output": 0})
    inner = TupleOut()
    net = load_model(inner, policy, num_classes=3, in_chans=1)
    assert net.model is inner and net.mean_values == pytest.approx((0.1,)) and net.output == 0
    assert load_model(net, policy, num_classes=3, in_chans=1) is net
    with pytest.raises(
        harden.ModelError, match=r"expected mean \(0\.5\), std \(0\.25\) to match the Normalized model's"
    ):
        load_model(net, policy, num_classes=3, in_chans=1, mean=[0.5], std=[0.25])
    with pytest.raises(harden.ModelError, match=r"expected an nn\.Module"):
        load_model(3, policy, num_classes=3, in_chans=1)
