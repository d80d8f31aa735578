"""The argument parser of the ``harden`` command: every subcommand and flag, nothing else.

It imports only argparse and the version string, so ``harden --help`` and ``harden --version``
are instant (no torch). The command functions live in :mod:`harden.cli`, above this module:
:func:`build_parser` takes them as a table and sets each subcommand's ``fn`` default.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping

__all__ = ["COMMANDS", "Command", "build_parser"]

Command = Callable[[argparse.Namespace], int]
"""A subcommand's function: the parsed arguments in, the exit code out."""

COMMANDS = ("run", "fit", "verify", "certify", "export", "inspect", "keygen", "check", "compare", "schema")
"""The subcommands, in the order ``harden --help`` lists them."""

_EPILOG = (
    "exit codes: 0 ok; 1 inspect found a bad file, signature or unmet requirement; 2 bad input "
    "(policy, data, model, weights, arguments) or a full disk, one line on stderr; 130 interrupted"
)


def _float(text: str) -> float:
    """A finite float for ``--mean`` / ``--std`` (argparse prints the one-line error).

    Example:
        >>> _float("0.5")
        0.5
        >>> _float("nan")
        Traceback (most recent call last):
        argparse.ArgumentTypeError: expected a finite number, got 'nan'
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _model_flags(p: argparse.ArgumentParser, *, onnx: bool) -> None:
    """``--model``, ``--weights``, ``--mean``, ``--std``, ``--output`` (and ``--onnx`` for verify, exclusive with --model)."""
    which = p.add_mutually_exclusive_group() if onnx else p
    which.add_argument(
        "--model",
        metavar="MODEL",
        help="evaluate this model instead of a harden run's: timm:NAME or module:attr (your own code, imported); "
        "with --weights, a plain state_dict (.safetensors, or a weights-only .pth/.pt)",
    )
    if onnx:
        which.add_argument(
            "--onnx",
            help="attack this ONNX file's onnxruntime session with the gradient-free attacks instead "
            "(writes OUT/report-onnx.json; the weights, if present, are the transfer surrogate)",
        )
    p.add_argument("--mean", nargs="+", type=_float, metavar="M", help="the model's input mean per channel")
    p.add_argument("--std", nargs="+", type=_float, metavar="S", help="the model's input std per channel")
    p.add_argument("--output", metavar="KEY", help="the logits of a model returning a dict/tuple: key or index")


def _policy_flags(p: argparse.ArgumentParser) -> None:
    """The ``POLICY`` argument, ``--set`` and the code opt-in (``--allow-code`` or ``--trust-policy-code``)."""
    p.add_argument("policy", metavar="POLICY", help="policy YAML file")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one policy key before validation (repeatable): train.epochs=1, "
        "verify.n_examples=200, objectives.0.weight=0.5; the value is YAML",
    )
    code = p.add_mutually_exclusive_group()
    code.add_argument(
        "--allow-code",
        action="append",
        metavar="MODULE",
        help="let the policy import code from MODULE or its submodules (repeatable); without it, a "
        "policy that names code (module:Name) is refused",
    )
    code.add_argument(
        "--trust-policy-code",
        action="store_true",
        help="let the policy import any code it names (only for policies you wrote or checked)",
    )


def _training_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """``run`` and ``fit``: ``--resume`` or ``--overwrite``; ``run`` also ``--sign-key``."""
    for name, help_ in (
        ("run", "fit, verify, export and certify in one go (prints the plan and a time estimate first)"),
        ("fit", "train a model on the policy"),
    ):
        p = add(name, help_)
        again = p.add_mutually_exclusive_group()
        again.add_argument("--resume", action="store_true", help="continue from the newest intact checkpoint in --out")
        again.add_argument(
            "--overwrite", action="store_true", help="replace the run in a used --out (deletes only harden's own files)"
        )
        if name == "run":
            p.add_argument("--sign-key", metavar="KEY", help="sign certificate.json with this Ed25519 private key")
            p.add_argument(
                "--baseline-weights",
                metavar="FILE",
                help="an undefended model's weights (the policy's architecture), verified by the same suite for "
                "the certificate's baseline column and curve",
            )


def _model_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """``verify``, ``certify`` and ``export``: the commands that load a trained (or any) model."""
    p = add("verify", "attack a trained model (a harden run's, or any with --model) with the policy's suite")
    p.add_argument("--weights", help="model weights (default: OUT/model.safetensors)")
    _model_flags(p, onnx=True)
    p.add_argument(
        "--onnx-device",
        choices=("auto", "cuda", "cpu"),
        default=None,
        help="onnxruntime device (default: the policy's device: cpu -> cpu, auto -> auto, cuda -> cuda)",
    )
    p = add("certify", "verify and certify any model without training (--model, --weights)")
    p.add_argument("--weights", help="the model's weights: .safetensors, or a weights-only .pth/.pt")
    _model_flags(p, onnx=False)
    p.add_argument("--baseline-weights", metavar="FILE", help="an undefended model's weights, shown beside it")
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in a used --out")
    p = add("export", "export a trained model to ONNX with a parity test")
    p.add_argument("--weights", help="model.safetensors (default: OUT/model.safetensors)")
    p.add_argument("--onnx", help="output file (default: OUT/model.onnx)")


def _other_commands(add: Callable[..., argparse.ArgumentParser]) -> None:
    """``inspect``, ``keygen``, ``check``, ``compare`` and ``schema``: no run folder of their own."""
    p = add("inspect", "re-hash the files a certificate vouches for", policy=False, out=False)
    p.add_argument("certificate", metavar="CERTIFICATE", help="certificate.json or the run directory")
    p.add_argument("--public-key", metavar="KEY", help="require a signature by this Ed25519 public key (harden keygen)")
    p.add_argument(
        "--require",
        action="append",
        metavar="EXPR",
        help='a requirement the certificate must meet, e.g. "robust_accuracy >= 0.45" (repeatable; exit 1 if not)',
    )
    p = add("keygen", "make an Ed25519 key pair for signing certificates", policy=False, out=False)
    p.add_argument("--key", default="harden-signing.key", help="private key file (default: harden-signing.key)")
    p.add_argument("--public", help="public key file (default: the private key's name with .pub)")
    add("check", "validate a policy file (exit 0 when valid, 2 with the reason when not)", out=False)
    p = add(
        "compare",
        "runs side by side: accuracies, McNemar tests on the shared examples, training time",
        policy=False,
        out=False,
    )
    p.add_argument("runs", metavar="RUN_DIR", nargs="+", help="run folders (report.json); the first is the baseline")
    p.add_argument("--json", metavar="FILE", help="also write the comparison as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="also plot the accuracies with 95%% Wilson intervals")
    p = add("schema", "print the policy's JSON Schema (for editor completion)", policy=False, out=False)
    p.add_argument("--markdown", action="store_true", help="print the policy reference in Markdown instead")
    p.add_argument("--certificate", action="store_true", help="print the JSON Schema of certificate.json instead")


def build_parser(commands: Mapping[str, Command]) -> argparse.ArgumentParser:
    """The argument parser of the ``harden`` command (imports nothing heavy: ``--help`` is instant).

    Args:
        commands: the function of each subcommand in :data:`COMMANDS`, by name; it becomes
            that subcommand's ``fn`` default (``args.fn(args)`` runs it).

    Returns:
        The parser; ``parse_args`` exits 2 with argparse's one-line message on bad arguments.

    Raises:
        ValueError: ``commands`` lacks a function for one of :data:`COMMANDS`.

    Example:
        >>> parser = build_parser(dict.fromkeys(COMMANDS, lambda args: 0))
        >>> args = parser.parse_args(["verify", "p.yaml", "--mean", "0.5", "--set", "seed=1"])
        >>> args.command, args.policy, args.mean, args.set, args.out, args.fn(args)
        ('verify', 'p.yaml', [0.5], ['seed=1'], 'runs/harden', 0)
    """
    from harden._version import __version__

    missing = [name for name in COMMANDS if name not in commands]
    if missing:
        raise ValueError(f"expected a function for every harden command, got none for {', '.join(missing)}")
    parser = argparse.ArgumentParser(
        prog="harden", description="Harden image classifiers against adversarial examples.", epilog=_EPILOG
    )
    parser.add_argument("--version", action="version", version=f"harden {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, policy: bool = True, out: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        if policy:
            _policy_flags(p)
        if out:
            p.add_argument("--out", default="runs/harden", help="run directory (default: runs/harden)")
            p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summaries")
        p.set_defaults(fn=commands[name])
        return p

    _training_commands(add)
    _model_commands(add)
    _other_commands(add)
    return parser
