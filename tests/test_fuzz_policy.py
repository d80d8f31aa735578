"""Fuzzing the policy loader: whatever the file holds, ``load_policy`` returns a Policy or raises PolicyError.

Nothing else may escape (no ``ValueError`` from a YAML date, no ``RecursionError``, no pydantic
serialization error), every error is one line naming the file, and a policy that loads survives
its own canonical dump.
"""

import copy
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import harden
from harden.policy_io import BUILTIN_CODE, code_references, dump_policy, policy_hash, validate_policy
from harden.testing import tiny_policy

#: libyaml's C dumper/loader where the test itself writes and re-reads YAML (harden's own loader is pure Python)
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: a valid policy with every section spelled out: the seed of the mutations
BASE = tiny_policy(
    objectives=[{"name": "pgd_at", "params": {"steps": 3}}, {"name": "trades", "weight": 0.5}],
).model_dump(mode="json")

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # nan and infinities included
    | st.text(max_size=30)
    | st.sampled_from(["timm:resnet10t", "harden.testing:TinyCNN", "1e999", "-.inf", "0x10", "yes", "~", "linf", "ce"])
)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=25,
)


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz") / "policy.yaml"


def load(path):
    """``harden.load_policy``, checking the contract: a Policy, or one PolicyError line naming the file."""
    try:
        policy = harden.load_policy(path)
    except harden.PolicyError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: "), message
        assert "\n" not in message, message
        assert "expected" in message or "unknown key" in message, message
        return None
    assert isinstance(policy, harden.Policy)
    assert all(ref.ref in BUILTIN_CODE for ref in code_references(policy))  # no code loads without an opt-in
    again = validate_policy(yaml.load(dump_policy(policy), Loader=LOADER))  # the canonical dump loads back the same
    assert policy_hash(again) == policy_hash(policy)
    return policy


def write_yaml(path, value):
    path.write_text(yaml.dump(value, Dumper=DUMPER, allow_unicode=True, sort_keys=False))


@FUZZ
@given(value=documents)
def test_any_yaml_document(policy_file, value):
    write_yaml(policy_file, value)
    load(policy_file)


@FUZZ
@given(value=documents)
def test_any_document_under_a_valid_key(policy_file, value):
    write_yaml(policy_file, {**BASE, "train": value})
    load(policy_file)


@FUZZ
@given(text=st.text(max_size=300) | st.text(alphabet="{}[]:,-&*!|>'\"#%@`? \n\tab01.eEx+", max_size=200))
def test_any_text(policy_file, text):
    policy_file.write_text(text, encoding="utf-8")
    load(policy_file)


@FUZZ
@given(blob=st.binary(max_size=300))
def test_any_bytes(policy_file, blob):
    policy_file.write_bytes(blob)
    load(policy_file)


def _paths(node, prefix=()):
    """Every path into ``node``: mappings, lists and leaves."""
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


PATHS = list(_paths(BASE))[1:]


def _mutate(doc, path, op, key, value):
    parent = doc
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if op == "replace":
        parent[last] = value
    elif op == "delete":
        del parent[last]
    elif op == "insert" and isinstance(parent[last], dict):
        parent[last][key] = value
    elif op == "insert" and isinstance(parent[last], list):
        parent[last].append(value)
    else:  # insert beside a leaf
        if isinstance(parent, dict):
            parent[key] = value
        else:
            parent.append(value)


@FUZZ
@given(
    mutations=st.lists(
        st.tuples(
            st.sampled_from(PATHS),
            st.sampled_from(["replace", "replace", "insert", "delete"]),
            st.text(max_size=10) | st.sampled_from(["epochs", "eps", "steps", "name", "params", "weight"]),
            documents,
        ),
        min_size=1,
        max_size=3,
    )
)
def test_mutations_of_a_valid_policy(policy_file, mutations):
    doc = copy.deepcopy(BASE)
    for path, op, key, value in mutations:
        try:
            _mutate(doc, path, op, key, value)
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed or replaced the path
            continue
    write_yaml(policy_file, doc)
    load(policy_file)


def test_the_base_policy_loads(policy_file):
    write_yaml(policy_file, BASE)
    assert load(policy_file) is not None


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, 10**30, -(10**30)])
def test_mutation_with_insane_numbers_is_refused(policy_file, bad):
    write_yaml(policy_file, {**BASE, "seed": bad})
    with pytest.raises(harden.PolicyError, match="seed: expected a"):
        harden.load_policy(policy_file)


code_names = st.sampled_from(["os:system", "os.path:join", "timm:resnet10t", "digits", "harden.pipeline:run", "a..b:c"])


@FUZZ
@given(name=code_names | st.text(alphabet="ab.:_ ", max_size=12), where=st.sampled_from(["model", "data", "transfer"]))
def test_code_names_anywhere_load_only_when_allowed(policy_file, name, where):
    doc = copy.deepcopy(BASE)
    if where == "transfer":
        doc["verify"]["attacks"].append({"name": "transfer", "params": {"model": name}})
    else:
        doc[where]["name"] = name
    write_yaml(policy_file, doc)
    load(policy_file)
