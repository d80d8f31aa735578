"""Mixed precision, channels_last and torch.compile in training (train.precision, ...)."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import harden
from harden.checkpoint import load_checkpoint
from harden.objectives import BatchContext, pgd_view
from harden.policy import ThreatModel
from harden.testing import TinyCNN, synthetic_tensors, tiny_policy

FAST = {"epochs": 1, "probe_examples": 0}


def fit(policy, run_dir, **kwargs):
    return harden.fit(None, policy, run_dir=run_dir, progress=False, **kwargs)


def test_precision_options_are_validated():
    train = tiny_policy(train={"precision": "bf16", "attack_precision": "same"}).train
    assert (train.precision, train.attack_precision) == ("bf16", "same")
    assert not train.channels_last and not train.compile
    for bad in ({"precision": "fp8"}, {"attack_precision": "fp16"}, {"compile": "sometimes"}):
        with pytest.raises(harden.PolicyError, match="train"):
            tiny_policy(train=bad)


class Recorder(nn.Module):
    """TinyCNN that records, per forward, its mode and whether CPU autocast is on."""

    def __init__(self):
        super().__init__()
        self.net = TinyCNN(num_classes=3)
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_autocast_enabled("cpu")))
        return self.net(x)


@pytest.mark.parametrize(("attack_precision", "attack_autocast"), [("fp32", False), ("same", True)])
def test_views_run_in_fp32_unless_the_policy_asks(attack_precision, attack_autocast):
    model = Recorder().train()
    x, y = synthetic_tensors(8)
    ctx = BatchContext(
        model, x, y, ThreatModel(eps=0.1), autocast_dtype=torch.bfloat16, attack_precision=attack_precision
    )
    logits = ctx.logits(pgd_view(2))
    assert logits.dtype == torch.float32  # objectives see float32 logits
    attack = {autocast for training, autocast in model.calls if not training}
    train = {autocast for training, autocast in model.calls if training}
    assert attack == {attack_autocast}  # the attack's forwards (eval mode)
    assert train == {True}  # the training forward


def test_bf16_on_cpu_trains_like_fp32(tmp_path):
    train = {"epochs": 2, "probe_examples": 64}
    fp32 = fit(tiny_policy(train=train), tmp_path / "fp32")
    bf16 = fit(tiny_policy(train={**train, "precision": "bf16"}), tmp_path / "bf16")
    for record in bf16.history:
        assert torch.isfinite(torch.tensor(record["train_loss"]))
    assert bf16.history[-1]["train_loss"] < bf16.history[0]["train_loss"]
    # bf16 kernels depend on the ISA, so the gap between two trainings cannot be derived; both must
    # learn instead. n = 192 validation images, 3 classes: P(>= 90 right | chance 1/3) < 1e-4
    # (binomial tail: 6.9e-5). The PGD accuracy on 64 probe examples cannot be told from chance: not compared.
    assert fp32.history[-1]["val_clean_acc"] >= 90 / 192
    assert bf16.history[-1]["val_clean_acc"] >= 90 / 192
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    _, state, _ = load_checkpoint(tmp_path / "bf16" / "checkpoints" / "epoch-0002.json")
    assert "scaler" not in state  # bf16 needs no loss scaling


def _fp16_cpu_reason():
    try:
        conv = nn.Conv2d(1, 2, 3)
        scaler = torch.amp.GradScaler("cpu")
        opt = torch.optim.SGD(conv.parameters(), lr=0.1)
        with torch.autocast("cpu", dtype=torch.float16):
            out = conv(torch.rand(2, 1, 5, 5))
        if out.dtype != torch.float16:
            return f"CPU autocast to float16 produced {out.dtype}"
        scaler.scale(out.float().sum()).backward()
        scaler.step(opt)
        scaler.update()
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        return f"float16 autocast / GradScaler unsupported on this CPU build: {exc}"
    return None


def test_fp16_scaler_state_is_checkpointed_and_restored(tmp_path, monkeypatch):
    reason = _fp16_cpu_reason()
    if reason:
        pytest.skip(reason)
    train = {"schedule": "constant", "probe_examples": 0, "precision": "fp16"}
    ce = [{"name": "ce"}]
    first = fit(tiny_policy(train={**train, "epochs": 2}, objectives=ce), tmp_path / "resumed")
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in first.history)
    _, state, _ = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "epoch-0002.json")
    assert state["scaler"]["scale"] > 0
    loaded = []
    original = torch.amp.GradScaler.load_state_dict

    def recording(self, sd):
        loaded.append(dict(sd))
        return original(self, sd)

    monkeypatch.setattr(torch.amp.GradScaler, "load_state_dict", recording)
    resumed = fit(tiny_policy(train={**train, "epochs": 3}, objectives=ce), tmp_path / "resumed", resume=True)
    assert loaded == [state["scaler"]]
    straight = fit(tiny_policy(train={**train, "epochs": 3}, objectives=ce), tmp_path / "straight")
    assert resumed.resumed_from == 2
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def _test_logits(model):
    x, _ = synthetic_tensors(64, seed=3)
    with torch.no_grad():
        return model(x)


def test_channels_last_matches_eager(tmp_path):
    models, formats = [], []

    def fit_user(train, name):
        torch.manual_seed(0)
        models.append(TinyCNN(num_classes=3))

        def during_training(record):
            conv = models[-1].features[3].weight  # 16 -> 32 channels
            formats.append(conv.is_contiguous(memory_format=torch.channels_last))

        policy = tiny_policy(train=train)
        return harden.fit(models[-1], policy, run_dir=tmp_path / name, progress=False, on_epoch_end=during_training)

    eager = fit_user(FAST, "eager")
    cl = fit_user({**FAST, "channels_last": True}, "cl")
    assert formats == [False, True]  # it did train in channels_last
    assert cl.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-4)
    torch.testing.assert_close(_test_logits(cl.model), _test_logits(eager.model), rtol=1e-4, atol=1e-4)
    # the returned model is back in the default memory format; the saved keys are the plain ones
    assert all(p.is_contiguous() for p in cl.model.parameters())
    assert list(load_file(cl.weights)) == list(load_file(eager.weights))


def _compile_reason():
    try:
        fn = torch.compile(nn.Linear(3, 2))
        fn(torch.rand(4, 3)).sum().backward()
    except Exception as exc:  # any backend/compiler failure means: not on this machine
        return f"torch.compile does not work here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None


def test_compile_matches_eager(tmp_path):
    reason = _compile_reason()
    if reason:
        pytest.skip(reason)
    policy = {"train": FAST, "objectives": [{"name": "ce"}]}
    eager = fit(tiny_policy(**policy), tmp_path / "eager")
    compiled = fit(tiny_policy(**{**policy, "train": {**FAST, "compile": True}}), tmp_path / "compiled")
    assert compiled.history[0]["train_loss"] == pytest.approx(eager.history[0]["train_loss"], rel=1e-4)
    torch.testing.assert_close(_test_logits(compiled.model), _test_logits(eager.model), rtol=1e-4, atol=1e-4)
    keys = list(load_file(compiled.weights))
    assert keys == list(load_file(eager.weights))
    assert not any("_orig_mod" in k for k in keys)
    assert isinstance(compiled.model, harden.Normalized)


def test_doctests_run():
    import doctest

    import harden.speed

    result = doctest.testmod(harden.speed, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# ---------------------------------------------------------------- CUDA (pytest -m gpu; skipped without CUDA)
class CudaRecorder(Recorder):
    def forward(self, x):
        self.calls.append((self.training, torch.is_autocast_enabled("cuda")))
        return self.net(x)


@pytest.mark.gpu
@pytest.mark.parametrize(("attack_precision", "attack_autocast"), [("fp32", False), ("same", True)])
def test_cuda_views_run_in_fp32_unless_the_policy_asks(attack_precision, attack_autocast):
    model = CudaRecorder().cuda().train()
    x, y = (t.cuda() for t in synthetic_tensors(8))
    ctx = BatchContext(
        model, x, y, ThreatModel(eps=0.1), autocast_dtype=torch.bfloat16, attack_precision=attack_precision
    )
    logits = ctx.logits(pgd_view(2))
    assert logits.dtype == torch.float32 and logits.device.type == "cuda"
    assert {a for training, a in model.calls if not training} == {attack_autocast}
    assert {a for training, a in model.calls if training} == {True}


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_mixed_precision_fit_with_channels_last(tmp_path, precision):
    train = {"epochs": 2, "probe_examples": 64, "precision": precision, "channels_last": True}
    result = fit(tiny_policy(device="cuda", train=train), tmp_path / precision)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.history)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.history[-1]["val_clean_acc"] > 0.5  # 3 classes: chance is 1/3
    params = list(result.model.parameters())
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in params)
    saved = load_file(str(tmp_path / precision / "model.safetensors"))
    state = result.model.state_dict()
    assert all(torch.equal(saved[k], state[k].cpu()) for k in saved)  # what was saved is the returned model
    _, state, _ = load_checkpoint(tmp_path / precision / "checkpoints" / "epoch-0002.json")
    assert ("scaler" in state) == (precision == "fp16")
