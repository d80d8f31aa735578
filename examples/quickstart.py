"""Quickstart: harden a small CNN on scikit-learn's digits with TRADES: fit, verify, certify, export.

``harden.run`` is the whole job (the same one ``harden run POLICY --out DIR`` runs): the data is
loaded once; the model is trained, attacked, exported to ONNX, the ONNX session attacked too, and
the certificate written last.

Run:  .venv/bin/python examples/quickstart.py
"""

from __future__ import annotations

from pathlib import Path

import harden

HERE = Path(__file__).resolve().parent


def main(epochs: int = 10, out: str = "runs/quickstart") -> harden.Certificate:
    policy = harden.load_policy(HERE.parent / "policies" / "digits-trades.yaml")
    if epochs != policy.train.epochs:  # policies are frozen: make a modified copy
        policy = harden.validate_policy(
            {**policy.model_dump(mode="json"), "train": {**policy.train.model_dump(), "epochs": epochs}}
        )
    result = harden.run(policy, out, overwrite=True)  # a rerun replaces the last one (resume=True continues it)
    assert result.report is not None and result.certificate is not None and result.export is not None
    print(result.report.summary())
    print(f"ONNX parity: max |Δlogit| = {result.export.parity_max_abs_diff:.1e}; wrote {result.certificate_path}")
    return result.certificate


if __name__ == "__main__":
    main()
