"""Bring your own model and data: a plain nn.Module and a function returning your datasets.

The policy names the data function (``data.name: package.module:function`` returning
``(train_dataset, test_dataset)``); the model instance is handed to ``harden.run``.
Normalization goes into the model through the policy's ``model.mean``/``model.std`` so that
attacks and the ONNX graph take [0, 1] pixels. (``harden.fit(model, policy, train=loader)`` and
``harden.verify(model, policy, data)`` are the single steps, for data you hold as loaders.)

Run:  .venv/bin/python examples/custom_model.py
"""

from __future__ import annotations

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import TensorDataset

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
    "data": {"name": "examples.custom_model:my_data", "batch_size": 64},
    "threat": {"norm": "l2", "eps": 0.5},
    "train": {"epochs": 8, "lr": 0.05},
    "objectives": [{"name": "ce", "weight": 0.5}, {"name": "pgd_at", "weight": 0.5, "params": {"steps": 5}}],
    "verify": {
        "attacks": [{"name": "fgsm"}, {"name": "pgd", "params": {"steps": 20, "restarts": 2}}],
        "n_examples": 397,
    },
    "export": {"verify_examples": 32},
}


def main(epochs: int = 8, out: str = "runs/custom") -> harden.RobustnessReport:
    policy = harden.validate_policy({**POLICY, "train": {**POLICY["train"], "epochs": epochs}})
    torch.manual_seed(0)
    result = harden.run(policy, out, model=MyNet(), overwrite=True)  # a rerun replaces the last one
    assert result.report is not None
    print(result.report.summary())
    return result.report


if __name__ == "__main__":
    main()
