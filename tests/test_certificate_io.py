"""harden.certificate_io: a certificate file read as hostile (capped, non-blocking, strict), every failure one line."""

import os
import threading

import pytest
from pydantic import BaseModel, ConfigDict

import harden.certificate
import harden.certificate_io as certificate_io
from harden.certificate_io import MAX_CERTIFICATE_BYTES, load_strict, read_capped
from harden.errors import IntegrityError


class Doc(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: int
    pair: tuple[float, float] = (0.0, 1.0)
    name: str = ""


def _error(fn, *args, **kwargs):
    with pytest.raises(IntegrityError) as exc:
        fn(*args, **kwargs)
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def test_the_certificate_module_re_exports_the_cap():
    assert harden.certificate.MAX_CERTIFICATE_BYTES is MAX_CERTIFICATE_BYTES == 64 * 1024 * 1024
    assert "MAX_CERTIFICATE_BYTES" in harden.certificate.__all__


def test_read_capped_reads_up_to_the_cap_and_refuses_one_byte_more(tmp_path, monkeypatch):
    monkeypatch.setattr(certificate_io, "MAX_CERTIFICATE_BYTES", 10)
    (tmp_path / "ten.json").write_bytes(b"0123456789")
    assert read_capped(tmp_path / "ten.json") == b"0123456789"
    (tmp_path / "eleven.json").write_bytes(b"0123456789a")
    msg = _error(read_capped, tmp_path / "eleven.json")
    assert msg == f"{tmp_path / 'eleven.json'}: expected a certificate under 0 MiB, got a larger file"


def test_read_capped_names_the_file_when_it_is_missing_or_not_a_regular_file(tmp_path):
    msg = _error(read_capped, tmp_path / "missing.json")
    assert msg == f"{tmp_path / 'missing.json'}: expected a readable certificate, got No such file or directory"
    assert "got not a regular file" in _error(read_capped, tmp_path)  # a folder
    (tmp_path / "link.json").symlink_to(tmp_path / "missing.json")
    assert "expected a readable certificate" in _error(read_capped, tmp_path / "link.json")  # a dangling link


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_read_capped_refuses_a_fifo_or_device_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    targets = [tmp_path / "fifo.json"]
    if os.path.exists("/dev/zero"):
        (tmp_path / "zero.json").symlink_to("/dev/zero")
        targets.append(tmp_path / "zero.json")
    for path in targets:
        box: dict[str, str] = {}
        t = threading.Thread(target=lambda p=path, b=box: b.setdefault("msg", _error(read_capped, p)), daemon=True)
        t.start()
        t.join(20)
        assert not t.is_alive(), f"read_capped blocked on {path}"
        assert "got not a regular file" in box["msg"], path


def test_load_strict_validates_without_coercion_and_fills_tuples_from_arrays(tmp_path):
    p = tmp_path / "doc.json"
    p.write_text('{"n": 96, "pair": [0.25, 0.5]}')
    assert load_strict(p, Doc) == Doc(n=96, pair=(0.25, 0.5))
    for text in ('{"n": "96"}', '{"n": 96.0}', '{"n": true}'):
        p.write_text(text)
        msg = _error(load_strict, p, Doc)
        assert str(p) in msg and "n" in msg, (text, msg)
    p.write_text('{"n": 1, "surprise": 2}')
    assert "surprise: unknown key" in _error(load_strict, p, Doc)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"{not json", "expected a valid certificate (JSON)"),
        (b'{"n": 1, "n": 2}', "expected unique keys, got 'n' twice"),
        (b'{"n": 1, "pair": [NaN, 1.0]}', "expected finite numbers, got NaN"),
        (b'{"n": 1, "pair": [-Infinity, 1.0]}', "expected finite numbers, got -Infinity"),
        (b'{"n": 1, "pair": [1e400, 1.0]}', "expected finite numbers, got 1e400"),
        (b"\xff\xfe\x00", "expected UTF-8 JSON, got undecodable bytes"),
        (b"[" * 100_000 + b"]" * 100_000, "got a document nested too deeply"),
        (b"[]", "expected a mapping"),
    ],
)
def test_load_strict_turns_every_failure_into_one_line_naming_the_file(tmp_path, data, words):
    p = tmp_path / "doc.json"
    p.write_bytes(data)
    msg = _error(load_strict, p, Doc)
    assert msg.startswith(str(p)) and words in msg, msg


def test_load_strict_reports_what_the_check_refuses(tmp_path):
    p = tmp_path / "doc.json"
    p.write_text('{"n": 1, "name": "ok"}')
    seen = []
    assert load_strict(p, Doc, check=seen.append) == Doc(n=1, name="ok") and seen == [Doc(n=1, name="ok")]
    p.write_text('{"n": 11}')

    def small(doc):
        if doc.n > 10:
            raise ValueError(f"expected n of at most 10, got {doc.n}\nsecond line")

    msg = _error(load_strict, p, Doc, check=small)  # the first line only
    assert msg == f"{p}: expected a valid certificate (JSON), got expected n of at most 10, got 11"
