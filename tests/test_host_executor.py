"""The host executor (kernels/host.cpp through fusedopt/host.py) against the NumPy
reference, its determinism across thread counts, skip_nonfinite, checkpoints, the
build cache and the fallback when there is no compiler.

The host executor runs the CUDA rules' own code, so where neither side sums a norm
nor calls pow it must agree with the reference to the bit (same float operations in
the same order, no FMA contraction); elsewhere within the tolerances of
test_host_rules.py.
"""

import ctypes
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

import fusedopt
from conftest import CASES, KERNEL_CASES, case_ids, random_grads, random_params, require_in_ci
from fusedopt import _kernels, host

# Sizes 0 and 1, odd sizes, segments of several tiles (host tiles are 16384 elements
# here) that straddle tile boundaries when not clipping per segment, and more than
# host.cpp's FO_MIN_PARALLEL (65536) elements so that the thread pool runs.
LAYOUT = [(40000,), (3, 7), (), (0,), (1,), (30001,), (33,)]
STEPS = 20
RTOL = {np.float64: 1e-13, np.float32: 1e-6}


@pytest.fixture(scope="session")
def host_ok():
    try:
        host.library("adam", np.float32)
    except host.HostBuildError as e:
        require_in_ci(f"the host executor: {e}")


def assert_close(actual, desired, dtype, what):
    rtol = RTOL[dtype]
    scale = float(np.max(np.abs(desired[np.isfinite(desired)]), initial=0.0))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale, err_msg=what)


def bitwise_expected(kwargs):
    """Same float operations in the same order: no norm sums, no pow."""
    if kwargs.get("clipnorm") or kwargs.get("global_clipnorm"):
        return False
    return kwargs.get("learning_rate_power", -0.5) in (-0.5, 0.0)


def run_both(cls_name, kwargs, dtype, layout, steps, seed=3, num_threads=None):
    """The same steps through executor='host' and executor='numpy'; compared after
    every step, params and every slot."""
    init = random_params(layout, dtype, seed=seed)
    fast_params = fusedopt.FlatBuffer.from_arrays(init)
    ref_params = fusedopt.FlatBuffer.from_arrays(init)
    fast = getattr(fusedopt, cls_name)(executor="host", num_threads=num_threads, **kwargs)
    ref = getattr(fusedopt, cls_name)(executor="numpy", **kwargs)
    # LAMB's per-segment norms and Adafactor's row, column and rms sums are added in
    # another order than NumPy's: within the tolerances, not to the bit. (Muon's
    # Newton-Schulz runs NumPy's own matmuls.)
    exact = bitwise_expected(kwargs) and \
        getattr(fusedopt, cls_name).rule not in ("lamb", "adafactor")
    for step, grads in enumerate(random_grads(layout, dtype, seed=seed + 1, steps=steps,
                                              scale=0.7)):
        g = fusedopt.FlatBuffer.from_arrays(grads).data
        fast.apply(g, fast_params)
        ref.apply(g, ref_params)
        pairs = [("params", fast_params.data, ref_params.data)]
        pairs += [(name, fast.slots()[name], ref.slots()[name]) for name in ref.slot_names]
        for name, a, b in pairs:
            if exact:
                np.testing.assert_array_equal(a, b, err_msg=f"{name}, step {step}")
            else:
                assert_close(a, b, dtype, f"{name}, step {step}")
    assert fast.executor_name == "host" and ref.executor_name == "numpy"
    # Keras' iterations: updates, calls // N under gradient accumulation
    assert fast.iterations == ref.iterations == steps // (
        kwargs.get("gradient_accumulation_steps") or 1)
    return fast, fast_params


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=case_ids(KERNEL_CASES))
def test_host_executor_matches_numpy(host_ok, case, dtype):
    _, cls_name, kwargs = case
    run_both(cls_name, kwargs, dtype, LAYOUT, STEPS)


@pytest.mark.parametrize("layout", [[(0,)], [(1,)], [(5,), (0,), ()], [(8193,)]],
                         ids=["empty", "one", "tiny", "two-tiles"])
@pytest.mark.parametrize("kwargs", [{}, {"clipnorm": 0.5}, {"global_clipnorm": 0.5},
                                    {"skip_nonfinite": True}],
                         ids=["plain", "clipnorm", "global", "skip"])
def test_host_executor_small_layouts(host_ok, layout, kwargs):
    run_both("Adam", kwargs, np.float32, layout, steps=3)


# Bigger than the pool's threshold, so that threads split the tiles and segments
# differently for each count: 200 segments of mixed sizes (per-segment tiles of every
# length), and segments of many tiles that two or more threads share.
THREAD_LAYOUTS = {
    "mixed": [(int(s),) for s in np.random.default_rng(0).integers(0, 4000, 200)],
    "big": [(250001,), (3,), (0,), (90000,), (1,), (40000,)],
}


@pytest.mark.parametrize("cls_name,kwargs", [
    ("Adam", {"global_clipnorm": 0.1}),
    ("Adam", {"clipnorm": 0.05, "weight_decay": 0.01}),
    ("Nadam", {"skip_nonfinite": True, "clipnorm": 0.05}),
    ("SGD", {"momentum": 0.9, "global_clipnorm": 0.1, "loss_scale_factor": 8.0}),
    ("RMSprop", {"centered": True, "clipvalue": 0.1}),
    ("Lamb", {"clipnorm": 0.05, "weight_decay": 0.01}),
    ("Lamb", {"skip_nonfinite": True, "global_clipnorm": 0.1}),
    ("Adafactor", {"clipnorm": 0.05, "weight_decay": 0.01}),
    ("Adafactor", {"skip_nonfinite": True, "global_clipnorm": 0.1}),
    ("Adam", {"clipnorm": 0.05, "gradient_accumulation_steps": 2, "use_ema": True,
              "skip_nonfinite": True, "loss_scale_factor": 2.0}),
], ids=["adam-global", "adam-clipnorm-decay", "nadam-skip-clipnorm", "sgd-global-scale",
        "rmsprop-clipvalue", "lamb-clipnorm-decay", "lamb-skip-global",
        "adafactor-clipnorm-decay", "adafactor-skip-global",
        "adam-accumulate-ema-clipnorm-skip"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", sorted(THREAD_LAYOUTS))
def test_bitwise_equal_across_thread_counts(host_ok, cls_name, kwargs, dtype, layout):
    results = []
    for threads in (1, 2, 3, 4):
        opt, params = run_both(cls_name, kwargs, dtype, THREAD_LAYOUTS[layout], steps=4,
                               num_threads=threads)
        results.append([params.data.copy()] + [s.copy() for s in opt.slots().values()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs", [{}, {"clipnorm": 0.05, "weight_decay": 0.01}],
                         ids=["plain", "clipnorm-decay"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_adafactor_bitwise_equal_across_thread_counts(host_ok, kwargs, dtype):
    """Adafactor's row, column and row-mean lists are split across the threads too
    (kernels/adafactor_host.cpp): matrices big enough for the pool, rows and columns
    shared between threads differently for each count."""
    layout = [(300, 251), (3,), (40, 7, 90), (1000, 1), (1, 999), (0, 4)]
    results = []
    for threads in (1, 2, 3, 4):
        opt, params = run_both("Adafactor", kwargs, dtype, layout, steps=3,
                               num_threads=threads)
        assert opt._plan.threads_used == threads
        results.append([params.data.copy()] + [s.copy() for s in opt.slots().values()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cls_name", ["Lamb", "Adafactor", "Muon"])
def test_whole_variable_options_bitwise_equal_across_thread_counts(host_ok, cls_name, dtype):
    """Keras' options in the whole-variable rules' host steps (kernels/whole_host.cpp):
    the accumulate-only calls, the accumulated mean each thread forms over its tiles,
    its norms and the moving average, over matrices big enough for the pool; the
    same bits for every thread count, and the NumPy executor's values (run_both)."""
    layout = [(300, 251), (3,), (40, 7, 90), (1000, 1), (1, 999), (0, 4)]
    kwargs = {"gradient_accumulation_steps": 2, "use_ema": True, "ema_overwrite_frequency": 2,
              "clipnorm": 0.05, "skip_nonfinite": True, "loss_scale_factor": 2.0}
    results = []
    for threads in (1, 2, 3, 4):
        opt, params = run_both(cls_name, kwargs, dtype, layout, steps=6, num_threads=threads)
        assert opt._plan.threads_used == threads
        results.append([params.data.copy()] + [s.copy() for s in opt.slots().values()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size,num_threads,used", [
    (3 * 16384 + 1, 2, 1),       # below the pool's threshold: the calling thread
    (400000, 1, 1),
    (400000, 2, 2),
    (400000, None, "all"),       # every core this process may use
    (4 * 16384 + 100, 8, 5),     # no more threads than tiles
])
def test_steps_run_on_the_requested_threads(host_ok, size, num_threads, used):
    params = fusedopt.FlatBuffer.from_arrays([np.ones(size, np.float32)])
    opt = fusedopt.Adam(num_threads=num_threads)
    opt.apply(np.full(size, 0.5, np.float32), params)
    if used == "all":
        used = min(host.default_num_threads(), opt._plan.tiles.count)
    assert opt._plan.threads_used == used
    np.testing.assert_array_equal(params.data, np.float32(1) - np.float32(0.001))


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kwargs", [{"skip_nonfinite": True},
                                    {"skip_nonfinite": True, "global_clipnorm": 1.0},
                                    {"skip_nonfinite": True, "clipnorm": 0.3,
                                     "learning_rate": fusedopt.schedules.ExponentialDecay(
                                         0.1, 2, 0.5)}],
                         ids=["plain", "global", "clipnorm-schedule"])
@pytest.mark.parametrize("cls_name", ["Adam", "Lamb", "Adafactor"])
def test_skip_nonfinite_through_the_host_executor(host_ok, cls_name, kwargs, dtype):
    grads = random_grads(LAYOUT, dtype, seed=14, steps=8)
    grads[2][0].flat[5] = np.nan
    grads[3][5].flat[100] = np.inf
    grads[5][1].flat[0] = -np.inf
    init = random_params(LAYOUT, dtype, seed=15)
    fast_params, ref_params = (fusedopt.FlatBuffer.from_arrays(init) for _ in range(2))
    fast = getattr(fusedopt, cls_name)(executor="host", **kwargs)
    ref = getattr(fusedopt, cls_name)(executor="numpy", **kwargs)
    for step, step_grads in enumerate(grads):
        before = [fast_params.data.copy()] + [s.copy() for s in fast.slots().values()]
        g = fusedopt.FlatBuffer.from_arrays(step_grads).data
        fast.apply(g, fast_params)
        ref.apply(g, ref_params)
        skipped = step in (2, 3, 5)
        assert fast.last_step_skipped == ref.last_step_skipped == skipped
        if skipped:
            for a, b in zip(before, [fast_params.data] + list(fast.slots().values())):
                np.testing.assert_array_equal(a, b)
        assert_close(fast_params.data, ref_params.data, dtype, f"params, step {step}")
    assert (fast.iterations, fast.skipped_steps) == (ref.iterations, ref.skipped_steps) == (5, 3)


S = fusedopt.schedules
LEARNING_RATES = {
    "exponential": lambda: S.ExponentialDecay(0.01, 3, 0.5, staircase=True),
    "inverse-time": lambda: S.InverseTimeDecay(0.01, 2, 0.3),
    "piecewise": lambda: S.PiecewiseConstantDecay([2, 4], [0.01, 0.005, 0.001]),
    "polynomial": lambda: S.PolynomialDecay(0.01, 5, 0.001, power=2.0, cycle=True),
    "cosine-warmup": lambda: S.CosineDecay(0.001, 6, alpha=0.1, warmup_target=0.01,
                                           warmup_steps=2),
    "cosine-restarts": lambda: S.CosineDecayRestarts(0.01, 2, t_mul=2.0, m_mul=0.5),
    "callable": lambda: (lambda: 0.003),
}


@pytest.mark.parametrize("cls_name", ["Nadam", "Adam", "Ftrl"])
@pytest.mark.parametrize("lr", sorted(LEARNING_RATES), ids=sorted(LEARNING_RATES))
def test_learning_rates_come_from_the_step_state(host_ok, cls_name, lr):
    """Schedules, callables, skipped steps and Nadam's running product: the host
    computes each step's values with kernels/step.cuh, the reference in Python."""
    layout = [(300,), (7,)]
    grads = random_grads(layout, np.float64, seed=51, steps=9)
    grads[3][0].flat[2] = np.nan
    init = random_params(layout, np.float64, seed=52)
    fast_params, ref_params = (fusedopt.FlatBuffer.from_arrays(init) for _ in range(2))
    kwargs = {"learning_rate": None, "skip_nonfinite": True}
    fast = getattr(fusedopt, cls_name)(executor="host", **{**kwargs, "learning_rate":
                                                           LEARNING_RATES[lr]()})
    ref = getattr(fusedopt, cls_name)(executor="numpy", **{**kwargs, "learning_rate":
                                                           LEARNING_RATES[lr]()})
    for step, g in enumerate(grads):
        g = fusedopt.FlatBuffer.from_arrays(g).data
        fast.apply(g, fast_params)
        ref.apply(g, ref_params)
        assert_close(fast_params.data, ref_params.data, np.float64, f"params, step {step}")
    assert fast.executor_name == "host" and (fast.iterations, fast.skipped_steps) == (8, 1)


def test_assignments_and_keras2_decay_reach_the_host_step(host_ok):
    """A rate assigned after a skipped step is used by the next one (issue 10's second
    wrong result on the GPU), with Keras 2's decay applied by the step state."""
    with pytest.warns(DeprecationWarning):
        fast, ref = (fusedopt.SGD(0.1, decay=0.5, skip_nonfinite=True, executor=e)
                     for e in ("host", "numpy"))
    fast_params, ref_params = (fusedopt.FlatBuffer.from_arrays([np.ones(5)]) for _ in range(2))
    for g, lr in [(0.5, None), (np.nan, None), (0.5, 0.5), (0.25, (lambda: 0.2))]:
        if lr is not None:
            fast.learning_rate = ref.learning_rate = lr
        fast.apply(np.full(5, g), fast_params)
        ref.apply(np.full(5, g), ref_params)
        np.testing.assert_array_equal(fast_params.data, ref_params.data)
    np.testing.assert_allclose(fast_params.data, 1 - 0.05 - 0.5 * 0.5 / 1.5 - 0.2 * 0.25 / 2.0,
                               rtol=1e-15)


def test_checkpoint_resume_through_the_host_executor(host_ok, tmp_path):
    """Save after 3 host steps, load, 3 more: bitwise the uninterrupted 6 steps, and
    the loaded optimizer runs on the host executor too."""
    kwargs = {"clipnorm": 0.5, "skip_nonfinite": True, "learning_rate":
              fusedopt.schedules.CosineDecay(0.01, decay_steps=10)}
    grads = random_grads(LAYOUT, np.float32, seed=21, steps=6)
    grads[1][0].flat[0] = np.nan
    init = random_params(LAYOUT, np.float32, seed=22)
    whole_params = fusedopt.FlatBuffer.from_arrays(init)
    whole = fusedopt.Nadam(**kwargs)
    for g in grads:
        whole.apply(fusedopt.FlatBuffer.from_arrays(g).data, whole_params)
    params = fusedopt.FlatBuffer.from_arrays(init)
    opt = fusedopt.Nadam(**kwargs)
    for g in grads[:3]:
        opt.apply(fusedopt.FlatBuffer.from_arrays(g).data, params)
    fusedopt.save(tmp_path / "run.npz", opt, params)
    opt, params = fusedopt.load(tmp_path / "run.npz")
    for g in grads[3:]:
        opt.apply(fusedopt.FlatBuffer.from_arrays(g).data, params)
    assert opt.executor_name == whole.executor_name == "host"
    np.testing.assert_array_equal(params.data, whole_params.data)
    for name in whole.slot_names:
        np.testing.assert_array_equal(opt.slots()[name], whole.slots()[name])
    assert (opt.iterations, opt.skipped_steps) == (whole.iterations, whole.skipped_steps) == (5, 1)


def test_executor_can_change_between_steps(host_ok):
    """State and counters carry over when a built optimizer moves between executors."""
    init = random_params(LAYOUT, np.float64, seed=31)
    a_params, b_params = (fusedopt.FlatBuffer.from_arrays(init) for _ in range(2))
    a = fusedopt.Adam(executor="numpy", skip_nonfinite=True)
    b = fusedopt.Adam(executor="numpy", skip_nonfinite=True)
    grads = random_grads(LAYOUT, np.float64, seed=32, steps=6)
    grads[2][0].flat[0] = np.inf
    for step, g in enumerate(grads):
        if step in (1, 3):
            a.executor = "host" if step == 1 else "numpy"
        g = fusedopt.FlatBuffer.from_arrays(g).data
        a.apply(g, a_params)
        b.apply(g, b_params)
        assert a.executor_name == ("host" if step in (1, 2) else "numpy")
        assert (a.iterations, a.skipped_steps, a.last_step_skipped) == \
            (b.iterations, b.skipped_steps, b.last_step_skipped)
    np.testing.assert_array_equal(a_params.data, b_params.data)


def test_load_state_dict_resets_the_host_counters(host_ok):
    params = fusedopt.FlatBuffer.from_arrays([np.linspace(-1, 1, 50)])
    opt = fusedopt.Adam(skip_nonfinite=True)
    opt.apply(np.full(50, 0.2), params)
    opt.apply(np.full(50, np.nan), params)
    state = opt.state_dict()
    opt.apply(np.full(50, 0.2), params)
    opt.load_state_dict(state)
    assert opt.executor_name == "host"
    assert (opt.iterations, opt.skipped_steps, opt.last_step_skipped) == (1, 1, True)


# ------------------------------------------------------------------ arguments
@pytest.mark.parametrize("value,error", [(0, ValueError), (-2, ValueError), (1.5, TypeError),
                                         (True, TypeError), ("2", TypeError)])
def test_bad_num_threads_is_refused(value, error):
    with pytest.raises(error, match="num_threads"):
        fusedopt.Adam(num_threads=value)
    opt = fusedopt.Adam(num_threads=2)
    with pytest.raises(error, match="num_threads"):
        opt.num_threads = value
    assert opt.num_threads == 2


@pytest.mark.parametrize("value,error", [("gpu", ValueError), ("HOST", ValueError),
                                         (None, TypeError), (1, TypeError)])
def test_bad_executor_is_refused(value, error):
    with pytest.raises(error, match="executor"):
        fusedopt.SGD(executor=value)
    opt = fusedopt.SGD()
    with pytest.raises(error, match="executor"):
        opt.executor = value
    assert opt.executor == "auto"


def test_cuda_executor_on_cpu_buffers_is_refused_before_anything_changes():
    params = fusedopt.FlatBuffer.from_arrays([np.ones(4)])
    opt = fusedopt.Adam(executor="cuda")
    with pytest.raises(ValueError, match="executor='cuda'"):
        opt.apply(np.ones(4), params)
    assert not opt.built and opt.iterations == 0
    np.testing.assert_array_equal(params.data, 1.0)


def test_executor_and_num_threads_are_not_hyperparameters():
    opt = fusedopt.Adam(executor="numpy", num_threads=3)
    config = opt.get_config()
    assert "executor" not in config and "num_threads" not in config
    assert fusedopt.Adam.from_config(config).executor == "auto"


# ------------------------------------------------------------------ no compiler
@pytest.fixture
def no_compiler(monkeypatch, tmp_path):
    """This process as on a machine without a C++ compiler (and an empty cache)."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    monkeypatch.setenv("FUSEDOPT_CACHE_DIR", str(tmp_path / "cache"))
    host._reset_for_tests()
    yield
    monkeypatch.undo()
    host._reset_for_tests()


def test_without_a_compiler_cpu_steps_fall_back_with_one_warning(no_compiler):
    """Every optimizer, option and dtype still steps, on the NumPy path, equal to the
    reference; one HostBuildWarning for the whole process, naming the compiler."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _, cls_name, kwargs in CASES:
            for dtype in (np.float32, np.float64):
                init = random_params(LAYOUT[:3], dtype, seed=41)
                a_params, b_params = (fusedopt.FlatBuffer.from_arrays(init) for _ in range(2))
                a = getattr(fusedopt, cls_name)(**kwargs)
                b = getattr(fusedopt, cls_name)(executor="numpy", **kwargs)
                for g in random_grads(LAYOUT[:3], dtype, seed=42, steps=3):
                    g = fusedopt.FlatBuffer.from_arrays(g).data
                    a.apply(g, a_params)
                    b.apply(g, b_params)
                assert a.executor_name == "numpy"
                np.testing.assert_array_equal(a_params.data, b_params.data)
    ours = [w for w in caught if issubclass(w.category, host.HostBuildWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "no-such-c++" in str(ours[0].message) and "NumPy" in str(ours[0].message)


def test_without_a_compiler_asking_for_host_is_refused_before_anything_changes(no_compiler):
    params = fusedopt.FlatBuffer.from_arrays([np.ones(4)])
    opt = fusedopt.Adam(executor="host")
    with pytest.raises(RuntimeError, match="executor='host'.*no-such-c\\+\\+"):
        opt.apply(np.ones(4), params)
    assert not opt.built
    np.testing.assert_array_equal(params.data, 1.0)


def test_import_and_a_step_work_without_any_compiler(tmp_path):
    """A fresh interpreter whose PATH has no compiler: import, step, one warning."""
    code = ("import warnings, numpy as np, fusedopt\n"
            "warnings.simplefilter('always')\n"
            "p = fusedopt.FlatBuffer.from_arrays([np.ones(3)])\n"
            "o = fusedopt.Adam()\n"
            "for _ in range(3): o.apply(p.full_like(0.5), p)\n"
            "fusedopt.SGD().apply(p.full_like(0.5), p)\n"
            "assert o.executor_name == 'numpy', o.executor_name\n")
    env = {"PATH": str(tmp_path), "FUSEDOPT_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("HostBuildWarning") == 1, result.stderr
    assert "no C++ compiler found" in result.stderr


# ------------------------------------------------------------------ the build
def test_libraries_are_cached_by_source_compiler_and_flags(host_ok, monkeypatch, tmp_path):
    monkeypatch.setenv("FUSEDOPT_CACHE_DIR", str(tmp_path))
    source = 'extern "C" int answer() { return 42; }\n'
    flags = ["-O1", "-shared", "-fPIC"]
    first = host.compile_library(source, "probe", flags=flags)
    assert ctypes.CDLL(str(first)).answer() == 42
    # A cached library is reused without running the compiler.
    monkeypatch.setattr(host.subprocess, "run", lambda *a, **k: pytest.fail("recompiled"))
    assert host.compile_library(source, "probe", flags=flags) == first
    monkeypatch.undo()
    monkeypatch.setenv("FUSEDOPT_CACHE_DIR", str(tmp_path))
    others = {host.compile_library(source.replace("42", "43"), "probe", flags=flags),
              host.compile_library(source, "probe", flags=flags + ["-g"])}
    path, version, family = host.find_compiler()
    monkeypatch.setattr(host, "find_compiler", lambda: (path, version + " (patched)", family))
    others.add(host.compile_library(source, "probe", flags=flags))
    assert first not in others and len(others) == 3
    assert not [p for p in tmp_path.rglob(".*")], "temporary files left behind"


def test_a_failed_build_names_the_error_and_leaves_no_file(host_ok, monkeypatch, tmp_path):
    monkeypatch.setenv("FUSEDOPT_CACHE_DIR", str(tmp_path))
    with pytest.raises(host.HostBuildError, match="no_such_type"):
        host.compile_library("no_such_type x;\n", "broken", flags=["-shared", "-fPIC"])
    assert not list(tmp_path.rglob("*.so"))


STEPS_OF = {"muon": ("moments", "apply")}  # the entries of a rule's own host step


def test_host_source_compiles_without_warnings(host_ok, tmp_path):
    """kernels/host.cpp with every rule, both math types and a bfloat16 combination
    (every storage combination for Adam and for Lamb's step of its own; the other rules
    with a step of their own, Adafactor and Muon, for float and double) under -Wall
    -Wextra -Werror."""
    rules = _kernels.rule_names()
    source = "".join(f'#include "{r}.cuh"\n' for r in rules) + '#include "host.cpp"\n'
    combinations = [("double",) * 4, ("float",) * 4, ("float", "fo_bf16", "fo_bf16", "float")]
    everything = [("float",) + tuple(_kernels.STORAGE_CTYPES[d] for d in key)
                  for key in _kernels.COMBINATIONS if key[0] != "float64"]
    for rule in rules:
        if (_kernels.kernel_dir() / f"{rule}_host.cpp").is_file():
            # A step of its own: for every storage key its kernels take.
            source += f'#include "{rule}_host.cpp"\n'
            if _kernels.own_kernel_keys(rule) is _kernels.COMBINATIONS:
                for k, types in enumerate([("double",) * 4] + everything):
                    source += (f"auto step_{rule}_{k} = &fo_{rule}::step<{', '.join(types)}>;\n")
                continue
            for t in ("float", "double"):
                for entry in STEPS_OF.get(rule, ("step",)):
                    source += f"auto {entry}_{rule}_{t} = &fo_{rule}::{entry}<{t}>;\n"
            continue
        for k, types in enumerate(everything if rule == "adam" else combinations):
            # instantiates host_step<Rule, math, param, grad, state>
            source += f"auto step_{rule}_{k} = &host_step<{rule}, {', '.join(types)}>;\n"
    path, _, _ = host.find_compiler()
    result = subprocess.run(
        [path, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-pthread", "-c", "-x", "c++",
         "-", "-I", str(_kernels.kernel_dir()), "-o", str(tmp_path / "host.o")],
        input=source, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_rule_names_come_from_the_kernel_sources():
    """kernels/ and the optimizer classes name the same rules (principle 5): every
    rule has a kernel source."""
    from fusedopt.optimizer import _REGISTRY

    assert _kernels.rule_names() == sorted({cls.rule for cls in _REGISTRY.values()})
    assert "common" not in _kernels.rule_names()


@pytest.mark.parametrize("n", [0, 3, 1024 * 70 + 7, 1 << 20])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_the_benchmarks_ceilings_touch_every_element(host_ok, n, threads):
    copy, scale = host.ceiling_functions()
    src = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    dst = np.zeros(n + 1, np.float32)
    copy(dst.ctypes.data, src.ctypes.data, n, threads)
    np.testing.assert_array_equal(dst[:n], src)
    assert dst[n] == 0
    scale(dst.ctypes.data, n, 2.0, threads)
    np.testing.assert_array_equal(dst[:n], 2 * src)
    assert dst[n] == 0
