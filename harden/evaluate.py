"""``harden.evaluate``: verify and certify a model trained elsewhere, without training it.

The RobustBench / AutoAttack workflow in one call: :func:`evaluate` loads the policy's data once,
builds (or wraps) the model, loads a plain or harden-wrapped weights file exactly
(:func:`harden.model_load.load_classifier_weights`), states the normalization it applies, runs the
policy's attack suite (:func:`harden.verify.verify`) and assembles the certificate
(:func:`harden.certify.certify`). Nothing is trained, so the certificate has no training
history. The normalization is only what you pass (``mean``/``std``) or what the policy states
(``model.mean``/``model.std``); it is printed through ``say`` and recorded in the certificate's
policy.

With ``out``, the folder is held like a run's (:class:`harden.runfolder.RunFolder`: a used
folder needs ``overwrite``) and gets ``policy.yaml`` (the policy as evaluated: its model section
names the model, the normalization and the output adapter used), ``model.safetensors`` /
``model.json`` (the weights as evaluated, harden's format), ``report.json`` and the certificate
(``certificate.json`` last), so ``harden inspect OUT`` checks it like any run.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from harden.batches import resolve_device
from harden.certificate import Certificate
from harden.certify import certify
from harden.checkpoint import atomic_write
from harden.data import DataBundle, eval_batches, load_data
from harden.errors import DataError
from harden.model_load import load_model
from harden.models import Normalized, check_model, model_device
from harden.policy import Policy
from harden.policy_io import checked, dump_policy, load_policy, policy_hash, validate_policy
from harden.runfolder import RunFolder
from harden.train import save_model
from harden.verify import RobustnessReport, verify

__all__ = ["EvaluateResult", "evaluate"]

ModelArg = nn.Module | str | None


@dataclass(frozen=True)
class EvaluateResult:
    """What :func:`evaluate` measured.

    Attributes:
        model: the evaluated model (:class:`harden.models.Normalized`, eval mode).
        report: the attack suite's report (``out/report.json``).
        certificate: the certificate (as written to ``out/certificate.json`` when ``out`` is given).
        certificate_path: ``out/certificate.json``, or None without ``out``.
        normalization: the normalization applied, one line
            (:meth:`~harden.models.Normalized.describe_normalization`).
    """

    model: Normalized
    report: RobustnessReport
    certificate: Certificate
    certificate_path: Path | None
    normalization: str


def evaluate(
    model: ModelArg,
    policy: Policy | str | Path,
    *,
    weights: str | Path | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    output: int | str | None = None,
    data: DataBundle | None = None,
    out: str | Path | None = None,
    baseline: ModelArg = None,
    baseline_weights: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> EvaluateResult:
    """Verify and certify an existing model under ``policy``, without training it.

    Args:
        model: an ``nn.Module``, a name (``timm:NAME`` or ``package.module:attr``; a name you pass
            is your own opt-in to import it) or None for the policy's ``model``
            (:func:`harden.model_load.load_model`). A model built here goes to the policy's
            ``device``; a module you pass stays where it is.
        policy: a :class:`~harden.policy.Policy` or the path of a policy YAML file (read with
            :func:`harden.load_policy`: code it names needs ``load_policy(..., allow_code=...)``).
        weights: a weights file: ``.safetensors`` or a weights-only ``.pth``/``.pt``/``.bin``, a
            plain ``state_dict`` or harden's (:func:`harden.model_load.load_classifier_weights`).
        mean: the per-channel mean the model expects; with ``std`` it replaces the policy's
            ``model.mean``/``model.std``. Neither: the policy's (no normalization when it sets none).
        std: the per-channel std, as ``mean``.
        output: where the logits are in what the model returns (a dict key or attribute name,
            or a tuple index); None: the policy's ``model.output``.
        data: the policy's data already loaded (:func:`harden.data.load_data`); None: loaded here, once.
        out: a folder to write the evaluation into (see the module's docstring); None: nothing written.
        baseline: an undefended model shown beside this one in the certificate (an
            ``nn.Module`` or a name); None with ``baseline_weights``: the same architecture as
            ``model``.
        baseline_weights: the baseline's weights file.
        overwrite: replace harden's files of an earlier run or evaluation in ``out``.
        progress: show progress bars.
        say: receives the human lines (the normalization applied, the model, what was written).

    Returns:
        An :class:`EvaluateResult`.

    Raises:
        ModelError: a bad model name, weights that do not fit, a head of the wrong size, a
            normalization that disagrees with the weights file.
        RunFolderError: ``out`` is held by another process, or used and ``overwrite`` is not given.
        HardenError: a bad policy or data (one line each).

    Example:
        >>> import tempfile, torch
        >>> from harden.testing import TinyCNN, synthetic_bundle, tiny_policy
        >>> _ = torch.manual_seed(0)
        >>> policy = tiny_policy(verify={"checks": False, "n_examples": 32, "eps_sweep": [0.1], "check_steps": 2})
        >>> result = evaluate(TinyCNN(num_classes=3), policy, mean=[0.5], std=[0.25], data=synthetic_bundle(64, 32),
        ...                   out=tempfile.mkdtemp(), progress=False, say=print)  # doctest: +ELLIPSIS
        normalization: mean (0.5), std (0.25)
        ...
        >>> result.certificate.verdict, result.certificate_path.name, result.certificate.training
        ('EMPIRICAL', 'certificate.json', [])
    """
    tell = say if say is not None else (lambda _line: None)
    policy = checked(load_policy(policy) if isinstance(policy, (str, Path)) else policy)
    bundle = load_data(policy.data) if data is None else data
    if not isinstance(bundle, DataBundle):
        raise DataError(f"expected data as a harden DataBundle (harden.data.load_data), got {type(bundle).__name__}")
    how = {"mean": mean, "std": std, "output": output}
    net = _load(model, policy, bundle, weights, how)
    normalization = net.describe_normalization()
    tell(f"normalization: {normalization}")
    tell(f"model: {type(net.model).__name__}" + (f", weights {str(weights)!r}" if weights is not None else ""))
    if weights is None and not isinstance(model, nn.Module) and (model is not None or not policy.model.pretrained_file):
        warnings.warn(
            "expected weights to evaluate (--weights, weights=, or model.pretrained_file), got none: the model "
            "is freshly initialised and its certificate describes an untrained model",
            UserWarning,
            stacklevel=2,
        )
    base = None
    if baseline is not None or baseline_weights is not None:
        source = baseline if baseline is not None else _same_architecture(model)
        base = _load(source, policy, bundle, baseline_weights, how).to(model_device(net))
        tell(
            f"baseline: {type(base.model).__name__}"
            + (f", weights {str(baseline_weights)!r}" if baseline_weights else "")
        )
    evaluated = _as_evaluated(policy, model, net)
    if out is None:
        report, cert = _measure(net, evaluated, bundle, base, progress)
        return EvaluateResult(net, report, cert, None, normalization)
    with RunFolder.open(out, overwrite=overwrite, policy_hash=policy_hash(evaluated)) as folder:
        report, cert = _measure(net, evaluated, bundle, base, progress)
        path = _write(folder.path, net, evaluated, report, cert, weights)
    tell(f"wrote {path} (report.json, model.safetensors, policy.yaml beside it)")
    return EvaluateResult(net, report, Certificate.load(path), path, normalization)


def _load(
    model: ModelArg, policy: Policy, bundle: DataBundle, weights: str | Path | None, how: dict[str, Any]
) -> Normalized:
    """The model built or wrapped with its weights, on its device, its head checked against the data."""
    net = load_model(
        model,
        policy,
        num_classes=bundle.num_classes,
        in_chans=bundle.in_chans,
        weights=weights,
        mean=how["mean"],
        std=how["std"],
        output=how["output"],
    )
    if not isinstance(model, nn.Module):  # built here: the policy names the device
        net = net.to(resolve_device(policy.device))
    x, _ = next(eval_batches(bundle.test, 2, 2))
    check_model(net, x.to(model_device(net)), bundle.num_classes)  # a head of the wrong size: the model's fault
    return net


def _same_architecture(model: ModelArg) -> ModelArg:
    """What builds a second copy of ``model``'s architecture: a deep copy of a module, else the same name."""
    return copy.deepcopy(model) if isinstance(model, nn.Module) else model


def _as_evaluated(policy: Policy, model: ModelArg, net: Normalized) -> Policy:
    """The policy with its model section as evaluated: the name, normalization and output used; no pretrained file."""
    doc = policy.model_dump(mode="json")
    section = dict(doc["model"])
    if isinstance(model, str) and model != section["name"]:
        section.update(name=model, args={})
    section.update(
        mean=None if net.mean_values is None else list(net.mean_values),
        std=None if net.std_values is None else list(net.std_values),
        output=net.output,
        pretrained_file=None,
    )
    doc["model"] = section
    return validate_policy(doc, source=f"policy {policy.name!r} as evaluated")


def _measure(
    net: Normalized, policy: Policy, bundle: DataBundle, base: Normalized | None, progress: bool
) -> tuple[RobustnessReport, Certificate]:
    report = verify(net, policy, bundle.test, bundle=bundle, progress=progress)
    cert = certify(net, policy, bundle.test, report=report, baseline=base, progress=progress)
    return report, cert


def _write(
    folder: Path,
    net: Normalized,
    policy: Policy,
    report: RobustnessReport,
    cert: Certificate,
    weights: str | Path | None,
) -> Path:
    """``policy.yaml``, ``model.safetensors``/``.json``, ``report.json``, then the certificate (``certificate.json`` last)."""
    atomic_write(folder / "policy.yaml", dump_policy(policy).encode())
    save_model(
        net, folder / "model.safetensors", {"evaluated": True, "source_weights": str(weights) if weights else None}
    )
    atomic_write(folder / "report.json", json.dumps(report.to_dict(), indent=2).encode())
    return cert.save(folder)
