"""harden.objectives.embedding: where embeddings are read (the classifier's input or a named layer)."""

import pytest
import torch
from torch import nn

import harden
from harden.objectives.embedding import EmbeddingTap, classifier_module
from harden.testing import TinyCNN


def test_embedding_tap_defaults_and_named_layers():
    import timm

    r = timm.create_model("resnet10t", num_classes=3, in_chans=1)
    assert classifier_module(r) is r.get_classifier()
    tap = EmbeddingTap(r)
    r(torch.rand(2, 1, 16, 16))
    assert tap.take().shape == (2, r.num_features)
    tap.remove()
    net = TinyCNN(num_classes=3)
    name = next(n for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    tap = EmbeddingTap(net, name)
    net(torch.rand(2, 1, 8, 8))
    assert tap.take().dim() == 2
    with pytest.raises(harden.UnknownNameError, match="embedding layer"):
        EmbeddingTap(net, name + "x")
    with pytest.raises(harden.ModelError, match="layer"):
        classifier_module(nn.Sequential(nn.Conv2d(1, 2, 3)))
