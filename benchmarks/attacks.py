"""harden's attacks and verification against torchattacks, on the same models and inputs.

Models: a plainly trained (`ce`) and a PGD-trained (`pgd_at`) model trained by harden on
mnist-5k, and a PGD-trained model from elsewhere (``benchmarks/common.py``: Madry et al.'s
MNIST CNN trained by a plain PyTorch loop at linf eps 0.3), attacked at eps 0.3 and at eps 0.1
(where it is robust on most examples, so Square's 5,000 queries dominate both sides' time).

Rows, each harden beside torchattacks on the same examples:

- PGD-40 and APGD-CE (100 steps), the same settings on both sides;
- ``standard suite``: harden's ``preset: standard`` against torchattacks'
  ``AutoAttack(version="standard")`` as a user runs it (APGD-CE, APGD-T, FAB-T with 10 steps,
  Square with 5,000 queries). Goal: time ratio <= 1.0x with equal or lower robust accuracy;
- ``reference suite``: harden's ``preset: reference`` (AutoAttack's
  exact settings, 100 steps for every target) against the same four torchattacks classes with
  100 steps, cascaded by ``torchattacks.MultiAttack``.

Strength is paired: McNemar's exact test on the examples one side left right and the other
broke. Then ``harden.verify`` with the default checks and eps sweep splits verification time into
attacks, checks and eps sweep (goal: checks and sweep <= 25 %): at the defaults (the default suite
FGSM + PGD-40, all 1,000 mnist-5k test images verified, 200 checked) on every model, and with
``preset: standard`` on the Madry CNN at eps 0.3 (the benchmark's images, all checked).

Sizes (2 cores): ``small`` (default, ~16 min): TinyCNN (width 32) 4 epochs at eps 0.1, the
Madry CNN 6 epochs, the first 100 test images; ``medium`` (~40 min): 12 epochs, 200 images;
``full`` (hours): timm resnet10t at eps 0.3, 1,000 images. ``--no-reference`` leaves the
reference rows out (about half the time).

    python benchmarks/attacks.py                              # small, CPU
    python benchmarks/attacks.py --size medium
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, headline, section_name, table, timed, train_elsewhere, write_section

import harden
import harden.policy
from harden.attacks import ATTACKS, preset_specs, run_suite
from harden.attacks.suite import build_attack
from harden.compare import mcnemar
from harden.data import load_data

SIZES: dict[str, dict[str, Any]] = {
    "small": {"model": "harden.testing:TinyCNN", "args": {"width": 32}, "epochs": 4, "eps": 0.1, "n": 100,
              "elsewhere_epochs": 6, "reference": True},
    "medium": {"model": "harden.testing:TinyCNN", "args": {"width": 32}, "epochs": 4, "eps": 0.1, "n": 200,
               "elsewhere_epochs": 12, "reference": True},
    "full": {"model": "timm:resnet10t", "args": {}, "epochs": 5, "eps": 0.3, "n": 1000,
             "elsewhere_epochs": 12, "reference": True},
}  # fmt: skip
GOAL_SHARE = 0.25  # checks + eps sweep, of verify time
HEADER = ["model", "eps", "clean", "attack", "harden acc", "torchattacks acc", "only right (h / t)", "strength",
          "harden s", "torchattacks s", "time ratio", "harden per attack (s)"]  # fmt: skip


def train_harden(objective: str, size: dict[str, Any], device: str) -> torch.nn.Module:
    """A model trained by ``harden.fit`` on mnist-5k with one objective."""
    params = {"steps": 5} if objective == "pgd_at" else {}
    policy = harden.validate_policy(
        {
            "name": f"bench-{objective}",
            "device": device,
            "model": {"name": size["model"], "args": size["args"]},
            "data": {"name": "mnist-5k", "batch_size": 128},
            "threat": {"eps": size["eps"]},
            "train": {"epochs": size["epochs"], "lr": 0.05, "warmup_epochs": 1, "probe_examples": 0},
            "objectives": [{"name": objective, "params": params}],
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        return harden.fit(None, policy, run_dir=tmp, progress=False).model.eval()


@torch.no_grad()
def right(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example: the model is right on ``x``."""
    return (model(x).argmax(1) == y).cpu()


def ours(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> tuple[torch.Tensor, dict]:
    """harden's outcome per example (right after the attack) and its per-attack seconds."""
    threat = harden.ThreatModel(eps=eps)
    torch.manual_seed(0)
    if name == "PGD-40":
        return right(model, ATTACKS.get("pgd")(threat, {"steps": 40})(model, x, y), y), {}
    if name == "APGD-CE":
        return right(model, ATTACKS.get("apgd_ce")(threat, {"steps": 100})(model, x, y), y), {}
    preset = "standard" if name == "standard suite" else "reference"
    result = run_suite(model, x, y, [build_attack(s, threat) for s in preset_specs(preset)])
    return result.robust, dict(result.seconds)


def theirs(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """torchattacks' outcome per example."""
    import torchattacks as ta

    torch.manual_seed(0)
    if name == "PGD-40":
        atk = ta.PGD(model, eps=eps, alpha=2.5 * eps / 40, steps=40, random_start=True)
    elif name == "APGD-CE":
        atk = ta.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=0)
    elif name == "standard suite":
        atk = ta.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
    else:  # the reference settings: the same four classes with 100 steps, cascaded
        atk = ta.MultiAttack(
            [
                ta.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
                ta.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=10, seed=0),
                ta.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1, multi_targeted=True, n_classes=10, seed=0),
                ta.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=0),
            ]
        )
    out = right(model, atk(x, y), y)
    model.zero_grad(set_to_none=True)  # torchattacks leaves parameter gradients behind
    return out


def compare_row(label: str, name: str, model: torch.nn.Module, x, y, eps: float, device) -> dict[str, Any]:
    """One row: both sides' robust accuracy, the paired test, the times."""
    (mine, seconds), t_ours = timed(lambda: ours(name, model, x, y, eps), device)
    them, t_them = timed(lambda: theirs(name, model, x, y, eps), device)
    only_ours, only_theirs, p = mcnemar(mine.tolist(), them.tolist())  # right for one side only
    if only_ours <= only_theirs:  # robust accuracy equal or lower: at least as strong on these examples
        verdict = "at least as strong"
    elif p >= 0.05:
        verdict = f"higher acc., within noise (p = {p:.2f})"
    else:
        verdict = f"WEAKER (p = {p:.2g})"
    return {
        "model": label,
        "eps": eps,
        "clean": float(right(model, x, y).float().mean()),
        "attack": name,
        "harden_acc": float(mine.float().mean()),
        "torchattacks_acc": float(them.float().mean()),
        "harden_only_right": only_ours,
        "torchattacks_only_right": only_theirs,
        "p": p,
        "verdict": verdict,
        "harden_s": t_ours,
        "torchattacks_s": t_them,
        "harden_attack_s": seconds,
    }


def verify_breakdown(
    label: str, model: torch.nn.Module, x, y, eps: float, device: str, preset: str | None
) -> dict[str, Any]:
    """``harden.verify`` with the default checks and eps sweep (the default suite, or ``preset``) on ``(x, y)``.

    Every example is verified (``n_examples``), the checks run on 200 of them (the default), or
    on all of them below that: where its time goes.
    """
    policy = harden.validate_policy(
        {
            "name": "bench-verify",
            "device": device,
            "model": {"name": "harden.testing:TinyCNN"},  # not built: the model is handed over
            "data": {"name": "mnist-5k"},
            "threat": {"eps": eps},
            "objectives": [{"name": "ce"}],  # not trained: the policy only describes the verification
            "verify": {"preset": preset, "n_examples": len(y), "check_examples": min(200, len(y))},
        }
    )
    report = harden.verify(model, policy, (x, y), progress=False)
    split = report.time_split()
    share = (split["checks"] + split["eps_sweep"]) / report.seconds
    return {"model": label, "eps": eps, "preset": preset or "default suite", "seconds": report.seconds, "split": split,
            "share": share, "n": report.n, "check_n": report.check_n, "robust": report.robust_accuracy,
            "per_check_s": dict(report.per_check_seconds),
            "checks": {k: v["detail"] for k, v in report.checks.items() if v["status"] != "SKIP"}}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``main`` parses it; tests inspect it)."""
    ap = base_parser(__doc__, SIZES, "cpu (default), cuda or cuda:N: training, attacks, timing")
    ap.add_argument("--n", type=int, default=None, help="test images (default: the size's)")
    ap.add_argument("--reference", action=argparse.BooleanOptionalAction, default=None, help="the reference rows")
    return ap


def _row_cells(r: dict[str, Any]) -> list[str]:
    return [
        r["model"],
        f"{r['eps']:g}",
        f"{r['clean']:.1%}",
        r["attack"],
        f"{r['harden_acc']:.1%}",
        f"{r['torchattacks_acc']:.1%}",
        f"{r['harden_only_right']} / {r['torchattacks_only_right']}",
        r["verdict"],
        f"{r['harden_s']:.1f}",
        f"{r['torchattacks_s']:.1f}",
        f"{r['harden_s'] / r['torchattacks_s']:.2f}x",
        ", ".join(f"{k} {v:.1f}" for k, v in r["harden_attack_s"].items()),
    ]


def _headlines(rows: list[dict[str, Any]], breakdown: list[dict[str, Any]]) -> list[dict[str, str]]:
    heads = []
    against = {
        "standard suite": "torchattacks AutoAttack(standard)",
        "reference suite": "torchattacks' classes at 100 steps",
    }
    for r in rows:
        if r["attack"] not in against:
            continue
        ratio = r["harden_s"] / r["torchattacks_s"]
        goal = "met" if ratio <= 1.0 and r["verdict"] == "at least as strong" else "NOT met"
        heads.append(
            headline(
                f"{r['attack']} vs {against[r['attack']]}, {r['model']} at eps {r['eps']:g}: s, robust acc.",
                f"{r['harden_s']:.1f} s, {r['harden_acc']:.1%}",
                f"{r['torchattacks_s']:.1f} s, {r['torchattacks_acc']:.1%}",
                f"{ratio:.2f}x",
                f"goal <= 1.0x and not weaker: {goal}; {r['verdict']}",
            )
        )
    for b in breakdown:
        heads.append(
            headline(
                f"checks + eps sweep share of harden.verify ({b['preset']}, {b['model']} at eps {b['eps']:g}, "
                f"n {b['n']}, {b['check_n']} checked)",
                f"{b['split']['checks'] + b['split']['eps_sweep']:.1f} s",
                f"{b['seconds']:.1f} s",
                f"{b['share']:.0%}",
                f"goal <= {GOAL_SHARE:.0%}: {'met' if b['share'] <= GOAL_SHARE else 'NOT met'}",
            )
        )
    return heads


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    size = dict(SIZES[args.size])
    size["n"] = args.n if args.n is not None else size["n"]
    reference = size["reference"] if args.reference is None else args.reference
    device = torch.device(args.device)
    bundle = load_data(harden.policy.DataSpec(name="mnist-5k"))
    xs, ys = zip(*(bundle.test[i] for i in range(size["n"])), strict=True)
    x, y = torch.stack(xs).to(device), torch.tensor([int(v) for v in ys]).to(device)
    xs, ys = zip(*(bundle.test[i] for i in range(len(bundle.test))), strict=True)  # the defaults: 1,000 verified
    x_all, y_all = torch.stack(xs).to(device), torch.tensor([int(v) for v in ys]).to(device)
    xt, yt = zip(*(bundle.train[i] for i in range(len(bundle.train))), strict=True)
    madry = train_elsewhere(torch.stack(xt), torch.tensor([int(v) for v in yt]), size["elsewhere_epochs"], device)
    models = [
        ("ce (harden)", lambda: train_harden("ce", size, args.device), size["eps"]),
        ("pgd_at (harden)", lambda: train_harden("pgd_at", size, args.device), size["eps"]),
        ("Madry CNN, PGD-AT elsewhere", lambda: madry, 0.3),
        ("Madry CNN, PGD-AT elsewhere", lambda: madry, 0.1),
    ]
    names = ["PGD-40", "APGD-CE", "standard suite"] + (["reference suite"] if reference else [])
    breakdown = [verify_breakdown(models[2][0], madry, x, y, 0.3, args.device, "standard")]  # fails fast
    print(breakdown, flush=True)
    rows = []
    for label, make, eps in models:
        torch.manual_seed(0)
        model = make().to(device)
        breakdown.append(verify_breakdown(label, model, x_all, y_all, eps, args.device, None))
        print(breakdown[-1], flush=True)
        for name in names:
            rows.append(compare_row(label, name, model, x, y, eps, device))
            print({k: v for k, v in rows[-1].items() if k != "harden_attack_s"}, flush=True)
    return _write(args, size, reference, rows, breakdown)


def _breakdown_line(b: dict[str, Any]) -> str:
    return (
        f"- `harden.verify` of {b['model']} at eps {b['eps']:g} with the {b['preset']} and the default checks and "
        f"eps sweep on {b['check_n']} of the {b['n']} examples: {b['seconds']:.1f} s in all: "
        + ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in b["split"].items())
        + f"; checks and eps sweep **{b['share']:.0%}** of verify (goal <= {GOAL_SHARE:.0%}). Per check (s): "
        + ", ".join(f"{k} {v:.2f}" for k, v in b["per_check_s"].items())
        + ". "
        + "; ".join(f"{k}: {v}" for k, v in b["checks"].items() if k == "more_iterations_never_help")
        + "."
    )


def _write(args: argparse.Namespace, size: dict[str, Any], reference: bool, rows, breakdown) -> Path:
    lines = [
        f"{size['n']} mnist-5k test images (the first); harden {harden.__version__} vs torchattacks. Models: `{size['model']}` "
        f"trained by harden ({size['epochs']} epochs) with `ce` and with `pgd_at` (PGD-5), and Madry et al.'s MNIST CNN "
        f"PGD-trained at eps 0.3 by a plain PyTorch loop ({size['elsewhere_epochs']} epochs, benchmarks/common.py). "
        "Robust accuracy: lower is a stronger attack. 'only right' counts the examples one side left right and the "
        "other broke (harden / torchattacks): McNemar's exact test on them decides 'weaker' (p < 0.05). "
        "standard suite: harden `preset: standard` vs `torchattacks.AutoAttack(version='standard')` (10-step APGD, "
        "APGD-T, FAB-T; 5,000-query Square). reference suite: harden `preset: reference` vs the same torchattacks "
        "classes at 100 steps (`MultiAttack`). Time ratio: harden / torchattacks (goal <= 1.0x).",
        "",
        *table(
            HEADER,
            [_row_cells(r) for r in rows],
        ),
        "",
        "Where `harden.verify`'s time goes (the default suite FGSM + PGD-40 at the defaults: all 1,000 test images "
        "verified, 200 checked; `preset: standard` on the benchmark's images):",
        "",
        *(_breakdown_line(b) for b in breakdown),
    ]
    cmd = (
        f"python benchmarks/attacks.py --size {args.size} --device {args.device}"
        + (f" --n {args.n}" if args.n is not None else "")
        + ("" if args.reference is None else (" --reference" if args.reference else " --no-reference"))
    )
    suffixes = [f"n{args.n}" if args.n is not None else "", "" if args.reference is None else f"ref{int(reference)}"]
    return write_section(
        section_name("attacks", args.size, args.device, *suffixes),
        f"Attacks and verification: harden vs torchattacks ({args.size}, {args.device})",
        cmd,
        lines,
        {"rows": rows, "verify": breakdown, "size": args.size, "device": args.device},
        results=args.results,
        headlines=_headlines(rows, breakdown),
    )


if __name__ == "__main__":
    print(main())
