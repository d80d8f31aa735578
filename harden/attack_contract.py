"""``harden.attack_contract``: :func:`check_attack`, the contract every attack keeps (re-exported by :mod:`harden.testing`).

A plugin's own tests call it on its class: ``check_attack(MyAttack)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from harden.attacks.base import Attack, AttackEnv, lp_norm, save_modes
from harden.data import synthetic_bundle, synthetic_tensors
from harden.errors import ThreatModelError
from harden.policy import ThreatModel
from harden.surrogate import attach_surrogates
from harden.tiny import TinyCNN, expect, tiny_policy

__all__ = ["check_attack"]


#: the threat models :func:`check_attack` uses when given none: one per norm
_ATTACK_THREATS: tuple[ThreatModel, ...] = (ThreatModel(norm="linf", eps=0.1), ThreatModel(norm="l2", eps=0.5))

#: inputs that break the threat model, and what the ThreatModelError must say
_VIOLATIONS: tuple[tuple[str, Callable[[torch.Tensor, torch.Tensor], tuple[Any, Any]], str], ...] = (
    ("pixels above 1", lambda x, y: (x + 0.5, y), r"pixels in \[0, 1\]"),
    ("negative pixels", lambda x, y: (x - 0.5, y), r"pixels in \[0, 1\]"),
    (
        "a NaN image",
        lambda x, y: (x.index_fill(0, torch.tensor([2], device=x.device), float("nan")), y),
        r"pixels in \[0, 1\]",
    ),
    ("float64 pixels", lambda x, y: (x.double(), y), "float32"),
    ("float16 pixels", lambda x, y: (x.half(), y), "float32"),
    ("a 3-d batch", lambda x, y: (x[0], y), "NCHW"),
    ("an empty batch", lambda x, y: (x[:0], y[:0]), "non-empty"),
    ("one label too few", lambda x, y: (x, y[:-1]), "integer labels"),
    ("float labels", lambda x, y: (x, y.float()), "integer labels"),
    ("2-d labels", lambda x, y: (x, y.view(-1, 1)), "integer labels"),
)




def _ball_limit(norm: str, eps: float, d: int) -> float:
    """Largest float32 distance a correct attack's output may show from a ball of radius ``eps``.

    linf: one rounding of ``x + delta`` (|x| <= 1) adds at most ``2**-24`` (1e-6 covers it). l2, for
    ``d`` pixels per example: the norm's relative error is at most ``d * 2**-24`` for any summation
    order (at least 1e-5 is allowed), and rounding ``x + delta`` adds at most ``2**-24`` per pixel,
    ``sqrt(d) * 2**-24`` in l2 (at least 1e-6 is allowed; 2.3e-5 for a 224x224x3 image).
    """
    if norm == "linf":
        return eps + 1e-6
    return eps * (1 + max(1e-5, d * 2**-24)) + max(1e-6, math.sqrt(d) * 2**-24)


def _no_grads(model: nn.Module) -> bool:
    return all(p.grad is None for p in model.parameters())


def _cnn(device: torch.device) -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN(num_classes=3).to(device)


def _batch(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = synthetic_tensors(n)
    return x.to(device), y.to(device)


class _Spy(nn.Module):
    """TinyCNN that records, per forward, whether any of its modules was in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyCNN(num_classes=3)
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(any(m.training for m in self.modules()))
        return self.net(x)


class _Flaky(nn.Module):
    """TinyCNN that raises on its ``fail_at``-th forward call."""

    def __init__(self, fail_at: int) -> None:
        super().__init__()
        self.net = TinyCNN(num_classes=3)
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("boom inside forward")
        return self.net(x)


def _example_attacks(cls: type[Attack], threats: Sequence[ThreatModel], device: torch.device) -> list[Attack]:
    """``cls`` with its ``example_params`` per threat model, prepared as :func:`harden.verify` prepares attacks.

    The data is :func:`synthetic_bundle` (an invariance-example pool, a transfer surrogate's
    training data); the attacks share one surrogate, trained once. The caller's RNG is untouched.
    """
    attacks = [cls(t, dict(cls.example_params)) for t in threats]
    bundle = synthetic_bundle()
    with torch.random.fork_rng(devices=[]):
        attach_surrogates(attacks, tiny_policy(threat=threats[0].model_dump()), bundle, device)
        for attack, t in zip(attacks, threats, strict=True):
            attack.prepare(AttackEnv(policy=tiny_policy(threat=t.model_dump()), bundle=bundle, device=device))
    return attacks


def _check_attack_output(attack: Attack, where: str, device: torch.device) -> None:
    """Shape, dtype, device, [0, 1], the eps ball, the input untouched, no parameter gradients."""
    threat = attack.threat
    model = _cnn(device)
    x, y = _batch(16, device)
    x0 = x.clone()
    adv = attack(model, x, y)
    expect(
        isinstance(adv, torch.Tensor) and adv.shape == x.shape,
        f"{where}: expected an output shaped like the input {tuple(x.shape)}, got {getattr(adv, 'shape', adv)!r}",
    )
    expect(adv.dtype == x.dtype, f"{where}: expected the input's dtype {x.dtype}, got {adv.dtype}")
    expect(adv.device == x.device, f"{where}: expected the input's device {x.device}, got {adv.device}")
    expect(not adv.requires_grad, f"{where}: expected a detached output, got one that requires grad")
    expect(torch.equal(x, x0), f"{where}: expected the input left as it was, got it modified in place")
    lo, hi = float(adv.min()), float(adv.max())
    expect(lo >= 0.0 and hi <= 1.0, f"{where}: expected pixels in [0, 1], got values in [{lo}, {hi}]")
    if type(attack).bounded:
        dist = float(lp_norm(adv - x, threat.norm).max())
        limit = _ball_limit(threat.norm, threat.eps, x[0].numel())
        expect(
            dist <= limit,
            f"{where}: expected the output inside the {threat.norm} ball of radius {threat.eps}, "
            f"got a distance of {dist:.9g}",
        )
    expect(_no_grads(model), f"{where}: expected no parameter gradients on the model, got some")
    edge = torch.zeros(4, 1, 8, 8, device=device)
    edge[2:] = 1.0
    adv = attack(model, edge, torch.tensor([0, 1, 2, 0], device=device))
    lo, hi = float(adv.min()), float(adv.max())
    expect(
        lo >= 0.0 and hi <= 1.0,
        f"{where}: expected pixels in [0, 1] for inputs on the box's edge, got values in [{lo}, {hi}]",
    )
    if type(attack).bounded:
        dist = float(lp_norm(adv - edge, threat.norm).max())
        expect(
            dist <= _ball_limit(threat.norm, threat.eps, edge[0].numel()),
            f"{where}: expected inputs on the box's edge to stay inside the eps ball, got a distance of {dist:.9g}",
        )


def _check_attack_seeded(attack: Attack, where: str, device: torch.device) -> None:
    model = _cnn(device).eval()
    x, y = _batch(16, device)
    torch.manual_seed(7)
    first = attack(model, x, y)
    torch.manual_seed(7)
    second = attack(model, x, y)
    expect(torch.equal(first, second), f"{where}: expected the same output under the same torch seed, got another")


def _check_attack_modes(attack: Attack, where: str, device: torch.device) -> None:
    """Train, mixed and eval modes restored; BatchNorm statistics untouched; every forward in eval mode."""
    x, y = _batch(8, device)
    model = _cnn(device).train()
    stats = [b.clone() for b in model.buffers()]  # BatchNorm's running mean, variance and batch count
    attack(model, x, y)
    expect(all(m.training for m in model.modules()), f"{where}: expected train mode restored after the call")
    expect(
        all(torch.equal(a, b) for a, b in zip(stats, model.buffers(), strict=True)),
        f"{where}: expected BatchNorm running statistics untouched (the attack runs the model in eval mode), "
        "got them updated",
    )

    model = _cnn(device).train()
    model.features[1].eval()  # e.g. a frozen BatchNorm
    before = save_modes(model)
    attack(model, x, y)
    expect(save_modes(model) == before, f"{where}: expected every submodule's mode restored (mixed train/eval)")

    model = _cnn(device).eval()
    attack(model, x, y)
    expect(not any(m.training for m in model.modules()), f"{where}: expected eval mode to stay eval mode")

    torch.manual_seed(0)
    spy = _Spy().to(device).train()
    spy.net.features[1].eval()
    before = save_modes(spy)
    attack(spy, x, y)
    scored = attack.score(spy, x, y)
    expect(bool(spy.seen), f"{where}: expected the attack or its score() to run the model, got no forward call")
    expect(
        not any(spy.seen),
        f"{where}: expected every forward of the model in eval mode, got {sum(spy.seen)} of {len(spy.seen)} "
        "in train mode",
    )
    expect(save_modes(spy) == before, f"{where}: expected every submodule's mode restored after score()")
    expect(_no_grads(spy), f"{where}: expected no parameter gradients after score(), got some")
    expect(
        isinstance(scored, tuple) and len(scored) == 2,
        f"{where}: expected score() to return (right, counted), got {type(scored).__name__}",
    )
    for label, t in zip(("right", "counted"), scored, strict=True):
        expect(
            isinstance(t, torch.Tensor) and t.dtype == torch.bool and t.shape == (x.shape[0],),
            f"{where}: expected score()'s {label} as a bool tensor of shape ({x.shape[0]},), "
            f"got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}",
        )
        expect(t.device == x.device, f"{where}: expected score()'s {label} on {x.device}, got {t.device}")
    right, counted = scored
    expect(not bool((right & ~counted).any()), f"{where}: expected every example scored right to count")

    torch.manual_seed(0)
    flaky = _Flaky(fail_at=1).to(device).train()
    flaky.net.head.eval()
    before = save_modes(flaky)
    try:
        attack(flaky, x, y)
    except RuntimeError as exc:
        expect("boom inside forward" in str(exc), f"{where}: expected the model's own error, got {exc!r}")
    else:
        expect(
            flaky.calls == 0,  # only an attack that never runs the target (e.g. transfer) gets here
            f"{where}: expected the error the model raised on its first forward, got none",
        )
    expect(save_modes(flaky) == before, f"{where}: expected every submodule's mode restored when forward raises")
    expect(_no_grads(flaky), f"{where}: expected no parameter gradients when forward raises, got some")


def _check_attack_grads(attack: Attack, where: str, device: torch.device) -> None:
    """No parameter gradients created, and existing ones left untouched."""
    model = _cnn(device)
    x, y = _batch(8, device)
    attack(model, x, y)
    expect(_no_grads(model), f"{where}: expected no parameter gradients on the model, got some")
    model(_batch(4, device)[0]).sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    attack(model, x, y)
    now = [p.grad for p in model.parameters() if p.grad is not None]
    expect(
        len(now) == len(grads) and all(torch.equal(g, p) for g, p in zip(grads, now, strict=True)),
        f"{where}: expected the model's existing parameter gradients left untouched, got them changed",
    )


def _check_attack_refusals(attack: Attack, where: str, device: torch.device) -> None:
    """Inputs outside the threat model raise ThreatModelError saying what was expected."""
    for what, mutate, pattern in _VIOLATIONS:
        x, y = mutate(*_batch(8, device))
        try:
            attack(_cnn(device), x, y)
        except ThreatModelError as exc:
            expect(
                re.search(pattern, str(exc)) is not None,
                f"{where}: expected the ThreatModelError for {what} to match {pattern!r}, got {exc}",
            )
        else:
            raise AssertionError(f"{where}: expected a ThreatModelError for {what}, got none")
    try:
        attack(lambda t: t, *_batch(4, device))  # type: ignore[arg-type]
    except ThreatModelError as exc:
        expect("nn.Module" in str(exc), f"{where}: expected the error to ask for an nn.Module, got {exc}")
    else:
        raise AssertionError(f"{where}: expected a ThreatModelError for a model that is not an nn.Module")
    if device.type != "cpu":
        x, y = synthetic_tensors(8)
        try:
            attack(_cnn(device), x, y)
        except ThreatModelError as exc:
            expect("one device" in str(exc), f"{where}: expected the error to ask for one device, got {exc}")
        else:
            raise AssertionError(f"{where}: expected a ThreatModelError for a model on {device} and inputs on cpu")


def check_attack(cls: type[Attack], threat: ThreatModel | None = None, *, device: str | torch.device = "cpu") -> None:
    """Check that an attack class keeps the contract every harden attack keeps.

    ``cls`` is built with ``cls.example_params`` (keep them cheap: a few steps or queries) and
    prepared as :func:`harden.verify` prepares attacks, on :func:`synthetic_bundle` (a transfer
    surrogate is trained there, then :meth:`~harden.attacks.base.Attack.prepare` runs), then run
    on :class:`TinyCNN` and 8x8 synthetic images.
    Checked, per threat model:

    - the output is shaped like the input, of its dtype and device, detached, inside [0, 1] and
      (if ``cls.bounded``) inside the eps ball, also for inputs on the box's edge; the input is
      not modified in place;
    - the same torch seed gives the same output (on the CPU only; GPU kernels may not be
      deterministic);

    and once (under the first threat model):

    - every forward of the model runs in eval mode (BatchNorm statistics untouched), and train,
      eval and mixed modes of every submodule are restored, also when the model's forward raises;
    - no parameter gradient is left on the model, and existing ones are left untouched;
    - :meth:`~harden.attacks.base.Attack.score` returns ``(right, counted)``: bool tensors of
      the batch size, ``right`` only where ``counted``;
    - inputs outside the threat model (pixels outside [0, 1], NaN, not float32, not NCHW,
      empty, labels that do not match, a model that is not an ``nn.Module``, or on another
      device) raise :class:`harden.ThreatModelError` saying what was expected.

    The caller's torch RNG state is left as it was.

    Args:
        cls: the attack class (a subclass of :class:`harden.Attack`).
        threat: the threat model to check under; None: ``linf`` eps 0.1 and ``l2`` eps 0.5.
        device: where the model and the inputs live (e.g. ``"cuda"``).

    Raises:
        AssertionError: a broken part of the contract, named with the attack and threat model.

    Example:
        >>> from harden.attacks.fgsm import FGSM
        >>> check_attack(FGSM)
        >>> check_attack(FGSM, ThreatModel(norm="l2", eps=1.0))
    """
    expect(
        isinstance(cls, type) and issubclass(cls, Attack),
        f"expected a subclass of harden.Attack, got {cls!r}",
    )
    dev = torch.device(device)
    threats = _ATTACK_THREATS if threat is None else (threat,)
    forked = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(0)
        for i, (t, attack) in enumerate(zip(threats, _example_attacks(cls, threats, dev), strict=True)):
            where = f"{cls.name or cls.__name__} ({t.norm}, eps={t.eps})"
            _check_attack_output(attack, where, dev)
            if dev.type == "cpu":
                _check_attack_seeded(attack, where, dev)
            if i == 0:
                _check_attack_modes(attack, where, dev)
                _check_attack_grads(attack, where, dev)
                _check_attack_refusals(attack, where, dev)


