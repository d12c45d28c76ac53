"""Compile checks of the CUDA sources, no GPU needed (default CPU suite).

Every csrc/*.cu is compiled with nvcc ``-c`` for sm_80 and sm_90a (both gencodes in one nvcc call, so the
host side is compiled once), warnings as errors; csrc/binding.cpp is syntax-checked with g++ against
torch's, pybind11's, Python's and CUDA's headers. All compiles start together in one fixture (they are
independent; on 2 cores they overlap with each other's preprocessing and I/O) and write only into a
pytest tmp dir. Skipped only when nvcc is not on PATH. Run with ``-s`` to see the compile times.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
CU_FILES = sorted(p.name for p in CSRC.glob("*.cu"))
NVCC = shutil.which("nvcc")
GENCODES = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90a,code=sm_90a"]

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: CUDA sources cannot be compile-checked")


def _cuda_include_dir() -> str:
    """The CUDA toolkit's include dir as nvcc itself reports it (works through wrapper scripts)."""
    out = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r'INCLUDES="-I([^"]+?)"', out.stdout + out.stderr)
    if m:
        return m.group(1).strip()
    return str(Path(NVCC).resolve().parents[1] / "include")


def _commands(tmp: Path) -> dict[str, list[str]]:
    cmds = {}
    for name in CU_FILES:
        cmds[name] = [NVCC, "-std=c++17", "-O3", f"-I{CSRC}", *GENCODES, "-Xcompiler", "-Wall,-fPIC",
                      "-Werror", "all-warnings", "-c", str(CSRC / name), "-o", str(tmp / (name + ".o"))]
    import pybind11
    import torch
    from torch.utils.cpp_extension import include_paths

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is not None:
        isystem = [*include_paths(), pybind11.get_include(), sysconfig.get_paths()["include"], _cuda_include_dir()]
        cmds["binding.cpp"] = [cxx, "-std=c++17", "-c", "-O0", "-fPIC", "-Wall", "-Wextra", "-Werror",
                               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                               "-DTORCH_EXTENSION_NAME=gems_C_compile_check",
                               *[a for d in isystem for a in ("-isystem", d)], f"-I{CSRC}", str(CSRC / "binding.cpp"),
                               "-o", str(tmp / "binding.cpp.o")]
    return cmds


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gems_cuda_objs")
    cmds = _commands(tmp)
    procs, logs, start, end = {}, {}, {}, {}
    t0 = time.perf_counter()
    for name, cmd in cmds.items():
        logs[name] = open(tmp / (name + ".log"), "w+")
        start[name] = time.perf_counter()
        procs[name] = subprocess.Popen(cmd, stdout=logs[name], stderr=subprocess.STDOUT, text=True)
    while len(end) < len(procs):  # poll so each job's own wall time is measured
        for name, proc in procs.items():
            if name not in end and proc.poll() is not None:
                end[name] = time.perf_counter()
        if time.perf_counter() - t0 > 600:
            for name, proc in procs.items():
                if name not in end:
                    proc.kill()
                    proc.wait()
                    end[name] = time.perf_counter()
        time.sleep(0.05)
    results = {}
    for name, proc in procs.items():
        logs[name].seek(0)
        out = logs[name].read()
        logs[name].close()
        results[name] = (proc.returncode, out, end[name] - start[name], shlex.join(cmds[name]))
    total = time.perf_counter() - t0
    lines = [f"  {name:<22} {sec:6.1f} s  rc={rc}" for name, (rc, _, sec, _) in results.items()]
    print(f"\nCUDA compile check ({len(results)} jobs in parallel, wall {total:.1f} s):\n" + "\n".join(lines),
          file=sys.stderr)
    results["_wall"] = total
    results["_tmp"] = tmp
    return results


_IMPORT_CHECK = r"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("gems_C_compile_check", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)  # dlopen(RTLD_NOW): every gems:: symbol the binding calls must resolve
assert mod.CHUNK_ELEMS == 16384, mod.CHUNK_ELEMS
z = torch.zeros(3)
calls = {
    "subspace_adam": lambda: mod.subspace_adam([z], [z], [z], [z], 1, 1e-3, 0.9, 0.999, 1e-8, 0),
    "subspace_adam_len": lambda: mod.subspace_adam([z], [], [z], [z], 1, 1e-3, 0.9, 0.999, 1e-8, 0),
    "weight_update": lambda: mod.weight_update([z], [z], [None], 1.0, 0.0, 0),
    "back_project_update": lambda: mod.back_project_update([z.view(1, 3)], [z.view(3, 1)], [z.view(1, 3)], [None],
                                                           False, 1.0, 0.0, 0),
}
for name, call in calls.items():
    try:
        call()
    except ValueError as exc:  # TORCH_CHECK_VALUE -> ValueError, raised before any CUDA call
        print(name, "ValueError", exc)
    else:
        raise AssertionError(name + ": CPU tensors were accepted")
print("ok")
"""


def test_extension_links_and_imports_on_cpu_torch(compiled):
    """Link the objects into the extension against the CPU torch + libcudart, import it, call each op
    with CPU tensors: the binding's argument checks must raise ValueError (no CUDA call is reached)."""
    import torch

    if "binding.cpp" not in compiled or any(compiled[n][0] != 0 for n in CU_FILES + ["binding.cpp"]):
        pytest.skip("a compile failed (reported by the tests above)")
    cudart_dir = Path(_cuda_include_dir()).parent / "lib"
    if not any(cudart_dir.glob("libcudart.so*")):
        pytest.skip(f"no libcudart.so next to the CUDA headers ({cudart_dir})")
    tmp = compiled["_tmp"]
    torch_lib = Path(torch.__file__).parent / "lib"
    so = tmp / "gems_C_compile_check.so"
    objs = [str(tmp / (n + ".o")) for n in CU_FILES + ["binding.cpp"]]
    libs = ["-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python"]
    link = [shutil.which("g++") or "c++", "-shared", *objs, f"-L{torch_lib}", *libs, f"-L{cudart_dir}", "-lcudart",
            f"-Wl,-rpath,{torch_lib}", f"-Wl,-rpath,{cudart_dir}", "-o", str(so)]
    out = subprocess.run(link, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"link failed:\n$ {shlex.join(link)}\n{out.stdout}{out.stderr}"
    run = subprocess.run([sys.executable, "-c", _IMPORT_CHECK, str(so)], capture_output=True, text=True,
                         timeout=300, cwd=tmp)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout + run.stderr
    assert "must be CUDA tensors" in run.stdout and "same length" in run.stdout, run.stdout


def test_csrc_has_sources():
    assert CU_FILES, "no csrc/*.cu found"
    assert (CSRC / "binding.cpp").exists()


@pytest.mark.parametrize("name", CU_FILES)
def test_nvcc_compiles_sm80_sm90a(compiled, name):
    rc, out, sec, cmd = compiled[name]
    assert rc == 0, f"nvcc failed on {name} ({sec:.1f} s):\n$ {cmd}\n{out}"


def test_binding_compiles_against_torch(compiled):
    if "binding.cpp" not in compiled:
        pytest.skip("no C++ compiler (g++/c++) on PATH")
    rc, out, sec, cmd = compiled["binding.cpp"]
    assert rc == 0, f"g++ failed on binding.cpp ({sec:.1f} s):\n$ {cmd}\n{out}"


def test_compile_wall_time_budget(compiled):
    # the whole CPU suite's compile checks must stay well under 3 minutes on 2 cores
    assert compiled["_wall"] < 180, f"compile checks took {compiled['_wall']:.0f} s"


@pytest.mark.parametrize("name", CU_FILES + sorted(p.name for p in CSRC.glob("*.cuh")) + ["gems_cuda.h"])
def test_cuda_sources_are_free_of_torch_headers(name):
    text = (CSRC / name).read_text()
    includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', text, flags=re.M)
    bad = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "pybind11", "Python.h")]
    assert not bad, f"{name} includes torch/pybind headers {bad}: csrc/*.cu must build without torch"


@pytest.mark.parametrize("name", CU_FILES)
def test_every_launch_checks_its_error(name):
    lines = (CSRC / name).read_text().splitlines()
    launches = [i for i, line in enumerate(lines) if "<<<" in line and not line.lstrip().startswith("//")]
    assert launches, f"{name}: no kernel launch (<<<) found; a launch hidden in a macro would go unchecked here"
    for i in launches:
        # the launch statement may span a few lines; its error check must follow right after it
        window = "\n".join(lines[i:i + 6])
        assert "cudaGetLastError()" in window, f"{name}:{i + 1}: kernel launch without cudaGetLastError()"
