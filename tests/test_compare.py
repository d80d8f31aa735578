"""harden.compare and `harden compare`: per-example outcomes, McNemar on shared examples, groups of seeds."""

import json

import pytest
import torch
from scipy.stats import binomtest

import harden
from harden.cli import main
from harden.compare import compare_runs, load_run, mcnemar
from harden.errors import DataError
from harden.testing import TinyCNN, synthetic_tensors, tiny_policy

OTHER = {"name": "invariance_examples", "params": {"angles": 3, "shifts": 1}, "n_examples": 20}


def _verified_run(folder, seed, train_steps, name="tiny"):
    """Verify a TinyCNN trained ``train_steps`` steps; write report.json and a minimal certificate.json."""
    torch.manual_seed(seed)
    model = TinyCNN(num_classes=3)
    x, y = synthetic_tensors(256, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(train_steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(
            model(x[i % 4 * 64 : i % 4 * 64 + 64]), y[i % 4 * 64 : i % 4 * 64 + 64]
        ).backward()
        opt.step()
    attacks = [{"name": "fgsm"}, {"name": "pgd", "params": {"steps": 3}}, OTHER]
    policy = tiny_policy(name=name, seed=seed, verify={"attacks": attacks, "n_examples": 48, "checks": False})
    report = harden.verify(model.eval(), policy, synthetic_tensors(48, seed=5), progress=False)
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report.to_dict()))
    (folder / "certificate.json").write_text(json.dumps({"policy_name": name, "seed": seed, "timings": {"fit": 1.5}}))
    return report


def test_reports_keep_per_example_outcomes(tmp_path):
    report = _verified_run(tmp_path / "a", 0, 8)
    broken = report.outcomes["broken_by"]
    assert len(broken) == report.n == 48
    assert sum(b != "clean" for b in broken) / 48 == report.clean_accuracy
    assert sum(b == "" for b in broken) / 48 == report.robust_accuracy
    other = report.outcomes["other"]["invariance_examples"]
    assert len(other) == 48 and other[20:] == [-1] * 28  # beyond n_examples: not measured
    measured = [v for v in other if v >= 0]
    assert sum(measured) / len(measured) == report.other_threats["invariance_examples"]
    assert report.data_name == "synthetic"


@pytest.mark.parametrize(("a", "b"), [([1, 1, 0, 1, 1, 0, 1], [0, 1, 0, 0, 0, 1, 1]), ([1] * 30, [0] * 3 + [1] * 27)])
def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs(a, b):
    only_a, only_b, p = mcnemar([bool(v) for v in a], [bool(v) for v in b])
    assert (only_a, only_b) == (
        sum(x and not y for x, y in zip(a, b, strict=True)),
        sum(y and not x for x, y in zip(a, b, strict=True)),
    )
    assert p == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue, rel=1e-12)
    assert mcnemar([True, None, False], [False, True, None])[:2] == (1, 0)  # pairs with None skipped


def test_compare_groups_seeds_and_pairs_them(tmp_path):
    runs = {}
    for name, steps in [("base", 0), ("trained", 40)]:
        for seed in (0, 1):
            runs[name, seed] = _verified_run(tmp_path / f"{name}{seed}", seed, steps, name=name)
    cmp = compare_runs([tmp_path / "base0", tmp_path / "base1", tmp_path / "trained0", tmp_path / "trained1"])
    assert cmp.baseline == "base" and list(cmp.groups) == ["base", "trained"]
    assert cmp.measures == ["clean", "robust", "invariance_examples"]
    mean, sd = cmp.figure("trained", "clean")
    accs = [runs["trained", s].clean_accuracy for s in (0, 1)]
    assert mean == pytest.approx(sum(accs) / 2) and sd == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    tests = cmp.tests("trained", "clean")
    assert [t["seed"] for t in tests] == [0, 1] and all(t["n"] == 48 for t in tests)
    a = load_run(tmp_path / "trained0").right["clean"]
    b = load_run(tmp_path / "base0").right["clean"]
    assert (tests[0]["only_this"], tests[0]["only_baseline"], tests[0]["p"]) == mcnemar(a, b)
    assert cmp.tests("base", "clean") == []  # the baseline is not tested against itself
    text = cmp.table()
    assert "trained" in text and "McNemar" in text and "±" in text
    assert json.loads(json.dumps(cmp.to_dict()))["groups"]["trained"]["seeds"] == [0, 1]
    assert cmp.plot_png()[:4] == b"\x89PNG"


def test_cli_compare_prints_writes_and_refuses_bad_folders(tmp_path, capsys):
    _verified_run(tmp_path / "a", 0, 0, name="a")
    _verified_run(tmp_path / "b", 0, 30, name="b")
    code = main(
        [
            "compare",
            str(tmp_path / "a"),
            str(tmp_path / "b"),
            "--json",
            str(tmp_path / "c.json"),
            "--plot",
            str(tmp_path / "c.png"),
        ]
    )
    assert code == 0
    assert "McNemar" in capsys.readouterr().out
    assert json.loads((tmp_path / "c.json").read_text())["baseline"] == "a"
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "report.json" in capsys.readouterr().err
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text(json.dumps({"n": 3, "clean_accuracy": 1.0}))
    with pytest.raises(DataError, match="per-example outcomes"):
        load_run(old)


def test_runs_on_other_data_are_not_paired(tmp_path):
    for name, data in [("a", "mnist-5k"), ("b", "digits")]:
        (tmp_path / name).mkdir()
        report = {"n": 2, "outcomes": {"broken_by": ["", "clean"]}, "data_name": data}
        (tmp_path / name / "report.json").write_text(json.dumps(report))
    with pytest.raises(DataError, match="one dataset"):
        compare_runs([tmp_path / "a", tmp_path / "b"])


def test_runs_at_other_threats_suites_or_with_a_repeated_seed_are_refused(tmp_path):
    def write(name, seed=0, eps=0.1, attacks=("fgsm",)):
        (tmp_path / name).mkdir()
        report = {
            "n": 2,
            "seed": seed,
            "outcomes": {"broken_by": ["", "clean"]},
            "threat": {"norm": "linf", "eps": eps},
            "attacks": [{"name": a} for a in attacks],
        }
        (tmp_path / name / "report.json").write_text(json.dumps(report))
        (tmp_path / name / "certificate.json").write_text(json.dumps({"policy_name": name.rstrip("0123456789")}))

    write("a")
    write("b", eps=0.3)
    write("c", attacks=("fgsm", "pgd"))
    write("d1")
    write("d2")
    with pytest.raises(DataError, match="one threat model"):
        compare_runs([tmp_path / "a", tmp_path / "b"])
    with pytest.raises(DataError, match="one attack suite"):
        compare_runs([tmp_path / "a", tmp_path / "c"])
    with pytest.raises(DataError, match="one run per seed"):
        compare_runs([tmp_path / "d1", tmp_path / "d2"])


def _report(folder, broken, indices):
    folder.mkdir(parents=True)
    outcomes = {"broken_by": broken} if indices is None else {"broken_by": broken, "indices": indices}
    (folder / "report.json").write_text(json.dumps({"n": len(broken), "outcomes": outcomes}))


def test_balanced_samples_pair_on_the_indices_both_verified(tmp_path):
    # run a verified test-split examples 0, 3, 5, 9; run b verified 9, 3, 7 (another sample and order)
    _report(tmp_path / "a", ["", "clean", "pgd", ""], [0, 3, 5, 9])
    _report(tmp_path / "b", ["clean", "", ""], [9, 3, 7])
    a, b = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    assert a.indices == [0, 3, 5, 9]
    # shared: 3 (a wrong clean, b right) and 9 (a right, b wrong): b = 1, c = 1 on n = 2
    from harden.compare import shared_outcomes

    mine, theirs = shared_outcomes(a, b, "clean")
    assert (mine, theirs) == ([False, True], [True, False])
    assert mcnemar(mine, theirs) == (1, 1, 1.0)


@pytest.mark.parametrize("indices", [[0, 0], [0, -1], [0], [0, "1"], "01"])
def test_malformed_indices_are_refused(tmp_path, indices):
    _report(tmp_path / "a", ["", ""], indices)
    with pytest.raises(DataError, match=r"outcomes\.indices"):
        load_run(tmp_path / "a")
