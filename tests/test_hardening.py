import copy
import io
import math
import warnings

import pytest
import torch

from harden.distributed import Distributed
from harden.errors import CheckpointError, DataError, HardenError, InputError, ModelError, PolicyError
from harden.fit_loop import train_epoch
from harden.fit_setup import epoch_loader, set_up
from harden.hardening import HardeningLoss
from harden.models import Normalized
from harden.objectives import OBJECTIVES
from harden.policy_io import dump_policy
from harden.testing import TinyCNN, synthetic_bundle, synthetic_tensors, tiny_policy

PGD = {"name": "pgd_at", "params": {"steps": 2}}
MI = {"name": "mi", "params": {"steps": 2, "estimators": "alternating", "dim": 8}}


def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def _modes(model):
    return {name: m.training for name, m in model.named_modules()}


def test_loss_is_finite_and_backward_reaches_every_parameter():
    model = TinyCNN(num_classes=3).train()
    loss_fn = HardeningLoss(model, tiny_policy(objectives=[PGD]))
    x, y = synthetic_tensors(32, seed=1)
    loss = loss_fn(x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters())
    assert loss_fn.last_terms == {"pgd_at": pytest.approx(float(loss.detach()))}
    assert loss_fn.normalization.startswith("none")


def test_a_plain_loop_trains_bit_for_bit_like_fit(tmp_path):
    """The same model, optimizer, schedule, batches and seed: fit's train_epoch and a plain loop
    over HardeningLoss run the same floating-point operations in the same order, so the
    parameters and BatchNorm statistics after the epoch are equal exactly (no tolerance needed)."""
    bundle = synthetic_bundle(96, 32)
    mixed = [PGD, {"name": "trades", "params": {"steps": 2}, "every": 2}]
    policy = tiny_policy(objectives=mixed)
    run = set_up(None, policy, Distributed(torch.device("cpu")), bundle.train, bundle.test, bundle, tmp_path)
    net = copy.deepcopy(run.net)
    opt = type(run.optimizer)(net.parameters(), **run.optimizer.defaults)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, run.scheduler.lr_lambdas[0])
    torch.manual_seed(5)
    record = train_epoch(run, 0)

    torch.manual_seed(5)
    loss_fn = HardeningLoss(net, policy, bundle=bundle)
    net.train()
    loss_fn.start_epoch(0)
    terms = []
    for x, y in epoch_loader(bundle.train, policy, 0):
        loss = loss_fn(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_fn.after_step()
        terms.append(loss_fn.last_terms)
    mine, fits = net.state_dict(), run.net.state_dict()
    assert mine.keys() == fits.keys()
    assert all(torch.equal(mine[k], fits[k]) for k in mine)
    assert len(terms) == 2 and terms[0]["trades"] > 0 and terms[1]["trades"] == 0.0  # every: 2
    assert record["loss_1_trades"] == pytest.approx(terms[0]["trades"] * 64 / 96)  # fit: per-example mean
    assert loss_fn.mix is not None and loss_fn.mix.steps_done == run.mix.steps_done == 2


def test_a_plain_loop_learns():
    """A model that knows nothing has loss ln 3 ~ 1.10 on 3 classes; three epochs of PGD-AT must
    take the held-out adversarial loss (fixed attack seed, deterministic) below half of that."""
    model = TinyCNN(num_classes=3)
    x, y = synthetic_tensors(256, seed=1)
    xv, yv = synthetic_tensors(64, seed=2)
    loss_fn = HardeningLoss(model, tiny_policy(objectives=[{"name": "pgd_at", "params": {"steps": 3}}]))

    def held_out() -> float:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(1)
            return float(loss_fn(xv, yv))

    before = held_out()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(3):
        for i in range(0, 256, 32):
            loss = loss_fn(x[i : i + 32], y[i : i + 32])
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_fn.after_step()
    after = held_out()
    assert before > 0.9 * math.log(3)  # the untrained start
    assert after < 0.5 * math.log(3) < before


def test_every_counts_steps_even_without_after_step():
    loss_fn = HardeningLoss(TinyCNN(num_classes=3).train(), tiny_policy(objectives=[PGD, {**PGD, "every": 3}]))
    x, y = synthetic_tensors(16, seed=1)
    on = []
    for _ in range(4):
        loss_fn(x, y).backward()  # no after_step: the next training call runs the pending one
        on.append(loss_fn.last_terms["pgd_at#2"] != 0.0)
    assert on == [True, False, False, True]
    assert list(loss_fn.last_terms) == ["pgd_at", "pgd_at#2"] == loss_fn.names


def test_a_no_grad_call_is_not_a_step():
    loss_fn = HardeningLoss(TinyCNN(num_classes=3), tiny_policy(objectives=[PGD]))
    x, y = synthetic_tensors(8, seed=1)
    with torch.no_grad():
        loss = loss_fn(x, y)
    assert not loss.requires_grad and torch.isfinite(loss)
    with pytest.raises(HardenError) as exc:
        loss_fn.after_step()
    assert "before after_step" in _one_line(exc)


def test_every_modes_is_restored():
    model = TinyCNN(num_classes=3).train()
    model.features[1].eval()  # a frozen BatchNorm: left frozen
    before = _modes(model)
    loss_fn = HardeningLoss(model, tiny_policy(objectives=[PGD, {"name": "trades", "params": {"steps": 2}}]))
    x, y = synthetic_tensors(16, seed=1)
    loss_fn(x, y).backward()
    loss_fn.after_step()
    assert _modes(model) == before
    model.eval()
    loss_fn(x, y)
    assert not any(_modes(model).values())


def test_the_policy_normalization_applies_to_a_plain_module_only_and_says_so():
    policy = tiny_policy(objectives=[PGD], model={"mean": [0.5], "std": [0.25]})
    with pytest.warns(UserWarning, match=r"model.mean \(0.5,\)"):
        loss_fn = HardeningLoss(TinyCNN(num_classes=3), policy)
    assert loss_fn.normalization == "mean (0.5,), std (0.25,)"
    x, _ = synthetic_tensors(8, seed=1)
    with torch.no_grad():
        assert torch.equal(loss_fn.net(x), loss_fn.model((x - 0.5) / 0.25))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        own = HardeningLoss(Normalized(TinyCNN(num_classes=3)), policy)  # a Normalized model keeps its own
    assert own.normalization.startswith("none")


def test_a_policy_file_loads(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(dump_policy(tiny_policy(objectives=[{"name": "ce"}])))
    loss_fn = HardeningLoss(TinyCNN(num_classes=3), path)
    assert loss_fn.names == ["ce"] and repr(loss_fn) == "HardeningLoss(1*ce, linf eps=0.1)"


def test_bad_arguments_give_one_line_errors(tmp_path):
    x, y = synthetic_tensors(8, seed=1)
    with pytest.raises(ModelError):
        HardeningLoss("net", tiny_policy())  # type: ignore[arg-type]
    with pytest.raises(PolicyError) as exc:
        HardeningLoss(TinyCNN(num_classes=3), tmp_path / "missing.yaml")
    _one_line(exc)
    with pytest.raises(PolicyError):
        HardeningLoss(TinyCNN(num_classes=3), {"objectives": []})  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="weight > 0"):
        HardeningLoss(TinyCNN(num_classes=3), tiny_policy(objectives=[{"name": "ce", "weight": 0}]))
    with pytest.raises(DataError):
        HardeningLoss(TinyCNN(num_classes=3), tiny_policy(), bundle=(x, y))  # type: ignore[arg-type]
    loss_fn = HardeningLoss(TinyCNN(num_classes=3), tiny_policy(objectives=[{"name": "ce"}]))
    with pytest.raises(InputError) as exc:
        loss_fn(x * 255, y)
    assert "[0, 1]" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        loss_fn(x, y[:-1])
    _one_line(exc)
    with pytest.raises(DataError, match="labels in"):
        loss_fn(x, torch.full_like(y, 3))  # the model has 3 logits
    with pytest.raises(InputError):
        loss_fn(x.numpy(), y)  # type: ignore[arg-type]
    with pytest.raises(HardenError):
        loss_fn.start_epoch(-1)


def test_the_bundle_checks_classes_and_channels():
    bundle = synthetic_bundle(96, 32)
    loss_fn = HardeningLoss(TinyCNN(num_classes=5), tiny_policy(objectives=[{"name": "ce"}]), bundle=bundle)
    x, y = synthetic_tensors(8, seed=1)
    with pytest.raises(DataError, match=r"labels in \[0, 2\]"):
        loss_fn(x, torch.full_like(y, 4))  # the model has 5 logits, the data 3 classes


def _mi_loss(**mi_params):
    policy = tiny_policy(objectives=[{**MI, "params": {**MI["params"], **mi_params}}], train={"epochs": 3})
    return HardeningLoss(TinyCNN(num_classes=3).train(), policy)


def _estimators(loss_fn):
    ((_, mi),) = loss_fn.objectives
    return {**mi.natural.state_dict(), **{f"a.{k}": v for k, v in mi.adversarial.state_dict().items()}}


def test_mi_state_round_trips_exactly_through_torch_save():
    x, y = synthetic_tensors(32, seed=1)
    batches = [(x[:16], y[:16]), (x[16:], y[16:])]
    loss_fn = _mi_loss()
    loss_fn.start_epoch(0, batches)  # the warm-up: estimators trained, warmed_up
    for xb, yb in batches:
        loss_fn(xb, yb).backward()
        loss_fn.after_step()  # alternating: an estimator step
    buf = io.BytesIO()
    torch.save(loss_fn.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh = _mi_loss()
    fresh.load_state_dict(state)  # before the first batch: applied when the objectives build
    assert int(fresh.state_dict()["objectives"]["steps_done"]) == 2  # pending: handed back as loaded
    fresh.start_epoch(1, batches)  # builds on the first batch; warmed up: no second warm-up
    want, got = _estimators(loss_fn), _estimators(fresh)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    (_, mi_fresh), (_, mi_old) = fresh.objectives[0], loss_fn.objectives[0]
    assert (
        mi_fresh.warmed_up
        and mi_fresh.optimizer.state_dict()["state"].keys() == mi_old.optimizer.state_dict()["state"].keys()
    )
    assert fresh.mix.steps_done == loss_fn.mix.steps_done == 2
    opt_a, opt_b = mi_fresh.optimizer.state_dict()["state"], mi_old.optimizer.state_dict()["state"]
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)


def test_mi_asks_for_its_epoch_and_its_batches():
    x, y = synthetic_tensors(16, seed=1)
    loss_fn = _mi_loss()
    assert loss_fn.epoch_objectives == ["mi"]
    with pytest.raises(HardenError) as exc:
        loss_fn(x, y)
    assert "start_epoch" in _one_line(exc)
    with pytest.raises(DataError) as exc:
        loss_fn.start_epoch(0)  # the warm-up is due and there is no data
    assert "training batches" in _one_line(exc)
    with pytest.raises(HardenError, match="start_epoch"):
        loss_fn(x, y)  # a failed warm-up does not count as started
    with pytest.raises(DataError, match="one-shot"):
        loss_fn.start_epoch(0, iter([(x, y)]))
    for fresh_or_built in (_mi_loss(), loss_fn):  # a warm-up over nothing never counts as done
        with pytest.raises(DataError, match="empty"):
            fresh_or_built.start_epoch(0, [])
    later = _mi_loss(start_epoch=2)
    later.start_epoch(0)  # nothing due before epoch 2: no data needed
    assert torch.isfinite(later(x, y))


def test_mi_warms_up_on_the_bundle():
    bundle = synthetic_bundle(96, 32)
    loss_fn = HardeningLoss(TinyCNN(num_classes=3).train(), tiny_policy(objectives=[MI]), bundle=bundle)
    loss_fn.start_epoch(0)
    ((_, mi),) = loss_fn.objectives
    assert mi.warmed_up and loss_fn.model.training


def test_state_dict_errors():
    loss_fn = HardeningLoss(TinyCNN(num_classes=3), tiny_policy(objectives=[PGD]))
    with pytest.raises(HardenError, match="first batch"):
        loss_fn.state_dict()
    with pytest.raises(CheckpointError):
        loss_fn.load_state_dict([1, 2])  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="same policy") as exc:
        loss_fn.load_state_dict({"names": ["ce"], "objectives": {}})
    _one_line(exc)
    loss_fn.load_state_dict({"names": ["pgd_at"], "objectives": {"steps_done": torch.tensor(4)}})
    assert loss_fn.state_dict()["objectives"]["steps_done"] == 4  # pending, not yet built
    x, y = synthetic_tensors(8, seed=1)
    loss_fn(x, y)
    assert int(loss_fn.state_dict()["objectives"]["steps_done"]) == 4


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_every_registered_objective_trains_through_the_loss(name):
    cls = OBJECTIVES.get(name)
    policy = tiny_policy(objectives=[{"name": name, "params": dict(cls.example_params)}])
    model = TinyCNN(num_classes=3).train()
    x, y = synthetic_tensors(16, seed=1)
    with HardeningLoss(model, policy) as loss_fn:
        loss_fn.start_epoch(0, [(x, y)])
        loss = loss_fn(x, y)
        assert torch.isfinite(loss)
        loss.backward()
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())
        loss_fn.after_step()
        loss_fn.load_state_dict(loss_fn.state_dict())
        assert loss_fn.to("cpu") is loss_fn
    assert not model.head._forward_hooks and not model.head._forward_pre_hooks  # close() removed the tap


def test_several_processes_without_ddp_are_warned_about(monkeypatch):
    import torch.distributed as dist

    from harden.hardening import HardeningLoss
    from harden.testing import TinyCNN, tiny_policy

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    with pytest.warns(UserWarning, match="not synchronised"):
        HardeningLoss(TinyCNN(num_classes=3), tiny_policy(objectives=[{"name": "ce"}]))
