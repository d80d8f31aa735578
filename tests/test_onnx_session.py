"""harden.onnx_session: the one onnxruntime session builder (paths, bytes, providers, errors)."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import harden
import harden.runtime
from harden.errors import ExportError
from harden.onnx_session import CPU, CUDA, build_session

ROOT = Path(__file__).resolve().parents[1]


def flatten_model() -> bytes:
    """A two-node graph (pixels NCHW -> Flatten -> logits), built without torch."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["logits"], axis=1)],
        "flatten",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sess") / "flat.onnx"
    path.write_bytes(flatten_model())
    return path


@pytest.mark.parametrize("as_bytes", [False, True])
def test_build_session_from_a_path_or_bytes_runs_on_the_cpu(model_file, as_bytes):
    source = model_file.read_bytes() if as_bytes else model_file
    sess, providers, fallback = build_session(source, "cpu", threads=1)
    assert providers == [CPU] == sess.get_providers() and fallback is None
    x = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2) / 8
    np.testing.assert_array_equal(sess.run(["logits"], {"pixels": x})[0], x.reshape(2, 4))


def test_build_session_errors(model_file, tmp_path):
    with pytest.raises(ExportError, match=r"expected an ONNX file at .*, got no such file"):
        build_session(tmp_path / "missing.onnx")
    with pytest.raises(ExportError, match="expected an ONNX model onnxruntime can load from the given bytes"):
        build_session(b"not a model")
    with pytest.raises(ExportError, match="got 'gpu'"):
        build_session(model_file, "gpu")
    with pytest.raises(ExportError, match="expected threads as an integer >= 1"):
        build_session(model_file, threads=0)


def test_listed_but_not_running_cuda_is_a_fallback_with_a_reason(model_file, monkeypatch):
    real = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    monkeypatch.setattr(ort, "InferenceSession", lambda src, sess_options, providers: real(src, providers=[CPU]))
    _sess, providers, fallback = build_session(model_file, "auto")
    assert providers == [CPU] and fallback  # what runs is read back, not what was asked
    with pytest.raises(ExportError, match=r"expected onnxruntime to run the model on CUDA .* got only \['CPU"):
        build_session(model_file.read_bytes(), "cuda")


def test_runtime_re_exports_the_builder():
    assert harden.runtime.build_session is build_session
    assert harden.runtime.CPU == CPU and harden.runtime.CUDA == CUDA


def test_only_the_builder_creates_sessions():
    """One session builder: no other module of the package calls ``InferenceSession(``."""
    callers = sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "harden").rglob("*.py") if "InferenceSession(" in p.read_text()
    )
    assert callers == ["harden/onnx_session.py"]


def test_a_fallback_reason_prints_as_one_short_line():
    from harden.onnx_session import short_reason

    long = "EP Error: CUDA failure 100: no CUDA-capable device is detected " + "; more" * 80 + "\n  File x.py"
    line = short_reason(long)
    assert "\n" not in line and len(line) == 150 and line.endswith("...")
    assert line.startswith("EP Error: CUDA failure 100")
    assert short_reason("  short reason  \nsecond") == "short reason"
    assert short_reason("") == "no reason given"
    assert short_reason("x" * 30, limit=10) == "x" * 7 + "..."
