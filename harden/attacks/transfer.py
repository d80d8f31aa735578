"""Transfer: PGD on a surrogate model, applied to the target (no access to its gradients)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from harden.attacks.base import ATTACKS, Attack, AttackEnv, AttackParams
from harden.errors import DataError

__all__ = ["Transfer", "TransferParams"]

log = logging.getLogger("harden")


class TransferParams(AttackParams):
    """Parameters of :class:`Transfer`.

    Attributes:
        model: the surrogate's architecture (``timm:<name>`` or ``module:attr``); None: the
            policy's own model.
        weights: a local ``model.safetensors`` for the surrogate; None: harden trains one with
            plain cross-entropy (``ce``) on the policy's training data.
        epochs: epochs of that ``ce`` training.
        steps: PGD steps on the surrogate.
        restarts: PGD restarts on the surrogate.
    """

    model: str | None = None
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
        >>> atk.surrogate = TinyCNN(num_classes=3)  # or let prepare() train one
        >>> x, y = torch.rand(2, 1, 8, 8), torch.tensor([0, 2])
        >>> atk(TinyCNN(num_classes=3), x, y).shape
        torch.Size([2, 1, 8, 8])
    """

    name = "transfer"
    Params = TransferParams
    white_box = False

    surrogate: nn.Module | None = None

    def prepare(self, env: AttackEnv) -> None:
        """Load or train the surrogate once, on ``env.device``."""
        if self.surrogate is not None:
            return
        from harden.models import build_model
        from harden.policy import validate_policy
        from harden.train import fit, load_trained

        p: TransferParams = self.params
        doc = env.policy.model_dump(mode="json")
        if p.model is not None:
            doc["model"] = {"name": p.model, "mean": doc["model"]["mean"], "std": doc["model"]["std"]}
        doc["objectives"] = [{"name": "ce"}]
        doc["train"] = {**doc["train"], "epochs": p.epochs, "probe_examples": 0, "keep_checkpoints": 1}
        doc["name"] = f"{doc['name']}-surrogate"
        surrogate_policy = validate_policy(doc, source="transfer surrogate")
        if p.weights is not None:
            net, _ = load_trained(surrogate_policy, Path(p.weights))
        else:
            from harden.data import load_data

            bundle = env.bundle if env.bundle is not None else load_data(env.policy.data)
            log.info("transfer: training a %d-epoch ce surrogate", p.epochs)
            with tempfile.TemporaryDirectory(prefix="harden-surrogate-") as tmp, torch.random.fork_rng(devices=[]):
                torch.manual_seed(env.policy.seed + 1)  # a different init from the target's
                net = build_model(surrogate_policy.model, bundle.num_classes, bundle.in_chans)
                net = fit(net, surrogate_policy, train=bundle.train, run_dir=tmp, progress=False).model
        self.surrogate = net.to(env.device).eval()

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """PGD on the surrogate; the target model is only evaluated by the suite."""
        from harden.attacks.pgd import PGD

        if self.surrogate is None:
            raise DataError("expected a surrogate model for the transfer attack, got none; call prepare() first")
        p: TransferParams = self.params
        pgd = PGD(self.threat, {"steps": p.steps, "restarts": p.restarts, "select": "last"})
        return pgd(self.surrogate, x, y)
