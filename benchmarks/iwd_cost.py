"""Cost of the internal Wasserstein distance and of the IWD attack on MNIST-size images.

One IWD evaluation (forward; forward + backward; forward with the clean self-term cached, as
the attack does) on a batch of 28x28 mnist-5k digits against uniform l_inf-0.1 noise, for
patch stride 1 (the default for images <= 32 px) and stride 2; then one full IWD attack call
(default parameters, a TinyCNN trained for 2 epochs) per stride. CPU by default.

    python benchmarks/iwd_cost.py                        # batch 128, strides 1 and 2, attack at stride 2
    python benchmarks/iwd_cost.py --attack-strides 1 2   # also the (slow on CPU) stride-1 attack
    python benchmarks/iwd_cost.py --threads 1 --batch 32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import ot
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_section

import harden.ot as hot
from harden.attacks.iwd import IWDAttack
from harden.data import load_data
from harden.policy import DataSpec, ThreatModel
from harden.testing import TinyCNN


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


def main() -> None:
    """Run the measurements and print one line per setting."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--strides", type=int, nargs="*", default=[2, 1])
    ap.add_argument("--attack-strides", type=int, nargs="*", default=[2])
    ap.add_argument("--steps", type=int, default=None, help="attack steps (default: the attack's, 50)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, POT {ot.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    xtr, ytr, x, y = _mnist(args.batch)
    adv = (x + (torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1) * 0.1).clamp(0, 1)
    hot.iwd(x[:2], adv[:2])  # warm-up
    counts = _count_iterations()
    rows: list[list[str]] = []
    data: list[dict[str, object]] = []
    for stride in args.strides:
        p = hot.patches(x[:1], stride=stride).shape[1]
        counts.clear()
        t = time.perf_counter()
        value = hot.iwd(x, adv, stride=stride)
        fwd = time.perf_counter() - t
        iters = sorted(set(counts))
        a = adv.clone().requires_grad_(True)
        t = time.perf_counter()
        hot.iwd(x, a, stride=stride).sum().backward()
        both = time.perf_counter() - t
        x_self = hot.self_cost(x, stride=stride)
        t = time.perf_counter()
        hot.iwd(x, adv, stride=stride, x_self=x_self)
        cached = time.perf_counter() - t
        t = time.perf_counter()
        hot.iwd(x, adv, stride=stride, max_elems=hot.DEFAULT_MAX_ELEMS)
        big_chunks = time.perf_counter() - t
        rows.append(
            [
                f"IWD, stride {stride} ({p} patches/image)",
                f"{fwd:.2f}",
                f"{both:.2f}",
                f"{cached:.2f}",
                f"{big_chunks:.2f} ({big_chunks / fwd:.1f}x)",
                str(iters),
                f"{value.mean():.2e}",
            ]
        )
        data.append(
            {
                "stride": stride,
                "patches": p,
                "forward_s": fwd,
                "forward_backward_s": both,
                "cached_self_s": cached,
                "forward_2to24_chunks_s": big_chunks,
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
    model = TinyCNN(num_classes=10)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(2):
        for i in range(0, len(xtr), 64):
            opt.zero_grad()
            F.cross_entropy(model(xtr[i : i + 64]), ytr[i : i + 64]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    attack_rows: list[list[str]] = []
    for stride in args.attack_strides:
        params = {"stride": stride} | ({"steps": args.steps} if args.steps else {})
        attack = IWDAttack(ThreatModel(), params)
        t = time.perf_counter()
        out = attack(model, x, y)
        took = time.perf_counter() - t
        with torch.no_grad():
            robust = (model(out).argmax(1) == y).float().mean().item()
        d = (out - x).flatten(1)
        attack_rows.append(
            [
                str(stride),
                str(attack.params.steps),
                f"{attack.rho:g}",
                f"{took:.1f}",
                f"{took / len(x) * 1000:.0f}",
                f"{clean:.1%} -> {robust:.1%}",
                f"{d.abs().amax(1).mean():.3f}",
                f"{d.norm(dim=1).mean():.3f}",
            ]
        )
        data.append(
            {"attack_stride": stride, "steps": attack.params.steps, "seconds": took, "clean": clean, "robust": robust}
        )
        print(
            f"IWD attack stride {stride}, {attack.params.steps} steps, rho {attack.rho}: {took:.1f}s; "
            f"accuracy {clean:.3f} -> {robust:.3f}; max IWD {attack.last_iwd.max():.2e}; "
            f"mean l_inf {d.abs().amax(1).mean():.3f}, mean l2 {d.norm(dim=1).mean():.3f}",
            flush=True,
        )
    lines = [
        f"One IWD evaluation (k = 3 patches, reg {hot.DEFAULT_REG}, tol {hot.DEFAULT_TOL}) on a batch of "
        f"{len(x)} 28x28 mnist-5k digits against uniform l_inf-0.1 noise; seconds per batch. The last column "
        f"repeats the forward pass with {hot.DEFAULT_MAX_ELEMS:,}-element chunks (the off-CPU default) instead "
        f"of the CPU default {hot.DEFAULT_MAX_ELEMS_CPU:,}, with its ratio to the default.",
        "",
        *table(
            [
                "setting",
                "forward s",
                "forward+backward s",
                "forward, cached self-term s",
                "forward, 2^24 chunks s",
                "Sinkhorn iterations",
                "mean IWD",
            ],
            rows,
        ),
        "",
        f"The IWD attack (default parameters) on the same {len(x)} digits against a TinyCNN trained 2 epochs with CE:",
        "",
        *table(["stride", "steps", "rho", "seconds", "ms/image", "accuracy", "mean l_inf", "mean l2"], attack_rows),
    ]
    cmd = "python benchmarks/iwd_cost.py " + " ".join(sys.argv[1:])
    write_section("iwd", "Cost of the internal Wasserstein distance", cmd.strip(), lines, {"rows": data})


if __name__ == "__main__":
    main()
