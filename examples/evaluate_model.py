"""Evaluate and certify a model trained elsewhere: a plain ``state_dict`` file, no training by harden.

Your training script (a few lines of plain PyTorch here, standing in for yours) normalizes the
pixels itself and saves ``model.state_dict()`` with ``torch.save``. harden builds the same
architecture by name, loads the file exactly, folds the normalization you state into the model
(``mean``/``std``: harden never guesses it), attacks it with the policy's suite and writes the
certificate. The same from the command line::

    harden certify POLICY --model examples.evaluate_model:SmallNet --weights mine.pth \\
        --mean 0.3 --std 0.4 --out runs/evaluated

Run:  .venv/bin/python examples/evaluate_model.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import harden
from harden.data import DataBundle, load_data

MEAN, STD = 0.3, 0.4  # what your training script normalized with: state it, harden never guesses it

POLICY = {
    "name": "evaluate-digits",
    "seed": 0,
    "data": {"name": "digits", "eval_batch_size": 200},
    "threat": {"norm": "linf", "eps": 0.1},
    "objectives": [{"name": "ce"}],  # required by the schema; nothing is trained
    "verify": {
        "attacks": [{"name": "fgsm"}, {"name": "pgd", "params": {"steps": 10}}],
        "n_examples": 200,
        "check_examples": 32,
        "check_steps": 5,
    },
    "certify": {"saliency_examples": 2},
}


class SmallNet(nn.Module):
    """A small CNN for 8x8 digits (10 classes): your architecture."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def train_elsewhere(bundle: DataBundle, epochs: int, seed: int = 0) -> SmallNet:
    """Your own training script, in plain PyTorch: it normalizes the pixels itself (harden is not involved)."""
    torch.manual_seed(seed)
    net = SmallNet()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=64, shuffle=True)
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(net((x - MEAN) / STD), y).backward()
            opt.step()
    return net.eval()


def main(out: str, epochs_elsewhere: int = 3, progress: bool = True) -> harden.EvaluateResult:
    """Train ``SmallNet`` in plain PyTorch, save its ``state_dict``, then evaluate the file with harden into ``out``."""
    policy = harden.validate_policy(POLICY, source="examples/evaluate_model.py")
    bundle = load_data(policy.data)  # loaded once, handed to evaluate
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "mine.pth"
        torch.save(train_elsewhere(bundle, epochs_elsewhere).state_dict(), weights)  # a plain state_dict
        return harden.evaluate(
            "examples.evaluate_model:SmallNet",  # a name you pass is your own opt-in: no allow_code needed
            policy,
            weights=weights,
            mean=[MEAN],
            std=[STD],
            data=bundle,
            out=out,
            overwrite=True,
            progress=progress,
            say=print,
        )


if __name__ == "__main__":
    result = main("runs/evaluated")
    cert = result.certificate
    print(result.report.summary())
    print(f"clean {cert.clean_accuracy:.1%}, robust {cert.robust_accuracy:.1%} -> {result.certificate_path}")
