"""Cost of the internal Wasserstein distance and of the IWD attack on MNIST-size images.

One IWD evaluation (forward; forward + backward; forward with the clean self-term cached, as
the attack does) on a batch of 28x28 mnist-5k digits against uniform l_inf-0.1 noise, for
patch stride 1 (the default for images <= 32 px) and stride 2; then one full IWD attack call
(default parameters, a TinyCNN trained for 2 epochs) per stride. CPU by default.

Sizes (times on 2 cores):

- ``small`` (default, ~1 min): the IWD evaluation at stride 2 only on a batch of 128; the
  attack (stride 2, 50 steps) on the first 64 of those digits.
- ``full`` (~7 min): strides 2 and 1 on a batch of 128; the attack (stride 2, 50 steps) on all
  128 (the setting of the results measured before sizes existed).

``--batch``, ``--strides``, ``--attack-strides``, ``--attack-n`` and ``--steps`` override the
size's values (and then appear in the reproduce command and the section name).

    python benchmarks/iwd_cost.py                          # small, CPU
    python benchmarks/iwd_cost.py --size full
    python benchmarks/iwd_cost.py --attack-strides 1 2     # also the (slow on CPU) stride-1 attack
    python benchmarks/iwd_cost.py --threads 1 --batch 32
    python benchmarks/iwd_cost.py --size full --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import ot
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, headline, section_name, table, timed, write_section

import harden.ot as hot
from harden.attacks.iwd import IWDAttack
from harden.data import load_data
from harden.policy import DataSpec, ThreatModel
from harden.testing import TinyCNN

SIZES: dict[str, dict[str, Any]] = {
    "small": {"batch": 128, "strides": [2], "attack_strides": [2], "attack_n": 64, "steps": None},
    "full": {"batch": 128, "strides": [2, 1], "attack_strides": [2], "attack_n": None, "steps": None},
}
#: options that override a size's value: (flag, key in SIZES)
OVERRIDES = [
    ("--batch", "batch"),
    ("--strides", "strides"),
    ("--attack-strides", "attack_strides"),
    ("--attack-n", "attack_n"),
    ("--steps", "steps"),
]


def _mnist(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    bundle = load_data(DataSpec(name="mnist-5k"))
    xs, ys = zip(*(bundle.train[i] for i in range(2000)), strict=True)
    xt, yt = zip(*(bundle.test[i] for i in range(n)), strict=True)
    return torch.stack(xs), torch.tensor(ys), torch.stack(xt), torch.tensor(yt)


def _count_iterations() -> list[int]:
    counts: list[int] = []
    original = ot.solve_batch

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        res = original(*args, **kwargs)
        counts.append(int(res.log["n_iter"]) + 1)
        return res

    hot.ot.solve_batch = counting
    return counts


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``main`` parses it; tests inspect it)."""
    ap = base_parser(__doc__, SIZES, "cpu (default), cuda or cuda:N: data, model, IWD, timing")
    ap.add_argument("--batch", type=int, default=None, help="digits per IWD evaluation (default: the size's, 128)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--strides", type=int, nargs="*", default=None, help="IWD strides (default: the size's)")
    ap.add_argument("--attack-strides", type=int, nargs="*", default=None, help="attack strides (default: 2)")
    ap.add_argument("--attack-n", type=int, default=None, help="digits attacked (default: the size's; all: the batch)")
    ap.add_argument("--steps", type=int, default=None, help="attack steps (default: the attack's, 50)")
    return ap


def main(argv: list[str] | None = None) -> Path:
    """Run the measurements, print one line per setting and write the results section."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = dict(SIZES[args.size])
    given = [(flag, key) for flag, key in OVERRIDES if getattr(args, key) is not None]
    cfg.update({key: getattr(args, key) for _, key in given})
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, POT {ot.__version__}, {torch.get_num_threads()} threads, batch {cfg['batch']}, "
        f"device {device}"
    )
    xtr, ytr, x, y = _mnist(cfg["batch"])
    adv = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.1).clamp(0, 1)
    xtr, ytr, x, y, adv = (t.to(device) for t in (xtr, ytr, x, y, adv))
    default_elems = hot.DEFAULT_MAX_ELEMS_CPU if device.type == "cpu" else hot.DEFAULT_MAX_ELEMS
    other_elems = hot.DEFAULT_MAX_ELEMS if device.type == "cpu" else hot.DEFAULT_MAX_ELEMS_CPU
    hot.iwd(x[:2], adv[:2])  # warm-up
    counts = _count_iterations()
    rows: list[list[str]] = []
    data: list[dict[str, object]] = []
    heads: list[dict[str, str]] = []
    for stride in cfg["strides"]:
        p = hot.patches(x[:1], stride=stride).shape[1]
        counts.clear()
        value, fwd = timed(lambda s=stride: hot.iwd(x, adv, stride=s), device)
        iters = sorted(set(counts))
        a = adv.clone().requires_grad_(True)
        _, both = timed(lambda s=stride, a=a: hot.iwd(x, a, stride=s).sum().backward(), device)
        x_self = hot.self_cost(x, stride=stride)
        _, cached = timed(lambda s=stride, c=x_self: hot.iwd(x, adv, stride=s, x_self=c), device)
        _, other = timed(lambda s=stride: hot.iwd(x, adv, stride=s, max_elems=other_elems), device)
        rows.append(
            [
                f"IWD, stride {stride} ({p} patches/image)",
                f"{fwd:.2f}",
                f"{both:.2f}",
                f"{cached:.2f}",
                f"{other:.2f} ({other / fwd:.1f}x)",
                str(iters),
                f"{value.mean():.2e}",
            ]
        )
        heads.append(
            headline(
                f"IWD of {len(x)} images (stride {stride}), s: cached self-term (as the IWD attack runs it) vs recomputed",
                f"{cached:.2f}",
                f"{fwd:.2f}",
                f"{cached / fwd:.2f}x",
            )
        )
        data.append(
            {
                "stride": stride,
                "patches": p,
                "forward_s": fwd,
                "forward_backward_s": both,
                "cached_self_s": cached,
                "forward_other_chunks_s": other,
                "other_max_elems": other_elems,
                "iterations": iters,
            }
        )
        print(
            f"IWD k=3 stride {stride} ({p} patches/image): forward {fwd:.2f}s, forward+backward {both:.2f}s, "
            f"forward with cached self-term {cached:.2f}s; Sinkhorn iterations per chunk {iters}; "
            f"mean IWD of l_inf-0.1 noise {value.mean():.2e}",
            flush=True,
        )
    torch.manual_seed(0)
    model = TinyCNN(num_classes=10).to(device)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(2):
        for i in range(0, len(xtr), 64):
            opt.zero_grad()
            F.cross_entropy(model(xtr[i : i + 64]), ytr[i : i + 64]).backward()
            opt.step()
    model.eval()
    xa, ya = x[: cfg["attack_n"]], y[: cfg["attack_n"]]
    with torch.no_grad():
        clean = (model(xa).argmax(1) == ya).float().mean().item()
    attack_rows: list[list[str]] = []
    for stride in cfg["attack_strides"]:
        params = {"stride": stride} | ({"steps": cfg["steps"]} if cfg["steps"] else {})
        attack = IWDAttack(ThreatModel(), params)
        out, took = timed(lambda a=attack: a(model, xa, ya), device)
        with torch.no_grad():
            robust = (model(out).argmax(1) == ya).float().mean().item()
        d = (out - xa).flatten(1)
        attack_rows.append(
            [
                str(stride),
                str(attack.params.steps),
                f"{attack.rho:g}",
                f"{took:.1f}",
                f"{took / len(xa) * 1000:.0f}",
                f"{clean:.1%} -> {robust:.1%}",
                f"{d.abs().amax(1).mean():.3f}",
                f"{d.norm(dim=1).mean():.3f}",
            ]
        )
        data.append(
            {
                "attack_stride": stride,
                "steps": attack.params.steps,
                "images": len(xa),
                "seconds": took,
                "clean": clean,
                "robust": robust,
            }
        )
        print(
            f"IWD attack stride {stride}, {attack.params.steps} steps, rho {attack.rho}, {len(xa)} images: "
            f"{took:.1f}s; accuracy {clean:.3f} -> {robust:.3f}; max IWD {attack.last_iwd.max():.2e}; "
            f"mean l_inf {d.abs().amax(1).mean():.3f}, mean l2 {d.norm(dim=1).mean():.3f}",
            flush=True,
        )
    lines = [
        f"One IWD evaluation (k = 3 patches, reg {hot.DEFAULT_REG}, tol {hot.DEFAULT_TOL}) on a batch of "
        f"{len(x)} 28x28 mnist-5k digits against uniform l_inf-0.1 noise, device {device}; seconds per batch. "
        f"The last column repeats the forward pass with {other_elems:,}-element chunks instead of this device's "
        f"default {default_elems:,} (CPU default {hot.DEFAULT_MAX_ELEMS_CPU:,}, elsewhere "
        f"{hot.DEFAULT_MAX_ELEMS:,}), with its ratio to the default.",
        "",
        *table(
            [
                "setting",
                "forward s",
                "forward+backward s",
                "forward, cached self-term s",
                f"forward, {other_elems:,}-element chunks s",
                "Sinkhorn iterations",
                "mean IWD",
            ],
            rows,
        ),
        "",
        f"The IWD attack (default parameters) on the first {len(xa)} of those digits against a TinyCNN trained "
        "2 epochs with CE:",
        "",
        *table(["stride", "steps", "rho", "seconds", "ms/image", "accuracy", "mean l_inf", "mean l2"], attack_rows),
    ]
    cmd = f"python benchmarks/iwd_cost.py --size {args.size} --device {args.device}"
    for flag, key in given:
        value = getattr(args, key)
        cmd += f" {flag} " + (" ".join(map(str, value)) if isinstance(value, list) else str(value))
    if args.threads:
        cmd += f" --threads {args.threads}"
    return write_section(
        section_name("iwd", args.size, args.device, "custom" if (given or args.threads) else ""),
        f"Cost of the internal Wasserstein distance ({args.size}, {args.device})",
        cmd,
        lines,
        {"rows": data, "size": args.size, "device": args.device},
        results=args.results,
        headlines=heads,
    )


if __name__ == "__main__":
    print(main())
