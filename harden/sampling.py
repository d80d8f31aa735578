"""Seeded class-balanced samples: which examples a limit keeps (``n_examples``, ``test_limit``, ...).

Taking the first N examples of a class-sorted split (an ``imagefolder`` lists class by class)
measures a few classes and calls it the model's accuracy. :func:`balanced_indices` takes as
equal a share of every class as the class sizes allow, chosen by a seeded generator, and
returns the indices in split order, so the same seed and labels always give the same sample.
"""

from __future__ import annotations

import torch

from harden.errors import DataError

__all__ = ["balanced_indices"]


def _shares(sizes: list[int], n: int, gen: torch.Generator) -> list[int]:
    """How many examples each class gives: equal shares, capped by the class sizes.

    What a class cannot give is shared out among the larger classes; the last few examples
    (when ``n`` does not split evenly) go to classes drawn at random.
    """
    shares = [0] * len(sizes)
    left = n
    while left > 0:
        open_ = [c for c, s in enumerate(sizes) if shares[c] < s]
        each, extra = divmod(left, len(open_))
        if each == 0:  # fewer examples left than open classes: a seeded draw of which classes get one
            order = torch.randperm(len(open_), generator=gen).tolist()
            for k in order[:extra]:
                shares[open_[k]] += 1
            break
        for c in open_:
            take = min(each, sizes[c] - shares[c])
            shares[c] += take
            left -= take
    return shares


def balanced_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of a seeded class-balanced sample of ``n`` examples, in ascending order.

    Each class gives ``n // k`` examples (``k`` classes present) chosen at random; a class with
    fewer gives all it has and the rest is shared among the others; the remainder goes to
    randomly drawn classes. With ``n`` at least the number of examples, every index is returned.

    Args:
        labels: integer class labels, one per example (1-D).
        n: how many examples to keep (>= 1).
        seed: the seed of the draw (the policy's ``seed``).

    Returns:
        A 1-D ``int64`` tensor of ``min(n, len(labels))`` distinct indices, sorted.

    Raises:
        DataError: ``labels`` is not 1-D integers or ``n`` < 1.

    Example:
        >>> labels = torch.tensor([0] * 6 + [1] * 6 + [2] * 6)   # class-sorted
        >>> idx = balanced_indices(labels, 6, seed=0)
        >>> torch.bincount(labels[idx]).tolist()
        [2, 2, 2]
        >>> torch.equal(idx, balanced_indices(labels, 6, seed=0))
        True
    """
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DataError(f"expected 1-D integer labels, got {labels.dim()}-D {labels.dtype}")
    if n < 1:
        raise DataError(f"expected a sample of at least 1 example, got {n}")
    total = labels.numel()
    if n >= total:
        return torch.arange(total, dtype=torch.int64)
    gen = torch.Generator().manual_seed(int(seed))
    classes = torch.unique(labels)  # sorted
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    shares = _shares([m.numel() for m in members], n, gen)
    picked = [m[torch.randperm(m.numel(), generator=gen)[:k]] for m, k in zip(members, shares, strict=True) if k]
    return torch.sort(torch.cat(picked)).values.to(torch.int64)
