"""``harden.tiny``: tiny seeded models and a fast policy, for tests (re-exported by :mod:`harden.testing`).

Example:
    >>> tiny_policy(objectives=[{"name": "ce"}]).data.name
    'synthetic'
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from harden.policy import Policy
from harden.policy_io import validate_policy

__all__ = ["ConstantClassifier", "QuantizedInput", "SoftmaxHead", "TinyCNN", "TinyMLP", "expect", "tiny_policy"]


def expect(condition: bool, message: str) -> None:
    """The contract harnesses' ``assert``, which survives ``python -O``: AssertionError(message) unless ``condition``.

    Example:
        >>> expect(1 + 1 == 2, "arithmetic")
    """
    if not condition:
        raise AssertionError(message)


class TinyCNN(nn.Module):
    """A two-conv classifier for small images (any size >= 4 px).

    It exposes ``forward_features`` / ``forward_head`` / ``get_classifier`` like timm models, so
    objectives that need an embedding work on it unchanged, and a weights file saved with another
    class count loads into it with the classifier skipped (:func:`harden.weights.load_weights`).

    Example:
        >>> TinyCNN(num_classes=3, in_chans=1)(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.num_features = 8 * width
        self.head = nn.Linear(self.num_features, num_classes)

    def get_classifier(self) -> nn.Module:
        """The final layer (``head``), as timm names it: a weights file of another class count skips it."""
        return self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding."""
        return self.features(x)

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        """Logits from the embedding."""
        return self.head(feats)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.forward_head(self.forward_features(x))


class TinyMLP(nn.Module):
    """A one-hidden-layer MLP on flattened images (no BatchNorm: fully deterministic).

    Example:
        >>> TinyMLP(num_classes=3, in_chans=1, image_size=8)(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, image_size: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_chans * image_size * image_size, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def get_classifier(self) -> nn.Module:
        """The final layer, as timm names it: a weights file of another class count skips it."""
        return self.net[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits."""
        return self.net(x)


class ConstantClassifier(nn.Module):
    """A classifier whose answer is known: always ``label`` (logit 1 there, 0 elsewhere).

    Randomized smoothing must certify it at radius ``sigma * Phi^-1(pA_lower)`` with
    ``pA_lower = alpha ** (1 / n)`` for every input. Its input gradients are zero, so the
    gradient checks flag it. A dummy parameter keeps ``model_device`` and optimizers working.

    Example:
        >>> ConstantClassifier(num_classes=3, label=2)(torch.rand(4, 1, 8, 8)).argmax(1).tolist()
        [2, 2, 2, 2]
    """

    def __init__(self, num_classes: int = 3, label: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.label = label
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits: one-hot of ``label`` for every row of ``x``."""
        out = torch.zeros(x.shape[0], self.num_classes, device=x.device, dtype=x.dtype)
        out[:, self.label] = 1.0
        # zero-weight links keep x and the parameter in the graph (gradients exist and are zero)
        return out + 0 * self.anchor + 0 * x.flatten(1).sum(1, keepdim=True)


class QuantizedInput(nn.Module):
    """A gradient-masking wrapper: rounds pixels to ``levels`` grey levels before the model.

    Rounding has zero gradient almost everywhere, so gradient attacks see nothing and report
    robustness that is not there. harden's checks must flag it (FAIL).

    Example:
        >>> QuantizedInput(TinyMLP(num_classes=2), levels=2)(torch.rand(1, 1, 8, 8)).shape
        torch.Size([1, 2])
    """

    def __init__(self, model: nn.Module, levels: int = 4) -> None:
        super().__init__()
        self.model = model
        self.levels = levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the quantized input."""
        return self.model(torch.round(x * (self.levels - 1)) / (self.levels - 1))


class SoftmaxHead(nn.Module):
    """A gradient-masking wrapper: returns ``softmax(temperature * logits)`` (probabilities).

    With a large temperature the softmax saturates and cross-entropy gradients vanish; the
    outputs are also not logits. harden's checks must flag it (FAIL).

    Example:
        >>> float(SoftmaxHead(TinyMLP(num_classes=2))(torch.rand(1, 1, 8, 8)).sum())
        1.0
    """

    def __init__(self, model: nn.Module, temperature: float = 1000.0) -> None:
        super().__init__()
        self.model = model
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities."""
        return torch.softmax(self.model(x) * self.temperature, dim=1)


_TINY: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "model": {"name": "harden.testing:TinyCNN"},
    "data": {"name": "synthetic", "batch_size": 64, "eval_batch_size": 128},
    "threat": {"norm": "linf", "eps": 0.1},
    "train": {"epochs": 1, "lr": 0.05, "probe_examples": 64, "probe_steps": 3},
    "objectives": [{"name": "pgd_at", "params": {"steps": 3}}],
    "verify": {"attacks": [{"name": "fgsm"}, {"name": "pgd", "params": {"steps": 5}}], "n_examples": 96},
    "export": {"parity_examples": 16},
}


class RowCounter(nn.Module):
    """Wraps a model and counts the rows (examples) of every forward pass: what an attack or check costs.

    Example:
        >>> import torch
        >>> counted = RowCounter(TinyMLP(num_classes=3))
        >>> _ = counted(torch.rand(4, 1, 8, 8)); _ = counted(torch.rand(2, 1, 8, 8))
        >>> counted.rows
        6
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        #: rows seen by :meth:`forward` since it was built (or last set to 0)
        self.rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped model's output; ``rows`` grows by the batch size."""
        self.rows += x.shape[0]
        out: torch.Tensor = self.model(x)
        return out


def _merge(base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_policy(**updates: Any) -> Policy:
    """A fast policy (TinyCNN on ``synthetic``, 1 epoch), with sections merged from ``updates``.

    Example:
        >>> tiny_policy(train={"epochs": 2}).train.epochs
        2
    """
    return validate_policy(_merge(_TINY, updates), source="tiny_policy")
