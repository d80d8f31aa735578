import pydantic
import pytest
from pydantic import BaseModel

from harden.coderef import CODE_REF, MODULE_ATTR, CodeRef, is_code, is_code_ref


def test_code_ref_marks_a_field_and_checks_the_format_of_code():
    class P(BaseModel):
        net: CodeRef | None = None
        nets: tuple[CodeRef, ...] = ()
        label: str = "x"

    assert is_code_ref(P.model_fields["net"]) and is_code_ref(P.model_fields["nets"])
    assert not is_code_ref(P.model_fields["label"])
    assert P(net="pkg.mod:Net").net == "pkg.mod:Net"
    assert P(net="timm:resnet10t").net == "timm:resnet10t" and not is_code("timm:resnet10t")
    assert P(net="mnist-5k").net == "mnist-5k" and not is_code("mnist-5k")  # a registered name: not code
    for bad in ("os..path:join", "a:b:c", ".rel:x", "mod:", "\uff4f\uff53:system", "os:system()", "pkg.mod:Net.build"):
        with pytest.raises(pydantic.ValidationError, match="one public name of it"):
            P(net=bad)


def test_a_plain_code_ref_field_carries_the_marker_in_its_metadata():
    class P(BaseModel):
        net: CodeRef = "timm:resnet10t"
        by_name: dict[str, CodeRef] = {}

    field = P.model_fields["net"]
    assert field.annotation is str and CODE_REF in field.metadata  # pydantic moves Annotated's metadata
    assert is_code_ref(field) and is_code_ref(P.model_fields["by_name"])
    assert repr(CODE_REF) == "CODE_REF"  # the policy reference and error messages show it


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("m:a", True),
        ("_pkg.sub2:Cls", True),
        ("pkg.sub2:Cls.method", False),  # one name, never a path through it
        ("mypkg.models:torch.os.system", False),
        ("harden.checkpoint:os.system", False),
        ("pkg:_private", False),  # public names only
        ("pkg:__init__", False),
        ("pkg:__class__", False),
        ("1pkg:x", False),  # a name never starts with a digit
        ("pkg:x.", False),
        ("pkg-x:y", False),
        ("pkg:x y", False),
        ("pkg", False),
        ("pkg:x\n", False),
    ],
)
def test_module_attr_is_dotted_ascii_names(value, ok):
    assert bool(MODULE_ATTR.fullmatch(value)) is ok


def test_a_code_ref_reaching_through_a_module_is_a_one_line_error_naming_the_key():
    from harden.errors import PolicyError
    from harden.policy_io import validate_policy
    from harden.testing import tiny_policy

    doc = tiny_policy().model_dump(mode="json")
    for bad in ("mypkg.models:torch.os.system", "harden.checkpoint:os.system", "mypkg.models:__builtins__"):
        doc["model"] = {"name": bad, "args": {"command": "echo pwned"}}
        with pytest.raises(PolicyError) as info:
            validate_policy(doc, "p.yaml", allow_code=["mypkg", "harden"])
        msg = str(info.value)
        assert "\n" not in msg and msg.startswith("p.yaml: model.name: expected 'package.module:Name'"), msg
        assert repr(bad) in msg
