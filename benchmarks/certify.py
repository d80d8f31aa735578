"""Certification throughput: randomized smoothing's noisy samples per second on the demo model.

CERTIFY (Cohen et al. 2019) is ``n0 + n`` noisy forward passes per image, so its cost is set by
inference throughput. We measure ``harden.smoothing.smooth_certify`` (noise sampling, batching,
vote counting, Clopper-Pearson bounds) against the reference it cannot beat: the same model's
plain eval-mode forward throughput on batches of the same size (``torch.no_grad``). The ratio
is the overhead of everything smoothing adds around the forward passes.

The demo model is the demo policy's timm ResNet-10-T on 28x28 MNIST; with ``runs/demo``
present its trained weights are used (throughput does not depend on the weights).

Sizes (times on 2 cores), each with n0 = 100, n = 1,000 and noise batches of 128, 256 and 512:

- ``small`` (default, ~20 s): the first 10 test images.
- ``full`` (~2 min): the first 100 test images (the demo's setting).

    python benchmarks/certify.py                              # small, CPU
    python benchmarks/certify.py --size full
    python benchmarks/certify.py --size full --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, headline, section_name, table, timed, write_section

import harden
from harden.data import load_data
from harden.model_load import build_model
from harden.smoothing import smooth_certify

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"small": 10, "full": 100}


def forward_rate(model: torch.nn.Module, x: torch.Tensor, batch: int, repeats: int = 5) -> float:
    """Images per second of plain eval-mode forward passes on batches of ``batch`` images (on ``x``'s device)."""
    xb = x[:1].repeat(batch, 1, 1, 1)
    times = []
    with torch.no_grad():
        model(xb)  # warm-up
        for _ in range(repeats):
            _, took = timed(lambda: model(xb + 0.25 * torch.randn_like(xb)), sync=xb.device)
            times.append(took)
    return batch / statistics.median(times)


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``main`` parses it; tests inspect it)."""
    ap = base_parser(__doc__, SIZES, "cpu (default), cuda or cuda:N: model, data, timing")
    return ap


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    policy = harden.load_policy(ROOT / "policies" / "mnist-mixed.yaml")
    torch.manual_seed(0)
    model = build_model(policy.model, 10, 1)
    weights = ROOT / "runs" / "demo" / "model.safetensors"
    source = "random init"
    if weights.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(weights)))
        source = "trained demo weights (runs/demo)"
    model = model.to(device).eval()
    bundle = load_data(policy.data)
    k = SIZES[args.size]
    xs, ys = zip(*(bundle.test[i] for i in range(k)), strict=True)
    x, y = torch.stack(xs).to(device), torch.tensor([int(v) for v in ys], device=device)
    rows, data = [], []
    heads: list[dict[str, str]] = []
    for batch in (128, 256, 512):
        torch.manual_seed(0)
        res = smooth_certify(model, x, y, sigma=0.25, n0=100, n=1000, alpha=0.001, batch_size=batch, progress=False)
        ref = forward_rate(model, x, batch)
        rate = res.samples_per_second
        rows.append(
            [
                str(batch),
                f"{rate:,.0f}",
                f"{ref:,.0f}",
                f"{ref / rate:.2f}x",
                f"{res.seconds / k:.2f}",
                f"{res.accuracy_at(0.0):.0%}",
            ]
        )
        data.append({"batch": batch, "samples_per_s": rate, "forward_per_s": ref, "seconds": res.seconds})
        heads.append(
            headline(
                f"smoothing CERTIFY, noisy samples/s vs plain forward images/s (batch {batch})",
                f"{rate:,.0f}",
                f"{ref:,.0f}",
                f"{ref / rate:.2f}x",
                "time ratio (overhead)",
            )
        )
        print(rows[-1], flush=True)
    lines = [
        f"CERTIFY with n0 = 100, n = 1,000, sigma = 0.25, alpha = 0.001 on the first {k} mnist-5k test images; "
        f"model: the demo's timm ResNet-10-T ({source}), device {device}. Reference: plain eval-mode forward "
        "throughput of the same model on noisy batches of the same size. Time / ref > 1 is smoothing's overhead.",
        "",
        *table(
            [
                "noise batch",
                "certify samples/s",
                "forward images/s (ref)",
                "time / ref",
                "s per image",
                "smoothed acc.",
            ],
            rows,
        ),
        "",
    ]
    return write_section(
        section_name("certify", args.size, args.device),
        f"Certification throughput ({args.size}, {args.device})",
        f"python benchmarks/certify.py --size {args.size} --device {args.device}",
        lines,
        {"results": data, "weights": source, "size": args.size, "device": args.device},
        results=args.results,
        headlines=heads,
    )


if __name__ == "__main__":
    print(main())
