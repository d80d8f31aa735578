"""harden.weights: exact loading of a local weights file, the classifier exemption, one-line errors."""

import re

import pytest
import torch
from safetensors.torch import save_file

import harden
from harden.models import load_weights as reexported
from harden.testing import TinyCNN, TinyMLP
from harden.weights import load_weights


def test_models_re_exports_load_weights():
    assert reexported is load_weights


def test_load_weights_safetensors_round_trip(tmp_path):
    src = TinyCNN(num_classes=3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = TinyCNN(num_classes=3)
    assert not torch.equal(dst.head.weight, src.head.weight)
    load_weights(dst, path)
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key


def test_load_weights_weights_only_pth(tmp_path):
    src = TinyCNN(num_classes=3)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": src.state_dict()}, path)
    dst = TinyCNN(num_classes=3)
    load_weights(dst, path)
    assert torch.equal(dst.features[0].weight, src.features[0].weight)


def test_load_weights_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": TinyMLP(num_classes=2)}, path)  # a pickled module, not just tensors
    with pytest.raises(harden.ModelError, match="weights-only"):
        load_weights(TinyMLP(num_classes=2), path)


def tiny_vit(num_classes=10, mlp_ratio=4.0):
    """The smallest ViT timm builds: 32 px, 2 blocks of width 32 (32 tensors), untrained."""
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=num_classes,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=32,
        num_heads=2,
        mlp_ratio=mlp_ratio,
    )


def test_load_weights_skips_only_a_timm_classifier_of_another_class_count(tmp_path, caplog):
    src = tiny_vit(num_classes=5)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    dst = tiny_vit(num_classes=3)
    head_before = dst.head.weight.clone()
    with caplog.at_level("INFO", logger="harden"), pytest.warns(UserWarning, match=r"head\.bias, head\.weight"):
        load_weights(dst, path)
    assert torch.equal(dst.head.weight, head_before)
    for key, value in src.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(dst.state_dict()[key], value), key
    lines = [r.getMessage() for r in caplog.records if r.name == "harden"]
    n = len(dst.state_dict())
    assert lines == [
        f"loaded {n - 2} of {n} tensors from {str(path)!r}; skipped the classifier head.bias, head.weight "
        "(shape differs: 5 → 3 classes)"
    ]


def test_load_weights_of_a_vit_with_another_mlp_ratio_raises(tmp_path):
    # "fc" in "blocks.0.mlp.fc1.weight" once passed for a classifier: 6 of 32 tensors stayed random
    path = tmp_path / "w.safetensors"
    save_file(tiny_vit(mlp_ratio=2.0).state_dict(), str(path))
    dst = tiny_vit(mlp_ratio=4.0)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(
        harden.ModelError, match=r"0 missing, 0 unexpected and 6 mis-shaped.*'blocks\.0\.mlp\.fc1"
    ) as info:
        load_weights(dst, path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert "'blocks.0.mlp.fc1.bias' is (64,) in the file, (128,) in the model" in str(info.value)
    for key, value in before.items():
        assert torch.equal(dst.state_dict()[key], value), key


def test_load_weights_refuses_a_classifier_of_another_width(tmp_path):
    state = tiny_vit(num_classes=3).state_dict()
    state["head.weight"] = torch.zeros(3, 16)  # the class count matches; the features do not
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(harden.ModelError, match=r"1 mis-shaped tensors \(first: 'head\.weight'\)"):
        load_weights(tiny_vit(num_classes=3), path)


def mlp(num_classes):
    """A model that names no classifier (no ``get_classifier``, no ``pretrained_cfg``)."""
    return torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, num_classes)
    )


def test_load_weights_gives_a_model_that_names_no_classifier_no_exemption(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file(mlp(5).state_dict(), str(path))
    with pytest.raises(harden.ModelError, match=r"2 mis-shaped tensors \(first: '3\.bias', '3\.weight'\)"):
        load_weights(mlp(3), path)


def test_load_weights_refuses_unexpected_tensors(tmp_path):
    state = TinyCNN(num_classes=3).state_dict()
    state["extra.weight"] = torch.zeros(2)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(
        harden.ModelError, match=r"0 missing, 1 unexpected and 0 mis-shaped tensors \(first: 'extra\.weight'\)"
    ):
        load_weights(TinyCNN(num_classes=3), path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_load_weights_refuses_non_finite_values_naming_the_first_tensor(tmp_path, value):
    state = TinyCNN(num_classes=3).state_dict()
    state["features.3.weight"][0, 0, 0, 0] = value
    state["head.weight"].fill_(value)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    dst = TinyCNN(num_classes=3)
    before = dst.features[3].weight.clone()
    with pytest.raises(harden.ModelError, match=r"NaN or infinity in 2 tensors \(first: 'features\.3\.weight'\)"):
        load_weights(dst, path)
    assert torch.equal(dst.features[3].weight, before)


def test_load_weights_logs_an_exact_load_without_warning(tmp_path, caplog, recwarn):
    src = TinyCNN(num_classes=3)
    path = tmp_path / "w.safetensors"
    save_file(src.state_dict(), str(path))
    with caplog.at_level("INFO", logger="harden"):
        load_weights(TinyCNN(num_classes=3), path)
    n = len(src.state_dict())
    assert [r.getMessage() for r in caplog.records if r.name == "harden"] == [
        f"loaded {n} of {n} tensors from {str(path)!r}"
    ]
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def one_line_error(path, model=None):
    with pytest.raises(harden.ModelError) as info:
        load_weights(model or TinyMLP(num_classes=2), path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_load_weights_corrupt_safetensors_is_one_line(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(TinyMLP(num_classes=2).state_dict(), str(good))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-40])
    assert "truncated or corrupt" in one_line_error(truncated)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    assert "safetensors cannot read" in one_line_error(garbage)


def test_load_weights_pickled_objects_never_advise_weights_only_false(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": TinyMLP(num_classes=2)}, path)
    message = one_line_error(path)
    assert "weights_only=False" not in message and "weights_only" not in message
    assert "pickled Python objects" in message
    assert "safetensors.torch.save_file(model.state_dict(), 'weights.safetensors')" in message


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"epoch": 3}, r"got int under 'epoch'"),
        ({"state_dict": {"w": {"nested": torch.zeros(1)}}}, r"got dict under 'w'"),
        ([torch.zeros(1)], r"got list"),
    ],
)
def test_load_weights_refuses_what_is_not_a_dict_of_tensors(tmp_path, content, match):
    path = tmp_path / "w.pth"
    torch.save(content, path)
    assert re.search(match, one_line_error(path))


def test_load_weights_unreadable_pth_is_one_line(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"not a checkpoint at all")
    assert "torch cannot read" in one_line_error(path)
    good = tmp_path / "good.pth"
    torch.save(TinyMLP(num_classes=2).state_dict(), good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:200])
    assert "torch cannot read" in one_line_error(cut)


def test_load_weights_mis_shaped_body_raises(tmp_path):
    state = TinyCNN(num_classes=3).state_dict()
    state["features.0.weight"] = torch.zeros(16, 1, 5, 5)
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    dst = TinyCNN(num_classes=3)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(harden.ModelError, match=r"1 mis-shaped.*features\.0\.weight"):
        load_weights(dst, path)
    for key, value in before.items():
        assert torch.equal(dst.state_dict()[key], value), key  # nothing was half-loaded


def test_load_weights_missing_body_tensor_raises(tmp_path):
    state = TinyCNN(num_classes=3).state_dict()
    del state["features.3.bias"]
    path = tmp_path / "w.safetensors"
    save_file(state, str(path))
    with pytest.raises(harden.ModelError, match="1 missing"):
        load_weights(TinyCNN(num_classes=3), path)


# --- read_state_dict, match_state, check_shapes, timm_normalization ---------------------------

from harden.weights import check_shapes, match_state, read_state_dict, timm_normalization  # noqa: E402


@pytest.mark.parametrize("nest", [None, "state_dict", "model", "model_state_dict"])
def test_read_state_dict_unwraps_the_usual_nestings(tmp_path, nest):
    state = TinyMLP(num_classes=2).state_dict()
    path = tmp_path / "w.pt"
    torch.save(state if nest is None else {nest: state, "epoch": 7, "optimizer": {"lr": torch.tensor(0.1)}}, path)
    got = read_state_dict(path)
    assert sorted(got) == sorted(state)
    assert all(torch.equal(got[k], v) for k, v in state.items())


@pytest.mark.parametrize(("saved_as", "named"), [("torch", "w.safetensors"), ("safetensors", "w.pth")])
def test_read_state_dict_reads_the_format_of_the_bytes_not_of_the_name(tmp_path, saved_as, named):
    state = {k: v.contiguous() for k, v in TinyMLP(num_classes=2).state_dict().items()}
    path = tmp_path / named
    torch.save(state, path) if saved_as == "torch" else save_file(state, str(path))
    got = read_state_dict(path)
    assert all(torch.equal(got[k], v) for k, v in state.items())


def test_read_state_dict_refuses_pickled_objects_in_one_line_and_runs_nothing(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": TinyMLP(num_classes=2)}, path)  # a pickled module where tensors belong
    with pytest.raises(harden.ModelError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "holding pickled Python objects" in message and str(path) in message and "\n" not in message


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"w": torch.zeros(2), "n": 3}, r"got int under 'n'"),
        (
            {"w": torch.tensor([0.0, float("nan")])},
            r"expected finite weights in .*got NaN or infinity in 1 tensors \(first: 'w'\)",
        ),
        ({"w": torch.tensor([float("inf")], dtype=torch.float16)}, r"NaN or infinity in 1 tensors"),
    ],
)
def test_read_state_dict_refuses_non_tensors_and_non_finite_values(tmp_path, content, match):
    path = tmp_path / "w.pth"
    torch.save(content, path)
    with pytest.raises(harden.ModelError, match=match):
        read_state_dict(path)


def test_read_state_dict_names_a_missing_file(tmp_path):
    with pytest.raises(harden.ModelError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")


KEYS = ["features.0.weight", "head.bias", "head.weight"]


def _state(prefix, keys=KEYS):
    return {f"{prefix}{k}": torch.zeros(1) for k in keys}


@pytest.mark.parametrize(
    ("prefix", "stripped"),
    [("", ""), ("module.", "module."), ("_orig_mod.", "_orig_mod."), ("_orig_mod.module.", "_orig_mod.module.")],
)
def test_match_state_strips_the_prefixes_of_wrappers(prefix, stripped):
    m = match_state(_state(prefix), {"plain": KEYS}, "'w'", "")
    assert (m.target, m.stripped, sorted(m.state)) == ("plain", stripped, KEYS)


def test_match_state_takes_one_lightning_attribute_and_ignores_the_rest_of_the_module():
    state = {**_state("net."), "criterion.weight": torch.ones(3)}
    m = match_state(state, {"harden": ["mean", "std", *(f"model.{k}" for k in KEYS)], "plain": KEYS}, "'w'", "")
    assert (m.target, m.stripped, sorted(m.state)) == ("plain", "net.", KEYS)


def test_match_state_refuses_two_attributes_that_both_fit():
    with pytest.raises(harden.ModelError, match=r"got several that fit \(under 'student\.', 'teacher\.'\)"):
        match_state({**_state("teacher."), **_state("student.")}, {"plain": KEYS}, "'w'", "")


def test_match_state_without_a_match_is_one_line_naming_missing_and_unexpected_keys():
    state = _state("", ["features.0.weight", "fc.bias", "fc.weight"])
    with pytest.raises(harden.ModelError) as info:
        match_state(state, {"plain": KEYS}, "'w.pth'", "save the right one")
    assert str(info.value) == (
        "expected the model's keys in 'w.pth', got 2 missing (first: 'head.bias', 'head.weight') and 2 unexpected "
        "(first: 'fc.bias', 'fc.weight'); save the right one"
    )


def test_check_shapes_names_the_first_mis_shaped_tensor_and_passes_equal_shapes():
    check_shapes({"a": torch.zeros(2, 3)}, {"a": torch.ones(2, 3)}, "'w'", "")
    with pytest.raises(harden.ModelError, match=r"got 2 mis-shaped \(first: 'a' is \(5, 3\) in the file, \(10, 3\)"):
        check_shapes(
            {"a": torch.zeros(5, 3), "b": torch.zeros(1)}, {"a": torch.zeros(10, 3), "b": torch.zeros(2)}, "'w'", ""
        )


def test_timm_normalization_reads_a_timm_models_pretrained_config():
    net = tiny_vit()
    mean, std = net.pretrained_cfg["mean"], net.pretrained_cfg["std"]
    assert timm_normalization(net, 3) == (tuple(mean), tuple(std))
    (m1,), (s1,) = timm_normalization(net, 1)
    assert m1 == pytest.approx(sum(mean) / 3) and s1 == pytest.approx(sum(std) / 3)
    assert timm_normalization(net, 2) is None and timm_normalization(TinyMLP(), 3) is None
