import hashlib
import json
import os

import pydantic
import pytest
import torch

import harden.certificate as certificate_module
import harden.certificate_io as certificate_io
from harden.certificate import CERTIFICATE_SCHEMA_VERSION, Certificate, environment
from harden.errors import CheckpointError, IntegrityError
from harden.report import to_html, to_markdown
from harden.signing import generate_keypair, load_private_key, load_public_key, verify_signature


def tiny_cert(**updates):
    fields = {
        "verdict": "EMPIRICAL",
        "verdict_reason": "attack suite only",
        "created": "2026-01-01T00:00:00+00:00",
        "policy_name": "p",
        "policy_sha256": "0" * 64,
        "weights_sha256": "1" * 64,
        "threat": {"norm": "linf", "eps": 0.1},
        "n": 10,
        "clean_accuracy": 0.9,
        "robust_accuracy": 0.5,
        "per_attack": {"pgd": 0.5},
        "attacks": [{"name": "pgd"}],
        "seed": 0,
        "device": "cpu",
        "versions": {"harden": "0"},
    }
    return Certificate(**{**fields, **updates})


def test_a_certificate_cannot_be_edited_after_assembly():
    cert = tiny_cert()
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cert.verdict = "CERTIFIED"
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        cert.onnx_sha256 = "2" * 64


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_save_and_load_round_trip(tmp_path):
    cert = tiny_cert(warnings=["eps below half a pixel level"])
    path = cert.save(tmp_path)
    assert path == tmp_path / "certificate.json"
    assert {p.name for p in tmp_path.iterdir()} == {"certificate.json", "certificate.md", "certificate.html"}
    loaded = Certificate.load(path)
    assert loaded.rendered == {n: _sha(tmp_path / n) for n in ("certificate.md", "certificate.html")}
    assert loaded.signature is None
    assert loaded.model_copy(update={"rendered": {}}) == cert
    assert Certificate.load(tmp_path) == loaded  # a directory means its certificate.json
    assert json.loads(path.read_text())["schema_version"] == CERTIFICATE_SCHEMA_VERSION == "2.4"
    assert path.read_text().startswith('{\n  "')  # human-readable: indented
    # the renderings do not depend on rendered / signature: the loaded certificate renders the same files
    assert (tmp_path / "certificate.md").read_text() == to_markdown(loaded) == to_markdown(cert)
    assert (tmp_path / "certificate.html").read_text() == to_html(loaded)
    # a JSON-only save removes the renderings of an earlier save: they would describe another certificate
    cert.save(tmp_path, formats=("json",))
    assert [p.name for p in tmp_path.iterdir()] == ["certificate.json"]
    assert Certificate.load(tmp_path).rendered == {}


def test_certificate_json_is_written_last_and_deleted_first(tmp_path, monkeypatch):
    tiny_cert().save(tmp_path)
    order = []
    real = certificate_module.atomic_write

    def recording(path, data):
        order.append((path.name, (tmp_path / "certificate.json").exists()))
        real(path, data)

    monkeypatch.setattr(certificate_module, "atomic_write", recording)
    tiny_cert(verdict_reason="second").save(tmp_path)
    # the old certificate.json is gone before the first rendering is written; the new one comes last
    assert order == [("certificate.md", False), ("certificate.html", False), ("certificate.json", False)]

    def crash_on_html(path, data):
        if path.name == "certificate.html":
            raise CheckpointError("simulated crash")
        real(path, data)

    monkeypatch.setattr(certificate_module, "atomic_write", crash_on_html)
    with pytest.raises(CheckpointError, match="simulated"):
        tiny_cert(verdict_reason="third").save(tmp_path)
    # a crash midway leaves no certificate (never the old one beside new renderings)
    assert not (tmp_path / "certificate.json").exists()
    with pytest.raises(IntegrityError, match=r"certificate\.json: expected a readable certificate"):
        Certificate.load(tmp_path)
    assert "third" not in (tmp_path / "certificate.html").read_text()  # the stale page, vouched for by nothing


@pytest.fixture(scope="module")
def real_cert():
    """A certificate from certify (intervals as tuples, floats of every kind, saliency maps, smoothing)."""
    import harden
    from harden.testing import TinyCNN, synthetic_tensors, tiny_policy

    policy = tiny_policy(
        threat={"norm": "l2", "eps": 0.5},
        verify={"checks": False, "eps_sweep": [0.1, 0.3]},
        certify={"smoothing": True, "n_examples": 4, "n0": 8, "n": 32, "saliency_examples": 2},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cert = harden.certify(TinyCNN(num_classes=3), policy, synthetic_tensors(16), progress=False)
    return cert.model_copy(update={"warnings": ["eps below half a pixel level", "ünïcode ✓"]})


def test_canonical_bytes_round_trip_and_signature(real_cert, tmp_path):
    assert real_cert.smoothing is not None and real_cert.saliency and real_cert.intervals
    generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    path = real_cert.save(tmp_path / "run", signing_key=load_private_key(tmp_path / "k"))
    loaded = Certificate.load(path)
    sig = loaded.signature
    assert sig is not None and sig["algorithm"] == "ed25519"
    canon = loaded.canonical_bytes()
    # sorted keys, compact, UTF-8, no signature; and the same bytes after another save / load
    doc = json.loads(canon)
    assert "signature" not in doc and list(doc) == sorted(doc) and b", " not in canon[:200]
    assert "ünïcode ✓".encode() in canon
    assert canon == json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert loaded.model_copy(update={"signature": None}).canonical_bytes() == canon
    assert Certificate.model_validate_json(path.read_text()).canonical_bytes() == canon
    verify_signature(load_public_key(tmp_path / "k.pub"), canon, sig)
    # the in-memory certificate with the same rendered hashes has the very bytes that were signed
    assert real_cert.model_copy(update={"rendered": loaded.rendered}).canonical_bytes() == canon
    # a key given as a path signs the same way (Ed25519 is deterministic)
    again = Certificate.load(real_cert.save(tmp_path / "run2", signing_key=tmp_path / "k"))
    assert again.signature == sig


def test_save_refuses_a_bad_signing_key(tmp_path):
    (tmp_path / "k").write_text("not a key")
    with pytest.raises(IntegrityError, match="PEM private key"):
        tiny_cert().save(tmp_path / "run", signing_key=tmp_path / "k")
    assert not (tmp_path / "run" / "certificate.json").exists()


def _load_error(path):
    with pytest.raises(IntegrityError) as exc:
        Certificate.load(path)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


def test_load_turns_every_failure_into_one_line(tmp_path, monkeypatch):
    good = json.loads(tiny_cert().model_dump_json())
    cases = {
        "missing.json": None,
        "not-json.json": b"{not json",
        "deep.json": b"[" * 100_000 + b"]" * 100_000,
        "deep-object.json": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        "binary.json": b"\xff\xfe\x00",
        "schema.json": json.dumps({**good, "robust_accuracy": 1.5}).encode(),
        "extra.json": json.dumps({**good, "surprise": 1}).encode(),
        "nan.json": json.dumps(good).replace('"robust_accuracy": 0.5', '"robust_accuracy": NaN').encode(),
        "dup.json": json.dumps(good)
        .replace('"verdict": "EMPIRICAL"', '"verdict": "CERTIFIED", "verdict": "EMPIRICAL"')
        .encode(),
        "huge-float.json": json.dumps({**good, "timings": {"fit": 1.0}}).replace("1.0", "1e400").encode(),
        "rendered.json": json.dumps({**good, "rendered": {"../../etc/passwd": "0" * 64}}).encode(),
        "list.json": b"[]",
    }
    words = {
        "missing.json": "expected a readable certificate",
        "not-json.json": "expected a valid certificate (JSON)",
        "deep.json": "nested too deeply",
        "deep-object.json": "nested too deeply",
        "binary.json": "UTF-8",
        "schema.json": "robust_accuracy: expected a number <= 1",
        "extra.json": "surprise: unknown key",
        "nan.json": "finite numbers, got NaN",
        "dup.json": "expected unique keys, got 'verdict' twice",
        "huge-float.json": "finite numbers, got 1e400",
        "rendered.json": "rendered",
        "list.json": "expected a mapping",
    }
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
        msg = _load_error(tmp_path / name)
        assert words[name] in msg, (name, msg)
    monkeypatch.setattr(certificate_io, "MAX_CERTIFICATE_BYTES", 100)  # the cap is read there
    (tmp_path / "big.json").write_text(json.dumps(good))
    assert "MiB" in _load_error(tmp_path / "big.json")


def test_schema_refuses_unknown_keys_and_impossible_accuracies():
    with pytest.raises(pydantic.ValidationError, match="extra"):
        tiny_cert(surprise=1)
    with pytest.raises(pydantic.ValidationError):
        tiny_cert(robust_accuracy=1.5)
    with pytest.raises(pydantic.ValidationError):
        tiny_cert(verdict="PROBABLY_FINE")
    schema = Certificate.json_schema()
    assert "verdict" in schema["required"] and schema["additionalProperties"] is False


def test_environment_names_python_harden_and_torch():
    env = environment()
    assert {"python", "harden", "platform", "torch"} <= set(env)
    assert all(isinstance(v, str) and v for v in env.values())


def test_the_nested_records_are_frozen_too():
    from harden.certificate import SaliencyExample

    ex = SaliencyExample(label=0, prediction=0, image=[[[0.0]]], maps={})
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        ex.label = 1


def test_load_validates_strictly_no_coercion(real_cert, tmp_path):
    generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    path = real_cert.save(tmp_path / "run", signing_key=tmp_path / "k")
    honest = Certificate.load(path)  # tuples (intervals, eps_curve, smoothing.curve) load from JSON arrays
    assert honest.intervals == real_cert.intervals and honest.eps_curve == real_cert.eps_curve
    assert honest.smoothing == real_cert.smoothing and honest.saliency == real_cert.saliency
    assert isinstance(next(iter(honest.intervals.values())), tuple)
    verify_signature(load_public_key(tmp_path / "k.pub"), honest.canonical_bytes(), honest.signature)
    doc = json.loads(path.read_text())
    n = doc["n"]
    cases = {
        "n-string.json": {**doc, "n": str(n)},  # lax mode made it n=..., and the signature still verified
        "n-float.json": {**doc, "n": float(n)},
        "seed-bool.json": {**doc, "seed": True},
        "acc-string.json": {**doc, "clean_accuracy": str(doc["clean_accuracy"])},
        "count-string.json": {**doc, "smoothing": {**doc["smoothing"], "examples": str(doc["smoothing"]["examples"])}},
    }
    for name, bad in cases.items():
        (tmp_path / name).write_text(json.dumps(bad))
        msg = _load_error(tmp_path / name)
        assert "valid" in msg or "expected" in msg, (name, msg)


def _load_error_without_blocking(path, seconds=20):
    """:func:`_load_error` in a daemon thread: a blocked open fails the test instead of hanging the suite."""
    import threading

    box = {}
    t = threading.Thread(target=lambda: box.setdefault("msg", _load_error(path)), daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"Certificate.load blocked on {path}"
    assert "msg" in box, "Certificate.load did not raise a one-line IntegrityError"
    return box["msg"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_load_refuses_a_fifo_or_device_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "certificate.json")
    assert "got not a regular file" in _load_error_without_blocking(tmp_path / "certificate.json")
    if os.path.exists("/dev/zero"):
        (tmp_path / "zero.json").symlink_to("/dev/zero")
        assert "got not a regular file" in _load_error_without_blocking(tmp_path / "zero.json")


def _without_2_3(doc):
    from harden.certificate import FIELDS_SINCE_2_3, FIELDS_SINCE_2_4

    return {k: v for k, v in doc.items() if k not in FIELDS_SINCE_2_3 + FIELDS_SINCE_2_4}


def test_a_signed_2_2_certificate_still_loads_and_its_signature_verifies(tmp_path):
    from harden.signing import sign

    generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    doc = _without_2_3(json.loads(tiny_cert().model_dump_json(exclude={"signature"})))
    doc["schema_version"] = "2.2"
    # what harden 2.2 signed: its own fields, sorted and compact
    signed = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    doc["signature"] = sign(load_private_key(tmp_path / "k"), signed)
    (tmp_path / "certificate.json").write_text(json.dumps(doc, indent=2))
    old = Certificate.load(tmp_path)
    assert old.schema_version == "2.2" and old.requirements == [] and old.baseline is None
    assert old.canonical_bytes() == signed  # the 2.3 fields (at their defaults) are not part of it
    verify_signature(load_public_key(tmp_path / "k.pub"), old.canonical_bytes(), old.signature)
    # a 2.3 certificate's bytes do hold them: an edit of a target is covered by its signature
    assert b'"requirements":[]' in tiny_cert().canonical_bytes()
    assert b'"requirements"' not in signed


def test_requirement_results_recompute_from_the_numbers():
    from harden.certificate import requirement_results, requirement_values

    values = requirement_values(0.79, 0.04, {"apgd_ce": 0.1, "square": 0.04}, None)
    assert values == {
        "clean_accuracy": 0.79, "robust_accuracy": 0.04, "certified_accuracy": None,
        "after:apgd_ce": 0.1, "after:square": 0.04,
    }  # fmt: skip
    texts = ["robust_accuracy >= 0.45", "clean_accuracy > 50%", "certified_accuracy >= 0.1", "after:apgd_ce < 0.2"]
    got = [(r.text, r.actual, r.passed) for r in requirement_results(texts, values)]
    assert got == [
        ("robust_accuracy >= 45%", 0.04, False),
        ("clean_accuracy > 50%", 0.79, True),
        ("certified_accuracy >= 10%", None, False),  # not measured: a FAIL, never a pass
        ("after:apgd_ce < 20%", 0.1, True),
    ]
    cert = tiny_cert(requirements=requirement_results(texts[:1], values))
    assert cert.measured_values()["robust_accuracy"] == 0.5  # the certificate's own numbers
    assert Certificate.model_validate_json(cert.model_dump_json()) == cert


def test_load_accepts_a_run_directory_and_says_so_when_it_has_no_certificate(tmp_path):
    path = tiny_cert().save(tmp_path / "run")
    assert Certificate.load(tmp_path / "run") == Certificate.load(path)
    (tmp_path / "empty").mkdir()
    msg = _load_error(tmp_path / "empty" / "certificate.json")
    with pytest.raises(IntegrityError) as info:
        Certificate.load(tmp_path / "empty")  # a folder: its certificate.json, never IsADirectoryError
    assert str(info.value) == msg and "empty/certificate.json: expected a readable certificate" in msg


def test_a_signed_2_3_certificate_still_loads_and_its_signature_verifies(tmp_path):
    from harden.certificate import FIELDS_SINCE_2_4
    from harden.signing import sign

    generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    doc = json.loads(tiny_cert(check_n=10, check_clean_accuracy=0.9).model_dump_json(exclude={"signature"}))
    doc = {k: v for k, v in doc.items() if k not in FIELDS_SINCE_2_4}
    doc["schema_version"] = "2.3"
    signed = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()  # what 2.3 signed
    doc["signature"] = sign(load_private_key(tmp_path / "k"), signed)
    (tmp_path / "certificate.json").write_text(json.dumps(doc, indent=2))
    old = Certificate.load(tmp_path)
    assert old.schema_version == "2.3" and old.check_n == 10 and old.verify_seconds == {}
    assert old.canonical_bytes() == signed  # the 2.4 fields (at their defaults) are not part of it
    verify_signature(load_public_key(tmp_path / "k.pub"), old.canonical_bytes(), old.signature)
    timed = tiny_cert(verify_seconds={"attacks": 2.0, "checks": 0.5}, per_check_seconds={"a": 0.25})
    assert b'"per_check_seconds":{"a":0.25}' in timed.canonical_bytes()  # a 2.4 certificate signs its times
    assert b'"verify_seconds"' not in signed


def test_verify_times_are_named_parts_and_never_negative():
    from harden.certificate import VERIFY_TIME_PARTS, fields_after

    assert VERIFY_TIME_PARTS == ("attacks", "other_attacks", "setup", "checks", "eps_sweep", "rest")
    assert fields_after("2.2")[-2:] == fields_after("2.3") == ("verify_seconds", "per_check_seconds")
    assert fields_after(CERTIFICATE_SCHEMA_VERSION) == ()
    with pytest.raises(pydantic.ValidationError):
        tiny_cert(verify_seconds={"lunch": 1.0})
    with pytest.raises(pydantic.ValidationError):
        tiny_cert(verify_seconds={"checks": -1.0})
    with pytest.raises(pydantic.ValidationError):
        tiny_cert(per_check_seconds={"a": -0.5})
