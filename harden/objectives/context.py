"""The per-batch context objectives share: adversarial views, cached logits and embeddings.

A :class:`BatchContext` computes each :class:`View` once per batch and caches the model's
logits on it, so ``pgd_at + trades + ...`` never attacks or forwards twice. The attack behind
each view is built once per training run (see :class:`harden.objectives.ObjectiveSet`) and
handed to every batch's context, so its parameters are not validated again on every batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from harden.errors import ModelError, PolicyError
from harden.objectives.embedding import EmbeddingTap
from harden.policy import AttackSpec, ThreatModel

if TYPE_CHECKING:
    from harden.attacks.base import Attack

__all__ = [
    "ATTACK_PRECISIONS",
    "BN_STATS",
    "BatchContext",
    "Batches",
    "View",
    "build_view_attack",
    "frozen_bn_statistics",
    "pgd_view",
]


#: a fresh pass over an epoch's training batches ``(x, y)`` on the model's device (see ``begin_epoch``)
Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class View:
    """A perturbed view of the batch: an attack (by registry name) with its parameters.

    Two objectives asking for equal views share one computation.

    Example:
        >>> View.of("pgd", {"steps": 7}) == View.of("pgd", {"steps": 7})
        True
    """

    attack: str
    params: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, attack: str, params: Mapping[str, Any] | None = None) -> View:
        """Build a hashable view from an attack name and a parameter mapping."""
        return cls(attack, tuple(sorted((params or {}).items())))


def pgd_view(steps: int, step_size: float | None = None, random_start: bool = True) -> View:
    """The PGD view of adversarial training (last iterate), shared by every objective asking it.

    ``pgd_at``, ``mi`` and ``ot_metric`` with equal ``steps`` (and step size) read the same view,
    so the PGD examples are computed once per batch.

    Example:
        >>> pgd_view(5) == pgd_view(5), pgd_view(5) == pgd_view(7)
        (True, False)
    """
    return View.of("pgd", {"steps": steps, "step_size": step_size, "random_start": random_start, "select": "last"})


def build_view_attack(view: View, threat: ThreatModel) -> Attack:
    """The attack that computes ``view`` under ``threat`` (its parameters validated here, once).

    Example:
        >>> build_view_attack(pgd_view(3), ThreatModel(eps=0.1)).params.steps
        3
    """
    from harden.attacks.suite import build_attack

    return build_attack(AttackSpec(name=view.attack, params=dict(view.params)), threat)


BN_STATS = ("first_forward", "every_forward")
ATTACK_PRECISIONS = ("fp32", "same")


@contextmanager
def frozen_bn_statistics(model: nn.Module) -> Iterator[None]:
    """Train-mode forwards inside leave every BatchNorm's running statistics untouched.

    Normalization still uses the batch's own statistics (train mode); only the running mean,
    variance and batch counter that eval mode will use are restored afterwards.

    Example:
        >>> bn = nn.BatchNorm1d(2).train()
        >>> with frozen_bn_statistics(bn):
        ...     _ = bn(torch.randn(8, 2) + 5)
        >>> bn.running_mean.tolist()
        [0.0, 0.0]
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    # momentum 0 makes the in-place update a no-op (running = 1 * running + 0 * batch) without
    # touching tensors autograd may have saved; the batch counter is restored afterwards.
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in bns]  # type: ignore[union-attr]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (momentum, count) in zip(bns, saved, strict=True):
                m.momentum = momentum
                m.num_batches_tracked.copy_(count)  # type: ignore[union-attr]


class BatchContext:
    """Everything objectives share for one batch: inputs, views, cached logits and embeddings.

    Args:
        model: the model being trained (in train mode).
        x: clean pixels in [0, 1].
        y: labels.
        threat: the policy's threat model.
        tap: where embeddings are read (set when an objective needs them).
        clean_input_grad: make the clean input a leaf that requires grad, so objectives can
            differentiate the clean logits w.r.t. the input (double backprop).
        bn_stats: ``first_forward`` (default): only the batch's first training-mode forward
            (the first objective's input) updates BatchNorm running statistics; the other
            views (clean, IWD, invariance, noisy ...) are normalised with their own batch
            statistics but do not move the statistics eval mode uses. ``every_forward``: every
            forward updates them (the running statistics then describe a mixture of views).
        forward_model: what the training forwards (:meth:`forward`) call, when not ``model``
            itself: its ``DistributedDataParallel`` or ``torch.compile`` wrapper. Attacks
            always run on ``model``, the plain module.
        autocast_dtype: run the training forwards under ``torch.autocast`` to this dtype
            (``bfloat16`` / ``float16``); the logits and embeddings they return are float32.
        attack_precision: ``fp32`` (default): views are computed with autocast disabled;
            ``same``: under the training forwards' autocast.
        attacks: the attack of each view, built once for the whole run and shared by every
            batch's context (see :meth:`harden.objectives.ObjectiveSet.attacks`); a view
            missing from it is built on first request and added to it. None: a dict of this
            context's own. The attacks must have been built under ``threat``.

    Example:
        >>> from harden.testing import TinyMLP
        >>> x, y, threat = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 1, 0]), ThreatModel(eps=0.1)
        >>> attacks = {}
        >>> ctx = BatchContext(TinyMLP(num_classes=2), x, y, threat, attacks=attacks)
        >>> ctx.logits(pgd_view(2)).shape, list(attacks) == [pgd_view(2)]
        (torch.Size([4, 2]), True)
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        threat: ThreatModel,
        *,
        tap: EmbeddingTap | None = None,
        clean_input_grad: bool = False,
        bn_stats: str = "first_forward",
        forward_model: nn.Module | None = None,
        autocast_dtype: torch.dtype | None = None,
        attack_precision: str = "fp32",
        attacks: MutableMapping[View, Attack] | None = None,
    ) -> None:
        if bn_stats not in BN_STATS:
            raise PolicyError(f"expected bn_stats in {BN_STATS}, got {bn_stats!r}")
        if attack_precision not in ATTACK_PRECISIONS:
            raise PolicyError(f"expected attack_precision in {ATTACK_PRECISIONS}, got {attack_precision!r}")
        self.model = model
        self.forward_model = forward_model if forward_model is not None else model
        self.autocast_dtype = autocast_dtype
        self.attack_precision = attack_precision
        self.bn_stats = bn_stats
        self.x = x.detach().requires_grad_(True) if clean_input_grad else x
        self.y = y
        self.threat = threat
        self.tap = tap
        self.attacks: MutableMapping[View, Attack] = attacks if attacks is not None else {}
        self._views: dict[View, torch.Tensor] = {}
        self._logits: dict[View | None, torch.Tensor] = {}
        self._embeddings: dict[View | None, torch.Tensor] = {}
        self._memo: dict[Any, Any] = {}
        self.view_calls = 0  # attacks actually run (for tests and profiling)
        self.forward_calls = 0  # training-mode forwards (for tests and profiling)

    def view(self, view: View) -> torch.Tensor:
        """The perturbed inputs for ``view``, computed on first request (no grad to params)."""
        if view not in self._views:
            attack = self.attacks.get(view)
            if attack is None:  # a view no objective declared: build it once, for later batches too
                attack = self.attacks[view] = build_view_attack(view, self.threat)
            with self.attack_precision_scope():
                self._views[view] = attack(self.model, self.x.detach(), self.y)
            self.view_calls += 1
        return self._views[view]

    def attack_precision_scope(self) -> AbstractContextManager[None]:
        """Where attacks run: autocast disabled (``fp32``) or the training autocast (``same``).

        Objectives that run an attack themselves (not through :meth:`view`) enter it too.
        """
        from harden.speed import autocast

        dtype = self.autocast_dtype if self.attack_precision == "same" else None
        return autocast(self.x.device, dtype)

    def forward(self, key: Any, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of ``inputs`` under ``key`` (cached; the embedding is kept when tapped)."""
        if key not in self._logits:
            if self.forward_calls and self.bn_stats == "first_forward" and self.model.training:
                with frozen_bn_statistics(self.model):
                    logits = self._run(inputs)
            else:
                logits = self._run(inputs)
            self._logits[key] = logits
            self.forward_calls += 1
            if self.tap is not None:
                emb = self.tap.take()
                self._embeddings[key] = emb.float() if self.autocast_dtype is not None else emb
        return self._logits[key]

    def _run(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.autocast_dtype is None:
            return self.forward_model(inputs)
        with torch.autocast(device_type=inputs.device.type, dtype=self.autocast_dtype):
            out = self.forward_model(inputs)
        return out.float()

    def forward_eval(self, key: Any, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of ``inputs`` with the model in eval mode, with grad, cached under ``key``.

        BatchNorm then normalises with its running statistics (not updated): every example's
        logits depend on that example alone, as per-example input gradients and Jacobians
        assume (in train mode the batch statistics couple the examples). The modes are restored.
        """
        if key not in self._logits:
            saved = {m: m.training for m in self.model.modules()}
            self.model.eval()
            try:
                self._logits[key] = self._run(inputs)
            finally:
                for m, mode in saved.items():
                    m.train(mode)
            self.forward_calls += 1
        return self._logits[key]

    def logits(self, view: View | None = None) -> torch.Tensor:
        """Model logits (with grad) on the clean batch (``None``) or on ``view``, cached."""
        return self.forward(view, self.x if view is None else self.view(view))

    def embedding(self, key: Any = None) -> torch.Tensor:
        """The embedding recorded with the logits of ``key`` (a view, None, or a forward key)."""
        if self.tap is None:
            raise ModelError(
                "expected an embedding tap on the context (the trainer sets one when an objective needs it)"
            )
        if key not in self._embeddings:
            if isinstance(key, View) or key is None:
                self.logits(key)
            else:
                raise ModelError(f"expected a forward under {key!r} before reading its embedding")
        return self._embeddings[key]

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per batch under ``key`` (share any per-batch result)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]
