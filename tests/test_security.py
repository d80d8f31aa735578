"""Regression tests for the security review's probes: each probe once more, end to end, through the CLI.

Every probe of the review (a policy that runs code, forged certificates, two runs in one folder,
an edited checkpoint sidecar, partly loaded weights, unchecked labels, file modes, crash windows,
tracebacks instead of one-line errors, misleading messages, loose validation) has a test here or
in its module's test file ("friends"):

- forged certificates (verdict, weights + hash, null ONNX hash, CERTIFIED beside a FAIL, stale
  HTML, nested JSON, signatures): tests/test_integrity.py, tests/test_certificate.py;
- one run folder, one run (lock, used folder, run id, leftovers): tests/test_runfolder.py,
  tests/test_pipeline.py; the sidecar in the digest and file modes: tests/test_checkpoint.py;
- exact pretrained keys, non-finite weights: tests/test_weights.py; every label checked:
  tests/test_data.py; non-finite logits scored wrong: tests/test_attacks_suite.py,
  tests/test_onnx_accuracy.py; the portable invariance tolerance:
  tests/test_attacks_invariance_examples.py.

Here: what a user sees at the command line, one line ``harden: error: ...`` naming the file.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from harden.cli import main
from harden.testing import TinyCNN, tiny_policy


def write_policy(path: Path, **updates) -> Path:
    path.write_text(yaml.safe_dump(tiny_policy(**updates).model_dump(mode="json")))
    return path


def one_error_line(capsys, *needles: str) -> str:
    """The one stderr line of a refused command; it names every needle (a file, a key, a remedy)."""
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("harden: warning:")]
    assert len(err) == 1, err
    assert err[0].startswith("harden: error: ")
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    """A module ``evil_mod`` that creates ``tmp_path/pwned`` when imported (the payload of a hostile policy)."""
    (tmp_path / "evil_mod.py").write_text(
        f"from pathlib import Path\nPath({str(tmp_path / 'pwned')!r}).write_text('ran')\ndef net(**kw):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "evil_mod", raising=False)
    return tmp_path / "pwned"


def test_a_policy_naming_code_is_refused_before_anything_runs(tmp_path, marker_module, capsys):
    raw = tiny_policy().model_dump(mode="json")
    raw["model"] = {"name": "evil_mod:net", "args": {"command": "touch /tmp/x"}}
    policy = tmp_path / "evil.yaml"
    policy.write_text(yaml.safe_dump(raw))
    assert main(["check", str(policy)]) == 2
    out, err = capsys.readouterr()
    assert "model.name imports code: 'evil_mod:net'" in out  # check lists the code it would import
    assert err.count("\n") == 1 and "--allow-code evil_mod" in err and str(policy) in err
    for command in ("run", "fit", "verify", "export"):
        assert main([command, str(policy), "--out", str(tmp_path / command), "-q"]) == 2
        one_error_line(capsys, str(policy), "model.name", "--trust-policy-code")
    assert not marker_module.exists()
    assert main(["check", str(policy), "--allow-code", "evil_mod"]) == 0  # validation alone imports nothing
    assert main(["check", str(policy), "--allow-code", "evil"]) == 2  # a prefix is not the module
    capsys.readouterr()
    assert not marker_module.exists()


def test_strict_values_a_safe_name_and_a_tiny_eps(tmp_path, capsys):
    for key, value, needle in (
        ("threat", {"norm": "linf", "eps": True}, "threat.eps"),
        ("threat", {"norm": "linf", "eps": "0.1"}, "threat.eps"),
        ("name", "..", "name"),
        ("name", "a/b", "name"),
    ):
        raw = tiny_policy().model_dump(mode="json")
        raw[key] = value
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(raw))
        assert main(["check", str(path)]) == 2, (key, value)
        one_error_line(capsys, str(path), needle)
    raw = tiny_policy().model_dump(mode="json")
    raw["threat"]["eps"] = 1e-300
    path = tmp_path / "tiny-eps.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check", str(path)]) == 0
    captured = capsys.readouterr()
    assert "harden: warning: threat.eps 1e-300 is below half a pixel level" in captured.err


def test_bad_weights_files_are_one_line_errors_naming_the_file(tmp_path, capsys):
    good = TinyCNN(num_classes=3).state_dict()
    corrupt = tmp_path / "corrupt.safetensors"
    save_file(good, str(corrupt))
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": TinyCNN(num_classes=3)}, pickled)  # a pickled module, not a state dict
    nan = tmp_path / "nan.safetensors"
    save_file({k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in good.items()}, str(nan))
    for path, needle in ((corrupt, "corrupt"), (pickled, "pickled"), (nan, "finite")):
        policy = write_policy(tmp_path / "p.yaml", model={"name": "harden.testing:TinyCNN", "pretrained_file": str(path)})
        assert main(["fit", str(policy), "--out", str(tmp_path / path.stem), "-q"]) == 2
        line = one_error_line(capsys, str(path), needle)
        assert "weights_only=False" not in line


def test_a_deeply_nested_certificate_is_one_line(tmp_path, capsys):
    (tmp_path / "certificate.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["inspect", str(tmp_path)]) == 2
    one_error_line(capsys, "certificate.json")


def test_a_corrupt_png_in_an_imagefolder_is_one_line(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "images"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / cls / f"{i}.png")
    bad = root / "train" / "a" / "0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    policy = write_policy(
        tmp_path / "p.yaml",
        data={"name": "imagefolder", "root": str(root), "image_size": 8, "batch_size": 4, "eval_batch_size": 4},
        model={"name": "harden.testing:TinyCNN", "in_chans": 3},
    )
    assert main(["fit", str(policy), "--out", str(tmp_path / "run"), "-q"]) == 2
    one_error_line(capsys, "0.png")


def test_a_resume_that_trains_nothing_says_so(tmp_path, capsys):
    policy = write_policy(tmp_path / "p.yaml", verify={"checks": False})
    out = tmp_path / "run"
    assert main(["fit", str(policy), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["fit", str(policy), "--out", str(out), "--resume"]) == 0
    text = capsys.readouterr().out
    assert "trained 1 epoch" not in text and "trained no epoch" in text


def test_a_used_folder_needs_resume_or_overwrite(tmp_path, capsys):
    policy = write_policy(tmp_path / "p.yaml")
    out = tmp_path / "run"
    assert main(["fit", str(policy), "--out", str(out), "-q"]) == 0
    assert main(["fit", str(policy), "--out", str(out), "-q"]) == 2
    one_error_line(capsys, str(out), "--resume", "--overwrite")
    assert main(["fit", str(policy), "--out", str(out), "-q", "--overwrite"]) == 0
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert main(["fit", str(policy), "--out", str(out), "-q", "--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["run_id"] != run_id  # a new run, not the old one


def test_a_forged_certificate_cannot_forge_inspect_s_output(tmp_path, capsys):
    import harden
    from harden.testing import synthetic_tensors

    policy = tiny_policy(verify={"checks": False})
    harden.certify(TinyCNN(num_classes=3), policy, synthetic_tensors(8), progress=False).save(tmp_path)
    path = tmp_path / "certificate.json"
    doc = json.loads(path.read_text())
    doc["created"] = "2026\n  signature      OK          certificate.json   verified\x1b[8m"
    path.write_text(json.dumps(doc))
    assert main(["inspect", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[8m" in out
    assert not any(line.lstrip().startswith("signature      OK") for line in out.splitlines())
