"""Training overhead: `pgd_at` through `harden.fit` against a hand-written PyTorch loop doing the same work.

Overhead. Same model (the demo's timm ResNet-10-T, same initial weights), same data and batch
order (mnist-5k training split, batch 128, harden's seeded loader), same PGD (random start, k = 5
steps of 2.5 eps / k, last iterate, model in eval mode and weights frozen during the attack),
same optimizer (SGD, Nesterov momentum 0.9, weight decay 5e-4, lr 0.05, constant schedule).
harden's time is the whole `harden.fit` call (model check, run folder, checkpoint and history
each epoch) without validation, which the hand-written loop does not do either. The runs are
interleaved (harden, hand-written, hand-written, harden, ...) and the median of the repeats is
reported, with the spread of the per-repeat ratios. Goal: harden / hand-written <= 1.05.

Cost against the ideal: a PGD-k step is k attack passes plus one training pass, so it should
cost about k + 1 plain CE steps; the measured `pgd_at epoch / ce epoch` is reported beside k + 1.

IBM ART (optional: `pip install adversarial-robustness-toolbox`, or `pip install -e .[bench]`):
its `AdversarialTrainerMadryPGD` on the same configuration (its PGD generates on sub-batches of
32 by default; we set 128, the training batch, so it does the same work).

Throughput: images per second of `pgd_at` training (harden's default PGD-7) on a timm ResNet-18
at 3x32x32 (CIFAR-10's shape; synthetic images, since nothing may be downloaded) in fp32 and
bf16, through `harden.fit` and through the hand-written loop, timed on the last epoch (the
first is warm-up). bf16 rows come in two forms: harden's default (training step in bf16,
attack in fp32: `train.attack_precision: fp32`) and everything in bf16 (`attack_precision: same`).

Sizes (2-core CPU): `small` (default) 1 epoch x 3 repeats, throughput on 512 images: ~4 min.
`full` 3 epochs x 5 repeats, throughput on 2,048 images: ~20 min. On `--device cuda` the
throughput runs use 16x the images.

    python benchmarks/training.py
    python benchmarks/training.py --size full --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_parser, headline, section_name, table, write_section

import harden
from harden.data import load_data, make_loader
from harden.model_load import build_model

STEPS = 5
EPS = 0.3
TP_STEPS = 7  # pgd_at's default
TP_EPS = 8 / 255
SIZES: dict[str, dict[str, int]] = {
    "small": {"epochs": 1, "repeats": 3, "tp_images": 512, "tp_epochs": 2},
    "full": {"epochs": 3, "repeats": 5, "tp_images": 2048, "tp_epochs": 2},
}


def build_parser() -> argparse.ArgumentParser:
    """The command line (``--size``, ``--device``, ``--results``)."""
    ap = base_parser(__doc__, SIZES, "cpu (default), cuda or cuda:N: training, ART, throughput")
    ap.add_argument("--skip-throughput", action="store_true", help="only the overhead and ideal tables")
    return ap


def policy_for(
    objective: dict[str, Any],
    epochs: int,
    device: str,
    *,
    model: str = "timm:resnet10t",
    eps: float = EPS,
    train: dict[str, Any] | None = None,
) -> harden.Policy:
    """The policy both sides run: constant lr, no validation probe, one checkpoint kept."""
    return harden.validate_policy(
        {
            "name": "bench-training",
            "seed": 0,
            "device": device,
            "model": {"name": model},
            "data": {"name": "mnist-5k", "batch_size": 128},
            "threat": {"eps": eps},
            "train": {
                "epochs": epochs,
                "lr": 0.05,
                "schedule": "constant",
                "probe_examples": 0,
                "keep_checkpoints": 1,
                **(train or {}),
            },
            "objectives": [objective],
        }
    )


def fresh_model(policy: harden.Policy, device: torch.device, in_chans: int = 1) -> nn.Module:
    """The policy's model with the seed's initial weights, on ``device``."""
    torch.manual_seed(policy.seed)
    return build_model(policy.model, 10, in_chans).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    """Madry et al.'s PGD, written out: random start, signed steps of 2.5 eps / steps, last iterate."""
    alpha = 2.5 * eps / steps
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv).float(), y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def hand_written(
    policy: harden.Policy,
    train: Dataset[Any],
    device: torch.device,
    steps: int,
    *,
    in_chans: int = 1,
    train_bf16: bool = False,
    attack_bf16: bool = False,
) -> list[float]:
    """The minimal loop (``steps`` = 0: plain CE); returns wall seconds of each epoch."""
    model = fresh_model(policy, device, in_chans)
    t = policy.train
    eps = policy.threat.eps
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True)
    seconds = []
    for epoch in range(t.epochs):
        _sync(device)
        t0 = time.perf_counter()
        for xb, yb in make_loader(train, policy.data.batch_size, shuffle=True, seed=policy.seed, epoch=epoch):
            x, y = xb.to(device), yb.to(device)
            if steps:
                model.eval()
                for p in model.parameters():
                    p.requires_grad_(False)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=attack_bf16):
                    x = pgd(model, x, y, eps, steps)
                for p in model.parameters():
                    p.requires_grad_(True)
            model.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=train_bf16):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    return seconds


def through_harden(
    policy: harden.Policy, train: Dataset[Any], device: torch.device, in_chans: int = 1
) -> tuple[float, list[float]]:
    """``harden.fit`` on a fresh model: (wall seconds of the call, seconds of each epoch)."""
    model = fresh_model(policy, device, in_chans)
    with tempfile.TemporaryDirectory() as tmp:
        _sync(device)
        t0 = time.perf_counter()
        result = harden.fit(model, policy, train=train, val=None, run_dir=tmp, progress=False)
        _sync(device)
        return time.perf_counter() - t0, [float(r["seconds"]) for r in result.history]


def through_art(policy: harden.Policy, train: Dataset[Any], device: torch.device) -> float | None:
    """IBM ART's AdversarialTrainerMadryPGD on the same configuration; None when ART is missing."""
    try:
        from art.defences.trainer import AdversarialTrainerMadryPGD
        from art.estimators.classification import PyTorchClassifier
    except ImportError:
        return None
    import numpy as np

    model = fresh_model(policy, device)
    t = policy.train
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True)
    clf = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        optimizer=opt,
        input_shape=(1, 28, 28),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="gpu" if device.type == "cuda" else "cpu",
    )
    xs, ys = zip(*(train[i] for i in range(len(train))), strict=True)  # type: ignore[arg-type]
    x = torch.stack(xs).numpy().astype(np.float32)
    y = np.array([int(v) for v in ys])
    trainer = AdversarialTrainerMadryPGD(
        clf, nb_epochs=t.epochs, batch_size=policy.data.batch_size, eps=EPS, eps_step=2.5 * EPS / STEPS, max_iter=STEPS
    )
    trainer.attack.set_params(batch_size=policy.data.batch_size)
    _sync(device)
    t0 = time.perf_counter()
    trainer.fit(x, y)
    _sync(device)
    return time.perf_counter() - t0


def overhead(size: dict[str, int], device: torch.device) -> tuple[list[str], dict[str, Any]]:
    """The harden vs hand-written vs ART table and the cost-against-ideal table."""
    dev = str(device)
    pgd_policy = policy_for({"name": "pgd_at", "params": {"steps": STEPS}}, size["epochs"], dev)
    ce_policy = policy_for({"name": "ce"}, size["epochs"], dev)
    train = load_data(pgd_policy.data).train
    warm = policy_for({"name": "ce"}, 1, dev)
    warm_data = Subset(train, range(min(512, len(train))))  # type: ignore[arg-type]
    hand_written(warm, warm_data, device, 0)  # allocator, kernels, lazy imports
    through_harden(warm, warm_data, device)
    runs: dict[str, list[float]] = {"h_pgd": [], "w_pgd": [], "h_ce": [], "w_ce": []}
    for r in range(size["repeats"]):
        order = ("h", "w") if r % 2 == 0 else ("w", "h")
        for who in order:
            if who == "h":
                runs["h_pgd"].append(through_harden(pgd_policy, train, device)[0])
                runs["h_ce"].append(through_harden(ce_policy, train, device)[0])
            else:
                runs["w_pgd"].append(sum(hand_written(pgd_policy, train, device, STEPS)))
                runs["w_ce"].append(sum(hand_written(ce_policy, train, device, 0)))
        print({k: [round(v, 2) for v in vs] for k, vs in runs.items()}, flush=True)
    art = through_art(pgd_policy, train, device)
    med = {k: statistics.median(v) for k, v in runs.items()}
    per = 1 / size["epochs"]
    pgd_ratios = [h / w for h, w in zip(runs["h_pgd"], runs["w_pgd"], strict=True)]
    ce_ratios = [h / w for h, w in zip(runs["h_ce"], runs["w_ce"], strict=True)]
    ratio = med["h_pgd"] / med["w_pgd"]
    verdict = "goal met" if ratio <= 1.05 else "goal NOT met"
    rows = [
        [
            f"pgd_at (PGD-{STEPS}) epoch",
            f"{med['h_pgd'] * per:.2f}",
            f"{med['w_pgd'] * per:.2f}",
            f"**{ratio:.3f}x** ({min(pgd_ratios):.3f}-{max(pgd_ratios):.3f})",
            verdict,
            f"{art * per:.2f} ({med['h_pgd'] / art:.2f}x)" if art is not None else "not installed",
        ],
        [
            "ce epoch",
            f"{med['h_ce'] * per:.2f}",
            f"{med['w_ce'] * per:.2f}",
            f"{med['h_ce'] / med['w_ce']:.3f}x ({min(ce_ratios):.3f}-{max(ce_ratios):.3f})",
            "-",
            "-",
        ],
    ]
    h_ideal, w_ideal = med["h_pgd"] / med["h_ce"], med["w_pgd"] / med["w_ce"]
    ideal = [
        ["harden", f"{h_ideal:.2f}x", f"{STEPS + 1}x", f"{h_ideal / (STEPS + 1):.2f}", f"{(h_ideal - 1) / STEPS:.2f}"],
        [
            "hand-written",
            f"{w_ideal:.2f}x",
            f"{STEPS + 1}x",
            f"{w_ideal / (STEPS + 1):.2f}",
            f"{(w_ideal - 1) / STEPS:.2f}",
        ],
    ]
    n = len(train)  # type: ignore[arg-type]
    lines = [
        f"Overhead: timm ResNet-10-T (the demo model), mnist-5k training split ({n} images, batch 128), "
        f"{size['epochs']} epoch(s) per run, {size['repeats']} interleaved repeats (median; the spread of the "
        f"per-repeat ratios in brackets), linf eps {EPS}, PGD-{STEPS}; device {dev}. Seconds per epoch; ratio "
        "harden / hand-written (goal <= 1.05). IBM ART's `AdversarialTrainerMadryPGD` (PGD generated on "
        "batches of 128) runs once; its column gives ART's seconds and harden / ART.",
        "",
        *table(["training", "harden s", "hand-written s", "ratio", "goal", "IBM ART s (harden / ART)"], rows),
        "",
        f"Cost against the ideal: a PGD-{STEPS} step is {STEPS} attack passes plus one training pass, about "
        f"{STEPS + 1} plain steps. Measured below: an attack pass runs in eval mode with the weights frozen "
        "(no weight gradients, no BatchNorm statistics), so it costs less than a training step; the last "
        "column is that cost in training steps, (ratio - 1) / k.",
        "",
        *table(
            ["loop", "pgd_at epoch / ce epoch", "ideal (k + 1)", "measured / ideal", "attack pass / CE step"], ideal
        ),
        "",
    ]
    data = {"runs": runs, "median": med, "ratio": ratio, "art_pgd_s": art, "ideal": STEPS + 1, "harden_vs_ce": h_ideal}
    heads = [
        headline(
            f"pgd_at epoch (PGD-{STEPS}, ResNet-10-T), s: harden.fit vs hand-written loop",
            f"{med['h_pgd'] * per:.2f}",
            f"{med['w_pgd'] * per:.2f}",
            f"{ratio:.3f}x",
            f"goal <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'}",
        ),
        headline(
            f"pgd_at step / ce step vs the ideal k + 1 (k = {STEPS})",
            f"{h_ideal:.2f}x",
            f"{STEPS + 1}x",
            f"{h_ideal / (STEPS + 1):.2f}",
            "attack passes skip weight gradients",
        ),
    ]
    if art is not None:
        heads.insert(
            1,
            headline(
                "pgd_at epoch, s: harden.fit vs IBM ART AdversarialTrainerMadryPGD",
                f"{med['h_pgd'] * per:.2f}",
                f"{art * per:.2f}",
                f"{med['h_pgd'] / art:.2f}x",
            ),
        )
    data["headlines"] = heads
    return lines, data


def throughput(size: dict[str, int], device: torch.device) -> tuple[list[str], dict[str, Any]]:
    """Images per second of pgd_at training on timm ResNet-18 at 3x32x32, fp32 and bf16."""
    dev = str(device)
    n = size["tp_images"] * (16 if device.type == "cuda" else 1)
    gen = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.rand(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    variants = [
        ("fp32", {"precision": "fp32"}, False, False),
        ("bf16 step, fp32 attack (harden default)", {"precision": "bf16", "attack_precision": "fp32"}, True, False),
        ("bf16 step and attack", {"precision": "bf16", "attack_precision": "same"}, True, True),
    ]
    rows: list[list[str]] = []
    data: dict[str, Any] = {}
    heads: list[dict[str, str]] = []
    for label, prec, train_bf16, attack_bf16 in variants:
        policy = policy_for(
            {"name": "pgd_at", "params": {"steps": TP_STEPS}},
            size["tp_epochs"],
            dev,
            model="timm:resnet18",
            eps=TP_EPS,
            train=prec,
        )
        h = through_harden(policy, train, device, in_chans=3)[1][-1]
        w = hand_written(policy, train, device, TP_STEPS, in_chans=3, train_bf16=train_bf16, attack_bf16=attack_bf16)[
            -1
        ]
        rows.append([label, f"{n / h:,.0f}", f"{n / w:,.0f}", f"{h / w:.3f}x"])
        heads.append(
            headline(
                f"pgd_at training img/s, ResNet-18 32x32, {label}: harden vs hand-written",
                f"{n / h:,.0f}",
                f"{n / w:,.0f}",
                f"{h / w:.3f}x",
                "time ratio",
            )
        )
        data[label] = {"harden_s": h, "hand_s": w, "images": n}
        print(label, round(h, 2), round(w, 2), flush=True)
    lines = [
        f"Throughput: `pgd_at` (PGD-{TP_STEPS}, linf eps 8/255) training on timm ResNet-18 at 3x32x32, batch 128, "
        f"{n:,} synthetic images, timed on epoch {size['tp_epochs']} of {size['tp_epochs']}; device {dev}. "
        "Images per second (higher is better); ratio = harden time / hand-written time.",
        "",
        *table(["precision", "harden img/s", "hand-written img/s", "ratio"], rows),
        "",
    ]
    data["headlines"] = heads
    return lines, data


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark and write its section; returns the section's path."""
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    size = SIZES[args.size]
    lines, data = overhead(size, device)
    heads = data.pop("headlines")
    if not args.skip_throughput:
        tp_lines, tp_data = throughput(size, device)
        lines += tp_lines
        heads += tp_data.pop("headlines")
        data["throughput"] = tp_data
    name = section_name("training", args.size, args.device)
    return write_section(
        name,
        f"Training overhead and throughput ({args.size}, {args.device})",
        f"python benchmarks/training.py --size {args.size} --device {args.device}",
        lines,
        data,
        args.results,
        headlines=heads,
    )


if __name__ == "__main__":
    main()
