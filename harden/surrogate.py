"""``harden.surrogate``: the transfer attack's surrogate model, trained or loaded before attacks run.

Attacks never call :func:`harden.fit`: the verification layer builds the surrogate here, from the
same data bundle the run already loaded, and hands it to each :class:`~harden.attacks.transfer.Transfer`
attack (its ``surrogate`` attribute) before the attack prepares.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from harden.attacks.base import Attack
from harden.attacks.transfer import Transfer, TransferParams
from harden.data import DataBundle
from harden.model_load import build_model
from harden.policy import Policy
from harden.policy_io import validate_policy
from harden.train import fit, load_trained

__all__ = ["attach_surrogates", "build_surrogate", "needs_surrogate", "surrogate_policy"]

log = logging.getLogger("harden")


def surrogate_policy(policy: Policy, params: TransferParams) -> Policy:
    """The policy a surrogate is trained under: ``policy`` with plain ``ce``, ``params.epochs`` epochs.

    The architecture is ``params.model`` (with the policy's mean/std) or the policy's own model;
    the per-epoch PGD probe is off and one checkpoint is kept.

    Example:
        >>> from harden.testing import tiny_policy
        >>> p = surrogate_policy(tiny_policy(), TransferParams(epochs=2))
        >>> p.name, [o.name for o in p.objectives], p.train.epochs
        ('tiny-surrogate', ['ce'], 2)
    """
    doc = policy.model_dump(mode="json")
    if params.model is not None:
        doc["model"] = {"name": params.model, "mean": doc["model"]["mean"], "std": doc["model"]["std"]}
    doc["objectives"] = [{"name": "ce"}]
    doc["train"] = {**doc["train"], "epochs": params.epochs, "probe_examples": 0, "keep_checkpoints": 1}
    doc["name"] = f"{doc['name']}-surrogate"
    return validate_policy(doc, source="transfer surrogate")


def needs_surrogate(attack: Attack) -> bool:
    """Whether ``attack`` is a transfer attack still without its surrogate.

    Example:
        >>> from harden.policy import ThreatModel
        >>> needs_surrogate(Transfer(ThreatModel(eps=0.1)))
        True
    """
    return isinstance(attack, Transfer) and attack.surrogate is None


def build_surrogate(params: TransferParams, policy: Policy, bundle: DataBundle, device: torch.device) -> nn.Module:
    """Load (``params.weights``) or train (``params.epochs`` of ``ce`` on ``bundle.train``) a surrogate.

    Training is seeded with ``policy.seed + 1`` (another initialisation than the target's) inside
    a forked RNG, so the caller's random stream is untouched. The result is in eval mode on
    ``device``.

    Args:
        params: the transfer attack's parameters.
        policy: the verified policy (model spec, seed, device, training settings).
        bundle: the run's data: its train split trains the surrogate.
        device: where the verified model lives.

    Example:
        >>> from harden.data import synthetic_bundle
        >>> from harden.testing import tiny_policy
        >>> net = build_surrogate(TransferParams(epochs=1), tiny_policy(), synthetic_bundle(), torch.device("cpu"))
        >>> net.training
        False
    """
    spolicy = surrogate_policy(policy, params)
    if params.weights is not None:
        net, _ = load_trained(spolicy, Path(params.weights), bundle=bundle)
    else:
        log.info("transfer: training a %d-epoch ce surrogate", params.epochs)
        with tempfile.TemporaryDirectory(prefix="harden-surrogate-") as tmp, torch.random.fork_rng(devices=[]):
            torch.manual_seed(policy.seed + 1)  # a different init from the target's
            net = build_model(spolicy.model, bundle.num_classes, bundle.in_chans)
            net = fit(net, spolicy, train=bundle.train, run_dir=tmp, progress=False).model
    return net.to(device).eval()


def attach_surrogates(attacks: Sequence[Attack], policy: Policy, bundle: DataBundle, device: torch.device) -> None:
    """Give every transfer attack of ``attacks`` without a surrogate the one its params describe.

    Attacks with equal parameters share one surrogate (trained once).

    Example:
        >>> from harden.data import synthetic_bundle
        >>> from harden.policy import ThreatModel
        >>> from harden.testing import tiny_policy
        >>> a, b = Transfer(ThreatModel(eps=0.1), {"epochs": 1}), Transfer(ThreatModel(eps=0.1), {"epochs": 1})
        >>> attach_surrogates([a, b], tiny_policy(), synthetic_bundle(), torch.device("cpu"))
        >>> a.surrogate is b.surrogate is not None
        True
    """
    built: dict[str, nn.Module] = {}
    for attack in attacks:
        if not isinstance(attack, Transfer) or attack.surrogate is not None:
            continue
        key = attack.params.model_dump_json()
        if key not in built:
            built[key] = build_surrogate(attack.params, policy, bundle, device)
        attack.surrogate = built[key]
