"""``harden.verify_onnx``: attack the exported ONNX model itself, with gradient-free attacks.

The ONNX graph is what ships, so its robustness is measured on the onnxruntime session, not on
the PyTorch model it came from. A session has no gradients, so only the black-box part of the
suite runs, as the same per-example worst-case cascade as :func:`harden.verify`:

- ``transfer``: PGD on a surrogate, evaluated on the session. With ``torch_model`` the surrogate
  is that PyTorch model (the one exported: a strong transfer source whose gradients are the
  graph's up to float error); else the policy's ``transfer`` attack, if it has one, loads or
  trains its own surrogate as in :func:`harden.verify`.
- ``square``: the policy's Square attack(s) (the ``standard`` preset included), else Square
  with ``n_queries=1000`` (a fifth of AutoAttack's budget: enough to expose an export that lost
  robustness, modest on a CPU).
- ``noise``: the policy's ``noise`` attack(s), else ``noise`` with its defaults (10 draws).

The cascade runs transfer, then Square, then noise. The policy's gradient-free attacks outside
the l_p threat model (``invariance``, ``invariance_examples``) run on every example and are
reported apart, as in :func:`harden.verify`. Gradient attacks, the eps sweep and the sanity
checks are skipped: they need gradients. Clean accuracy comes from the session.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harden._cascade import prepared_attacks, run_cascade
from harden.attacks import ATTACKS
from harden.attacks.suite import attack_spec, preset_specs
from harden.checkpoint import sha256_file
from harden.data import DataBundle, EvalData, load_data
from harden.errors import ModelError
from harden.models import model_device, prepare_model
from harden.policy import AttackSpec, Policy
from harden.policy_io import checked, policy_hash
from harden.robustness import RobustnessReport
from harden.runtime import OnnxClassifier, OnnxModule, load_onnx

__all__ = ["DEFAULT_SQUARE_QUERIES", "OnnxReport", "gradient_free_specs", "verify_onnx"]

#: Square's query budget when the policy has no ``square`` attack.
DEFAULT_SQUARE_QUERIES = 1000

_RANK = {"transfer": 0, "square": 1, "noise": 2}


@dataclass
class OnnxReport(RobustnessReport):
    """A :class:`harden.robustness.RobustnessReport` measured on an ONNX session.

    Attributes:
        onnx: the file (``path``, ``sha256``), the providers that ran, the device and the
            model's metadata.
    """

    onnx: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """The report's lines, then the ONNX file and the providers that ran it."""
        head = f"onnx             {self.onnx.get('path', '?')} on {', '.join(self.onnx.get('providers', []))}"
        return head + "\n" + super().summary()


def gradient_free_specs(policy: Policy, *, with_transfer: bool = False) -> list[AttackSpec]:
    """The attacks :func:`verify_onnx` runs for ``policy``, in cascade order.

    The policy's gradient-free attacks (preset included), plus Square
    (``n_queries=DEFAULT_SQUARE_QUERIES``) and noise when the policy has none, plus a default
    ``transfer`` when ``with_transfer`` and the policy has none; ordered transfer, Square,
    noise, then the rest in policy order.

    Example:
        >>> from harden.testing import tiny_policy
        >>> specs = gradient_free_specs(tiny_policy(), with_transfer=True)  # tiny_policy: fgsm and pgd only
        >>> [s.name for s in specs], specs[1].params["n_queries"]
        (['transfer', 'square', 'noise'], 1000)
    """
    specs = [*preset_specs(policy.verify.preset), *policy.verify.attacks]
    free = [s for s in specs if not ATTACKS.get(s.name).white_box]
    names = {s.name for s in free}
    if with_transfer and "transfer" not in names:
        free.append(attack_spec("transfer"))
    if "square" not in names:
        free.append(attack_spec("square", {"n_queries": DEFAULT_SQUARE_QUERIES}))
    if "noise" not in names:
        free.append(attack_spec("noise"))
    return sorted(free, key=lambda s: _RANK.get(s.name, len(_RANK)))


def _surrogate(torch_model: nn.Module, policy: Policy, device: torch.device) -> nn.Module:
    net = prepare_model(torch_model, policy.model)
    found = model_device(net)
    if found != device:
        raise ModelError(
            f"expected torch_model on {device} (where the ONNX session's inputs live), got it on {found}; "
            "move it yourself (harden never moves a model)"
        )
    return net


def _warn_other_policy(clf: OnnxClassifier, policy: Policy) -> None:
    """Warn when the file's metadata names another policy than the one it is verified against."""
    stored = clf.metadata.get("policy_hash")
    if stored is not None and stored != policy_hash(policy):
        warnings.warn(
            f"{clf.path.name} was exported under another policy (hash {stored[:12]}...); verifying it against this one",
            UserWarning,
            stacklevel=3,
        )


def verify_onnx(
    onnx: str | Path | OnnxClassifier,
    policy: Policy,
    data: EvalData | None = None,
    *,
    bundle: DataBundle | None = None,
    torch_model: nn.Module | None = None,
    device: str = "auto",
    progress: bool = True,
) -> OnnxReport:
    """Attack an ONNX session with the gradient-free part of the policy's suite (see the module).

    Args:
        onnx: the ``.onnx`` file, or a session from :func:`harden.load_onnx`.
        policy: gives the threat model, the attacks, ``verify.n_examples`` and the seed.
        data: a DataLoader, a Dataset, or an ``(x, y)`` pair (default: the test split of
            ``bundle`` or of the policy's data).
        bundle: the policy's data already loaded; its train split is the ``invariance_examples``
            pool and a ``transfer`` surrogate's training data (None: loaded if one needs it).
        torch_model: the PyTorch model the file was exported from: the transfer surrogate. It
            must be on ``classifier.torch_device`` (the CPU unless the session runs on CUDA).
        device: ``auto``, ``cuda`` or ``cpu`` when ``onnx`` is a path (see :func:`load_onnx`).
        progress: show a progress bar.

    Returns:
        An :class:`OnnxReport` (a :class:`harden.robustness.RobustnessReport`; no checks, no eps
        curve) with the providers that ran.

    Raises:
        ExportError: the file cannot be loaded, or ``device="cuda"`` and CUDA does not run.
        ModelError: ``torch_model`` is not where the session's inputs live.
        DataError: the data does not fit the graph (channels, size, range).

    Example:
        >>> import tempfile, harden
        >>> from harden.testing import TinyCNN, synthetic_tensors, tiny_policy
        >>> model, path = TinyCNN(num_classes=3), tempfile.mkdtemp() + "/tiny.onnx"
        >>> _ = harden.export_onnx(model, path, input_shape=(1, 8, 8))
        >>> policy = tiny_policy(verify={"attacks": [{"name": "square", "params": {"n_queries": 20}}]})
        >>> r = verify_onnx(path, policy, synthetic_tensors(16), torch_model=model, device="cpu", progress=False)
        >>> list(r.per_attack), r.robust_accuracy <= r.clean_accuracy, r.onnx["providers"]
        (['transfer', 'square', 'noise'], True, ['CPUExecutionProvider'])
    """
    t0 = time.perf_counter()
    policy = checked(policy)
    clf = onnx if isinstance(onnx, OnnxClassifier) else load_onnx(onnx, device)
    _warn_other_policy(clf, policy)
    net = OnnxModule(clf, batch_size=policy.data.eval_batch_size)
    dev = clf.torch_device
    surrogate = _surrogate(torch_model, policy, dev) if torch_model is not None else None
    if data is None:
        bundle = bundle if bundle is not None else load_data(policy.data)
        data = bundle.test
    specs = gradient_free_specs(policy, with_transfer=surrogate is not None)
    lp_attacks, other_attacks, other_caps = prepared_attacks(specs, policy, bundle, dev, surrogate)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(policy.seed)
        tally = run_cascade(
            net,
            data,
            lp_attacks,
            other_attacks,
            other_caps,
            dev,
            batch_size=policy.data.eval_batch_size,
            limit=policy.verify.n_examples,
            desc="verify onnx",
            progress=progress,
            in_chans=clf.input_shape[0] if clf.input_shape is not None else None,
            sample=policy.verify.sample,  # the same examples harden.verify draws from the same data
            seed=policy.seed,
        )
    return OnnxReport(
        **tally.report_fields(policy, specs, time.perf_counter() - t0),
        onnx={
            "path": str(clf.path),
            "sha256": sha256_file(clf.path),
            "providers": list(clf.providers),
            "device": clf.device,
            "fallback_reason": clf.fallback_reason,
            "metadata": dict(clf.metadata),
        },
    )
