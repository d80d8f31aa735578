"""Every module under harden/ has its own test file: harden/X.py -> tests/test_X.py, harden/pkg/X.py -> tests/test_pkg_X.py.

The registry-wide contract tests live in tests/test_attacks.py and tests/test_objectives.py.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "harden"
TESTS = ROOT / "tests"
#: modules with nothing of their own to test (entry points and the version string)
EXEMPT = {"__init__.py", "__main__.py", "_version.py"}


def expected_test_file(module: Path) -> str:
    """tests/ file name for a module path relative to harden/."""
    return "test_" + "_".join(module.with_suffix("").parts) + ".py"


def test_the_naming_rule():
    assert expected_test_file(Path("smoothing.py")) == "test_smoothing.py"
    assert expected_test_file(Path("_cascade.py")) == "test__cascade.py"
    assert expected_test_file(Path("attacks/apgd.py")) == "test_attacks_apgd.py"
    assert expected_test_file(Path("objectives/mi.py")) == "test_objectives_mi.py"


def test_every_module_has_its_test_file():
    modules = sorted(p.relative_to(PACKAGE) for p in PACKAGE.rglob("*.py") if p.name not in EXEMPT)
    assert len(modules) > 30, "expected to find harden's modules"
    missing = [
        f"harden/{m} -> tests/{expected_test_file(m)}" for m in modules if not (TESTS / expected_test_file(m)).is_file()
    ]
    assert not missing, "modules without their test file:\n" + "\n".join(missing)


def test_the_doctested_modules_keep_their_examples():
    """--doctest-modules runs every module's examples (make test); these modules must keep having some."""
    import doctest
    import importlib

    for name in ("harden.distributed", "harden.report", "harden.runtime", "harden.verify_onnx", "harden.pipeline"):
        module = importlib.import_module(name)
        examples = sum(len(t.examples) for t in doctest.DocTestFinder().find(module))
        assert examples > 0, f"{name} has no doctest examples"
