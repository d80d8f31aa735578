"""The attack contract: a final ``__call__`` that enforces the threat model for every attack.

Subclasses implement :meth:`Attack.perturb` only. ``__call__`` checks the inputs, runs the
attack with the model in eval mode and its parameters frozen (``requires_grad=False``; both
restored afterwards, also on error), projects the result onto the eps ball and [0, 1], and never
moves a tensor between devices. Randomness (random starts) comes from torch's global RNG, so
callers seed it.

Freezing the parameters changes no input gradient; it only spares autograd the weight-gradient
work it otherwise does inside every backward pass (measured: an input gradient of a small MNIST
CNN on 200 images took 125 ms with trainable parameters and 83 ms frozen, on 2 CPU cores).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, final

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from harden.batches import check_pixels, predictions
from harden.errors import PolicyError, ThreatModelError
from harden.models import has_state, model_device
from harden.policy import ThreatModel
from harden.registry import Registry

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackEnv",
    "AttackParams",
    "EOTParams",
    "channels_last_weights",
    "freeze_parameters",
    "input_grad",
    "layout_error",
    "loss_grad",
    "lp_norm",
    "normalize_grad",
    "project",
    "restore_modes",
    "save_modes",
    "unfreeze_parameters",
]


class AttackParams(BaseModel):
    """Base of every attack's parameters (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class EOTParams(AttackParams):
    """Base of the gradient attacks' parameters: ``eot`` (expectation over transformation).

    Attributes:
        eot: forward/backward passes averaged into each gradient (Athalye et al. 2018's EOT):
            for a model with a random forward pass (dropout left on, random input transforms)
            the attack follows the expected gradient; 1 (the default) is one pass.
    """

    eot: int = Field(1, ge=1, le=10_000)


@dataclass
class AttackEnv:
    """Resources an attack may need (see :meth:`Attack.prepare`).

    Attributes:
        policy: the policy being verified (model spec, seed, device).
        bundle: the policy's data (a :class:`harden.data.DataBundle`), if known.
        device: where the verified model lives.
    """

    policy: Any
    bundle: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


ATTACKS: Registry[type[Attack]] = Registry("attack", entry_point_group="harden.attacks")


def lp_norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example norm of a batch, shape ``(N,)``."""
    flat = t.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(p=2, dim=1)


def normalize_grad(g: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction for the norm: ``sign(g)`` (linf) or ``g / ||g||_2`` (l2)."""
    if norm == "linf":
        return g.sign()
    n = g.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
    return g / n.view(-1, *([1] * (g.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project ``x_adv`` onto ``{x' : ||x' - x|| <= eps} ∩ [0, 1]``.

    For l2 the ball projection is followed by clipping to the box, which keeps the norm bound.

    Example:
        >>> x = torch.zeros(1, 1, 2, 2)
        >>> project(torch.ones(1, 1, 2, 2), x, "linf", 0.1).max().item()
        0.10000000149011612
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = delta.flatten(1).norm(p=2, dim=1).clamp_min(1e-12)
        factor = (eps / n).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
        delta = delta * factor
    return (x + delta).clamp(0.0, 1.0)


def save_modes(model: nn.Module) -> dict[str, bool]:
    """Every submodule's ``training`` flag, to restore later exactly."""
    return {name: m.training for name, m in model.named_modules()}


def restore_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    """Restore the flags saved by :func:`save_modes`."""
    for name, m in model.named_modules():
        if name in modes:
            m.training = modes[name]


def channels_last_weights(model: nn.Module, x: torch.Tensor) -> Callable[[], None] | None:
    """Hold the model's 4-D weights in channels_last on the CPU (Square's queries, the checks' PGD).

    A convolution whose weight is channels_last runs oneDNN's NHWC kernels: on 2 CPU cores the
    MNIST challenge CNN answered a batch of 90 in 10 ms instead of 16 ms, its logits within
    1e-6 of the standard layout's (float32 rounding of another summation order), and its input
    gradient of 100 images took 33 ms instead of 40 ms. Returns the
    function that puts the very same tensors back (bit for bit), or None where nothing changed:
    not on the CPU, no 4-D weight, or weights already channels_last.

    Example:
        >>> net = nn.Conv2d(3, 4, 3)
        >>> restore = channels_last_weights(net, torch.rand(1, 3, 8, 8))
        >>> net.weight.is_contiguous(memory_format=torch.channels_last), net.weight.is_contiguous()
        (True, False)
        >>> restore(); net.weight.is_contiguous()
        True
    """
    held = [t for t in (*model.parameters(), *model.buffers()) if t.dim() == 4]
    if x.device.type != "cpu" or not held or not all(t.is_contiguous() for t in held):
        return None
    saved = [(t, t.data) for t in held]

    def restore() -> None:
        for t, data in saved:
            t.data = data

    try:
        for t, data in saved:  # a fresh copy: with one input channel .contiguous() would keep NCHW strides
            t.data = torch.empty_like(data, memory_format=torch.channels_last).copy_(data)
    except BaseException:  # out of memory part way: the tensors already swapped go back
        restore()
        raise
    return restore


def layout_error(exc: RuntimeError) -> bool:
    """Whether an error is torch refusing a memory layout (a ``.view()`` of non-contiguous strides).

    A model that breaks on :func:`channels_last_weights` (its forward views a channels_last
    activation) raises such an error; the caller then puts the model's own layout back.

    Example:
        >>> layout_error(RuntimeError("view size is not compatible with input tensor's size and stride"))
        True
        >>> layout_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
        False
    """
    text = str(exc)
    return "stride" in text or "contiguous" in text or "view size" in text


def freeze_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Set ``requires_grad=False`` on every trainable parameter; returns those to unfreeze later.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> frozen = freeze_parameters(net)
        >>> len(frozen), net.weight.requires_grad
        (2, False)
        >>> unfreeze_parameters(frozen); net.weight.requires_grad
        True
    """
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def unfreeze_parameters(frozen: list[nn.Parameter]) -> None:
    """Undo :func:`freeze_parameters`."""
    for p in frozen:
        p.requires_grad_(True)


class Attack(ABC):
    """Base class of every attack.

    Args:
        threat: the threat model (norm, eps) enforced on the result.
        params: the attack's parameters (a mapping or its ``Params`` instance).

    Example:
        >>> from harden.attacks import ATTACKS
        >>> from harden.testing import TinyMLP
        >>> pgd = ATTACKS.get("pgd")(ThreatModel(eps=0.1), {"steps": 3})
        >>> x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
        >>> bool(((pgd(TinyMLP(num_classes=3), x, y) - x).abs().max() <= 0.1 + 1e-6))
        True
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = AttackParams
    #: cheap params for :func:`harden.testing.check_attack` (a few steps, few queries)
    example_params: ClassVar[dict[str, Any]] = {}
    #: Whether the result is projected onto the threat model's eps ball (else only onto [0, 1]).
    bounded: ClassVar[bool] = True
    #: Whether the attack needs gradients of the model (white-box).
    white_box: ClassVar[bool] = True
    #: Whether :meth:`prepare` reads the training split (``env.bundle.train``): the verification
    #: layer then loads the policy's data if the caller did not hand it over.
    uses_training_split: ClassVar[bool] = False
    #: Whether the attack changes the true label (invariance examples): scored by :meth:`score`
    #: against the new label and reported apart from the l_p worst case.
    changes_label: ClassVar[bool] = False
    #: Whether ``__call__`` freezes the model's parameters while the attack runs (an attack that
    #: needs parameter gradients, or a model that adapts its weights at test time, sets False).
    freezes_parameters: ClassVar[bool] = True
    #: called by :meth:`tick` with the fraction of the current call's work done (set by the suite)
    on_progress: Callable[[float], None] | None = None

    def __init__(self, threat: ThreatModel, params: BaseModel | Mapping[str, Any] | None = None) -> None:
        if not isinstance(threat, ThreatModel):
            raise ThreatModelError(f"expected a harden.ThreatModel, got {type(threat).__name__}")
        self.threat = threat
        if isinstance(params, self.Params):
            self.params: Any = params
        else:
            try:
                self.params = self.Params.model_validate(dict(params or {}))
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise PolicyError(f"{self.name or type(self).__name__} params: {where}: {err['msg']}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.threat.norm}, eps={self.threat.eps}, {self.params!r})"

    @final
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Attack ``model`` at ``(x, y)``; returns adversarial pixels inside the threat model.

        Raises:
            ThreatModelError: ``x`` is not float NCHW in [0, 1], ``y`` not matching labels, or
                the model and the data are on different devices.
        """
        self._check_inputs(model, x, y)
        modes = save_modes(model)
        model.eval()
        frozen = freeze_parameters(model) if self.freezes_parameters else []
        try:
            with torch.enable_grad():
                x_adv = self.perturb(model, x.detach(), y.detach())
        finally:
            unfreeze_parameters(frozen)
            restore_modes(model, modes)
        if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape or x_adv.device != x.device:
            raise ThreatModelError(
                f"{self.name}: expected perturb() to return a tensor like x {tuple(x.shape)} on {x.device}, got {getattr(x_adv, 'shape', x_adv)!r}"
            )
        x_adv = x_adv.detach()
        if not torch.isfinite(x_adv).all():
            raise ThreatModelError(f"{self.name}: expected finite adversarial pixels, got NaN or infinity")
        if self.bounded:
            return project(x_adv, x, self.threat.norm, self.threat.eps)
        return x_adv.clamp(0.0, 1.0)

    def tick(self, done: float) -> None:
        """Report progress: ``done`` is the fraction in [0, 1] of this call's work finished.

        Attacks call it at target and restart boundaries (and may every few iterations); it does
        nothing unless a caller set :attr:`on_progress` (the suite's progress bar does).
        """
        if self.on_progress is not None:
            self.on_progress(min(max(float(done), 0.0), 1.0))

    def _check_inputs(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        if not isinstance(model, nn.Module):
            raise ThreatModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(x, torch.Tensor):
            raise ThreatModelError(f"expected x as a torch tensor of pixels, got {type(x).__name__}")
        check_pixels(x, float32=True)
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
            raise ThreatModelError(
                f"expected y as {x.shape[0]} integer labels, got {getattr(y, 'shape', type(y).__name__)}"
            )
        if y.device != x.device:
            raise ThreatModelError(f"expected x and y on one device, got {x.device} and {y.device}")
        dev = model_device(model)
        if has_state(model) and dev != x.device:
            raise ThreatModelError(
                f"expected the model and x on one device, got {dev} and {x.device}; move them yourself (attacks never move tensors)"
            )

    def score(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example: the model is right on the attacked input; the example counts.

        The default attacks ``(x, y)`` and compares the prediction with ``y`` (every example
        counts); label-changing attacks compare with the label they create instead. Logits with
        a NaN or infinity are no answer (:func:`harden.batches.predictions`): scored wrong.
        """
        x_adv = self(model, x, y)
        modes = save_modes(model)
        model.eval()
        try:
            with torch.no_grad():
                right = predictions(model(x_adv)) == y  # a non-finite row (-1) is never right
        finally:
            restore_modes(model, modes)
        return right, torch.ones_like(right)

    def prepare(self, env: AttackEnv) -> None:  # noqa: B027 - an optional hook, not abstract
        """Acquire what the attack needs beyond ``(model, x, y)``, once before a suite runs.

        The default does nothing; the transfer attack builds or trains its surrogate here.
        """

    @abstractmethod
    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return adversarial pixels for ``(x, y)``; the model is already in eval mode."""


def loss_grad(
    model: nn.Module, x: torch.Tensor, loss_fn: Any, eot: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits at ``x``, the per-example loss ``loss_fn(logits)`` and the gradient of its sum w.r.t. ``x``.

    With ``eot > 1`` each of the three is the mean over ``eot`` forward/backward passes
    (expectation over transformation, Athalye et al. 2018), for models with a random forward
    pass; ``eot=1`` is one pass, exactly as without EOT.

    Example:
        >>> net = nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        >>> logits, loss, grad = loss_grad(net, torch.ones(1, 2), lambda z: z[:, 0], eot=2)
        >>> logits.tolist(), loss.tolist(), grad.tolist()
        ([[3.0, 7.0]], [3.0], [[1.0, 2.0]])
    """
    logits, loss, grad = _one_pass(model, x, loss_fn)
    if eot > 1:
        for _ in range(eot - 1):
            more = _one_pass(model, x, loss_fn)
            logits, loss, grad = logits + more[0], loss + more[1], grad + more[2]
        logits, loss, grad = logits / eot, loss / eot, grad / eot
    return logits, loss, grad


def _one_pass(model: nn.Module, x: torch.Tensor, loss_fn: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = loss_fn(logits)
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return logits.detach(), loss.detach(), grad.detach()


def input_grad(model: nn.Module, x: torch.Tensor, loss_fn: Any, eot: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at ``x`` and the gradient of ``loss_fn(logits).sum()`` w.r.t. ``x`` (means over ``eot`` passes)."""
    logits, _, grad = loss_grad(model, x, loss_fn, eot)
    return logits, grad
