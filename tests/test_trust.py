import pytest
from pydantic import BaseModel

import harden
from harden.attacks import ATTACKS
from harden.coderef import CodeRef
from harden.policy import Catalog, ModelSpec, Policy
from harden.policy_io import CATALOG, check_code, code_references, validate_policy
from harden.trust import BUILTIN_CODE, CodeReference, allowed_modules, find_code, refuse_code


def test_code_references_have_the_real_key_paths():
    policy = validate_policy(
        {
            "model": {"name": "mypkg.models:Net"},
            "data": {"name": "otherpkg.data:load"},
            "objectives": [{"name": "ce"}],
            "verify": {
                "attacks": [
                    {"name": "fgsm"},
                    {"name": "transfer", "params": {"model": "timm:resnet10t"}},  # timm: not code
                    {"name": "transfer"},  # None: the policy's own model
                    {"name": "transfer", "params": {"model": "os:system"}},
                ]
            },
        }
    )
    assert code_references(policy) == [
        CodeReference("model.name", "mypkg.models:Net"),
        CodeReference("data.name", "otherpkg.data:load"),
        CodeReference("verify.attacks.3.params.model", "os:system"),
    ]
    ref = code_references(policy)[0]
    assert (ref.module, ref.package) == ("mypkg.models", "mypkg")


def test_timm_models_and_registered_names_are_not_code():
    policy = validate_policy(
        {"model": {"name": "timm:resnet10t"}, "data": {"name": "digits"}, "objectives": [{"name": "ce"}]}
    )
    assert code_references(policy) == []
    assert check_code(policy) == []


def test_a_plugins_params_declare_their_code_with_code_ref():
    class NetParams(BaseModel):
        net: CodeRef = "timm:resnet10t"
        nets: tuple[CodeRef, ...] = ()
        by_name: dict[str, CodeRef] = {}
        note: str = "a:b"  # not declared: not a code reference

    class Plugin:
        Params = NetParams

    class Objectives:
        def get(self, name):
            return Plugin

        def names(self):
            return ["plug"]

    catalog = Catalog(
        objectives=Objectives(), attacks=ATTACKS, datasets=CATALOG.datasets, check_model=CATALOG.check_model
    )
    params = {"net": "mypkg:Net", "nets": ["a.b:C", "timm:vit_tiny_patch16_224"], "by_name": {"x": "c:D"}}
    policy = Policy.model_validate({"objectives": [{"name": "plug", "params": params}]}, context={"harden": catalog})
    assert code_references(policy) == [
        CodeReference("objectives.0.params.net", "mypkg:Net"),
        CodeReference("objectives.0.params.nets.0", "a.b:C"),
        CodeReference("objectives.0.params.by_name.x", "c:D"),
    ]
    with pytest.raises(harden.PolicyError, match=r"^objectives\.0\.params\.net: 'mypkg:Net' is code"):
        check_code(policy)


def test_find_code_walks_any_section_and_reports_its_own_key_paths():
    assert find_code(ModelSpec(name="mypkg:Net")) == [CodeReference("name", "mypkg:Net")]
    assert find_code(ModelSpec(name="timm:resnet10t", args={"factory": "os:system"})) == []  # args: not CodeRef
    policy = validate_policy({"model": {"name": "mypkg:Net"}, "objectives": [{"name": "ce"}]})
    assert find_code(policy) == code_references(policy) == [CodeReference("model.name", "mypkg:Net")]


def test_find_code_walks_deep_params_without_recursion():
    class Marked(BaseModel):
        refs: list[CodeRef] = []
        deep: list[object] = []

    node: object = ["a:b"]
    for _ in range(5000):  # far beyond the recursion limit of a recursive walk
        node = [node]
    found = find_code(Marked(refs=["x.y:Z"], deep=[node]))  # deep is not a CodeRef field: 'a:b' is no code
    assert found == [CodeReference("refs.0", "x.y:Z")]


@pytest.mark.parametrize(
    ("allow", "expected"),
    [(True, True), (False, False), ("mypkg", ["mypkg"]), (("a", "b.c"), ["a", "b.c"]), ([], [])],
)
def test_allowed_modules(allow, expected):
    assert allowed_modules(allow) == expected


@pytest.mark.parametrize("allow", [1, None, [1], ["my pkg"], [""], ["pkg:attr"], ["..x"], b"mypkg"])
def test_a_malformed_allow_code_is_the_callers_error(allow):
    with pytest.raises(harden.PolicyError, match=r"^expected allow_code True, False or module names"):
        allowed_modules(allow)


def test_refuse_code_allows_a_module_and_what_is_under_it_only():
    refs = [CodeReference("model.name", "mypkg.models:Net"), CodeReference("data.name", "harden.testing:TinyCNN")]
    for allow in (True, ["mypkg"], ["mypkg.models"], ("other", "mypkg"), "mypkg"):
        assert refuse_code(refs, allow) == refs
    for allow in (False, [], ["mypkgx"], ["mypkg.model"], ["mypkg.models.sub"], ["my"]):
        with pytest.raises(harden.PolicyError, match=r"^x\.yaml: model\.name: 'mypkg\.models:Net' is code"):
            refuse_code(refs, allow, source="x.yaml")
    assert refuse_code(refs[1:]) == refs[1:]  # harden's tiny models need no opt-in
    assert "harden.testing:TinyCNN" in BUILTIN_CODE and all(r.startswith("harden.") for r in BUILTIN_CODE)
    with pytest.raises(harden.PolicyError, match=r"--allow-code harden\.pipeline "):  # the rest of harden is code
        refuse_code([CodeReference("model.name", "harden.pipeline:run")])


def test_the_refusal_suggests_allowing_the_module_not_its_whole_package():
    for ref, module in (("harden.testing:synthetic_bundle", "harden.testing"), ("mypkg.models:Net", "mypkg.models")):
        with pytest.raises(harden.PolicyError) as info:
            refuse_code([CodeReference("data.name", ref)])
        msg = str(info.value)
        assert f"--allow-code {module} " in msg and f"allow_code=[{module!r}]" in msg, msg
        package = module.partition(".")[0]
        assert f"--allow-code {package} " not in msg and f"allow_code=[{package!r}]" not in msg, msg
        assert refuse_code([CodeReference("data.name", ref)], [module])  # the suggested remedy works


def test_code_in_the_params_of_a_plugin_with_parameters_added_later_is_found():
    """A Params model with ``added_later`` stores fewer keys than it dumps: its checked Params must still be walked."""
    from harden.attacks.apgd_t import APGDTParams

    class HookParams(APGDTParams):
        hook: CodeRef | None = None

    class Plugin:
        Params = HookParams

    class Attacks:
        def get(self, name):
            return Plugin if name == "my_apgdt" else ATTACKS.get(name)

        def names(self):
            return ["my_apgdt", *ATTACKS.names()]

    catalog = Catalog(
        objectives=CATALOG.objectives, attacks=Attacks(), datasets=CATALOG.datasets, check_model=CATALOG.check_model
    )
    doc = {"objectives": [{"name": "ce"}], "verify": {"attacks": [{"name": "my_apgdt", "params": {"hook": "os:system"}}]}}
    policy = Policy.model_validate(doc, context={"harden": catalog})
    spec = policy.verify.attacks[0]
    assert "screen_steps" not in spec.params and isinstance(spec.checked_params, HookParams)  # left out, still checked
    assert code_references(policy) == [CodeReference("verify.attacks.0.params.hook", "os:system")]
    with pytest.raises(harden.PolicyError, match=r"^verify\.attacks\.0\.params\.hook: 'os:system' is code"):
        check_code(policy)
