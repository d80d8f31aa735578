import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import yaml

import harden
from harden.cli import main
from harden.testing import tiny_policy

ROOT = Path(__file__).resolve().parents[1]


def write_policy(path: Path, **updates) -> Path:
    path.write_text(yaml.safe_dump(tiny_policy(**updates).model_dump(mode="json")))
    return path


def test_check_valid_exits_0(tmp_path, capsys):
    policy = write_policy(tmp_path / "ok.yaml")
    assert main(["check", str(policy)]) == 0
    assert "ok" in capsys.readouterr().out


def test_check_malformed_exits_2_with_one_line_naming_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nobjectives:\n  - name: trades\n    params: {beta: -1}\n")
    proc = subprocess.run([sys.executable, "-m", "harden", "check", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "objectives.0.params.beta" in lines[0]
    assert str(bad) in lines[0]
    assert "Traceback" not in proc.stderr


def test_check_unknown_key_and_name(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("objectives: [{name: pgd-at}]\ntrain: {epochz: 3}\n")
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.epochz: unknown key" in err
    assert "(and 1 more)" in err  # the bad objective name is counted, not hidden


def test_schema_is_json_schema(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["properties"]) >= {"model", "data", "threat", "train", "objectives", "verify", "export"}
    assert schema["additionalProperties"] is False


def test_run_writes_everything_and_steps_agree(tmp_path, capsys):
    policy = write_policy(tmp_path / "p.yaml", train={"epochs": 2})
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["run", str(policy), "--out", str(out)]) == 0
    said = capsys.readouterr().out.splitlines()
    # the plan first (before training), then each stage as it finishes, the certificate last
    order = ["plan ", "train ", "time ", "trained 2 epoch(s)", "robust accuracy", "exported ", "the exported ONNX"]
    at = [next(i for i, line in enumerate(said) if line.startswith(p) or p in line) for p in order]
    assert at == sorted(at), said
    assert said[-1].startswith("clean accuracy") and "verdict" in said[-1]
    for name in ("certificate.json", "model.onnx", "model.safetensors", "model.json", "policy.yaml"):
        assert (out / name).is_file(), name
    assert (out / "checkpoints" / "epoch-0002.json").is_file()
    cert = json.loads((out / "certificate.json").read_text())
    assert 0 <= cert["robust_accuracy"] <= cert["clean_accuracy"] <= 1
    assert cert["export"]["parity_max_abs_diff"] <= 1e-4
    # the shipped ONNX session itself was attacked with the gradient-free attacks
    shipped = cert["onnx_black_box"]
    assert shipped["providers"] == ["CPUExecutionProvider"]
    assert list(shipped["per_attack"]) == ["transfer", "square", "noise"]
    assert 0 <= shipped["robust_accuracy"] <= shipped["clean_accuracy"] <= 1
    assert shipped["n"] == min(200, cert["n"])
    if shipped["n"] == cert["n"]:  # same examples: the session agrees with torch on clean inputs
        assert shipped["clean_accuracy"] == cert["clean_accuracy"]
    for name in ("certificate.md", "certificate.html"):
        assert "ONNX model attacked itself" in (out / name).read_text()
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert meta["policy_hash"] == cert["policy_sha256"]
    # the single steps reproduce the run's verification from the saved weights
    assert main(["verify", str(policy), "--out", str(out), "-q"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["clean_accuracy"] == cert["clean_accuracy"]
    assert report["robust_accuracy"] == cert["robust_accuracy"]
    assert main(["export", str(policy), "--out", str(out), "--onnx", str(tmp_path / "again.onnx"), "-q"]) == 0
    assert (tmp_path / "again.onnx").is_file()
    # a CI gate: requirements on the certificate, exit 1 when one is not met
    capsys.readouterr()
    assert main(["inspect", str(out), "--require", "clean_accuracy >= 0"]) == 0
    unreliable = cert["verdict"] == "UNRELIABLE"  # a robust target is not met by an UNRELIABLE certificate
    assert main(["inspect", str(out), "--require", "robust_accuracy >= 0"]) == (1 if unreliable else 0)
    assert main(["inspect", str(out), "--require", f"robust_accuracy > {cert['robust_accuracy']}"]) == 1
    assert "requirement (fail)" in capsys.readouterr().err


def test_fit_then_resume_is_a_no_op_when_done(tmp_path, capsys):
    policy = write_policy(tmp_path / "p.yaml")
    out = tmp_path / "run"
    assert main(["fit", str(policy), "--out", str(out), "-q"]) == 0
    before = (out / "model.safetensors").read_bytes()
    assert main(["fit", str(policy), "--out", str(out), "--resume", "-q"]) == 0
    assert (out / "model.safetensors").read_bytes() == before
    capsys.readouterr()
    assert main(["fit", str(policy), "--out", str(out), "--resume"]) == 0
    assert "resumed from the checkpoint of epoch 1" in capsys.readouterr().out


def test_verify_without_weights_is_a_clear_error(tmp_path, capsys):
    policy = write_policy(tmp_path / "p.yaml")
    assert main(["verify", str(policy), "--out", str(tmp_path / "nothing"), "-q"]) == 2
    assert "harden fit" in capsys.readouterr().err


def test_tampered_weights_are_refused(tmp_path, capsys):
    policy = write_policy(tmp_path / "p.yaml")
    out = tmp_path / "run"
    assert main(["fit", str(policy), "--out", str(out), "-q"]) == 0
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    assert main(["verify", str(policy), "--out", str(out), "-q"]) == 2
    assert "SHA-256" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_runs(tmp_path):
    exe = Path(sys.executable).parent / "harden"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stdout.startswith("harden ")


def test_cli_names_a_full_disk_outside_atomic_writes(tmp_path, monkeypatch, capsys):
    def full(args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "model.onnx"))

    monkeypatch.setattr("harden.cli.cmd_check", full)
    assert main(["check", "whatever.yaml"]) == 2
    err = capsys.readouterr().err
    assert "got a full disk (No space left on device)" in err and "model.onnx" in err


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


VALID = "objectives: [{name: ce}]\n"


BAD_POLICIES = {
    "alias-bomb": (BILLION_LAUGHS.encode(), "anchors and aliases are not allowed"),
    "float-overflow": ((VALID + "train: {weight_decay: 1e999}\n").encode(), "train.weight_decay: expected a finite"),
    "yaml-inf": ((VALID + "train: {weight_decay: .inf}\n").encode(), "train.weight_decay: expected a finite number"),
    "yaml-nan": ((VALID + "threat: {eps: .nan}\n").encode(), "threat.eps: expected a finite number, got nan"),
    "huge-int": ((VALID + f"seed: {10**100}\n").encode(), "seed: expected a number of sane size"),
    "huge-int-string": ((VALID + f"train: {{epochs: '{10**100}'}}\n").encode(), "train.epochs: expected"),
    "huge-hex-int": ((VALID + "data: {batch_size: 0x" + "f" * 5000 + "}\n").encode(), "data.batch_size: expected"),
    "int-beyond-python": ((VALID + "seed: " + "9" * 5000 + "\n").encode(), "expected valid YAML values"),
    "wrong-type": ((VALID + "train: {epochs: many}\n").encode(), "train.epochs: expected an integer, got 'many'"),
    "list-for-mapping": ((VALID + "train: [1, 2]\n").encode(), "train: expected a mapping, got a list"),
    "unknown-key": ((VALID + "train: {epochz: 2}\n").encode(), "train.epochz: unknown key (not allowed here); did "),
    "unknown-top-key": ((VALID + "zzz: 1\n").encode(), "zzz: unknown key (not allowed here); expected one of name,"),
    "deep-nesting": ((VALID + "model: {args: " + "[" * 5000 + "]" * 5000 + "}\n").encode(), "nested too deeply"),
    "not-utf8": (b"objectives: [{name: \xff\xfe}]\n", "expected UTF-8 text"),
    "bad-date": ((VALID + "name: 2001-13-45\n").encode(), "expected valid YAML values"),
    "python-tag": (b"!!python/object/apply:os.system ['echo pwned']\n", "expected valid YAML"),
    "not-a-mapping": (b"- objectives\n", "(top level): expected a mapping of policy keys, got list"),
    "empty-file": (b"", "(top level): expected a mapping of policy keys, got NoneType"),
    "syntax-error": (b"objectives: [{name: ce}\n", "expected valid YAML"),
    "unknown-timm-model": ((VALID + "model: {name: 'timm:resnet10'}\n").encode(), "got 'resnet10'; did you mean"),
    "unknown-objective": (b"objectives: [{name: pgd-at}]\n", "did you mean 'pgd_at'"),
}


@pytest.mark.parametrize("case", list(BAD_POLICIES))
def test_bad_policy_is_one_error_line_and_writes_nothing(tmp_path, capsys, case):
    body, expected = BAD_POLICIES[case]
    path = tmp_path / "bad.yaml"
    path.write_bytes(body)
    out = tmp_path / "run"
    assert main(["fit", str(path), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"harden: error: {path}: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert not out.exists()
    with pytest.raises(harden.PolicyError):  # the API raises the same, a ValueError too
        harden.load_policy(path)


def test_help_and_version_import_neither_torch_nor_the_pipeline():
    code = (
        "import sys, harden.cli\n"
        "for argv in (['--help'], ['run', '--help'], ['verify', '--help'], ['--version']):\n"
        "    try:\n"
        "        harden.cli.main(argv)\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, argv\n"
        "heavy = sorted(m for m in ('torch', 'numpy', 'pydantic', 'yaml', 'harden.pipeline') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    assert "--set KEY=VALUE" in proc.stdout and "exit codes" in proc.stdout


def test_the_package_is_lazy_and_every_public_name_resolves():
    code = (
        "import sys, harden\n"
        "assert 'torch' not in sys.modules\n"
        "assert harden.PolicyError.__module__ == 'harden.errors' and 'torch' not in sys.modules\n"
        "import harden.verify, harden.certify\n"  # the submodules must not shadow the functions
        "assert callable(harden.verify) and harden.verify.__name__ == 'verify'\n"
        "assert harden.certify.__name__ == 'certify'\n"
        "from harden import verify_onnx, run\n"
        "assert verify_onnx.__name__ == 'verify_onnx' and run.__module__ == 'harden.pipeline'\n"
        "assert set(harden.__all__) <= set(dir(harden))\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr
    for name in harden.__all__:
        assert getattr(harden, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = harden.nothing_here


def test_set_overrides_policy_keys_and_its_errors_say_so(tmp_path, capsys):
    policy = write_policy(tmp_path / "p.yaml")
    assert main(["check", str(policy), "--set", "train.epochs=4", "--set", "objectives.0.weight=0.5"]) == 0
    assert "pgd_at*0.5" in capsys.readouterr().out
    assert main(["check", str(policy), "--set", "train.epochs=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "with --set train.epochs: train.epochs: expected a number >= 1, got 0" in err
    assert main(["fit", str(policy), "--out", str(tmp_path / "r"), "--set", "train"]) == 2
    assert "--set: expected key.path=value" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_set_cannot_name_code_the_user_did_not_allow(tmp_path, capsys):
    policy = write_policy(tmp_path / "p.yaml")
    out = tmp_path / "r"
    assert main(["fit", str(policy), "--out", str(out), "--set", "model.name=evil.models:Net"]) == 2
    err = capsys.readouterr().err
    assert "model.name: 'evil.models:Net' is code" in err and "--allow-code evil.models" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("device", "expected"), [("cpu", "cpu"), ("auto", "auto"), ("cuda", "cuda"), ("cuda:1", "cuda")]
)
def test_verify_onnx_device_follows_the_policy_unless_given(tmp_path, monkeypatch, capsys, device, expected):
    asked = []

    def fake_load_onnx(path, device="auto", **kwargs):
        asked.append(device)
        raise harden.ExportError("stop here")

    monkeypatch.setattr("harden.runtime.load_onnx", fake_load_onnx)
    policy = write_policy(tmp_path / "p.yaml")
    base = ["verify", str(policy), "--out", str(tmp_path / "r"), "--onnx", "m.onnx", "-q", "--set", f"device={device}"]
    assert main(base) == 2
    assert main([*base, "--onnx-device", "cpu"]) == 2
    assert asked == [expected, "cpu"]


def test_verify_onnx_prints_a_cuda_fallback_as_one_short_line(tmp_path, monkeypatch, capsys):
    import importlib

    import harden.runtime

    path = tmp_path / "tiny.onnx"
    harden.export_onnx(harden.testing.TinyCNN(num_classes=3), path, input_shape=(1, 8, 8))
    reason = "CUDA failed: libcudnn.so.9: cannot open shared object file " + "x" * 400 + "\nsecond line"
    real = harden.runtime.load_onnx

    def fallback(path, device="auto", **kwargs):
        clf = real(path, "cpu")
        clf.fallback_reason = reason
        return clf

    class Report:
        def to_dict(self):
            return {}

        def summary(self):
            return "summary"

    monkeypatch.setattr(harden.runtime, "load_onnx", fallback)
    # harden.verify_onnx is the function; its module is in sys.modules
    monkeypatch.setattr(importlib.import_module("harden.verify_onnx"), "verify_onnx", lambda *a, **k: Report())
    policy = write_policy(tmp_path / "p.yaml")
    assert main(["verify", str(policy), "--out", str(tmp_path / "r"), "--onnx", str(path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "CUDA" in line]
    assert len(lines) == 1 and lines[0].startswith("onnxruntime ran on the CPU")
    assert len(lines[0]) < 220 and lines[0].endswith("...") and "second line" not in lines[0]


def test_verify_and_certify_any_model_from_a_plain_state_dict(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = harden.testing.TinyCNN(num_classes=3)
    weights = tmp_path / "plain.safetensors"
    save_file(net.state_dict(), str(weights))  # a plain state_dict: no wrapper keys
    policy = write_policy(tmp_path / "p.yaml", verify={"checks": False, "n_examples": 32})
    model = ["--model", "harden.testing:TinyCNN", "--weights", str(weights), "--mean", "0.5", "--std", "0.25"]
    out = tmp_path / "v"
    assert main(["verify", str(policy), "--out", str(out), *model]) == 0
    said = capsys.readouterr().out
    assert "normalization: mean (0.5" in said and "robust" in said
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["robust_accuracy"] <= report["clean_accuracy"] <= 1
    cdir = tmp_path / "c"
    assert main(["certify", str(policy), "--out", str(cdir), *model, "--baseline-weights", str(weights), "-q"]) == 0
    cert = json.loads((cdir / "certificate.json").read_text())
    assert cert["clean_accuracy"] == report["clean_accuracy"]  # same model, same examples
    assert main(["inspect", str(cdir)]) == 0


def test_a_stated_normalization_is_never_ignored_by_verify(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    policy = write_policy(tmp_path / "p.yaml", verify={"checks": False, "n_examples": 16})
    run = tmp_path / "r"
    run.mkdir()
    plain = harden.Normalized(harden.testing.TinyCNN(num_classes=3))  # harden's keys, no normalization
    save_file(plain.state_dict(), str(run / "model.safetensors"))
    # without --model: the policy's model with the run's weights, and the stated mean/std are checked, not dropped
    assert main(["verify", str(policy), "--out", str(run), "--mean", "0.5", "--std", "0.25"]) == 2
    err = capsys.readouterr().err
    assert "harden: error:" in err and "0.5" in err and "\n" not in err.strip()
    onnx = ["--onnx", str(tmp_path / "m.onnx"), "--mean", "0.5", "--std", "0.25"]
    assert main(["verify", str(policy), "--out", str(run), *onnx]) == 2
    assert "--onnx" in capsys.readouterr().err
