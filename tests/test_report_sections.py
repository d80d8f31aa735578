"""harden.report_sections: the labels, number formats and sections both renderings of a certificate share."""

from __future__ import annotations

import pytest

from harden.certificate import BaselineSummary, Certificate, ClassResult, SaliencyExample, SmoothingSummary
from harden.report import to_markdown
from harden.report_format import CLEAN_LABEL, DASH, ROBUST_LABEL, Plot, Section
from harden.report_sections import sections

ALWAYS = ["Threat model", "Accuracy", "Other threats", "Sanity checks", "Training", "Integrity", "Reproducibility"]


def bare(**updates) -> Certificate:
    fields = {
        "verdict": "EMPIRICAL",
        "created": "2026-01-01T00:00:00+00:00",
        "policy_name": "p",
        "policy_sha256": "0" * 64,
        "weights_sha256": "1" * 64,
        "threat": {"norm": "linf", "eps": 0.03, "radius": None},
        "n": 100,
        "clean_accuracy": 0.79,
        "robust_accuracy": 0.04,
        "per_attack": {"pgd": 0.1, "pgd#2": 0.04},
        "attacks": [{"name": "pgd", "params": {"steps": 10}}, {"name": "pgd", "params": {"steps": 50}}],
        "seed": 0,
        "device": "cpu",
        "versions": {"harden": "0"},
    }
    return Certificate(**{**fields, **updates})


def full() -> Certificate:
    smoothing = SmoothingSummary(
        sigma=0.25, n0=8, n=32, alpha=0.001, examples=4, abstentions=1, radius=0.1, certified_accuracy=0.5,
        min_certified_accuracy=0.5, curve=[(0.0, 0.75), (0.1, 0.5)], labels=[0, 1, 2, 0], predictions=[0, 1, -1, 2],
        radii=[0.2, 0.1, 0.0, 0.0], seconds=1.0, samples_per_second=160.0,
    )  # fmt: skip
    saliency = [SaliencyExample(label=1, prediction=2, image=[[[0.0]]], maps={"hardened": [[1.0]]})]
    baseline = BaselineSummary(n=100, clean_accuracy=0.91, robust_accuracy=0.0, per_attack={"pgd": 0.01, "pgd#2": 0.0})
    return bare(
        eps_curve=[(0.0, 0.8), (0.03, 0.06)],
        per_class=[ClassResult(label=0, name="cat", n=50, clean=40, robust=3), ClassResult(label=1, n=0, clean=0, robust=0)],
        smoothing=smoothing,
        saliency=saliency,
        baseline=baseline,
        training=[{"epoch": 1, "val_pgd_acc": 0.3, "grad_norm": 2.5}],
        checks={"white_box_beats_black_box": {"id": "white_box_beats_black_box", "status": "SKIP", "detail": "none"},
                "my_check": {"id": "my_check", "status": "PASS"}},
    )  # fmt: skip


def _by_title(cert: Certificate) -> dict[str, Section]:
    return {s.title: s for s in sections(cert)}


def _tables(section: Section) -> list[tuple[list[str], list[list[str]]]]:
    return [b for b in section.blocks if isinstance(b, tuple)]


def test_a_bare_certificate_has_the_sections_every_certificate_has():
    assert [s.title for s in sections(bare())] == ALWAYS
    other = _by_title(bare())["Other threats"]
    assert other.blocks[-1] == "None were run."
    assert _by_title(bare())["Sanity checks"].blocks == ["No sanity checks were run."]


def test_the_optional_sections_come_with_their_data_and_their_plots():
    titles = [s.title for s in sections(full())]
    assert titles == [
        "Threat model", "Accuracy", "Accuracy per class", "Other threats", "Accuracy vs eps",
        "Randomized smoothing", "Sanity checks", "Training", "Saliency", "Integrity", "Reproducibility",
    ]  # fmt: skip
    plots = {s.title: [b.key for b in s.blocks if isinstance(b, Plot)] for s in sections(full())}
    assert plots["Accuracy vs eps"] == ["eps"] and plots["Randomized smoothing"] == ["smoothing"]
    assert plots["Training"] == ["training"] and plots["Saliency"] == ["saliency"]
    assert sum(len(v) for v in plots.values()) == 4
    assert not any(isinstance(b, Plot) for s in sections(bare()) for b in s.blocks)  # no data, no plot


def test_attacks_checks_and_keys_read_as_labels():
    by = _by_title(full())
    ((_, attacks),) = _tables(by["Threat model"])
    assert attacks[1][:3] == ["2", "pgd", "PGD: projected gradient descent on cross-entropy (white-box)"]
    assert attacks[1][3] == "steps=50"
    head, rows = _tables(by["Accuracy"])[0]
    assert head[-1] == "undefended baseline"
    assert [r[0] for r in rows] == [
        CLEAN_LABEL,
        "After PGD: projected gradient descent on cross-entropy (white-box)",
        "After PGD: projected gradient descent on cross-entropy (white-box) (run 2)",
        ROBUST_LABEL,
    ]
    assert [r[-1] for r in rows] == ["91.00%", "1.00%", "0.00%", "0.00%"]  # the baseline's, row by row
    ((_, checks),) = _tables(by["Sanity checks"])
    assert checks[0][:3] == ["White-box attacks beat black-box ones", "white_box_beats_black_box", "SKIP (N/A)"]
    assert checks[1][:3] == ["my_check", "my_check", "PASS"]  # an unknown check keeps its id
    assert by["Sanity checks"].blocks[-1].startswith("SKIP (N/A): the check had nothing to test here")
    metrics = dict(_tables(by["Training"])[0][1])
    assert metrics == {"Epoch": "1", "Validation PGD accuracy (the probe)": "30.00%", "Grad norm": "2.5"}


def test_per_class_rows_leave_an_empty_class_without_a_percentage():
    ((_, rows),) = _tables(_by_title(full())["Accuracy per class"])
    assert rows == [["0 (cat)", "50", "80.00%", "6.00%"], ["1", "0", DASH, DASH]]


@pytest.mark.parametrize("cert", [bare(), full()], ids=["bare", "full"])
def test_markdown_renders_every_section_and_table(cert):
    md = to_markdown(cert)
    for section in sections(cert):
        assert f"## {section.title}\n" in md
        for head, _ in _tables(section):
            assert "| " + " | ".join(head) + " |" in md


def test_each_checks_cost_the_check_subset_and_the_verify_time_split_are_shown():
    checks = {"my_check": {"id": "my_check", "status": "PASS"}, "other": {"id": "other", "status": "PASS"}}
    times = {"attacks": 6.0, "other_attacks": 0.0, "setup": 0.5, "checks": 1.0, "eps_sweep": 2.0, "rest": 0.5}
    cert = bare(checks=checks, check_n=200, per_check_seconds={"my_check": 0.25}, verify_seconds=times)
    by = _by_title(cert)
    ((head, rows),) = _tables(by["Sanity checks"])
    assert head[-1] == "time" and [r[-1] for r in rows] == ["0.25 s", DASH]  # a check without a cost reads DASH
    # the widest 95% Wilson half-width out of 200 (at 50%): 1.96 * sqrt(0.25 / 200 + 1.96**2 / 160000) / 1.0192
    assert "a 95% Wilson interval at most 6.9 points either side" in by["Sanity checks"].blocks[2]
    assert "The checks ran on the check subset: 200 of the verified examples" in by["Sanity checks"].blocks[2]
    repro = by["Reproducibility"]
    assert "Verification time, 10.00 s in all:" in repro.blocks
    ((_, split),) = [t for t in _tables(repro) if t[0][0] == "part of verification"]
    assert [r[1:] for r in split] == [
        ["6.00 s", "60.0%"], ["0.00 s", "0.0%"], ["0.50 s", "5.0%"], ["1.00 s", "10.0%"], ["2.00 s", "20.0%"],
        ["0.50 s", "5.0%"],
    ]  # fmt: skip
    assert split[3][0] == "sanity checks" and split[4][0] == "eps sweep"
    assert not [t for t in _tables(_by_title(bare())["Reproducibility"]) if t[0][0] == "part of verification"]
