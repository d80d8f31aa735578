"""`make gpu-check` (benchmarks/gpu_check.py and its gpu_* helpers): its CPU dry run, and the checks it relies on.

The dry run is what keeps the GPU script from rotting between the rare runs on a GPU: it runs
every step that does not need CUDA (the library agreement, the GPU tests' collection, the whole
``harden run`` of the GPU policy made tiny, with ONNX parity) and checks that the CUDA steps
skip with a reason.
"""

from __future__ import annotations

import doctest
import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import onnxruntime
import pytest
import torch

import harden
from harden.policy_io import validate_policy

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def _load(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def _ort_provider(name: str) -> Path:
    return Path(onnxruntime.__file__).parent / "capi" / f"libonnxruntime_providers_{name}.so"


@pytest.mark.parametrize("module", ["gpu_env", "gpu_pipeline"])
def test_doctests_run(module: str) -> None:
    result = doctest.testmod(_load(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_elf_reader_agrees_with_readelf() -> None:
    env = _load("gpu_env")
    libs = [Path(torch.__file__).parent / "lib" / "libtorch_cpu.so", Path(sys.executable).resolve()]
    libs += [p for p in (_ort_provider("cuda"), _ort_provider("shared")) if p.is_file()]
    readelf = shutil.which("readelf")
    for lib in libs:
        needed = env.elf_needed(lib)
        assert "libc.so.6" in needed or lib.name.startswith("python"), (lib, needed)
        if readelf:
            out = subprocess.run([readelf, "-d", str(lib)], capture_output=True, text=True, check=True).stdout
            expected = [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
            assert needed == expected
    with pytest.raises(env.ElfError, match="64-bit little-endian ELF"):
        env.elf_needed(ROOT / "README.md")


def _fake_needs(monkeypatch: pytest.MonkeyPatch, env: ModuleType, table: dict[str, list[str]]) -> None:
    monkeypatch.setattr(env, "elf_needed", lambda path: table[Path(path).name])


def test_consistency_names_a_cuda_major_mismatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = _load("gpu_env")
    torch_dir, capi = tmp_path / "site" / "torch", tmp_path / "site" / "onnxruntime" / "capi"
    (torch_dir / "lib").mkdir(parents=True)
    capi.mkdir(parents=True)
    (torch_dir / "lib" / "libtorch_cuda.so").touch()
    (capi / "libonnxruntime_providers_cuda.so").touch()
    nvidia = tmp_path / "site" / "nvidia" / "cu13" / "lib"
    nvidia.mkdir(parents=True)
    for lib in ("libcudart.so.13", "libcublas.so.13"):
        (nvidia / lib).touch()
    _fake_needs(
        monkeypatch,
        env,
        {
            "libtorch_cuda.so": ["libcudart.so.13", "libcublas.so.13", "libc.so.6"],
            "libonnxruntime_providers_cuda.so": ["libcudart.so.12", "libcublas.so.12", "libcuda.so.1"],
        },
    )
    res = env.check_consistency(torch_dir, "13.0", capi, "12.8", gpu=False)
    text = "\n".join(res.problems)
    assert "built for CUDA 12.8, torch for CUDA 13.0" in text
    assert "needs libcudart.so.12, torch is CUDA 13.0" in text
    assert "needs libcublas.so.12, torch needs libcublas.so.13" in text
    assert "needs libcublas.so.12, found nowhere" in text
    assert any("driver" in n for n in res.notes)  # no GPU here: the driver's absence is a note
    on_gpu = env.check_consistency(torch_dir, "13.0", capi, "12.8", gpu=True)
    assert not any("libcuda.so.1" in p for p in on_gpu.problems)  # the CUDA session decides that
    assert any("libcuda.so.1" in n and "loader's path" in n for n in on_gpu.notes)
    elsewhere = tmp_path / "ld"
    elsewhere.mkdir()
    for lib in ("libcudart.so.12", "libcublas.so.12"):
        (elsewhere / lib).touch()
    monkeypatch.setenv("LD_LIBRARY_PATH", str(elsewhere))
    found = env.check_consistency(torch_dir, "13.0", capi, "12.8", gpu=False)
    assert not any("found nowhere" in p for p in found.problems)  # on LD_LIBRARY_PATH: found
    assert found.resolved["libcublas.so.12"] == "system loader path"
    monkeypatch.delenv("LD_LIBRARY_PATH")

    _fake_needs(
        monkeypatch,
        env,
        {"libtorch_cuda.so": ["libcudart.so.13"], "libonnxruntime_providers_cuda.so": ["libcudart.so.13"]},
    )
    ok = env.check_consistency(torch_dir, "13.0", capi, "13.0", gpu=False)
    assert ok.problems == [] and ok.resolved == {"libcudart.so.13": str(nvidia / "libcudart.so.13")}
    (capi / "libonnxruntime_providers_cuda.so").unlink()
    cpu_only = env.check_consistency(torch_dir, "13.0", capi, None, gpu=False)
    assert "CPU-only 'onnxruntime' package" in cpu_only.problems[0]
    assert "CPU build" in env.check_consistency(torch_dir, None, capi, None, gpu=False).problems[0]


def test_installed_wheels_agree() -> None:
    """The project's own pins (torch and onnxruntime-gpu) must name the same CUDA libraries."""
    env = _load("gpu_env")
    if torch.version.cuda is None or not _ort_provider("cuda").is_file():
        pytest.skip(f"torch {torch.__version__} / onnxruntime {onnxruntime.__version__}: not a CUDA pair")
    from onnxruntime.capi import build_and_package_info as build

    res = env.check_consistency(
        Path(torch.__file__).parent, torch.version.cuda, _ort_provider("cuda").parent, build.cuda_version, gpu=False
    )
    assert res.problems == [], res.problems
    assert "libcudart.so." + torch.version.cuda.split(".")[0] in res.resolved


def test_dry_policy_is_the_gpu_policy_made_small_on_the_cpu() -> None:
    pipeline = _load("gpu_pipeline")
    gpu = harden.load_policy(pipeline.GPU_POLICY)
    dry = validate_policy(pipeline.dry_policy(pipeline.GPU_POLICY))
    assert (gpu.device, dry.device) == ("cuda", "cpu")
    assert [o.name for o in dry.objectives] == [o.name for o in gpu.objectives]
    assert [a.name for a in dry.verify.attacks] == [a.name for a in gpu.verify.attacks]
    assert (dry.train.precision, dry.train.attack_precision) == (gpu.train.precision, gpu.train.attack_precision)
    assert gpu.train.precision == "bf16" and gpu.train.attack_precision == "fp32"
    assert dry.train.epochs == 1 and dry.data.train_limit == 256


def test_a_step_that_raises_is_a_failed_step(tmp_path: Path) -> None:
    check, steps = _load("gpu_check"), _load("gpu_steps")
    run = steps.Check(tmp_path, cuda=False, budget=60)

    def broken() -> steps.Step:
        raise RuntimeError("no such thing\nsecond line")

    step = check.timed_step(run, "environment", broken)
    assert (step.status, step.detail) == ("FAIL", "RuntimeError: no such thing")
    late = steps.Check(tmp_path, cuda=False, budget=0)
    assert check.timed_step(late, "ddp", broken).detail.startswith("not run: the 0 s budget was spent")


@pytest.mark.slow
@pytest.mark.serial
def test_dry_run_passes_on_the_cpu_and_skips_the_cuda_steps(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the dry run is for machines without one (run make gpu-check)")
    check = _load("gpu_check")
    out = tmp_path / "gpu-check"
    assert check.main(["--device", "cpu", "--out", str(out), "--archive", str(tmp_path / "gc.tar.gz")]) == 0
    summary = json.loads((out / "gpu-check.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    assert status == {"environment": "PASS", "gpu_tests": "PASS", "pipeline": "PASS", "bench": "SKIP", "ddp": "SKIP"}
    steps = {s["name"]: s for s in summary["steps"]}
    assert steps["gpu_tests"]["data"]["counts"]["skipped"] >= 10
    assert steps["gpu_tests"]["data"]["skip_reasons"]
    assert "needs CUDA" in steps["bench"]["detail"] and "no GPU" in steps["ddp"]["detail"]
    pipe = steps["pipeline"]["data"]
    assert pipe["certificate"]["verdict"] in {"EMPIRICAL", "CERTIFIED", "UNRELIABLE"}
    rows = pipe["parity"]["rows"]
    assert {(r["session"], r["inputs"]) for r in rows} == {
        (s, i) for s in ("fp32", "fp16") for i in ("clean", "adversarial")
    }
    assert all(r["ok"] for r in rows)
    assert "ONNX vs torch logits" in (out / "gpu-check.md").read_text()
    assert (tmp_path / "gc.tar.gz").stat().st_size > 0


def test_missing_dependencies_fail_loudly_without_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check = _load("gpu_check")
    monkeypatch.setattr(check, "REQUIRED", [*check.REQUIRED, "no_such_module_here"])
    assert check.main(["--device", "cpu", "--out", str(tmp_path)]) == 1
    steps = json.loads((tmp_path / "gpu-check.json").read_text())["steps"]
    assert steps[0]["status"] == "FAIL" and "no_such_module_here" in steps[0]["detail"]
    assert [s["status"] for s in steps[1:]] == ["FAIL"] * 4
