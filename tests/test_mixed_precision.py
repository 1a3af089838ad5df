"""Mixed precision (fusedopt.precision, kernels/storage.cuh): bfloat16 and float16
buffers, grads of another dtype than the params, float32 master weights, bfloat16
state and stochastic rounding, on every executor.

- which combinations are accepted and how the others are refused (before anything
  is built or written), config, state_dict, checkpoints;
- golden values at the rounding points: a tie rounded to even, the master copy
  keeping what the params cannot, a state slot rounded after the rule used its float32
  value;
- the host executor and the emulated GPU path against the NumPy reference, step by
  step, over conftest.PRECISIONS x PRECISION_RULES and every kernel rule for bfloat16;
- stochastic rounding: unbiased over many steps where rounding to nearest stalls, and
  the same bits from the reference, the host build and the emulated kernels;
- skip_nonfinite with a bfloat16 inf, loss_scale_factor with float16 grads.
"""

import ml_dtypes
import numpy as np
import pytest

import fusedopt
from conftest import (KERNEL_RULE_CASES, PRECISION_RULES, PRECISIONS, RULE_CASES, dtype_of,
                      random_grads, random_params)
from emulator import emulate
from fusedopt import _kernels, host, precision

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
# Segments of several host/emulator tiles, odd and tiny ones.
LAYOUT = [(2100,), (3, 7), (), (0,), (1,), (4500,), (33,)]
STEPS = 6
RULES = {case[0]: case for case in RULE_CASES}


@pytest.fixture(scope="module")
def host_ok():
    try:
        host.library("adam", "float32")
    except host.HostBuildError as e:
        from conftest import require_in_ci

        require_in_ci(f"the host executor: {e}")


def bits(a):
    """The raw bytes of an array, for bitwise comparisons of any dtype."""
    return np.ascontiguousarray(a).view(np.uint8)


def math_values(a):
    return a.astype(np.float64)


# ULP-relative tolerance of a storage dtype, for results whose float32 math may differ
# in its last bit (norm sums, pow), which can move a rounding to the neighbour.
STORAGE_RTOL = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, "float32": 2e-6,
                "float64": 1e-12}


def assert_matches(actual, desired, exact, what):
    if exact:
        np.testing.assert_array_equal(bits(actual), bits(desired), err_msg=what)
        return
    rtol = STORAGE_RTOL[np.dtype(desired.dtype).name]
    d = math_values(desired)
    scale = float(np.max(np.abs(d[np.isfinite(d)]), initial=0.0))
    np.testing.assert_allclose(math_values(actual), d, rtol=rtol, atol=rtol * scale,
                               err_msg=what)


def bitwise_expected(kwargs):
    """Same float operations in the same order (no norm sums, no pow): same bits."""
    return not (kwargs.get("clipnorm") or kwargs.get("global_clipnorm"))


# ------------------------------------------------------------ accepted, refused
@pytest.mark.parametrize("key", _kernels.COMBINATIONS, ids=_kernels.key_label)
def test_every_accepted_combination_builds_and_steps(key):
    param, grad, state = key
    params = fusedopt.FlatBuffer.from_arrays([np.linspace(-1, 1, 9, dtype=np.float32)],
                                             dtype=dtype_of(param))
    opt = fusedopt.Adam(executor="numpy", state_dtype=state if state != "float64" else None)
    opt.apply(np.full(9, 0.5, dtype_of(grad)), params)
    assert {s.dtype.name for s in opt.slots().values()} == {state}
    assert opt.iterations == 1 and params.dtype.name == param


@pytest.mark.parametrize("param,grad", [
    ("float64", "float32"), ("float64", "bfloat16"), ("float32", "float64"),
    ("bfloat16", "float16"), ("float16", "bfloat16"), ("bfloat16", "float64"),
])
def test_refused_grad_dtypes_name_grads(param, grad):
    params = fusedopt.FlatBuffer.from_arrays([np.ones(4, np.float32)], dtype=dtype_of(param))
    before = bits(params.data).copy()
    opt = fusedopt.Adam(executor="numpy")
    with pytest.raises(ValueError, match=f"`grads` dtype {grad} is not accepted with "
                                         f"`params` dtype {param}"):
        opt.apply(np.ones(4, dtype_of(grad)), params)
    grads = fusedopt.FlatBuffer.from_arrays([np.ones(4, np.float32)], dtype=dtype_of(grad))
    with pytest.raises(ValueError, match="`grads` dtype"):
        opt.apply(grads, params)
    assert not opt.built and np.array_equal(bits(params.data), before)


@pytest.mark.parametrize("kwargs,param,error,match", [
    ({"state_dtype": "float16"}, None, ValueError, "`state_dtype` float16 .* use bfloat16"),
    ({"state_dtype": "int8"}, None, ValueError, "`state_dtype` must be one of"),
    ({"state_dtype": 3}, None, TypeError, "`state_dtype` must be a dtype"),
    ({"master_weights": 1}, None, TypeError, "`master_weights` must be True or False"),
    ({"stochastic_rounding": "yes"}, None, TypeError, "`stochastic_rounding` must be"),
    ({"seed": -1}, None, ValueError, "`seed` must be in"),
    ({"seed": 1.5}, None, TypeError, "`seed` must be an integer"),
    ({"seed": 2 ** 64}, None, ValueError, "`seed` must be in"),
    ({"master_weights": True, "stochastic_rounding": True}, None, ValueError, "choose one"),
    ({"master_weights": True}, "float32", ValueError, "`master_weights=True` keeps"),
    ({"stochastic_rounding": True}, "float16", ValueError, "bfloat16 params only"),
    ({"stochastic_rounding": True}, "float32", ValueError, "bfloat16 params only"),
    ({"state_dtype": "bfloat16"}, "float64", ValueError, "`state_dtype` bfloat16 is not "
                                                         "accepted with float64"),
    ({"state_dtype": "float64"}, "float32", ValueError, "`state_dtype` float64"),
])
def test_refused_options_name_the_argument(kwargs, param, error, match):
    if param is None:
        with pytest.raises(error, match=match):
            fusedopt.Adam(**kwargs)
        return
    opt = fusedopt.Adam(executor="numpy", **kwargs)  # known only with the params
    params = fusedopt.FlatBuffer.from_arrays([np.ones(4, np.float32)], dtype=dtype_of(param))
    before = bits(params.data).copy()
    with pytest.raises(error, match=match):
        opt.apply(np.ones(4, dtype_of(param)), params)
    assert not opt.built and np.array_equal(bits(params.data), before)


@pytest.mark.parametrize("param,grad,kwargs", [
    ("bfloat16", "bfloat16", {"use_ema": True}),
    ("float16", "float32", {"use_ema": True, "master_weights": True}),
    ("float32", "float32", {"gradient_accumulation_steps": 2, "state_dtype": "bfloat16"}),
    ("float32", "bfloat16", {"gradient_accumulation_steps": 2}),
    ("bfloat16", "bfloat16", {"gradient_accumulation_steps": 2, "use_ema": True,
                              "state_dtype": "bfloat16", "stochastic_rounding": True}),
])
def test_ema_and_accumulation_take_16_bit_buffers(param, grad, kwargs, host_ok):
    """Once refused on 16-bit buffers: now built on the host executor under "auto",
    the options' slots stored in the state dtype, the counters as in Keras."""
    params = fusedopt.FlatBuffer.from_arrays([np.linspace(-1, 1, 9, dtype=np.float32)],
                                             dtype=dtype_of(param))
    opt = fusedopt.Adam(**kwargs)
    for _ in range(4):
        opt.apply(np.full(9, 0.5, dtype_of(grad)), params)
    assert opt.executor_name == "host"
    state = opt._precision_for(param).state
    for name in ("average", "gradient_accumulator"):
        if name in opt.slot_names:
            assert opt.slots()[name].dtype == dtype_of(state), name
    assert opt.iterations == 4 // (kwargs.get("gradient_accumulation_steps") or 1)


@pytest.mark.parametrize("cls_name", ["Muon"])
def test_own_kernel_rules_with_options_on_16_bit_params_run_on_numpy_only(cls_name, host_ok):
    """Muon's own kernels take uniform float32/float64 storage only: with use_ema or
    gradient accumulation on bfloat16 params "auto" picks the NumPy executor, and
    executor="host" is refused with a ValueError, before anything is built. (Lamb's
    take them: test_lamb_keras_options_on_16_bit_buffers.)"""
    init = random_params([(6, 5), (7,)], np.float32, seed=42)
    for kwargs in ({"use_ema": True}, {"gradient_accumulation_steps": 2}):
        auto = getattr(fusedopt, cls_name)(learning_rate=0.01, **kwargs)
        params = fusedopt.FlatBuffer.from_arrays(init, dtype=BF16)
        auto.apply(np.full(params.size, 0.5, BF16), params)
        assert auto.executor_name == "numpy", kwargs
        explicit = getattr(fusedopt, cls_name)(learning_rate=0.01, executor="host", **kwargs)
        with pytest.raises(ValueError, match="use_ema|gradient_accumulation_steps|bfloat16"):
            explicit.build(fusedopt.FlatBuffer.from_arrays(init, dtype=BF16))
        assert not explicit.built


def test_state_dtype_and_master_are_fixed_once_there_is_state():
    params = fusedopt.FlatBuffer.from_arrays([np.ones(4, np.float32)], dtype=BF16)
    opt = fusedopt.Adam(executor="numpy")
    opt.apply(np.ones(4, BF16), params)
    with pytest.raises(ValueError, match="`state_dtype`: this change would store the state "
                                         "as bfloat16"):
        opt.state_dtype = "bfloat16"
    with pytest.raises(ValueError, match="`master_weights`: this change would turn"):
        opt.master_weights = True
    assert opt.state_dtype is None and not opt.master_weights
    opt.stochastic_rounding = True  # a run-time switch: allowed between steps
    opt.seed = 9
    opt.apply(np.ones(4, BF16), params)
    assert opt.iterations == 2
    f32 = fusedopt.Adam(executor="numpy")
    f32.apply(np.ones(4, np.float32), fusedopt.FlatBuffer.from_arrays([np.ones(4, np.float32)]))
    with pytest.raises(ValueError, match="bfloat16 params only"):
        f32.stochastic_rounding = True
    assert not f32.stochastic_rounding


def test_config_round_trip_and_defaults_stay_out():
    assert not {"master_weights", "state_dtype", "stochastic_rounding", "seed"} & set(
        fusedopt.Adam().get_config())
    opt = fusedopt.AdamW(state_dtype=BF16, stochastic_rounding=True, seed=2 ** 63 + 5)
    config = opt.get_config()
    assert (config["state_dtype"], config["stochastic_rounding"], config["seed"]) == (
        "bfloat16", True, 2 ** 63 + 5)
    again = fusedopt.AdamW.from_config(config)
    assert again.get_config() == config
    master = fusedopt.get({"class_name": "Lion", "config": {"master_weights": True}})
    assert master.master_weights and master.slot_names == ("master", "momentum")


def test_state_dict_keeps_slot_dtypes_and_refuses_others():
    params = fusedopt.FlatBuffer.from_arrays([np.linspace(-1, 1, 7, dtype=np.float32)],
                                             dtype=BF16)
    opt = fusedopt.Adam(executor="numpy", master_weights=True, state_dtype="bfloat16")
    opt.apply(np.full(7, 0.25, BF16), params)
    state = opt.state_dict()
    assert state["slots"]["master"].dtype == np.float32
    assert state["slots"]["momentum"].dtype == BF16
    resumed = fusedopt.Adam(executor="numpy", master_weights=True, state_dtype="bfloat16")
    resumed.load_state_dict(state)
    resumed_params = params.copy()
    for o, p in ((opt, params), (resumed, resumed_params)):
        o.apply(np.full(7, -0.5, BF16), p)
    assert np.array_equal(bits(params.data), bits(resumed_params.data))
    other = fusedopt.Adam(executor="numpy", master_weights=True)  # float32 state
    with pytest.raises(ValueError, match="slot 'momentum' has dtype bfloat16, expected "
                                         "float32 .this optimizer's state_dtype"):
        other.load_state_dict(state)
    assert not other.built


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_checkpoints_round_trip_16_bit_buffers_bitwise(tmp_path, suffix):
    rng = np.random.default_rng(0)
    params = fusedopt.FlatBuffer.from_arrays(
        [rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=4).astype(np.float32)],
        dtype=BF16, names=["w", "b"])
    opt = fusedopt.Adam(executor="numpy", master_weights=True, state_dtype="bfloat16",
                        learning_rate=0.1)
    for _ in range(3):
        opt.apply(rng.normal(size=19).astype(BF16), params)
    path = tmp_path / f"run{suffix}"
    if suffix == ".npz":  # np.savez would turn bfloat16 into raw bytes: refused, said so
        with pytest.raises(ValueError, match="safetensors"):
            fusedopt.save(path, opt, params)
        return
    fusedopt.save(path, opt, params)
    loaded, loaded_params = fusedopt.load(path)
    assert loaded_params.dtype == BF16 and np.array_equal(bits(loaded_params.data),
                                                          bits(params.data))
    assert loaded.get_config() == opt.get_config()
    for name, slot in opt.slots().items():
        assert loaded.slots()[name].dtype == slot.dtype
        assert np.array_equal(bits(loaded.slots()[name]), bits(slot)), name
    g = rng.normal(size=19).astype(BF16)
    opt.apply(g, params)
    loaded.apply(g, loaded_params)
    assert np.array_equal(bits(loaded_params.data), bits(params.data))


def test_float16_params_checkpoint_with_stochastic_state(tmp_path):
    params = fusedopt.FlatBuffer.from_arrays([np.linspace(-2, 2, 11)], dtype=F16)
    opt = fusedopt.SGD(momentum=0.9, executor="numpy", state_dtype="bfloat16")
    opt.apply(np.full(11, 0.3, np.float32), params)  # float32 grads for float16 params
    for suffix in (".safetensors", ".npz"):
        try:
            fusedopt.save(tmp_path / f"c{suffix}", opt, params)
        except ValueError as e:  # .npz cannot hold the bfloat16 state
            assert suffix == ".npz" and "safetensors" in str(e)
            continue
        loaded, p = fusedopt.load(tmp_path / f"c{suffix}")
        assert p.dtype == F16 and np.array_equal(bits(p.data), bits(params.data))
        assert np.array_equal(bits(loaded.slots()["momentum"]), bits(opt.slots()["momentum"]))


# ------------------------------------------------------------------ golden values
EXECUTORS = ["numpy", "host", "emulated"]


def make(cls_name, executor, params, libraries, loss_scale=None, **kwargs):
    """`cls_name` on `executor`; with `loss_scale` (LossScaleOptimizer's arguments)
    wrapped in a LossScaleOptimizer (returned; its inner optimizer runs the steps)."""
    opt = getattr(fusedopt, cls_name)(executor="numpy" if executor == "emulated" else executor,
                                      **kwargs)
    outer = opt if loss_scale is None else fusedopt.LossScaleOptimizer(opt, **loss_scale)
    if executor == "emulated":
        emulate(opt, params, libraries)
    return outer


def inner(opt):
    return getattr(opt, "inner_optimizer", opt)


@pytest.fixture
def libraries(request):
    return request.getfixturevalue("emulator_libraries")


@pytest.mark.parametrize("executor", EXECUTORS)
def test_golden_ties_round_to_even_and_the_master_keeps_them(executor, host_ok, libraries):
    """SGD on bfloat16 params near 1 (spacing 2^-7) with steps of 2^-8, half a spacing:
    1 + 2^-8 is a tie and rounds to the even 1; 1 + 2^-7 + 2^-8 to the even 1 + 2^-6.
    Without a master copy the first param stalls at 1 forever; the float32 master
    holds 1 + 2^-8 exactly and the params follow it two steps later."""
    start = np.array([1.0, 1.0 + 2 ** -7, -1.0, 1.0], np.float32)
    grads = np.array([-1.0, -1.0, 1.0, 0.0], np.float32).astype(BF16)  # exact in bf16
    plain = fusedopt.FlatBuffer.from_arrays([start], dtype=BF16)
    opt = make("SGD", executor, plain, libraries, learning_rate=2 ** -8)
    opt.apply(grads, plain)
    np.testing.assert_array_equal(plain.data.astype(np.float32),
                                  [1.0, 1.0 + 2 ** -6, -1.0, 1.0])
    opt.apply(grads, plain)
    assert plain.data[0] == 1.0  # stalled: 1 + 2^-8 rounds back to 1 every step

    kept = fusedopt.FlatBuffer.from_arrays([start], dtype=BF16)
    opt = make("SGD", executor, kept, libraries, learning_rate=2 ** -8, master_weights=True)
    opt.apply(grads, kept)
    master = opt.slots()["master"]
    np.testing.assert_array_equal(master, [1 + 2 ** -8, 1 + 2 ** -7 + 2 ** -8,
                                           -1 - 2 ** -8, 1.0])
    np.testing.assert_array_equal(kept.data.astype(np.float32), [1.0, 1 + 2 ** -6, -1.0, 1.0])
    opt.apply(grads, kept)
    np.testing.assert_array_equal(master[0], 1 + 2 ** -7)
    np.testing.assert_array_equal(kept.data.astype(np.float32)[0], 1 + 2 ** -7)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_golden_float16_ties(executor, host_ok, libraries):
    """float16 near 1 has spacing 2^-10; steps of 2^-11 are ties (float32 grads; the
    bfloat16 state setting only picks a kernel build the other tests share)."""
    params = fusedopt.FlatBuffer.from_arrays([np.array([1.0, 1 + 2 ** -10], np.float32)],
                                             dtype=F16)
    opt = make("SGD", executor, params, libraries, learning_rate=2 ** -11,
               state_dtype="bfloat16")
    opt.apply(np.array([-1.0, -1.0], np.float32), params)
    np.testing.assert_array_equal(params.data.astype(np.float32), [1.0, 1 + 2 ** -9])


@pytest.mark.parametrize("executor", EXECUTORS)
def test_golden_bf16_state_is_rounded_after_the_rule_used_float32(executor, host_ok,
                                                                  libraries):
    """Adam's first step with bfloat16 state: the param update uses m and v in float32
    (as computed in registers) and only the stored slots are rounded, once, to nearest
    (ml_dtypes' cast, an independent implementation). float16 grads, exact here."""
    g = np.array([1.0, -3.0, 0.5, 2.0 ** -20], np.float32)
    params = fusedopt.FlatBuffer.from_arrays([np.zeros(4, np.float32)])
    opt = make("Adam", executor, params, libraries, learning_rate=0.01,
               state_dtype="bfloat16")
    opt.apply(g.astype(F16), params)
    f32 = np.float32
    m = (g - f32(0)) * f32(1 - 0.9)
    v = (g * g - f32(0)) * f32(1 - 0.999)
    alpha = f32(0.01 * np.sqrt(1 - 0.999) / (1 - 0.9))
    expected = f32(0) - (m * alpha) / (np.sqrt(v) + f32(1e-7))
    np.testing.assert_array_equal(params.data, expected)
    np.testing.assert_array_equal(bits(opt.slots()["momentum"]), bits(m.astype(BF16)))
    np.testing.assert_array_equal(bits(opt.slots()["velocity"]), bits(v.astype(BF16)))
    assert opt.slots()["momentum"].astype(np.float32)[0] != m[0]  # 0.1 is not a bfloat16


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("param", ["float32", "bfloat16"])
def test_golden_bf16_accumulator_rounds_once_per_call(param, executor, host_ok, libraries):
    """Gradient accumulation (N = 3) with bfloat16 state: the accumulator is a state
    slot, rounded to nearest once per call. g = 1 + 2^-9 each call: after one call it
    holds bf16(1 + 2^-9) = 1, after two bf16(2 + 2^-9) = 2 (float32 state: 1 + 2^-9,
    2 + 2^-8); the third call's gradient is (g + 2)/3 in float32, not float32 state's
    1 + 2^-9, and the accumulator restarts at 0. SGD with lr 1 from 0 (bfloat16 params
    with a master copy: the master holds -mean, the params its rounding)."""
    f32 = np.float32
    g = np.array([1 + 2 ** -9], f32)
    extra = {"master_weights": True} if param == "bfloat16" else {}
    results = {}
    for state in ("bfloat16", None):
        params = fusedopt.FlatBuffer.from_arrays([np.zeros(1, f32)], dtype=dtype_of(param))
        opt = make("SGD", executor, params, libraries, learning_rate=1.0, state_dtype=state,
                   gradient_accumulation_steps=3, **extra)
        seen = []
        for _ in range(3):
            opt.apply(g, params)
            seen.append(opt.slots()["gradient_accumulator"].astype(np.float64)[0])
        source = opt.slots()["master"] if extra else params.data
        results[state] = (seen, float(np.asarray(source, np.float64)[0]),
                          params.data.astype(np.float64)[0])
    mean = f32(f32(g[0] + f32(2.0)) / f32(3.0))
    assert mean != f32(1 + 2 ** -9)
    assert results["bfloat16"][0] == [1.0, 2.0, 0.0]
    assert results["bfloat16"][1] == -float(mean)
    assert results[None][0] == [1 + 2 ** -9, 2 + 2 ** -8, 0.0]
    assert results[None][1] == -(1 + 2 ** -9)
    if param == "bfloat16":  # the params: the master rounded to nearest
        assert results["bfloat16"][2] == float(np.array([-mean], f32).astype(BF16)[0])


@pytest.mark.parametrize("executor", EXECUTORS)
def test_golden_ema_reads_the_stored_params_and_overwrites_master_and_params(
        executor, host_ok, libraries):
    """SGD on bfloat16 params at 1 with steps of 2^-8 (half of bfloat16's spacing 2^-7
    there), ema_momentum 0.5. Without a master copy the params stay 1 (a tie, to even)
    and the average, of the params as stored, stays 1 (not 1 + 2^-8). With a master the
    average reads it: 1 + 2^-8, then (1 + 2^-8 + 1 + 2^-7)/2 = 1 + 3*2^-9, which the
    overwrite (ema_overwrite_frequency=2) copies into the master exactly and into the
    params rounded to 1 + 2^-7; the third step goes on from it. With bfloat16 state the
    average is stored rounded (1 + 2^-8, a tie, to 1 both times) and the overwrite copies
    that stored 1 into the master."""
    start = [np.ones(1, np.float32)]
    g = np.array([-1.0], BF16)
    common = {"learning_rate": 2.0 ** -8, "use_ema": True, "ema_momentum": 0.5}

    def run(steps, **kwargs):
        params = fusedopt.FlatBuffer.from_arrays(start, dtype=BF16)
        opt = make("SGD", executor, params, libraries, **common, **kwargs)
        out = []
        for _ in range(steps):
            opt.apply(g, params)
            slots = {k: float(v.astype(np.float64)[0]) for k, v in opt.slots().items()}
            out.append((float(params.data.astype(np.float64)[0]), slots))
        return out

    plain = run(2)
    assert [(p, s["average"]) for p, s in plain] == [(1.0, 1.0), (1.0, 1.0)]
    stochastic = run(2, stochastic_rounding=True, seed=3)
    for p, s in stochastic:  # whatever the rounding gave (bfloat16 values), the average is of it
        assert p in (1.0, 1 + 2 ** -7, 1 + 2 ** -6)
    assert stochastic[0][1]["average"] == stochastic[0][0]
    assert stochastic[1][1]["average"] == 0.5 * stochastic[0][0] + 0.5 * stochastic[1][0]
    kept = run(3, master_weights=True, ema_overwrite_frequency=2)
    assert kept[0] == (1.0, {"average": 1 + 2 ** -8, "master": 1 + 2 ** -8})
    assert kept[1] == (1 + 2 ** -7, {"average": 1 + 3 * 2 ** -9, "master": 1 + 3 * 2 ** -9})
    assert kept[2] == (1 + 2 ** -7, {"average": 1 + 2 ** -7, "master": 1 + 5 * 2 ** -9})
    small = run(2, master_weights=True, ema_overwrite_frequency=2, state_dtype="bfloat16")
    assert small[0] == (1.0, {"average": 1.0, "master": 1 + 2 ** -8})
    assert small[1] == (1.0, {"average": 1.0, "master": 1.0})


@pytest.mark.parametrize("executor", ["numpy", "host"])
def test_ema_weights_of_16_bit_params_swap_back_bitwise_and_finalize_into_the_master(
        executor, host_ok):
    """bfloat16 params, a float32 average and master: swapping the average in rounds it
    to nearest into the params and leaves it untouched (an exchange would round it to
    bfloat16); swapping back restores the params bit for bit. finalize_variable_values
    writes the average into the master too, so the next step goes on from it."""
    layout = [(50,), (3, 4)]
    params = fusedopt.FlatBuffer.from_arrays(random_params(layout, np.float32, seed=50),
                                             dtype=BF16)
    opt = fusedopt.Adam(learning_rate=0.05, use_ema=True, ema_momentum=0.5,
                        master_weights=True, executor=executor)
    grads = [fusedopt.FlatBuffer.from_arrays(g, dtype=BF16).data
             for g in random_grads(layout, np.float32, seed=51, steps=4)]
    for g in grads[:3]:
        opt.apply(g, params)
    average, trained = opt.slots()["average"].copy(), params.data.copy()
    assert average.dtype == np.float32
    assert not np.array_equal(bits(average.astype(BF16)), bits(trained))
    with opt.ema_weights(params):
        np.testing.assert_array_equal(bits(params.data), bits(average.astype(BF16)))
        np.testing.assert_array_equal(bits(opt.slots()["average"]), bits(average))
        with pytest.raises(ValueError, match="swap them back"):
            opt.apply(grads[3], params)
    np.testing.assert_array_equal(bits(params.data), bits(trained))
    np.testing.assert_array_equal(bits(opt.slots()["average"]), bits(average))
    opt.finalize_variable_values(params)
    np.testing.assert_array_equal(opt.slots()["master"], average)
    np.testing.assert_array_equal(bits(params.data), bits(average.astype(BF16)))


# ----------------------------------------------------- executors against the oracle
def executors_for(case, precision_case):
    """The emulated GPU path always; the host build for Adam and for the bfloat16
    precision (each host library is one rule for one storage key: those builds cover
    every rule and every key while keeping the test time modest)."""
    _, param, grad, options = precision_case
    bf16_key = (param, grad, options.get("state_dtype")) == ("bfloat16", "bfloat16", None)
    if case[1] in ("Adam", "AdamW") or bf16_key:
        return ("host", "emulated")
    return ("emulated",)


def run_three(case, precision_case, libraries, executors=None, layout=LAYOUT, steps=STEPS,
              amp=None, nonfinite_at=(), exact=None):
    """The same steps on the NumPy reference and `executors`; params and every slot
    compared after every step (bitwise unless a norm sum may move a rounding; `exact`
    False: within STORAGE_RTOL).
    `amp`: per step a GradScaler's (scale, found_inf) for apply(); `nonfinite_at`: steps
    whose gradient gets an inf (skipped with skip_nonfinite, or found_inf)."""
    _, cls_name, kwargs = case
    _, param, grad, options = precision_case
    executors = executors or executors_for(case, precision_case)
    kwargs = {**kwargs, **options}
    init = random_params(layout, np.float32, seed=21)
    grads = random_grads(layout, np.float32, seed=22, steps=steps, scale=0.7)
    runs = {}
    for executor in ("numpy",) + tuple(executors):
        params = fusedopt.FlatBuffer.from_arrays(init, dtype=dtype_of(param))
        opt = make(cls_name, executor, params, libraries, **kwargs)
        runs[executor] = (opt, params)
    exact = bitwise_expected(kwargs) if exact is None else exact
    for step, g in enumerate(grads):
        g = fusedopt.FlatBuffer.from_arrays(g, dtype=dtype_of(grad)).data
        if step in nonfinite_at:
            g[len(g) // 2] = np.inf
        extra = {}
        if amp is not None:
            scale, found = amp[step]
            extra = {"grad_scale": np.array([scale], np.float32),
                     "found_inf": np.array([found], np.float32)}
        for opt, params in runs.values():
            opt.apply(g, params, **extra)
        ref, ref_params = runs["numpy"]
        for executor in executors:
            opt, params = runs[executor]
            what = f"{executor}, step {step}"
            assert_matches(params.data, ref_params.data, exact, f"params, {what}")
            for name in inner(ref).slot_names:
                actual, desired = inner(opt).slots()[name], inner(ref).slots()[name]
                assert actual.dtype == desired.dtype
                assert_matches(actual, desired, exact, f"{name}, {what}")
            assert opt.iterations == ref.iterations, what
            assert inner(opt).skipped_steps == inner(ref).skipped_steps, what
    n = kwargs.get("gradient_accumulation_steps") or 1
    skipped = len(set(nonfinite_at) | {k for k, (_, found) in enumerate(amp or []) if found})
    for executor, (opt, _) in runs.items():
        assert (opt.iterations, inner(opt).skipped_steps) == ((steps - skipped) // n,
                                                              skipped), executor
    return runs


@pytest.mark.parametrize("precision_case", PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("rule", PRECISION_RULES)
def test_every_precision_matches_the_reference(rule, precision_case, host_ok, libraries):
    run_three(RULES[rule], precision_case, libraries)


BF16_CASE = PRECISIONS[0]
# Adafactor and Muon (kernels of their own) run bfloat16 on the NumPy executor only:
# test_own_kernel_rules_run_other_storage_on_numpy_and_refuse_it_on_host; Lamb's
# kernels take every storage: test_lamb_in_every_precision_matches_the_reference.
OTHER_RULES = [c for c in KERNEL_RULE_CASES if c[0] not in PRECISION_RULES
               and not _kernels.own_kernels(getattr(fusedopt, c[1])(**c[2]).rule)]


@pytest.mark.parametrize("case", OTHER_RULES, ids=[c[0] for c in OTHER_RULES])
def test_every_kernel_rule_in_bfloat16_matches_the_reference(case, host_ok, libraries):
    run_three(case, BF16_CASE, libraries)


# Lamb's kernels (kernels/lamb.cu, lamb_host.cpp) on every precision: weight decay,
# clipnorm with a non-finite step skipped, a loss scale. Its trust ratio is a norm sum
# whose order differs between executors (tile sums on the host and GPU, one dot
# product in NumPy): the float32 ratio may differ in its last bit, so params are
# compared within STORAGE_RTOL; with 16-bit state, r is computed from the stored m
# and v on every executor (reference.lamb).
LAMB_CASES = [
    ("lamb+decay", "Lamb", {"learning_rate": 0.05, "weight_decay": 0.1}),
    ("lamb+clipnorm+skip", "Lamb", {"learning_rate": 0.05, "clipnorm": 0.5,
                                    "skip_nonfinite": True, "loss_scale_factor": 4.0}),
]


def assert_lamb_params_mostly_bitwise(runs):
    """The trust ratio may differ in its last bit between executors, which moves a
    variable's params by a spacing here and there, never most of them: a rounding of
    the wrong element or step (stochastic rounding's index or count) would move about
    half, within STORAGE_RTOL still. (On these layouts the runs are in fact bitwise.)"""
    desired = bits(runs["numpy"][1].data).reshape(len(runs["numpy"][1].data), -1)
    for executor in ("host", "emulated"):
        actual = bits(runs[executor][1].data).reshape(desired.shape)
        same = np.all(actual == desired, axis=1).mean()
        assert same >= 0.95, f"{executor}: {same:.0%} of the params bitwise"


@pytest.mark.parametrize("precision_case", PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("case", LAMB_CASES, ids=[c[0] for c in LAMB_CASES])
def test_lamb_in_every_precision_matches_the_reference(case, precision_case, host_ok,
                                                       libraries):
    skip = (2,) if case[2].get("skip_nonfinite") else ()
    runs = run_three(case, precision_case, libraries, executors=("host", "emulated"),
                     steps=4, nonfinite_at=skip, exact=False)
    assert inner(runs["host"][0]).executor_name == "host"
    assert_lamb_params_mostly_bitwise(runs)


OPTION_CASES = [
    ("adam+clipnorm+loss_scale", "Adam", {"clipnorm": 0.5, "loss_scale_factor": 4.0}),
    ("adamw+global_clipnorm", "AdamW", {"global_clipnorm": 1.0}),
    ("sgd+clipvalue+decays", "SGD", {"momentum": 0.9, "clipvalue": 0.3, "weight_decay": 0.1,
                                     "coupled_weight_decay": 0.05}),
]


@pytest.mark.parametrize("precision_case", [PRECISIONS[i] for i in (1, 2, 4, 5)],
                         ids=[PRECISIONS[i][0] for i in (1, 2, 4, 5)])
@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_pipeline_options_in_mixed_precision(case, precision_case, host_ok, libraries):
    run_three(case, precision_case, libraries)


# The unscale (1/loss_scale_factor, a LossScaleOptimizer's 1/scale, GradScaler's
# 1/grad_scale) is a float32 scalar for 16-bit params, as the kernels' (T)unscale:
# rounding it to the params' 16 bits moved about a third of the params of a bfloat16
# SGD step with loss_scale_factor=3 (the NumPy executor did so until it was fixed).
F16_CASE = ("f16", "float16", "float16", {})
UNSCALE_PRECISIONS = [PRECISIONS[0], PRECISIONS[1], PRECISIONS[2], F16_CASE, PRECISIONS[4]]
UNSCALE_CASES = [
    ("sgd+loss_scale_factor", "SGD", {"learning_rate": 1.0, "loss_scale_factor": 3.0}),
    ("adam+loss_scale_optimizer", "Adam",
     {"loss_scale": {"initial_scale": 3.0, "dynamic_growth_steps": 2}}),
]


@pytest.mark.parametrize("precision_case", UNSCALE_PRECISIONS,
                         ids=[p[0] for p in UNSCALE_PRECISIONS])
@pytest.mark.parametrize("case", UNSCALE_CASES, ids=[c[0] for c in UNSCALE_CASES])
def test_16_bit_params_unscale_in_float32_bitwise(case, precision_case, host_ok, libraries):
    run_three(case, precision_case, libraries, executors=("host", "emulated"), steps=4)


@pytest.mark.parametrize("precision_case", [PRECISIONS[0], F16_CASE],
                         ids=["bf16", "f16"])
def test_16_bit_params_with_grad_scaler_inputs_bitwise(precision_case, host_ok, libraries):
    """torch.amp.GradScaler's scale and inf flag (apply's grad_scale, found_inf) with
    16-bit params: a scale of 3 (1/3 is not a bfloat16) and a flagged step."""
    amp = [(3.0, 0.0), (3.0, 1.0), (6.0, 0.0), (6.0, 0.0)]
    run_three(("sgd-momentum", "SGD", {"momentum": 0.9}), precision_case, libraries,
              executors=("host", "emulated"), steps=4, amp=amp)


# Keras' options on 16-bit buffers (kernels/options.cuh): use_ema with overwrites,
# gradient accumulation over several cycles (N = 3, 9 calls), both with a non-finite
# call skipped in the middle; bitwise on the host build and the emulated kernels, with
# every precision (float32 and bfloat16 state, master weights, stochastic rounding,
# float16 params). Adam and SGD take every precision, Lion and Schedule-Free AdamW the
# bfloat16 ones with and without master and float16's.
KERAS_OPTIONS = [
    ("ema-overwrite", {"use_ema": True, "ema_overwrite_frequency": 3, "ema_momentum": 0.9}, ()),
    ("accumulate", {"gradient_accumulation_steps": 3}, ()),
    ("accumulate-ema-skip", {"gradient_accumulation_steps": 3, "use_ema": True,
                             "ema_overwrite_frequency": 2, "ema_momentum": 0.8,
                             "skip_nonfinite": True}, (4,)),
]
OPTION_PRECISIONS = PRECISIONS + [F16_CASE]


def _keras_option_cases():
    for rule in PRECISION_RULES:
        for precision_case in OPTION_PRECISIONS:
            if rule not in ("adam", "sgd-momentum") and precision_case[0] not in (
                    "bf16", "bf16-master", "bf16-stochastic", "f16"):
                continue
            for option in KERAS_OPTIONS:
                yield pytest.param(rule, precision_case, option,
                                   id=f"{rule}-{precision_case[0]}-{option[0]}")


@pytest.mark.parametrize("rule,precision_case,option", list(_keras_option_cases()))
def test_keras_options_on_16_bit_buffers_bitwise(rule, precision_case, option, host_ok,
                                                 libraries):
    name, options, nonfinite_at = option
    _, cls_name, kwargs = RULES[rule]
    case = (rule, cls_name, {**kwargs, **options})
    run_three(case, precision_case, libraries, executors=("host", "emulated"), steps=9,
              nonfinite_at=nonfinite_at)


# Lamb's kernels with Keras' options on every 16-bit precision: accumulation with EMA,
# overwrites and a skipped call (9 calls, N = 3); EMA alone on the precisions whose
# average reads the params as stored (stochastic rounding, float16) or is 16-bit; and
# accumulation with clipnorm. Within STORAGE_RTOL (the trust ratio's sums).
LAMB_OPTION_CASES = (
    [pytest.param(p, KERAS_OPTIONS[2], id=f"{p[0]}-{KERAS_OPTIONS[2][0]}")
     for p in OPTION_PRECISIONS]
    + [pytest.param(p, KERAS_OPTIONS[0], id=f"{p[0]}-{KERAS_OPTIONS[0][0]}")
       for p in (PRECISIONS[2], PRECISIONS[3], F16_CASE)]
    + [pytest.param(PRECISIONS[4], ("accumulate-clipnorm", {"gradient_accumulation_steps": 3,
                                                            "clipnorm": 0.5}, ()),
                    id=f"{PRECISIONS[4][0]}-accumulate-clipnorm")])


@pytest.mark.parametrize("precision_case,option", LAMB_OPTION_CASES)
def test_lamb_keras_options_on_16_bit_buffers(precision_case, option, host_ok, libraries):
    _, options, nonfinite_at = option
    case = ("lamb", "Lamb", {"learning_rate": 0.05, "weight_decay": 0.1, **options})
    runs = run_three(case, precision_case, libraries, executors=("host", "emulated"), steps=9,
                     nonfinite_at=nonfinite_at, exact=False)
    assert_lamb_params_mostly_bitwise(runs)


@pytest.mark.parametrize("precision_case", [PRECISIONS[3], PRECISIONS[5], PRECISIONS[1]],
                         ids=[PRECISIONS[i][0] for i in (3, 5, 1)])
@pytest.mark.parametrize("clip", [{"clipnorm": 0.5}, {"global_clipnorm": 1.0}],
                         ids=["clipnorm", "global_clipnorm"])
def test_accumulation_with_norm_clipping_on_16_bit_state(precision_case, clip, host_ok,
                                                         libraries):
    """The applying call's norm is the accumulated mean's, read from the accumulator in
    the state dtype (reduce.cu's fusedopt_sumsq, host.cpp's NormInput); within the
    storage tolerance (the sums are added in another order)."""
    case = ("adam", "Adam", {"gradient_accumulation_steps": 3, "use_ema": True, **clip})
    run_three(case, precision_case, libraries, executors=("host", "emulated"), steps=9)


# Big enough for the host's thread pool (kernels/host.cpp, FO_MIN_PARALLEL): each thread
# count splits the buffer elsewhere, and segment groups (their own learning rates) start
# runs at odd offsets, so the chunks 16-bit storage converts (host.cpp, "other storage")
# start misaligned (stochastic rounding's groups of four straddle them) and end inside
# segments, with odd lengths.
THREAD_LAYOUT = [(70001,), (3,), (0,), (5003,), (1,), (30000,)]
THREAD_MULTIPLIERS = [1.0, 0.5, 1.0, 2.0, 1.0, 0.25]


@pytest.mark.parametrize("precision_case", PRECISIONS + [F16_CASE],
                         ids=[p[0] for p in PRECISIONS + [F16_CASE]])
def test_16_bit_host_steps_are_the_references_bits_for_every_thread_count(precision_case,
                                                                           host_ok):
    """The host build on 16-bit buffers with 1 to 3 threads, segment groups, use_ema with
    overwrites and gradient accumulation: params and every slot bitwise the NumPy
    reference's after every call."""
    _, param, grad, options = precision_case
    kwargs = {"learning_rate": 0.01, "weight_decay": 0.02, "use_ema": True,
              "ema_overwrite_frequency": 2, "ema_momentum": 0.7,
              "gradient_accumulation_steps": 2, **options}
    init = random_params(THREAD_LAYOUT, np.float32, seed=41)
    grads = random_grads(THREAD_LAYOUT, np.float32, seed=42, steps=6, scale=0.7)
    runs = []
    for executor, threads in (("numpy", None), ("host", 1), ("host", 2), ("host", 3)):
        params = fusedopt.FlatBuffer.from_arrays(init, dtype=dtype_of(param))
        opt = fusedopt.Adam(executor=executor, num_threads=threads, **kwargs)
        opt.set_segment_attributes(lr_multipliers=THREAD_MULTIPLIERS)
        runs.append((opt, params, threads))
    for step, g in enumerate(grads):
        g = fusedopt.FlatBuffer.from_arrays(g, dtype=dtype_of(grad)).data
        for opt, params, _ in runs:
            opt.apply(g, params)
        ref, ref_params, _ = runs[0]
        for opt, params, threads in runs[1:]:
            what = f"{threads} threads, call {step}"
            assert opt.executor_name == "host"
            assert opt._plan.threads_used == threads, what
            np.testing.assert_array_equal(bits(params.data), bits(ref_params.data),
                                          err_msg=f"params, {what}")
            for name in ref.slot_names:
                np.testing.assert_array_equal(bits(opt.slots()[name]), bits(ref.slots()[name]),
                                              err_msg=f"{name}, {what}")
    assert ref.iterations == 3


def test_unaligned_16_bit_buffers_take_the_scalar_path_with_the_same_bits(libraries):
    """One element in, no buffer shares the others' alignment: every element takes the
    scalar path of fused.cu, and gives the vector path's bits."""
    init = random_params(LAYOUT, np.float32, seed=3)
    grads = random_grads(LAYOUT, np.float32, seed=4, steps=3)
    results = []
    for misalign in (False, True):
        params = fusedopt.FlatBuffer.from_arrays(init, dtype=BF16)
        if misalign:
            backing = np.zeros(params.size + 1, BF16)
            backing[1:] = params.data
            params = fusedopt.FlatBuffer(backing[1:], params.shapes)
        opt = make("Adam", "emulated", params, libraries, stochastic_rounding=True, seed=3)
        backend = opt._plan.backend
        for g in grads:
            opt.apply(fusedopt.FlatBuffer.from_arrays(g, dtype=BF16).data, params)
        vector_stores = backend.count("store", 8, kernel="fusedopt_adam")
        assert (vector_stores == 0) == misalign
        results.append(params.data.copy())
    np.testing.assert_array_equal(bits(results[0]), bits(results[1]))


@pytest.mark.parametrize("executor", EXECUTORS)
def test_skip_nonfinite_counts_a_bfloat16_inf(executor, host_ok, libraries):
    params = fusedopt.FlatBuffer.from_arrays([np.linspace(-1, 1, 300)], dtype=BF16)
    opt = make("Adam", executor, params, libraries, skip_nonfinite=True, master_weights=True)
    g = np.full(300, 0.5, BF16)
    opt.apply(g, params)
    before = [bits(params.data).copy()] + [bits(s).copy() for s in opt.slots().values()]
    bad = g.copy()
    bad[171] = np.float32("inf")  # a bfloat16 inf (and below, a NaN)
    opt.apply(bad, params)
    bad[171], bad[3] = 0.5, np.float32("nan")
    opt.apply(bad, params)
    after = [bits(params.data)] + [bits(s) for s in opt.slots().values()]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    assert (opt.iterations, opt.skipped_steps, opt.last_step_skipped) == (1, 2, True)


# ------------------------------------------------------------ stochastic rounding
def test_stochastic_rounding_is_unbiased_where_nearest_stalls(host_ok):
    """Steps of 2^-10, a quarter of bfloat16's spacing at 1: rounding to nearest never
    moves the params; stochastic rounding moves them by 2^-10 per step in expectation
    (E[round(x)] = x), here 256 steps from 1 to 1.25, as the float32 master does."""
    n, steps, lr = 4096, 256, 2.0 ** -10
    g = np.full(n, -1.0, BF16)
    results = {}
    for name, kwargs in (("nearest", {}), ("stochastic", {"stochastic_rounding": True,
                                                           "seed": 1234}),
                         ("master", {"master_weights": True})):
        params = fusedopt.FlatBuffer.from_arrays([np.ones(n, np.float32)], dtype=BF16)
        opt = fusedopt.SGD(learning_rate=lr, executor="host", **kwargs)
        for _ in range(steps):
            opt.apply(g, params)
        results[name] = params.data.astype(np.float64)
    assert np.all(results["nearest"] == 1.0)
    assert np.all(results["master"] == 1.25)
    mean = results["stochastic"].mean()
    # Each element is a martingale with increments of at most one spacing (2^-7 up to
    # 2, 2^-6 beyond): its final std is below sqrt(256)*2^-7 = 0.125, the mean's of 4096
    # below 0.002. The band is 5 of those.
    assert abs(mean - 1.25) < 0.01, mean
    assert results["stochastic"].std() > 0.01  # the elements did not move in lockstep


def test_stochastic_rounding_of_one_value_over_many_steps_averages_to_it():
    """A fixed float32 value written by one element at 4096 steps: it goes up with
    probability 3/8 (to the statistics of 4096 Bernoulli draws), so the mean of the
    stored bfloat16 values is the value."""
    x = np.array([1.0 + 3 * 2 ** -10], np.float32)  # 3/8 of the way to 1 + 2^-7
    stored = np.array([precision.bf16_bits_to_float32(
        precision.stochastic_round_to_bf16(x, 77, step, 5))[0] for step in range(4096)])
    assert set(np.unique(stored)) <= {1.0, 1.0 + 2 ** -7}
    p_up = np.mean(stored == 1.0 + 2 ** -7)
    assert abs(p_up - 3 / 8) < 5 * np.sqrt(3 / 8 * 5 / 8 / 4096)


@pytest.mark.parametrize("rule", ["adam", "lion"])
def test_stochastic_rounding_bits_are_the_same_on_every_executor(rule, host_ok, libraries):
    """Given the seed, the reference, the host build and the emulated kernels store the
    same bits; another seed stores others."""
    case = RULES[rule]
    runs = run_three(case, PRECISIONS[2], libraries, steps=4)  # bitwise, step by step
    other = fusedopt.FlatBuffer.from_arrays(random_params(LAYOUT, np.float32, seed=21),
                                            dtype=BF16)
    opt = getattr(fusedopt, case[1])(executor="numpy", stochastic_rounding=True, seed=6,
                                     **case[2])
    for g in random_grads(LAYOUT, np.float32, seed=22, steps=4, scale=0.7):
        opt.apply(fusedopt.FlatBuffer.from_arrays(g, dtype=BF16).data, other)
    differ = np.mean(bits(other.data).view(np.uint16) != bits(runs["numpy"][1].data).view(
        np.uint16))
    assert differ > 0.05, differ


def test_master_trajectory_is_the_float32_runs_bitwise(host_ok, libraries):
    """With float32 grads, bfloat16 params and a master copy follow exactly the float32
    run: the master is its params, bit for bit, every step; the params are its rounding."""
    layout = [(300,), (7, 5)]
    init = random_params(layout, np.float32, seed=8)
    for executor in EXECUTORS:
        f32 = fusedopt.FlatBuffer.from_arrays(init)
        half = fusedopt.FlatBuffer.from_arrays(init, dtype=BF16)
        ref = make("Adam", executor, f32, libraries, learning_rate=0.01, clipnorm=1.0)
        opt = make("Adam", executor, half, libraries, learning_rate=0.01, clipnorm=1.0,
                   master_weights=True)
        f32.data[...] = half.data.astype(np.float32)  # the master starts as the params
        for g in random_grads(layout, np.float32, seed=9, steps=5):
            g = fusedopt.FlatBuffer.from_arrays(g).data
            ref.apply(g, f32)
            opt.apply(g, half)
            np.testing.assert_array_equal(opt.slots()["master"], f32.data, err_msg=executor)
            np.testing.assert_array_equal(bits(half.data), bits(f32.data.astype(BF16)))


@pytest.mark.parametrize("cls_name", ["Lamb", "Adafactor", "Muon"])
def test_own_kernel_rules_keep_the_float32_trajectory_in_the_master(cls_name):
    """The rules with kernels of their own take the new dtypes on the NumPy executor:
    with a master copy and float32 grads they follow the float32 run bit for bit, and
    bfloat16 state is stored in bfloat16. (Lamb's kernels: test_lamb_in_every_precision_
    matches_the_reference.)"""
    layout = [(6, 5), (7,), (3, 4)]
    init = random_params(layout, np.float32, seed=30)
    half = fusedopt.FlatBuffer.from_arrays(init, dtype=BF16)
    f32 = fusedopt.FlatBuffer.from_arrays(init)
    f32.data[...] = half.data.astype(np.float32)
    opt = getattr(fusedopt, cls_name)(learning_rate=0.01, master_weights=True,
                                      executor="numpy")
    # float32 storage would take the host executor, whose per-segment sums are added in
    # another order: the same (NumPy) executor gives the bits to compare.
    ref = getattr(fusedopt, cls_name)(learning_rate=0.01, executor="numpy")
    for g in random_grads(layout, np.float32, seed=31, steps=4):
        g = fusedopt.FlatBuffer.from_arrays(g).data
        opt.apply(g, half)
        ref.apply(g, f32)
        np.testing.assert_array_equal(opt.slots()["master"], f32.data)
        np.testing.assert_array_equal(bits(half.data), bits(f32.data.astype(BF16)))
    small = getattr(fusedopt, cls_name)(learning_rate=0.01, state_dtype="bfloat16",
                                        executor="numpy")
    small.apply(np.ones(half.size, BF16), half.copy())
    assert {s.dtype for s in small.slots().values()} == {BF16}
    assert opt.executor_name == "numpy"


def test_lamb_runs_16_bit_storage_and_keras_options_on_the_host(host_ok):
    """Lamb's kernels take every accepted storage, Keras' options included: "auto"
    picks the host executor for bfloat16 params, bfloat16 state, master weights,
    stochastic rounding and bfloat16 grads of float32 params, with and without
    use_ema and gradient accumulation, and a later step's grads of another accepted
    dtype run there too."""
    layout = [(6, 5), (7,)]
    init = random_params(layout, np.float32, seed=40)
    grads = random_grads(layout, np.float32, 41, 2)
    for dtype, kwargs, grad in [(BF16, {}, BF16), (np.float32, {"state_dtype": "bfloat16"},
                                                   np.float32),
                                (BF16, {"master_weights": True}, np.float32),
                                (BF16, {"stochastic_rounding": True}, BF16),
                                (np.float32, {}, BF16)]:
        for option in ({}, {"use_ema": True}, {"gradient_accumulation_steps": 2}):
            opt = fusedopt.Lamb(learning_rate=0.01, **kwargs, **option)
            params = fusedopt.FlatBuffer.from_arrays(init, dtype=dtype)
            opt.apply(fusedopt.FlatBuffer.from_arrays(grads[0]).data.astype(grad), params)
            assert opt.executor_name == "host", (kwargs, option)
            assert opt._reference_only(params.dtype) == ""
    opt = fusedopt.Lamb(learning_rate=0.01, use_ema=True)
    params = fusedopt.FlatBuffer.from_arrays(init)
    g = fusedopt.FlatBuffer.from_arrays(grads[0]).data
    opt.apply(g, params)
    opt.apply(g.astype(BF16), params)
    assert opt.executor_name == "host" and opt.iterations == 2


@pytest.mark.parametrize("cls_name", ["Muon", "Adafactor"])
def test_own_kernel_rules_run_other_storage_on_numpy_and_refuse_it_on_host(cls_name, host_ok):
    """Muon's and Adafactor's kernels take uniform float32/float64 storage only:
    any other storage takes the NumPy executor under "auto" and is refused by
    executor="host" with a ValueError naming the option, before anything is built; a
    host plan refuses grads of another dtype, naming `grads`, with nothing changed."""
    layout = [(6, 5), (7,)]
    init = random_params(layout, np.float32, seed=40)
    cls = getattr(fusedopt, cls_name)
    for dtype in (np.float32, np.float64):
        opt = cls(learning_rate=0.01)
        opt.build(fusedopt.FlatBuffer.from_arrays(init, dtype=dtype))
        assert opt.executor_name == "host", dtype
    cases = [(BF16, {}, "bfloat16 params"), (np.float32, {"state_dtype": "bfloat16"},
                                              "`state_dtype='bfloat16'`"),
             (BF16, {"master_weights": True}, "`master_weights=True`"),
             (BF16, {"stochastic_rounding": True}, "`stochastic_rounding=True`")]
    for dtype, kwargs, named in cases:
        auto = cls(learning_rate=0.01, **kwargs)
        auto.build(fusedopt.FlatBuffer.from_arrays(init, dtype=dtype))
        assert auto.executor_name == "numpy", kwargs
        explicit = cls(learning_rate=0.01, executor="host", **kwargs)
        with pytest.raises(ValueError, match=named.replace("(", r"\(")):
            explicit.build(fusedopt.FlatBuffer.from_arrays(init, dtype=dtype))
        assert not explicit.built
    # bfloat16 grads for float32 params: the first step's grads choose the executor.
    params = fusedopt.FlatBuffer.from_arrays(init)
    g16 = fusedopt.FlatBuffer.from_arrays(random_grads(layout, np.float32, 41, 1)[0]).data
    g16 = g16.astype(BF16)
    auto = cls(learning_rate=0.01)
    auto.apply(g16, params)
    assert auto.executor_name == "numpy"
    explicit = cls(learning_rate=0.01, executor="host")
    with pytest.raises(ValueError, match="bfloat16 grads"):
        explicit.apply(g16, params.copy())
    # A host plan (built on float32 grads) refuses a later step's bfloat16 grads.
    opt = cls(learning_rate=0.01)
    params = fusedopt.FlatBuffer.from_arrays(init)
    opt.apply(g16.astype(np.float32), params)
    assert opt.executor_name == "host"
    before = params.data.copy(), {k: v.copy() for k, v in opt.slots().items()}
    with pytest.raises(ValueError, match="`grads` dtype bfloat16"):
        opt.apply(g16, params)
    np.testing.assert_array_equal(params.data, before[0])
    for name, value in opt.slots().items():
        np.testing.assert_array_equal(value, before[1][name])
    assert opt.iterations == 1
