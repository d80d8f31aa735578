"""harden.quantize: float16 and int8 copies of an exported model and their parity.

Re-measuring a converted model's accuracy (measure_converted) is in tests/test_onnx_accuracy.py.
"""

import importlib.util
import json
import sys
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto

import harden
from harden.quantize import PRECISION_KEY, logit_parity, onnx_logits, onnx_precision, to_fp16, to_int8
from harden.testing import TinyCNN

ROOT = Path(__file__).resolve().parents[1]
# int8: a measured level, not yet derived (max |logit diff| 6e-3 on this TinyCNN, |logits| < 1). A
# derivation would propagate half a quantisation step per tensor (weights max|W|/127, uint8
# activations range/255) through an |W|-forward of the model.
INT8_ATOL = 5e-2


def fp16_tol(ref):
    """fp16 parity bound: 3 layers, each rounding weights, input and output to fp16 (u16 = 2^-11):
    about 9 * u16 * S = 4.4e-3 * S < 1e-2 * S, with S ~ max(1, max |logit|) the logit scale."""
    return 1e-2 * max(1.0, float(ref.abs().max()))


@torch.no_grad()
def undecided(model, x, tol):
    """Rows whose top-2 float32 logit gap is <= 2 * tol: only those may change argmax when every logit
    moves by at most tol (so argmax agreement >= 1 - undecided / n follows from diff <= tol)."""
    top2 = model(x).topk(2, dim=1).values
    return int((top2[:, 0] - top2[:, 1] <= 2 * tol).sum())


def meta_of(path):
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def io_types(path):
    g = onnx.load(str(path)).graph
    return [v.type.tensor_type.elem_type for v in [*g.input, *g.output]]


# --------------------------------------------------------------------------- fp16


def test_fp16_is_valid_keeps_float32_io_and_metadata(exported, tmp_path):
    _model, src, *_ = exported
    out = to_fp16(src, tmp_path / "m16.onnx")
    assert out == tmp_path / "m16.onnx" and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m16.onnx"]  # no temp file left
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    weights = [t for t in proto.graph.initializer if len(t.dims) >= 2]
    assert weights and all(t.data_type == TensorProto.FLOAT16 for t in weights)
    assert io_types(out) == [TensorProto.FLOAT, TensorProto.FLOAT]
    meta = meta_of(out)
    assert meta == {**meta_of(src), PRECISION_KEY: "fp16"}
    assert {"policy_hash", "certificate_verdict", "mean", "std"} <= set(meta)
    assert onnx_precision(out) == "fp16" and onnx_precision(src) == "fp32"
    assert out.stat().st_size < src.stat().st_size


def test_fp16_runs_on_cpu_with_a_dynamic_batch_and_a_looser_parity(exported, tmp_path):
    model, src, x, _y, x_adv = exported
    out = to_fp16(src, tmp_path / "m16.onnx")
    for batch in (1, 7):
        assert onnx_logits(out, x[:batch]).shape == (batch, 3)
    diff, agree = logit_parity(out, model, x)
    adv_diff, adv_agree = logit_parity(out, model, x_adv)
    with torch.no_grad():
        tol, adv_tol = fp16_tol(model(x)), fp16_tol(model(x_adv))
    assert 0 < diff <= tol and agree >= 1 - undecided(model, x, tol) / len(x)
    assert adv_diff <= adv_tol and adv_agree >= 1 - undecided(model, x_adv, adv_tol) / len(x_adv)


# --------------------------------------------------------------------------- int8


@pytest.mark.parametrize("weight_type", ["qint8", "quint8"])
def test_int8_is_valid_integer_graph_with_metadata(exported, tmp_path, weight_type):
    model, src, x, *_ = exported
    out = to_int8(src, tmp_path / "m8.onnx", weight_type=weight_type)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m8.onnx"]  # the pre-processing files are gone
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    assert ops & {"ConvInteger", "MatMulInteger", "DynamicQuantizeLinear"}
    ints = {TensorProto.INT8, TensorProto.UINT8}
    assert any(t.data_type in ints for t in proto.graph.initializer)
    assert io_types(out) == [TensorProto.FLOAT, TensorProto.FLOAT]
    assert meta_of(out) == {**meta_of(src), PRECISION_KEY: "int8"}  # quant_pre_process's own keys dropped
    for batch in (1, 7):
        assert onnx_logits(out, x[:batch]).shape == (batch, 3)
    diff, agree = logit_parity(out, model, x)
    assert 0 < diff <= INT8_ATOL and agree >= 1 - undecided(model, x, INT8_ATOL) / len(x)


def test_int8_without_pre_processing_warns_and_still_quantizes(exported, tmp_path, monkeypatch):
    import onnxruntime.quantization.shape_inference as si

    def broken(*args, **kwargs):
        raise RuntimeError("no symbolic shapes today")

    monkeypatch.setattr(si, "quant_pre_process", broken)
    _model, src, *_ = exported
    with pytest.warns(RuntimeWarning, match="quant_pre_process failed"):
        out = to_int8(src, tmp_path / "m8.onnx")
    assert onnx_precision(out) == "int8"


def test_conversions_overwrite_atomically_and_refuse_bad_sources(exported, tmp_path):
    _model, src, *_ = exported
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    to_int8(src, target)
    assert onnx_precision(target) == "int8"
    with pytest.raises(harden.ExportError, match="already converted to int8"):
        to_fp16(target, tmp_path / "again.onnx")
    with pytest.raises(harden.ExportError, match="already converted to int8"):
        to_int8(target, tmp_path / "again.onnx")
    with pytest.raises(harden.ExportError, match="no such file"):
        to_fp16(tmp_path / "missing.onnx", tmp_path / "x.onnx")
    with pytest.raises(harden.ExportError, match="weight_type"):
        to_int8(src, tmp_path / "x.onnx", weight_type="int4")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(harden.ExportError, match="readable ONNX"):
        to_int8(tmp_path / "junk.onnx", tmp_path / "x.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx", "m.onnx"]


def test_measuring_names_are_importable_from_quantize_and_onnx_accuracy():
    import harden.onnx_accuracy as acc
    import harden.quantize as q

    assert q.measure_converted is acc.measure_converted and q.ConvertedAccuracy is acc.ConvertedAccuracy
    assert q.onnx_logits is acc.onnx_logits and q.logit_parity is acc.logit_parity
    assert q.PRECISION_KEY == harden.export.PRECISION_KEY == "precision"


# --------------------------------------------------------------------------- benchmark smoke test


def load_benchmark():
    path = ROOT / "benchmarks" / "inference.py"
    spec = importlib.util.spec_from_file_location("bench_inference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_inference", module)
    spec.loader.exec_module(module)
    return module


def test_inference_benchmark_runs_tiny(tmp_path):
    bench = load_benchmark()
    assert bench.rate(lambda: None, batch=4, repeats=1, seconds=0.001) > 0
    if not torch.cuda.is_available():
        rows, note = bench.cuda_rows(TinyCNN(), {}, [1], 1, 0.001)
        assert rows == [] and note.startswith("no GPU")
    md = bench.main(
        [
            "--repeats=1",
            "--seconds=0.001",
            "--batches=1,3",
            "--examples=6",
            f"--results={tmp_path}",
            f"--weights={tmp_path / 'none.safetensors'}",
        ]
    )
    assert md == tmp_path / "inference-custom.md"  # overrides never overwrite the standard section
    text = md.read_text()
    assert "random init" in text
    for backend in ("torch eager", "onnxruntime fp32", "onnxruntime int8", "onnxruntime fp16"):
        assert backend in text
    data = json.loads((tmp_path / "inference-custom.json").read_text())
    assert {r["batch"] for r in data["results"]} == {1, 3}
    assert [a["model"] for a in data["accuracy"]] == ["torch fp32", "onnx fp32", "onnx int8", "onnx fp16"]
    assert data["accuracy"][1]["max_abs_diff"] <= 1e-4
