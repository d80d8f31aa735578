import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from harden import cli, cli_parser
from harden.cli_parser import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]

# every subcommand's flags, as the parser defines them (a change here is a change of the command line)
FLAGS = {
    "run": {
        "--set",
        "--allow-code",
        "--trust-policy-code",
        "--out",
        "-q",
        "--quiet",
        "--resume",
        "--overwrite",
        "--sign-key",
        "--baseline-weights",
    },
    "fit": {"--set", "--allow-code", "--trust-policy-code", "--out", "-q", "--quiet", "--resume", "--overwrite"},
    "verify": {
        "--set",
        "--allow-code",
        "--trust-policy-code",
        "--out",
        "-q",
        "--quiet",
        "--weights",
        "--model",
        "--onnx",
        "--mean",
        "--std",
        "--output",
        "--onnx-device",
    },
    "certify": {
        "--set",
        "--allow-code",
        "--trust-policy-code",
        "--out",
        "-q",
        "--quiet",
        "--weights",
        "--model",
        "--mean",
        "--std",
        "--output",
        "--baseline-weights",
        "--overwrite",
    },
    "export": {"--set", "--allow-code", "--trust-policy-code", "--out", "-q", "--quiet", "--weights", "--onnx"},
    "inspect": {"--public-key", "--require"},
    "keygen": {"--key", "--public"},
    "check": {"--set", "--allow-code", "--trust-policy-code"},
    "compare": {"--json", "--plot"},
    "schema": {"--markdown", "--certificate"},
}
# the positional arguments a command needs to parse (the others take POLICY)
ARGV = {"inspect": ["cert.json"], "keygen": [], "compare": ["a", "b"], "schema": []}
POSITIONAL = {"inspect": ["certificate"], "keygen": [], "compare": ["runs"], "schema": []}


def stubs():
    """One distinct function per command, each returning its index (so a mix-up shows)."""

    def make(i):
        return lambda args: i

    return {name: make(i) for i, name in enumerate(COMMANDS)}


def subparsers(parser):
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_every_command_and_its_flags_are_as_before():
    subs = subparsers(build_parser(stubs()))
    assert tuple(subs) == COMMANDS
    for name, sub in subs.items():
        flags = {s for a in sub._actions for s in a.option_strings} - {"-h", "--help"}
        assert flags == FLAGS[name], name
        positional = [a.dest for a in sub._actions if not a.option_strings]
        assert positional == POSITIONAL.get(name, ["policy"]), name


def test_each_command_runs_the_function_it_was_given():
    table = stubs()
    parser = build_parser(table)
    for i, name in enumerate(COMMANDS):
        args = parser.parse_args([name, *ARGV.get(name, ["p.yaml"])])
        assert args.command == name
        assert args.fn is table[name] and args.fn(args) == i


def test_a_missing_command_function_is_a_one_line_error():
    table = stubs()
    del table["compare"], table["keygen"]
    with pytest.raises(ValueError) as exc:
        build_parser(table)
    assert str(exc.value) == "expected a function for every harden command, got none for keygen, compare"


def test_defaults_and_repeatable_flags():
    parser = build_parser(stubs())
    args = parser.parse_args(["fit", "p.yaml"])
    assert (args.out, args.quiet, args.resume, args.overwrite, args.set) == ("runs/harden", False, False, False, None)
    args = parser.parse_args(
        ["run", "p.yaml", "--set", "a=1", "--set", "b=2", "--allow-code", "m", "--allow-code", "n"]
    )
    assert args.set == ["a=1", "b=2"] and args.allow_code == ["m", "n"] and args.sign_key is None
    args = parser.parse_args(["keygen"])
    assert (args.key, args.public) == ("harden-signing.key", None)
    args = parser.parse_args(["verify", "p.yaml", "--mean", "0.5", "1e-1", "--std", "2"])
    assert (args.mean, args.std, args.onnx_device, args.output) == ([0.5, 0.1], [2.0], None, None)
    args = parser.parse_args(["inspect", "run", "--require", "clean_accuracy > 0", "--require", "n >= 1"])
    assert args.require == ["clean_accuracy > 0", "n >= 1"]


@pytest.mark.parametrize(
    "argv",
    [
        ["fit", "p.yaml", "--resume", "--overwrite"],
        ["run", "p.yaml", "--allow-code", "m", "--trust-policy-code"],
        ["verify", "p.yaml", "--model", "timm:resnet18", "--onnx", "m.onnx"],
    ],
)
def test_exclusive_flags_are_refused_together(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser(stubs()).parse_args(argv)
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_onnx_device_takes_only_its_choices(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser(stubs()).parse_args(["verify", "p.yaml", "--onnx-device", "tpu"])
    assert exc.value.code == 2
    assert "invalid choice: 'tpu'" in capsys.readouterr().err


def test_mean_and_std_must_be_numbers(tmp_path, capsys):
    policy = tmp_path / "p.yaml"
    with pytest.raises(SystemExit) as exc:
        cli.main(["verify", str(policy), "--model", "timm:resnet18", "--mean", "0.5", "nan"])
    assert exc.value.code == 2
    assert "argument --mean: expected a finite number, got 'nan'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["verify", str(policy), "--model", "timm:resnet18", "--onnx", "m.onnx"])  # one or the other
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("inf", "expected a finite number, got 'inf'"),
        ("-inf", "expected a finite number, got '-inf'"),
        ("x", "expected a number, got 'x'"),
        ("", "expected a number, got ''"),
    ],
)
def test_float_refuses_what_is_not_a_finite_number(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        cli_parser._float(text)
    assert str(exc.value) == message


def test_cli_wires_each_command_to_its_cmd_function():
    parser = cli.build_parser()
    for name in COMMANDS:
        args = parser.parse_args([name, *ARGV.get(name, ["p.yaml"])])
        assert args.fn is getattr(cli, f"cmd_{name}"), name


def test_the_parser_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from harden.cli_parser import COMMANDS, build_parser\n"
        "parser = build_parser(dict.fromkeys(COMMANDS, print))\n"
        "assert parser.format_help()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'pydantic', 'yaml')\n"
        "               or m in ('harden.cli', 'harden.pipeline', 'harden.policy'))\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
