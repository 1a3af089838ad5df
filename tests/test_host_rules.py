"""The CUDA rules' arithmetic, built for the host with the C++ compiler, against NumPy.

kernels/common.cuh, kernels/<rule>.cuh and tests/host/harness.h are compiled into a
shared library (no GPU, no CUDA toolkit). For every case of KERNEL_CASES, float32 and
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
from fusedopt import schedules as S
from conftest import KERNEL_CASES, KERNEL_RULE_CASES, case_ids, random_grads, random_params, require_in_ci
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
    # Rules with kernels of their own (LAMB) have no fused_element: their step values only.
    source += "".join(("" if _kernels.own_kernels(r) else f"FO_HOST_ENTRIES({r})\n")
                      + f"FO_HOST_STEP_VALUES({r})\n" for r in rules)
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
    unscale = None if opt._unscale() is None else dtype.type(opt._unscale())
    factors = clip_factors(opt, g, params.offsets, unscale)
    factors = None if factors is None else np.array(factors, dtype=dtype)
    tiles = _kernels.TileTable(params.offsets, per_segment=bool(opt.clipnorm), sm_count=2)
    pro = _kernels.pack_prologue(dtype, opt.loss_scale_factor, opt.clipvalue, opt.weight_decay,
                                 opt.coupled_weight_decay, opt.maximize)
    st = _kernels.pack_step_scalars(dtype, lr, scalars)
    fn = getattr(lib, f"host_{opt.rule}_{dtype.name}")
    fn.restype = None
    s = list(slots) + [None] * (3 - len(slots))
    fn(pointer(params.data), pointer(g), pointer(s[0]), pointer(s[1]), pointer(s[2]),
       pointer(tiles.start), pointer(tiles.segment), ctypes.c_longlong(tiles.count),
       pointer(factors), ctypes.c_int(0 if factors is None else len(factors)),
       pointer(pro), pointer(st))


# The cases of the rules that run as one fused pass (fused_element); the host step of
# the others is tested through the host executor (tests/test_host_executor.py), and so
# are Keras' options around fused_element (EMA, gradient accumulation:
# kernels/options.cuh; also tests/test_emulated_options.py).
FUSED_CASES = [c for c in KERNEL_CASES if not _kernels.own_kernels(getattr(fusedopt, c[1]).rule)
               and not (c[2].get("use_ema") or c[2].get("gradient_accumulation_steps"))]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", FUSED_CASES, ids=case_ids(FUSED_CASES))
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


# ------------------------------------------------------------- the step state
# kernels/step.cuh computes every step's learning rate and scalars from the Hyper block
# and the counters; Python's _learning_rate_at/_rule_scalars are the independent
# implementation. Both in double, the same operations in the same order: on the same
# libm they agree to the bit, and the test allows 2 ulp for other libms.
SCHEDULES = {
    "constant": None,
    "exponential": S.ExponentialDecay(0.1, 7, 0.5),
    "exponential-staircase": S.ExponentialDecay(0.1, 7.5, 0.3, staircase=True),
    "inverse-time": S.InverseTimeDecay(0.1, 3, 0.7),
    "inverse-time-staircase": S.InverseTimeDecay(0.1, 4, 2.0, staircase=True),
    "piecewise": S.PiecewiseConstantDecay([5, 10, 20.5], [0.1, 0.05, 0.01, 0.001]),
    "piecewise-32": S.PiecewiseConstantDecay(list(range(1, 32)), [0.1 / k for k in range(1, 33)]),
    "polynomial": S.PolynomialDecay(0.1, 40, 0.001, power=2.0),
    "polynomial-cycle": S.PolynomialDecay(0.1, 15, 0.002, power=0.5, cycle=True),
    "cosine": S.CosineDecay(0.1, 50, alpha=0.1),
    "cosine-warmup": S.CosineDecay(0.01, 50, alpha=0.05, warmup_target=0.1, warmup_steps=10),
    "restarts": S.CosineDecayRestarts(0.1, 10, t_mul=2.0, m_mul=0.7, alpha=0.01),
    "restarts-t1": S.CosineDecayRestarts(0.1, 7, t_mul=1.0, m_mul=0.9, alpha=0.02),
    "restarts-t3": S.CosineDecayRestarts(0.1, 1, t_mul=3.0, m_mul=1.0, alpha=0.01),
}
ITERATIONS = list(range(60)) + [99, 100, 101, 242, 363, 1000, 12345, 10**6]
ULP2 = 4.5e-16  # relative: 2 ulp of a double


def host_values(lib, opt, iterations):
    hyper, host_evaluated = _kernels.optimizer_hyper(opt)
    assert not host_evaluated
    state = _kernels.pack_step_state(iterations, product=opt._running_product(iterations))
    out = np.zeros((), _kernels.STEP_VALUES)
    fn = getattr(lib, f"host_step_values_{opt.rule}")
    fn.restype = None
    fn(pointer(hyper), pointer(state), pointer(out))
    return out


def assert_values_equal(got, want, what):
    got, want = np.asarray(got, float), np.asarray(want, float)
    np.testing.assert_allclose(got, want, rtol=ULP2, atol=0, err_msg=what)


@pytest.mark.parametrize("schedule", list(SCHEDULES), ids=list(SCHEDULES))
@pytest.mark.parametrize("case", KERNEL_RULE_CASES, ids=case_ids(KERNEL_RULE_CASES))
def test_step_values_match_python(host_library, case, schedule):
    """Learning rate, every scalar and Nadam's running product, over many steps."""
    _, cls_name, kwargs = case
    lr = SCHEDULES[schedule]
    opt = getattr(fusedopt, cls_name)(**{**kwargs, **({} if lr is None else {"learning_rate": lr})})
    for it in ITERATIONS:
        v = host_values(host_library, opt, it)
        try:
            lr_py, scalars = opt._step_scalars(it)
        except ValueError:  # a rate the host refuses (Ftrl's 0 after underflow)
            continue
        what = f"{cls_name} {schedule} iterations={it}"
        assert_values_equal(v["lr"], lr_py, what + " lr")
        assert_values_equal(v["c"][: len(scalars)], scalars, what + " scalars")
        assert_values_equal(v["product"], opt._running_product(it + 1), what + " product")


@pytest.mark.parametrize("schedule", ["constant", "cosine", "piecewise"])
def test_keras2_decay_matches_python(host_library, schedule):
    lr = SCHEDULES[schedule]
    with pytest.warns(DeprecationWarning):
        opt = fusedopt.SGD(**({} if lr is None else {"learning_rate": lr}), decay=0.03)
    for it in ITERATIONS:
        assert_values_equal(host_values(host_library, opt, it)["lr"], opt._step_scalars(it)[0],
                            f"{schedule} + decay, iterations={it}")


def test_long_piecewise_and_callables_are_left_to_the_host():
    too_long = S.PiecewiseConstantDecay(list(range(1, 33)), [0.1] * 33)
    for lr in (too_long, lambda: 0.25):
        opt = fusedopt.Adam(learning_rate=lr)
        hyper, host_evaluated = _kernels.optimizer_hyper(opt, host_learning_rate=0.25)
        assert host_evaluated
        assert hyper["lr"]["kind"] == _kernels.CONSTANTS["FO_LR_CONSTANT"]
        assert hyper["lr"]["initial"] == 0.25


def test_advance_counts_steps_and_skips(host_library):
    state = _kernels.pack_step_state(7, skipped_steps=2, product=0.5)
    values = np.zeros((), _kernels.STEP_VALUES)
    values["product"] = 0.25
    host_library.host_advance.restype = None
    host_library.host_advance(pointer(state), pointer(values), 1)
    assert (int(state["iterations"]), int(state["skipped_steps"]),
            int(state["last_step_skipped"]), float(state["product"])) == (7, 3, 1, 0.5)
    state["skip"] = 1
    host_library.host_advance(pointer(state), pointer(values), 0)
    assert (int(state["iterations"]), int(state["skipped_steps"]), int(state["last_step_skipped"]),
            int(state["skip"]), float(state["product"])) == (8, 3, 0, 0, 0.25)


@pytest.mark.parametrize("name,dtype", [
    ("LearningRate", _kernels.LEARNING_RATE), ("Hyper", _kernels.HYPER),
    ("StepState", _kernels.STEP_STATE), ("StepValues", _kernels.STEP_VALUES),
])
def test_numpy_mirrors_match_the_compilers_layout(host_library, name, dtype):
    host_library.host_struct_layout.restype = ctypes.c_char_p
    size, *fields = host_library.host_struct_layout(name.encode()).decode().rstrip(";").split(";")
    assert int(size) == dtype.itemsize
    layout = [(f.split(":")[0], int(f.split(":")[1]), int(f.split(":")[2])) for f in fields]
    assert [f[0] for f in layout] == list(dtype.names)
    for field, offset, nbytes in layout:
        assert (dtype.fields[field][1], dtype.fields[field][0].itemsize) == (offset, nbytes), field
