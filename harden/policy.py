"""The policy: one validated, frozen description of a hardening job.

A policy is YAML (read with ``yaml.safe_load``) validated by pydantic v2 with ``extra="forbid"``.
Every objective and attack validates its own ``params`` with its own pydantic ``Params`` model,
so third-party plugins get the same checks and error messages as the built-ins.

This module is a pure schema: it imports no registry, model or data module. Names and params
are checked by the validation step, which hands the registries in through pydantic's
validation context as a :class:`Catalog` (``harden.policy_io.validate_policy`` does; so do
``load_policy`` and ``harden.validate_policy``). A spec validated that way carries its
validated ``Params`` object (:attr:`ObjectiveSpec.checked_params`), so each is validated once
per run. Built without a catalog (``Policy(...)`` in Python), a policy is checked for
structure only, and names and params are checked where they are used. The ``model`` and ``data``
sections live in :mod:`harden.sources`, the building blocks in :mod:`harden.schema`; every section
is importable from here.

Any problem raises :class:`harden.PolicyError` with one line naming the file and the key path::

    policies/bad.yaml: objectives.0.params.beta: expected a number >= 0, got -1.0
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError
from typing_extensions import Self

from harden.schema import (
    HALF_LEVEL,
    AttackSpec,
    Catalog,
    CertifySpec,
    ExportSpec,
    ObjectiveSpec,
    Strict,
    ThreatModel,
    catalog_of,
)
from harden.sources import TIMM_FILE_ARGS, DataSpec, ModelSpec

__all__ = [
    "TIMM_FILE_ARGS",
    "AttackSpec",
    "Catalog",
    "CertifySpec",
    "DataSpec",
    "ExportSpec",
    "ModelSpec",
    "ObjectiveSpec",
    "Policy",
    "ThreatModel",
    "TrainSpec",
    "VerifySpec",
]

MAX_POLICY_BYTES = 1_000_000

#: a policy name: one safe folder name (``runs/<name>``), no ``.``/``..``, no leading ``-``
_NAME = re.compile(r"\w(?:[\w.\-]*[\w\-])?")
_DEVICE_NAMES = re.compile(r"(?i)(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?")


class TrainSpec(Strict):
    """How to train.

    Attributes:
        epochs: number of epochs (>= 1).
        optimizer: ``sgd`` (with Nesterov momentum) or ``adamw``.
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        schedule: ``cosine`` (to 0 over all steps), ``step`` (times ``gamma`` at each epoch in
            ``milestones``) or ``constant``.
        warmup_epochs: linear warm-up length, in epochs (may be fractional).
        milestones: epochs at which the ``step`` schedule multiplies the lr by ``gamma``.
        gamma: multiplier of the ``step`` schedule.
        grad_clip: clip the global gradient norm to this value (None: no clipping).
        probe_examples: test examples for the per-epoch PGD probe, a seeded class-balanced
            sample drawn once per run (0 disables it).
        probe_steps: PGD steps of the per-epoch probe.
        checkpoint_every: write a checkpoint every N epochs (the last epoch always is).
        keep_checkpoints: how many epoch checkpoints to keep (older ones are deleted).
        bn_stats: which training forwards update BatchNorm running statistics:
            ``first_forward`` (the first objective's input, e.g. the PGD view of a leading
            ``pgd_at``; the other views of a mix are normalised with their own batch statistics
            but do not move eval mode's) or ``every_forward`` (a mixture of every view).
        precision: ``fp32``, or mixed precision: ``bf16`` / ``fp16`` run the training forwards
            under ``torch.autocast`` (losses stay float32; ``fp16`` adds a ``GradScaler``, saved
            in checkpoints).
        attack_precision: precision of the adversarial views computed during training: ``fp32``
            (default, whatever ``precision`` is: half-precision input gradients are coarse and
            underflow, which weakens the attack and can fake robustness) or ``same`` (under the
            training autocast: faster). Verification always runs in float32.
        channels_last: use the ``torch.channels_last`` memory format for the model and batches
            while training (faster convolutions on GPUs).
        compile: run the training forwards through ``torch.compile`` (attacks, evaluation and
            saved weights use the plain module).
        keep_best: keep the weights of the epoch with the best probe robust accuracy as
            ``checkpoints/best.safetensors`` (needs the probe: ``probe_examples`` > 0).
        select: which weights the run returns, certifies and exports: ``last`` (the last epoch)
            or ``best`` (the epoch with the best probe robust accuracy; needs ``keep_best``).
        early_stopping: stop when the probe's robust accuracy has not improved for this many
            epochs (None: train every epoch; needs the probe).
        tensorboard: also write the per-epoch metrics as TensorBoard events in ``tensorboard/``
            of the run folder: None when the ``tensorboard`` package is installed, True always
            (an error without it), False never. ``metrics.csv`` is always written.
    """

    epochs: int = Field(3, ge=1, le=100_000)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    milestones: tuple[int, ...] = Field((), strict=False)
    gamma: float = Field(0.1, gt=0, le=1)
    grad_clip: float | None = Field(None, gt=0)
    probe_examples: int = Field(256, ge=0)
    probe_steps: int = Field(10, ge=1)
    checkpoint_every: int = Field(1, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    bn_stats: Literal["first_forward", "every_forward"] = "first_forward"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    attack_precision: Literal["fp32", "same"] = "fp32"
    channels_last: bool = False
    compile: bool = False
    keep_best: bool = True
    select: Literal["last", "best"] = "last"
    early_stopping: int | None = Field(None, ge=1)
    tensorboard: bool | None = None

    @model_validator(mode="after")
    def _probe_for_best(self) -> TrainSpec:
        needs = [k for k, on in (("select: best", self.select == "best"), ("early_stopping", self.early_stopping))
                 if on]
        if needs and self.probe_examples == 0:
            raise PydanticCustomError(
                "harden_nested",
                "{msg}",
                {"path": "probe_examples", "msg": f"expected > 0 for {' and '.join(needs)} (they follow the probe), got 0"},
            )
        if self.select == "best" and not self.keep_best:
            raise PydanticCustomError(
                "harden_nested", "{msg}", {"path": "keep_best", "msg": "expected true for select: best, got false"}
            )
        return self


class VerifySpec(Strict):
    """The attack suite and sanity checks run by ``harden verify`` / ``harden run``.

    Attributes:
        preset: ``standard`` (AutoAttack's standard suite: APGD-CE with 100 steps, APGD-T
            with a 10-step screen of its 9 targets and a 100-step run on each example's most
            promising one, FAB-T with 10 steps per target, Square with 5,000 queries),
            ``reference`` (the same attacks with AutoAttack's exact settings: 100 steps for every
            target) or ``quick`` (APGD-CE and APGD-T with 20 steps and 3 targets); its attacks run
            before ``attacks``. None: only ``attacks``.
        attacks: further attacks. The cascade runs white-box attacks first, then black-box
            ones, each only on the examples still robust; attacks outside the l_p threat model
            (``iwd``, ``invariance``) run on every clean-correct example and are reported apart.
            Default (no preset): FGSM then PGD-40.
        n_examples: test examples to attack: a seeded class-balanced sample of the test split
            (``sample: first``: the first N).
        eps_sweep: radii for the robust-accuracy-against-eps curve on the check subset; None:
            0.25, 0.5, 1, 1.5 and 2 times ``threat.eps``; empty: no curve. At ``threat.eps`` the
            point is the suite's own worst case; the other radii run PGD with ``sweep_steps``
            steps, each continuing a neighbouring radius (see ``harden.verify``).
        checks: run the gradient-masking / evaluation sanity checks.
        check_examples: test examples used by the checks and the eps sweep.
        check_steps: PGD steps of the checks' own runs (``more_iterations_never_help``: the
            suite's outcome continued by this many steps, then one run from a random start).
        sweep_steps: PGD steps of each radius of the eps sweep and of the large-radius checks
            that continue it (``large_eps_to_chance``, ``unbounded_attack_succeeds``).
        sample: how ``n_examples`` and ``check_examples`` are drawn from the test split:
            ``balanced`` (a class-balanced sample seeded by ``seed``, in test-split order) or
            ``first`` (the first N; on class-sorted data that covers few classes).
    """

    preset: Literal["standard", "reference", "quick"] | None = None
    attacks: tuple[AttackSpec, ...] = Field(
        default_factory=lambda: ({"name": "fgsm"}, {"name": "pgd", "params": {"steps": 40}}),
        validate_default=True,  # with the validation context: the defaults are checked like written ones
        strict=False,  # a list is fine (YAML has no tuples); its items stay strict
    )
    n_examples: int = Field(1000, ge=1)
    eps_sweep: tuple[float, ...] | None = Field(None, strict=False)
    checks: bool = True
    check_examples: int = Field(200, ge=8)
    check_steps: int = Field(20, ge=1, le=10_000)
    sweep_steps: int = Field(10, ge=1, le=10_000)
    sample: Literal["balanced", "first"] = "balanced"

    @model_serializer(mode="wrap")
    def _dump(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        if out.get("sweep_steps") == type(self).model_fields["sweep_steps"].default:  # as before it existed
            del out["sweep_steps"]
        return out

    @model_validator(mode="after")
    def _some_attack(self) -> VerifySpec:
        if self.preset is not None and "attacks" not in self.model_fields_set:
            object.__setattr__(self, "attacks", ())  # a preset replaces the default pair
        if self.preset is None and not self.attacks:
            raise PydanticCustomError(
                "harden_nested",
                "{msg}",
                {"path": "attacks", "msg": "expected a preset or at least one attack, got neither"},
            )
        if self.eps_sweep is not None and any(e <= 0 for e in self.eps_sweep):
            raise PydanticCustomError(
                "harden_nested",
                "{msg}",
                {"path": "eps_sweep", "msg": f"expected radii > 0, got {list(self.eps_sweep)}"},
            )
        return self


class Policy(Strict):
    """A complete hardening job.

    Attributes:
        name: a label for runs and reports, and the folder ``runs/<name>``: one safe folder name
            (letters, digits, ``_``, ``-`` and ``.``, starting with a letter, digit or ``_``).
        seed: seeds data order, initialisation and attacks.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when available). Nothing moves
            to a GPU unless the policy says so.
        model: see :class:`ModelSpec`.
        data: see :class:`DataSpec`.
        threat: see :class:`ThreatModel`.
        train: see :class:`TrainSpec`.
        objectives: the loss is the weighted sum of these terms.
        verify: see :class:`VerifySpec`.
        export: see :class:`ExportSpec`.
        certify: see :class:`CertifySpec`.

    Example:
        >>> from harden.policy_io import validate_policy
        >>> p = validate_policy({"objectives": [{"name": "pgd_at"}]})
        >>> p.threat.eps, p.objectives[0].params["steps"], p.checked
        (0.3, 7, True)
        >>> Policy(objectives=[ObjectiveSpec(name="pgd_at")]).checked  # structure only
        False
    """

    name: str = Field("harden", min_length=1, max_length=100)
    seed: int = Field(0, ge=0, lt=2**32)
    device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:\d+)?|mps)$")
    model: ModelSpec = Field(default_factory=dict, validate_default=True)
    data: DataSpec = Field(default_factory=dict, validate_default=True)
    threat: ThreatModel = Field(default_factory=dict, validate_default=True)
    train: TrainSpec = Field(default_factory=dict, validate_default=True)
    objectives: tuple[ObjectiveSpec, ...] = Field(min_length=1, strict=False)
    verify: VerifySpec = Field(default_factory=dict, validate_default=True)
    export: ExportSpec = Field(default_factory=dict, validate_default=True)
    certify: CertifySpec = Field(default_factory=dict, validate_default=True)
    _checked: bool = PrivateAttr(default=False)

    @property
    def checked(self) -> bool:
        """Whether every name and param was checked against the registries (a complete :class:`Catalog`).

        A copy with changes (``model_copy(update=...)``) is unchecked again.
        """
        specs = (*self.objectives, *self.verify.attacks)
        return self._checked and all(s.checked_params is not None for s in specs)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy; with ``update``, unchecked (``harden.policy_io.checked`` checks it again)."""
        copied = super().model_copy(update=update, deep=deep)
        if update:
            copied._checked = False
        return copied

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, name: str) -> str:
        if not _NAME.fullmatch(name) or _DEVICE_NAMES.fullmatch(name):
            raise ValueError(
                f"expected one safe folder name (runs/<name>: letters, digits, '_', '-' and '.', starting with a "
                f"letter, digit or '_', not ending with '.', no device name such as 'con'), got {name!r}; "
                "rename the policy, e.g. name: my-policy"
            )
        return name

    @model_validator(mode="after")
    def _some_weight(self, info: ValidationInfo) -> Policy:
        if all(o.weight == 0 for o in self.objectives):
            raise PydanticCustomError(
                "harden_nested",
                "{msg}",
                {"path": "objectives", "msg": "expected at least one objective with weight > 0, got all zero"},
            )
        if all(o.every > 1 for o in self.objectives if o.weight > 0):
            raise PydanticCustomError(
                "harden_nested",
                "{msg}",
                {
                    "path": "objectives",
                    "msg": "expected at least one objective computed on every step (every: 1), got every > 1 on all: "
                    "a step with no term has no loss to train on",
                },
            )
        self._warn_silent_settings()
        self._checked = catalog_of(info).complete
        return self

    def _warn_silent_settings(self) -> None:
        """Warn about settings that silently measure nothing.

        An eps below half a pixel level (a unit mistake), ``iwd_at`` training at another patch
        geometry than the ``iwd`` attack evaluates at, a lazy first objective under
        ``bn_stats: first_forward``, and ``mi`` switching its terms on after the last epoch.
        """
        if self.threat.below_half_level:
            warnings.warn(
                f"threat.eps {self.threat.eps:g} is below half a pixel level (0.5/255 ~ {HALF_LEVEL:.5f}): robustness "
                "at this eps says nothing about 8-bit images; did you mean eps * 255?",
                UserWarning,
                stacklevel=2,
            )

        def geometry(params: dict[str, Any]) -> tuple[int, int]:
            # None: the defaults of images up to 32 px (stride 1, 3x3 patches; k >= stride above)
            stride = params.get("stride") or 1
            return params.get("patch_size") or max(3, stride), stride

        train = {geometry(o.params) for o in self.objectives if o.name == "iwd_at"}
        evaluate = {geometry(a.params) for a in self.verify.attacks if a.name == "iwd"}
        if train and evaluate and train != evaluate:
            warnings.warn(
                f"iwd_at trains at (patch_size, stride) {sorted(train)} but the iwd attack evaluates at "
                f"{sorted(evaluate)}: threat.rho means something for one geometry only; give both the same "
                "and calibrate rho for it (harden.attacks.iwd.calibrate_rho)",
                UserWarning,
                stacklevel=2,
            )
        first = next(o for o in self.objectives if o.weight > 0)
        if first.every > 1 and self.train.bn_stats == "first_forward":
            warnings.warn(
                f"the first objective ({first.name}) has every: {first.every}: with train.bn_stats first_forward, "
                "BatchNorm's running statistics then come from another objective's view on the steps it skips; "
                "put an objective computed on every step first",
                UserWarning,
                stacklevel=2,
            )
        late = [o.params.get("start_epoch", 0) for o in self.objectives if o.name == "mi"]
        if any(start >= self.train.epochs for start in late):
            warnings.warn(
                f"mi's start_epoch {max(late)} is not below train.epochs {self.train.epochs}: its MI terms never "
                "switch on (the objective is its CE term alone); lower start_epoch",
                UserWarning,
                stacklevel=2,
            )
