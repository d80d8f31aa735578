from pathlib import Path

import pytest

import harden

ROOT = Path(__file__).resolve().parents[1]
POLICIES = sorted((ROOT / "policies").glob("*.yaml"))


def test_there_are_policies():
    assert len(POLICIES) >= 4
    assert (ROOT / "policies" / "mnist-pgd.yaml") in POLICIES


@pytest.mark.parametrize("path", POLICIES, ids=lambda p: p.name)
def test_every_shipped_policy_validates(path):
    policy = harden.load_policy(path)
    assert policy.name == path.stem
    # canonical dump is itself a valid policy with the same hash
    again = harden.validate_policy(policy.model_dump(mode="json"))
    assert harden.policy_hash(again) == harden.policy_hash(policy)


def test_makefile_demo_uses_a_shipped_policy():
    makefile = (ROOT / "Makefile").read_text()
    line = next(ln for ln in makefile.splitlines() if ln.startswith("POLICY"))
    assert line.split("=")[-1].strip() in {str(p.relative_to(ROOT)) for p in POLICIES}
