"""The step's state on the device (issue 10), run on the CPU by the kernel emulator.

The learning rate, schedules, bias corrections, Nadam's product and the counters are
computed on the device from a hyperparameter block and the step state, so a captured
step replays as the next step any number of times, and a skipped step leaves nothing
stale for the steps after it. Also here: buffers sharing a misalignment take the
vector path, the clip option switched between steps, two optimizers on two streams,
NaN carried in a state slot, an H100-sized grid over a 600k-element clipped segment,
and the emulator's own CUDA launch limits.
"""

import numpy as np
import pytest

import fusedopt
from conftest import GRAPH_CASES, KERNEL_CASES, KERNEL_RULE_CASES, case_ids, random_grads, random_params
from emulator import EmulatorBackend, LaunchError, emulate
from fusedopt import _kernels
from fusedopt import schedules as S
from fusedopt.flat import _span

LAYOUT = [(700,), (3, 7), (), (0,), (1,), (33,)]
RTOL = {np.float64: 1e-12, np.float32: 2e-6}


@pytest.fixture
def libraries(emulator_libraries):
    return emulator_libraries


def make(cls_name, kwargs, dtype=np.float64, layout=LAYOUT, seed=21):
    return (getattr(fusedopt, cls_name)(**kwargs),
            fusedopt.FlatBuffer.from_arrays(random_params(layout, dtype, seed=seed)))


def state_of(opt, params):
    return [params.data.copy()] + [s.copy() for s in opt.slots().values()]


def assert_same_bits(a, b, what):
    for k, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(x, y, err_msg=f"{what}, buffer {k}")


def assert_close(actual, desired, dtype, what):
    rtol = RTOL[dtype]
    for k, (x, y) in enumerate(zip(actual, desired)):
        scale = float(np.max(np.abs(y[np.isfinite(y)]), initial=0.0))
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale, err_msg=f"{what} {k}")


# ------------------------------------------------------------- the two wrong results
def test_recorded_apply_replays_like_eager_steps(libraries):
    """Stream-capturing apply() itself (what users did before cuda_graph()): each
    replay is the next step, not step t again (issue 10: -1.4445 instead of -1.4000)."""
    g = np.linspace(-1.0, 2.0, 5)
    cpu_params = fusedopt.FlatBuffer.from_arrays([np.full(5, -1.0)])
    gpu_params = fusedopt.FlatBuffer.from_arrays([np.full(5, -1.0)])
    cpu, gpu = fusedopt.Adam(0.1), fusedopt.Adam(0.1)
    backend = emulate(gpu, gpu_params, libraries)
    gpu.apply(g, gpu_params)
    with backend.capture() as graph:
        gpu.apply(g, gpu_params)
    for _ in range(3):
        graph.launch()
    for _ in range(4):
        cpu.apply(g, cpu_params)
    np.testing.assert_allclose(gpu_params.data, cpu_params.data, rtol=1e-12)
    assert gpu_params.data[4] == pytest.approx(-1.4, abs=1e-5)


def test_learning_rate_changed_after_a_skipped_step_is_used(libraries):
    """SGD(0.1): a good step, a NaN step, learning_rate = 0.5, a good step (issue 10:
    the emulated GPU gave -1.2 here, the CPU -1.6)."""
    out = []
    for on_device in (False, True):
        params = fusedopt.FlatBuffer.from_arrays([np.full(5, -1.0)])
        opt = fusedopt.SGD(0.1, skip_nonfinite=True)
        if on_device:
            emulate(opt, params, libraries)
        opt.apply(np.ones(5), params)
        opt.apply(np.full(5, np.nan), params)
        opt.learning_rate = 0.5
        opt.apply(np.ones(5), params)
        assert (opt.iterations, opt.skipped_steps) == (2, 1)
        out.append(params.data.copy())
    np.testing.assert_allclose(out[0], -1.6)
    np.testing.assert_array_equal(out[1], out[0])


# ------------------------------------------------------------------ captured steps
def replay_against_eager(libraries, cls_name, kwargs, dtype, n, grads_of_step,
                         between=None):
    """n eager steps on one emulated optimizer and n replays of one captured step on
    another, writing each step's gradients into the captured `grads` buffer and
    calling between(opt, step) on both before each step; returns both states."""
    eager, eager_params = make(cls_name, kwargs, dtype)
    graphed, graphed_params = make(cls_name, kwargs, dtype)
    emulate(eager, eager_params, libraries)
    emulate(graphed, graphed_params, libraries)
    grads = eager_params.zeros_like().data
    step = graphed.cuda_graph(grads, graphed_params)
    for k in range(n):
        if between is not None:
            between(eager, k)
            between(graphed, k)
        grads[...] = grads_of_step(k)
        eager.apply(grads.copy(), eager_params)
        step()
    return (eager, state_of(eager, eager_params)), (graphed, state_of(graphed, graphed_params))


# 20 replays hold more than one period of every case's phases (at most 3 calls per
# update under gradient accumulation, an EMA overwrite at most every 4 updates: 12
# calls); schedules over more steps are SCHEDULED's below.
@pytest.mark.parametrize("n", [1, 3, 20])
@pytest.mark.parametrize("case", GRAPH_CASES, ids=case_ids(GRAPH_CASES))
def test_replays_equal_eager_steps(libraries, case, n):
    """N replays of one captured step == N eager steps, to the bit, params and every
    slot, for every KERNEL_CASES entry; and the iteration count follows the replays."""
    _, cls_name, kwargs = case
    size = sum(int(np.prod(s)) for s in LAYOUT)
    rng = np.random.default_rng(5)
    grads = [rng.normal(size=size) * rng.uniform(0.1, 2.0) for _ in range(n)]
    (eager, a), (graphed, b) = replay_against_eager(
        libraries, cls_name, kwargs, np.float64, n, lambda k: grads[k])
    assert_same_bits(b, a, f"{n} replays")
    # Keras' iterations: updates (calls // N under gradient accumulation)
    assert graphed.iterations == eager.iterations == n // (
        kwargs.get("gradient_accumulation_steps") or 1)


SCHEDULED = [
    ("Adam", {"learning_rate": S.CosineDecay(0.05, 20, alpha=0.1, warmup_target=0.1,
                                             warmup_steps=5), "global_clipnorm": 1.0}),
    ("Nadam", {"learning_rate": S.ExponentialDecay(0.01, 3, 0.5, staircase=True),
               "skip_nonfinite": True, "clipnorm": 0.5}),
    ("SGD", {"learning_rate": S.PiecewiseConstantDecay([4, 9], [0.1, 0.05, 0.01]),
             "momentum": 0.9, "skip_nonfinite": True, "weight_decay": 0.1}),
    ("Adamax", {"learning_rate": S.CosineDecayRestarts(0.02, 4, t_mul=2.0, m_mul=0.8),
                "clipvalue": 0.3, "loss_scale_factor": 4.0}),
    ("Ftrl", {"learning_rate": S.PolynomialDecay(0.1, 10, 0.01, power=2.0, cycle=True),
              "beta": 0.5, "l2_regularization_strength": 0.01}),
    ("Lion", {"learning_rate": S.InverseTimeDecay(0.01, 2, 0.5)}),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cls_name,kwargs", SCHEDULED, ids=[c for c, _ in SCHEDULED])
def test_replays_with_schedules_skips_and_a_changed_learning_rate(libraries, cls_name,
                                                                   kwargs, dtype):
    """Schedules, clipping, weight decay, skips (NaN steps) and a loss scale assigned
    between replays (at step 12): the replays equal eager steps to the bit and the
    NumPy path within tolerance, and the counters are right."""
    size = sum(int(np.prod(s)) for s in LAYOUT)
    rng = np.random.default_rng(9)
    grads = [(rng.normal(size=size) * rng.uniform(0.1, 2.0)).astype(dtype) for _ in range(25)]
    if kwargs.get("skip_nonfinite"):
        grads[3][7], grads[4][0], grads[15][size - 1] = np.nan, np.inf, -np.inf
    def between(opt, k):
        if k == 12:  # issue 11 makes the assignment call the hook itself
            opt.loss_scale_factor = 2.0
            opt._hyperparameters_changed("loss_scale_factor")

    (eager, a), (graphed, b) = replay_against_eager(
        libraries, cls_name, kwargs, dtype, 25, lambda k: grads[k], between)
    assert_same_bits(b, a, "replays")
    cpu, cpu_params = make(cls_name, kwargs, dtype)
    for k, g in enumerate(grads):
        between(cpu, k)
        cpu.apply(g, cpu_params)
    assert_close(b, state_of(cpu, cpu_params), dtype, "replays vs NumPy")
    assert graphed.iterations == eager.iterations == cpu.iterations
    assert graphed.skipped_steps == cpu.skipped_steps


def test_replays_follow_hyperparameters_set_between_them(libraries):
    """Assigned hyperparameters reach the device block (issue 11 makes assignment call
    _hyperparameters_changed; here it is called as that assignment will)."""
    def between(opt, k):
        if k == 2:
            opt.weight_decay, opt.clipvalue, opt.beta_1 = 0.2, 0.05, 0.5
            opt._hyperparameters_changed(None)
        if k == 3:
            opt.learning_rate = 0.05  # the setter calls the hook

    rng = np.random.default_rng(3)
    size = sum(int(np.prod(s)) for s in LAYOUT)
    grads = [rng.normal(size=size) for _ in range(5)]
    (_, a), (_, b) = replay_against_eager(libraries, "Adam", {"clipvalue": 1.0}, np.float64,
                                          5, lambda k: grads[k], between)
    assert_same_bits(b, a, "replays")
    cpu, cpu_params = make("Adam", {"clipvalue": 1.0})
    for k, g in enumerate(grads):
        between(cpu, k)
        cpu.apply(g, cpu_params)
    assert_close(b, state_of(cpu, cpu_params), np.float64, "replays vs NumPy")


def test_a_capture_refuses_what_it_cannot_replay(libraries):
    opt, params = make("Adam", {"learning_rate": lambda: 0.01})
    emulate(opt, params, libraries)
    with pytest.raises(ValueError, match="learning_rate"):
        opt.cuda_graph(params.zeros_like(), params)
    opt, params = make("Adam", {"clipnorm": 1.0})
    emulate(opt, params, libraries)
    step = opt.cuda_graph(params.zeros_like(), params)
    step()
    opt.clipnorm, opt.global_clipnorm = None, 1.0
    opt._hyperparameters_changed("global_clipnorm")
    with pytest.raises(RuntimeError, match="capture it again"):
        step()
    step = opt.cuda_graph(params.zeros_like(), params)
    step()
    assert opt.iterations == 2
    opt.learning_rate = lambda: 0.02
    with pytest.raises(RuntimeError, match="callable"):
        step()
    cpu_opt, cpu_params = make("Adam", {})
    with pytest.raises(ValueError, match="CPU"):
        cpu_opt.cuda_graph(cpu_params.zeros_like(), cpu_params)


def test_callable_learning_rate_is_evaluated_each_eager_step(libraries):
    rates = iter([0.1, 0.3, 0.2])
    out = []
    for on_device in (False, True):
        rates = iter([0.1, 0.3, 0.2])
        with pytest.warns(DeprecationWarning):
            opt = fusedopt.SGD(lambda: next(rates), decay=0.5)
        params = fusedopt.FlatBuffer.from_arrays([np.zeros(3)])
        if on_device:
            emulate(opt, params, libraries)
        for _ in range(3):
            opt.apply(np.ones(3), params)
        out.append(params.data.copy())
    np.testing.assert_allclose(out[0], -(0.1 + 0.3 / 1.5 + 0.2 / 2.0))
    np.testing.assert_array_equal(out[1], out[0])


# ------------------------------------------------------------------- alignment
def with_offset(buffer, offset):
    """`buffer`'s values in a new buffer `offset` elements past a 64-byte boundary."""
    backing = np.zeros(buffer.size + 16, dtype=buffer.dtype)
    start = (-backing.ctypes.data % 64) // buffer.itemsize + offset
    out = backing[start:start + buffer.size]
    out[...] = buffer
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kwargs", [{}, {"clipnorm": 0.5}, {"global_clipnorm": 1.0}],
                         ids=["plain", "clipnorm", "global"])
def test_buffers_sharing_a_misalignment_take_the_vector_path(libraries, kwargs, dtype):
    """Params, grads and every slot one element past a 16-byte boundary: the step
    peels to the common alignment and still moves 16 bytes per access; params alone
    misaligned: the scalar path. Same bits in all three."""
    layout = [(2100,), (3, 7), (1,), (4500,)]
    init = np.concatenate([p.ravel() for p in random_params(layout, dtype, seed=4)])
    grads = [np.concatenate([g.ravel() for g in gs])
             for gs in random_grads(layout, dtype, seed=5, steps=3)]
    results, vector_loads = {}, {}
    for name, (p_offset, g_offset, s_offset) in {"aligned": (0, 0, 0), "common": (1, 1, 1),
                                                  "mixed": (1, 0, 0)}.items():
        params = fusedopt.FlatBuffer(with_offset(init, p_offset), layout)
        opt = fusedopt.Adam(**kwargs)
        opt.build(params)
        opt._slots = [None if s is None else with_offset(s, s_offset) for s in opt._slots]
        opt._slot_spans = [_span(s) for s in opt._slots if s is not None]
        backend = emulate(opt, params, libraries)
        backend.reset_accesses()
        for g in grads:
            opt.apply(with_offset(g, g_offset), params)
        results[name] = state_of(opt, params)
        vector_loads[name] = backend.count("load", 16, kernel="fusedopt_adam")
        if name != "mixed":  # the update's 4 buffers, less < V peeled elements a tile side
            V, tiles = 16 // np.dtype(dtype).itemsize, opt._plan.tiles.count
            assert vector_loads[name] * V >= 3 * 4 * (init.size - 2 * V * tiles), name
    assert vector_loads["mixed"] == 0
    assert_same_bits(results["common"], results["aligned"], "common misalignment")
    assert_same_bits(results["mixed"], results["aligned"], "scalar path")


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_sum_of_squares_loads_16_bytes_at_a_time(libraries, dtype):
    """fusedopt_sumsq on an aligned gradient: one 16-byte load per V elements, scalar
    loads only for the < V elements before and after each tile's whole chunks."""
    layout = [(5000,), (3,), (9001,)]
    opt, params = make("Adam", {"clipnorm": 1.0}, dtype, layout=layout)
    backend = emulate(opt, params, libraries)
    backend.reset_accesses()
    g = with_offset(np.ones(params.size, dtype), 0)
    opt.apply(g, params)
    V, tiles = 16 // np.dtype(dtype).itemsize, opt._plan.tiles.count
    vector = backend.count("load", 16, kernel="fusedopt_sumsq")
    scalar = backend.count("load", np.dtype(dtype).itemsize, kernel="fusedopt_sumsq")
    assert vector * V + scalar == params.size
    assert scalar <= 2 * (V - 1) * tiles


# ------------------------------------------------------------------- clip option
def test_clip_option_switched_between_steps(libraries):
    """Tables are rebuilt when the option is set, never inside a step; the steps
    before and after equal the NumPy path."""
    cpu, cpu_params = make("Adam", {"clipnorm": 0.3})
    gpu, gpu_params = make("Adam", {"clipnorm": 0.3})
    backend = emulate(gpu, gpu_params, libraries)
    grads = random_grads(LAYOUT, np.float64, seed=8, steps=6)
    for k, g in enumerate(grads):
        if k in (2, 4):
            for opt in (cpu, gpu):
                if k == 2:
                    opt.clipnorm, opt.global_clipnorm = None, 0.7
                else:
                    opt.global_clipnorm = None
                opt._hyperparameters_changed("global_clipnorm")
        tables = gpu._plan.tile_start
        backend.launches.clear()
        flat = fusedopt.FlatBuffer.from_arrays(g).data
        cpu.apply(flat, cpu_params)
        gpu.apply(flat, gpu_params)
        assert gpu._plan.tile_start is tables, "a step built tables"
        assert ("fusedopt_clip_factors" in backend.launches) == (k < 4)
        assert_close(state_of(gpu, gpu_params), state_of(cpu, cpu_params), np.float64,
                     f"step {k}")


# ------------------------------------------------------------------- streams
def test_two_optimizers_on_two_streams_interleaved(libraries):
    """Each optimizer has its own scratch and state: their kernels interleaved one by
    one across two streams give what each gives alone."""
    kwargs = {"global_clipnorm": 0.5, "skip_nonfinite": True}
    grads = random_grads(LAYOUT, np.float64, seed=31, steps=4)
    flat = [fusedopt.FlatBuffer.from_arrays(g).data for g in grads]
    flat[1][3] = np.nan
    alone = []
    for seed in (1, 2):
        opt, params = make("Adam", kwargs, seed=seed)
        emulate(opt, params, libraries)
        for g in flat:
            opt.apply(g * seed, params)
        alone.append(state_of(opt, params))
    backend = EmulatorBackend(libraries)
    pairs = [make("Adam", kwargs, seed=seed) for seed in (1, 2)]
    from fusedopt.cuda import StepPlan
    for opt, params in pairs:
        opt.build(params)
        opt._plan = StepPlan(opt, params, backend=backend)
    backend.deferred = True
    for g in flat:
        for seed, (opt, params) in zip((1, 2), pairs):
            with backend.use_stream(f"stream {seed}"):
                opt.apply(g * seed, params)
    backend.synchronize()
    for expected, (opt, params) in zip(alone, pairs):
        assert_same_bits(state_of(opt, params), expected, "interleaved streams")
        assert (opt.iterations, opt.skipped_steps) == (3, 1)


def test_one_optimizer_moving_between_streams_is_ordered(libraries):
    """Steps queued on stream A then B: B waits for A's work (an event), so the
    interleaving cannot run a step's reduction before the previous step's update."""
    kwargs = {"clipnorm": 0.5}
    grads = [fusedopt.FlatBuffer.from_arrays(g).data
             for g in random_grads(LAYOUT, np.float64, seed=32, steps=4)]
    opt, params = make("Adam", kwargs)
    emulate(opt, params, libraries)
    for g in grads:
        opt.apply(g, params)
    expected = state_of(opt, params)
    opt, params = make("Adam", kwargs)
    backend = emulate(opt, params, libraries)
    backend.deferred = True
    for k, g in enumerate(grads):
        with backend.use_stream("ab"[k % 2]):
            opt.apply(g, params)
    backend.synchronize()
    assert_same_bits(state_of(opt, params), expected, "steps on alternating streams")


# ------------------------------------------------------------------- NaN in state
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", KERNEL_RULE_CASES, ids=case_ids(KERNEL_RULE_CASES))
def test_nan_in_a_state_slot_is_carried_like_numpy(libraries, case, dtype):
    """A NaN/inf step (no skip_nonfinite: NaN propagates, as in Keras), then finite
    steps: params and every slot have NumPy's NaN pattern (e.g. Adamax's u keeps its
    NaN through max(beta_2*u, |g|)) and equal values elsewhere."""
    _, cls_name, kwargs = case
    cpu, cpu_params = make(cls_name, kwargs, dtype)
    gpu, gpu_params = make(cls_name, kwargs, dtype)
    emulate(gpu, gpu_params, libraries)
    grads = [fusedopt.FlatBuffer.from_arrays(g).data
             for g in random_grads(LAYOUT, dtype, seed=41, steps=3)]
    grads[0][[5, 300, 701]] = [np.nan, np.inf, -np.inf]
    with np.errstate(all="ignore"):
        for g in grads:
            cpu.apply(g, cpu_params)
            gpu.apply(g, gpu_params)
            for x, y in zip(state_of(gpu, gpu_params), state_of(cpu, cpu_params)):
                np.testing.assert_array_equal(np.isnan(x), np.isnan(y))
                np.testing.assert_array_equal(np.isinf(x), np.isinf(y))
    assert_close(state_of(gpu, gpu_params), state_of(cpu, cpu_params), dtype, "values")


# ------------------------------------------------------------------- an H100's grid
@pytest.mark.parametrize("kwargs", [{"clipnorm": 0.5}, {"global_clipnorm": 1.0}],
                         ids=["clipnorm", "global"])
def test_h100_grid_over_a_600k_clipped_segment(libraries, kwargs):
    """132 SMs (an H100) give 2048-element tiles: the 600k segment has 293 of them,
    more than a block's threads, so each thread of clip_factors sums several. Params
    start at 0 with lr 1, so they are the clipped gradients themselves."""
    layout = [(600_001,), (3,), (1000,)]
    kwargs = {**kwargs, "learning_rate": 1.0}
    cpu, cpu_params = make("SGD", kwargs, np.float32, layout=layout)
    gpu, gpu_params = make("SGD", kwargs, np.float32, layout=layout)
    cpu_params.data[...] = gpu_params.data[...] = 0.0
    emulate(gpu, gpu_params, libraries, sm_count=132, blocks_per_sm=3)
    assert gpu._plan.tiles.count > _kernels.BLOCK
    for g in random_grads(layout, np.float32, seed=51, steps=2):
        flat = fusedopt.FlatBuffer.from_arrays(g).data
        cpu.apply(flat, cpu_params)
        gpu.apply(flat, gpu_params)
    assert_close(state_of(gpu, gpu_params), state_of(cpu, cpu_params), np.float32, "600k")


# ------------------------------------------------------------------- the emulator
def test_the_emulator_refuses_what_cuda_refuses(libraries):
    backend = EmulatorBackend(libraries)
    kernel = backend.function(None, np.float32, "fusedopt_skip_check")
    flags, state = np.zeros(4, np.int32), np.zeros(_kernels.STEP_STATE.itemsize, np.uint8)
    kernel((1,), (256,), (flags, np.int64(4), state))
    for grid, block, args, match in [
        (0, 256, (flags, np.int64(4), state), "grid"),
        (1, 1025, (flags, np.int64(4), state), "block"),
        (1, 0, (flags, np.int64(4), state), "block"),
        (1, 256, (flags, np.int32(4), state), "argument 1"),
        (1, 256, (flags.astype(np.int64), np.int64(4), state), "argument 0"),
        (1, 256, (flags, np.int64(4), state[:-8]), "argument 2"),
        (1, 256, (flags, np.int64(4)), "3 arguments"),
    ]:
        with pytest.raises(LaunchError, match=match):
            kernel((grid,), (block,), args)
    write = backend.function(None, np.float32, "fusedopt_write_state")
    with pytest.raises(LaunchError, match="by value"):
        write((1,), (1,), (state, np.zeros((), _kernels.HYPER)))
    value = _kernels.pack_step_state(7, 2, True, 0.5)
    write((1,), (1,), (state, value))
    assert state.tobytes() == value.tobytes()
    update = backend.function("sgd", np.float32, "fusedopt_sgd")
    p = np.zeros(64, np.uint8)[2:34].view(np.float32)  # 2 bytes off: no GPU can load that
    with pytest.raises(LaunchError, match="misaligned"):
        update((1,), (256,), (p, p.copy(), None, None, None, None, None, None, np.array([0, 8]),
                              np.zeros(1, np.int32), np.zeros(1, np.int32), np.int64(1), None,
                              np.int32(1), np.array([1.0, 1.0]), np.int32(1),
                              np.zeros(_kernels.HYPER.itemsize, np.uint8), state))


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["counted-on-host", "skip"])
@pytest.mark.parametrize("change", [{"beta_1": 0.8}, {"schedule_decay": 0.5}],
                         ids=["beta_1", "schedule_decay"])
def test_nadam_product_follows_a_changed_hyperparameter(libraries, change, skip_nonfinite):
    """Nadam's running product lives in the device step state; after beta_1 (or Keras
    2's schedule_decay) is set mid-run the device recomputes it exactly as the host
    does, so the executors agree step for step."""
    g = np.linspace(0.5, -0.3, 7)
    results = []
    for emulated in (False, True):
        opt = fusedopt.Nadam(0.1, skip_nonfinite=skip_nonfinite)
        params = fusedopt.FlatBuffer.from_arrays([np.linspace(-1.0, 1.0, 7)])
        if emulated:
            emulate(opt, params, libraries)
        for _ in range(3):
            opt.apply(g.copy(), params)
        for name, value in change.items():
            setattr(opt, name, value)
        for _ in range(3):
            opt.apply(g.copy(), params)
        results.append(state_of(opt, params))
    assert_close(results[1], results[0], np.float64, "after the change")
