"""harden.testing: the tiny models, data and policies, and the contract harness catching broken plugins."""

import pytest
import torch
import torch.nn.functional as F

from harden.testing import (
    ConstantClassifier,
    QuantizedInput,
    SoftmaxHead,
    TinyCNN,
    TinyMLP,
    tiny_policy,
)

# --------------------------------------------------------------------------- models, data, policies


def test_tiny_cnn_exposes_features_and_head_like_timm():
    net = TinyCNN(num_classes=4, in_chans=3, width=8)
    x = torch.rand(2, 3, 12, 12)
    feats = net.forward_features(x)
    assert feats.shape == (2, net.num_features) == (2, 64)
    torch.testing.assert_close(net.forward_head(feats), net(x))


@pytest.mark.parametrize(("make", "head"), [(TinyCNN, "head"), (TinyMLP, "net.3")])
def test_a_tiny_weights_file_of_another_class_count_loads_with_the_classifier_skipped(tmp_path, make, head):
    from safetensors.torch import save_file

    from harden.weights import load_weights

    src, dst = make(num_classes=5), make(num_classes=3)
    assert dst.get_classifier() is dst.get_submodule(head)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    fresh = {k: v.clone() for k, v in dst.state_dict().items() if k.startswith(f"{head}.")}
    with pytest.warns(
        UserWarning, match=rf"skipped the classifier {head}\.bias, {head}\.weight \(shape differs: 5 → 3"
    ):
        load_weights(dst, path)
    for key, value in dst.state_dict().items():
        assert torch.equal(value, fresh[key] if key in fresh else src.state_dict()[key]), key
    assert len(fresh) == 2 and dst(torch.rand(2, 1, 8, 8)).shape == (2, 3)


def test_tiny_mlp_has_no_batch_coupling():
    net = TinyMLP(num_classes=3).train()
    x = torch.rand(5, 1, 8, 8)
    # no BatchNorm: each row its own. Same batch shape, other rows changed, so the same kernels run and
    # the first two rows must match exactly (a batch of 2 would take another GEMM path: ~1e-8 apart)
    other = torch.cat([x[:2], torch.rand(3, 1, 8, 8)])
    torch.testing.assert_close(net(x)[:2], net(other)[:2], rtol=0, atol=0)


def test_constant_classifier_answers_its_label_with_zero_but_existing_gradients():
    net = ConstantClassifier(num_classes=4, label=3)
    x = torch.rand(3, 1, 8, 8, requires_grad=True)
    out = net(x)
    assert out.argmax(1).tolist() == [3, 3, 3]
    out.sum().backward()
    assert x.grad is not None and float(x.grad.abs().max()) == 0.0
    assert net.anchor.grad is not None and float(net.anchor.grad) == 0.0


def test_quantized_input_masks_the_input_gradient():
    net = QuantizedInput(TinyMLP(num_classes=2), levels=2)
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    F.cross_entropy(net(x), torch.tensor([0, 1])).backward()
    assert float(x.grad.abs().max()) == 0.0
    torch.testing.assert_close(net(x), net.model(torch.round(x)))


def test_softmax_head_returns_probabilities():
    out = SoftmaxHead(TinyMLP(num_classes=3), temperature=1.0)(torch.rand(4, 1, 8, 8))
    torch.testing.assert_close(out.sum(1), torch.ones(4))
    assert float(out.detach().min()) >= 0.0


def test_tiny_policy_merges_sections_and_leaves_the_default_alone():
    p = tiny_policy(train={"epochs": 3}, threat={"norm": "l2", "eps": 0.5})
    assert p.train.epochs == 3 and p.train.lr == 0.05  # the rest of the section is kept
    assert (p.threat.norm, p.threat.eps) == ("l2", 0.5)
    again = tiny_policy()
    assert again.train.epochs == 1 and again.threat.norm == "linf"
    assert tiny_policy(objectives=[{"name": "ce"}]).objectives[0].name == "ce"  # lists are replaced


def test_row_counter_counts_every_forward_row_and_passes_the_output_through():
    import torch

    from harden.tiny import RowCounter, TinyMLP

    torch.manual_seed(0)
    inner = TinyMLP(num_classes=3).eval()
    counted = RowCounter(inner)
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(counted(x), inner(x)) and counted(x[:2]).shape == (2, 3)
    assert counted.rows == 7
