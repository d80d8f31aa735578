import ast
import importlib
import os
import sys
from pathlib import Path

import pytest
import yaml

import harden
from harden.attacks import ATTACKS
from harden.objectives import OBJECTIVES
from harden.policy import AttackSpec, Catalog, ObjectiveSpec, Policy
from harden.policy_io import (
    BUILTIN_CODE,
    CATALOG,
    check_code,
    checked,
    code_references,
    dump_policy,
    load_policy,
    policy_hash,
    validate_policy,
)

ROOT = Path(harden.__file__).parent


@pytest.mark.parametrize(
    ("module", "allowed"),
    [
        ("policy.py", {"harden.schema", "harden.sources"}),
        ("sources.py", {"harden.catalog", "harden.coderef", "harden.errors", "harden.schema"}),
        ("schema.py", {"harden.catalog", "harden.coderef", "harden.errors", "harden.registry", "harden.require"}),
        ("catalog.py", set()),
        ("coderef.py", set()),
    ],
)
def test_the_policy_modules_are_a_pure_schema(module, allowed):
    tree = ast.parse((ROOT / module).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m.startswith("harden")} == allowed


def test_the_catalog_is_complete_and_a_validated_policy_is_checked():
    assert CATALOG.complete and not Catalog().complete
    policy = validate_policy({"objectives": [{"name": "pgd_at"}], "verify": {"attacks": [{"name": "pgd"}]}})
    assert policy.checked


def test_specs_carry_their_validated_params_so_they_are_validated_once():
    policy = validate_policy({"objectives": [{"name": "trades", "params": {"beta": 2}}]})
    spec = policy.objectives[0]
    params = spec.checked_params
    assert isinstance(params, OBJECTIVES.get("trades").Params) and params.beta == 2
    assert spec.params == params.model_dump(mode="json")  # the dump (and the hash) has every default
    objective = OBJECTIVES.get("trades")(spec.params_for_build(), policy.threat)
    assert objective.params is params  # handed over, not validated again
    attack = policy.verify.attacks[1]
    assert isinstance(attack.checked_params, ATTACKS.get(attack.name).Params)


def test_without_a_catalog_names_and_params_are_left_for_later():
    raw = Policy(objectives=[ObjectiveSpec(name="pgd_at", params={"steps": 2})])
    assert not raw.checked and raw.objectives[0].checked_params is None
    assert raw.objectives[0].params == {"steps": 2}
    good = checked(raw)
    assert good.checked and good.objectives[0].params["steps"] == 2 and "step_size" in good.objectives[0].params
    assert checked(good) is good
    assert policy_hash(raw) == policy_hash(good) and dump_policy(raw) == dump_policy(good)
    with pytest.raises(harden.PolicyError, match="did you mean 'pgd_at'"):
        checked(Policy(objectives=[ObjectiveSpec(name="pgd-at")]))


def test_defaults_are_checked_like_written_sections():
    policy = validate_policy({"objectives": [{"name": "ce"}]})
    assert all(a.checked_params is not None for a in policy.verify.attacks)
    assert policy.verify.attacks[1].params["steps"] == 40 and "restarts" in policy.verify.attacks[1].params


def test_a_copy_with_changes_is_unchecked_and_never_builds_stale_params():
    good = validate_policy({"objectives": [{"name": "pgd_at"}], "verify": {"attacks": [{"name": "pgd"}]}})
    spec = good.verify.attacks[0].model_copy(update={"params": {"steps": 2}})
    assert spec.checked_params is None and spec.params_for_build() == {"steps": 2}
    assert ATTACKS.get("pgd")(good.threat, spec.params_for_build()).params.steps == 2
    bad = good.model_copy(update={"objectives": (ObjectiveSpec(name="pgd_at", params={"steps": -5}),)})
    assert not bad.checked
    with pytest.raises(harden.PolicyError, match="steps"):
        checked(bad)
    same = good.model_copy(update={"objectives": (ObjectiveSpec(name="pgd_at"),)})
    assert policy_hash(same) == policy_hash(good)
    assert good.model_copy().checked  # a plain copy stays checked


def test_a_spec_handed_in_is_checked_and_the_callers_object_left_alone():
    spec = ObjectiveSpec(name="pgd_at")
    policy = validate_policy({"objectives": [spec]})
    assert spec.params == {} and spec.checked_params is None
    assert policy.objectives[0].params["steps"] == 7 and policy.checked


def test_entry_points_check_a_policy_built_in_python():
    from harden.testing import TinyCNN, synthetic_tensors

    raw = Policy(
        objectives=[ObjectiveSpec(name="ce")],
        verify={"attacks": [AttackSpec(name="pgd", params={"steps": 2})], "n_examples": 8, "checks": False},
    )
    report = harden.verify(TinyCNN(num_classes=3), raw, synthetic_tensors(8), progress=False)
    assert report.attacks[0]["params"]["restarts"] == 1  # filled like a loaded policy's


# --------------------------------------------------------------------------- code named in a policy


def _write(tmp_path, doc, name="policy.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc))
    return path


def _with_model(name, **more):
    return {"model": {"name": name}, "objectives": [{"name": "ce"}], **more}


def test_the_trust_names_are_still_importable_from_here():
    import harden.policy_io
    import harden.trust

    assert harden.policy_io.BUILTIN_CODE is harden.trust.BUILTIN_CODE
    assert harden.policy_io.CodeReference is harden.trust.CodeReference
    assert {"BUILTIN_CODE", "CodeReference", "check_code", "code_references"} <= set(harden.policy_io.__all__)


def test_code_references_check_a_policy_built_in_python_first():
    from harden.trust import find_code

    raw = Policy(
        objectives=[ObjectiveSpec(name="ce")],
        verify={"attacks": [AttackSpec(name="transfer", params={"model": "os:system"})]},
    )
    assert find_code(raw) == []  # unchecked: its raw params are not walked
    assert [r.path for r in code_references(raw)] == ["verify.attacks.0.params.model"]
    with pytest.raises(harden.PolicyError, match=r"^verify\.attacks\.0\.params\.model: 'os:system' is code"):
        check_code(raw)
    with pytest.raises(harden.PolicyError, match="expected allow_code True, False or module names"):
        check_code(Policy(objectives=[ObjectiveSpec(name="no_such_objective")]), [1])  # type: ignore[list-item]


def test_load_policy_refuses_code_unless_allowed(tmp_path):
    path = _write(tmp_path, _with_model("mypkg.models:Net"))
    with pytest.raises(harden.PolicyError) as info:
        load_policy(path)
    msg = str(info.value)
    assert msg == (
        f"{path}: model.name: 'mypkg.models:Net' is code, expected none unless allowed: harden imports code named in "
        "a policy only when you allow it; pass --allow-code mypkg.models (or --trust-policy-code), or allow_code=['mypkg.models'] "
        "in Python"
    )
    for allow in (True, ["mypkg"], ["mypkg.models"], ("other", "mypkg"), "mypkg"):
        assert load_policy(path, allow_code=allow).model.name == "mypkg.models:Net"
    for allow in (False, [], ["mypkgx"], ["mypkg.model"], ["mypkg.models.sub"], ["my"]):
        with pytest.raises(harden.PolicyError, match=r"model\.name: 'mypkg\.models:Net' is code"):
            load_policy(path, allow_code=allow)


def test_a_package_allows_itself_and_below_only(tmp_path):
    path = _write(tmp_path, _with_model("mypkgx:Net"))
    with pytest.raises(harden.PolicyError, match="--allow-code mypkgx "):
        load_policy(path, allow_code=["mypkg"])
    assert load_policy(path, allow_code=["mypkgx"]).model.name == "mypkgx:Net"


def test_every_code_reference_is_checked_not_only_the_model(tmp_path):
    doc = _with_model(
        "mypkg:Net", verify={"attacks": [{"name": "fgsm"}, {"name": "transfer", "params": {"model": "os:system"}}]}
    )
    path = _write(tmp_path, doc)
    with pytest.raises(
        harden.PolicyError, match=r"verify\.attacks\.1\.params\.model: 'os:system' is code.*--allow-code os "
    ):
        load_policy(path, allow_code=["mypkg"])
    data = _write(tmp_path, {"data": {"name": "evil.data:load"}, "objectives": [{"name": "ce"}]}, "data.yaml")
    with pytest.raises(harden.PolicyError, match=r"data\.name: 'evil\.data:load' is code"):
        load_policy(data)


@pytest.mark.parametrize("allow", [1, None, [1], ["my pkg"], [""], ["pkg:attr"], ["..x"]])
def test_a_bad_allow_code_is_refused(tmp_path, allow):
    path = _write(tmp_path, _with_model("timm:resnet10t"))
    with pytest.raises(harden.PolicyError, match="expected allow_code True, False or module names"):
        load_policy(path, allow_code=allow)


def test_harden_tiny_models_need_no_opt_in(tmp_path):
    assert "harden.testing:TinyCNN" in BUILTIN_CODE
    for name in sorted(BUILTIN_CODE):
        assert load_policy(_write(tmp_path, _with_model(name))).model.name == name
    with pytest.raises(harden.PolicyError, match=r"--allow-code harden\.pipeline "):  # the rest of harden is code
        load_policy(_write(tmp_path, _with_model("harden.pipeline:run")))


def test_validate_policy_allows_the_callers_own_code_unless_told_otherwise():
    doc = _with_model("mypkg:Net")
    assert validate_policy(doc).model.name == "mypkg:Net"  # a mapping built in Python: the caller's own code
    with pytest.raises(harden.PolicyError, match=r"^x.yaml: model.name: 'mypkg:Net' is code"):
        validate_policy(doc, "x.yaml", allow_code=False)
    assert validate_policy(doc, allow_code=["mypkg"]).model.name == "mypkg:Net"


def test_code_named_in_a_policy_file_never_runs(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "h1_evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nNet = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    imported: list[str] = []
    ran: list[str] = []
    real_import = importlib.import_module

    def recording_import(name, *args):
        imported.append(name)
        return real_import(name, *args)

    def recording_system(command):
        ran.append(command)
        return 0

    monkeypatch.setattr(importlib, "import_module", recording_import)
    monkeypatch.setattr(os, "system", recording_system)
    evil = _write(tmp_path, _with_model("h1_evil_module:Net"), "evil.yaml")
    system = _write(
        tmp_path, {"model": {"name": "os:system", "args": {"command": "touch x"}}, "objectives": [{"name": "ce"}]}
    )
    for path, module in ((evil, "h1_evil_module"), (system, "os")):
        with pytest.raises(harden.PolicyError, match=f"model.name: '{module}:"):
            load_policy(path)
        with pytest.raises(harden.PolicyError, match=f"--allow-code {module} "):
            validate_policy(yaml.safe_load(path.read_text()), str(path), allow_code=False)
    policy = load_policy(evil, allow_code=True)  # allowed: it loads, and validation still imports nothing
    assert policy.model.name == "h1_evil_module:Net" and code_references(policy)[0].package == "h1_evil_module"
    assert not marker.exists() and "h1_evil_module" not in sys.modules
    assert not [n for n in imported if n.startswith("h1_evil_module")] and ran == []


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads ``1e-3`` as a string; policies read it as a number, as YAML 1.2 does."""
    path = tmp_path / "p.yaml"
    path.write_text("name: e\nobjectives: [{name: ce}]\ntrain: {lr: 1e-3, weight_decay: 5E-4}\nthreat: {eps: 3e-1}\n")
    policy = load_policy(path)
    assert (policy.train.lr, policy.train.weight_decay, policy.threat.eps) == (1e-3, 5e-4, 0.3)
    path.write_text("name: e\nobjectives: [{name: ce}]\ntrain: {lr: 1e999}\n")
    with pytest.raises(harden.PolicyError, match=r"train\.lr: expected a finite"):
        load_policy(path)


OVERRIDDEN = "name: o\nobjectives: [{name: pgd_at, params: {steps: 3}}]\ntrain: {epochs: 5}\n"


def test_overrides_set_dotted_keys_before_validation(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(OVERRIDDEN)
    policy = load_policy(
        path,
        overrides=[
            "train.epochs=1",
            "verify.n_examples=200",  # a section the file does not have is created
            "objectives.0.weight=0.5",
            "objectives.0.params.steps=5",
            "threat.eps=1e-1",  # the YAML 1.2 number rule of policy files
            "verify.eps_sweep=[0.05, 0.1]",
            "train.lr=0.01",
            "train.lr=0.02",  # in order: the last wins
        ],
    )
    assert (policy.train.epochs, policy.verify.n_examples, policy.threat.eps, policy.train.lr) == (1, 200, 0.1, 0.02)
    assert (policy.objectives[0].weight, policy.objectives[0].params["steps"]) == (0.5, 5)
    assert policy.verify.eps_sweep == (0.05, 0.1)
    assert policy_hash(policy) != policy_hash(load_policy(path))


def test_apply_overrides_leaves_the_document_alone():
    from harden.policy_io import apply_overrides

    doc = {"train": {"epochs": 5}, "objectives": [{"name": "ce"}]}
    new = apply_overrides(doc, ["train.epochs=1", "objectives.0.weight=2"])
    assert doc == {"train": {"epochs": 5}, "objectives": [{"name": "ce"}]}
    assert new == {"train": {"epochs": 1}, "objectives": [{"name": "ce", "weight": 2}]}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=0", "p.yaml with --set train.epochs: train.epochs: expected a number >= 1, got 0"),
        ("train.epochz=1", "with --set train.epochz: train.epochz: unknown key (not allowed here); did you mean"),
        ("train.epochs=many", "with --set train.epochs: train.epochs: expected an integer, got 'many'"),
        (
            "objectives.3.weight=1",
            "p.yaml: --set objectives.3.weight: expected an index below 1 into the list at objectives",
        ),
        ("objectives.x.weight=1", "expected an index below 1 into the list at objectives, got 'x'"),
        ("train.epochs.x=1", "p.yaml: --set train.epochs.x: expected a mapping or list at train.epochs, got int"),
        ("train.epochs", "p.yaml: --set: expected key.path=value (e.g. train.epochs=1), got 'train.epochs'"),
        ("=1", "expected key.path=value"),
        ("train..epochs=1", "expected key.path=value"),
        ("name=&a x", "--set name: expected plain YAML, got an anchor"),
        ("name=!!python/object/apply:os.system ['true']", "--set name: expected valid YAML"),
        ("seed=1e999", "with --set seed: seed: expected a finite number"),
        ("name=[unclosed", "--set name: expected valid YAML"),
    ],
)
def test_a_bad_override_is_one_line_naming_it(tmp_path, override, message):
    path = tmp_path / "p.yaml"
    path.write_text(OVERRIDDEN)
    with pytest.raises(harden.PolicyError) as exc:
        load_policy(path, overrides=[override])
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_an_override_naming_code_needs_the_same_opt_in(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(OVERRIDDEN)
    with pytest.raises(harden.PolicyError, match=r"with --set model\.name: model\.name: 'o1_mod:Net' is code"):
        load_policy(path, overrides=["model.name=o1_mod:Net"])
    ref = "verify.attacks=[{name: transfer, params: {model: 'o1_mod:Surrogate'}}]"
    with pytest.raises(harden.PolicyError, match="is code"):
        load_policy(path, overrides=[ref])
    assert load_policy(path, overrides=["model.name=o1_mod:Net"], allow_code=["o1_mod"]).model.name == "o1_mod:Net"
    assert "o1_mod" not in sys.modules  # validation imports nothing
