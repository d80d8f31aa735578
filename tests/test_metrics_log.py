"""harden.metrics_log: metrics.csv (one row per epoch, resumable) and TensorBoard events."""

import csv
import os
import sys

import pytest

import harden
from harden.metrics_log import MetricsLog, summary_writer_class

RECORDS = [
    {"epoch": 1, "lr": 0.05, "train_loss": 1.0986122886681098, "val_clean_acc": 0.5, "val_pgd_acc": 0.25},
    {"epoch": 2, "lr": 0.025, "train_loss": 0.6931471805599453, "val_clean_acc": 0.75, "val_pgd_acc": 0.5},
]


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_one_row_per_record_with_every_value_exact(tmp_path):
    with MetricsLog(tmp_path, tensorboard=False) as log:
        for r in RECORDS:
            log.log(r)
    got = rows(tmp_path / "metrics.csv")
    assert list(got[0]) == ["epoch", "lr", "train_loss", "val_clean_acc", "val_pgd_acc"]
    assert [int(r["epoch"]) for r in got] == [1, 2]
    for row, record in zip(got, RECORDS, strict=True):
        for key, value in record.items():
            assert float(row[key]) == value  # repr round-trips a float exactly
    assert log.csv_path == tmp_path / "metrics.csv" and log.tensorboard_dir is None
    assert not (tmp_path / "tensorboard").exists()


def test_a_new_key_rewrites_the_header_and_keeps_earlier_rows(tmp_path):
    with MetricsLog(tmp_path, tensorboard=False) as log:
        log.log({"epoch": 1, "train_loss": 0.5})
        log.log({"epoch": 2, "train_loss": 0.25, "val_pgd_acc": 0.5})
    got = rows(tmp_path / "metrics.csv")
    assert [dict(r) for r in got] == [
        {"epoch": "1", "train_loss": "0.5", "val_pgd_acc": ""},
        {"epoch": "2", "train_loss": "0.25", "val_pgd_acc": "0.5"},
    ]


def test_a_resumed_log_starts_from_the_history_and_drops_later_rows(tmp_path):
    with MetricsLog(tmp_path, tensorboard=False) as log:
        for r in [*RECORDS, {**RECORDS[1], "epoch": 3}]:  # epoch 3 was trained, but its checkpoint was lost
            log.log(r)
    again = {**RECORDS[1], "epoch": 3, "train_loss": 0.125}
    with MetricsLog(tmp_path, tensorboard=False, history=RECORDS) as log:
        log.log(again)
    got = rows(tmp_path / "metrics.csv")
    assert [int(r["epoch"]) for r in got] == [1, 2, 3]
    assert float(got[2]["train_loss"]) == 0.125


def test_a_resume_with_nothing_left_to_train_rewrites_the_history_on_close(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,x\n1,1\n2,2\n3,3\n")
    MetricsLog(tmp_path, tensorboard=False, history=RECORDS[:1]).close()
    assert [int(r["epoch"]) for r in rows(tmp_path / "metrics.csv")] == [1]


def test_nothing_is_written_before_the_first_record(tmp_path):
    MetricsLog(tmp_path, tensorboard=None).close()
    assert list(tmp_path.iterdir()) == []


def test_no_run_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with MetricsLog(None, tensorboard=True) as log:  # not even the package is needed
        log.log(RECORDS[0])
    assert log.csv_path is None and list(tmp_path.iterdir()) == []


def test_a_link_is_replaced_not_followed(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(target, run / "metrics.csv")
    with MetricsLog(run, tensorboard=False) as log:
        log.log(RECORDS[0])
    assert target.read_text() == "keep me"
    assert not (run / "metrics.csv").is_symlink() and rows(run / "metrics.csv")[0]["epoch"] == "1"


def test_a_folder_named_metrics_csv_is_one_line_run_folder_error(tmp_path):
    (tmp_path / "metrics.csv").mkdir()
    with pytest.raises(harden.RunFolderError, match=r"expected to write .*metrics\.csv.*, got .*; move it aside"):
        MetricsLog(tmp_path, tensorboard=False).log(RECORDS[0])


def test_tensorboard_events_are_written_when_the_package_imports(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsLog(tmp_path, tensorboard=None) as log:
        for r in RECORDS:
            log.log(r)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    assert log.tensorboard_dir == tmp_path / "tensorboard"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["lr", "train_loss", "val_clean_acc", "val_pgd_acc"]
    assert [(e.step, e.value) for e in acc.Scalars("val_pgd_acc")] == [(1, 0.25), (2, 0.5)]


def test_a_tensorboard_link_is_refused(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(tmp_path / "elsewhere", run / "tensorboard")
    with pytest.raises(harden.RunFolderError, match=r"tensorboard.* got a symbolic link"):
        MetricsLog(run, tensorboard=True).log(RECORDS[0])


def test_tensorboard_false_never_imports_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it now fails
    assert summary_writer_class(False) is None
    assert summary_writer_class(None) is None  # optional: quietly off
    with pytest.raises(harden.PolicyError, match=r"^expected the tensorboard package for train.tensorboard: true"):
        summary_writer_class(True)
    with pytest.raises(harden.PolicyError, match="pip install tensorboard"):
        MetricsLog(tmp_path, tensorboard=True)
    assert list(tmp_path.iterdir()) == []
