"""Inference throughput: torch eager against onnxruntime (float32, int8, float16) on the demo model.

The demo model is the demo policy's timm ResNet-10-T on 1x28x28 MNIST, 10 classes; with
``runs/demo/model.safetensors`` present its trained weights are used, else a seeded random
init (throughput does not depend on the weights; parity and accuracy do). It is exported with
``harden.export_onnx`` and converted with ``harden.quantize.to_int8`` / ``to_fp16``. Throughput
is images per second at each batch size: the median of ``--repeats`` timed runs after a
warm-up, each run a loop of calls lasting about ``--seconds``. torch runs in eval mode under
``torch.no_grad``; onnxruntime sessions get as many intra-op threads as torch has. Ratios are
against torch eager at the same batch on the same device.

Parity and accuracy of each ONNX model are measured through onnxruntime (CPU) on the first
``--examples`` mnist-5k test images: max |logit difference| and argmax agreement against the
float32 torch model; clean accuracy, accuracy on the float32 torch model's PGD-10 examples
(transfer) and under Gaussian noise in the demo's threat model (``harden.quantize.measure_converted``).

Sizes (times on 2 cores, CPU rows):

- ``small`` (default, about a minute): batches 1, 64 and 256, median of 5 runs of ~0.5 s, parity and
  accuracy on 256 test images.
- ``full`` (~5 min): batches 1, 64 and 256, median of 10 runs of ~2 s, parity and accuracy on
  1,000 test images.

``--batches``, ``--repeats``, ``--seconds`` and ``--examples`` override the size's values (and
then appear in the reproduce command and the section name, which gets ``-custom``).
``--device cuda`` adds torch CUDA vs onnxruntime CUDA EP rows (fp32 and fp16, TF32 off as in
``harden.load_onnx``, IO binding on GPU tensors), and TensorRT fp32 rows when its provider loads
(the note says why when it does not); the CPU rows are always measured.

    python benchmarks/inference.py                  # small, CPU rows
    python benchmarks/inference.py --size full
    python benchmarks/inference.py --device cuda    # adds torch CUDA vs onnxruntime CUDA EP rows
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, headline, section_name, table, write_section

import harden
from harden.attacks import ATTACKS
from harden.model_load import build_model
from harden.quantize import logit_parity, measure_converted, to_fp16, to_int8

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "runs" / "demo" / "model.safetensors"
SIZES: dict[str, dict[str, Any]] = {
    "small": {"batches": "1,64,256", "repeats": 5, "seconds": 0.5, "examples": 256},
    "full": {"batches": "1,64,256", "repeats": 10, "seconds": 2.0, "examples": 1000},
}
#: options that override a size's value
OVERRIDES = ["batches", "repeats", "seconds", "examples"]


def demo_model(weights: Path | None = WEIGHTS) -> tuple[torch.nn.Module, str]:
    """The demo's ResNet-10-T (``Normalized``, eval mode, CPU) and where its weights came from."""
    policy = harden.load_policy(ROOT / "policies" / "mnist-mixed.yaml")
    torch.manual_seed(0)
    model = build_model(policy.model, 10, 1)
    source = "random init (no runs/demo/model.safetensors)"
    if weights is not None and Path(weights).is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(weights)))
        shown = Path(weights).resolve()
        shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
        source = f"trained demo weights ({shown})"
    return model.eval(), source


def rate(
    fn: Callable[[], Any], batch: int, repeats: int, seconds: float, sync: Callable[[], None] = lambda: None
) -> float:
    """Images per second of ``fn`` (one batch per call): median of ``repeats`` timed loops after warm-up."""
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, round(seconds / once))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / calls)
    return batch / statistics.median(times)


def ort_session(path: Path, providers: list[str], threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def cpu_rows(
    model: torch.nn.Module, paths: dict[str, Path], batches: list[int], repeats: int, seconds: float
) -> list[dict[str, Any]]:
    """Throughput of torch eager and each ONNX model on the CPU."""
    threads = torch.get_num_threads()
    out = []
    for batch in batches:
        x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
        xn = x.numpy()

        def torch_fn(x: torch.Tensor = x) -> Any:
            with torch.no_grad():
                return model(x)

        ref = rate(torch_fn, batch, repeats, seconds)
        out.append({"device": "cpu", "backend": "torch eager", "batch": batch, "images_per_s": ref, "ratio": 1.0})
        print(out[-1], flush=True)
        for name, path in paths.items():
            try:
                sess = ort_session(path, ["CPUExecutionProvider"], threads)
            except Exception as exc:  # fp16 kernels missing on this CPU build
                out.append({"device": "cpu", "backend": f"onnxruntime {name}", "batch": batch, "error": str(exc)[:120]})
                continue
            r = rate(lambda sess=sess, xn=xn: sess.run(["logits"], {"pixels": xn}), batch, repeats, seconds)
            out.append(
                {"device": "cpu", "backend": f"onnxruntime {name}", "batch": batch, "images_per_s": r, "ratio": r / ref}
            )
            print(out[-1], flush=True)
    return out


def cuda_sessions(paths: dict[str, Path]) -> tuple[dict[str, Any], list[str]]:
    """onnxruntime sessions on the GPU: CUDA EP fp32/fp16 (TF32 off, as ``harden.load_onnx``), TensorRT fp32.

    Returns the sessions that run where they were asked to, and one note per one that does not
    (TensorRT needs its own libraries, ``libnvinfer``; without them onnxruntime falls back).
    """
    import onnxruntime as ort

    cuda = ("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "0"})
    wanted: dict[str, tuple[Path, list[Any]]] = {
        f"CUDA EP {name}": (path, [cuda]) for name, path in paths.items() if name != "int8"
    }  # dynamic quantization's integer ops have no CUDA kernels
    notes: list[str] = []
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        # one engine for every batch from 1 to 256 (else TensorRT builds one per shape, in the timing)
        trt = {
            "device_id": "0",
            "trt_profile_min_shapes": "pixels:1x1x28x28",
            "trt_profile_opt_shapes": "pixels:64x1x28x28",
            "trt_profile_max_shapes": "pixels:256x1x28x28",
        }
        wanted["TensorRT fp32"] = (paths["fp32"], [("TensorrtExecutionProvider", trt), cuda])
    else:
        notes.append("TensorRT: onnxruntime lists no TensorrtExecutionProvider")
    sessions = {}
    for name, (path, providers) in wanted.items():
        first = providers[0] if isinstance(providers[0], str) else providers[0][0]
        try:
            sess = ort_session(path, providers, 1)
        except Exception as exc:
            notes.append(f"{name}: {str(exc).splitlines()[0][:160]}")
            continue
        if sess.get_providers()[0] != first:
            notes.append(f"{name}: asked for {first}, onnxruntime runs {sess.get_providers()} (a silent fallback)")
            continue
        sessions[name] = sess
    return sessions, notes


def cuda_rows(
    model: torch.nn.Module, paths: dict[str, Path], batches: list[int], repeats: int, seconds: float
) -> tuple[list[dict[str, Any]], str | None]:
    """Throughput of torch eager on CUDA and of onnxruntime's CUDA EP / TensorRT (IO binding, tensors on the GPU).

    Returns the rows and a note: why there are no rows (no usable GPU), or which GPU sessions
    did not run (TensorRT without its libraries, say).
    """
    import onnxruntime as ort

    if not torch.cuda.is_available():
        return [], "no GPU: torch.cuda.is_available() is False, CUDA rows skipped"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return [], "no CUDA in onnxruntime: CUDAExecutionProvider not available, CUDA rows skipped"
    dev = torch.device("cuda")
    gpu_model = copy.deepcopy(model).to(dev).eval()
    sessions, notes = cuda_sessions(paths)
    out = []
    for batch in batches:
        x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch)).to(dev)

        def torch_fn(x: torch.Tensor = x) -> Any:
            with torch.no_grad():
                return gpu_model(x)

        sync = torch.cuda.synchronize
        ref = rate(torch_fn, batch, repeats, seconds, sync)
        out.append({"device": "cuda", "backend": "torch eager", "batch": batch, "images_per_s": ref, "ratio": 1.0})
        print(out[-1], flush=True)
        for name, sess in sessions.items():
            logits = torch.empty(batch, 10, device=dev)
            binding = sess.io_binding()
            binding.bind_input("pixels", "cuda", 0, np.float32, tuple(x.shape), x.data_ptr())
            binding.bind_output("logits", "cuda", 0, np.float32, tuple(logits.shape), logits.data_ptr())
            r = rate(lambda sess=sess, b=binding: sess.run_with_iobinding(b), batch, repeats, seconds, sync)
            out.append(
                {
                    "device": "cuda",
                    "backend": f"onnxruntime {name}",
                    "batch": batch,
                    "images_per_s": r,
                    "ratio": r / ref,
                }
            )
            print(out[-1], flush=True)
    return out, "; ".join(notes) or None


def accuracy_rows(
    model: torch.nn.Module, paths: dict[str, Path], n: int, threat: harden.ThreatModel
) -> list[dict[str, Any]]:
    """Parity against the float32 torch model and re-measured accuracy of each ONNX model."""
    from harden.data import load_data

    policy = harden.load_policy(ROOT / "policies" / "mnist-mixed.yaml")
    test = load_data(policy.data).test
    xs, ys = zip(*(test[i] for i in range(min(n, len(test)))), strict=True)
    x, y = torch.stack(xs).float(), torch.tensor([int(v) for v in ys])
    pgd = ATTACKS.get("pgd")(threat, {"steps": 10})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x_adv = pgd(model, x, y)
    with torch.no_grad():
        torch_clean = float((model(x).argmax(1) == y).float().mean())
        torch_adv = float((model(x_adv).argmax(1) == y).float().mean())
    out = [{"model": "torch fp32", "clean": torch_clean, "transfer": torch_adv, "noise": None}]
    for name, path in paths.items():
        try:
            diff, agree = logit_parity(path, model, x)
            adv_diff, adv_agree = logit_parity(path, model, x_adv)
            acc = measure_converted(path, x, y, threat, adversarial=x_adv, noise_samples=10)
        except harden.ExportError as exc:
            out.append({"model": f"onnx {name}", "error": str(exc)[:120]})
            continue
        out.append(
            {
                "model": f"onnx {name}",
                "max_abs_diff": diff,
                "argmax_agreement": agree,
                "adv_max_abs_diff": adv_diff,
                "adv_argmax_agreement": adv_agree,
                "clean": acc.clean_accuracy,
                "transfer": acc.transfer_accuracy,
                "noise": acc.noise_accuracy,
            }
        )
        print(out[-1], flush=True)
    return out


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``main`` parses it; tests inspect it)."""
    ap = base_parser(__doc__, SIZES, "cuda adds GPU rows (CPU rows always)", ["cpu", "cuda"])
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: the size's, 1,64,256)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per cell; the median is reported")
    ap.add_argument("--seconds", type=float, default=None, help="length of one timed run")
    ap.add_argument("--examples", type=int, default=None, help="test images for parity/accuracy (0: skip)")
    ap.add_argument("--weights", type=Path, default=WEIGHTS, help="demo weights (random init when missing)")
    return ap


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    given = [k for k in OVERRIDES if getattr(args, k) is not None]
    for key in OVERRIDES:
        if getattr(args, key) is None:
            setattr(args, key, SIZES[args.size][key])
    batches = [int(b) for b in args.batches.split(",")]
    model, source = demo_model(args.weights)
    threat = harden.load_policy(ROOT / "policies" / "mnist-mixed.yaml").threat
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = harden.export_onnx(model, Path(tmp) / "model.onnx", input_shape=(1, 28, 28)).path
        paths = {
            "fp32": fp32,
            "int8": to_int8(fp32, Path(tmp) / "model-int8.onnx"),
            "fp16": to_fp16(fp32, Path(tmp) / "model-fp16.onnx"),
        }
        sizes = {k: p.stat().st_size for k, p in paths.items()}
        rows = cpu_rows(model, paths, batches, args.repeats, args.seconds)
        gpu_note = None
        if args.device == "cuda":
            gpu, gpu_note = cuda_rows(model, paths, batches, args.repeats, args.seconds)
            rows += gpu
            if gpu_note:
                print(gpu_note, flush=True)
        accs = accuracy_rows(model, paths, args.examples, threat) if args.examples else []

    eager = {(r["device"], r["batch"]): r for r in rows if r["backend"].startswith("torch") and "images_per_s" in r}
    heads = [
        headline(
            f"{r['backend']} images/s vs torch eager ({r['device']}, batch {r['batch']})",
            f"{r['images_per_s']:,.0f}",
            f"{eager[(r['device'], r['batch'])]['images_per_s']:,.0f}",
            f"{r['ratio']:.2f}x",
            "throughput ratio (higher is faster)",
        )
        for r in rows
        if "ratio" in r
        and "images_per_s" in r
        and (r["device"], r["batch"]) in eager
        and r is not eager[(r["device"], r["batch"])]
    ]
    thr = [
        [
            r["device"],
            r["backend"],
            str(r["batch"]),
            f"{r['images_per_s']:,.0f}" if "images_per_s" in r else f"failed: {r['error']}",
            f"{r['ratio']:.2f}x" if "ratio" in r else "-",
        ]
        for r in rows
    ]
    lines = [
        f"Model: the demo's timm ResNet-10-T, 1x28x28, 10 classes ({source}); ONNX sizes: "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items())
        + f". Median of {args.repeats} timed runs of ~{args.seconds:g} s after warm-up; onnxruntime intra-op "
        f"threads = torch threads ({torch.get_num_threads()}). Ratio: against torch eager at the same batch "
        "and device. CUDA rows use IO binding (inputs and logits stay on the GPU); int8 has no CUDA kernels.",
        "",
        *table(["device", "backend", "batch", "images/s", "vs torch eager"], thr),
        "",
    ]
    if gpu_note:
        lines += [gpu_note + ".", ""]
    if accs:
        lines += [
            f"Parity and accuracy on the first {args.examples} mnist-5k test images, through onnxruntime (CPU). "
            f"Transfer: the float32 torch model's PGD-10 examples ({threat.norm}, eps={threat.eps}); noise: worst "
            "of 10 Gaussian draws in the same ball. Parity is against the float32 torch model, on clean / PGD inputs.",
            "",
            *table(
                ["model", "max abs diff (clean / adv)", "argmax agreement (clean / adv)", "clean", "transfer", "noise"],
                [
                    [
                        a["model"],
                        f"{a['max_abs_diff']:.2e} / {a['adv_max_abs_diff']:.2e}" if "max_abs_diff" in a else "-",
                        f"{_pct(a.get('argmax_agreement'))} / {_pct(a.get('adv_argmax_agreement'))}"
                        if "argmax_agreement" in a
                        else a.get("error", "-"),
                        _pct(a.get("clean")),
                        _pct(a.get("transfer")),
                        _pct(a.get("noise")),
                    ]
                    for a in accs
                ],
            ),
            "",
        ]
    cmd = f"python benchmarks/inference.py --size {args.size} --device {args.device}"
    cmd += "".join(f" --{key} {getattr(args, key)}" for key in given)
    if Path(args.weights) != WEIGHTS:
        cmd += f" --weights {args.weights}"
    return write_section(
        section_name("inference", args.size, args.device, "custom" if given else ""),
        f"Inference throughput ({args.size}, {args.device})",
        cmd,
        lines,
        {
            "results": rows,
            "accuracy": accs,
            "weights": source,
            "onnx_bytes": sizes,
            "gpu": gpu_note or ("ok" if args.device == "cuda" else "not requested"),
            "size": args.size,
            "device": args.device,
        },
        results=args.results,
        headlines=heads,
    )


if __name__ == "__main__":
    print(main())
