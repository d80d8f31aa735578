"""Quickstart: harden a small CNN on scikit-learn's digits with TRADES, verify, certify, export.

Run:  .venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

from pathlib import Path

import harden
from harden.policy import validate_policy

HERE = Path(__file__).resolve().parent


def main(epochs: int = 10, out: str = "runs/quickstart") -> harden.Certificate:
    policy = harden.load_policy(HERE.parent / "policies" / "digits-trades.yaml")
    if epochs != policy.train.epochs:  # policies are frozen: make a modified copy
        policy = validate_policy(
            {**policy.model_dump(mode="json"), "train": {**policy.train.model_dump(), "epochs": epochs}}
        )
    result = harden.fit(None, policy, run_dir=out)
    report = harden.verify(result.model, policy)
    print(report.summary())
    cert = harden.certify(result.model, policy, report=report, history=result.history)
    exported = harden.export_onnx(
        result.model, Path(out) / "model.onnx", policy=policy, certificate=cert, input_shape=(1, 8, 8)
    )
    cert.onnx_sha256 = exported.sha256
    cert.save(out)
    print(f"ONNX parity: max |Δlogit| = {exported.parity_max_abs_diff:.1e}; wrote {out}/certificate.json")
    return cert


if __name__ == "__main__":
    main()
