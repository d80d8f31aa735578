"""harden.fit end to end: learning, the run directory, user models and data, a given bundle, load_trained.

The stages have their own files: tests/test_fit_setup.py, tests/test_fit_loop.py, tests/test_fit_state.py.
"""

import json

import pytest
import torch
import yaml
from helpers_faults import write_policy
from helpers_fit import assert_same_weights, fit
from torch.utils.data import DataLoader, TensorDataset

import harden
from harden.checkpoint import sha256_file
from harden.cli import main
from harden.policy_io import validate_policy
from harden.testing import TinyCNN, synthetic_tensors, tiny_policy


def test_fit_learns_and_writes_the_run_directory(tmp_run):
    policy = tiny_policy(train={"epochs": 2, "keep_checkpoints": 5})
    seen = []
    result = fit(policy, tmp_run, on_epoch_end=seen.append)
    assert isinstance(result, harden.FitResult)
    assert isinstance(result.model, harden.Normalized)
    assert not result.model.training
    assert result.run_dir == tmp_run
    assert result.resumed_from is None
    assert result.history[-1]["val_clean_acc"] > 0.6  # 3 classes: chance is 1/3
    ck = tmp_run / "checkpoints"
    for epoch in (1, 2):
        assert (ck / f"epoch-{epoch:04d}.safetensors").is_file()
        assert (ck / f"epoch-{epoch:04d}.json").is_file()
    assert result.weights == tmp_run / "model.safetensors"
    assert result.weights.is_file()
    meta = json.loads((tmp_run / "model.json").read_text())
    assert meta["sha256"] == sha256_file(result.weights)
    assert meta["policy_hash"] == harden.policy_hash(policy)
    assert validate_policy(yaml.safe_load((tmp_run / "policy.yaml").read_text())) == policy
    assert not list(tmp_run.rglob("*.tmp"))
    assert seen == result.history


def test_user_module_and_datasets(tmp_run):
    torch.manual_seed(0)
    user = TinyCNN(num_classes=3)
    train = TensorDataset(*synthetic_tensors(192, seed=1))
    val = TensorDataset(*synthetic_tensors(64, seed=2))
    policy = tiny_policy(train={"epochs": 2}, objectives=[{"name": "ce"}])
    before = user.head.weight.detach().clone()
    result = fit(policy, tmp_run, model=user, train=train, val=val)
    assert result.model.model is user  # trained in place, wrapped once
    assert not torch.equal(user.head.weight, before)
    assert all(p.device.type == "cpu" for p in user.parameters())
    assert result.history[-1]["val_clean_acc"] > 0.6


def test_user_dataloader_without_val(tmp_run):
    loader = DataLoader(TensorDataset(*synthetic_tensors(96, seed=1)), batch_size=32, shuffle=False)
    policy = tiny_policy(objectives=[{"name": "ce"}])
    result = fit(policy, tmp_run, model=TinyCNN(num_classes=3), train=loader)
    (record,) = result.history
    assert "val_clean_acc" not in record
    assert record["train_loss"] > 0


def refuse_load_data(monkeypatch):
    def refuse(spec):
        raise AssertionError("load_data was called although a bundle was given")

    monkeypatch.setattr("harden.train.load_data", refuse)


def test_fit_with_a_bundle_does_not_load_data_and_trains_the_same(tmp_path, monkeypatch):
    policy = tiny_policy(train={"epochs": 2})
    bundle = harden.data.load_data(policy.data)
    loaded = fit(policy, tmp_path / "loaded")
    refuse_load_data(monkeypatch)
    given = fit(policy, tmp_path / "given", bundle=bundle)
    assert_same_weights(given.model, loaded.model)
    for a, b in zip(given.history, loaded.history, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    model, same = harden.train.load_trained(policy, given.weights, bundle=bundle)
    assert same is bundle
    assert_same_weights(model, given.model)


def test_fit_with_a_bundle_and_a_user_model_validates_on_its_test_split(tmp_run, monkeypatch):
    refuse_load_data(monkeypatch)
    bundle = harden.testing.synthetic_bundle(n_train=96, n_test=32)
    policy = tiny_policy(train={"probe_examples": 0}, objectives=[{"name": "ce"}])
    result = fit(policy, tmp_run, model=TinyCNN(num_classes=3), bundle=bundle)
    (record,) = result.history
    assert "val_clean_acc" in record


def test_fit_with_a_bundle_checks_labels_against_its_classes(tmp_run):
    bundle = harden.testing.synthetic_bundle(n_train=64, n_test=16)
    bundle.train.tensors[1][3] = 5  # the bundle says 3 classes
    with pytest.raises(harden.DataError, match=r"expected labels in \[0, 2\]"):
        fit(tiny_policy(objectives=[{"name": "ce"}]), tmp_run, model=TinyCNN(num_classes=6), bundle=bundle)


def test_fit_refuses_train_data_and_a_bundle_together(tmp_run):
    bundle = harden.testing.synthetic_bundle()
    with pytest.raises(harden.DataError, match="either train= data or bundle="):
        fit(tiny_policy(), tmp_run, model=TinyCNN(num_classes=3), train=bundle.train, bundle=bundle)
    assert not tmp_run.exists()


BAD_DATA = {
    "pixels-0-255": (
        {"data": {"name": "faulty:pixels_255"}},
        "'faulty:pixels_255' train example 0: expected pixels in ",
    ),
    "label-out-of-range": (
        {"data": {"name": "faulty:label_out_of_range"}},
        "test split: expected labels in [0, 2], got 1 outside it",
    ),
    "negative-label": (
        {"data": {"name": "faulty:negative_label"}},
        "expected labels in [0, 1], got ",
    ),
    "empty-dataset": ({"data": {"name": "faulty:empty_train"}}, "expected non-empty train and test datasets"),
    "missing-root": (
        {"data": {"name": "cifar10", "root": "/nonexistent/cifar"}},
        "expected data.root to be a local directory holding cifar-10-batches-py/, got '/nonexistent/cifar'",
    ),
    "channels": ({"model": {"in_chans": 3}}, "expected model.in_chans to match the data's 1 channels, got 3"),
}


@pytest.fixture
def user_module(user_module):
    """conftest's ``faulty`` module with its data functions marked as defined there.

    harden runs only code defined in the package a policy names (``faulty``), and conftest builds
    these functions itself. Harmless once conftest marks them the same way.
    """
    for value in vars(user_module).values():
        if callable(value) and getattr(value, "__module__", None) == "conftest":
            value.__module__ = "faulty"
    return user_module


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_is_one_error_line_and_writes_nothing(tmp_path, capsys, user_module, case):
    updates, expected = BAD_DATA[case]
    path = write_policy(tmp_path / "p.yaml", tiny_policy(**updates, objectives=[{"name": "ce"}]))
    out = tmp_path / "run"
    assert main(["fit", str(path), "--out", str(out), "--allow-code", "faulty", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harden: error: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert not out.exists()  # found before anything was trained; the run folder opened for it is gone again


def test_a_fresh_fit_into_a_used_folder_is_refused_and_overwrite_replaces_it(tmp_run):
    policy = tiny_policy(train={"probe_examples": 0}, objectives=[{"name": "ce"}])
    first = fit(policy, tmp_run)
    run_id = json.loads((tmp_run / "run.json").read_text())["run_id"]
    (tmp_run / "notes.txt").write_text("mine")
    before = (tmp_run / "model.safetensors").read_bytes()
    with pytest.raises(harden.RunFolderError, match=r"expected an unused run folder .* --overwrite to replace it"):
        fit(policy, tmp_run)
    assert (tmp_run / "model.safetensors").read_bytes() == before  # refused before anything was written
    again = fit(policy, tmp_run, overwrite=True)
    assert json.loads((tmp_run / "run.json").read_text())["run_id"] != run_id
    assert (tmp_run / "notes.txt").read_text() == "mine"
    assert again.resumed_from is None and sha256_file(again.weights) == sha256_file(first.weights)  # seeded
    info = json.loads((tmp_run / "checkpoints" / "epoch-0001.json").read_text())["info"]
    assert info["run_id"] == json.loads((tmp_run / "run.json").read_text())["run_id"]
    assert info["policy_sha256"] == harden.policy_hash(policy)


def test_fit_uses_an_opened_run_folder_without_locking_it_again(tmp_run):
    from harden.runfolder import RunFolder

    policy = tiny_policy(train={"probe_examples": 0}, objectives=[{"name": "ce"}])
    with RunFolder.open(tmp_run, policy_hash=harden.policy_hash(policy)) as folder:
        result = fit(policy, folder)
        assert result.run_dir == tmp_run
        assert (tmp_run / ".harden.lock").exists()  # still held: fit did not close the caller's folder
        with pytest.raises(harden.RunFolderError, match="no other harden process"):
            fit(policy, tmp_run, overwrite=True)  # a path: fit opens it, and finds it held
        with pytest.raises(harden.RunFolderError, match="they are set when it is opened"):
            fit(policy, folder, resume=True)
    assert not (tmp_run / ".harden.lock").exists()


SIDECARS = {
    "not-json": ("{oops", "expected readable JSON in '{json}', got Expecting property name"),
    "a-list": ("[]", "expected a JSON object in '{json}', got list"),
    "history-not-a-list": ('{"history": 5}', "expected 'history' a list of objects in '{json}', got 5"),
    "history-of-strings": ('{"history": ["x"]}', "expected 'history' a list of objects in '{json}', got ['x']"),
    "probe-not-a-number": (
        '{"history": [{"val_pgd_acc": "high"}]}',
        "expected history.0.val_pgd_acc a number or null in '{json}', got 'high'",
    ),
    "sha-not-a-string": ('{"sha256": 3}', "expected 'sha256' a string in '{json}', got int"),
    "not-utf8": (b"\xff\xfe{", "expected readable JSON in '{json}', got "),
    "no-sidecar-garbage-weights": (
        None,
        "expected a safetensors file at '{weights}', got one safetensors cannot read (",
    ),
}


@pytest.mark.parametrize("case", list(SIDECARS))
def test_verify_with_a_malformed_sidecar_or_weights_is_one_error_line(tmp_path, capsys, case):
    sidecar, expected = SIDECARS[case]
    out = tmp_path / "run"
    out.mkdir()
    weights, info = out / "model.safetensors", out / "model.json"
    weights.write_bytes(b"garbage, not a safetensors file")
    if isinstance(sidecar, bytes):
        info.write_bytes(sidecar)
    elif sidecar is not None:
        info.write_text(sidecar)
    path = write_policy(tmp_path / "p.yaml", tiny_policy(objectives=[{"name": "ce"}]))
    assert main(["verify", str(path), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harden: error: ") and err.count("\n") == 1, err
    assert expected.format(json=info, weights=weights) in err, err
    assert "harden fit" in err, err  # the remedy
    with pytest.raises(harden.CheckpointError):
        harden.train.load_trained(tiny_policy(), weights)


def test_read_model_info_returns_the_checked_sidecar(tmp_path):
    weights = tmp_path / "model.safetensors"
    assert harden.train.read_model_info(weights) == {}  # no sidecar: nothing to check
    doc = {"sha256": "ab", "history": [{"epoch": 1, "val_pgd_acc": 0.25, "val_clean_acc": None}]}
    weights.with_suffix(".json").write_text(json.dumps(doc))
    assert harden.train.read_model_info(weights) == doc
    weights.with_suffix(".json").write_text('{"history": [{"val_clean_acc": true}]}')
    with pytest.raises(harden.CheckpointError, match=r"history\.0\.val_clean_acc a number or null"):
        harden.train.read_model_info(weights)


def test_fit_writes_metrics_csv_with_one_row_per_epoch_and_tensorboard_events(tmp_run):
    import csv

    pytest.importorskip("tensorboard")
    result = fit(tiny_policy(train={"epochs": 2, "probe_examples": 16}, objectives=[{"name": "ce"}]), tmp_run)
    assert result.metrics_csv == tmp_run / "metrics.csv"
    with open(result.metrics_csv, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(result.history) == 2
    for row, record in zip(rows, result.history, strict=True):
        assert set(row) == set(record)
        for key, value in record.items():
            assert float(row[key]) == value
    assert len(list((tmp_run / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_fit_with_tensorboard_false_writes_no_events(tmp_run):
    result = fit(tiny_policy(train={"tensorboard": False, "probe_examples": 0}, objectives=[{"name": "ce"}]), tmp_run)
    assert result.metrics_csv.is_file() and not (tmp_run / "tensorboard").exists()


def test_tensorboard_required_without_the_package_fails_before_training(tmp_run, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    trained = []
    monkeypatch.setattr(harden.train, "train_epoch", lambda run, epoch: trained.append(epoch))
    with pytest.raises(harden.PolicyError, match=r"^expected the tensorboard package .*; pip install tensorboard"):
        fit(tiny_policy(train={"tensorboard": True}, objectives=[{"name": "ce"}]), tmp_run)
    assert trained == [] and not tmp_run.exists()  # a failed start leaves nothing


def test_fit_result_fields_keep_their_defaults_for_old_call_sites(tmp_path):
    from harden.models import prepare_model

    old = harden.FitResult(prepare_model(TinyCNN(num_classes=3)), [], tmp_path, tmp_path / "model.safetensors")
    assert (old.best_epoch, old.stopped_early, old.metrics_csv) == (None, False, None)


def test_load_trained_takes_a_plain_state_dict_of_the_policy_model(tmp_path):
    from harden.testing import synthetic_bundle
    from harden.train import load_trained

    policy = tiny_policy(objectives=[{"name": "ce"}], train={"probe_examples": 0})
    b = synthetic_bundle(96, 32)
    trained = harden.fit(None, policy, bundle=b, run_dir=tmp_path / "r", progress=False)
    net, _ = load_trained(policy, trained.weights, bundle=b)
    plain = tmp_path / "plain.pth"
    torch.save(net.model.state_dict(), plain)  # the inner model's keys, no wrapper, no model.json
    again, _ = load_trained(policy, plain, bundle=b)
    x = b.test.tensors[0][:8]
    assert torch.equal(again(x), net(x))


def test_load_trained_refuses_weights_trained_with_another_normalization(tmp_path):
    from safetensors.torch import save_file

    from harden.models import Normalized
    from harden.testing import synthetic_bundle
    from harden.train import load_trained

    policy = tiny_policy(objectives=[{"name": "ce"}], train={"probe_examples": 0})  # no mean/std
    b = synthetic_bundle(96, 32)
    other = Normalized(TinyCNN(num_classes=3), mean=(0.5,), std=(0.25,))
    path = tmp_path / "model.safetensors"
    save_file(other.state_dict(), path)
    with pytest.raises(harden.CheckpointError, match=r"0\.5.*--mean"):
        load_trained(policy, path, bundle=b)
