"""``harden.probe``: the per-epoch probe (clean accuracy and PGD accuracy) training reads.

Clean accuracy is measured on all of the validation data; PGD attacks a seeded class-balanced
sample of ``probe_examples`` of it (:func:`probe_indices`, the same sample every epoch), not the
first examples, which on class-sorted data (an ``imagefolder``) cover a few classes.

A PGD accuracy that jumps up while clean accuracy holds marks catastrophic overfitting or
gradient masking; :mod:`harden.checks` reads the probe's history for that. The probe sits below
:mod:`harden.train` and :mod:`harden.verify`, so training never imports verification.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from harden.attacks.base import restore_modes, save_modes
from harden.attacks.pgd import PGD
from harden.batches import predictions
from harden.data import EvalData, eval_batches, to_device
from harden.policy import ThreatModel
from harden.sampling import balanced_indices
from harden.splits import split_labels

__all__ = ["accuracy", "clean_and_pgd_accuracy", "clean_and_pgd_counts", "probe_indices"]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example correctness (bool) of ``model`` on ``(x, y)``; non-finite logits are wrong."""
    return predictions(model(x)) == y


def probe_indices(data: EvalData, n: int, seed: int) -> torch.Tensor | None:
    """The positions (in ``data``'s order) of the examples the probe attacks: a seeded class-balanced sample.

    :func:`harden.sampling.balanced_indices` of ``data``'s labels (sorted; every position when
    ``n`` covers the data). None where the order is not fixed or the labels cannot be listed up
    front (a DataLoader that shuffles or has its own sampler, an ``IterableDataset``): the probe
    then attacks the first ``n`` examples. ``n`` = 0: an empty sample.

    Raises:
        DataError: the labels cannot be read (not ``(image, label)`` pairs).

    Example:
        >>> labels = torch.tensor([0] * 4 + [1] * 4)   # class-sorted
        >>> idx = probe_indices((torch.zeros(8, 1, 2, 2), labels), 4, seed=0)
        >>> labels[idx].tolist()
        [0, 0, 1, 1]
    """
    if n <= 0:
        return torch.zeros(0, dtype=torch.int64)
    if isinstance(data, tuple):
        labels = data[1]
    else:
        if isinstance(data, DataLoader):
            if not isinstance(data.sampler, SequentialSampler):
                return None
            data = data.dataset
        if isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
            return None
        labels = split_labels(data, "validation", "the validation data")
    return balanced_indices(labels.reshape(-1).long().cpu(), n, seed)


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
    probe: torch.Tensor | None = None,
) -> dict[str, float]:
    """Clean accuracy on all of ``data`` and PGD accuracy on the positions ``probe`` (None: its first ``probe_examples``).

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
        probe=probe,
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
    probe: torch.Tensor | None = None,
) -> tuple[int, int, int, int]:
    """The counts behind :func:`clean_and_pgd_accuracy`: ``(right, total, pgd_right, pgd_total)``.

    Counts add up over shards of the data (distributed training sums them over ranks). PGD
    attacks the examples at the sorted positions ``probe`` (:func:`probe_indices`); None: the
    first ``probe_examples``.

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
                if probe is None:
                    pick: torch.Tensor | slice = slice(0, max(0, probe_examples - adv_total))
                else:  # the sample's positions inside this batch
                    lo, hi = torch.searchsorted(probe, torch.tensor([total, total + x.shape[0]])).tolist()
                    pick = (probe[lo:hi] - total).to(x.device)
                right += int(ok.sum())
                total += x.shape[0]
                xs, ys = x[pick], y[pick]
                if xs.shape[0]:
                    adv_right += int(accuracy(model, pgd(model, xs, ys), ys).sum())
                    adv_total += xs.shape[0]
    finally:
        restore_modes(model, modes)
    return right, total, adv_right, adv_total
