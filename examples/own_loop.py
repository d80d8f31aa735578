"""Harden your own PyTorch training loop: the policy's loss as one object, and one call to attack.

Your model, your data, your optimizer and your epochs; harden adds two things:

- ``harden.HardeningLoss(model, policy)``: ``loss_fn(x, y)`` is the policy's hardening loss on
  the batch (here TRADES: clean cross-entropy plus beta times the KL divergence to the PGD
  view), what one step of ``harden.fit`` minimises. ``start_epoch`` and ``after_step`` keep the
  objectives that have epoch or step state (``mi``, ``every:`` terms) in time.
- ``harden.attack(name, model, x, y, eps=...)``: any registered attack, one call.

The data here is scikit-learn's 8x8 digits as plain tensors (pixels in [0, 1]), split by
scikit-learn: nothing of harden's data loading is needed.

Run:  .venv/bin/python examples/own_loop.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

import harden
from harden.testing import TinyCNN

HERE = Path(__file__).resolve().parent


def digits() -> tuple[TensorDataset, TensorDataset]:
    """Your data: (train, test) datasets of float32 pixels in [0, 1], NCHW, and integer labels."""
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = train_test_split(range(len(y)), test_size=0.2, stratify=d.target, random_state=0)
    return TensorDataset(x[tr], y[tr]), TensorDataset(x[te], y[te])


def main(epochs: int = 5, attack: str = "apgd_ce", seed: int = 0) -> dict[str, float]:
    policy = harden.load_policy(HERE.parent / "policies" / "digits-trades.yaml")
    train, test = digits()
    torch.manual_seed(seed)  # the model's initial weights, the loader's order and the attacks' random starts
    model = TinyCNN(num_classes=10)
    loss_fn = harden.HardeningLoss(model, policy)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(train, batch_size=64, shuffle=True)

    for epoch in range(epochs):
        model.train()
        loss_fn.start_epoch(epoch, loader)  # a no-op for TRADES; mi warms its estimators up here
        total = 0.0
        for x, y in loader:
            loss = loss_fn(x, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss_fn.after_step()  # per-step state: every: counts, mi's alternating estimators
            total += float(loss.detach()) * len(y)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(train):.4f} ({loss_fn.last_terms})")

    model.eval()
    x_test, y_test = test.tensors
    x_adv = harden.attack(attack, model, x_test, y_test, eps=policy.threat.eps, params={"steps": 20})
    with torch.no_grad():
        clean_right = model(x_test).argmax(1) == y_test
        adv_right = model(x_adv).argmax(1) == y_test
    clean = float(clean_right.float().mean())
    robust = float((clean_right & adv_right).float().mean())  # robust: right on the clean and the attacked input
    print(
        f"clean accuracy {clean:.3f}, robust accuracy ({attack}, linf eps {policy.threat.eps}) {robust:.3f}, n {len(y_test)}"
    )
    return {"clean_accuracy": clean, "robust_accuracy": robust, "n": float(len(y_test))}


if __name__ == "__main__":
    main()
