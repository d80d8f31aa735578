"""Which training forwards may move BatchNorm's running statistics when objectives are mixed.

On the demo setting (timm resnet10t, mnist-5k, linf eps 0.3, 5 epochs) we train `pgd_at` alone
and `pgd_at` plus each other objective of `policies/mnist-mixed.yaml` (with that policy's
parameters), with `train.bn_stats` set to `first_forward` (the default: only the PGD view moves
the statistics eval mode uses) and to `every_forward` (clean, IWD and invariance views move
them too), then attack the first test images with PGD-40 followed by APGD-CE (100 steps) on
the survivors. PGD alone misses what the mixture does; APGD exposes it.

Sizes (times on 2 cores):

- ``small`` (default; a smoke-scale run, ~3 min): `pgd_at` alone and `pgd_at + iwd_at` with each
  `bn_stats`, 3 epochs on the first 2,048 training images, the first 100 test images. Too short
  a training for the collapse under `every_forward` to be expected to show.
- ``medium`` (~15 min): the same three variants with the policy's 5 epochs on all 4,000 training
  images, the first 300 test images (the setting the README cites).
- ``full`` (hours on a CPU): every objective of the mix paired with `pgd_at`, and the whole mix,
  each with both `bn_stats`; 5 epochs, 1,000 test images.

    python benchmarks/bn_ablation.py                      # small, CPU
    python benchmarks/bn_ablation.py --size medium
    python benchmarks/bn_ablation.py --size full --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, headline, section_name, table, timed, write_section

import harden
from harden.attacks import ATTACKS, run_suite
from harden.data import load_data
from harden.policy_io import load_policy

ROOT = Path(__file__).resolve().parent.parent
_THREE = [
    ("pgd_at", ("pgd_at",), "first_forward"),
    ("pgd_at + iwd_at", ("pgd_at", "iwd_at"), "every_forward"),
    ("pgd_at + iwd_at", ("pgd_at", "iwd_at"), "first_forward"),
]
SIZES: dict[str, dict[str, Any]] = {
    "small": {"n": 100, "epochs": 3, "train_limit": 2048, "variants": _THREE},
    "medium": {"n": 300, "variants": _THREE},
    "full": {
        "n": 1000,
        "variants": [
            ("pgd_at", ("pgd_at",), "first_forward"),
            *[
                (f"pgd_at + {o}", ("pgd_at", o), mode)
                for o in ("iwd_at", "ot_metric", "mi", "jsigr")
                for mode in ("every_forward", "first_forward")
            ],
            ("mixed", None, "every_forward"),
            ("mixed", None, "first_forward"),
        ],
    },
}
SMOKE = (
    "Small is a smoke-scale run (undertrained models, few test images): it shows the script works and wha"
    "t it costs, not whether the effect holds; `--size medium` (kept below when not re-run) is the measurement."
)


def policy_for(
    keep: tuple[str, ...] | None, bn_stats: str, size: dict[str, Any] | None = None, device: str = "cpu"
) -> harden.Policy:
    """`policies/mnist-mixed.yaml` with only the objectives in ``keep`` (None: all) and ``bn_stats``.

    ``size`` may shorten the training (``epochs``, ``train_limit``); ``device`` is the policy's device.
    """
    size = size or {}
    doc = load_policy(ROOT / "policies" / "mnist-mixed.yaml").model_dump(mode="json")
    if keep is not None:
        doc["objectives"] = [o for o in doc["objectives"] if o["name"] in keep]
    for o in doc["objectives"]:  # every term on every step, as when the ablation was measured
        o["every"] = 1
    doc["train"].update({"probe_examples": 0, "bn_stats": bn_stats})
    if "epochs" in size:
        doc["train"]["epochs"] = size["epochs"]
    if "train_limit" in size:
        doc["data"]["train_limit"] = size["train_limit"]
    doc["device"] = device
    return harden.validate_policy(doc)


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``main`` parses it; tests inspect it)."""
    ap = base_parser(__doc__, SIZES, "cpu (default), cuda or cuda:N: training and attacks")
    return ap


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    size = SIZES[args.size]
    device = torch.device(args.device)
    first = policy_for(None, "first_forward", size, args.device)
    bundle = load_data(first.data)
    xs, ys = zip(*(bundle.test[i] for i in range(size["n"])), strict=True)
    x, y = torch.stack(xs).to(device), torch.tensor([int(v) for v in ys], device=device)
    rows, data = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, keep, mode) in enumerate(size["variants"]):
            policy = policy_for(keep, mode, size, args.device)
            fitted, fit_s = timed(
                lambda p=policy, d=f"{tmp}/{i}": harden.fit(None, p, run_dir=d, progress=False), device
            )
            model = fitted.model.to(device).eval()
            torch.manual_seed(0)
            pgd = ATTACKS.get("pgd")(policy.threat, {"steps": 40})
            apgd = ATTACKS.get("apgd_ce")(policy.threat, {"steps": 100})
            res = run_suite(model, x, y, [pgd, apgd])
            r = {
                "variant": label,
                "bn_stats": mode,
                "clean": float(res.clean_correct.float().mean()),
                "pgd40": float(res.still_correct[res.labels[0]].float().mean()),
                "worst": float(res.robust.float().mean()),
                "fit_s": fit_s,
            }
            data.append(r)
            rows.append([label, mode, f"{r['clean']:.1%}", f"{r['pgd40']:.1%}", f"{r['worst']:.1%}", f"{fit_s:.0f}"])
            print(rows[-1], flush=True)
    heads = []
    for r in data:
        other = next((o for o in data if o["variant"] == r["variant"] and o["bn_stats"] == "every_forward"), None)
        if r["bn_stats"] == "first_forward" and other is not None:
            heads.append(
                headline(
                    f"{r['variant']}, PGD-40 then APGD-CE: bn_stats first_forward (default) vs every_forward "
                    f"(n = {size['n']})",
                    f"{r['worst']:.1%}",
                    f"{other['worst']:.1%}",
                    f"{(r['worst'] - other['worst']) * 100:+.1f} pts",
                    "smoke scale: see --size medium" if args.size == "small" else "",
                )
            )
    limit = first.data.train_limit
    lines = [
        "timm resnet10t, mnist-5k"
        + (f" (the first {limit:,} training images)" if limit else "")
        + f", {first.train.epochs} epochs, seed 0, linf eps {first.threat.eps}, objectives and parameters from "
        f"`policies/mnist-mixed.yaml`; the first {size['n']} test images; device {args.device}; PGD-40, then "
        "APGD-CE (100 steps) on the examples PGD did not fool. `first_forward`: only the batch's first forward "
        "(the PGD view of `pgd_at`, listed first) moves BatchNorm's running statistics; `every_forward`: every "
        "view does.",
        "",
        *table(["objectives", "bn_stats", "clean", "PGD-40", "PGD-40 then APGD-CE", "fit s"], rows),
        "",
        *([SMOKE, ""] if args.size == "small" else []),
    ]
    return write_section(
        section_name("objectives-bn", args.size, args.device),
        f"BatchNorm statistics in mixed training ({args.size}, {args.device})",
        f"python benchmarks/bn_ablation.py --size {args.size} --device {args.device}",
        lines,
        {"results": data, "size": args.size, "device": args.device},
        results=args.results,
        headlines=heads,
    )


if __name__ == "__main__":
    print(main())
