"""Helpers shared by the fault tests: policy files, what a half-done write leaves, a disk that fills up."""

import errno
import os
from pathlib import Path

import yaml

#: a run directory may hold these and nothing else that is not a finished file
TEMP_GLOB = ".*.tmp"


def write_policy(path, policy):
    path.write_text(yaml.safe_dump(policy.model_dump(mode="json"), sort_keys=False))
    return path


def leftovers(directory):
    """Temp files and checkpoint tensor files without their sidecar: what a half-done write leaves."""
    temps = [p.name for p in Path(directory).rglob(TEMP_GLOB)]
    orphans = [p.name for p in Path(directory).rglob("epoch-*.safetensors") if not p.with_suffix(".json").exists()]
    return temps + orphans


def truncate(path):
    path.write_bytes(path.read_bytes()[:-50])


def flip_last_byte(path):  # inside the tensor data: still a valid safetensors file, wrong hash
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def enospc_after(n_ok):
    """An ``os.write`` that writes ``n_ok`` times, then half a buffer once, then reports a full disk."""
    real = os.write
    calls = {"n": 0}

    def write(fd, data):
        calls["n"] += 1
        if calls["n"] <= n_ok:
            return real(fd, data)
        if calls["n"] == n_ok + 1 and len(data) > 1:
            return real(fd, bytes(data[: len(data) // 2]))  # a short write: the rest comes next call
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write
