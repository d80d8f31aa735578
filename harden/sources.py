"""What to harden: the ``model`` and ``data`` sections of a policy.

Each names a registered entry (a dataset, a ``timm:`` model, checked against the validation
context, :class:`harden.catalog.Catalog`) or code (``package.module:attr``): both fields are
:data:`harden.coderef.CodeRef`, so a policy file naming code loads only where the user allows it
(:mod:`harden.trust`). Nothing here imports what a section names. Both classes are importable
from :mod:`harden.policy` too.
"""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from harden.catalog import catalog_of
from harden.coderef import CodeRef, is_code
from harden.errors import UnknownNameError, format_key_path
from harden.schema import Strict

__all__ = ["TIMM_FILE_ARGS", "DataSpec", "ModelSpec"]

#: ``timm.create_model`` arguments that read or download weights or configs (any ``pretrained*`` too)
TIMM_FILE_ARGS = frozenset({"checkpoint_path", "cache_dir", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay"})


class ModelSpec(Strict):
    """Which model to harden.

    Attributes:
        name: ``timm:<name>`` (e.g. ``timm:resnet10t``) or ``module:attr`` (a class, factory or
            ``nn.Module`` instance). Ignored when ``harden.fit`` is given an ``nn.Module``. A policy
            file naming code loads only where the user allows it (``--allow-code PACKAGE``).
        num_classes: output classes; defaults to the data's.
        in_chans: input channels; defaults to the data's.
        pretrained_file: local ``.safetensors`` (or weights-only ``.pth``) file with weights to
            start from; never downloaded.
        mean: per-channel mean folded into the model (``Normalized``); None: no normalization.
            Never taken silently from elsewhere: with ``pretrained_file`` and no ``mean``/``std``,
            a timm model's pretrained config is named in a warning, not applied.
        std: per-channel std, as ``mean``.
        output: how to read the logits from what the model returns: None (a tensor), a string
            (that key of a returned dict, or that attribute of a returned object, e.g.
            ``logits``) or an integer (that item of a returned tuple or list).
        args: extra keyword arguments for ``timm.create_model`` or the ``module:attr`` factory.
            For ``timm:`` models, none that makes timm read or download weights or configs
            (``pretrained``, ``pretrained_cfg``, ``checkpoint_path``, ``cache_dir``, ...): use
            ``pretrained_file``.
    """

    name: CodeRef = "timm:resnet10t"
    num_classes: int | None = Field(None, ge=2)
    in_chans: int | None = Field(None, ge=1)
    pretrained_file: str | None = None
    mean: tuple[float, ...] | None = Field(None, strict=False)
    std: tuple[float, ...] | None = Field(None, strict=False)
    output: int | str | None = None
    args: dict[str, int | float | bool | str | None] = Field(default_factory=dict)

    @field_validator("output")
    @classmethod
    def _output_key(cls, output: int | str | None) -> int | str | None:
        if isinstance(output, int) and output < 0:
            raise ValueError(f"expected an item index >= 0 or a key/attribute name, got {output}")
        if isinstance(output, str) and not output.isidentifier():
            raise ValueError(f"expected a key/attribute name (letters, digits, _), got {output!r}")
        return output

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str, info: ValidationInfo) -> str:
        if name.startswith("timm:"):
            check = catalog_of(info).check_model
            try:
                if check is not None:
                    check(name[5:])
            except UnknownNameError as exc:
                raise ValueError(str(exc)) from None
        elif not is_code(name):  # the format of code is checked by CodeRef
            raise ValueError(f"expected 'timm:<model name>' or 'package.module:attr', got {name!r}")
        return name

    @model_validator(mode="after")
    def _no_timm_files(self) -> ModelSpec:
        if not self.name.startswith("timm:"):
            return self
        for key in self.args:
            if key in TIMM_FILE_ARGS or key.startswith("pretrained"):
                raise PydanticCustomError(
                    "harden_nested",
                    "{msg}",
                    {
                        "path": format_key_path(["args", key]),
                        "msg": f"expected no timm argument that reads or downloads weights or configs, got {key!r}; "
                        "to start from weights, set model.pretrained_file to a local .safetensors file",
                    },
                )
        return self

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if std is not None and any(s <= 0 for s in std):
            raise ValueError(f"expected every std > 0, got {list(std)}")
        return std

    @model_validator(mode="after")
    def _mean_std_together(self) -> ModelSpec:
        if (self.mean is None) != (self.std is None):
            raise ValueError("expected both mean and std, or neither")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ValueError(f"expected mean and std of equal length, got {len(self.mean)} and {len(self.std)}")
        return self


class DataSpec(Strict):
    """Where the data comes from.

    Attributes:
        name: a registered dataset (``digits``, ``mnist-5k``, ``cifar10``, ``imagefolder``,
            ``synthetic``) or ``module:function`` returning ``(train_dataset, test_dataset)`` (code:
            a policy file naming it loads only where the user allows it, ``--allow-code PACKAGE``).
        root: local directory for ``cifar10`` / ``imagefolder`` (never downloaded).
        batch_size: training batch size.
        eval_batch_size: batch size for evaluation and attacks.
        train_limit: use only N training examples: a class-balanced sample drawn with the
            fixed seed 0 of the bundled splits (a seeded uniform sample where the labels are not
            known without loading the images), so every policy seed sees the same examples.
        test_limit: use only N test examples, drawn as ``train_limit``.
        image_size: resize ``imagefolder`` images to this square size. None: the images' own
            size when they all share one (else an error asking for it).
        augment: random crop (4-pixel padding, or 1/8 of the side) and horizontal flip of the
            training images. None: on for ``cifar10`` and ``imagefolder``, off for the others
            (digits must not be mirrored).
        num_workers: DataLoader worker processes.
    """

    name: CodeRef = "mnist-5k"
    root: str | None = None
    batch_size: int = Field(128, ge=1)
    eval_batch_size: int = Field(256, ge=1)
    train_limit: int | None = Field(None, ge=1)
    test_limit: int | None = Field(None, ge=1)
    image_size: int | None = Field(None, ge=4)
    augment: bool | None = None
    num_workers: int = Field(0, ge=0)

    @field_validator("name")
    @classmethod
    def _known_data(cls, name: str, info: ValidationInfo) -> str:
        if is_code(name):  # its format is checked by CodeRef
            return name
        datasets = catalog_of(info).datasets
        try:
            if datasets is not None:
                datasets.get(name)
        except UnknownNameError as exc:
            raise ValueError(str(exc)) from None
        return name
