"""export_onnx on a timm CNN, a timm ViT and a custom module; parity on adversarial inputs.

tests/test_verify_export.py covers TinyCNN and timm resnet10t in train mode, the TorchScript
fallback and failures; here: the full ONNX contract (named I/O, dynamic batch axis, every
metadata key, parity, train/eval mode restored) on more architectures, and the adversarial
parity test."""

import copy
import hashlib
import json
import os
import stat
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import yaml
from torch import nn

import harden
import harden.export as export_module
from harden.attacks import ATTACKS
from harden.attacks.base import restore_modes, save_modes
from harden.cli import main
from harden.errors import InputError
from harden.models import Normalized
from harden.testing import TinyCNN, synthetic_tensors, tiny_policy

METADATA_KEYS = {
    "harden_version",
    "policy_hash",
    "certificate_verdict",
    "robust_accuracy",
    "input_range",
    "input_layout",
    "mean",
    "std",
    "class_names",
}


class CustomNet(nn.Module):
    """A hand-written classifier: conv stem, a residual block with GroupNorm, SiLU, max pooling."""

    def __init__(self, in_chans: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_chans, 8, 3, padding=1)
        self.block = nn.Sequential(nn.GroupNorm(2, 8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.drop = nn.Dropout(0.5)  # active in train mode: export must evaluate in eval mode
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + self.block(h)
        h = torch.amax(h, dim=(2, 3))
        return self.head(self.drop(h))


def make_model(kind: str) -> tuple[nn.Module, tuple[int, int, int], int]:
    torch.manual_seed(0)
    if kind == "resnet10t":
        return timm.create_model("resnet10t", num_classes=3, in_chans=1), (1, 16, 16), 3
    if kind == "vit":
        vit = timm.create_model(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=3, in_chans=3, pretrained=False
        )
        return vit, (3, 32, 32), 3
    if kind == "custom":
        net = Normalized(CustomNet(in_chans=3, num_classes=4), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
        return net, (3, 12, 12), 4
    raise ValueError(kind)


@pytest.fixture(scope="module")
def certificate():
    """A real (cheap) certificate: only its verdict and accuracies go into the metadata."""
    policy = tiny_policy(verify={"checks": False, "eps_sweep": [], "n_examples": 16})
    return harden.certify(TinyCNN(num_classes=3), policy, synthetic_tensors(16), progress=False)


def dim_is_dynamic(value_info) -> bool:
    dim = value_info.type.tensor_type.shape.dim[0]
    return dim.HasField("dim_param") and not dim.HasField("dim_value")


@pytest.mark.parametrize(
    ("kind", "train_mode"),
    [("resnet10t", False), ("vit", True), ("vit", False), ("custom", True), ("custom", False)],
)
def test_export_contract(kind, train_mode, tmp_path, certificate):
    model, shape, n_classes = make_model(kind)
    model.train(train_mode)
    before = save_modes(model)
    policy = tiny_policy()
    names = tuple(f"c{i}" for i in range(n_classes))
    path = tmp_path / f"{kind}.onnx"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = harden.export_onnx(
            model, path, policy=policy, certificate=certificate, input_shape=shape, class_names=names
        )
    fell_back = any("falling back to the TorchScript exporter" in str(w.message) for w in caught)
    assert (result.exporter == "torchscript") == fell_back  # a fallback is never silent
    assert save_modes(model) == before  # train in -> train after; eval in -> eval after
    assert model.training is train_mode

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert [i.name for i in proto.graph.input] == ["pixels"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert dim_is_dynamic(proto.graph.input[0])
    assert dim_is_dynamic(proto.graph.output[0])
    meta = {p.key: p.value for p in proto.metadata_props}
    assert set(meta) >= METADATA_KEYS
    assert meta["harden_version"] == harden.__version__
    assert meta["policy_hash"] == harden.policy_hash(policy)
    assert meta["certificate_verdict"] == certificate.verdict
    assert float(meta["robust_accuracy"]) == pytest.approx(certificate.robust_accuracy, abs=1e-6)
    assert (meta["input_range"], meta["input_layout"]) == ("[0, 1]", "NCHW")
    assert json.loads(meta["class_names"]) == list(names)
    if kind == "custom":
        assert json.loads(meta["mean"]) == pytest.approx([0.5, 0.4, 0.3])
        assert json.loads(meta["std"]) == pytest.approx([0.2, 0.25, 0.3])

    assert result.parity_max_abs_diff <= 1e-4
    assert result.parity_argmax_agreement == 1.0
    assert result.parity_adversarial_examples is None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = Normalized(model) if not isinstance(model, Normalized) else model
    modes = save_modes(reference)
    reference.eval()
    for batch in (1, 7):
        x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch))
        got = sess.run(["logits"], {"pixels": x.numpy()})[0]
        with torch.no_grad():
            want = reference(x).numpy()
        assert got.shape == (batch, n_classes)
        assert float(np.abs(got - want).max()) <= 1e-4
        assert (got.argmax(1) == want.argmax(1)).all()
    restore_modes(reference, modes)


# --------------------------------------------------------------------------- adversarial parity


def pgd_examples(model, x, y, eps=0.1):
    attack = ATTACKS.get("pgd")(harden.ThreatModel(eps=eps), {"steps": 5})
    torch.manual_seed(0)
    return attack(model, x, y)


def test_export_checks_parity_on_adversarial_inputs(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN(num_classes=3).eval()
    x, y = synthetic_tensors(24, seed=3)
    x_adv = pgd_examples(model, x, y)
    result = harden.export_onnx(model, tmp_path / "m.onnx", parity_inputs=x, adversarial_inputs=x_adv)
    assert result.parity_adversarial_examples == 24
    assert result.parity_adversarial_max_abs_diff <= 1e-4
    assert result.parity_adversarial_argmax_agreement == 1.0
    d = json.loads(json.dumps(result.to_dict()))
    assert d["parity_adversarial_examples"] == 24
    assert d["parity_adversarial_argmax_agreement"] == 1.0


def test_export_without_adversarial_inputs_reports_none(tmp_path):
    result = harden.export_onnx(TinyCNN(num_classes=3), tmp_path / "m.onnx", input_shape=(1, 8, 8))
    d = result.to_dict()
    assert d["parity_adversarial_examples"] is None
    assert d["parity_adversarial_max_abs_diff"] is None
    assert d["parity_adversarial_argmax_agreement"] is None


class BranchOnSum(nn.Module):
    """Python control flow: tracing freezes the branch of the example, so an all-zero input differs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if float(x.sum()) > 0.0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1)) + 1.0


def test_adversarial_parity_failure_raises_and_leaves_no_file(tmp_path):
    path = tmp_path / "branch.onnx"
    with (
        pytest.warns(RuntimeWarning, match="falling back"),
        pytest.raises(harden.ExportError, match="adversarial inputs"),
    ):
        harden.export_onnx(BranchOnSum(), path, input_shape=(1, 2, 2), adversarial_inputs=torch.zeros(3, 1, 2, 2))
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.rand(4, 1, 9, 9), r"non-empty \(N, 1, 8, 8\)"),
        (torch.rand(0, 1, 8, 8), "non-empty"),
        (torch.rand(4, 1, 8, 8) * 2, r"pixels in \[0, 1\]"),
        (np.zeros((4, 1, 8, 8), np.float32), "ndarray"),
        (torch.full((4, 1, 8, 8), float("nan")), "adversarial_inputs: expected finite pixels"),
    ],
)
def test_export_refuses_bad_adversarial_inputs(tmp_path, bad, match):
    with pytest.raises(harden.ExportError, match=match):
        harden.export_onnx(TinyCNN(num_classes=3), tmp_path / "m.onnx", input_shape=(1, 8, 8), adversarial_inputs=bad)
    assert not (tmp_path / "m.onnx").exists()


def test_bad_adversarial_pixels_are_the_one_input_contract(tmp_path):
    with pytest.raises(harden.ExportError, match=r"^adversarial_inputs: expected pixels in \[0, 1\]") as info:
        harden.export_onnx(
            TinyCNN(num_classes=3),
            tmp_path / "m.onnx",
            input_shape=(1, 8, 8),
            adversarial_inputs=-torch.ones(2, 1, 8, 8),
        )
    assert isinstance(info.value.__cause__, InputError)  # raised by harden.data.check_pixels


def test_run_checks_parity_on_the_suites_adversarial_examples(tmp_path):
    policy = tiny_policy(verify={"checks": False, "eps_sweep": [], "n_examples": 48})
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(policy.model_dump(mode="json")))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "-q"]) == 0
    cert = json.loads((out / "certificate.json").read_text())
    export = cert["export"]
    attacked = cert["n"] - cert["broken_by"]["clean"]
    assert export["parity_adversarial_examples"] == min(policy.export.parity_examples, attacked)
    assert export["parity_adversarial_examples"] > 0
    assert export["parity_adversarial_max_abs_diff"] <= policy.export.parity_atol
    assert export["parity_adversarial_argmax_agreement"] == 1.0


@pytest.mark.gpu
def test_export_of_a_cuda_model_leaves_it_on_cuda_in_its_mode(tmp_path):
    torch.manual_seed(0)
    model = TinyCNN(num_classes=3).cuda().eval()
    x, y = (t.cuda() for t in synthetic_tensors(24, seed=3))
    x_adv = pgd_examples(model, x, y)  # CUDA parity inputs: export takes them where they are
    model.train()
    result = harden.export_onnx(model, tmp_path / "m.onnx", parity_inputs=x, adversarial_inputs=x_adv)
    assert all(p.device.type == "cuda" for p in model.parameters()) and model.training
    assert result.parity_max_abs_diff <= 1e-4 and result.parity_adversarial_max_abs_diff <= 1e-4
    assert result.parity_argmax_agreement == 1.0


def run_onnx(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"pixels": x.numpy()})[0]


def check_export(model, path, shape, num_classes, policy=None):
    torch.manual_seed(0)
    before = save_modes(model)
    result = harden.export_onnx(model, path, policy=policy, input_shape=shape)
    assert save_modes(model) == before  # the caller's (train) modes are untouched
    assert result.path == path and path.is_file()
    assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["harden_version"] == harden.__version__
    assert "mean" in meta and "std" in meta
    assert result.metadata == meta
    assert result.parity_max_abs_diff <= 1e-4
    assert result.parity_argmax_agreement == 1.0
    assert "CPUExecutionProvider" in result.providers
    assert result.exporter in ("dynamo", "torchscript")
    assert result.opset >= 13
    reference = copy.deepcopy(model).eval()
    for batch in (1, 7):  # dynamic batch axis
        x = torch.rand(batch, *shape)
        got = run_onnx(path, x)
        assert got.shape == (batch, num_classes)
        with torch.no_grad():
            want = reference(x).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    return result, meta


def test_export_tinycnn_with_policy(tmp_path):
    torch.manual_seed(0)
    model = Normalized(TinyCNN(num_classes=3), (0.5,), (0.25,)).train()
    policy = tiny_policy()
    result, meta = check_export(model, tmp_path / "tiny.onnx", (1, 8, 8), 3, policy=policy)
    assert meta["policy_hash"] == harden.policy_hash(policy)
    assert json.loads(meta["mean"]) == [0.5]
    assert json.loads(meta["std"]) == [0.25]
    assert json.loads(meta["threat_model"])["eps"] == 0.1
    assert result.parity_examples == policy.export.parity_examples
    assert model.training and model.model.features[1].training


def test_export_timm_resnet10t(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10, in_chans=1).train()
    _result, meta = check_export(model, tmp_path / "resnet.onnx", (1, 16, 16), 10)
    assert json.loads(meta["mean"]) is None  # no normalization given
    assert "policy_hash" not in meta
    assert all(m.training for m in model.modules())


def test_export_leaves_only_the_model_file(tmp_path):
    harden.export_onnx(TinyCNN(num_classes=3), tmp_path / "m.onnx", input_shape=(1, 8, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_export_needs_an_input_shape(tmp_path):
    with pytest.raises(harden.ExportError, match="input_shape"):
        harden.export_onnx(TinyCNN(num_classes=3), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


class DataDependentBranch(nn.Module):
    """Python control flow on a tensor value: torch.export refuses it, tracing freezes one branch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if float(x.sum()) > 0.0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


class Unexportable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        raise NotImplementedError("this model cannot be traced")


def test_export_falls_back_with_a_warning(tmp_path):
    path = tmp_path / "branch.onnx"
    with pytest.warns(RuntimeWarning, match="falling back to the TorchScript exporter"):
        result = harden.export_onnx(DataDependentBranch(), path, input_shape=(1, 2, 2))
    assert result.exporter == "torchscript"
    assert result.parity_argmax_agreement == 1.0
    assert path.is_file()


def test_unexportable_model_raises_export_error_and_leaves_no_file(tmp_path):
    path = tmp_path / "bad.onnx"
    with (
        pytest.warns(RuntimeWarning, match="dynamo ONNX export failed"),
        pytest.raises(harden.ExportError, match="export to ONNX"),
    ):
        harden.export_onnx(Unexportable(), path, input_shape=(1, 2, 2))
    assert not path.exists()
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.parametrize("failure", [harden.ExportError("parity"), KeyboardInterrupt()])
def test_a_failure_inside_export_leaves_no_temp_folder(tmp_path, monkeypatch, failure):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(export_module, "build_session", fail)  # after the graph is in the temp folder
    with pytest.raises(type(failure)):
        harden.export_onnx(TinyCNN(num_classes=3), tmp_path / "model.onnx", input_shape=(1, 8, 8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_the_onnx_file_is_fsynced_and_gets_the_mode_of_every_harden_file(tmp_path, monkeypatch, umask, mode):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    old = os.umask(umask)
    try:
        harden.export_onnx(TinyCNN(num_classes=3), tmp_path / "model.onnx", input_shape=(1, 8, 8))
    finally:
        os.umask(old)
    monkeypatch.undo()
    assert stat.S_IMODE((tmp_path / "model.onnx").stat().st_mode) == mode
    if os.path.exists("/proc/self/fd"):  # the file in its temp folder, then the target's folder
        assert len(synced) == 2 and synced[0].endswith("/model.onnx") and synced[0] != str(tmp_path / "model.onnx")
        assert synced[1] == str(tmp_path)


class _Shifted:
    """A stand-in onnxruntime session: torch's logits plus a fixed offset per class."""

    def __init__(self, net, offset):
        self.net, self.offset = net, offset

    def run(self, names, feeds):
        x = torch.from_numpy(next(iter(feeds.values())))
        with torch.no_grad():
            return [self.net(x).numpy() + self.offset]


def test_parity_forgives_a_swapped_near_tie_and_nothing_else():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        net[1].bias.zero_()
    x = torch.tensor([[0.5, 0.5 + 1e-5, 0, 0], [0.9, 0.1, 0, 0]]).view(2, 1, 2, 2)  # row 0: a near tie
    swap = np.array([2e-5, 0.0], dtype=np.float32)  # within atol, flips row 0's argmax only
    diff, agree = export_module._parity(net, _Shifted(net, swap), x, atol=1e-4)
    assert diff <= 1e-4 and agree == 0.5
    # within atol only near ties can swap; an offset that swaps the decided row 1 exceeds atol
    far = np.array([0.0, 0.9], dtype=np.float32)
    with pytest.raises(harden.ExportError, match=r"argmax agreement 50\.00%"):
        export_module._parity(net, _Shifted(net, far), x, atol=0.3)


def test_the_producer_is_harden_at_its_own_version_and_torch_is_recorded(tmp_path):
    path = tmp_path / "tiny.onnx"
    result = harden.export_onnx(TinyCNN(num_classes=3), path, input_shape=(1, 8, 8))
    proto = onnx.load(str(path))
    assert (proto.producer_name, proto.producer_version) == ("harden", harden.__version__)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["torch_version"] == torch.__version__ and meta["harden_version"] == harden.__version__
    assert result.metadata == meta  # what the certificate records is what the file holds
