"""The labels and number formats of a certificate's report: what people read instead of JSON keys.

:mod:`harden.report_sections` builds the sections from these; :mod:`harden.report` renders
them. The certificate is named only in annotations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harden.certificate import Certificate

__all__ = [
    "CHECK_LABELS",
    "CLEAN_LABEL",
    "DASH",
    "ROBUST_LABEL",
    "Block",
    "Plot",
    "Section",
    "Table",
    "attack_label",
    "ci",
    "fmt",
    "key_label",
    "pct",
    "status_label",
    "threat_text",
]

#: what a missing value reads as
DASH = "—"
#: a table: its header and its rows of cells
Table = tuple[list[str], list[list[str]]]
#: attacks, checks and keys (training history, ONNX export) as people read them
_ATTACKS = {
    "fgsm": "FGSM: one signed-gradient step (white-box)",
    "pgd": "PGD: projected gradient descent on cross-entropy (white-box)",
    "apgd_ce": "APGD-CE: AutoAttack's step-size-free PGD on cross-entropy (white-box)",
    "apgd_t": "APGD-T: AutoAttack's targeted APGD on the DLR loss (white-box)",
    "fab_t": "FAB-T: targeted minimal-perturbation attack (white-box)",
    "square": "Square: score-based random search, no gradients (black-box)",
    "transfer": "Transfer: adversarial examples of a surrogate model (black-box)",
    "noise": "Noise: random perturbations in the eps ball (black-box sanity baseline)",
    "iwd": "IWD: Wasserstein-distance perturbations (outside the l_p threat model)",
    "invariance": "Invariance: label-preserving transformations (outside the l_p threat model)",
    "invariance_examples": "Invariance examples: label-changing edits (agreement with the new label)",
}
CHECK_LABELS = {
    "deterministic_eval": "Deterministic predictions",
    "logits_not_probabilities": "Outputs are logits, not probabilities",
    "input_gradients": "Input gradients are usable",
    "large_eps_to_chance": "A large eps brings accuracy to chance",
    "unbounded_attack_succeeds": "An unbounded attack always succeeds",
    "more_iterations_never_help": "More attack iterations do not help",
    "white_box_beats_black_box": "White-box attacks beat black-box ones",
    "no_catastrophic_overfitting": "No catastrophic overfitting",
    "onnx_black_box": "The ONNX session holds where PyTorch held",
}
_KEYS = {  # training history and ONNX export fields
    "epoch": "Epoch",
    "lr": "Learning rate",
    "train_loss": "Training loss",
    "val_clean_acc": "Validation clean accuracy",
    "val_pgd_acc": "Validation PGD accuracy (the probe)",
    "seconds": "Seconds",
    "skipped_steps": "Skipped steps (non-finite loss)",
    "exporter": "Exporter",
    "opset": "ONNX opset",
    "sha256": "SHA-256",
    "path": "File",
    "parity_examples": "Parity inputs (clean)",
    "parity_max_abs_diff": "Largest logit difference (clean)",
    "parity_argmax_agreement": "Same predicted class (clean)",
    "parity_adversarial_examples": "Parity inputs (adversarial)",
    "parity_adversarial_max_abs_diff": "Largest logit difference (adversarial)",
    "parity_adversarial_argmax_agreement": "Same predicted class (adversarial)",
    "providers": "onnxruntime providers",
    "metadata": "Metadata stamped into the file",
}
#: the rows of the clean and the worst-case accuracy
CLEAN_LABEL = "Clean accuracy (no attack)"
ROBUST_LABEL = "Robust accuracy (worst case over the suite)"


@dataclass(frozen=True)
class Plot:
    """Where a plot goes (HTML only): the key of :func:`harden.plots.certificate_plots`."""

    key: str


#: one part of a section: a paragraph, a table or a plot
Block = str | Table | Plot


@dataclass
class Section:
    """One titled part of the certificate: paragraphs (str) and tables, in order (both formats)."""

    title: str
    blocks: list[Block] = field(default_factory=list)


def pct(x: float | None) -> str:
    """A fraction as a percentage with two decimals (:data:`DASH` for None).

    Example:
        >>> pct(0.965), pct(None)
        ('96.50%', '—')
    """
    return DASH if x is None else f"{x:.2%}"


def fmt(v: Any) -> str:
    """Any value of the certificate as a short text: 4 significant digits, ``k=v`` pairs, lower-case booleans.

    Example:
        >>> fmt(0.123456), fmt(True), fmt({"steps": 10, "eps": None}), fmt([1, 2.5])
        ('0.1235', 'true', 'steps=10', '1, 2.5')
    """
    if v is None:
        return DASH
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt(x)}" for k, x in v.items() if x is not None) or DASH
    if isinstance(v, list | tuple):
        return ", ".join(fmt(x) for x in v)
    return str(v)


def ci(cert: Certificate, key: str) -> str:
    """The 95% Wilson interval of the accuracy ``key`` (``clean``, ``robust``, an attack label) as text.

    Example:
        >>> from types import SimpleNamespace
        >>> ci(SimpleNamespace(intervals={"robust": (0.9, 0.99)}), "robust"), ci(SimpleNamespace(intervals={}), "pgd")
        ('[90.00%, 99.00%]', '—')
    """
    lo_hi = cert.intervals.get(key)
    return DASH if lo_hi is None else f"[{pct(lo_hi[0])}, {pct(lo_hi[1])}]"


def threat_text(cert: Certificate) -> str:
    """The threat model as ``key = value`` pairs (unset ones left out).

    Example:
        >>> from types import SimpleNamespace
        >>> threat_text(SimpleNamespace(threat={"norm": "linf", "eps": 0.1, "radius": None}))
        'norm = linf, eps = 0.1'
    """
    return ", ".join(f"{k} = {fmt(v)}" for k, v in cert.threat.items() if v is not None) or DASH


def attack_label(label: str) -> str:
    """An attack label for people: ``pgd#2`` -> ``PGD: ... (run 2)``.

    Example:
        >>> attack_label("pgd#2")
        'PGD: projected gradient descent on cross-entropy (white-box) (run 2)'
    """
    name, _, k = label.partition("#")
    text = _ATTACKS.get(name, name)
    return f"{text} (run {k})" if k else text


def key_label(key: str) -> str:
    """A training-history or export key for people (its own label, else the key in words).

    Example:
        >>> key_label("val_pgd_acc"), key_label("new_field")
        ('Validation PGD accuracy (the probe)', 'New field')
    """
    return _KEYS.get(key, key.replace("_", " ").capitalize())


def status_label(status: str) -> str:
    """A check's status for people: a SKIP tested nothing, so it reads ``SKIP (N/A)``.

    Example:
        >>> status_label("SKIP"), status_label("PASS")
        ('SKIP (N/A)', 'PASS')
    """
    return "SKIP (N/A)" if status == "SKIP" else status
