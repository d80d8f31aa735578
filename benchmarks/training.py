"""Training overhead: `pgd_at` through `harden.fit` against a hand-written PyTorch loop doing the same work.

Same model (the demo's timm ResNet-10-T, same initial weights), same data and batch order
(mnist-5k training split, batch 128, harden's seeded loader), same PGD (random start, k steps of
2.5 eps / k, last iterate, model in eval mode during the attack), same optimizer (SGD, Nesterov
momentum 0.9, weight decay 5e-4, lr 0.05, constant schedule). harden's side includes everything
`fit` does per epoch (checkpoint, history, progress bookkeeping) except validation, which the
hand-written loop does not do either. Goal: harden / hand-written <= 1.05.

Also the cost against the ideal: one PGD-k training step is k attack forward/backward passes
plus one training forward/backward, so it should cost about k + 1 plain CE steps; the measured
ratio `pgd_at epoch / ce epoch` is reported beside k + 1. With IBM ART installed
(`pip install adversarial-robustness-toolbox`), its `AdversarialTrainerMadryPGD` runs the same
configuration as a third column.

    python benchmarks/training.py                # 1 epoch each (a few minutes on 2 cores)
    python benchmarks/training.py --epochs 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_section

import harden
from harden.data import load_data, make_loader
from harden.models import build_model

STEPS = 5
EPS = 0.3


def policy_for(objective: dict[str, Any], epochs: int, device: str) -> harden.Policy:
    return harden.validate_policy(
        {
            "name": "bench-training",
            "seed": 0,
            "device": device,
            "model": {"name": "timm:resnet10t"},
            "data": {"name": "mnist-5k", "batch_size": 128},
            "threat": {"eps": EPS},
            "train": {
                "epochs": epochs,
                "lr": 0.05,
                "schedule": "constant",
                "probe_examples": 0,
                "keep_checkpoints": 1,
            },
            "objectives": [objective],
        }
    )


def fresh_model(policy: harden.Policy, device: torch.device) -> nn.Module:
    torch.manual_seed(policy.seed)
    return build_model(policy.model, 10, 1).to(device)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int) -> torch.Tensor:
    """Madry et al.'s PGD, written out: random start, signed steps of 2.5 eps / steps, last iterate."""
    alpha = 2.5 * eps / steps
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + alpha * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


def hand_written(policy: harden.Policy, train: Any, device: torch.device, adversarial: bool) -> float:
    """The minimal loop; returns wall seconds for ``policy.train.epochs`` epochs."""
    model = fresh_model(policy, device)
    t = policy.train
    opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=True)
    t0 = time.perf_counter()
    for epoch in range(t.epochs):
        for xb, yb in make_loader(train, policy.data.batch_size, shuffle=True, seed=policy.seed, epoch=epoch):
            x, y = xb.to(device), yb.to(device)
            if adversarial:
                model.eval()
                for p in model.parameters():
                    p.requires_grad_(False)
                x = pgd(model, x, y, EPS, STEPS)
                for p in model.parameters():
                    p.requires_grad_(True)
            model.train()
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def through_harden(policy: harden.Policy, train: Any, device: torch.device) -> float:
    model = fresh_model(policy, device)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        harden.fit(model, policy, train=train, val=None, run_dir=tmp, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0


def through_art(policy: harden.Policy, train: Any, device: torch.device) -> float | None:
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
    xs, ys = zip(*(train[i] for i in range(len(train))), strict=True)
    x = torch.stack(xs).numpy().astype(np.float32)
    y = np.array([int(v) for v in ys])
    trainer = AdversarialTrainerMadryPGD(
        clf, nb_epochs=t.epochs, batch_size=policy.data.batch_size, eps=EPS, eps_step=2.5 * EPS / STEPS, max_iter=STEPS
    )
    t0 = time.perf_counter()
    trainer.fit(x, y)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    pgd_policy = policy_for({"name": "pgd_at", "params": {"steps": STEPS}}, args.epochs, args.device)
    ce_policy = policy_for({"name": "ce"}, args.epochs, args.device)
    train = load_data(pgd_policy.data).train
    # warm-up (allocator, kernels), then the measured runs
    hand_written(
        ce_policy.model_copy(update={"train": ce_policy.train.model_copy(update={"epochs": 1})}), train, device, False
    )
    h_pgd = through_harden(pgd_policy, train, device)
    w_pgd = hand_written(pgd_policy, train, device, True)
    h_ce = through_harden(ce_policy, train, device)
    w_ce = hand_written(ce_policy, train, device, False)
    art = through_art(pgd_policy, train, device)
    for name, v in (("harden pgd", h_pgd), ("hand pgd", w_pgd), ("harden ce", h_ce), ("hand ce", w_ce), ("art", art)):
        print(name, v, flush=True)
    n = len(train)
    per_epoch = 1 / args.epochs
    rows = [
        [
            f"pgd_at (PGD-{STEPS}) epoch",
            f"{h_pgd * per_epoch:.1f}",
            f"{w_pgd * per_epoch:.1f}",
            f"**{h_pgd / w_pgd:.3f}x**",
            f"{art * per_epoch:.1f} ({h_pgd / art:.2f}x)" if art is not None else "not installed",
        ],
        ["ce epoch", f"{h_ce * per_epoch:.1f}", f"{w_ce * per_epoch:.1f}", f"{h_ce / w_ce:.3f}x", "-"],
    ]
    ideal = [
        ["harden", f"{h_pgd / h_ce:.2f}x", f"{STEPS + 1}x"],
        ["hand-written", f"{w_pgd / w_ce:.2f}x", f"{STEPS + 1}x"],
    ]
    lines = [
        f"timm ResNet-10-T, mnist-5k training split ({n} images, batch 128), {args.epochs} epoch(s), linf eps {EPS}, "
        f"PGD-{STEPS}; device {args.device}. Seconds per epoch; ratio harden / hand-written (goal <= 1.05).",
        "",
        *table(["training", "harden s", "hand-written s", "ratio", "IBM ART s (harden / ART)"], rows),
        "",
        f"Cost against the ideal: a PGD-{STEPS} step is {STEPS} attack passes plus one training pass, about "
        f"{STEPS + 1} plain steps (an attack pass skips the weight gradients, so it can be a little cheaper).",
        "",
        *table(["loop", "pgd_at epoch / ce epoch", "ideal (k + 1)"], ideal),
        "",
    ]
    write_section(
        "training" if args.device == "cpu" else f"training-{args.device}",
        f"Training overhead ({args.device})",
        f"python benchmarks/training.py --epochs {args.epochs} --device {args.device}",
        lines,
        {"harden_pgd_s": h_pgd, "hand_pgd_s": w_pgd, "harden_ce_s": h_ce, "hand_ce_s": w_ce, "art_pgd_s": art},
    )


if __name__ == "__main__":
    main()
