"""Which training forwards may move BatchNorm's running statistics when objectives are mixed.

On the demo setting (timm resnet10t, mnist-5k, linf eps 0.3, 5 epochs) we train `pgd_at` alone
and `pgd_at` plus each other objective of `policies/mnist-mixed.yaml` (with that policy's
parameters), with `train.bn_stats` set to `first_forward` (the default: only the PGD view moves
the statistics eval mode uses) and to `every_forward` (clean, IWD and invariance views move
them too), then attack the first test images with PGD-40 followed by APGD-CE (100 steps) on
the survivors. PGD alone misses what the mixture does; APGD exposes it.

    python benchmarks/bn_ablation.py                 # 300 test images: pgd_at, pgd_at + iwd_at (~8 min)
    python benchmarks/bn_ablation.py --size full     # 1,000 images, every variant
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_section

import harden
from harden.attacks import ATTACKS, run_suite
from harden.data import load_data
from harden.policy import load_policy

ROOT = Path(__file__).resolve().parent.parent
SIZES: dict[str, dict[str, Any]] = {
    "small": {
        "n": 300,
        "variants": [
            ("pgd_at", ("pgd_at",), "first_forward"),
            ("pgd_at + iwd_at", ("pgd_at", "iwd_at"), "every_forward"),
            ("pgd_at + iwd_at", ("pgd_at", "iwd_at"), "first_forward"),
        ],
    },
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


def policy_for(keep: tuple[str, ...] | None, bn_stats: str) -> harden.Policy:
    doc = load_policy(ROOT / "policies" / "mnist-mixed.yaml").model_dump(mode="json")
    if keep is not None:
        doc["objectives"] = [o for o in doc["objectives"] if o["name"] in keep]
    doc["train"].update({"probe_examples": 0, "bn_stats": bn_stats})
    return harden.validate_policy(doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    args = ap.parse_args()
    size = SIZES[args.size]
    bundle = load_data(policy_for(None, "first_forward").data)
    xs, ys = zip(*(bundle.test[i] for i in range(size["n"])), strict=True)
    x, y = torch.stack(xs), torch.tensor([int(v) for v in ys])
    rows, data = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, keep, mode) in enumerate(size["variants"]):
            policy = policy_for(keep, mode)
            t0 = time.perf_counter()
            model = harden.fit(None, policy, run_dir=f"{tmp}/{i}", progress=False).model.eval()
            fit_s = time.perf_counter() - t0
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
    lines = [
        f"timm resnet10t, mnist-5k, 5 epochs, seed 0, linf eps 0.3, objectives and parameters from "
        f"`policies/mnist-mixed.yaml`; the first {size['n']} test images; PGD-40, then APGD-CE (100 steps) on "
        "the examples PGD did not fool. `first_forward`: only the batch's first forward (the PGD view of "
        "`pgd_at`, listed first) moves BatchNorm's running statistics; `every_forward`: every view does.",
        "",
        *table(["objectives", "bn_stats", "clean", "PGD-40", "PGD-40 then APGD-CE", "fit s"], rows),
        "",
    ]
    write_section(
        "objectives-bn" if args.size == "small" else "objectives-bn-full",
        f"BatchNorm statistics in mixed training ({args.size})",
        f"python benchmarks/bn_ablation.py --size {args.size}",
        lines,
        {"results": data},
    )


if __name__ == "__main__":
    main()
