"""Step 1 of ``make gpu-check``: the GPU software stack, and whether its CUDA libraries agree.

torch's wheels and onnxruntime-gpu's wheel are built against CUDA separately. When they name
different CUDA majors (onnxruntime-gpu for CUDA 12 beside torch for CUDA 13, say), onnxruntime
cannot find its libraries, or finds torch's and breaks, and then runs on the CPU without a word
unless one reads ``session.get_providers()``. This module checks the agreement from the files
alone, so it runs on a machine without a GPU too:

- the shared libraries each binary names (the ELF ``DT_NEEDED`` entries of torch's
  ``libtorch_cuda.so`` and of onnxruntime's ``libonnxruntime_providers_cuda.so`` /
  ``..._tensorrt.so``), read by a small ELF reader here (no ``readelf`` needed);
- a library family both name (``libcublas``, ``libcudart``, ...) must be named with the same
  soname (same major, same ABI);
- ``libcudart``'s major must equal torch's CUDA major, and onnxruntime's own build record
  (``build_and_package_info.cuda_version``) must have that major too;
- every CUDA library onnxruntime names must be found, in the NVIDIA wheels' ``lib`` folders
  beside torch, in torch's own ``lib`` or on the system loader path (the driver's
  ``libcuda.so.1`` is only required on a machine with a GPU).

On a GPU, :func:`loaded_cuda_libraries` then reads ``/proc/self/maps`` after a CUDA session ran
to show which files were actually loaded: one file per library family.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from gpu_steps import Check, Step

import harden
from harden.runtime import CUDA, load_onnx
from harden.testing import TinyCNN

#: library families that belong to the CUDA toolkit, cuDNN, TensorRT or the driver
CUDA_FAMILIES = re.compile(
    r"^lib(cudart|cublas|cublasLt|cufft|curand|cusolver|cusparse|cusparseLt|nvrtc|nvJitLink|cudnn\w*|"
    r"nccl|cufile|nvinfer\w*|nvonnxparser|cuda|cupti)\.so(\.\d+)*$"
)
SONAME = re.compile(r"^(?P<family>lib[\w+-]+?)\.so(?:\.(?P<major>\d+))?")
DRIVER = "libcuda.so.1"


class ElfError(ValueError):
    """Raised if a file is not a 64-bit little-endian ELF shared object we can read."""


def elf_needed(path: str | Path) -> list[str]:
    """The ``DT_NEEDED`` sonames of a 64-bit little-endian ELF file, in order.

    Raises:
        ElfError: the file is not such an ELF file, or its dynamic section is malformed.

    Example:
        >>> import sys
        >>> from pathlib import Path
        >>> lib = next(Path(sys.base_prefix).glob("lib/python3*/lib-dynload/_ctypes*.so"))
        >>> "libc.so.6" in elf_needed(lib)
        True
    """
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ElfError(f"expected a 64-bit little-endian ELF file, got {str(path)!r}")
    phoff, phentsize, phnum = struct.unpack_from("<Q", data, 0x20)[0], *struct.unpack_from("<HH", data, 0x36)
    loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        p_type, _flags, offset, vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1:  # PT_LOAD
            loads.append((vaddr, offset, filesz))
        elif p_type == 2:  # PT_DYNAMIC
            dynamic = (offset, filesz)
    if dynamic is None:
        return []  # statically linked: needs nothing
    entries = []
    strtab = None
    for off in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, val = struct.unpack_from("<qQ", data, off)
        if tag == 0:  # DT_NULL
            break
        if tag == 1:  # DT_NEEDED
            entries.append(val)
        elif tag == 5:  # DT_STRTAB (a virtual address)
            strtab = val
    if strtab is None:
        raise ElfError(f"expected a string table in the dynamic section of {str(path)!r}, got none")
    base = next((strtab - v + o for v, o, s in loads if v <= strtab < v + s), None)
    if base is None:
        raise ElfError(f"expected the string table of {str(path)!r} inside a loaded segment, got address {strtab:#x}")
    out = []
    for name_off in entries:
        end = data.index(b"\0", base + name_off)
        out.append(data[base + name_off : end].decode())
    return out


def family(soname: str) -> tuple[str, int | None]:
    """``("libcublas", 13)`` for ``libcublas.so.13``; the major is None when the name has none.

    Example:
        >>> family("libcublasLt.so.13"), family("libnvinfer.so.10"), family("libfoo.so")
        (('libcublasLt', 13), ('libnvinfer', 10), ('libfoo', None))
    """
    m = SONAME.match(soname)
    if m is None:
        return soname, None
    return m["family"], None if m["major"] is None else int(m["major"])


def system_libraries() -> set[str]:
    """Sonames the dynamic loader can find: ``LD_LIBRARY_PATH``'s folders and ``ldconfig -p``'s cache."""
    names: set[str] = set()
    for folder in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep):
        if folder and Path(folder).is_dir():
            names.update(f.name for f in Path(folder).glob("*.so*"))
    ldconfig = shutil.which("ldconfig") or ("/sbin/ldconfig" if Path("/sbin/ldconfig").is_file() else None)
    if ldconfig is None:
        return names
    try:
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return names
    return names | {line.split()[0] for line in out.splitlines()[1:] if line.strip()}


@dataclass
class Consistency:
    """The verdict of :func:`check_consistency`: ``problems`` empty means consistent."""

    torch_cuda: str | None
    ort_cuda: str | None
    torch_needs: list[str] = field(default_factory=list)
    ort_needs: dict[str, list[str]] = field(default_factory=dict)
    resolved: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return dict(self.__dict__)


def _library_dirs(torch_dir: Path) -> list[Path]:
    """Where torch's wheels keep CUDA libraries: torch/lib and every nvidia/*/lib beside it."""
    site = torch_dir.parent
    return [torch_dir / "lib", *sorted(p for p in (site / "nvidia").glob("*/lib") if p.is_dir())]


def _index(dirs: Iterable[Path]) -> dict[str, str]:
    found: dict[str, str] = {}
    for d in dirs:
        for f in sorted(d.glob("*.so*")):
            found.setdefault(f.name, str(f))
    return found


def check_consistency(
    torch_dir: Path, torch_cuda: str | None, ort_capi: Path | None, ort_cuda: str | None, *, gpu: bool
) -> Consistency:
    """Check that onnxruntime's CUDA providers and torch name the same CUDA libraries.

    Args:
        torch_dir: the installed ``torch`` package folder.
        torch_cuda: ``torch.version.cuda`` (None for a CPU build of torch).
        ort_capi: onnxruntime's ``capi`` folder (None when onnxruntime is not installed).
        ort_cuda: onnxruntime's ``build_and_package_info.cuda_version`` (None when absent).
        gpu: whether this machine has a GPU (the driver's ``libcuda.so.1`` is never required here:
            on a GPU the CUDA session of step 1 shows whether it loads).

    Returns:
        A :class:`Consistency`; each entry of ``problems`` is one line naming the libraries.
    """
    res = Consistency(torch_cuda=torch_cuda, ort_cuda=ort_cuda)
    if torch_cuda is None:
        res.problems.append("torch is a CPU build (torch.version.cuda is None): install a CUDA build of torch")
        return res
    major = int(torch_cuda.split(".")[0])
    torch_lib = torch_dir / "lib" / "libtorch_cuda.so"
    if not torch_lib.is_file():
        res.problems.append(f"expected {torch_lib} in a CUDA build of torch, got no such file")
        return res
    res.torch_needs = [n for n in elf_needed(torch_lib) if CUDA_FAMILIES.match(n)]
    providers = {
        "cuda": None if ort_capi is None else ort_capi / "libonnxruntime_providers_cuda.so",
        "tensorrt": None if ort_capi is None else ort_capi / "libonnxruntime_providers_tensorrt.so",
    }
    if providers["cuda"] is None or not providers["cuda"].is_file():
        res.problems.append(
            "onnxruntime has no CUDA provider library (libonnxruntime_providers_cuda.so): the CPU-only "
            "'onnxruntime' package is installed; install 'onnxruntime-gpu' built for CUDA "
            f"{major}"
        )
        return res
    if ort_cuda is not None and int(ort_cuda.split(".")[0]) != major:
        res.problems.append(f"onnxruntime-gpu was built for CUDA {ort_cuda}, torch for CUDA {torch_cuda}")
    by_family = {family(n)[0]: n for n in res.torch_needs}
    available = _index(_library_dirs(torch_dir))
    system = system_libraries()
    for name, lib in providers.items():
        if lib is None or not lib.is_file():
            res.notes.append(f"onnxruntime has no {name} provider library")
            continue
        needs = [n for n in elf_needed(lib) if CUDA_FAMILIES.match(n)]
        res.ort_needs[name] = needs
        for soname in needs:
            fam, lib_major = family(soname)
            if fam == "libcudart" and lib_major != major:
                res.problems.append(f"onnxruntime's {name} provider needs {soname}, torch is CUDA {torch_cuda}")
            torch_soname = by_family.get(fam)
            if torch_soname is not None and torch_soname != soname:
                res.problems.append(f"onnxruntime's {name} provider needs {soname}, torch needs {torch_soname}")
            if soname in available:
                res.resolved[soname] = available[soname]
            elif soname in system:
                res.resolved[soname] = "system loader path"
            elif soname == DRIVER:  # the driver's: the CUDA session on a GPU proves it loads
                where = "not on the loader's path here" if gpu else "absent without a GPU, as expected"
                res.notes.append(f"{DRIVER} is the NVIDIA driver's: {where}")
            elif name == "tensorrt":
                res.notes.append(f"TensorRT provider needs {soname}, not installed: TensorRT cannot run")
            else:
                res.problems.append(f"onnxruntime's {name} provider needs {soname}, found nowhere")
    return res


def loaded_cuda_libraries(maps: str | None = None) -> dict[str, list[str]]:
    """CUDA library files mapped into this process, by family (from ``/proc/self/maps``).

    Example:
        >>> line = "7f00-7f10 r-xp 0 08:01 1 /x/nvidia/cu13/lib/libcublas.so.13"
        >>> loaded_cuda_libraries(line)
        {'libcublas': ['/x/nvidia/cu13/lib/libcublas.so.13']}
    """
    text = Path("/proc/self/maps").read_text() if maps is None else maps
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        path = line.split()[-1] if line.split() else ""
        name = Path(path).name
        if path.startswith("/") and CUDA_FAMILIES.match(name):
            out.setdefault(family(name)[0], set()).add(path)
    return {k: sorted(v) for k, v in sorted(out.items())}


# ---------------------------------------------------------------- the step
def step_environment(c: Check) -> Step:
    """Versions, devices, providers, and the CUDA library agreement of torch and onnxruntime."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }
    info["cuda_available"] = torch.cuda.is_available()
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    if info["gpus"]:
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    try:
        info["cudnn"] = torch.backends.cudnn.version()
    except Exception as exc:  # the library may not load on a machine without a driver
        info["cudnn"] = f"not loaded: {str(exc)[:100]}"
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        info["nvidia_smi"] = q.stdout.strip()
    problems: list[str] = []
    try:
        import onnxruntime as ort
        from onnxruntime.capi import build_and_package_info as build

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_package"] = getattr(build, "package_name", "?")
        info["onnxruntime_cuda"] = getattr(build, "cuda_version", None)
        info["providers_available"] = list(ort.get_available_providers())
        capi: Path | None = Path(ort.__file__).parent / "capi"
    except ImportError as exc:
        problems.append(f"onnxruntime does not import: {exc}")
        capi = None
    cons = check_consistency(
        Path(torch.__file__).parent, torch.version.cuda, capi, info.get("onnxruntime_cuda"), gpu=bool(info["gpus"])
    )
    problems += cons.problems
    info["consistency"] = cons.to_dict()
    if c.cuda:
        if not info["cuda_available"]:
            problems.append(
                "torch.cuda.is_available() is False on the GPU run (driver, container or CPU build of torch)"
            )
        elif capi is not None:
            problems += _cuda_session(info)
            loaded = loaded_cuda_libraries()
            info["loaded_cuda_libraries"] = loaded
            problems += [
                f"{fam} loaded from {len(paths)} files: {paths}" for fam, paths in loaded.items() if len(paths) > 1
            ]
    status = "FAIL" if problems else "PASS"
    gpu = info["gpus"][0] if info["gpus"] else "no GPU"
    detail = (
        "; ".join(problems)
        if problems
        else (
            f"{gpu}; torch {info['torch']} (CUDA {info['torch_cuda']}, cuDNN {info['cudnn']}); "
            f"{info.get('onnxruntime_package')} {info.get('onnxruntime')} (CUDA {info.get('onnxruntime_cuda')}): "
            f"{len(cons.resolved)} CUDA libraries agree with torch's"
        )
    )
    return Step("environment", status, 0.0, detail, info)


def _cuda_session(info: dict[str, Any]) -> list[str]:
    """Run a tiny ONNX model on onnxruntime's CUDA provider with a CUDA tensor; return problems."""
    path = Path(tempfile.mkdtemp()) / "tiny.onnx"
    harden.export_onnx(TinyCNN(num_classes=3), path, input_shape=(1, 8, 8))
    try:
        clf = load_onnx(path, "cuda")
    except harden.HardenError as exc:
        return [f"onnxruntime's CUDA provider does not run: {exc}"]
    info["cuda_session_providers"] = clf.providers
    out = clf.predict_logits(torch.rand(4, 1, 8, 8, device="cuda"))
    return [] if clf.providers[0] == CUDA and out.device.type == "cuda" else [f"CUDA session ran on {clf.providers}"]
