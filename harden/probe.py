"""``harden.probe``: the per-epoch probe (clean accuracy and PGD accuracy) training reads.

A PGD accuracy that jumps up while clean accuracy holds marks catastrophic overfitting or
gradient masking; :mod:`harden.checks` reads the probe's history for that. The probe sits below
:mod:`harden.train` and :mod:`harden.verify`, so training never imports verification.
"""

from __future__ import annotations

import torch
from torch import nn

from harden.attacks.base import restore_modes, save_modes
from harden.attacks.pgd import PGD
from harden.batches import predictions
from harden.data import EvalData, eval_batches, to_device
from harden.policy import ThreatModel

__all__ = ["accuracy", "clean_and_pgd_accuracy", "clean_and_pgd_counts"]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example correctness (bool) of ``model`` on ``(x, y)``; non-finite logits are wrong."""
    return predictions(model(x)) == y


def clean_and_pgd_accuracy(
    model: nn.Module,
    data: EvalData,
    threat: ThreatModel,
    device: torch.device,
    *,
    batch_size: int,
    probe_examples: int,
    probe_steps: int,
    seed: int,
) -> dict[str, float]:
    """Clean accuracy on all of ``data`` and PGD accuracy on its first ``probe_examples``.

    Used after every training epoch; a PGD accuracy that jumps up while clean accuracy holds is
    the mark of catastrophic overfitting / gradient masking. The model's modes are restored.
    """
    right, total, adv_right, adv_total = clean_and_pgd_counts(
        model,
        data,
        threat,
        device,
        batch_size=batch_size,
        probe_examples=probe_examples,
        probe_steps=probe_steps,
        seed=seed,
    )
    out = {"val_clean_acc": right / max(total, 1)}
    if adv_total:
        out["val_pgd_acc"] = adv_right / adv_total
    return out


def clean_and_pgd_counts(
    model: nn.Module,
    data: EvalData,
    threat: ThreatModel,
    device: torch.device,
    *,
    batch_size: int,
    probe_examples: int,
    probe_steps: int,
    seed: int,
) -> tuple[int, int, int, int]:
    """The counts behind :func:`clean_and_pgd_accuracy`: ``(right, total, pgd_right, pgd_total)``.

    Counts add up over shards of the data (distributed training sums them over ranks).

    Example:
        >>> from harden.testing import TinyMLP
        >>> data = (torch.rand(6, 1, 8, 8), torch.arange(6) % 2)
        >>> counts = clean_and_pgd_counts(TinyMLP(num_classes=2), data, ThreatModel(eps=0.1), torch.device("cpu"),
        ...                               batch_size=4, probe_examples=3, probe_steps=2, seed=0)
        >>> counts[1], counts[3]
        (6, 3)
    """
    modes = save_modes(model)
    model.eval()
    pgd = PGD(threat, {"steps": probe_steps})
    right = total = adv_right = adv_total = 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for xb, yb in eval_batches(data, batch_size):
                x, y = to_device(xb, yb, device)
                ok = accuracy(model, x, y)
                right += int(ok.sum())
                total += x.shape[0]
                room = probe_examples - adv_total
                if room > 0:
                    xs, ys = x[:room], y[:room]
                    adv_right += int(accuracy(model, pgd(model, xs, ys), ys).sum())
                    adv_total += xs.shape[0]
    finally:
        restore_modes(model, modes)
    return right, total, adv_right, adv_total
