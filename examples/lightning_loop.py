"""Harden a PyTorch Lightning model: the policy's loss in ``training_step``, its state in the checkpoint.

These hooks carry ``harden.HardeningLoss`` into Lightning:

- ``training_step`` returns ``loss_fn(x, y)`` (the batch is already on the model's device);
- ``on_train_epoch_start`` calls ``loss_fn.start_epoch(epoch, train_dataloader)`` and
  ``on_train_batch_end`` calls ``loss_fn.after_step()`` (after the optimizer step), so
  objectives with epoch or step state (``mi``, ``every:`` terms) keep in time;
- ``on_save_checkpoint`` / ``on_load_checkpoint`` keep ``loss_fn.state_dict()`` (``mi``'s
  estimators, the step count) beside the weights, so a resumed run continues where it stopped.

The loss object is not an ``nn.Module`` attribute of the LightningModule on purpose: it holds the
model, which Lightning already saves and moves. Validation under Lightning runs in
``torch.inference_mode`` by default, where no attack can take a gradient: measure robustness
after ``fit`` with ``harden.attack`` (as below), or pass ``Trainer(inference_mode=False)``.

The data is the policy's own (``harden.data.load_data(policy.data)``: scikit-learn's digits);
any DataLoader of pixels in [0, 1] does.

Run:  .venv/bin/python examples/lightning_loop.py
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

import harden
from harden.data import eval_batches, load_data
from harden.testing import TinyCNN

HERE = Path(__file__).resolve().parent


class HardenedClassifier(pl.LightningModule):
    """A classifier trained on the policy's hardening loss."""

    def __init__(self, model: nn.Module, policy: harden.Policy, lr: float = 0.05) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.loss_fn = harden.HardeningLoss(model, policy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(x, y)
        self.log("train_loss", loss, prog_bar=True)
        for name, value in self.loss_fn.last_terms.items():
            self.log(f"loss/{name}", value)
        return loss

    def on_train_epoch_start(self) -> None:
        self.loss_fn.start_epoch(self.current_epoch, self.trainer.train_dataloader)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.loss_fn.after_step()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["hardening_loss"] = self.loss_fn.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loss_fn.load_state_dict(checkpoint["hardening_loss"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9)


def main(epochs: int = 3, checkpoint: str | None = None, seed: int = 0) -> dict[str, float]:
    policy = harden.load_policy(HERE.parent / "policies" / "digits-trades.yaml")
    bundle = load_data(policy.data)  # the policy's data (digits): train and test datasets of pixels in [0, 1]
    pl.seed_everything(seed, verbose=False)
    module = HardenedClassifier(TinyCNN(num_classes=10), policy)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(bundle.train, batch_size=64, shuffle=True))
    if checkpoint is not None:
        trainer.save_checkpoint(checkpoint)  # the weights and loss_fn.state_dict(), via on_save_checkpoint

    model = module.model.eval()
    x_test, y_test = next(iter(eval_batches(bundle.test, len(bundle.test))))
    x_adv = harden.attack("apgd_ce", model, x_test, y_test, eps=policy.threat.eps, params={"steps": 20})
    with torch.no_grad():
        clean_right = model(x_test).argmax(1) == y_test
        adv_right = model(x_adv).argmax(1) == y_test
    clean = float(clean_right.float().mean())
    robust = float((clean_right & adv_right).float().mean())
    print(f"clean accuracy {clean:.3f}, robust accuracy (apgd_ce, linf eps {policy.threat.eps}) {robust:.3f}")
    return {"clean_accuracy": clean, "robust_accuracy": robust, "n": float(len(y_test))}


if __name__ == "__main__":
    main()
