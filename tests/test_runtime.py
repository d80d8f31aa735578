"""harden.runtime (load_onnx, OnnxClassifier, OnnxModule) on tiny models; verify_onnx is in tests/test_verify_onnx.py."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

import harden
from harden.attacks import ATTACKS, run_suite
from harden.errors import DataError, ExportError, InputError, ModelError
from harden.models import Normalized
from harden.runtime import CPU, CUDA, TRT, OnnxModule, load_onnx, providers_for

THREAT = harden.ThreatModel(norm="linf", eps=0.1)


# ---------------------------------------------------------------- inference
@pytest.mark.parametrize("batch_size", [7, 256])
def test_logits_match_torch_for_numpy_and_torch_inputs(clf, trained, data, batch_size):
    x = data[0]
    with torch.no_grad():
        ref = trained(x)
    got_np = clf.predict_logits(x.numpy(), batch_size=batch_size)
    assert isinstance(got_np, np.ndarray) and got_np.dtype == np.float32 and got_np.shape == (48, 3)
    np.testing.assert_allclose(got_np, ref.numpy(), atol=1e-4, rtol=0)
    got_t = clf.predict_logits(x, batch_size=batch_size)
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == torch.float32 and got_t.device == x.device
    assert got_t.grad_fn is None and not got_t.requires_grad
    torch.testing.assert_close(got_t, ref, atol=1e-4, rtol=0)


def test_predict_is_argmax(clf, data):
    x = data[0]
    pred_t = clf.predict(x, batch_size=5)
    assert pred_t.dtype == torch.int64 and torch.equal(pred_t, clf.predict_logits(x).argmax(1))
    pred_np = clf.predict(x.numpy(), batch_size=5)
    assert pred_np.dtype == np.int64 and np.array_equal(pred_np, pred_t.numpy())


def test_attributes_and_repr(clf, onnx_path):
    assert clf.path == onnx_path
    assert clf.providers == [CPU] and clf.device == "cpu" and clf.fallback_reason is None
    assert (clf.input_name, clf.output_name, clf.input_shape, clf.num_classes) == ("pixels", "logits", (1, 8, 8), 3)
    assert clf.metadata["input_range"] == "[0, 1]" and clf.metadata["input_layout"] == "NCHW"
    assert clf.torch_device == torch.device("cpu")
    assert str(onnx_path) in repr(clf) and "CPUExecutionProvider" in repr(clf)


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda x: x.numpy().astype(np.float64), "expected float32 pixels, got float64"),
        (lambda x: x.double(), "expected float32 pixels, got float64"),
        (lambda x: x.repeat(1, 3, 1, 1), "expected images of shape (C, H, W) = 1x8x8"),
        (lambda x: x[:, :, :4, :4], "expected images of shape (C, H, W) = 1x8x8"),
        (lambda x: x[0], "expected a non-empty NCHW batch (4 dims), got shape (1, 8, 8)"),
        (lambda x: x[:0], "expected a non-empty NCHW batch"),
        (lambda x: torch.where(x > 0.5, torch.tensor(float("nan")), x), "expected finite pixels, got NaN"),
        (lambda x: x * 255, "expected pixels in [0, 1], got values in"),
        (lambda x: x.numpy() - 0.5, "expected pixels in [0, 1], got values in"),
        (lambda x: x.tolist(), "expected a numpy array or torch tensor of pixels, got list"),
        (lambda x: torch.empty(2, 1, 8, 8, device="meta"), "expected a CPU or CUDA tensor, got one on meta"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_message(clf, data, make, phrase):
    with pytest.raises(DataError) as info:
        clf.predict_logits(make(data[0]))
    assert phrase in str(info.value)
    assert isinstance(info.value, ValueError)  # callers who do not know harden catch it too


def test_pixel_errors_are_input_errors(clf, data):
    with pytest.raises(InputError, match="expected pixels in"):  # from the one check, harden.data.check_pixels
        clf.predict(data[0] * 2)
    with pytest.raises(InputError, match="expected float32 pixels, got float16"):
        clf.check_pixels(data[0].half())
    with pytest.raises(harden.ThreatModelError, match="non-empty NCHW"):
        clf.check_pixels(np.zeros((0, 1, 8, 8), np.float32))


def test_bad_batch_size(clf, data):
    with pytest.raises(DataError, match="expected batch_size as an integer >= 1, got 0"):
        clf.predict_logits(data[0], batch_size=0)


# ---------------------------------------------------------------- providers
def test_providers_for():
    everything = [TRT, CUDA, CPU]
    assert providers_for("cpu", everything) == [CPU]
    assert providers_for("cuda", everything, trt=False) == [CUDA, CPU]
    assert providers_for("cuda", everything, trt=True) == [TRT, CUDA, CPU]
    assert providers_for("cuda", [CUDA, CPU], trt=True) == [CUDA, CPU]  # TensorRT not available
    assert providers_for("auto", [CPU], trt=True) == [CPU]
    with pytest.raises(ExportError, match="expected device 'auto', 'cuda' or 'cpu', got 'gpu'"):
        providers_for("gpu", everything)


def test_tensorrt_is_opt_in_through_the_environment(monkeypatch):
    monkeypatch.delenv("HARDEN_TRT", raising=False)
    assert providers_for("cuda", [TRT, CUDA, CPU]) == [CUDA, CPU]
    monkeypatch.setenv("HARDEN_TRT", "1")
    assert providers_for("cuda", [TRT, CUDA, CPU]) == [TRT, CUDA, CPU]
    assert providers_for("auto", [TRT, CUDA, CPU]) == [TRT, CUDA, CPU]


def test_cuda_without_a_working_cuda_is_an_export_error(onnx_path):
    try:
        clf = load_onnx(onnx_path, "cuda")
    except ExportError as exc:
        msg = str(exc)
        assert "expected onnxruntime to run tiny.onnx on CUDA" in msg
        assert "got only ['CPUExecutionProvider'] running" in msg
        assert "device='cpu' or 'auto'" in msg
        if CUDA in ort.get_available_providers():  # onnxruntime-gpu: its own reason is in the message
            assert "CUDA" in msg.split("running:", 1)[1]
        else:
            assert "install onnxruntime-gpu" in msg
    else:
        assert CUDA in clf.providers and clf.device == "cuda"
        pytest.skip("CUDA runs on this machine")


def test_auto_falls_back_to_the_cpu_and_says_so(onnx_path, capfd):
    capfd.readouterr()
    clf = load_onnx(onnx_path, "auto", threads=1)
    if clf.device == "cuda":
        pytest.skip("CUDA runs on this machine")
    assert clf.providers == [CPU] and clf.device == "cpu"
    if CUDA in ort.get_available_providers():
        assert clf.fallback_reason  # listed but not running: the reason is kept ...
        err = capfd.readouterr().err
        assert "Failed to create CUDAExecutionProvider" not in err  # ... and onnxruntime's log not printed
    else:
        assert clf.fallback_reason is None


def test_an_onnxruntime_without_cuda(onnx_path, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU])
    clf = load_onnx(onnx_path, "auto")
    assert clf.providers == [CPU] and clf.fallback_reason is None  # nothing to fall back from
    with pytest.raises(ExportError, match=r"has no CUDA provider .* install onnxruntime-gpu"):
        load_onnx(onnx_path, "cuda")


def test_load_errors(tmp_path, onnx_path):
    with pytest.raises(ExportError, match=r"expected an ONNX file at .*, got no such file"):
        load_onnx(tmp_path / "missing.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="expected an ONNX model onnxruntime can load"):
        load_onnx(junk, "cpu")
    with pytest.raises(ExportError, match="got 'gpu'"):
        load_onnx(onnx_path, "gpu")
    with pytest.raises(ExportError, match="expected threads as an integer >= 1"):
        load_onnx(onnx_path, "cpu", threads=0)


# ---------------------------------------------------------------- OnnxModule and the attacks
def test_onnx_module_refuses_gradients(clf, data):
    net = OnnxModule(clf)
    x, y = data
    assert list(net.parameters()) == []
    with torch.enable_grad():
        out = net(x)
    assert out.grad_fn is None
    with pytest.raises(RuntimeError):  # no graph to go back through
        out.sum().backward()
    with pytest.raises(ModelError, match=r"gradient attacks .* cannot run on an ONNX session"):
        net(x.clone().requires_grad_(True))
    with pytest.raises(ModelError, match="use the gradient-free attacks"):
        ATTACKS.get("pgd")(THREAT, {"steps": 2})(net, x, y)
    with pytest.raises(ModelError, match="expected an OnnxClassifier"):
        OnnxModule(object())  # type: ignore[arg-type]


# per attack, a threat model under which it fools some of the 48 examples and not all of them
# (noise never fools this model inside linf eps <= 0.3; a large l2 ball lets it)
ATTACK_CASES = {
    "square": (harden.ThreatModel(norm="linf", eps=0.15), {"n_queries": 100}),
    "noise": (harden.ThreatModel(norm="l2", eps=3.0), {"samples": 5}),
    "transfer": (THREAT, {"steps": 5}),
}


@pytest.mark.parametrize("name", sorted(ATTACK_CASES))
def test_black_box_attacks_score_the_session_like_the_torch_model(clf, trained, data, name):
    x, y = data
    threat, params = ATTACK_CASES[name]
    reference = Normalized(trained)  # what export_onnx exported (no mean/std: the identity)
    results = []
    for model in (reference, OnnxModule(clf)):
        attack = ATTACKS.get(name)(threat, params)
        if name == "transfer":
            attack.surrogate = reference  # PGD on the torch model, scored on the target
        torch.manual_seed(0)
        results.append(run_suite(model, x, y, [attack]))
    on_torch, on_onnx = results
    assert torch.equal(on_torch.clean_correct, on_onnx.clean_correct)
    assert 0 < on_onnx.robust.sum() < on_onnx.clean_correct.sum()  # the attack decides something
    # The session's logits equal torch's up to ~1e-6, so every decision (fooled or not, Square's
    # "the margin went down") is the same and both runs draw the same random numbers: the
    # outcomes are equal (they are, example by example, on the machines we ran). Only a margin
    # within float error of a tie could branch, so allow one example, never more.
    diff = (on_torch.robust != on_onnx.robust).sum().item()
    assert diff <= 1, (name, on_torch.robust.sum().item(), on_onnx.robust.sum().item())


# ---------------------------------------------------------------- CUDA (pytest -m gpu; skipped without CUDA)
def test_cuda_provider_options_ask_for_float32_unless_tf32(onnx_path, monkeypatch):
    seen = []
    real = ort.InferenceSession

    def recording(path, sess_options=None, providers=None):
        seen.append(providers)
        return real(path, sess_options=sess_options, providers=[CPU])

    monkeypatch.setattr(ort, "InferenceSession", recording)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    load_onnx(onnx_path, "auto")
    load_onnx(onnx_path, "auto", tf32=True)
    assert seen[0] == [(CUDA, {"device_id": "0", "use_tf32": "0"}), CPU]
    assert seen[1] == [(CUDA, {"device_id": "0", "use_tf32": "1"}), CPU]


@pytest.mark.gpu
def test_cuda_session_reads_and_writes_cuda_tensors_through_io_binding(onnx_path, trained, data):
    clf = load_onnx(onnx_path, "cuda")
    assert clf.providers[0] == CUDA and clf.device == "cuda" and clf.torch_device.type == "cuda"
    assert clf.session.get_provider_options()[CUDA]["use_tf32"] == "0"
    x = data[0]
    with torch.no_grad():
        ref = trained(x)
    got = clf.predict_logits(x.cuda(), batch_size=16)
    assert got.device.type == "cuda" and got.dtype == torch.float32
    # float32 on both sides (TF32 off): TinyCNN's logits are O(1) sums of at most 8*8*16 products,
    # so summation order moves them by about 1e3 * 6e-8 = 6e-5 at most; 1e-4 is the export's bound
    torch.testing.assert_close(got.cpu(), ref, atol=1e-4, rtol=0)
    host = clf.predict_logits(x.numpy(), batch_size=16)  # host arrays go through IO binding too
    np.testing.assert_allclose(host, ref.numpy(), atol=1e-4, rtol=0)
    with pytest.raises(DataError, match="expected a tensor on"):
        load_onnx(onnx_path, "cpu").predict_logits(x.cuda())


@pytest.mark.gpu
def test_tf32_is_opt_in_on_cuda(onnx_path, data):
    clf = load_onnx(onnx_path, "cuda", tf32=True)
    assert clf.session.get_provider_options()[CUDA]["use_tf32"] == "1"
    assert clf.predict_logits(data[0].cuda()).shape == (48, 3)


def test_predict_gives_minus_one_for_non_finite_logits(tmp_path):
    from helpers_data import nan_above_half

    clf = load_onnx(nan_above_half(tmp_path / "nan.onnx"), "cpu")
    x = torch.cat([torch.full((2, 1, 8, 8), 0.25), torch.full((3, 1, 8, 8), 0.75)])
    assert clf.predict_logits(x).argmax(1).tolist() == [0, 0, 0, 0, 0]  # the NaN rows' argmax: class 0
    assert clf.predict(x).tolist() == [0, 0, -1, -1, -1]
    pred_np = clf.predict(x.numpy())
    assert isinstance(pred_np, np.ndarray) and pred_np.dtype == np.int64 and pred_np.tolist() == [0, 0, -1, -1, -1]
