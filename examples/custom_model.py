"""Bring your own model and data: a plain nn.Module and your own DataLoaders.

The policy only needs the threat model, the objectives and the training settings; the model and
the data come from your code. Normalization goes into the model through the policy's
``model.mean``/``model.std`` so that attacks and the ONNX graph take [0, 1] pixels.

Run:  .venv/bin/python examples/custom_model.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import harden


class MyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(32 * 16, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def my_data() -> tuple[TensorDataset, TensorDataset]:
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # pixels in [0, 1]
    y = torch.tensor(d.target)
    return TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])


POLICY = {
    "name": "custom",
    "model": {"name": "examples.custom_model:MyNet", "mean": [0.3], "std": [0.4]},
    "threat": {"norm": "l2", "eps": 0.5},
    "train": {"epochs": 8, "lr": 0.05},
    "objectives": [{"name": "ce", "weight": 0.5}, {"name": "pgd_at", "weight": 0.5, "params": {"steps": 5}}],
    "verify": {
        "attacks": [{"name": "fgsm"}, {"name": "pgd", "params": {"steps": 20, "restarts": 2}}],
        "n_examples": 397,
    },
}


def main(epochs: int = 8, out: str = "runs/custom") -> harden.RobustnessReport:
    policy = harden.validate_policy({**POLICY, "train": {**POLICY["train"], "epochs": epochs}})
    train, test = my_data()
    torch.manual_seed(0)
    result = harden.fit(MyNet(), policy, train=DataLoader(train, batch_size=64, shuffle=True), val=test, run_dir=out)
    report = harden.verify(result.model, policy, test)
    print(report.summary())
    return report


if __name__ == "__main__":
    main()
