"""The ``harden`` command: a thin layer over the public API.

``harden run POLICY --out DIR`` fits, verifies, exports and writes the certificate; ``fit``,
``verify``, ``export``, ``check`` and ``schema`` are the single steps. Errors harden raises on
purpose print one line and exit 2 (a full disk too); anything else is a bug and keeps its
traceback. Warnings print one line each, ``harden: warning: ...``. The flags are defined in
:mod:`harden.cli_parser` (argparse only: ``--help`` imports no torch); this module holds the
``cmd_*`` function of each subcommand and what they print.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harden import cli_parser
from harden.cli_parser import Command
from harden.errors import HardenError, InputError

__all__ = ["main"]

EXIT_USAGE = 2


def _allowed_code(args: argparse.Namespace) -> bool | list[str]:
    """The opt-in for code a policy names: ``--trust-policy-code`` (all) or the ``--allow-code`` modules."""
    if getattr(args, "trust_policy_code", False):
        return True
    return list(getattr(args, "allow_code", None) or [])


def _policy(args: argparse.Namespace) -> Any:
    from harden.policy_io import load_policy

    return load_policy(args.policy, allow_code=_allowed_code(args), overrides=getattr(args, "set", None) or ())


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, flush=True)


def _weights(args: argparse.Namespace) -> Path:
    return Path(args.weights) if args.weights else Path(args.out) / "model.safetensors"


def cmd_fit(args: argparse.Namespace) -> int:
    from harden.train import fit

    policy = _policy(args)
    result = fit(
        None, policy, run_dir=Path(args.out), resume=args.resume, overwrite=args.overwrite, progress=not args.quiet
    )
    if result.info.get("rank", 0) == 0:  # under torchrun only rank 0 reports
        from harden.pipeline import fit_summary

        for line in fit_summary(policy, result):
            _say(args, line)
    return 0


def _onnx_device(args: argparse.Namespace, policy: Any) -> str:
    """``--onnx-device``, else the policy's device: cpu -> cpu, auto -> auto, cuda[:N] -> cuda (mps: cpu)."""
    if args.onnx_device:
        return str(args.onnx_device)
    device = str(policy.device)
    return "cuda" if device.startswith("cuda") else "auto" if device == "auto" else "cpu"


def _model_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``harden.evaluate`` that the model flags give."""
    output = args.output
    if output is not None and output.lstrip("-").isdigit():
        output = int(output)
    return {"weights": args.weights, "mean": args.mean, "std": args.std, "output": output}


def _verify_model(args: argparse.Namespace, policy: Any) -> int:
    """``harden verify --model``: any model and plain weights, verified without training (harden.evaluate)."""
    from harden.checkpoint import atomic_write
    from harden.evaluate import evaluate

    given = _model_args(args)
    if args.model is None and given["weights"] is None:  # the policy's model: the run's weights, as plain verify
        given["weights"] = _weights(args)
    result = evaluate(args.model, policy, **given, progress=not args.quiet, say=lambda t: _say(args, t))
    atomic_write(Path(args.out) / "report.json", json.dumps(result.report.to_dict(), indent=2).encode())
    _say(args, result.report.summary())  # evaluate said the normalization it applied
    return 0


def _verify(args: argparse.Namespace) -> int:
    from harden.checkpoint import atomic_write
    from harden.train import load_trained, read_model_info
    from harden.verify import verify

    policy = _policy(args)
    stated = args.mean is not None or args.std is not None or args.output is not None
    if stated and args.onnx:
        raise InputError(
            "expected --mean/--std/--output with a PyTorch model, got them with --onnx; an ONNX graph holds its "
            "own normalization and output: drop them"
        )
    if args.model or stated:  # never ignore a stated normalization: the policy's model, loaded as evaluate does
        return _verify_model(args, policy)
    weights = _weights(args)
    if args.onnx:  # the session itself, gradient-free attacks; the weights (if any) are the transfer surrogate
        from harden.data import load_data
        from harden.runtime import load_onnx
        from harden.verify_onnx import verify_onnx

        clf = load_onnx(args.onnx, _onnx_device(args, policy))
        surrogate = None
        if args.weights or weights.is_file():
            surrogate, bundle = load_trained(policy, weights)
            surrogate = surrogate.to(clf.torch_device)  # explicit: it runs where the session's inputs live
        else:
            bundle = load_data(policy.data)
            _say(args, f"no trained weights at {weights}: transfer runs only if the policy has its own surrogate")
        onnx_report = verify_onnx(
            clf, policy, bundle.test, bundle=bundle, torch_model=surrogate, progress=not args.quiet
        )
        atomic_write(Path(args.out) / "report-onnx.json", json.dumps(onnx_report.to_dict(), indent=2).encode())
        _say(args, onnx_report.summary())
        if clf.fallback_reason:
            from harden.onnx_session import short_reason

            _say(args, f"onnxruntime ran on the CPU, CUDA did not run: {short_reason(clf.fallback_reason)}")
        return 0
    model, bundle = load_trained(policy, weights)
    history = read_model_info(weights).get("history", [])  # checked: a one-line CheckpointError if malformed
    report = verify(model, policy, bundle.test, bundle=bundle, history=history, progress=not args.quiet)
    atomic_write(Path(args.out) / "report.json", json.dumps(report.to_dict(), indent=2).encode())
    _say(args, report.summary())
    return 0


def _export(args: argparse.Namespace) -> int:
    from harden.export import export_onnx
    from harden.train import load_trained

    policy = _policy(args)
    model, bundle = load_trained(policy, _weights(args))
    onnx_path = Path(args.onnx) if args.onnx else Path(args.out) / "model.onnx"
    res = export_onnx(model, onnx_path, policy=policy, input_shape=bundle.image_shape, class_names=bundle.class_names)
    from harden.pipeline import export_summary

    _say(args, export_summary(res))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from harden.runfolder import hold

    with hold(args.out):  # no run writes into the folder while this step adds its report
        return _verify(args)


def cmd_export(args: argparse.Namespace) -> int:
    from harden.runfolder import hold

    with hold(args.out):
        return _export(args)


def cmd_run(args: argparse.Namespace) -> int:
    from harden.pipeline import run

    policy = _policy(args)
    run(
        policy,
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        sign_key=args.sign_key,
        progress=not args.quiet,
        baseline=args.baseline_weights,
        say=None
        if args.quiet
        else (lambda text: print(text, flush=True)),  # the plan first, then each stage's summary as it finishes
    )
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    from harden.evaluate import evaluate

    policy = _policy(args)
    result = evaluate(
        args.model,
        policy,
        **_model_args(args),
        out=args.out,
        baseline_weights=args.baseline_weights,
        overwrite=args.overwrite,
        progress=not args.quiet,
        say=lambda text: _say(args, text),
    )
    cert = result.certificate  # evaluate said the normalization it applied and what it wrote
    _say(args, result.report.summary())
    _say(
        args,
        f"clean accuracy {cert.clean_accuracy:.2%} | robust accuracy {cert.robust_accuracy:.2%} "
        f"({policy.threat.norm}, eps={policy.threat.eps}, n={cert.n}) | verdict {cert.verdict}",
    )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from harden.integrity import inspect_certificate

    extra = {"require": tuple(args.require)} if args.require else {}  # each requirement is one more check
    cert, checks = inspect_certificate(args.certificate, public_key=args.public_key, **extra)
    reason, name, created = (_printable(v) for v in (cert.verdict_reason, cert.policy_name, cert.created))
    print(f"certificate {args.certificate}: {cert.verdict} ({reason or 'no reason recorded'})")
    print(f"  policy {name}, created {created}, threat {_printable(str(cert.threat))}")
    print(f"  clean {cert.clean_accuracy:.2%}, robust {cert.robust_accuracy:.2%} (n={cert.n})")
    if cert.smoothing is not None and cert.smoothing.certified_accuracy is not None:
        s = cert.smoothing
        print(f"  certified {s.certified_accuracy:.2%} at l2 radius {s.radius:g} (sigma={s.sigma:g}, n={s.examples})")
    for note in cert.warnings:
        print(f"  warning: {_printable(note)}")
    print(f"  {'check':<14} {'status':<11} {'file':<18} detail")
    for c in checks:
        name = c.path.name if c.path is not None else "-"
        shown = c.actual or c.expected
        digest = f" (sha256 {shown[:16]})" if c.item in _HASHED and shown else ""
        print(f"  {c.item:<14} {c.status:<11} {_printable(name):<18} {_printable(c.detail)}{digest}")
    bad = [c for c in checks if not c.ok]
    if bad:
        names = ", ".join(f"{c.item} ({c.status.lower()})" for c in bad)
        print(f"harden: error: inspect failed: {names}", file=sys.stderr)
        return 1
    return 0


_HASHED = frozenset({"weights", "onnx", "policy", "markdown", "html"})


def _printable(text: str) -> str:
    r"""``text`` with control characters escaped: a forged certificate must not forge inspect's output.

    Example:
        >>> print(_printable("ok\n  signature OK\x1b[8m"))
        ok\n  signature OK\x1b[8m
    """
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def cmd_keygen(args: argparse.Namespace) -> int:
    from harden.signing import generate_keypair, key_id

    private = Path(args.key)
    public = Path(args.public) if args.public else private.with_suffix(".pub")
    ident = key_id(generate_keypair(private, public))
    print(f"wrote {private} (private: keep it secret, mode 0600) and {public} (public; key id {ident})")
    print(f"sign: harden run POLICY --sign-key {private}; check: harden inspect RUN_DIR --public-key {public}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from harden.checkpoint import atomic_write
    from harden.compare import compare_runs

    cmp = compare_runs(args.runs)
    print(cmp.table())
    if args.json:
        atomic_write(Path(args.json), json.dumps(cmp.to_dict(), indent=2).encode())
    if args.plot:
        atomic_write(Path(args.plot), cmp.plot_png())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from harden.policy_io import check_code, code_references, load_policy
    from harden.trust import BUILTIN_CODE

    policy = load_policy(args.policy, allow_code=True, overrides=args.set or ())  # validation only: nothing imported
    refs = code_references(policy)
    for ref in refs:
        note = " (harden's built-in tiny model)" if ref.ref in BUILTIN_CODE else ""
        print(f"{args.policy}: {ref.path} imports code: {ref.ref!r}{note}")
    check_code(policy, _allowed_code(args), source=args.policy)  # one line and exit 2 when not allowed
    objs = ", ".join(f"{o.name}*{o.weight:g}" for o in policy.objectives)
    code = f"; imports code from {len(refs)} place(s), allowed" if refs else "; names no code"
    print(f"{args.policy}: ok ({policy.name}: {objs}; {policy.threat.norm} eps={policy.threat.eps}{code})")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from harden.policy import Policy

    if args.certificate:
        from harden.certify import Certificate

        print(json.dumps(Certificate.json_schema(), indent=2))
    elif args.markdown:
        from harden.docs import policy_reference

        print(policy_reference(), end="")
    else:
        print(json.dumps(Policy.model_json_schema(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``harden`` command, each subcommand wired to its ``cmd_*`` function.

    The flags are :func:`harden.cli_parser.build_parser`'s; the functions are looked up when this
    is called (a test may patch one).

    Example:
        >>> build_parser().parse_args(["check", "p.yaml"]).fn is cmd_check
        True
    """
    commands: dict[str, Command] = {
        "run": cmd_run,
        "fit": cmd_fit,
        "verify": cmd_verify,
        "certify": cmd_certify,
        "export": cmd_export,
        "inspect": cmd_inspect,
        "keygen": cmd_keygen,
        "check": cmd_check,
        "compare": cmd_compare,
        "schema": cmd_schema,
    }
    return cli_parser.build_parser(commands)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``harden`` command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "quiet", False):
        logging.getLogger("harden").setLevel(logging.WARNING)
    else:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.showwarning = _show_warning  # one line per warning; restored on leaving the block
        try:
            return int(args.fn(args))
        except HardenError as exc:
            print(f"harden: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise  # anything else is a bug or a broken machine: keep the traceback
            where = f" writing {exc.filename}" if exc.filename else ""
            print(
                f"harden: error: expected free disk space{where}, got a full disk ({exc.strerror}); free space and "
                "rerun (fit/run: with --resume to continue from the last checkpoint)",
                file=sys.stderr,
            )
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("harden: interrupted; checkpoints written so far are intact (use --resume)", file=sys.stderr)
            return 130


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Print a warning as one line, ``harden: warning: ...``, without the source location."""
    print(f"harden: warning: {message}", file=sys.stderr if file is None else file)
