"""Where objectives read a model's embedding (the penultimate representation).

:class:`EmbeddingTap` hooks one module of the model and keeps what flows through it on every
forward, so the embedding and the logits come from the same forward pass (one forward per view,
shared by every objective). By default it taps the *input* of the classifier: for a timm model
``get_classifier()``, which is what ``forward_head(forward_features(x), pre_logits=True)``
returns; for a custom model the last ``nn.Linear``. A named layer is tapped at its *output*.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from harden.errors import ModelError, UnknownNameError
from harden.registry import did_you_mean, suggest

__all__ = ["EmbeddingTap", "classifier_module"]


def _unwrap(model: nn.Module) -> nn.Module:
    from harden.models import Normalized

    inner = getattr(model, "module", model)  # DistributedDataParallel
    return inner.model if isinstance(inner, Normalized) else inner


def classifier_module(model: nn.Module) -> nn.Module:
    """The final classifier layer: timm's ``get_classifier()``, else the last ``nn.Linear``.

    Raises:
        ModelError: neither exists (name a layer instead).

    Example:
        >>> classifier_module(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)))
        Linear(in_features=3, out_features=2, bias=True)
    """
    net = _unwrap(model)
    get = getattr(net, "get_classifier", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
            return head
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ModelError(
            f"expected a timm model or one with an nn.Linear classifier to read embeddings from, got "
            f"{type(net).__name__}; name the embedding layer in the objective's params (layer: ...)"
        )
    return linears[-1]


class EmbeddingTap:
    """Record the embedding of every forward of ``model``.

    Args:
        model: the model (a :class:`harden.models.Normalized` wrapper or a plain module).
        layer: a module name of the (inner) model whose output is the embedding, or None for the
            classifier's input.

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> tap = EmbeddingTap(net)
        >>> _ = net(torch.rand(5, 1, 2, 2))
        >>> tap.last.shape
        torch.Size([5, 3])
        >>> tap.remove()
    """

    def __init__(self, model: nn.Module, layer: str | None = None) -> None:
        net = _unwrap(model)
        if layer is None:
            module, self.at = classifier_module(net), "input"
        else:
            modules = dict(net.named_modules())
            if layer not in modules or layer == "":
                names = [n for n in modules if n]
                raise UnknownNameError(
                    f"expected an embedding layer of {type(net).__name__}, got {layer!r}{did_you_mean(layer, names)}",
                    layer,
                    suggest(layer, names),
                )
            module, self.at = modules[layer], "output"
        self.layer = layer
        self.last: torch.Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        value = inputs[0] if self.at == "input" else output
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"expected a tensor at the embedding layer, got {type(value).__name__}")
        self.last = value.flatten(1)

    def take(self) -> torch.Tensor:
        """The embedding of the latest forward (and forget it)."""
        if self.last is None:
            raise ModelError("expected a forward pass through the embedding layer, got none")
        out, self.last = self.last, None
        return out

    def remove(self) -> None:
        """Detach the hook from the model."""
        self._handle.remove()
