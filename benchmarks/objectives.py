"""Evidence for the seed objectives: each paper's claim checked on its own axis.

Same model, data (mnist-5k), epochs and seed for `ce`, `pgd_at`, `trades`, `iwd_at`, `ot_metric`,
`jsigr`, `mi` and the mixed demo policy (their objectives are read from `policies/`). Each model
is evaluated on the same test images with: clean accuracy, PGD-20, the PGD + APGD-CE worst case,
the IWD attack, the invariance (rotation/shift grid) attack, label-changing invariance examples
(agreement with the new label) and transfer from one `ce` surrogate (trained with another seed).
Then the per-step training cost of each objective (median of interleaved timed rounds on one batch) as a
ratio to a plain CE step, and the mixed policy's as a ratio to `pgd_at` alone.

Sizes (every size trains every configuration, so every objective gets a row; times: 2 cores):

- ``small`` (default; a smoke-scale run, ~3 min): TinyCNN (width 32), linf eps 0.1, 2 epochs of
  batches of 64 on the first 2,048 training images, 100 test images, the IWD attack on the first
  8, per-step cost the median of 8 interleaved rounds. The models are undertrained and the samples
  small: the per-paper verdicts are only meaningful from ``medium`` on.
- ``medium`` (~12-15 min): TinyCNN (width 32), eps 0.1, 4 epochs of batches of 128 on all 4,000
  training images, 300 test images, the IWD attack on the first 64, median of 6 interleaved rounds.
- ``full`` (hours on a CPU): timm resnet10t, eps 0.3 (the demo's setting), 5 epochs,
  1,000 test images, the IWD attack on the first 200.

    python benchmarks/objectives.py                               # small, CPU
    python benchmarks/objectives.py --size medium
    python benchmarks/objectives.py --size full --device cuda
"""

from __future__ import annotations

import argparse
import math
import statistics
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
from harden.objectives import OBJECTIVES, ObjectiveSet
from harden.policy import DataSpec, load_policy

ROOT = Path(__file__).resolve().parent.parent
SIZES: dict[str, dict[str, Any]] = {
    "small": {
        "smoke": True,
        "model": "harden.testing:TinyCNN",
        "args": {"width": 32},
        "eps": 0.1,
        "epochs": 2,
        "train_limit": 2048,
        "batch_size": 64,
        "n": 100,
        "n_iwd": 8,
        "cost_steps": 8,
    },
    "medium": {
        "model": "harden.testing:TinyCNN",
        "args": {"width": 32},
        "eps": 0.1,
        "epochs": 4,
        "n": 300,
        "n_iwd": 64,
    },
    "full": {"model": "timm:resnet10t", "args": {}, "eps": 0.3, "epochs": 5, "n": 1000, "n_iwd": 200},
}
SMOKE = (
    "Small is a smoke-scale run (undertrained models, few test images): it shows the script works and wha"
    "t it costs, not whether the effect holds; `--size medium` (kept below when not re-run) is the measurement."
)
#: objective lists, from the policies where a policy exists
CONFIGS: dict[str, list[dict[str, Any]]] = {
    "ce": [{"name": "ce"}],
    "pgd_at": [{"name": "pgd_at", "params": {"steps": 5}}],
    "trades": [{"name": "trades", "params": {"steps": 5}}],
}
for _name, _file in [
    ("iwd_at", "mnist-iwd-at"),
    ("ot_metric", "mnist-ot-metric"),
    ("jsigr", "mnist-jsigr"),
    ("mi", "mnist-mi"),
    ("mixed", "mnist-mixed"),
]:
    CONFIGS[_name] = [o.model_dump() for o in load_policy(ROOT / "policies" / f"{_file}.yaml").objectives]


#: the mixed policy with the pre-fix BatchNorm behaviour (every view moves the running statistics)
CONFIGS["mixed (bn every_forward)"] = CONFIGS["mixed"]
TRAIN_OVERRIDES: dict[str, dict[str, Any]] = {"mixed (bn every_forward)": {"bn_stats": "every_forward"}}


def policy_for(name: str, size: dict[str, Any], seed: int = 0, device: str = "cpu") -> harden.Policy:
    train = {"epochs": size["epochs"], "lr": 0.05, "warmup_epochs": 1, "probe_examples": 0}
    data: dict[str, Any] = {"name": "mnist-5k", "batch_size": size.get("batch_size", 128)}
    if size.get("train_limit"):
        data["train_limit"] = size["train_limit"]
    return harden.validate_policy(
        {
            "name": "bench-" + "".join(c if c.isalnum() or c in "_-" else "-" for c in name),
            "seed": seed,
            "device": device,
            "model": {"name": size["model"], "args": size["args"]},
            "data": data,
            "threat": {"eps": size["eps"], "rho": 2e-3},
            "train": {**train, **TRAIN_OVERRIDES.get(name, {})},
            "objectives": CONFIGS[name],
        }
    )


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def evaluate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_transfer: torch.Tensor,
    size: dict[str, Any],
    bundle: Any,
) -> dict[str, float]:
    threat = harden.ThreatModel(eps=size["eps"], rho=2e-3)
    torch.manual_seed(0)
    pgd = ATTACKS.get("pgd")(threat, {"steps": 20})
    apgd = ATTACKS.get("apgd_ce")(threat, {"steps": 50})
    suite = run_suite(model, x, y, [pgd, apgd])
    m = size["n_iwd"]
    iwd = ATTACKS.get("iwd")(threat, {"steps": 20, "stride": 2})
    inv = ATTACKS.get("invariance")(threat, {"angles": 5, "shifts": 3})
    examples = ATTACKS.get("invariance_examples")(threat)
    examples.prepare(harden.attacks.AttackEnv(policy=None, bundle=bundle, device=x.device))
    agree, counted = examples.score(model, x, y)
    return {
        "clean": float(suite.clean_correct.float().mean()),
        "pgd20": float(suite.still_correct[suite.labels[0]].float().mean()),
        "worst": float(suite.robust.float().mean()),
        "iwd": accuracy(model, iwd(model, x[:m], y[:m]), y[:m]),
        "invariance": accuracy(model, inv(model, x, y), y),
        "inv_examples": float(agree.sum()) / max(int(counted.sum()), 1),
        "inv_counted": float(counted.sum()),
        "transfer": accuracy(model, x_transfer, y),
    }


def _stepper(name: str, size: dict[str, Any], x: torch.Tensor, y: torch.Tensor) -> tuple[Any, Any]:
    """One training step of configuration ``name`` (forward, views, backward, optimizer, hooks) and its cleanup."""
    device = x.device
    policy = policy_for(name, size, device=str(device))
    torch.manual_seed(0)
    model = harden.models.build_model(policy.model, 10, 1).to(device)
    weighted = [(s.weight, OBJECTIVES.get(s.name)(s.params, policy.threat)) for s in policy.objectives]
    objs = ObjectiveSet(model, weighted, x[:1], bn_stats=policy.train.bn_stats)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()

    def step() -> None:
        ctx = objs.context(x, y, policy.threat)
        loss, _ = objs.loss(ctx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        objs.after_step(ctx)

    return step, objs.close


def step_costs(
    names: list[str], size: dict[str, Any], x: torch.Tensor, y: torch.Tensor, rounds: int
) -> dict[str, float]:
    """Median wall time of one training step per configuration, timed in interleaved rounds.

    Each round times one step of every configuration (the order rotating), so a slow spell of
    the machine touches all of them instead of one; two warm-up steps each come first. Runs on
    ``x``'s device (CUDA work is synchronised around each timed step).
    """
    steppers = {name: _stepper(name, size, x, y) for name in names}
    for step, _ in steppers.values():
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(steppers[name][0], sync=x.device)[1])
    for _, close in steppers.values():
        close()
    return {name: statistics.median(t) for name, t in times.items()}


def _gap(a: float, b: float, n: int) -> tuple[float, float]:
    """Difference a - b of two accuracies measured on n examples each, and its standard error.

    Unpaired (a conservative choice: the same images are used, so a paired test would be sharper).
    """
    se = math.sqrt(max(a * (1 - a) / n + b * (1 - b) / n, 1e-12))
    return a - b, se


def verdicts(res: dict[str, dict[str, float]], size: dict[str, Any]) -> tuple[list[str], list[dict[str, str]]]:
    """One line per paper: does its objective beat `pgd_at` and `ce` on its own axis by > 2 SE?

    Returns the lines and one summary headline per claim (the objective against `pgd_at`).
    """
    heads: list[dict[str, str]] = []

    def n_for(obj: str, axis: str) -> int:
        if axis == "iwd":
            return int(size["n_iwd"])
        if axis == "inv_examples":
            return int(min(res[obj]["inv_counted"], res["pgd_at"]["inv_counted"], res["ce"]["inv_counted"]))
        return int(size["n"])

    def claim(obj: str, axis: str, label: str) -> str:
        v = res[obj][axis]
        n = n_for(obj, axis)
        parts, wins = [], []
        for base in ("pgd_at", "ce"):
            d, se = _gap(v, res[base][axis], n)
            parts.append(f"{base} {res[base][axis]:.1%} ({d * 100:+.1f} pts, 2 SE = {2 * se * 100:.1f})")
            wins.append("win" if d > 2 * se else "loss" if d < -2 * se else "tie")
        if wins == ["win", "win"]:
            word = "**reproduces**: above both baselines by more than 2 SE"
        elif wins[1] == "win":
            word = (
                "**reproduces against ce only**: above `ce` by more than 2 SE, "
                + ("below" if wins[0] == "loss" else "within noise of")
                + " `pgd_at`"
            )
        elif "loss" in wins and "win" not in wins:
            word = "**does not reproduce**: below a baseline by more than 2 SE"
        else:
            word = "**does not reproduce**: within noise of the baselines"
        d_pgd, se_pgd = _gap(v, res["pgd_at"][axis], n)
        heads.append(
            headline(
                f"{obj} on {label.split(' (')[0]}: accuracy vs pgd_at (n = {n})",
                f"{v:.1%}",
                f"{res['pgd_at'][axis]:.1%}",
                f"{d_pgd * 100:+.1f} pts (2 SE {2 * se_pgd * 100:.1f})",
                word.split(":")[0].strip("*") + ("; smoke scale: see --size medium" if size.get("smoke") else ""),
            )
        )
        return f"- {obj} on {label} (n = {n}): {v:.1%} vs {', '.join(parts)}: {word}."

    lines = [
        claim("iwd_at", "iwd", "the IWD attack"),
        claim("ot_metric", "invariance", "the invariance (rotation/shift) attack"),
        claim("ot_metric", "inv_examples", "label-changing invariance examples (agreement with the new label)"),
        claim("jsigr", "transfer", "transfer from a ce surrogate"),
        claim("mi", "worst", "the PGD/APGD worst case"),
    ]
    return lines, heads


def build_parser() -> argparse.ArgumentParser:
    """The command line of this script (``main`` parses it; tests inspect it)."""
    ap = base_parser(__doc__, SIZES, "cpu (default), cuda or cuda:N: training, attacks, timing")
    ap.add_argument("--only", nargs="*", default=None, help="train only these configurations")
    return ap


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    size = SIZES[args.size]
    device = torch.device(args.device)
    names = args.only or list(CONFIGS)
    bundle = load_data(DataSpec(name="mnist-5k"))
    xs, ys = zip(*(bundle.test[i] for i in range(max(size["n"], 128))), strict=True)
    x_all, y_all = torch.stack(xs).to(device), torch.tensor([int(v) for v in ys], device=device)
    x, y = x_all[: size["n"]], y_all[: size["n"]]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(1)
        surrogate = harden.fit(
            None, policy_for("ce", size, seed=1, device=args.device), run_dir=f"{tmp}/s", progress=False
        ).model.to(device)
        threat = harden.ThreatModel(eps=size["eps"])
        torch.manual_seed(0)
        x_transfer = ATTACKS.get("pgd")(threat, {"steps": 20})(surrogate, x, y)
        res: dict[str, dict[str, float]] = {}
        for name in names:
            policy = policy_for(name, size, device=args.device)
            run_dir = f"{tmp}/{len(res)}"
            fitted, train_s = timed(lambda p=policy, d=run_dir: harden.fit(None, p, run_dir=d, progress=False), device)
            model = fitted.model.to(device).eval()
            res[name] = {**evaluate(model, x, y, x_transfer, size, bundle), "train_s": train_s}
            print(name, {k: round(v, 3) for k, v in res[name].items()}, flush=True)
    xb, yb = x_all[:128], y_all[:128]
    cost = step_costs(names, size, xb, yb, rounds=size.get("cost_steps", 6))
    for name in names:
        res[name]["step_s"] = cost[name]
        print(name, f"step {cost[name] * 1000:.0f} ms", flush=True)
    rows = []
    for name in names:
        r = res[name]
        ratio_ce = r["step_s"] / cost["ce"] if "ce" in cost else float("nan")
        rows.append(
            [
                name,
                f"{r['clean']:.1%}",
                f"{r['pgd20']:.1%}",
                f"{r['worst']:.1%}",
                f"{r['iwd']:.1%}",
                f"{r['invariance']:.1%}",
                f"{r['inv_examples']:.1%}",
                f"{r['transfer']:.1%}",
                f"{r['step_s'] * 1000:.0f}",
                f"{ratio_ce:.1f}x",
                f"{r['train_s']:.0f}",
            ]
        )
    lines = [
        f"Model `{size['model']}` {size['args'] or ''}, mnist-5k"
        + (f" (the first {size['train_limit']:,} training images)" if size.get("train_limit") else "")
        + f", {size['epochs']} epochs of batches of {size.get('batch_size', 128)}, seed 0, linf eps "
        f"{size['eps']}, IWD budget rho 2e-3; {size['n']} test images (the IWD attack: the first {size['n_iwd']}, "
        "20 steps, stride 2); device " + args.device + ". Accuracies under each attack (higher is more robust); "
        "invariance examples: agreement with the new label (higher is less excessively invariant); transfer: "
        "PGD-20 examples of a `ce` surrogate trained with seed 1. Step: median wall time of one training step "
        f"on a batch of {len(xb)} (median of {size.get('cost_steps', 6)} interleaved rounds after 2 warm-up steps).",
        "",
        *table(
            [
                "objective",
                "clean",
                "PGD-20",
                "PGD+APGD worst",
                "IWD attack",
                "invariance",
                "inv. examples",
                "transfer",
                "step ms",
                "step / ce",
                "fit s",
            ],
            rows,
        ),
        "",
    ]
    heads: list[dict[str, str]] = []
    if "mixed" in cost and "pgd_at" in cost:
        mix_ratio = cost["mixed"] / cost["pgd_at"]
        heads.append(
            headline(
                "mixed policy training step vs pgd_at alone, ms",
                f"{cost['mixed'] * 1000:.0f}",
                f"{cost['pgd_at'] * 1000:.0f}",
                f"{mix_ratio:.2f}x",
                f"goal <= 1.5x: {'met' if mix_ratio <= 1.5 else 'NOT met'}",
            )
        )
        lines.append(
            f"Mixed policy step cost / `pgd_at` alone: **{cost['mixed'] / cost['pgd_at']:.2f}x** (goal <= 1.5x)."
        )
        lines.append("")
    if "mixed" in res and "mixed (bn every_forward)" in res:
        a, b = res["mixed"], res["mixed (bn every_forward)"]
        d, se = _gap(a["worst"], b["worst"], int(size["n"]))
        lines.append(
            f"BatchNorm running statistics moved only by the first view (`train.bn_stats: first_forward`, the "
            f"default) against every view: PGD+APGD worst case {a['worst']:.1%} vs {b['worst']:.1%} "
            f"({d * 100:+.1f} pts, 2 SE = {2 * se * 100:.1f}), PGD-20 {a['pgd20']:.1%} vs {b['pgd20']:.1%}."
        )
        lines.append("")
    if all(k in res for k in ("ce", "pgd_at", "iwd_at", "ot_metric", "jsigr", "mi")):
        claims, claim_heads = verdicts(res, size)
        lines += ["Each paper's claim on its own axis, against both baselines:", "", *claims, ""]
        lines += [SMOKE, ""] if size.get("smoke") else []
        heads += claim_heads
    cmd = f"python benchmarks/objectives.py --size {args.size} --device {args.device}" + (
        f" --only {' '.join(args.only)}" if args.only else ""
    )
    return write_section(
        section_name("objectives", args.size, args.device, "only" if args.only else ""),
        f"Objectives: each paper's claim on its own axis ({args.size}, {args.device})",
        cmd,
        lines,
        {"results": res, "size": args.size, "device": args.device},
        results=args.results,
        headlines=heads,
    )


if __name__ == "__main__":
    print(main())
