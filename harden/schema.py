"""The building blocks of the policy schema: strict sections and the named, parametrised entries.

:class:`ObjectiveSpec` and :class:`AttackSpec` validate their ``params`` with the registered
class's own ``Params`` model when the validation context (a :class:`harden.catalog.Catalog`)
holds its registry, and carry the validated object (:attr:`ObjectiveSpec.checked_params`). This
module, like :mod:`harden.policy`, imports no registry.

Values are strict (:class:`Strict`, and every ``Params`` model through the validation step): a
bool is never a number, a number never a bool, a string never a number; an integer is fine where
a float is expected. A field that may name importable code is declared
:data:`harden.coderef.CodeRef`, so :func:`harden.trust.find_code` finds every one (plugins'
``Params`` included).

``Catalog``, ``Lookup`` and ``catalog_of`` (from :mod:`harden.catalog`) and ``CodeRef``,
``CODE_REF``, ``MODULE_ATTR``, ``is_code`` and ``is_code_ref`` (from :mod:`harden.coderef`)
are importable from here too.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import Self

from harden.catalog import Catalog, Lookup, catalog_of
from harden.coderef import CODE_REF, MODULE_ATTR, CodeRef, is_code, is_code_ref
from harden.errors import UnknownNameError, describe_validation_error, format_key_path
from harden.registry import did_you_mean
from harden.require import parse_requirement

__all__ = [
    "CODE_REF",
    "HALF_LEVEL",
    "MODULE_ATTR",
    "AttackSpec",
    "Catalog",
    "CertifySpec",
    "CodeRef",
    "ExportSpec",
    "Lookup",
    "ObjectiveSpec",
    "Strict",
    "ThreatModel",
    "catalog_of",
    "is_code",
    "is_code_ref",
    "stored_params",
]

#: half a level of an 8-bit pixel on the [0, 1] scale: an eps below it moves no 8-bit image
HALF_LEVEL = 0.5 / 255


class Strict(BaseModel):
    """Base of every policy section: unknown keys are refused; frozen; values strict.

    Instances handed in as values are validated again (``revalidate_instances``), so a spec
    built in Python and placed in a policy is checked like a written one, and the caller's
    object is never changed. Values are strict (pydantic's strict mode): ``eps: true``,
    ``eps: "0.1"`` and ``checks: 1`` are refused, ``eps: 1`` is fine. A tuple field takes a list
    (YAML has no tuples): declare it ``Field(..., strict=False)``; its items stay strict.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, revalidate_instances="always", strict=True)


def _nested_params_error(
    kind: str, name: str, exc: ValidationError, params_model: type[BaseModel]
) -> PydanticCustomError:
    """Turn a Params model's first error into one that carries the nested key path.

    An unknown parameter gets the close matches among the allowed ones (or the allowed ones).
    """
    err = exc.errors()[0]
    path = format_key_path(["params", *err["loc"]])  # quotes odd keys: a "\n" key must not break the line
    hint = ""
    if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:
        hint = did_you_mean(str(err["loc"][0]), list(params_model.model_fields), or_list=True)
    return PydanticCustomError(
        "harden_nested",
        "{msg}",
        {"path": path, "msg": f"{describe_validation_error(err)} (params of {kind} {name!r}){hint}"},
    )


def _tuple_field(field: Any) -> bool:
    """Whether a field's annotation is a tuple (or an optional one)."""
    annotation = field.annotation
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    return any(typing.get_origin(a) is tuple or a is tuple for a in (annotation, *options))


def _validate_params(kind: str, name: str, params_model: type[BaseModel], params: dict[str, Any]) -> BaseModel:
    """Validate ``params`` strictly (as :class:`Strict`), whatever the ``Params`` model's own config.

    A list given for a tuple field becomes a tuple first (YAML has no tuples); its items stay strict.
    """
    fields = params_model.model_fields
    data = {
        k: tuple(v) if isinstance(v, list) and k in fields and _tuple_field(fields[k]) else v for k, v in params.items()
    }
    try:
        return params_model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise _nested_params_error(kind, name, exc, params_model) from None


def _lookup(registry: Lookup, name: str) -> Any:
    try:
        return registry.get(name)
    except UnknownNameError as exc:
        raise PydanticCustomError("harden_nested", "{msg}", {"path": "name", "msg": str(exc)}) from None


def stored_params(validated: BaseModel) -> dict[str, Any]:
    """How a spec stores its validated params: every default filled in, as JSON values.

    Except: a parameter its ``Params`` model names in ``added_later`` is left out while at its
    default, so the hash of a policy that does not use it is what it was before it existed.

    Example:
        >>> from typing import ClassVar
        >>> class P(BaseModel):
        ...     steps: int = 10
        ...     screen: int | None = None
        ...     added_later: ClassVar[frozenset[str]] = frozenset({"screen"})
        >>> stored_params(P()), stored_params(P(screen=3))
        ({'steps': 10}, {'steps': 10, 'screen': 3})
    """
    filled = validated.model_dump(mode="json")
    fields = type(validated).model_fields
    for name in getattr(type(validated), "added_later", ()):
        if name in filled and name in fields and filled[name] == fields[name].get_default(call_default_factory=True):
            del filled[name]
    return filled


class _NamedSpec(Strict):
    """A named, parametrised entry (objective or attack) that carries its validated ``Params``.

    Subclasses declare the fields (``name`` and ``params`` among them) in the order they are
    dumped; this base adds only the carried ``Params`` object.
    """

    if TYPE_CHECKING:
        name: str
        params: dict[str, Any]

    _checked: BaseModel | None = PrivateAttr(default=None)

    @property
    def checked_params(self) -> BaseModel | None:
        """The validated ``Params`` object (None: validated without a catalog; ``params`` is then raw).

        Only while it still says what ``params`` says: a copy with other params (``model_copy``)
        is unchecked again.
        """
        checked = self._checked
        if checked is None or stored_params(checked) != self.params:
            return None
        return checked

    def params_for_build(self) -> BaseModel | dict[str, Any]:
        """What to build the entry from: the checked ``Params`` object, else the raw ``params``."""
        checked = self.checked_params
        return checked if checked is not None else self.params

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy; with ``update``, unchecked (its names and params are checked again where used)."""
        copied = super().model_copy(update=update, deep=deep)
        if update:
            copied._checked = None
        return copied

    def _carry(self, kind: str, cls: Any) -> None:
        """Validate ``params`` with ``cls.Params`` and keep them as :func:`stored_params` writes them."""
        validated = _validate_params(kind, self.name, cls.Params, self.params)
        object.__setattr__(self, "params", stored_params(validated))
        self._checked = validated


class ThreatModel(Strict):
    """The attacker's budget, in pixel space ([0, 1]).

    Attributes:
        norm: ``linf`` or ``l2``.
        eps: radius of the perturbation ball (0 < eps <= 1 for linf; for l2, 0 < eps <= 100).
        rho: IWD budget (internal Wasserstein distance) for the IWD attack and IWD-AT.
    """

    norm: Literal["linf", "l2"] = "linf"
    eps: float = Field(0.3, gt=0)
    rho: float | None = Field(None, gt=0)

    @property
    def below_half_level(self) -> bool:
        """Whether ``eps`` is below half a pixel level (:data:`HALF_LEVEL`): a unit mistake, almost surely.

        One pixel moved by less than half a level rounds back on every 8-bit image (linf and l2
        alike), so robustness at such an eps says nothing about 8-bit images.

        Example:
            >>> ThreatModel(eps=8 / 255).below_half_level, ThreatModel(eps=1e-4).below_half_level
            (False, True)
        """
        return self.eps < HALF_LEVEL

    @model_validator(mode="after")
    def _eps_range(self) -> ThreatModel:
        if self.norm == "linf" and self.eps > 1:
            raise PydanticCustomError(
                "harden_nested",
                "{msg}",
                {"path": "eps", "msg": f"expected eps <= 1 for an linf ball on [0, 1] pixels, got {self.eps}"},
            )
        if self.norm == "l2" and self.eps > 100:
            raise PydanticCustomError(
                "harden_nested",
                "{msg}",
                {"path": "eps", "msg": f"expected eps <= 100 for an l2 ball, got {self.eps}"},
            )
        return self


class ObjectiveSpec(_NamedSpec):
    """One weighted term of the training loss.

    Attributes:
        name: a registered objective (``ce``, ``pgd_at``, ``trades``, ...).
        weight: its weight in the sum (>= 0).
        params: the objective's own parameters, validated by its ``Params`` model.
        every: compute the term on every N-th training step only (lazy regularisation), at its
            ``weight`` as written, so its mean weight per step is ``weight / every`` (StyleGAN2's
            lazy R1 multiplies by N instead; we do not, to avoid N-fold loss spikes). Cuts the
            cost of an expensive term N-fold. Left out of the canonical dump when 1, so the hash
            of a policy that does not use it is what it was before the field existed.
    """

    name: str
    weight: float = Field(1.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)
    every: int = Field(1, ge=1)

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if out.get("every") == 1:
            del out["every"]
        return out

    @model_validator(mode="after")
    def _check_params(self, info: ValidationInfo) -> ObjectiveSpec:
        registry = catalog_of(info).objectives
        if registry is not None:
            self._carry("objective", _lookup(registry, self.name))
        return self


class AttackSpec(_NamedSpec):
    """One attack of the verification suite.

    Attributes:
        name: a registered attack (``fgsm``, ``pgd``, ...).
        params: the attack's own parameters, validated by its ``Params`` model.
        n_examples: run this attack on the first n verified examples only (None: all). Only for
            attacks reported outside the l_p worst case (``iwd``, ``invariance``,
            ``invariance_examples``), whose cost can be far above the cascade's.
    """

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    n_examples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _check_params(self, info: ValidationInfo) -> AttackSpec:
        registry = catalog_of(info).attacks
        if registry is None:
            return self
        cls = _lookup(registry, self.name)
        self._carry("attack", cls)
        if self.n_examples is not None and cls.bounded and not cls.changes_label:
            raise PydanticCustomError(
                "harden_nested",
                "{msg}",
                {
                    "path": "n_examples",
                    "msg": f"expected n_examples only on attacks outside the l_p worst case, got it on {self.name!r} "
                    "(the cascade's worst case needs every attack on every example; lower verify.n_examples instead)",
                },
            )
        return self


class ExportSpec(Strict):
    """ONNX export settings.

    Attributes:
        opset: ONNX opset (None: the exporter's default).
        parity_examples: inputs on which onnxruntime must match torch.
        parity_atol: largest allowed absolute logit difference.
        verify_examples: test examples on which ``harden run`` attacks the exported ONNX session
            itself with the gradient-free attacks (transfer from the PyTorch model, Square,
            noise); the result goes into the certificate. 0 skips it.
    """

    opset: int | None = Field(None, ge=13)
    parity_examples: int = Field(64, ge=1)
    parity_atol: float = Field(1e-4, gt=0)
    verify_examples: int = Field(200, ge=0)


def _requirement_text(text: str) -> str:
    parse_requirement(text)  # a PolicyError (ValueError): reported at certify.require.<i>
    return text


#: one ``certify.require`` entry, checked by :func:`harden.require.parse_requirement`
RequirementText = Annotated[str, AfterValidator(_requirement_text)]


class CertifySpec(Strict):
    """Randomized smoothing (Cohen et al. 2019) and what the certificate shows.

    Attributes:
        smoothing: run CERTIFY on the first ``n_examples`` test examples.
        sigma: Gaussian noise standard deviation (pixel scale); train with ``gaussian_aug`` at
            the same sigma for useful radii.
        n0: noisy samples that pick the top class.
        n: noisy samples that bound its probability (Clopper-Pearson, level ``1 - alpha``).
        alpha: failure probability of each certificate.
        batch_size: noisy images per forward pass.
        n_examples: test examples to certify.
        radius: the l2 radius the verdict is about. None: ``threat.eps`` when the threat is l2;
            with an linf threat and no radius the verdict cannot be CERTIFIED.
        min_certified_accuracy: CERTIFIED needs at least this certified accuracy at ``radius``
            (and every sanity check passing).
        radii: grid of the certified-accuracy curve; None: 0 to 4 sigma in 0.25 sigma steps.
        saliency_examples: test images whose input-gradient saliency maps the report shows.
        require: targets the certificate is held to, each ``METRIC OP VALUE``: a metric among
            ``clean_accuracy``, ``robust_accuracy``, ``certified_accuracy`` and
            ``after:<attack label>``, an operator among ``>=``, ``>``, ``<=``, ``<``, and a
            fraction (``0.45``) or percentage (``45%``), e.g. ``robust_accuracy >= 0.45``. The
            certificate shows PASS or FAIL for each at the top (a metric not measured fails), and
            ``harden inspect`` exits 1 when one fails. They do not change the verdict.
    """

    smoothing: bool = False
    sigma: float = Field(0.25, gt=0, le=10)
    n0: int = Field(100, ge=1, le=1_000_000)
    n: int = Field(1000, ge=1, le=10_000_000)
    alpha: float = Field(0.001, gt=0, lt=0.5)
    batch_size: int = Field(256, ge=1)
    n_examples: int = Field(100, ge=1)
    radius: float | None = Field(None, gt=0)
    min_certified_accuracy: float = Field(0.5, gt=0, le=1)
    radii: tuple[float, ...] | None = Field(None, strict=False)
    saliency_examples: int = Field(4, ge=0, le=32)
    require: tuple[RequirementText, ...] = Field((), strict=False)

    def radius_for(self, threat: ThreatModel) -> float | None:
        """The radius the verdict is about (see ``radius``)."""
        if self.radius is not None:
            return self.radius
        return threat.eps if threat.norm == "l2" else None

    def radius_grid(self) -> tuple[float, ...]:
        """The radii of the certified-accuracy curve."""
        if self.radii is not None:
            return tuple(sorted(self.radii))
        return tuple(round(self.sigma * k / 4, 6) for k in range(17))
