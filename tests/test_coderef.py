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
    assert P(net="pkg.mod:Net.build").net == "pkg.mod:Net.build"
    assert P(net="timm:resnet10t").net == "timm:resnet10t" and not is_code("timm:resnet10t")
    assert P(net="mnist-5k").net == "mnist-5k" and not is_code("mnist-5k")  # a registered name: not code
    for bad in ("os..path:join", "a:b:c", ".rel:x", "mod:", "\uff4f\uff53:system", "os:system()"):
        with pytest.raises(pydantic.ValidationError, match="dotted Python names"):
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
        ("_pkg.sub2:Cls.method", True),
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
