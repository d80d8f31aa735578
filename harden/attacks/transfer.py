"""Transfer: PGD on a surrogate model, applied to the target (no access to its gradients)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from harden.attacks.base import ATTACKS, Attack, AttackEnv, AttackParams
from harden.coderef import CodeRef
from harden.errors import DataError

__all__ = ["Transfer", "TransferParams"]


class TransferParams(AttackParams):
    """Parameters of :class:`Transfer`.

    Attributes:
        model: the surrogate's architecture (``timm:<name>`` or ``module:attr``: code, loaded from
            a policy file only where the user allows it); None: the policy's own model.
        weights: a local ``model.safetensors`` for the surrogate; None: harden trains one with
            plain cross-entropy (``ce``) on the policy's training data (``harden.surrogate``).
        epochs: epochs of that ``ce`` training.
        steps: PGD steps on the surrogate.
        restarts: PGD restarts on the surrogate.
    """

    model: CodeRef | None = None
    weights: str | None = None
    epochs: int = Field(3, ge=1, le=1000)
    steps: int = Field(20, ge=1, le=10_000)
    restarts: int = Field(1, ge=1, le=100)


@ATTACKS.register("transfer")
class Transfer(Attack):
    """PGD examples crafted on a surrogate (a plainly trained model by default).

    A black-box check as much as an attack: if transfer examples beat white-box attacks on the
    target, the target's gradients are not telling the truth.

    Example:
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import TinyCNN
        >>> atk = Transfer(ThreatModel(eps=0.1), {"steps": 3})
        >>> atk.surrogate = TinyCNN(num_classes=3)  # harden.verify builds it from the policy
        >>> x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 2])
        >>> atk(TinyCNN(num_classes=3), x, y).shape
        torch.Size([2, 1, 8, 8])
    """

    name = "transfer"
    Params = TransferParams
    example_params: ClassVar[dict[str, Any]] = {"epochs": 1, "steps": 2}
    white_box = False
    uses_training_split = True

    surrogate: nn.Module | None = None

    def prepare(self, env: AttackEnv) -> None:
        """Check the surrogate is there (it is used on its own device and in its own mode).

        Attacks never train: :func:`harden.verify` builds the surrogate (:mod:`harden.surrogate`,
        from the run's data) and sets :attr:`surrogate` before this runs.

        Raises:
            DataError: no surrogate was given.
        """
        if self.surrogate is None:
            raise DataError(
                "expected a surrogate model for the transfer attack, got none; verify through harden.verify or "
                "harden.run (they build it), or set attack.surrogate = a trained model"
            )

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD on the surrogate; the target model is only evaluated by the suite."""
        from harden.attacks.pgd import PGD

        if self.surrogate is None:
            raise DataError("expected a surrogate model for the transfer attack, got none; call prepare() first")
        p: TransferParams = self.params
        pgd = PGD(self.threat, {"steps": p.steps, "restarts": p.restarts, "select": "last"})
        return pgd(self.surrogate, x, y)
