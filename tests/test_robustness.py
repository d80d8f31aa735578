"""harden.robustness: the report of harden.verify (verdict words, per-class lines, the time split, its JSON)."""

import json

import torch

import harden
from harden.robustness import SUMMARY_CLASSES, RobustnessReport

THREAT = {"norm": "linf", "eps": 0.1}


def test_a_summary_whose_checks_all_skipped_is_not_assessed_not_reliable():
    skipped = {"status": "SKIP", "detail": "no history"}
    report = RobustnessReport(8, 0.0, 0.0, {}, {}, {}, THREAT, [], 0.0, checks={"a": skipped, "b": skipped})
    assert report.reliable  # nothing failed ...
    assert "evaluation NOT ASSESSED (no check passed) (0 checks pass, 2 skipped, N/A)" in report.summary()


def test_a_summary_of_many_classes_lists_the_five_with_the_lowest_robust_accuracy():
    per_class = [{"label": c, "name": f"c{c}", "n": 10, "clean": 10, "robust": (c * 7) % 11} for c in range(25)]
    report = RobustnessReport(250, 1.0, 0.5, {}, {}, {}, THREAT, [], 0.0)
    report.per_class = per_class
    lines = report.summary().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("per class (the 5 of 25"))
    worst = sorted(per_class, key=lambda c: (c["robust"], c["label"]))[:5]
    assert [line.split()[0] for line in lines[start + 1 : start + 6]] == [str(c["label"]) for c in worst]


def test_the_report_is_what_harden_exports_and_verify_returns():
    assert harden.RobustnessReport is RobustnessReport and SUMMARY_CLASSES == 20


def test_to_dict_is_json_without_the_adversarial_tensor_and_the_time_split_adds_up():
    report = RobustnessReport(
        4, 1.0, 0.5, {"pgd": 0.5}, {"clean": 0, "pgd": 2}, {"pgd": 2.0}, THREAT, [{"name": "pgd"}], 5.0,
        adversarial=torch.zeros(2, 1, 4, 4), cascade_seconds=2.5, check_seconds=1.0, sweep_seconds=0.5,
        setup_seconds=0.25, per_check_seconds={"a": 1.0}, checks={"a": {"status": "PASS", "detail": "fine"}},
    )  # fmt: skip
    d = report.to_dict()
    assert "adversarial" not in d and report.adversarial is not None  # the report itself keeps it
    assert json.loads(json.dumps(d))["per_check_seconds"] == {"a": 1.0}
    split = report.time_split()
    assert split == {"attacks": 2.0, "other_attacks": 0.5, "setup": 0.25, "checks": 1.0, "eps_sweep": 0.5, "rest": 0.75}
    assert sum(split.values()) == report.seconds  # binary fractions: exact
    assert "check PASS a: fine (1.0 s)" in report.summary() and "evaluation RELIABLE (1 checks pass" in report.summary()
