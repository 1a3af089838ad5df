"""Every kernel translation unit compiles for sm_80 and sm_90 (no GPU needed), through
the very function production uses (`_kernels.compile_cubin`, NVRTC from PyPI), and the
compiled code rounds like the NumPy reference: no flush-to-zero, no FMA contraction,
IEEE division and square root. Without NVRTC the test skips on a developer machine and
fails in CI, where it must run.
"""

import re
import types

import numpy as np
import pytest

from conftest import require_in_ci
from fusedopt import _kernels, cuda

ARCHS = ["sm_80", "sm_90"]
UNITS = _kernels.translation_units()


def have_nvrtc():
    try:
        _kernels.nvrtc_version()
    except Exception as e:  # no bindings, or the bindings without libnvrtc
        require_in_ci(f"NVRTC (pip install cuda-bindings nvidia-cuda-nvrtc): {e}")


@pytest.fixture(scope="module")
def compiled():
    """{(label, arch): (cubin, ptx, log)}, compiled lazily once per module."""
    cache = {}

    def get(unit, arch):
        key = (unit[0], arch)
        if key not in cache:
            have_nvrtc()
            cache[key] = _kernels.compile_cubin(unit[1], arch, unit[0].replace("/", "_") + ".cu")
        return cache[key]

    return get


def assert_whole_elf(cubin, label):
    """The cubin is a complete ELF64 image: its program and section header tables (NVRTC
    puts them last) lie inside the bytes we have, so a stripped tail would show."""
    assert cubin[:4] == b"\x7fELF" and cubin[4] == 2, f"{label}: not an ELF64 image"

    def field(offset, size):
        return int.from_bytes(cubin[offset:offset + size], "little")

    program_end = field(0x20, 8) + field(0x36, 2) * field(0x38, 2)
    section_end = field(0x28, 8) + field(0x3A, 2) * field(0x3C, 2)
    assert max(program_end, section_end) <= len(cubin), f"{label}: cubin is cut short"


def instructions(ptx):
    """PTX instruction lines, without comments, directives and labels."""
    lines = (line.split("//")[0].strip() for line in ptx.splitlines())
    return [line for line in lines if line and not line.startswith((".", "$", "{", "}"))]


def uses_pow(label):
    rule = label.split("/")[0]
    if rule == "reduce":
        return False
    return "fo_pow" in _kernels.read_source(f"{rule}.cuh")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("unit", UNITS, ids=[u[0] for u in UNITS])
def test_kernel_compiles_with_the_production_flags(compiled, unit, arch):
    label, _, kernels = unit
    cubin, ptx, log = compiled(unit, arch)
    assert_whole_elf(cubin, label)
    for kernel in kernels:
        assert f".entry {kernel}(" in ptx, f"{kernel} missing from {label}"
    assert "warning" not in log.lower(), log


@pytest.mark.parametrize("unit", UNITS, ids=[u[0] for u in UNITS])
def test_compiled_code_rounds_like_numpy(compiled, unit):
    """The PTX shows what the flags promise: subnormals kept, IEEE-rounded division and
    square root, no contraction of a*b+c into fma in float32 code. libdevice's pow
    seeds a Newton step with rcp.approx.ftz and uses fma on purpose (its accuracy is
    its own), so that seed is allowed everywhere and fma in rules that call fo_pow."""
    label, _, _ = unit
    _, ptx, _ = compiled(unit, "sm_90")
    code = [i.split()[0] for i in instructions(ptx)]
    flushing = [op for op in code if ".ftz" in op and not op.startswith("rcp.approx.ftz")]
    assert not flushing, f"{label}: flush-to-zero instructions {sorted(set(flushing))}"
    approximate = [op for op in code if re.match(r"(div\.(approx|full)|sqrt\.approx|rsqrt)", op)]
    assert not approximate, f"{label}: approximate division or square root {approximate}"
    if not label.endswith("float64") and not uses_pow(label):  # float32 math
        contracted = [op for op in code if op.startswith("fma.") and op.endswith(".f32")]
        assert not contracted, f"{label}: float32 multiply-add contracted into fma"


def test_production_loads_what_compile_cubin_built(monkeypatch, tmp_path):
    """CupyBackend must not hand sources to CuPy's compiler (which appends -ftz=true):
    it loads the cubin that compile_cubin produced, from the on-disk cache."""
    loaded = []

    class FakeModule:
        def __init__(self, **kwargs):
            loaded.append(kwargs)

        def get_function(self, name):
            return name

    class FakeDevice:
        attributes = {"MultiProcessorCount": 132}
        compute_capability = "90"

        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake = types.SimpleNamespace(RawModule=FakeModule,
                                 cuda=types.SimpleNamespace(Device=FakeDevice))
    built = []

    def fake_compile(source, arch, name="x.cu"):
        built.append((arch, name))
        return b"CUBIN", "", ""

    monkeypatch.setattr(cuda, "_cupy", lambda: fake)
    monkeypatch.setattr(_kernels, "compile_cubin", fake_compile)
    monkeypatch.setattr(_kernels, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setenv("FUSEDOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cuda.CupyBackend, "_functions", {})
    backend = cuda.CupyBackend("gpu:0")
    assert backend.function("adam", np.float32, "fusedopt_adam") == "fusedopt_adam"
    assert built == [("sm_90", "adam.cu")]
    assert list(loaded[0]) == ["path"], "the kernel must be loaded from a cubin, not compiled by CuPy"
    assert open(loaded[0]["path"], "rb").read() == b"CUBIN"
    # A second backend in the same process and a fresh process (cache) reuse the cubin.
    monkeypatch.setattr(cuda.CupyBackend, "_functions", {})
    cuda.CupyBackend("gpu:0").function("adam", np.float32, "fusedopt_adam")
    assert len(built) == 1


def test_cache_key_follows_source_and_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(_kernels, "compile_cubin", lambda s, a, n="x": (s.encode(), "", ""))
    monkeypatch.setattr(_kernels, "nvrtc_version", lambda: (13, 0))
    monkeypatch.setenv("FUSEDOPT_CACHE_DIR", str(tmp_path))
    a = _kernels.cached_cubin("source a", "sm_90")
    assert _kernels.cached_cubin("source a", "sm_90") == a
    assert _kernels.cached_cubin("source b", "sm_90") != a
    assert _kernels.cached_cubin("source a", "sm_80") != a
    monkeypatch.setattr(_kernels, "NVRTC_OPTIONS", _kernels.NVRTC_OPTIONS + ("-ftz=true",))
    assert _kernels.cached_cubin("source a", "sm_90") != a
    assert not list(tmp_path.rglob("*.tmp"))


def test_compiling_leaves_python_constants_alone():
    """An empty log is one byte (its NUL). Written into an immutable b" " * 1, which is
    CPython's shared b" ", it made every later b" " * k in the process NUL bytes."""
    have_nvrtc()
    _, _, log = _kernels.compile_cubin('extern "C" __global__ void k() {}', "sm_90", "k.cu")
    assert log == ""
    shared_space = b"x "[1:]  # a one-byte slice is CPython's shared b" "
    assert shared_space * 5 == bytes([32] * 5)


def test_a_compile_error_names_the_unit_and_shows_the_log():
    have_nvrtc()
    with pytest.raises(_kernels.CompileError, match=r"broken\.cu.*sm_90(.|\n)*error"):
        _kernels.compile_cubin("this is not C++", "sm_90", "broken.cu")


def test_every_rule_has_a_kernel_and_a_reference():
    from fusedopt import reference

    for rule in _kernels.rule_names():
        assert (_kernels.kernel_dir() / f"{rule}.cuh").is_file()
        assert callable(getattr(reference, rule))
