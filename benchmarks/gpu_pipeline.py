"""Step 3 of ``make gpu-check``: ``harden run`` of the GPU policy, and its ONNX model against its torch model.

After ``harden run`` of the GPU policy, the torch model (``model.safetensors``) and the exported
``model.onnx`` (and its float16 conversion) must give the same logits on the same device, on
clean test images and on PGD-20 examples of the torch model (they sit near decision boundaries,
where a small numeric difference flips a class). On CUDA the ONNX sessions run on onnxruntime's
CUDA execution provider and take torch CUDA tensors through IO binding, as
:class:`harden.runtime.OnnxClassifier` does for users.

Tolerances, from the arithmetic:

- float32 ONNX vs float32 torch: ``max(export.parity_atol, 1e-5 * max(1, max |logit|))`` (the
  export's own 1e-4 for logits up to 10). Both sides run float32 with TensorFloat-32 off (torch's
  cuDNN convolutions default to TF32; harden's sessions keep ``use_tf32`` off unless asked).
  Float32's unit roundoff is 2**-24 (6e-8); the two sides differ in summation order, in the
  convolution algorithm (onnxruntime searches cuDNN's, some of them Winograd or FFT, which lose a
  few bits) and in BatchNorm folded into the weights, so a relative bound of 1e-5 (about 170
  unit roundoffs over a dozen layers) is the float32 bound scaled to the logits' size.
- float16 ONNX vs float32 torch: ``1e-2 * max(1, max |logit|)``. Float16's unit roundoff is 2**-11
  (4.9e-4); weights and activations are rounded once per layer, about 12 layers deep in a
  ResNet-10-T, so relative errors of about 12 * 4.9e-4 = 5.9e-3 of the logit scale add up; 1e-2
  leaves headroom for the accumulation.
- Class agreement is required on every example whose top-2 logit gap (torch) exceeds twice the
  tolerance; closer calls may flip on any rounding and are counted, not failed.

The TF32 session (onnxruntime's default ``use_tf32``) is measured too, as information: TF32
rounds inputs to a 10-bit mantissa, so it is expected outside the float32 bound.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from gpu_steps import GPU_POLICY, ROOT, Check, Step, tail

import harden
from harden.attacks import ATTACKS
from harden.data import eval_batches
from harden.quantize import to_fp16
from harden.runtime import CUDA, load_onnx
from harden.train import load_trained

FP16_REL = 1e-2


FP32_REL = 1e-5


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """Float32 convolutions and matrix products in full float32 on CUDA (restored on exit).

    Uses ``fp32_precision = "ieee"`` where torch has it (2.9 and later), else the older
    ``allow_tf32`` flags: mixing the two APIs is an error in recent torch.

    Example:
        >>> with no_tf32():
        ...     pass
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        mm = torch.backends.cuda.matmul
        saved = (conv.fp32_precision, mm.fp32_precision)
        conv.fp32_precision, mm.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            conv.fp32_precision, mm.fp32_precision = saved
        return
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def compare(out: torch.Tensor, ref: torch.Tensor, tol: float | None) -> dict[str, Any]:
    """Largest logit difference, and class agreement on the examples that are not near-ties.

    Example:
        >>> ref = torch.tensor([[2.0, 0.0], [1.0, 0.99995]])
        >>> r = compare(ref + 1e-5, ref, 1e-4)
        >>> r["ok"], r["decided"], r["near_ties"], r["disagree_decided"]
        (True, 1, 1, 0)
    """
    diff = float((out.float() - ref.float()).abs().max())
    top2 = ref.float().topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    decided = gap > 2 * (tol if tol is not None else 0.0)
    disagree = out.argmax(1) != ref.argmax(1)
    row = {
        "max_abs_diff": diff,
        "tolerance": tol,
        "examples": len(ref),
        "argmax_agreement": float((~disagree).float().mean()),
        "decided": int(decided.sum()),
        "near_ties": int((~decided).sum()),
        "disagree_decided": int((disagree & decided).sum()),
    }
    row["ok"] = None if tol is None else bool(diff <= tol and row["disagree_decided"] == 0)
    return row


def check_parity(run_dir: Path, policy: harden.Policy, device: str, n: int) -> dict[str, Any]:
    """Compare the run's torch model with its ONNX sessions (fp32, fp32+TF32, fp16) on ``device``.

    Returns a JSON-ready dict: ``rows`` (one per session and input kind, with ``ok`` True/False,
    or None for the informational TF32 rows), ``providers`` per session, and ``problems`` (one
    line each; empty when every bound held and every session ran where it was asked to).
    """
    dev = torch.device(device)
    model, bundle = load_trained(policy, run_dir / "model.safetensors")
    model = model.to(dev).eval()
    xs, ys = zip(*eval_batches(bundle.test, policy.data.eval_batch_size, n), strict=True)
    x, y = torch.cat(xs)[:n].to(dev), torch.cat(ys)[:n].to(dev)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(policy.seed)
        x_adv = ATTACKS.get("pgd")(policy.threat, {"steps": 20})(model, x, y)
    with no_tf32(), torch.no_grad():
        refs = {"clean": model(x), "adversarial": model(x_adv)}
    inputs = {"clean": x, "adversarial": x_adv}
    onnx32 = run_dir / "model.onnx"
    onnx16 = to_fp16(onnx32, run_dir / "model-fp16.onnx")
    scale = max(1.0, max(float(r.abs().max()) for r in refs.values()))
    sessions = [
        ("fp32", onnx32, False, max(policy.export.parity_atol, FP32_REL * scale)),
        ("fp32 + TF32", onnx32, True, None),
        ("fp16", onnx16, False, FP16_REL * scale),
    ]
    rows, providers, problems = [], {}, []
    for name, path, tf32, tol in sessions:
        if tf32 and dev.type != "cuda":
            continue  # TF32 exists on CUDA only
        clf = load_onnx(path, "cuda" if dev.type == "cuda" else "cpu", tf32=tf32)
        providers[name] = clf.providers
        if dev.type == "cuda" and clf.providers[0] != CUDA:
            problems.append(f"{name} session runs on {clf.providers}, not on {CUDA}")
        elif dev.type == "cuda":
            asked = "1" if tf32 else "0"
            got = clf.session.get_provider_options().get(CUDA, {}).get("use_tf32")
            if got != asked:  # a rejected option makes onnxruntime retry with its defaults (TF32 on)
                problems.append(f"{name} session has use_tf32={got!r}, asked {asked!r}")
        for kind, inp in inputs.items():
            out = clf.predict_logits(inp)  # a CUDA tensor goes through IO binding
            if out.device != inp.device:
                problems.append(f"{name} {kind}: logits came back on {out.device}, not {inp.device}")
            row = {"session": name, "inputs": kind, **compare(out, refs[kind], tol)}
            rows.append(row)
            if row["ok"] is False:
                problems.append(
                    f"{name} {kind}: max |Δlogit| {row['max_abs_diff']:.3g} (bound {tol:.3g}), "
                    f"{row['disagree_decided']} decided example(s) disagree"
                )
    robust = float((refs["adversarial"].argmax(1) == y).float().mean())
    return {
        "device": str(dev),
        "n": len(y),
        "pgd20_accuracy": robust,
        "rows": rows,
        "providers": providers,
        "problems": problems,
    }


# ---------------------------------------------------------------- the step
def dry_policy(source: Path) -> dict[str, Any]:
    """The GPU policy made tiny and put on the CPU: same objectives, attacks and precision, little work.

    Example:
        >>> p = dry_policy(GPU_POLICY)
        >>> p["device"], p["train"]["epochs"], p["train"]["precision"], p["data"]["train_limit"]
        ('cpu', 1, 'bf16', 256)
    """
    raw = yaml.safe_load(source.read_text())
    raw["name"] = raw["name"] + "-dry"
    raw["device"] = "cpu"
    raw["data"].update({"train_limit": 256, "test_limit": 128, "batch_size": 64, "eval_batch_size": 64})
    raw["train"].update({"epochs": 1, "warmup_epochs": 0, "probe_examples": 32, "probe_steps": 2})
    for obj in raw["objectives"]:
        if "steps" in obj.get("params", {}):
            obj["params"]["steps"] = 2
        if obj["name"] == "mi":  # its estimators' warm-up and terms in the one epoch
            obj["params"]["start_epoch"] = 0
    small = {
        "pgd": {"steps": 5},
        "apgd_ce": {"steps": 10},
        "apgd_t": {"steps": 10, "n_target_classes": 2},
        "transfer": {"epochs": 1, "steps": 5},
        "square": {"n_queries": 20},
        "noise": {"samples": 2},
        "iwd": {"steps": 3, "stride": 2},
    }
    for atk in raw["verify"]["attacks"]:
        atk.setdefault("params", {}).update(small.get(atk["name"], {}))
        if "n_examples" in atk:
            atk["n_examples"] = 8
    raw["verify"].update({"n_examples": 64, "check_examples": 32, "check_steps": 5})
    raw["export"].update({"parity_examples": 32, "verify_examples": 32})
    raw["certify"].update({"n0": 10, "n": 100, "n_examples": 8, "batch_size": 100})
    return raw


def step_pipeline(c: Check, limit: float) -> Step:
    """``harden run`` of the GPU policy, ``verify --onnx`` on the session, then torch/ONNX parity."""
    device = "cuda" if c.cuda else "cpu"
    if c.cuda:
        policy_file = GPU_POLICY
    else:
        policy_file = c.out / "mnist-gpu-dry.yaml"
        policy_file.write_text(yaml.safe_dump(dry_policy(GPU_POLICY), sort_keys=False))
    policy = harden.load_policy(policy_file)
    run_dir = c.out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.monotonic()
    reserve = 45.0 if c.cuda else 60.0  # for verify --onnx and the parity check after the run
    rc, text = c.call(
        "pipeline", [c.python, "-m", "harden", "run", str(policy_file), "--out", str(run_dir), "-q"], limit - reserve
    )
    data: dict[str, Any] = {
        "policy": str(policy_file.relative_to(ROOT) if policy_file.is_relative_to(ROOT) else policy_file),
        "run_exit": rc,
        "run_seconds": time.monotonic() - t0,
    }
    if rc != 0:
        return Step("pipeline", "FAIL", 0.0, f"harden run exited {rc}: {tail(text, 2)}", data)
    cert = json.loads((run_dir / "certificate.json").read_text())
    black_box = cert.get("onnx_black_box") or {}
    data["certificate"] = {k: cert.get(k) for k in ("verdict", "clean_accuracy", "robust_accuracy", "n", "timings")}
    data["certificate"]["onnx_black_box_providers"] = black_box.get("providers")
    problems = []
    if c.cuda and "CUDAExecutionProvider" not in (black_box.get("providers") or []):
        problems.append(f"harden run attacked the ONNX session on {black_box.get('providers')}, not on CUDA")
    rc, text = c.call(
        "pipeline",
        [
            c.python,
            "-m",
            "harden",
            "verify",
            str(policy_file),
            "--out",
            str(run_dir),
            "--onnx",
            str(run_dir / "model.onnx"),
            "--onnx-device",
            device,
            "-q",
        ],
        limit - (time.monotonic() - t0) - 15.0,
    )
    if rc != 0:
        problems.append(f"harden verify --onnx --onnx-device {device} exited {rc}: {tail(text)}")
    else:
        onnx_rep = json.loads((run_dir / "report-onnx.json").read_text())
        data["verify_onnx"] = {k: onnx_rep.get(k) for k in ("clean_accuracy", "robust_accuracy", "n", "onnx")}
    try:
        parity = check_parity(run_dir, policy, device, 256 if c.cuda else 32)
    except harden.HardenError as exc:
        parity = {"problems": [f"parity: {exc}"], "rows": []}
    data["parity"] = parity
    problems += parity["problems"]
    worst = {
        r["session"]: max((q["max_abs_diff"] for q in parity["rows"] if q["session"] == r["session"]), default=0)
        for r in parity["rows"]
    }
    detail = (
        "; ".join(problems)
        if problems
        else (
            f"run {data['run_seconds']:.0f} s: clean {cert['clean_accuracy']:.1%}, robust {cert['robust_accuracy']:.1%} "
            f"({cert['verdict']}); ONNX on {black_box.get('providers', ['-'])[0]}; max |Δlogit| "
            + ", ".join(f"{k} {v:.2g}" for k, v in worst.items())
        )
    )
    return Step("pipeline", "FAIL" if problems else "PASS", 0.0, detail, data)
