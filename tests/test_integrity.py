"""harden.integrity (`harden inspect`): hashes, self-consistency, ONNX metadata and the signature."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import harden
from harden.certificate import Certificate
from harden.checkpoint import state_bytes
from harden.cli import main
from harden.errors import IntegrityError
from harden.integrity import OK_STATUSES, Check, inspect_certificate
from harden.models import prepare_model
from harden.policy_io import dump_policy
from harden.signing import generate_keypair, load_private_key, load_public_key
from harden.testing import TinyCNN, synthetic_tensors, tiny_policy

ITEMS = [
    "weights", "onnx", "policy", "markdown", "html",
    "schema", "verdict", "accuracy", "intervals", "broken_by", "checks", "smoothing", "export",
    "requirements", "baseline", "onnx_metadata", "signature",
]  # fmt: skip
FILES = ("certificate.json", "certificate.md", "certificate.html", "model.safetensors", "model.onnx", "policy.yaml")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    generate_keypair(d / "k", d / "k.pub")
    generate_keypair(d / "other", d / "other.pub")
    return load_private_key(d / "k"), load_public_key(d / "k.pub"), load_public_key(d / "other.pub")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One honest `harden run` (ONNX export and its black-box check included); tests copy it, never change it."""
    out = tmp_path_factory.mktemp("inspect") / "run"
    policy = tiny_policy(train={"epochs": 1}, verify={"checks": False, "eps_sweep": []}, export={"verify_examples": 16})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        harden.run(policy, out, progress=False)
    return out


@pytest.fixture(scope="module")
def signed_dir(run_dir, keys, tmp_path_factory):
    """``run_dir`` with its certificate re-saved, signed (and with a warning), through Certificate.save."""
    d = _copy(run_dir, tmp_path_factory.mktemp("signed") / "run")
    cert = Certificate.load(d).model_copy(update={"rendered": {}, "warnings": ["eps below half a pixel level"]})
    cert.save(d, signing_key=keys[0])
    return d


def _copy(src: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in FILES:
        shutil.copyfile(src / name, dest / name)
    return dest


def _edit(d: Path, edit) -> None:
    """Change certificate.json's document in place with ``edit(doc)`` (the hostile way: no Certificate)."""
    doc = json.loads((d / "certificate.json").read_text())
    edit(doc)
    (d / "certificate.json").write_text(json.dumps(doc, indent=2))


def _status(checks: list[Check]) -> dict[str, str]:
    return {c.item: c.status for c in checks}


def _failed(checks: list[Check]) -> set[str]:
    return {c.item for c in checks if not c.ok}


def test_an_honest_run_passes_with_and_without_a_key(run_dir, signed_dir, keys):
    cert, checks = inspect_certificate(run_dir)
    assert [c.item for c in checks] == ITEMS
    assert all(c.path is not None for c in checks)
    assert _status(checks) == {**{i: "OK" for i in ITEMS}, "signature": "UNSIGNED"}
    assert cert.onnx_black_box is not None and "onnx_black_box" in cert.checks  # the whole pipeline ran
    assert cert.export["metadata"]["certificate_verdict"] == cert.verdict
    cert, checks = inspect_certificate(signed_dir / "certificate.json", public_key=keys[1])
    assert _status(checks) == {i: "OK" for i in ITEMS}
    sig = checks[-1]
    assert sig.expected == sig.actual == cert.signature["key_id"] and sig.expected in sig.detail
    assert cert.warnings == ["eps below half a pixel level"]
    _, checks = inspect_certificate(signed_dir)  # signed, but no key given: present, NOT verified
    assert checks[-1].status == "UNVERIFIED" and checks[-1].ok and "NOT verified" in checks[-1].detail
    assert not _failed(checks)


def test_the_cli_exit_code_follows_the_checks(run_dir, tmp_path, capsys):
    assert main(["inspect", str(run_dir)]) == 0
    d = _copy(run_dir, tmp_path / "t")
    _edit(d, lambda doc: doc.update(verdict="CERTIFIED"))
    assert main(["inspect", str(d)]) == 1
    capsys.readouterr()


def test_forgery_verdict_and_robust_accuracy_edited(run_dir, signed_dir, keys, tmp_path):
    def forge(doc):
        doc.update(verdict="CERTIFIED", robust_accuracy=0.99)

    d = _copy(run_dir, tmp_path / "unsigned")
    _edit(d, forge)
    failed = _failed(inspect_certificate(d)[1])
    assert {"verdict", "accuracy", "intervals", "onnx_metadata"} <= failed
    assert not failed & {"weights", "onnx", "policy", "markdown", "html"}  # the files are untouched
    s = _copy(signed_dir, tmp_path / "signed")
    _edit(s, forge)
    assert _status(inspect_certificate(s, public_key=keys[1])[1])["signature"] == "INVALID"


def test_forgery_new_weights_with_their_hash(run_dir, signed_dir, keys, tmp_path):
    torch.manual_seed(1)
    other = state_bytes(prepare_model(TinyCNN(num_classes=3), tiny_policy().model))
    for d in (_copy(run_dir, tmp_path / "unsigned"), _copy(signed_dir, tmp_path / "signed")):
        (d / "model.safetensors").write_bytes(other)
        _edit(d, lambda doc: doc.update(weights_sha256=hashlib.sha256(other).hexdigest()))
    # unsigned, the rewritten hash matches: only a signature binds the weights to who certified them
    assert _status(inspect_certificate(tmp_path / "unsigned")[1])["weights"] == "OK"
    checks = inspect_certificate(tmp_path / "signed", public_key=keys[1])[1]
    assert _status(checks)["weights"] == "OK" and _failed(checks) == {"signature"}
    assert "does not verify" in checks[-1].detail


@pytest.mark.parametrize("export_too", [False, True])
def test_forgery_onnx_hash_nulled_beside_a_garbage_onnx(run_dir, tmp_path, export_too):
    d = _copy(run_dir, tmp_path / "t")
    (d / "model.onnx").write_bytes(b"garbage, not a model")

    def forge(doc):
        doc["onnx_sha256"] = None
        if export_too:
            doc["export"] = None

    _edit(d, forge)
    checks = inspect_certificate(d)[1]
    onnx, meta = checks[1], checks[-2]
    assert (onnx.status, onnx.ok, onnx.expected) == ("UNRECORDED", False, None)
    assert onnx.actual == hashlib.sha256(b"garbage, not a model").hexdigest() and "does not vouch" in onnx.detail
    assert (meta.status, meta.ok) == ("FAIL", False) and "not a readable ONNX model" in meta.detail
    if not export_too:
        assert _status(checks)["export"] == "FAIL"  # export.sha256 still names the real file
    (d / "model.onnx").unlink()
    status = _status(inspect_certificate(d)[1])
    assert status["onnx"] == ("ABSENT" if export_too else "UNRECORDED")  # ABSENT only where no export is recorded


def test_forgery_certified_beside_a_failed_check(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path / "t")

    def forge(doc):
        cid = next(iter(doc["checks"]))
        doc["checks"][cid]["status"] = "FAIL"
        doc["verdict"] = "CERTIFIED"

    _edit(d, forge)
    checks = inspect_certificate(d)[1]
    verdict = next(c for c in checks if c.item == "verdict")
    assert verdict.status == "FAIL" and "UNRELIABLE" in verdict.detail and "CERTIFIED without" in verdict.detail
    _edit(d, lambda doc: doc["checks"]["onnx_black_box"].update(status="fail"))  # an unknown status
    assert _status(inspect_certificate(d)[1])["checks"] == "FAIL"


def test_stale_renderings_after_a_crash_are_caught(run_dir, tmp_path, monkeypatch):
    import harden.certificate as certificate_module

    d = _copy(run_dir, tmp_path / "t")
    cert = Certificate.load(d)
    real = certificate_module.atomic_write

    def crash(path, data):
        if path.name == "certificate.html":
            raise OSError("killed")
        real(path, data)

    monkeypatch.setattr(certificate_module, "atomic_write", crash)
    with pytest.raises(OSError, match="killed"):
        cert.model_copy(update={"verdict_reason": "a later save"}).save(d)
    with pytest.raises(IntegrityError, match=r"certificate\.json"):  # no certificate: nothing to accept
        inspect_certificate(d)
    monkeypatch.undo()
    # the old order's crash: the JSON of one save beside the HTML of another
    _copy(run_dir, tmp_path / "old")
    (tmp_path / "old" / "certificate.html").write_text("<html>an earlier certificate</html>")
    checks = inspect_certificate(tmp_path / "old")[1]
    assert _failed(checks) == {"html"} and _status(checks)["html"] == "MISMATCH"
    # a rendering the certificate does not vouch for at all
    _edit(tmp_path / "old", lambda doc: doc["rendered"].pop("certificate.html"))
    assert _status(inspect_certificate(tmp_path / "old")[1])["html"] == "UNRECORDED"
    (tmp_path / "old" / "certificate.html").unlink()
    assert _status(inspect_certificate(tmp_path / "old")[1])["html"] == "ABSENT"


def test_a_deeply_nested_certificate_is_one_line_error(tmp_path):
    (tmp_path / "certificate.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(IntegrityError) as exc:
        inspect_certificate(tmp_path)
    assert "nested too deeply" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(IntegrityError, match="expected a readable certificate"):
        inspect_certificate(tmp_path / "nothing")
    (tmp_path / "certificate.json").write_text('{"verdict": "CERTIFIED"}')
    with pytest.raises(IntegrityError, match="required key"):
        inspect_certificate(tmp_path)


def _one_char_edits(value):
    """Values of the same JSON type as ``value`` with one character of its JSON text changed."""
    text = json.dumps(value)
    for i, ch in enumerate(text):
        if ch.isdigit():
            new = "1" if ch == "0" else "0"
        elif ch.isalpha():
            new = "b" if ch == "a" else "a"
        else:
            continue
        try:
            yield json.loads(text[:i] + new + text[i + 1 :])
        except ValueError:
            continue


def test_a_one_character_edit_of_any_field_breaks_the_signature(signed_dir, keys, tmp_path):
    doc = json.loads((signed_dir / "certificate.json").read_text())
    covered = []
    for field in (f for f in Certificate.model_fields if f != "signature"):
        edited = next(_one_char_edits(doc[field]), None)
        if edited is None:  # nothing to edit (an empty list, null): adding a value is more than one character
            continue
        d = tmp_path / field
        d.mkdir()
        (d / "certificate.json").write_text(json.dumps({**doc, field: edited}, indent=2))
        try:
            checks = inspect_certificate(d, public_key=keys[1])[1]
        except IntegrityError:
            covered.append(field)  # refused outright (no longer a valid certificate)
            continue
        sig = checks[-1]
        assert (sig.status, sig.ok) == ("INVALID", False), field
        covered.append(field)
    must = {"verdict", "verdict_reason", "robust_accuracy", "clean_accuracy", "weights_sha256", "onnx_sha256"}
    must |= {"policy_sha256", "threat", "per_attack", "checks", "rendered", "warnings", "export", "schema_version"}
    assert must <= set(covered)
    assert len(covered) >= 25


def test_wrong_or_missing_keys_and_signatures(signed_dir, run_dir, keys, tmp_path):
    checks = inspect_certificate(signed_dir, public_key=keys[2])[1]
    assert _failed(checks) == {"signature"} and checks[-1].status == "INVALID"
    assert "another key" in checks[-1].detail and checks[-1].actual != checks[-1].expected
    checks = inspect_certificate(run_dir, public_key=keys[1])[1]  # unsigned, but a key was given
    assert (checks[-1].status, checks[-1].ok) == ("MISSING", False)
    d = _copy(signed_dir, tmp_path / "t")
    _edit(d, lambda doc: doc.update(signature=None))  # a signature stripped is no signature
    assert _failed(inspect_certificate(d, public_key=keys[1])[1]) == {"signature"}
    (tmp_path / "k.pub").write_text("junk")
    with pytest.raises(IntegrityError, match=r"k\.pub"):
        inspect_certificate(signed_dir, public_key=tmp_path / "k.pub")


def test_onnx_metadata_must_match_the_certificate(run_dir, tmp_path):
    import onnx

    d = _copy(run_dir, tmp_path / "t")
    proto = onnx.load(str(d / "model.onnx"))
    for p in proto.metadata_props:
        if p.key == "certificate_verdict":
            p.value = "CERTIFIED"
    onnx.save(proto, str(d / "model.onnx"))
    digest = hashlib.sha256((d / "model.onnx").read_bytes()).hexdigest()

    def rehash(doc):
        doc["onnx_sha256"] = digest
        doc["export"]["sha256"] = digest

    _edit(d, rehash)
    checks = inspect_certificate(d)[1]
    meta = checks[-2]
    assert _failed(checks) == {"onnx_metadata"}
    assert "certificate_verdict" in meta.detail and "stamped at export" in meta.detail
    # the recorded stamp edited to match the file: the verdict rule still disagrees
    _edit(d, lambda doc: doc["export"]["metadata"].update(certificate_verdict="CERTIFIED"))
    meta = inspect_certificate(d)[1][-2]
    assert meta.status == "FAIL" and "stamped at export" not in meta.detail
    assert "certificate_verdict is 'CERTIFIED'" in meta.detail
    _edit(d, lambda doc: doc["export"].update(metadata=[[1]]))  # hostile shapes fail, never crash
    assert _failed(inspect_certificate(d)[1]) == {"export", "onnx_metadata"}


def test_the_onnx_black_box_check_may_turn_the_stamped_verdict_unreliable(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path / "t")

    def onnx_fell(doc):
        doc["checks"]["onnx_black_box"]["status"] = "FAIL"
        doc["verdict"], doc["verdict_reason"] = "UNRELIABLE", "sanity check(s) failed: onnx_black_box"

    _edit(d, onnx_fell)
    cert, checks = inspect_certificate(d)
    assert cert.export["metadata"]["certificate_verdict"] == "EMPIRICAL" != cert.verdict
    assert not _failed(checks)

    def another_fell(doc):
        doc["checks"]["onnx_black_box"]["status"] = "PASS"
        doc["checks"]["input_gradients"] = {"id": "input_gradients", "status": "FAIL", "detail": "", "remedy": ""}
        doc["verdict_reason"] = "sanity check(s) failed: input_gradients"

    _edit(d, another_fell)  # that check was known at export: the stamp would say UNRELIABLE too
    assert _failed(inspect_certificate(d)[1]) == {"onnx_metadata"}


def test_accuracy_intervals_and_counts_must_fit_together(run_dir, tmp_path):
    cert = Certificate.load(run_dir)
    first = next(iter(cert.per_attack))
    edits = {
        "accuracy": lambda doc: doc["per_attack"].update({first: doc["clean_accuracy"] + 1 / doc["n"]}),
        "intervals": lambda doc: doc["intervals"].update(robust=[0.0, 0.01]),
        "broken_by": lambda doc: doc["broken_by"].update({first: doc["n"]}),
        "export": lambda doc: doc["export"].update(sha256="0" * 64),
        "schema": lambda doc: doc.update(schema_version="2.1"),
    }
    for item, edit in edits.items():
        d = _copy(run_dir, tmp_path / item)
        _edit(d, edit)
        checks = inspect_certificate(d)[1]
        assert item in _failed(checks), (item, _status(checks))
        assert _failed(checks) <= {item, "accuracy", "intervals"}, (item, _failed(checks))


@pytest.fixture(scope="module")
def certified():
    """The certificate of an untrained TinyCNN (no files written), the model as certified, and the policy."""
    torch.manual_seed(0)
    model, policy = TinyCNN(num_classes=3), tiny_policy(verify={"checks": False, "eps_sweep": []})
    cert = harden.certify(model, policy, synthetic_tensors(8), progress=False)
    return cert, prepare_model(model, policy.model), policy


@pytest.fixture
def lone_certificate(certified, tmp_path):
    """``certified``, with its certificate saved alone in tmp_path."""
    certified[0].save(tmp_path)
    return certified


def test_each_status_of_the_hash_checks(lone_certificate, tmp_path):
    cert, net, policy = lone_certificate
    checks = inspect_certificate(tmp_path)[1]
    assert [(c.item, c.status, c.ok) for c in checks[:5]] == [
        ("weights", "MISSING", False),
        ("onnx", "ABSENT", True),  # not exported: nothing to check
        ("policy", "MISSING", False),
        ("markdown", "OK", True),
        ("html", "OK", True),
    ]
    assert [c.path.name for c in checks[:5]] == [
        "model.safetensors", "model.onnx", "policy.yaml", "certificate.md", "certificate.html",
    ]  # fmt: skip
    assert _status(checks)["onnx_metadata"] == "ABSENT"
    assert {c.status for c in checks} <= OK_STATUSES | {"MISSING"}
    (tmp_path / "model.safetensors").write_bytes(state_bytes(net))
    (tmp_path / "policy.yaml").write_text(dump_policy(policy))
    checks = inspect_certificate(tmp_path / "certificate.json")[1]
    weights, onnx_check, policy_check = checks[:3]
    assert (weights.status, weights.expected, weights.actual) == ("OK", cert.weights_sha256, cert.weights_sha256)
    assert (policy_check.status, policy_check.actual) == ("OK", cert.policy_sha256)
    assert onnx_check.status == "ABSENT" and onnx_check.expected is None
    assert not _failed(checks)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors").mkdir()  # there, but not a readable file
    assert _status(inspect_certificate(tmp_path)[1])["weights"] == "UNREADABLE"


def test_a_policy_edited_into_invalidity_is_a_mismatch(lone_certificate, tmp_path):
    (tmp_path / "policy.yaml").write_text("objectives: 3\n")
    policy_check = inspect_certificate(tmp_path)[1][2]
    assert policy_check.status == "MISMATCH" and not policy_check.ok
    assert policy_check.actual is None and "policy.yaml no longer loads" in policy_check.detail


def test_a_changed_policy_is_a_mismatch(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path / "t")
    doc = yaml.safe_load((d / "policy.yaml").read_text())
    doc["threat"]["eps"] = doc["threat"]["eps"] / 2  # a weaker threat model than certified
    (d / "policy.yaml").write_text(yaml.safe_dump(doc))
    (d / "model.onnx").unlink()
    checks = inspect_certificate(d)[1]
    assert _status(checks)["policy"] == "MISMATCH" and _status(checks)["onnx"] == "MISSING"
    assert _failed(checks) == {"policy", "onnx", "onnx_metadata"}


def test_smoothing_must_follow_from_its_per_example_results(tmp_path):
    policy = tiny_policy(
        threat={"norm": "l2", "eps": 0.25},
        verify={"checks": False, "eps_sweep": []},
        certify={"smoothing": True, "n_examples": 6, "n0": 8, "n": 64, "saliency_examples": 0},
    )
    torch.manual_seed(0)
    cert = harden.certify(TinyCNN(num_classes=3), policy, synthetic_tensors(8), progress=False)
    s = cert.smoothing
    assert s is not None and s.radius == 0.25
    cert.save(tmp_path)
    assert _status(inspect_certificate(tmp_path)[1])["smoothing"] == "OK"
    shift = 1 / s.examples
    bad = (s.certified_accuracy or 0.0) + shift if (s.certified_accuracy or 0.0) + shift <= 1 else 0.0
    _edit(tmp_path, lambda doc: doc["smoothing"].update(certified_accuracy=bad))
    assert _status(inspect_certificate(tmp_path)[1])["smoothing"] == "FAIL"
    _edit(tmp_path, lambda doc: doc["smoothing"].update(abstentions=doc["smoothing"]["abstentions"] + 1))
    assert "abstentions" in next(c.detail for c in inspect_certificate(tmp_path)[1] if c.item == "smoothing")


def _no_hang(fn, seconds=20):
    """Run ``fn()`` in a daemon thread; fail (instead of hanging the suite) when it blocks."""
    import threading

    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked on a FIFO or device"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs on this platform")
@pytest.mark.parametrize(
    ("name", "kind", "items"),
    [
        ("model.safetensors", "zero", {"weights"}),
        ("model.safetensors", "fifo", {"weights"}),
        ("model.onnx", "fifo", {"onnx", "onnx_metadata"}),
        ("model.onnx", "zero", {"onnx", "onnx_metadata"}),
        ("certificate.md", "fifo", {"markdown"}),
        ("policy.yaml", "fifo", {"policy"}),
    ],
)
def test_a_fifo_or_device_in_a_files_place_fails_its_check_without_hanging(run_dir, tmp_path, name, kind, items):
    import os

    if kind == "zero" and not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    d = _copy(run_dir, tmp_path / "run")
    (d / name).unlink()
    if kind == "fifo":
        os.mkfifo(d / name)
    else:
        (d / name).symlink_to("/dev/zero")
    _, checks = _no_hang(lambda: inspect_certificate(d))
    assert _failed(checks) == items
    for c in checks:
        if c.item in items:
            assert "\n" not in c.detail and ("regular file" in c.detail), (c.item, c.detail)


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_certificate_is_one_line_error_without_hanging(run_dir, tmp_path):
    import os

    d = _copy(run_dir, tmp_path / "run")
    (d / "certificate.json").unlink()
    os.mkfifo(d / "certificate.json")
    with pytest.raises(IntegrityError, match=r"not a regular file") as info:
        _no_hang(lambda: inspect_certificate(d))
    assert "\n" not in str(info.value)


def test_a_certificate_with_a_coerced_field_is_refused_though_signed(signed_dir, keys, tmp_path):
    d = _copy(signed_dir, tmp_path / "run")
    _edit(d, lambda doc: doc.__setitem__("n", str(doc["n"])))  # lax validation made it the signed int again
    with pytest.raises(IntegrityError, match=r"certificate\.json") as info:
        inspect_certificate(d, public_key=keys[1])
    assert "\n" not in str(info.value)
    _, checks = inspect_certificate(signed_dir, public_key=keys[1])
    assert _status(checks)["signature"] == "OK"  # the honest signed certificate still verifies


def test_requirements_are_checks_recomputed_from_the_numbers(run_dir, tmp_path):
    from harden.require import format_fraction

    cert, checks = inspect_certificate(run_dir, require=["robust_accuracy >= 0", "robust_accuracy > 100%"])
    assert [c.item for c in checks][: len(ITEMS)] == ITEMS  # the requirements come after every other item
    reqs = [c for c in checks if c.item == "requirement"]
    assert [(c.expected, c.status, c.ok) for c in reqs] == [
        ("robust_accuracy >= 0%", "OK", True), ("robust_accuracy > 100%", "FAIL", False)
    ]  # fmt: skip
    assert reqs[1].detail == f"robust_accuracy > 100%: FAIL (measured {format_fraction(cert.robust_accuracy)})"
    assert all(c.path == run_dir / "certificate.json" for c in reqs)
    checks = inspect_certificate(run_dir, require="certified_accuracy >= 0")[1]  # one string: one target
    (unmeasured,) = [c for c in checks if c.item == "requirement"]
    assert unmeasured.status == "FAIL" and "not measured" in unmeasured.detail  # smoothing was off
    assert main(["inspect", str(run_dir)]) == 0  # no target: the gate is open


def test_a_recorded_target_is_checked_and_a_forged_pass_fails(run_dir, tmp_path, capsys):
    d = _copy(run_dir, tmp_path / "t")
    record = {"text": "robust_accuracy > 100%", "metric": "robust_accuracy", "op": ">", "value": 1.0}

    def forged_pass(doc):
        doc["requirements"] = [{**record, "actual": doc["robust_accuracy"], "passed": True}]

    _edit(d, forged_pass)
    checks = inspect_certificate(d)[1]
    assert _status(checks)["requirements"] == "FAIL"  # the recorded PASS does not follow from the numbers
    assert [(c.item, c.status) for c in checks if c.item == "requirement"] == [("requirement", "FAIL")]
    assert main(["inspect", str(d)]) == 1
    _edit(d, lambda doc: doc["requirements"][0].update(passed=False))  # honest, and failing: still exit 1
    checks = inspect_certificate(d)[1]
    assert _status(checks)["requirements"] == "OK" and _failed(checks) == {"requirement"}
    assert main(["inspect", str(d)]) == 1
    capsys.readouterr()


def test_a_bad_requirement_is_refused_before_anything_is_read(tmp_path):
    from harden.errors import PolicyError

    with pytest.raises(PolicyError, match=r"^expected a value in \[0, 1\].*write 45% for a percentage"):
        inspect_certificate(tmp_path / "nothing", require=["robust_accuracy >= 45"])


def test_a_robust_target_met_by_an_unreliable_certificate_fails(run_dir, tmp_path):
    d = _copy(run_dir, tmp_path / "u")

    def unreliable(doc):
        doc["verdict"], doc["verdict_reason"] = "UNRELIABLE", "sanity check(s) failed: unbounded_attack_succeeds"

    _edit(d, unreliable)
    checks = inspect_certificate(d, require=["robust_accuracy >= 0", "clean_accuracy >= 0"])[1]
    robust, clean = [c for c in checks if c.item == "requirement"]
    assert robust.status == "FAIL" and "UNRELIABLE" in robust.detail and "unbounded_attack_succeeds" in robust.detail
    assert clean.status == "OK"  # no failed attack check inflates a clean accuracy
