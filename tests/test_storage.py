"""kernels/storage.cuh built for the host with g++, against its NumPy twins in
fusedopt/precision.py, against ml_dtypes (float32 -> bfloat16) and NumPy (float16):

- loads: all 2**16 bfloat16 and float16 bit patterns, exact, NaN payloads included;
- nearest stores: every representable value of both formats, its neighbours one float32
  ulp away, every tie between two neighbours and the float32 on either side of it, the
  overflow boundary, +-0, inf, NaNs, subnormals, and 2**20 random float32 bit patterns;
- stochastic rounding: bit-identical host and NumPy given (seed, step, index), and
  with a kernel that hashes once per group of four; only the two neighbours; exactly
  unbiased over the 2**16 dither values, and in the mean over 2**16 steps and over
  2**20 elements; the dithers uniform, uncorrelated between steps and neighbours, and
  changing with seed, step and index;
- the header compiles with NVRTC for sm_80 and sm_90 with production flags, no
  flush-to-zero and no hardware float conversion in the PTX.
"""

import ctypes
import shutil
import subprocess

import ml_dtypes
import numpy as np
import pytest

from conftest import require_in_ci
from fusedopt import _kernels
from fusedopt import precision as P

BF16 = np.dtype(ml_dtypes.bfloat16)
ALL16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)

HOST_WRAPPER = r"""
#include "storage.cuh"
typedef long long i64;
extern "C" {
void load_bf16(const fo_u16* in, float* out, i64 n) {
    for (i64 i = 0; i < n; ++i) out[i] = fo_load(fo_bf16{in[i]});
}
void load_f16(const fo_u16* in, float* out, i64 n) {
    for (i64 i = 0; i < n; ++i) out[i] = fo_load(fo_f16{in[i]});
}
void store_bf16(const float* in, fo_u16* out, i64 n) {
    for (i64 i = 0; i < n; ++i) { fo_bf16 s; fo_store(s, in[i]); out[i] = s.bits; }
}
void store_f16(const float* in, fo_u16* out, i64 n) {
    for (i64 i = 0; i < n; ++i) { fo_f16 s; fo_store(s, in[i]); out[i] = s.bits; }
}
void store_bf16_stochastic(const float* in, fo_u16* out, i64 n, fo_u64 seed, fo_u64 step,
                           const fo_u64* index) {
    for (i64 i = 0; i < n; ++i) { fo_bf16 s; fo_store_stochastic(s, in[i], seed, step, index[i]);
                                  out[i] = s.bits; }
}
// What a vectorised kernel does: one word per aligned group of four elements.
void store_bf16_stochastic_by_groups(const float* in, fo_u16* out, i64 n, fo_u64 seed,
                                     fo_u64 step, fo_u64 first) {
    for (i64 g = 0; g < n / 4; ++g) {
        fo_u64 index = first + 4 * (fo_u64)g, word = fo_random_word(seed, step, index >> 2);
        for (int k = 0; k < 4; ++k)
            out[4 * g + k] = fo_float_to_bf16_sr(in[4 * g + k], fo_dither_of(word, index + k));
    }
}
void bf16_sr_with_dither(const float* in, const fo_u32* dither, fo_u16* out, i64 n) {
    for (i64 i = 0; i < n; ++i) out[i] = fo_float_to_bf16_sr(in[i], dither[i]);
}
void random_word(fo_u64 seed, fo_u64 step, const fo_u64* group, fo_u64* out, i64 n) {
    for (i64 i = 0; i < n; ++i) out[i] = fo_random_word(seed, step, group[i]);
}
void dither(fo_u64 seed, fo_u64 step, const fo_u64* index, fo_u32* out, i64 n) {
    for (i64 i = 0; i < n; ++i) out[i] = fo_dither(seed, step, index[i]);
}
}
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if compiler is None:
        require_in_ci("a C++ compiler (g++) for the host build of storage.cuh")
    out = tmp_path_factory.mktemp("storage") / "libstorage.so"
    # The same flags as the rules' host build: no FMA contraction, no fast math.
    cmd = [compiler, "-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared",
           "-fPIC", "-Wall", "-Wextra", "-Werror", "-x", "c++", "-",
           "-I", str(_kernels.kernel_dir()), "-o", str(out)]
    subprocess.run(cmd, input=HOST_WRAPPER.encode(), check=True)
    return HostStorage(ctypes.CDLL(str(out)))


def ptr(a):
    return ctypes.c_void_p(a.ctypes.data)


class HostStorage:
    """The header's functions over NumPy arrays, through ctypes."""

    def __init__(self, lib):
        self.lib = lib
        for fn in ("load_bf16", "load_f16", "store_bf16", "store_f16", "store_bf16_stochastic",
                   "store_bf16_stochastic_by_groups", "bf16_sr_with_dither", "random_word",
                   "dither"):
            getattr(lib, fn).restype = None

    def _map(self, fn, x, in_dtype, out_dtype, *extra):
        x = np.ascontiguousarray(x, dtype=in_dtype)
        out = np.empty(x.shape, out_dtype)
        getattr(self.lib, fn)(ptr(x), ptr(out), ctypes.c_longlong(x.size), *extra)
        return out

    def load_bf16(self, bits):
        return self._map("load_bf16", bits, np.uint16, np.float32)

    def load_f16(self, bits):
        return self._map("load_f16", bits, np.uint16, np.float32)

    def store_bf16(self, x):
        return self._map("store_bf16", x, np.float32, np.uint16)

    def store_f16(self, x):
        return self._map("store_f16", x, np.float32, np.uint16)

    def store_bf16_stochastic(self, x, seed, step, index):
        index = np.ascontiguousarray(np.broadcast_to(index, np.shape(x)), dtype=np.uint64)
        return self._map("store_bf16_stochastic", x, np.float32, np.uint16,
                         ctypes.c_uint64(seed), ctypes.c_uint64(step), ptr(index))

    def store_bf16_stochastic_by_groups(self, x, seed, step, first):
        return self._map("store_bf16_stochastic_by_groups", x, np.float32, np.uint16,
                         ctypes.c_uint64(seed), ctypes.c_uint64(step), ctypes.c_uint64(first))

    def bf16_sr_with_dither(self, x, dither):
        x = np.ascontiguousarray(x, dtype=np.float32)
        dither = np.ascontiguousarray(dither, dtype=np.uint32)
        out = np.empty(x.shape, np.uint16)
        self.lib.bf16_sr_with_dither(ptr(x), ptr(dither), ptr(out), ctypes.c_longlong(x.size))
        return out

    def _hash(self, fn, seed, step, counters, out_dtype):
        counters = np.ascontiguousarray(counters, dtype=np.uint64)
        out = np.empty(counters.shape, out_dtype)
        getattr(self.lib, fn)(ctypes.c_uint64(seed), ctypes.c_uint64(step), ptr(counters),
                              ptr(out), ctypes.c_longlong(counters.size))
        return out

    def random_word(self, seed, step, group):
        return self._hash("random_word", seed, step, group, np.uint64)

    def dither(self, seed, step, index):
        return self._hash("dither", seed, step, index, np.uint32)


def f32(bits):
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def u32(x):
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def assert_bits_equal(actual, desired, inputs, what):
    """Equal bit patterns; on failure, the first few inputs that differ, in hex."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    bad = np.flatnonzero(actual != desired)
    if bad.size:
        shown = ", ".join(f"{int(i):#x}->{int(a):#x} not {int(d):#x}" for i, a, d in zip(
            inputs[bad[:8]], actual[bad[:8]], desired[bad[:8]]))
        pytest.fail(f"{what}: {bad.size} of {actual.size} differ: {shown}")


# ----------------------------------------------------------------------- loads


def test_bf16_load_is_exact_for_every_bit_pattern(host):
    want = ALL16.view(BF16).astype(np.float32).view(np.uint32)
    assert_bits_equal(u32(host.load_bf16(ALL16)), want, ALL16, "host bf16 load")
    assert_bits_equal(u32(P.bf16_bits_to_float32(ALL16)), want, ALL16, "NumPy bf16 load")


def test_f16_load_is_exact_for_every_bit_pattern(host):
    want = ALL16.view(np.float16).astype(np.float32).view(np.uint32)
    assert_bits_equal(u32(host.load_f16(ALL16)), want, ALL16, "host f16 load")
    assert_bits_equal(u32(P.f16_bits_to_float32(ALL16)), want, ALL16, "NumPy f16 load")


# -------------------------------------------------------------- nearest stores


def rounding_boundaries(values_f32_bits, half_ulp_bits):
    """Every representable value, one float32 ulp either side, every tie between it and
    its upper neighbour (value + half an ulp of the narrow format) and one ulp either
    side of that tie, for both signs."""
    v = values_f32_bits.astype(np.int64)
    points = np.concatenate([v + d for d in (-1, 0, 1)]
                            + [v + half_ulp_bits + d for d in (-1, 0, 1)])
    points = points[(points >= 0) & (points <= 0x7FFFFFFF)]
    points = np.concatenate([points, points | 0x80000000])
    return np.unique(points).astype(np.uint32)


SPECIALS = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00000,
                     0x7F800001, 0xFF800001, 0x7FBFFFFF, 0x7FC12345, 0x7F812345, 0xFFFFFFFF,
                     0x7F7FFFFF, 0xFF7FFFFF, 0x7F7F7FFF, 0x7F7F8000, 0x00000001, 0x80000001,
                     0x007FFFFF, 0x00800000, 0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001,
                     0x33000000, 0x33000001, 0x32FFFFFF, 0x32800000, 0x38800000, 0x387FFFFF],
                    dtype=np.uint32)


def float32_cases(narrow_values_bits, shift):
    """The boundary set for a 16-bit format whose values are float32 bit patterns
    `narrow_values_bits` (ulp 1 << shift in the normal range), plus the specials and
    2**20 random bit patterns."""
    random = np.random.default_rng(13).integers(0, 1 << 32, size=1 << 20, dtype=np.uint64)
    boundaries = rounding_boundaries(narrow_values_bits, 1 << (shift - 1))
    return np.unique(np.concatenate([boundaries, SPECIALS, random.astype(np.uint32)]))


def finite_f16_bits():
    h = ALL16[(ALL16 & 0x7C00) != 0x7C00]
    return u32(h.view(np.float16).astype(np.float32))


def test_bf16_nearest_matches_ml_dtypes(host):
    bf16_values = ALL16.astype(np.uint32) << 16
    cases = float32_cases(bf16_values[(bf16_values & 0x7F800000) != 0x7F800000], 16)
    assert cases.size > 1_000_000
    with np.errstate(invalid="ignore"):
        want = f32(cases).astype(BF16).view(np.uint16)
    assert_bits_equal(host.store_bf16(f32(cases)), want, cases, "host bf16 store")
    assert_bits_equal(P.round_to_bf16_nearest(f32(cases)), want, cases, "NumPy bf16 store")


def test_f16_nearest_matches_numpy(host):
    # Subnormal float16 values are 2**-24 apart however small, so their ties are not
    # value + half a normal ulp: add every tie of the subnormal range explicitly.
    subnormal_ties = u32((np.arange(1 << 10, dtype=np.float32) + np.float32(0.5))
                         * np.float32(2.0 ** -24))
    cases = np.unique(np.concatenate([float32_cases(finite_f16_bits(), 13),
                                      rounding_boundaries(subnormal_ties, 0)]))
    with np.errstate(over="ignore", invalid="ignore"):
        want = f32(cases).astype(np.float16).view(np.uint16)
    assert_bits_equal(host.store_f16(f32(cases)), want, cases, "host f16 store")
    assert_bits_equal(P.round_to_f16_nearest(f32(cases)), want, cases, "NumPy f16 store")


@pytest.mark.parametrize("fmt", ["bf16", "f16"])
def test_golden_rounding_points(host, fmt):
    """Hand-computed: ties to even, the overflow boundary, the smallest subnormal."""
    cases = {  # float32 bits -> expected 16-bit bits
        "bf16": {0x3F808000: 0x3F80, 0x3F818000: 0x3F82, 0x3F808001: 0x3F81,
                 0x7F7F7FFF: 0x7F7F, 0x7F7F8000: 0x7F80, 0x00008000: 0x0000,
                 0x00018000: 0x0002, 0xFFC12345: 0xFFC0, 0x7F800001: 0x7FC0},
        "f16": {0x3F801000: 0x3C00, 0x3F803000: 0x3C02, 0x3F801001: 0x3C01,
                0x477FEFFF: 0x7BFF, 0x477FF000: 0x7C00, 0x33000000: 0x0000,
                0x33000001: 0x0001, 0x387FC000: 0x03FF, 0x387FE000: 0x0400,
                0x387DE000: 0x03F8, 0x387DA000: 0x03F6, 0x7F800001: 0x7C01,
                0xFFC12345: 0xFE09},
    }[fmt]
    x = f32(np.array(list(cases), dtype=np.uint32))
    want = np.array(list(cases.values()), dtype=np.uint16)
    store = host.store_bf16 if fmt == "bf16" else host.store_f16
    np.testing.assert_array_equal(store(x), want)


# ----------------------------------------------------------- stochastic rounding

SEEDS = [0, 1, 12345, (1 << 64) - 1]
STEPS = [0, 1, 999, 1 << 40, (1 << 64) - 1]


def stochastic_inputs(n=1 << 16, seed=3):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 1 << 32, size=n, dtype=np.uint64).astype(np.uint32)
    bits[: SPECIALS.size] = SPECIALS
    normal = rng.normal(size=n // 2).astype(np.float32)
    return np.concatenate([f32(bits), normal])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("step", STEPS)
def test_stochastic_host_and_numpy_agree_bit_for_bit(host, seed, step):
    x = stochastic_inputs()
    index = np.random.default_rng(step % 97).integers(0, 1 << 64, size=x.size, dtype=np.uint64)
    index[:4] = [0, 1, (1 << 63), (1 << 64) - 1]
    np.testing.assert_array_equal(host.random_word(seed, step, index),
                                  P.random_word(seed, step, index))
    np.testing.assert_array_equal(host.dither(seed, step, index), P.dither(seed, step, index))
    assert_bits_equal(host.store_bf16_stochastic(x, seed, step, index),
                      P.stochastic_round_to_bf16(x, seed, step, index), u32(x),
                      "host vs NumPy stochastic bf16")


def test_stochastic_rounds_only_to_the_two_neighbours(host):
    x = stochastic_inputs()
    u = u32(x)
    out = host.store_bf16_stochastic(x, 5, 6, np.arange(x.size)).astype(np.uint32)
    finite = (u & 0x7FFFFFFF) < 0x7F800000
    below = u >> 16  # the neighbour nearer zero (truncation); the other is one bf16 ulp out
    assert np.all((out[finite] == below[finite]) | (out[finite] == below[finite] + 1))
    exact = finite & ((u & 0xFFFF) == 0)
    assert exact.any() and np.all(out[exact] == below[exact]), "exact values must not move"
    assert_bits_equal(out[~finite], host.store_bf16(x[~finite]), u[~finite],
                      "inf and NaN as to nearest")
    # Both neighbours occur: this is not a disguised nearest or truncating store.
    inexact = finite & ~exact
    assert 0.3 < np.mean(out[inexact] == below[inexact] + 1) < 0.7


def test_a_kernel_using_one_word_per_four_elements_stores_the_same_bits(host):
    x = stochastic_inputs(n=1 << 12)[: 1 << 12]
    for first in (0, 4 * 12345, (1 << 64) - (1 << 12)):
        np.testing.assert_array_equal(
            host.store_bf16_stochastic_by_groups(x, 8, 9, first),
            host.store_bf16_stochastic(x, 8, 9, np.arange(x.size, dtype=np.uint64)
                                       + np.uint64(first)))


def test_the_rounding_rule_is_exactly_unbiased(host):
    """Over all 2**16 dither values, the mean of the stored values is x exactly: the
    rounding rule itself has no bias; the hash then only has to be uniform."""
    x = stochastic_inputs(n=64, seed=11)
    x = x[np.isfinite(x) & (np.abs(x) < 1e38)][:40]
    dither = np.arange(1 << 16, dtype=np.uint32)
    for value in x:
        out = host.bf16_sr_with_dither(np.full(dither.size, value, np.float32), dither)
        total = P.bf16_bits_to_float32(out).astype(np.float64).sum()
        assert total == np.float64(value) * (1 << 16), f"biased at {value!r}"


def neighbour_fraction(x):
    """(neighbour nearer zero, |gap|, fraction of the gap from it to x) in bfloat16."""
    u = u32(x)
    lower = P.bf16_bits_to_float32((u >> 16).astype(np.uint16)).astype(np.float64)
    upper = P.bf16_bits_to_float32(((u >> 16) + 1).astype(np.uint16)).astype(np.float64)
    return lower, np.abs(upper - lower), (x.astype(np.float64) - lower) / (upper - lower)


def test_stochastic_rounding_is_unbiased_over_steps(host):
    """Each element's mean over 2**16 steps converges to x: |mean - x| <= 5 sigma with
    sigma = gap * sqrt(f(1 - f) / N) (binomial), for 32 values from f ~ 0 to f ~ 1."""
    steps = 1 << 16
    x = np.concatenate([np.linspace(1.0, 1.0078125, 16, endpoint=False, dtype=np.float32)[1:],
                        np.float32([-3.14159, 1e-30, -2e-40, 65504.3, 0.1, 1.00001, 1.00780,
                                    -7.2e37, 123.456, -0.333, 5e-3, 2.0 ** -130 * 3,
                                    3.00000024, -1.99999, 1.5e-45, 42.42, 8.1e-8])])
    index = np.arange(x.size, dtype=np.uint64) * 1000 + 17
    out = np.stack([host.store_bf16_stochastic(x, 2024, step, index) for step in range(steps)])
    mean = P.bf16_bits_to_float32(out).astype(np.float64).mean(axis=0)
    _, gap, f = neighbour_fraction(x)
    sigma = gap * np.sqrt(np.maximum(f * (1 - f), 1.0 / steps) / steps)
    error = np.abs(mean - x.astype(np.float64))
    assert np.all(error <= 5 * sigma), (x[error > 5 * sigma], (error / sigma).max())


def test_stochastic_rounding_is_unbiased_over_elements(host):
    """One step over 2**20 elements holding the same x: the mean is x within 5 sigma."""
    n = 1 << 20
    for value in np.float32([1.00048828125 + 2 ** -20, -0.7, 3e-39]):
        out = host.store_bf16_stochastic(np.full(n, value, np.float32), 77, 3,
                                         np.arange(n, dtype=np.uint64))
        _, gap, f = neighbour_fraction(np.float32([value]))
        sigma = gap[0] * np.sqrt(f[0] * (1 - f[0]) / n)
        mean = P.bf16_bits_to_float32(out).astype(np.float64).mean()
        assert abs(mean - float(value)) <= 5 * sigma, value


def test_dithers_are_uniform_and_uncorrelated(host):
    """The 16 bits that decide each rounding: each bit position is 1 half of the time;
    an element's dither at step t and t+1 are uncorrelated, and so are the dithers of
    neighbouring elements (which share a word when in the same group of four):
    |r| <= 5/sqrt(N)."""
    n_steps, n_elements = 4096, 64
    d = np.stack([host.dither(9, step, np.arange(n_elements, dtype=np.uint64) + (1 << 33))
                  for step in range(n_steps)])
    for position in range(16):
        ones = ((d >> position) & 1).mean()
        assert abs(ones - 0.5) <= 5 * 0.5 / np.sqrt(d.size), position
    c = d.astype(np.float64) / 65536 - 0.5
    for a, b in [(c[1:], c[:-1]), (c[:, 1:], c[:, :-1]), (c[:, 2:], c[:, :-2])]:
        r = (a * b).mean() / c.var()
        assert abs(r) <= 5 / np.sqrt(a.size), r


@pytest.mark.parametrize("change", ["seed", "step", "index"])
def test_dithers_depend_on_seed_step_and_index(host, change):
    n = 1 << 14
    index = np.arange(n, dtype=np.uint64)
    base = host.dither(1, 10, index)
    other = {"seed": lambda: host.dither(2, 10, index),
             "step": lambda: host.dither(1, 11, index),
             "index": lambda: host.dither(1, 10, index + np.uint64(1))}[change]()
    assert np.mean(base != other) > 0.999  # 16-bit values: equal by chance 1 time in 65536
    words = host.random_word(1, 10, index)
    assert len(np.unique(words)) == n  # distinct groups, distinct words


# ----------------------------------------------------------------------- NVRTC

PROBE = r"""
#include "storage.cuh"
extern "C" __global__ void storage_probe(const fo_bf16* a, const fo_f16* b, const float* x,
                                         const double* d, fo_bf16* ra, fo_f16* rb,
                                         fo_bf16* sa, fo_bf16* sg, float* loaded, double* dd,
                                         unsigned long long seed, unsigned long long step,
                                         unsigned long long n) {
    unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
    if (i >= n) return;
    loaded[i] = fo_load(a[i]) + fo_load(b[i]);
    fo_store(ra[i], fo_load(x[i]));
    fo_store(rb[i], x[i]);
    fo_store_stochastic(sa[i], x[i], seed, step, i);
    fo_store(dd[i], fo_load(d[i]));
    if (i % 4 == 0 && i + 3 < n) {  // the one-word-per-four-elements path
        fo_u64 word = fo_random_word(seed, step, i >> 2);
        for (int k = 0; k < 4; ++k)
            sg[i + k].bits = fo_float_to_bf16_sr(x[i + k], fo_dither_of(word, i + k));
    }
}
"""


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_header_compiles_for_the_gpu_without_flush_to_zero(arch):
    try:
        _kernels.nvrtc_version()
    except Exception as e:
        require_in_ci(f"NVRTC (pip install cuda-bindings nvidia-cuda-nvrtc): {e}")
    source = _kernels.expand_includes(PROBE)
    cubin, ptx, log = _kernels.compile_cubin(source, arch, "storage_probe.cu")
    assert cubin and ".entry storage_probe(" in ptx
    assert "warning" not in log.lower(), log
    code = [line.split("//")[0].split()[0] for line in ptx.splitlines()
            if line.split("//")[0].strip() and not line.strip().startswith((".", "$", "{", "}"))]
    assert not [op for op in code if ".ftz" in op], "flush-to-zero in storage.cuh's code"
    # Conversions by integer arithmetic only: the same bits as the host build.
    assert not [op for op in code if op.startswith("cvt") and ("f16" in op or "bf16" in op)]
