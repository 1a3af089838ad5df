"""Keras' options around the rule on the GPU path, run on the CPU by the kernel
emulator (tests/host/emulator.py): the moving average (use_ema), gradient
accumulation and a LossScaleOptimizer's dynamic scale, all decided on the device
from the step state (kernels/step.cuh: fo_phase, fo_advance; kernels/options.cuh).

What CASES does not cover: the bytes each kind of call moves (an accumulating call
reads g and the accumulator only), the options combined with clipping, skips and a
changed hyperparameter, captured steps of a LossScaleOptimizer, its state on the
device through state_dict, and the scale's underflow on every executor; and the same
for the rules with kernels of their own (Lamb, Adafactor, Muon: kernels/whole.cuh),
with the host executor beside the emulated GPU path.
"""

import numpy as np
import pytest

import fusedopt
from conftest import OWN_KERNEL_OPTIONS, random_grads, random_params
from emulator import emulate

LAYOUT = [(5000,), (3,), (0,), (9001,), (1,)]
RTOL = {np.float64: 1e-12, np.float32: 2e-6}


@pytest.fixture
def libraries(emulator_libraries):
    return emulator_libraries


def state_of(opt, params):
    return [params.data.copy()] + [np.array(s) for s in opt.slots().values()]


def assert_close(actual, desired, dtype, what):
    rtol = RTOL[dtype]
    for k, (x, y) in enumerate(zip(actual, desired)):
        scale = float(np.max(np.abs(y[np.isfinite(y)]), initial=0.0))
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale, err_msg=f"{what} {k}")


def bytes_moved(backend, kernel):
    """(bytes loaded, bytes stored) by `kernel` since the last reset."""
    return tuple(sum(n * width for (name, kind, width), n in backend.accesses.items()
                     if name == kernel and kind == k) for k in ("load", "store"))


# --------------------------------------------------------------- bytes per element
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kwargs, accumulating, applying", [
    # (loads, stores) per element, in buffers: Adam's update reads p, g, m, v and
    # writes p, m, v; the accumulator adds a read and a write on every call.
    ({"gradient_accumulation_steps": 3}, (2, 1), (5, 4)),
    # The moving average: a read and a write of its slot, and a read of p on calls
    # that only accumulate (p is written there only when the average overwrites it).
    ({"gradient_accumulation_steps": 3, "use_ema": True}, (4, 2), (6, 5)),
    ({"gradient_accumulation_steps": 3, "use_ema": True, "ema_overwrite_frequency": 1},
     (4, 3), (6, 5)),
    ({"use_ema": True}, None, (5, 4)),
], ids=["accumulate", "accumulate-ema", "accumulate-ema-overwrite", "ema"])
def test_each_call_moves_the_modelled_bytes(libraries, dtype, kwargs, accumulating, applying):
    """The bytes-per-element model of fusedopt/bench.py, counted access by access."""
    opt = fusedopt.Adam(**kwargs)
    params = fusedopt.FlatBuffer.from_arrays(random_params(LAYOUT, dtype, seed=1))
    backend = emulate(opt, params, libraries)
    size, item = params.size, np.dtype(dtype).itemsize
    n = kwargs.get("gradient_accumulation_steps") or 1
    for call, g in enumerate(random_grads(LAYOUT, dtype, seed=2, steps=2 * n)):
        backend.reset_accesses()
        opt.apply(fusedopt.FlatBuffer.from_arrays(g), params)
        expected = applying if (call + 1) % n == 0 else accumulating
        assert bytes_moved(backend, "fusedopt_adam") == (expected[0] * size * item,
                                                         expected[1] * size * item), call


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_loss_scale_step_moves_the_modelled_bytes(libraries, dtype):
    """A LossScaleOptimizer's step: the inf/NaN check reads g once (fusedopt_sumsq; its
    stores are one partial per tile), then Adam's pass as without the wrapper; the scale
    is read and updated in the step state, nothing per element (bench.option_bytes)."""
    opt = fusedopt.LossScaleOptimizer(fusedopt.Adam(), initial_scale=8.0)
    params = fusedopt.FlatBuffer.from_arrays(random_params(LAYOUT, dtype, seed=1))
    backend = emulate(opt.inner_optimizer, params, libraries)
    size, item = params.size, np.dtype(dtype).itemsize
    for g in random_grads(LAYOUT, dtype, seed=2, steps=2):
        backend.reset_accesses()
        opt.apply(fusedopt.FlatBuffer.from_arrays(g), params)
        assert bytes_moved(backend, "fusedopt_adam") == (4 * size * item, 3 * size * item)
        assert bytes_moved(backend, "fusedopt_sumsq")[0] == size * item
    assert opt.iterations == 2


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_accumulating_calls_launch_what_applying_calls_launch(libraries, dtype):
    """One launch sequence for every call (a captured step replays all N phases);
    the kernels decide on the device what each call does."""
    opt = fusedopt.Adam(gradient_accumulation_steps=2, clipnorm=1.0, skip_nonfinite=True)
    params = fusedopt.FlatBuffer.from_arrays(random_params(LAYOUT, dtype, seed=1))
    backend = emulate(opt, params, libraries)
    sequences = []
    for g in random_grads(LAYOUT, dtype, seed=2, steps=2):
        backend.launches.clear()
        opt.apply(fusedopt.FlatBuffer.from_arrays(g), params)
        sequences.append(list(backend.launches))
    assert sequences[0] == sequences[1] == [
        "fusedopt_sumsq", "fusedopt_clip_factors", "fusedopt_skip_check", "fusedopt_adam"]


# ------------------------------------------------------ combined, skipped, changed
COMBINED = [
    ("Adam", {"gradient_accumulation_steps": 3, "use_ema": True, "ema_overwrite_frequency": 2,
              "clipnorm": 0.5, "skip_nonfinite": True}),
    ("Nadam", {"gradient_accumulation_steps": 2, "global_clipnorm": 1.0, "weight_decay": 0.1,
               "loss_scale_factor": 4.0, "skip_nonfinite": True,
               "learning_rate": fusedopt.schedules.ExponentialDecay(0.01, 3, 0.5)}),
    ("SGD", {"momentum": 0.9, "use_ema": True, "ema_momentum": 0.7, "clipvalue": 0.3,
             "skip_nonfinite": True}),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cls_name,kwargs", COMBINED, ids=[c for c, _ in COMBINED])
def test_options_with_clipping_skips_and_replays_match_numpy(libraries, cls_name, kwargs, dtype):
    """Eager emulated steps, replays of one captured step and the NumPy executor, with
    non-finite calls (skipped: nothing accumulates) and ema_momentum changed at call
    9: replays equal eager steps to the bit, both match NumPy every call."""
    rng = np.random.default_rng(3)
    init = random_params(LAYOUT, dtype, seed=4)
    size = sum(int(np.prod(s)) for s in LAYOUT)
    grads = [(rng.normal(size=size) * rng.uniform(0.1, 2.0)).astype(dtype) for _ in range(14)]
    grads[4][7], grads[5][0], grads[11][size - 1] = np.nan, np.inf, -np.inf
    runs = {}
    for mode in ("numpy", "eager", "graph"):
        opt = getattr(fusedopt, cls_name)(**kwargs)
        params = fusedopt.FlatBuffer.from_arrays(init)
        if mode != "numpy":
            emulate(opt, params, libraries)
        buffer = np.zeros(size, dtype)
        step = opt.cuda_graph(buffer, params) if mode == "graph" else None
        states = []
        for k, g in enumerate(grads):
            if k == 9 and opt.use_ema:
                opt.ema_momentum = 0.5
            buffer[...] = g
            step() if step else opt.apply(buffer.copy(), params)
            states.append(state_of(opt, params))
        runs[mode] = (opt, states)
    for k in range(len(grads)):
        for a, b in zip(runs["graph"][1][k], runs["eager"][1][k]):
            np.testing.assert_array_equal(a, b, err_msg=f"replay {k}")
        assert_close(runs["eager"][1][k], runs["numpy"][1][k], dtype, f"call {k}")
    counts = {(o.iterations, o.skipped_steps) for o, _ in runs.values()}
    n = kwargs.get("gradient_accumulation_steps") or 1
    assert counts == {(11 // n, 3)}


# ------------------------------------------------------------ LossScaleOptimizer
POISONED = {2, 7, 8, 13}


def scaled_grads(dtype, steps, seed=5):
    out = random_grads(LAYOUT, dtype, seed, steps, scale=32.0)
    for k in POISONED:
        out[k][0] = out[k][0].copy()
        out[k][0].flat[k] = np.nan if k % 2 else np.inf
    return [fusedopt.FlatBuffer.from_arrays(g).data for g in out]


def make_lso(executor="auto"):
    """executor: "numpy" for the oracle; the others are emulated (or the host's)."""
    return fusedopt.LossScaleOptimizer(
        fusedopt.Adam(clipnorm=1.0, use_ema=True, gradient_accumulation_steps=2,
                      executor=executor), initial_scale=32.0, dynamic_growth_steps=2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_loss_scale_on_the_device_matches_numpy(libraries, dtype):
    """The scale, its counter, params and every slot after every call; the emulated
    plan is never asked for the scale by a step (only by the asserts here)."""
    init = random_params(LAYOUT, dtype, seed=6)
    cpu, gpu = make_lso("numpy"), make_lso()
    cpu_params = fusedopt.FlatBuffer.from_arrays(init)
    gpu_params = fusedopt.FlatBuffer.from_arrays(init)
    emulate(gpu.inner_optimizer, gpu_params, libraries)
    scales = []
    for k, g in enumerate(scaled_grads(dtype, 18)):
        cpu.apply(g, cpu_params)
        gpu.apply(g.copy(), gpu_params)
        assert gpu.inner_optimizer.executor_name == "cuda"
        assert (gpu.dynamic_scale, gpu.step_counter) == (cpu.dynamic_scale, cpu.step_counter)
        assert_close(state_of(gpu, gpu_params), state_of(cpu, cpu_params), dtype, f"call {k}")
        scales.append(gpu.dynamic_scale)
    assert max(scales) > 32.0 and any(b < a for a, b in zip(scales, scales[1:]))  # grew, backed off
    assert (gpu.iterations, gpu.skipped_steps) == (cpu.iterations, cpu.skipped_steps)
    assert gpu.skipped_steps == len(POISONED)


# The rules with kernels of their own (lamb.cu, adafactor.cu, muon.cu): matrices (Muon's
# Newton-Schulz, Adafactor's factored moments), a 3-D variable, a vector and a scalar.
OWN_LAYOUT = [(30, 20), (7,), (3, 4, 5), (), (12, 9)]
OWN_RULES = [("Lamb", {"clipnorm": 0.5, "weight_decay": 0.1}),
             ("Adafactor", {"clipnorm": 1.0}),
             ("Muon", {"global_clipnorm": 1.0, "weight_decay": 0.1})]


def own_scaled_grads(steps, seed=11):
    out = random_grads(OWN_LAYOUT, np.float64, seed, steps, scale=32.0)
    for k in POISONED:
        out[k][0] = out[k][0].copy()
        out[k][0].flat[k] = np.nan if k % 2 else np.inf
    return [fusedopt.FlatBuffer.from_arrays(g).data for g in out]


def own_lso_run(cls_name, kwargs, executor, libraries=None):
    """(optimizer, params, per-call records) of a LossScaleOptimizer around a rule with
    kernels of its own, on `executor` ("numpy", "host" or "emulated")."""
    opt = fusedopt.LossScaleOptimizer(
        getattr(fusedopt, cls_name)(executor="host" if executor == "host" else "numpy",
                                    **kwargs),
        initial_scale=32.0, dynamic_growth_steps=2)
    params = fusedopt.FlatBuffer.from_arrays(random_params(OWN_LAYOUT, np.float64, seed=12))
    if executor == "emulated":
        emulate(opt.inner_optimizer, params, libraries, sm_count=1, blocks_per_sm=2)
    records = []
    for g in own_scaled_grads(18):
        opt.apply(g.copy(), params)
        records.append((state_of(opt, params), opt.dynamic_scale, opt.step_counter,
                        opt.iterations, opt.skipped_steps))
    return opt, params, records


def assert_own_lso_runs_agree(runs, reference):
    for k, (got, want) in enumerate(zip(runs, reference)):
        assert got[1:] == want[1:], f"call {k}: (scale, counter, iterations, skipped)"
        for j, (x, y) in enumerate(zip(got[0], want[0])):
            scale = float(np.max(np.abs(y), initial=0.0))
            np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-10 * scale,
                                       err_msg=f"call {k}, buffer {j}")
    scales = [r[1] for r in reference]
    assert max(scales) > 32.0 and any(b < a for a, b in zip(scales, scales[1:]))
    assert reference[-1][4] == len(POISONED)


# ...and with Keras' options inside the wrapped rule: each call's gradient unscaled by
# the dynamic scale before it is accumulated, the average after every finite call.
OWN_LSO_RULES = OWN_RULES + [
    ("Adafactor", {"gradient_accumulation_steps": 2, "use_ema": True,
                   "ema_overwrite_frequency": 2, "clipnorm": 1.0}),
    ("Muon", {"gradient_accumulation_steps": 3, "use_ema": True, "global_clipnorm": 1.0}),
]
OWN_LSO_IDS = [c for c, _ in OWN_RULES] + ["Adafactor-accumulate-ema", "Muon-accumulate-ema"]


@pytest.mark.parametrize("cls_name, kwargs", OWN_LSO_RULES, ids=OWN_LSO_IDS)
def test_loss_scale_around_own_kernel_rules_matches_numpy(libraries, cls_name, kwargs):
    """Lamb, Adafactor and Muon's own kernels unscale by the device's dynamic scale and
    grow or halve it (take_ticket with the Hyper block), every call as NumPy does."""
    gpu, _, runs = own_lso_run(cls_name, kwargs, "emulated", libraries)
    assert gpu.inner_optimizer.executor_name == "cuda"
    _, _, reference = own_lso_run(cls_name, kwargs, "numpy")
    assert_own_lso_runs_agree(runs, reference)


@pytest.mark.parametrize("cls_name", [c for c, _ in OWN_RULES])
def test_an_underflowed_scale_skips_own_kernel_rules(libraries, cls_name):
    """A scale of 0 skips the step in every one of the rule's launches (whole.cuh,
    adafactor_common, muon_group_values), counted by the last."""
    opt = fusedopt.LossScaleOptimizer(getattr(fusedopt, cls_name)(executor="numpy"),
                                      initial_scale=float(np.float32(1e-45)),
                                      dynamic_growth_steps=5)
    params = fusedopt.FlatBuffer.from_arrays(random_params(OWN_LAYOUT, np.float64, seed=3))
    emulate(opt.inner_optimizer, params, libraries, sm_count=1, blocks_per_sm=2)
    size = params.size
    opt.apply(np.full(size, np.nan), params)
    assert opt.dynamic_scale == 0.0 and opt.skipped_steps == 1
    before = state_of(opt, params)
    opt.apply(np.full(size, 1e-3), params)
    for a, b in zip(state_of(opt, params), before):
        np.testing.assert_array_equal(a, b)
    assert (opt.iterations, opt.skipped_steps, opt.dynamic_scale) == (0, 2, 0.0)


def test_captured_loss_scale_steps_replay_like_eager_ones(libraries):
    eager, graphed = make_lso(), make_lso()
    eager_params = fusedopt.FlatBuffer.from_arrays(random_params(LAYOUT, np.float64, seed=6))
    graph_params = eager_params.copy()
    emulate(eager.inner_optimizer, eager_params, libraries)
    emulate(graphed.inner_optimizer, graph_params, libraries)
    buffer = np.zeros(eager_params.size)
    step = graphed.cuda_graph(buffer, graph_params)
    for g in scaled_grads(np.float64, 16):
        buffer[...] = g
        eager.apply(buffer.copy(), eager_params)
        step()
        assert (graphed.dynamic_scale, graphed.step_counter) == \
            (eager.dynamic_scale, eager.step_counter)
    for a, b in zip(state_of(graphed, graph_params), state_of(eager, eager_params)):
        np.testing.assert_array_equal(a, b)


def test_loss_scale_state_moves_between_the_device_and_numpy(libraries):
    """state_dict reads the device's scale; load_state_dict writes it there; the run
    goes on like one that never stopped."""
    grads = scaled_grads(np.float64, 16)
    init = random_params(LAYOUT, np.float64, seed=7)
    straight, straight_params = make_lso("numpy"), fusedopt.FlatBuffer.from_arrays(init)
    for g in grads:
        straight.apply(g, straight_params)
    first, params = make_lso(), fusedopt.FlatBuffer.from_arrays(init)
    emulate(first.inner_optimizer, params, libraries)
    for g in grads[:9]:
        first.apply(g, params)
    state = first.state_dict()
    assert state["slots"]["dynamic_scale"][0] == first.dynamic_scale
    second = make_lso()
    emulate(second.inner_optimizer, params, libraries)
    second.load_state_dict(state)
    assert (second.dynamic_scale, second.step_counter) == (first.dynamic_scale,
                                                           first.step_counter)
    for g in grads[9:]:
        second.apply(g, params)
    assert_close(state_of(second, params), state_of(straight, straight_params), np.float64,
                 "resumed")
    assert (second.dynamic_scale, second.iterations) == (straight.dynamic_scale,
                                                          straight.iterations)


@pytest.mark.parametrize("where", ["numpy", "host", "emulated"])
def test_a_scale_that_underflowed_to_zero_skips_the_step(libraries, where):
    """Halving the smallest float32 subnormal gives 0; 1/0 would make every gradient
    inf or NaN, so such a step is skipped (and counted) like a non-finite one."""
    if where == "host":
        from fusedopt import host

        try:
            host.library("adam", np.float64)
        except host.HostBuildError as e:
            pytest.skip(f"no host build here: {e}")
    opt = fusedopt.LossScaleOptimizer(
        fusedopt.Adam(executor="host" if where == "host" else "numpy"),
        initial_scale=float(np.float32(1e-45)), dynamic_growth_steps=5)
    params = fusedopt.FlatBuffer.from_arrays([np.linspace(-1, 1, 9)])
    if where == "emulated":
        emulate(opt.inner_optimizer, params, libraries)
    opt.apply(np.full(9, np.nan), params)
    assert opt.dynamic_scale == 0.0 and opt.skipped_steps == 1
    before = params.data.copy()
    opt.apply(np.full(9, 1e-3), params)
    np.testing.assert_array_equal(params.data, before)
    assert (opt.iterations, opt.skipped_steps, opt.dynamic_scale) == (0, 2, 0.0)


@pytest.mark.parametrize("where", ["host", "emulated"])
def test_changing_the_accumulation_steps_mid_run_agrees_with_numpy(libraries, where):
    """gradient_accumulation_steps assigned between calls (the slots stay the same):
    the executors recompute Nadam's running product of the updates done, as the NumPy
    executor derives it from calls // N."""
    if where == "host":
        from fusedopt import host

        try:
            host.library("nadam", np.float64)
        except host.HostBuildError as e:
            pytest.skip(f"no host build here: {e}")
    grads = [fusedopt.FlatBuffer.from_arrays(g).data
             for g in random_grads(LAYOUT, np.float64, seed=9, steps=13)]
    runs = []
    for executor in ("numpy", where):
        opt = fusedopt.Nadam(gradient_accumulation_steps=2, use_ema=True,
                             executor="numpy" if executor == "numpy" else "auto")
        params = fusedopt.FlatBuffer.from_arrays(random_params(LAYOUT, np.float64, seed=8))
        if executor == "emulated":
            emulate(opt, params, libraries)
        states = []
        for k, g in enumerate(grads):
            if k == 5:
                opt.gradient_accumulation_steps = 3
            opt.apply(g, params)
            states.append(state_of(opt, params))
        assert opt.executor_name == {"numpy": "numpy", "host": "host",
                                     "emulated": "cuda"}[executor]
        runs.append((opt.iterations, states))
    assert runs[0][0] == runs[1][0] == 13 // 3
    for k, (a, b) in enumerate(zip(runs[0][1], runs[1][1])):
        assert_close(b, a, np.float64, f"call {k}")


# -------------------------------- the options in the rules with kernels of their own
# Lamb, Adafactor and Muon run use_ema and gradient accumulation in their own kernels
# (kernels/whole.cuh on the GPU, whole_host.cpp on the host). OWN_LAYOUT's factored
# (rank >= 2) and unfactored segments for Adafactor; for Muon matrices, a vector, a
# rank-3 variable and a scalar (AdamW), and the last matrix excluded by its name.
OWN_NAMES = ["dense_kernel", "bias", "conv_kernel", "scale", "skip_kernel"]
# float64 within 1e-10 of the NumPy executor (Lamb's and Adafactor's sums are added in
# another order); float32 as test_emulated_kernels.py's Adafactor.
OWN_RTOL = {np.float64: 1e-10, np.float32: 2e-6}
OWN_POISONED = (4, 9)  # non-finite calls in the middle of an accumulation cycle: skipped


def own_options_run(cls_name, kwargs, dtype, mode, libraries):
    """Per-call (params and every slot, iterations, skipped) of `cls_name` with the
    options on `mode`: "numpy", "host", "eager" (emulated) or "graph" (emulated, one
    captured step replayed every call); ema_momentum changes at call 11."""
    rng = np.random.default_rng(13)
    size = sum(int(np.prod(s)) for s in OWN_LAYOUT)
    grads = [(rng.normal(size=size) * rng.uniform(0.2, 2.0)).astype(dtype) for _ in range(16)]
    grads[OWN_POISONED[0]][5], grads[OWN_POISONED[1]][size - 1] = np.nan, -np.inf
    opt = getattr(fusedopt, cls_name)(executor="host" if mode == "host" else "numpy", **kwargs)
    params = fusedopt.FlatBuffer.from_arrays(random_params(OWN_LAYOUT, dtype, seed=14),
                                             names=OWN_NAMES)
    if mode in ("eager", "graph"):
        emulate(opt, params, libraries, sm_count=1, blocks_per_sm=2)
    buffer = np.zeros(size, dtype)
    step = opt.cuda_graph(buffer, params) if mode == "graph" else None
    records = []
    for k, g in enumerate(grads):
        if k == 11:
            opt.ema_momentum = 0.5
        buffer[...] = g
        step() if step else opt.apply(buffer.copy(), params)
        records.append((state_of(opt, params), opt.iterations, opt.skipped_steps))
    assert opt.executor_name == {"numpy": "numpy", "host": "host"}.get(mode, "cuda")
    if cls_name == "Muon":  # a matrix, one excluded by its name, and AdamW's variables
        assert [opt.uses_adamw(i, s) for i, s in enumerate(OWN_LAYOUT)] == \
            [False, True, True, True, True]
    return opt, records


def host_or_skip(rule):
    from fusedopt import host

    try:
        host.library(rule, np.float64)
    except host.HostBuildError as e:
        pytest.skip(f"no host build here: {e}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cls_name,kwargs", OWN_KERNEL_OPTIONS,
                         ids=[c for c, _ in OWN_KERNEL_OPTIONS])
def test_own_kernel_rules_with_options_match_numpy(libraries, cls_name, kwargs, dtype):
    """EMA (with overwrites) and gradient accumulation, a norm clip of the mean, skipped
    calls and a changed ema_momentum, in Lamb's, Adafactor's and Muon's own kernels:
    the emulated GPU path (eager, and for Lamb and Adafactor one captured step replayed
    every call, equal to the eager steps to the bit) and the host executor against the
    NumPy executor after every call, params and every slot."""
    host_or_skip(getattr(fusedopt, cls_name).rule)
    modes = ["numpy", "host", "eager"] + (["graph"] if cls_name != "Muon" else [])
    runs = {mode: own_options_run(cls_name, kwargs, dtype, mode, libraries) for mode in modes}
    reference = runs["numpy"][1]
    rtol = OWN_RTOL[dtype]
    for mode in modes[1:]:
        for k, (got, want) in enumerate(zip(runs[mode][1], reference)):
            assert got[1:] == want[1:], f"{mode}, call {k}: (iterations, skipped)"
            for j, (x, y) in enumerate(zip(got[0], want[0])):
                scale = float(np.max(np.abs(y), initial=0.0))
                np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale,
                                           err_msg=f"{mode}, call {k}, buffer {j}")
    if "graph" in runs:
        for k, (a, b) in enumerate(zip(runs["graph"][1], runs["eager"][1])):
            for x, y in zip(a[0], b[0]):
                np.testing.assert_array_equal(x, y, err_msg=f"replay {k}")
    # What the run covered: accumulating and applying calls, two skips, and overwrites
    # after the first update (the params equal the moving average, momentum > 0).
    n, f = kwargs["gradient_accumulation_steps"], kwargs["ema_overwrite_frequency"]
    opt = runs["numpy"][0]
    assert (opt.iterations, opt.skipped_steps) == ((16 - len(OWN_POISONED)) // n, 2)
    average = 1 + list(opt.slots()).index("average")
    calls, overwrites = 0, []
    for k, (state, *_) in enumerate(reference):
        if k in OWN_POISONED:
            continue
        updates = calls // n
        if updates >= 1 and (updates + 1) % f == 0:
            overwrites.append(k)
            np.testing.assert_array_equal(state[0], state[average], err_msg=f"call {k}")
        calls += 1
    assert len(overwrites) >= n


@pytest.mark.parametrize("cls_name", ["Lamb", "Adafactor", "Muon"])
@pytest.mark.parametrize("overwrite", [None, 1], ids=["ema", "ema-overwrite"])
def test_own_kernel_options_move_the_modelled_bytes(libraries, cls_name, overwrite):
    """Bytes per float32 element of each kernel, counted access by access, on the calls
    that only accumulate and on those that apply (the models in kernels/lamb.cu,
    adafactor.cu, muon.cu): a call that only accumulates is the first kernel reading
    g, the accumulator, p and the average and writing the accumulator and the average
    (and p when the average overwrites it); the applying call adds a read and a write
    of the accumulator (Adafactor: and a write of the mean it keeps there) and a read
    and a write of the average to the rule's own. Every call launches the same kernels."""
    kwargs = {"gradient_accumulation_steps": 2, "use_ema": True,
              "ema_overwrite_frequency": overwrite}
    opt = getattr(fusedopt, cls_name)(**kwargs)
    params = fusedopt.FlatBuffer.from_arrays(random_params(OWN_LAYOUT, np.float32, seed=1),
                                             names=OWN_NAMES)
    backend = emulate(opt, params, libraries)
    n = params.size
    factored = sum(int(np.prod(s)) for s in OWN_LAYOUT if len(s) >= 2)
    adamw = sum(int(np.prod(s)) for i, s in enumerate(OWN_LAYOUT) if opt.uses_adamw(i, s)) \
        if cls_name == "Muon" else 0
    ow = 1 if overwrite else 0
    first = {"Lamb": "fusedopt_lamb_moments", "Adafactor": "fusedopt_adafactor_pass",
             "Muon": "fusedopt_muon_moments"}[cls_name]
    if cls_name == "Lamb":
        applying = {"fusedopt_lamb_moments": (5 * n, 3 * n),
                    "fusedopt_lamb_apply": (4 * n, 2 * n)}
    elif cls_name == "Adafactor":
        u = n - factored
        # test_emulated_kernels.py's counts, plus the accumulator (read, the mean
        # written, 0 written) and the average (read, written).
        applying = {"fusedopt_adafactor_pass": ((2 * n + u) + 2 * factored + (2 * n + u) + 2 * n,
                                                n + (n + factored) + 3 * n),
                    "fusedopt_adafactor_rows": (factored, 0),
                    "fusedopt_adafactor_columns": (factored, 0)}
    else:
        muon = n - adamw
        applying = {"fusedopt_muon_moments": (4 * adamw + 3 * muon + n + adamw,
                                              3 * adamw + 2 * muon + n + adamw),
                    "fusedopt_muon_apply": (2 * muon + muon, muon + muon)}
    sequences = []
    for call, g in enumerate(random_grads(OWN_LAYOUT, np.float32, seed=2, steps=4)):
        backend.launches.clear()
        backend.reset_accesses()
        opt.apply(fusedopt.FlatBuffer.from_arrays(g), params)
        sequences.append(list(backend.launches))
        if call % 2 == 0:  # only accumulates
            expected = {first: (4 * n, (2 + ow) * n)}
        else:
            expected = applying
        for kernel in set(backend.launches):
            want = expected.get(kernel, (0, 0))
            assert bytes_moved(backend, kernel) == (want[0] * 4, want[1] * 4), (call, kernel)
        if call % 2:  # fusedopt/bench.py's model of an applying call, segment by segment
            from fusedopt import bench

            model = sum(bench.step_bytes(cls_name.lower(), 4, shape=s,
                                         **{k: v for k, v in kwargs.items() if v}) *
                        int(np.prod(s)) for s in OWN_LAYOUT)
            assert model == sum(sum(bytes_moved(backend, k)) for k in set(backend.launches))
    assert all(s == sequences[0] for s in sequences)
    assert opt.iterations == 2


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["counted", "device-skips"])
def test_muon_runs_no_matrix_products_on_calls_that_only_accumulate(libraries, skip_nonfinite):
    """The host knows which calls only accumulate while its count of calls is exact
    (fusedopt/cuda.py, _enqueue_muon); with skip_nonfinite only the device knows, and
    the products run on every call (the apply kernel then ignores them)."""
    opt = fusedopt.Muon(gradient_accumulation_steps=3, skip_nonfinite=skip_nonfinite)
    params = fusedopt.FlatBuffer.from_arrays(random_params(OWN_LAYOUT, np.float64, seed=1),
                                             names=OWN_NAMES)
    emulate(opt, params, libraries)
    ran, call = [], [0]
    orthogonalise = opt._orthogonalise
    opt._orthogonalise = lambda d, matrices: (ran.append(call[0]), orthogonalise(d, matrices))
    ref = fusedopt.Muon(gradient_accumulation_steps=3, skip_nonfinite=skip_nonfinite)
    ref_params = fusedopt.FlatBuffer.from_arrays(random_params(OWN_LAYOUT, np.float64, seed=1),
                                                 names=OWN_NAMES)
    for call[0], g in enumerate(random_grads(OWN_LAYOUT, np.float64, seed=2, steps=6)):
        opt.apply(fusedopt.FlatBuffer.from_arrays(g), params)
        ref.apply(fusedopt.FlatBuffer.from_arrays(g), ref_params)
        np.testing.assert_allclose(params.data, ref_params.data, rtol=1e-12, atol=1e-14)
    assert ran == ([0, 1, 2, 3, 4, 5] if skip_nonfinite else [2, 5])
    assert opt.iterations == 2
