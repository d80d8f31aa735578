"""harden's attacks against torchattacks on the same models and inputs.

For a plainly trained (`ce`) and a PGD-trained (`pgd_at`) model on mnist-5k, robust accuracy and
wall time of PGD-40, APGD-CE (100 steps) and AutoAttack's standard suite (APGD-CE, APGD-T with
9 targets, FAB-T with 9 targets, Square with 5,000 queries, cascaded on the still-robust
examples), harden beside torchattacks. Goal: robust accuracy no higher than torchattacks'
(at least as strong) at no more than 1.0x its time.

Sizes (times on 2 cores); every size runs every row, the standard suite included:

- ``small`` (default, ~3 min): TinyCNN (width 32) trained 4 epochs, linf eps 0.1, the first 100
  test images. Fewer images than ``medium`` only, so that the default fits in a few minutes.
- ``medium`` (~7 min): the same on 200 test images.
- ``full`` (about an hour): timm resnet10t trained 5 epochs, eps 0.3, 1,000 test images (the
  issue's setting).

``--n`` overrides the number of images and ``--skip-standard`` drops the standard-suite rows;
both then appear in the reproduce command and the section name.

    python benchmarks/attacks.py                              # small, CPU
    python benchmarks/attacks.py --size medium
    python benchmarks/attacks.py --size full --device cuda
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
from harden.attacks import ATTACKS, preset_specs, run_suite
from harden.attacks.suite import build_attack
from harden.data import load_data

# A tiny CNN cannot learn PGD-AT at MNIST's eps = 0.3 (it collapses to one class), so the small
# and medium sizes attack at eps = 0.1; the full size is the setting (resnet10t, eps = 0.3).
SIZES: dict[str, dict[str, Any]] = {
    "small": {"model": "harden.testing:TinyCNN", "args": {"width": 32}, "n": 100, "epochs": 4, "eps": 0.1},
    "medium": {"model": "harden.testing:TinyCNN", "args": {"width": 32}, "n": 200, "epochs": 4, "eps": 0.1},
    "full": {"model": "timm:resnet10t", "args": {}, "n": 1000, "epochs": 5, "eps": 0.3},
}
EPS = 0.3  # set from --size in main()


def train(objective: str, size: dict[str, Any], device: str) -> torch.nn.Module:
    params = {"steps": 5} if objective == "pgd_at" else {}
    policy = harden.validate_policy(
        {
            "name": f"bench-{objective}",
            "device": device,
            "model": {"name": size["model"], "args": size["args"]},
            "data": {"name": "mnist-5k", "batch_size": 128},
            "threat": {"eps": EPS},
            "train": {"epochs": size["epochs"], "lr": 0.05, "warmup_epochs": 1, "probe_examples": 0},
            "objectives": [{"name": objective, "params": params}],
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        return harden.fit(None, policy, run_dir=tmp, progress=False).model.eval()


def acc(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def ours(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    threat = harden.ThreatModel(eps=EPS)
    torch.manual_seed(0)
    if name == "PGD-40":
        return acc(model, ATTACKS.get("pgd")(threat, {"steps": 40})(model, x, y), y)
    if name == "APGD-CE":
        return acc(model, ATTACKS.get("apgd_ce")(threat, {"steps": 100})(model, x, y), y)
    attacks = [build_attack(s, threat) for s in preset_specs("standard")]
    return float(run_suite(model, x, y, attacks).robust.float().mean())


def theirs(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    import torchattacks

    torch.manual_seed(0)
    if name == "PGD-40":
        atk = torchattacks.PGD(model, eps=EPS, alpha=2.5 * EPS / 40, steps=40, random_start=True)
    elif name == "APGD-CE":
        atk = torchattacks.APGD(model, norm="Linf", eps=EPS, steps=100, n_restarts=1, loss="ce", seed=0)
    else:
        # torchattacks.AutoAttack(version="standard") builds these four with 10 steps each (the
        # classes' default); the reference settings are 100 steps, so build the cascade here.
        atk = torchattacks.MultiAttack(
            [
                torchattacks.APGD(model, norm="Linf", eps=EPS, steps=100, n_restarts=1, loss="ce", seed=0),
                torchattacks.APGDT(model, norm="Linf", eps=EPS, steps=100, n_restarts=1, n_classes=10, seed=0),
                torchattacks.FAB(
                    model, norm="Linf", eps=EPS, steps=100, n_restarts=1, multi_targeted=True, n_classes=10, seed=0
                ),
                torchattacks.Square(model, norm="Linf", eps=EPS, n_queries=5000, n_restarts=1, seed=0),
            ]
        )
    return acc(model, atk(x, y), y)


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``main`` parses it; tests inspect it)."""
    ap = base_parser(__doc__, SIZES, "cpu (default), cuda or cuda:N: training, attacks, timing")
    ap.add_argument("--skip-standard", action="store_true", help="skip the (slow) standard-suite rows")
    ap.add_argument("--n", type=int, default=None, help="test images (default: the size's)")
    return ap


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    size = dict(SIZES[args.size])
    if args.n is not None:
        size["n"] = args.n
    global EPS
    EPS = size["eps"]
    device = torch.device(args.device)
    bundle = load_data(harden.policy.DataSpec(name="mnist-5k"))
    xs, ys = zip(*(bundle.test[i] for i in range(size["n"])), strict=True)
    x, y = torch.stack(xs).to(device), torch.stack([torch.as_tensor(v) for v in ys]).to(device)
    rows, data = [], []
    heads: list[dict[str, str]] = []
    names = ["PGD-40", "APGD-CE"] + ([] if args.skip_standard else ["standard suite"])
    for objective in ("ce", "pgd_at"):
        torch.manual_seed(0)
        model = train(objective, size, args.device).to(device)
        clean = acc(model, x, y)
        for name in names:
            a_ours, t_ours = timed(lambda n=name, m=model: ours(n, m, x, y), device)
            a_them, t_them = timed(lambda n=name, m=model: theirs(n, m, x, y), device)
            verdict = (
                "at least as strong" if a_ours <= a_them + 1e-9 else f"weaker by {100 * (a_ours - a_them):.1f} pts"
            )
            rows.append(
                [
                    objective,
                    f"{clean:.1%}",
                    name,
                    f"{a_ours:.1%}",
                    f"{a_them:.1%}",
                    verdict,
                    f"{t_ours:.1f}",
                    f"{t_them:.1f}",
                    f"{t_ours / t_them:.2f}x",
                ]
            )
            data.append(
                {
                    "model": objective,
                    "clean": clean,
                    "attack": name,
                    "harden_acc": a_ours,
                    "torchattacks_acc": a_them,
                    "harden_s": t_ours,
                    "torchattacks_s": t_them,
                }
            )
            if objective == "pgd_at":
                heads.append(
                    headline(
                        f"{name} on the pgd_at model: seconds, robust acc. (harden vs torchattacks)",
                        f"{t_ours:.1f} s, {a_ours:.1%}",
                        f"{t_them:.1f} s, {a_them:.1%}",
                        f"{t_ours / t_them:.2f}x",
                        f"time ratio; {verdict}",
                    )
                )
            print(rows[-1], flush=True)
    lines = [
        f"Model: `{size['model']}` trained on mnist-5k ({size['epochs']} epochs) with `ce` and with `pgd_at` (PGD-5); "
        f"{size['n']} mnist-5k test images; linf eps = {EPS}; harden {harden.__version__} vs torchattacks. "
        "Robust accuracy: lower is a stronger attack. Time ratio: harden / torchattacks (goal <= 1.0x). "
        "The standard suite on both sides is APGD-CE (100 steps), APGD-T (100 steps, 9 targets), FAB-T (100 steps, "
        "9 targets) and Square (5,000 queries), each on the examples still robust; torchattacks' own "
        "`AutoAttack(version='standard')` runs its components with 10 steps (their classes' default), so its "
        "cascade is built here from `torchattacks.MultiAttack` with the reference settings.",
        "",
        *table(
            [
                "trained with",
                "clean",
                "attack",
                "harden acc",
                "torchattacks acc",
                "strength",
                "harden s",
                "torchattacks s",
                "time ratio",
            ],
            rows,
        ),
    ]
    cmd = (
        f"python benchmarks/attacks.py --size {args.size} --device {args.device}"
        + (" --skip-standard" if args.skip_standard else "")
        + (f" --n {args.n}" if args.n is not None else "")
    )
    return write_section(
        section_name(
            "attacks",
            args.size,
            args.device,
            f"n{args.n}" if args.n is not None else "",
            "no-standard" if args.skip_standard else "",
        ),
        f"Attacks: harden vs torchattacks ({args.size}, {args.device})",
        cmd,
        lines,
        {"rows": data, "size": args.size, "device": args.device},
        results=args.results,
        headlines=heads,
    )


if __name__ == "__main__":
    print(main())
