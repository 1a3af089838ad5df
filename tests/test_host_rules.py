"""The CUDA rules' arithmetic, built for the host with the C++ compiler, against NumPy.

kernels/common.cuh, kernels/<rule>.cuh and tests/host/harness.h are compiled into a
shared library (no GPU, no CUDA toolkit). For every case of CASES, float32 and
float64, each of 20 steps starts both sides from the same state and compares params
and every slot: float64 to 1e-13 relative, float32 to 1e-6 (see assert_close). The norm-clip factor
formulas are compared with the NumPy path's too. Without a C++ compiler the test
skips here and fails in CI.
"""

import ctypes
from pathlib import Path

import numpy as np
import pytest

import fusedopt
from conftest import CASES, case_ids, random_grads, random_params, require_in_ci
from fusedopt import _kernels, host
from fusedopt.reference import clip_factors, clipnorm_factor, global_clipnorm_factor

HERE = Path(__file__).parent
LAYOUT = [(5000,), (3, 7), (), (0,), (1,), (2100,), (33,)]  # multi-tile segments too
STEPS = 20
RTOL = {np.float64: 1e-13, np.float32: 1e-6}


def assert_close(actual, desired, dtype, what):
    """Elementwise relative, plus an absolute floor relative to the buffer's largest value:
    cancellations (Ftrl's n'^p - n^p, clip(z) - z near l1) amplify the last-bit
    differences between libm's pow and NumPy's own into small absolute errors."""
    rtol = RTOL[dtype]
    scale = float(np.max(np.abs(desired[np.isfinite(desired)]), initial=0.0))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale, err_msg=what)


@pytest.fixture(scope="session")
def host_library():
    rules = _kernels.rule_names()
    source = "".join(f'#include "{r}.cuh"\n' for r in rules) + '#include "harness.h"\n'
    source += "".join(f"FO_HOST_ENTRIES({r})\n" for r in rules)
    # -ffp-contract=off: no FMA contraction, like the NVRTC build (--fmad=false).
    flags = ["-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math", "-shared", "-fPIC",
             "-Wall", "-Werror", "-Wno-unused-parameter"]
    try:  # the host executor's build: compiler discovery and the on-disk cache
        path = host.compile_library(source, "test_rules", flags=flags,
                                    include_dirs=[_kernels.kernel_dir(), HERE / "host"])
    except host.HostBuildError as e:
        require_in_ci(f"the host build of the rules: {e}")
    return ctypes.CDLL(str(path))


def pointer(a):
    return None if a is None else ctypes.c_void_p(a.ctypes.data)


def host_step(lib, opt, params, g, slots, lr, scalars):
    """One step of the host build on `params`/`slots` in place, inputs as the GPU path
    would prepare them (tile table, clip factors, packed prologue and scalars)."""
    dtype = params.dtype
    unscale = dtype.type(1.0 / opt.loss_scale_factor) if opt.loss_scale_factor else None
    factors = clip_factors(opt, g, params.offsets, unscale)
    factors = None if factors is None else np.array(factors, dtype=dtype)
    tiles = _kernels.TileTable(params.offsets, per_segment=bool(opt.clipnorm), sm_count=2)
    pro = _kernels.pack_prologue(dtype, opt.loss_scale_factor, opt.clipvalue, opt.weight_decay)
    st = _kernels.pack_step_scalars(dtype, lr, scalars)
    fn = getattr(lib, f"host_{opt.rule}_{dtype.name}")
    fn.restype = None
    s = list(slots) + [None] * (3 - len(slots))
    fn(pointer(params.data), pointer(g), pointer(s[0]), pointer(s[1]), pointer(s[2]),
       pointer(tiles.start), pointer(tiles.segment), ctypes.c_longlong(tiles.count),
       pointer(factors), ctypes.c_int(0 if factors is None else len(factors)),
       pointer(pro), pointer(st))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_host_rule_matches_numpy(host_library, case, dtype):
    _, cls_name, kwargs = case
    opt = getattr(fusedopt, cls_name)(**kwargs)
    params = fusedopt.FlatBuffer.from_arrays(random_params(LAYOUT, dtype, seed=3))
    opt.build(params)
    for step, grads in enumerate(random_grads(LAYOUT, dtype, seed=4, steps=STEPS, scale=0.7)):
        g = fusedopt.FlatBuffer.from_arrays(grads).data
        host_params = params.copy()
        host_slots = [None if s is None else s.copy() for s in opt._slots]
        lr, scalars = opt._step_scalars(opt.iterations)
        host_step(host_library, opt, host_params, g, host_slots, lr, scalars)
        opt.apply(g, params)
        assert_close(host_params.data, params.data, dtype, f"params, step {step}")
        for name, host, ref in zip(opt.slot_names, [s for s in host_slots if s is not None],
                                   [s for s in opt._slots if s is not None]):
            assert_close(host, ref, dtype, f"{name}, step {step}")


@pytest.mark.parametrize("sum_of_squares", [0.0, 1e-12, 0.25, 1.0, 4.0, 1e30, np.inf, np.nan])
@pytest.mark.parametrize("clipnorm", [0.5, 1.0, 3.0])
def test_host_clip_factor_formulas_match_python(host_library, sum_of_squares, clipnorm):
    for host, python in [(host_library.host_clipnorm_factor, clipnorm_factor),
                         (host_library.host_global_clipnorm_factor, global_clipnorm_factor)]:
        host.restype = ctypes.c_double
        got = host(ctypes.c_double(sum_of_squares), ctypes.c_double(clipnorm))
        want = python(sum_of_squares, clipnorm)
        assert (np.isnan(got) and np.isnan(want)) or got == want, (host.__name__, got, want)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("rule", ["adam", "rmsprop", "lion", "ftrl"])
def test_host_rules_propagate_nan_like_numpy(host_library, rule, dtype):
    """Non-finite gradients give the same NaN/inf pattern on both sides (Keras' default)."""
    cls = {"adam": fusedopt.Adam, "rmsprop": fusedopt.RMSprop, "lion": fusedopt.Lion,
           "ftrl": fusedopt.Ftrl}[rule]
    opt = cls(clipvalue=1.0) if rule != "ftrl" else cls()
    params = fusedopt.FlatBuffer.from_arrays(random_params([(64,)], dtype, seed=5))
    opt.build(params)
    g = np.random.default_rng(6).normal(size=64).astype(dtype)
    g[[1, 7, 30]] = [np.nan, np.inf, -np.inf]
    host_params, host_slots = params.copy(), [None if s is None else s.copy() for s in opt._slots]
    lr, scalars = opt._step_scalars(0)
    host_step(host_library, opt, host_params, g, host_slots, lr, scalars)
    opt.apply(g, params)
    np.testing.assert_array_equal(np.isnan(host_params.data), np.isnan(params.data))
    assert_close(host_params.data, params.data, dtype, "params")
