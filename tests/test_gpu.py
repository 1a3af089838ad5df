"""The CUDA path on a real GPU against the NumPy reference (skipped without a GPU).

For every case of KERNEL_CASES, float32 and float64, several sizes and segment layouts:
params and every slot after every one of 20 steps, starting from random state.
Buffers sit between guard regions filled with a sentinel bit pattern, checked after
the steps, so an out-of-bounds write cannot go unnoticed. Also: bitwise determinism,
no host synchronisation in a step (a step is captured into a CUDA graph, which CUDA
refuses when anything synchronises), cuda_graph() replays equal to eager steps,
a learning rate set after a skipped step, buffers sharing a misalignment, the clip
option switched between steps, two optimizers on two streams, state moving between
CPU and GPU, and a buffer of more than 2**31 elements where the device has the memory.
The emulator runs the same cases on the CPU (tests/test_emulated_step_state.py).
"""

import numpy as np
import pytest

import fusedopt
from conftest import GRAPH_CASES, KERNEL_CASES, OWN_KERNEL_OPTIONS, case_ids
from fusedopt import cuda
from fusedopt import schedules as S

pytestmark = pytest.mark.skipif(not cuda.gpu_available(), reason="no CUDA GPU")

SIZES = [0, 1, 31, 4097, 2**20 + 3]
STEPS = 20
GUARD = 64
RTOL = {np.float64: 1e-12, np.float32: 2e-5}


def layouts_for(n):
    """Segment layouts of n elements: one segment, uneven pieces, many small ones."""
    out = [[(n,)]]
    if n >= 31:
        out.append([(n - 20,), (7,), (0,), (1,), (12,)])
    if n >= 4097:
        pieces = [n // 200] * 199
        out.append([(p,) for p in pieces] + [(n - sum(pieces),)])
    return out


def guarded(cp, array):
    """`array` copied into the middle of a buffer whose ends hold a sentinel pattern."""
    backing = cp.empty(array.size + 2 * GUARD, dtype=array.dtype)
    backing.view(np.uint8).fill(0xA5)
    backing[GUARD:GUARD + array.size] = cp.asarray(array)
    return backing, backing[GUARD:GUARD + array.size]


def assert_guards_intact(cp, backing, n):
    raw = backing.view(np.uint8)
    itemsize = backing.dtype.itemsize
    head, tail = raw[: GUARD * itemsize], raw[(GUARD + n) * itemsize:]
    assert bool((head == 0xA5).all()) and bool((tail == 0xA5).all()), "write outside the buffer"


def assert_close(actual, desired, dtype, what):
    rtol = RTOL[dtype]
    finite = desired[np.isfinite(desired)]
    scale = float(np.max(np.abs(finite), initial=0.0))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale, err_msg=what)


def _accumulation(kwargs):
    """Keras' iterations are updates: calls // N under gradient accumulation."""
    return kwargs.get("gradient_accumulation_steps") or 1


def random_state(opt, size, dtype, rng):
    """A state_dict with random (non-zero, valid) slots so every element must change.
    `opt` is built: each slot keeps its size (Adafactor's r and c are not the params')."""
    slots = {}
    for name in opt.slot_names:
        values = rng.uniform(0.01, 1.0, np.asarray(opt.slots()[name]).size)
        if name in ("momentum", "linear", "average_gradient"):
            values *= rng.choice([-1.0, 1.0], size)
        slots[name] = values.astype(dtype)
    return slots


def gpu_cases():
    for n in SIZES:
        for layout in layouts_for(n):
            yield n, layout


LAYOUT_CASES = list(gpu_cases())


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("layout", LAYOUT_CASES,
                         ids=[f"n{n}-seg{len(lay)}" for n, lay in LAYOUT_CASES])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=case_ids(KERNEL_CASES))
def test_gpu_matches_numpy_every_step(case, layout, dtype):
    import cupy as cp

    n, shapes = layout
    _, cls_name, kwargs = case
    rng = np.random.default_rng(n + len(shapes))
    init = rng.normal(size=n).astype(dtype)
    cpu_params = fusedopt.FlatBuffer(init.copy(), shapes)
    backing, gpu_data = guarded(cp, init)
    gpu_params = fusedopt.FlatBuffer(gpu_data, shapes)
    cpu_opt = getattr(fusedopt, cls_name)(**kwargs)
    gpu_opt = getattr(fusedopt, cls_name)(**kwargs)
    cpu_opt.build(cpu_params)
    state = cpu_opt.state_dict()
    state["slots"] = random_state(cpu_opt, n, dtype, rng)
    cpu_opt.load_state_dict(state)
    gpu_opt.load_state_dict(state)
    for step in range(STEPS):
        g = (rng.normal(size=n) * rng.uniform(0.1, 3.0)).astype(dtype)
        cpu_opt.apply(g, cpu_params)
        gpu_opt.apply(cp.asarray(g), gpu_params)
        assert_close(cp.asnumpy(gpu_params.data), cpu_params.data, dtype, f"params, step {step}")
        for name in cpu_opt.slot_names:
            assert_close(cp.asnumpy(gpu_opt.slots()[name]), cpu_opt.slots()[name], dtype,
                         f"{name}, step {step}")
    assert gpu_opt.iterations == cpu_opt.iterations == STEPS // _accumulation(kwargs)
    assert_guards_intact(cp, backing, n)


def run_gpu(cp, cls_name, kwargs, n, shapes, steps, seed):
    rng = np.random.default_rng(seed)
    params = fusedopt.FlatBuffer(cp.asarray(rng.normal(size=n).astype(np.float32)), shapes)
    opt = getattr(fusedopt, cls_name)(**kwargs)
    for _ in range(steps):
        opt.apply(cp.asarray(rng.normal(size=n).astype(np.float32)), params)
    return [cp.asnumpy(params.data)] + [cp.asnumpy(s) for s in opt.slots().values()]


@pytest.mark.parametrize("kwargs", [{}, {"clipnorm": 0.5}, {"global_clipnorm": 1.0},
                                    {"skip_nonfinite": True, "global_clipnorm": 1.0}],
                         ids=["plain", "clipnorm", "global", "skip-global"])
@pytest.mark.parametrize("cls_name", ["Adam", "Lamb", "Adafactor"])
def test_gpu_runs_are_bitwise_identical(cls_name, kwargs):
    import cupy as cp

    n = 3 * 2**20 + 5
    shapes = [(n // 3,), (n // 3,), (n - 2 * (n // 3),)]
    first = run_gpu(cp, cls_name, kwargs, n, shapes, steps=10, seed=7)
    second = run_gpu(cp, cls_name, kwargs, n, shapes, steps=10, seed=7)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


SYNC_FREE_OPTIONS = {
    "plain": {}, "clipnorm": {"clipnorm": 1.0}, "global": {"global_clipnorm": 1.0},
    "clipvalue-decay": {"clipvalue": 0.1, "weight_decay": 0.01},
    "skip": {"skip_nonfinite": True},
    "skip-clipnorm-scale": {"skip_nonfinite": True, "clipnorm": 1.0, "loss_scale_factor": 128.0},
    "schedule": {"learning_rate": fusedopt.schedules.CosineDecay(1e-3, 100)},
    # Keras' options are fused.cu's (Lamb's and Adafactor's own kernels take them on
    # NumPy only)
    "ema-accumulate-clipnorm-skip": {"use_ema": True, "ema_overwrite_frequency": 2,
                                     "gradient_accumulation_steps": 2, "clipnorm": 1.0,
                                     "skip_nonfinite": True},
}
SYNC_FREE = [(cls, name) for cls in ("Adam", "Lamb", "Adafactor") for name in SYNC_FREE_OPTIONS
             if cls == "Adam" or not name.startswith("ema")]


@pytest.mark.parametrize("cls_name,option", SYNC_FREE, ids=[f"{c}-{o}" for c, o in SYNC_FREE])
def test_gpu_step_never_synchronises(cls_name, option):  # Lamb: 3 launches, Adafactor 6; no sync
    """A step captured into a CUDA graph: capture fails on any device-to-host copy or
    synchronisation. The captured graph, replayed, then performs a real step."""
    import cupy as cp

    n = 100_003
    shapes = [(50_000,), (3,), (50_000,)]
    params = fusedopt.FlatBuffer(cp.asarray(np.linspace(-1, 1, n, dtype=np.float32)), shapes)
    grads = cp.asarray(np.random.default_rng(0).normal(size=n).astype(np.float32))
    opt = getattr(fusedopt, cls_name)(**SYNC_FREE_OPTIONS[option])
    opt.apply(grads, params)  # build and compile outside the capture
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        opt.apply(grads, params)
        graph = stream.end_capture()
    before = cp.asnumpy(params.data)
    graph.launch(stream)
    stream.synchronize()
    assert not np.array_equal(before, cp.asnumpy(params.data))


@pytest.mark.parametrize("cls_name,kwargs", [
    ("Adam", {}), ("AdamW", {"global_clipnorm": 1.0, "loss_scale_factor": 2.0}),
    ("SGD", {"momentum": 0.9, "momentum_in_gradient_units": True, "clipnorm": 0.5}),
    ("Lamb", {"clipnorm": 1.0, "weight_decay": 0.01}),  # kernels/lamb.cu read the block
    ("Adafactor", {"clipnorm": 1.0, "weight_decay": 0.01}),  # and kernels/adafactor.cu
], ids=["adam", "adamw-global-scale", "sgd-torch-clipnorm", "lamb-clipnorm",
        "adafactor-clipnorm"])
def test_gpu_grad_scale_and_found_inf_are_read_on_the_device(cls_name, kwargs):
    """apply(grad_scale=, found_inf=) (torch.amp.GradScaler's inputs): eager steps equal
    the NumPy oracle on grads/scale; the step captures into a CUDA graph (which fails on
    any host read), and the replays follow the values written into the two device
    arrays afterwards: a flag skips (counted), a new scale unscales."""
    import cupy as cp

    shapes = [(5_000,), (3,), (5_000,)]
    n = 10_003
    rng = np.random.default_rng(1)
    p0 = rng.normal(size=n).astype(np.float32)
    grads = [rng.normal(size=n).astype(np.float32) for _ in range(4)]
    params = fusedopt.FlatBuffer(cp.asarray(p0), shapes)
    oracle = fusedopt.FlatBuffer(p0.copy(), shapes)
    opt, ref = (getattr(fusedopt, cls_name)(**kwargs) for _ in range(2))
    ref.executor = "numpy"
    scale, found = cp.array([1024.0], np.float32), cp.zeros(1, np.float32)
    g = cp.empty(n, np.float32)
    g[...] = cp.asarray(grads[0]) * 1024
    opt.apply(g, params, grad_scale=scale, found_inf=found)  # builds and compiles
    ref.apply(grads[0], oracle)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        opt.apply(g, params, grad_scale=scale, found_inf=found)
        graph = stream.end_capture()
    for t, (flag, s) in enumerate([(1.0, 512.0), (0.0, 512.0), (0.0, 256.0)], start=1):
        found.fill(flag)
        scale.fill(s)
        g[...] = cp.asarray(grads[t]) * s
        cp.cuda.get_current_stream().synchronize()
        graph.launch(stream)
        stream.synchronize()
        if not flag:
            ref.apply(grads[t], oracle)
        assert_close(cp.asnumpy(params.data), oracle.data, np.float32, f"replay {t}")
    assert (opt.iterations, opt.skipped_steps) == (3, 1)


@pytest.mark.parametrize("cls_name,kwargs", [("Adam", {"amsgrad": True}), ("Nadam", {}),
                                             ("Ftrl", {"l1_regularization_strength": 0.01}),
                                             ("Lamb", {"weight_decay": 0.01}),
                                             ("Adafactor", {"weight_decay": 0.01})])
def test_state_moves_between_cpu_and_gpu(cls_name, kwargs):
    import cupy as cp

    rng = np.random.default_rng(3)
    shapes = [(100,), (7, 3)]
    init = rng.normal(size=121)
    grads = [rng.normal(size=121) for _ in range(12)]
    ref_params = fusedopt.FlatBuffer(init.copy(), shapes)
    ref = getattr(fusedopt, cls_name)(**kwargs)
    for g in grads:
        ref.apply(g, ref_params)
    # 4 steps on the CPU, 4 on the GPU, 4 on the CPU again.
    params = fusedopt.FlatBuffer(init.copy(), shapes)
    opt = getattr(fusedopt, cls_name)(**kwargs)
    for g in grads[:4]:
        opt.apply(g, params)
    gpu_params, gpu_opt = params.to("gpu"), getattr(fusedopt, cls_name)(**kwargs)
    gpu_opt.load_state_dict(opt.state_dict())
    for g in grads[4:8]:
        gpu_opt.apply(cp.asarray(g), gpu_params)
    cpu_params, cpu_opt = gpu_params.to("cpu"), getattr(fusedopt, cls_name)(**kwargs)
    cpu_opt.load_state_dict(gpu_opt.state_dict())
    for g in grads[8:]:
        cpu_opt.apply(g, cpu_params)
    np.testing.assert_allclose(cpu_params.data, ref_params.data, rtol=1e-12)
    assert cpu_opt.iterations == 12


MUON_SHAPES = [(600, 500), (7,), (1300, 400), (3, 7), (), (20, 30)]
MUON_NAMES = ["dense_kernel", "bias", "out_kernel", "token_embedding", "scale", "skip_kernel"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kwargs", [
    {}, {"nesterov": False, "rms_rate": None, "clipnorm": 0.5, "skip_nonfinite": True,
         "exclude_layers": ["^skip"]}], ids=["defaults", "plain-clipnorm-skip-excluded"])
def test_gpu_muon_matrices_match_numpy(kwargs, dtype):
    """Muon's Newton-Schulz step on matrices (CuPy's matmuls, cuBLAS) between the two
    element-wise kernels, against the NumPy executor, every step."""
    import cupy as cp

    rng = np.random.default_rng(9)
    n = sum(int(np.prod(s)) for s in MUON_SHAPES)
    init = rng.normal(size=n).astype(dtype)
    cpu_params = fusedopt.FlatBuffer(init.copy(), MUON_SHAPES, names=MUON_NAMES)
    gpu_params = fusedopt.FlatBuffer(cp.asarray(init), MUON_SHAPES, names=MUON_NAMES)
    cpu_opt, gpu_opt = fusedopt.Muon(**kwargs), fusedopt.Muon(**kwargs)
    for step in range(10):
        g = (rng.normal(size=n) * rng.uniform(0.1, 3.0)).astype(dtype)
        if step == 4:
            g[5] = np.nan  # skipped with skip_nonfinite, propagates otherwise
        cpu_opt.apply(g, cpu_params)
        gpu_opt.apply(cp.asarray(g), gpu_params)
        assert_close(cp.asnumpy(gpu_params.data), cpu_params.data, dtype, f"params, step {step}")
        for name in cpu_opt.slot_names:
            assert_close(cp.asnumpy(gpu_opt.slots()[name]), cpu_opt.slots()[name], dtype,
                         f"{name}, step {step}")
    assert gpu_opt.executor_name == "cuda"
    assert (gpu_opt.iterations, gpu_opt.skipped_steps) == (cpu_opt.iterations,
                                                           cpu_opt.skipped_steps)


# Adafactor's factored statistics: rows longer than a block, a tall embedding-like
# matrix (few columns summed over many rows), rank 3, a column, empty and 1-D segments.
ADAFACTOR_SHAPES = [(512, 1024), (1024,), (30000, 8), (4, 33, 65), (5000, 1), (0, 7), (),
                    (1, 3000)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kwargs", [
    {}, {"clipnorm": 0.5, "weight_decay": 0.01, "skip_nonfinite": True,
         "learning_rate": fusedopt.schedules.CosineDecay(0.01, 10)}],
    ids=["defaults", "clipnorm-decay-skip-schedule"])
def test_gpu_adafactor_matrices_match_numpy(kwargs, dtype):
    """Adafactor's six kernels against the NumPy executor on matrices, every step, params
    and every slot (float64 within 1e-10: the sums are added in another order); and a
    second run gives the same bits (no atomics on floats)."""
    import cupy as cp

    rng = np.random.default_rng(10)
    n = sum(int(np.prod(s)) for s in ADAFACTOR_SHAPES)
    init = rng.normal(size=n).astype(dtype)
    grads = [(rng.normal(size=n) * rng.uniform(0.1, 3.0)).astype(dtype) for _ in range(8)]
    grads[4][5] = np.nan  # skipped with skip_nonfinite, propagates otherwise
    cpu_params = fusedopt.FlatBuffer(init.copy(), ADAFACTOR_SHAPES)
    cpu_opt = fusedopt.Adafactor(executor="numpy", **kwargs)
    runs = []
    for run in range(2):
        gpu_params = fusedopt.FlatBuffer(cp.asarray(init), ADAFACTOR_SHAPES)
        gpu_opt = fusedopt.Adafactor(**kwargs)
        for step, g in enumerate(grads):
            gpu_opt.apply(cp.asarray(g), gpu_params)
            if run:
                continue
            with np.errstate(invalid="ignore"):
                cpu_opt.apply(g, cpu_params)
            rtol = 1e-10 if dtype == np.float64 else RTOL[dtype]
            pairs = [("params", gpu_params.data, cpu_params.data)]
            pairs += [(k, gpu_opt.slots()[k], cpu_opt.slots()[k]) for k in cpu_opt.slot_names]
            for name, a, b in pairs:
                scale = float(np.max(np.abs(b[np.isfinite(b)]), initial=0.0))
                np.testing.assert_allclose(cp.asnumpy(a), b, rtol=rtol, atol=rtol * scale,
                                           err_msg=f"{name}, step {step}")
        assert gpu_opt.executor_name == "cuda"
        assert (gpu_opt.iterations, gpu_opt.skipped_steps) == (cpu_opt.iterations,
                                                               cpu_opt.skipped_steps)
        runs.append([cp.asnumpy(gpu_params.data)] +
                    [cp.asnumpy(s) for s in gpu_opt.slots().values()])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


def test_gpu_muon_capture_is_refused():
    import cupy as cp

    params = fusedopt.FlatBuffer(cp.ones(60, dtype=np.float32), [(6, 10)])
    opt = fusedopt.Muon()
    opt.apply(cp.full(60, 0.5, dtype=np.float32), params)
    with pytest.raises(RuntimeError, match="cannot be captured"):
        opt.cuda_graph(cp.full(60, 0.5, dtype=np.float32), params)
    assert opt.iterations == 1


def test_more_than_2_to_the_31_elements():
    """64-bit indexing end to end, global clipping included: elements past 2**31 are
    updated with the factor computed from all of them."""
    import cupy as cp

    n = 2**31 + 4099
    free, _ = cp.cuda.runtime.memGetInfo()
    if free < 3 * n * 4 + 2**30:
        pytest.skip(f"needs {3 * n * 4 / 2**30:.1f} GiB of free GPU memory")
    params = fusedopt.FlatBuffer(cp.zeros(n, dtype=np.float32), [(2**31,), (4099,)])
    grads = cp.ones(n, dtype=np.float32)
    grads[-1] = 3.0
    opt = fusedopt.SGD(learning_rate=1.0, global_clipnorm=1.0)
    opt.apply(grads, params)
    norm = np.sqrt(float(n - 1) + 9.0)
    tail = cp.asnumpy(params.data[-3:])
    np.testing.assert_allclose(tail, [-1 / norm, -1 / norm, -3 / norm], rtol=1e-5)
    np.testing.assert_allclose(float(params.data[0]), -1 / norm, rtol=1e-5)
    np.testing.assert_allclose(float(params.data[2**31 + 17]), -1 / norm, rtol=1e-5)
    del params, grads
    cp.get_default_memory_pool().free_all_blocks()


def _gpu_run(cp, opt, params, grads):
    for g in grads:
        opt.apply(cp.asarray(g), params)


@pytest.mark.parametrize("kwargs", [{}, {"global_clipnorm": 1.0, "skip_nonfinite": True}],
                         ids=["plain", "skip-global"])
def test_gpu_checkpoint_resume_is_bitwise_identical(tmp_path, kwargs):
    import cupy as cp

    rng = np.random.default_rng(5)
    shapes = [(3000,), (17,), (0,)]
    init = rng.normal(size=3017).astype(np.float32)
    grads = [rng.normal(size=3017).astype(np.float32) for _ in range(10)]
    grads[3][5] = np.nan  # skipped with skip_nonfinite, propagates otherwise
    straight = fusedopt.FlatBuffer(cp.asarray(init), shapes)
    straight_opt = fusedopt.Adam(**kwargs)
    _gpu_run(cp, straight_opt, straight, grads)
    params = fusedopt.FlatBuffer(cp.asarray(init), shapes)
    opt = fusedopt.Adam(**kwargs)
    _gpu_run(cp, opt, params, grads[:5])
    fusedopt.save(tmp_path / "c.safetensors", opt, params)
    # GPU -> CPU -> GPU, through both containers: load on the CPU, save again, load on the GPU.
    cpu_opt, cpu_params = fusedopt.load(tmp_path / "c.safetensors", device="cpu")
    fusedopt.save(tmp_path / "c2.npz", cpu_opt, cpu_params)
    opt, params = fusedopt.load(tmp_path / "c2.npz", device="gpu")
    assert params.device.startswith("gpu")
    _gpu_run(cp, opt, params, grads[5:])
    np.testing.assert_array_equal(cp.asnumpy(params.data), cp.asnumpy(straight.data))
    for name in opt.slot_names:
        np.testing.assert_array_equal(cp.asnumpy(opt.slots()[name]),
                                      cp.asnumpy(straight_opt.slots()[name]))
    assert opt.iterations == straight_opt.iterations
    assert opt.skipped_steps == straight_opt.skipped_steps


@pytest.mark.parametrize("cls_name", ["Adam", "Nadam", "SGD", "Ftrl", "Lamb", "Adafactor"])
def test_gpu_skipped_step_changes_nothing(cls_name):
    import cupy as cp

    rng = np.random.default_rng(6)
    params = fusedopt.FlatBuffer(cp.asarray(rng.normal(size=5000)), [(4000,), (1000,)])
    opt = getattr(fusedopt, cls_name)(skip_nonfinite=True, clipnorm=1.0)
    opt.apply(cp.asarray(rng.normal(size=5000)), params)
    before = [cp.asnumpy(params.data)] + [cp.asnumpy(s) for s in opt.slots().values()]
    for bad in (np.nan, np.inf, -np.inf):
        g = rng.normal(size=5000)
        g[4321] = bad
        opt.apply(cp.asarray(g), params)
        assert opt.last_step_skipped
    after = [cp.asnumpy(params.data)] + [cp.asnumpy(s) for s in opt.slots().values()]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert (opt.iterations, opt.skipped_steps) == (1, 3)


# ---------------------------------------------------------- the step state (issue 10)
def _state(opt, params):
    """Params and every slot, on the host (after the current stream's work)."""
    return [cuda.to_device(x, "cpu") for x in [params.data] + list(opt.slots().values())]


def _assert_same_bits(a, b, what):
    for k, (x, y) in enumerate(zip(a, b)):
        np.testing.assert_array_equal(x, y, err_msg=f"{what}, buffer {k}")


REPLAY_SHAPES = [(4000,), (7,), (0,), (1,), (90,)]


@pytest.mark.parametrize("n", [1, 3, 50])
@pytest.mark.parametrize("case", GRAPH_CASES, ids=case_ids(GRAPH_CASES))
def test_cuda_graph_replays_equal_eager_steps(case, n):
    import cupy as cp

    _, cls_name, kwargs = case
    size = sum(int(np.prod(s)) for s in REPLAY_SHAPES)
    rng = np.random.default_rng(n)
    init = rng.normal(size=size)
    steps = [rng.normal(size=size) * rng.uniform(0.1, 2.0) for _ in range(n)]
    eager_params = fusedopt.FlatBuffer(cp.asarray(init), REPLAY_SHAPES)
    graph_params = fusedopt.FlatBuffer(cp.asarray(init), REPLAY_SHAPES)
    eager = getattr(fusedopt, cls_name)(**kwargs)
    graphed = getattr(fusedopt, cls_name)(**kwargs)
    grads = cp.zeros(size)
    step = graphed.cuda_graph(grads, graph_params)
    for g in steps:
        grads[...] = cp.asarray(g)
        eager.apply(grads.copy(), eager_params)
        step()
    _assert_same_bits(_state(graphed, graph_params), _state(eager, eager_params),
                      f"{n} replays")
    assert graphed.iterations == eager.iterations == n // _accumulation(kwargs)


@pytest.mark.parametrize("cls_name,kwargs", [
    ("Adam", {"learning_rate": S.CosineDecay(0.05, 20, warmup_target=0.1, warmup_steps=5),
              "global_clipnorm": 1.0, "skip_nonfinite": True}),
    ("Nadam", {"learning_rate": S.ExponentialDecay(0.01, 3, 0.5, staircase=True),
               "clipnorm": 0.5, "weight_decay": 0.1, "skip_nonfinite": True}),
], ids=["adam-cosine-global-skip", "nadam-exponential-clipnorm-decay-skip"])
def test_cuda_graph_replays_with_schedules_skips_and_a_changed_hyperparameter(cls_name,
                                                                                kwargs):
    import cupy as cp

    size, shapes = 4098, [(4000,), (98,)]
    rng = np.random.default_rng(8)
    init = rng.normal(size=size).astype(np.float32)
    steps = [(rng.normal(size=size) * rng.uniform(0.1, 2.0)).astype(np.float32)
             for _ in range(25)]
    steps[3][7], steps[15][size - 1] = np.nan, np.inf
    cpu_params = fusedopt.FlatBuffer(init.copy(), shapes)
    graph_params = fusedopt.FlatBuffer(cp.asarray(init), shapes)
    cpu = getattr(fusedopt, cls_name)(**kwargs)
    graphed = getattr(fusedopt, cls_name)(**kwargs)
    grads = cp.zeros(size, dtype=np.float32)
    step = graphed.cuda_graph(grads, graph_params)
    for k, g in enumerate(steps):
        if k == 12:
            for opt in (cpu, graphed):
                opt.loss_scale_factor = 2.0
                opt._hyperparameters_changed("loss_scale_factor")  # issue 11: assignment
        grads[...] = cp.asarray(g)
        step()
        cpu.apply(g, cpu_params)
    for got, want in zip(_state(graphed, graph_params), _state(cpu, cpu_params)):
        assert_close(got, want, np.float32, "replays vs NumPy")
    assert (graphed.iterations, graphed.skipped_steps) == (cpu.iterations, cpu.skipped_steps)


def test_gpu_learning_rate_changed_after_a_skipped_step_is_used():
    import cupy as cp

    params = fusedopt.FlatBuffer(cp.full(5, -1.0), [(5,)])
    opt = fusedopt.SGD(0.1, skip_nonfinite=True)
    opt.apply(cp.ones(5), params)
    opt.apply(cp.full(5, np.nan), params)
    opt.learning_rate = 0.5
    opt.apply(cp.ones(5), params)
    np.testing.assert_allclose(cp.asnumpy(params.data), -1.6)
    assert (opt.iterations, opt.skipped_steps) == (2, 1)


def _offset(cp, array, offset):
    backing = cp.zeros(array.size + offset, dtype=array.dtype)  # 256-byte aligned
    out = backing[offset:]
    out[...] = cp.asarray(array)
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kwargs", [{}, {"global_clipnorm": 1.0}], ids=["plain", "global"])
def test_gpu_buffers_sharing_a_misalignment_give_the_same_bits(kwargs, dtype):
    import cupy as cp
    from fusedopt.flat import _span

    shapes = [(2**20 + 3,), (5,), (4099,)]
    size = sum(s[0] for s in shapes)
    rng = np.random.default_rng(2)
    init = rng.normal(size=size).astype(dtype)
    steps = [rng.normal(size=size).astype(dtype) for _ in range(3)]
    out = {}
    for name, (po, go, so) in {"aligned": (0, 0, 0), "common": (1, 1, 1),
                               "mixed": (1, 0, 0)}.items():
        params = fusedopt.FlatBuffer(_offset(cp, init, po), shapes)
        opt = fusedopt.Adam(**kwargs)
        opt.build(params)
        opt._slots = [None if x is None else _offset(cp, x, so) for x in opt._slots]
        opt._slot_spans = [_span(x) for x in opt._slots if x is not None]
        for g in steps:
            opt.apply(_offset(cp, g, go), params)
        out[name] = _state(opt, params)
    _assert_same_bits(out["common"], out["aligned"], "common misalignment")
    _assert_same_bits(out["mixed"], out["aligned"], "scalar path")


def test_gpu_clip_option_switched_between_steps():
    import cupy as cp

    shapes = [(3000,), (17,), (5000,)]
    size = 8017
    rng = np.random.default_rng(4)
    init = rng.normal(size=size)
    cpu_params = fusedopt.FlatBuffer(init.copy(), shapes)
    gpu_params = fusedopt.FlatBuffer(cp.asarray(init), shapes)
    cpu, gpu = fusedopt.Adam(clipnorm=0.3), fusedopt.Adam(clipnorm=0.3)
    for k in range(6):
        if k in (2, 4):
            for opt in (cpu, gpu):
                opt.clipnorm, opt.global_clipnorm = None, (0.7 if k == 2 else None)
                opt._hyperparameters_changed("global_clipnorm")  # issue 11: assignment
        g = rng.normal(size=size)
        cpu.apply(g, cpu_params)
        gpu.apply(cp.asarray(g), gpu_params)
        for got, want in zip(_state(gpu, gpu_params), _state(cpu, cpu_params)):
            assert_close(got, want, np.float64, f"step {k}")


def test_two_optimizers_on_two_streams():
    """Each optimizer has its own scratch and state: run concurrently on two streams,
    each gives what it gives alone; one optimizer moving between streams is ordered."""
    import cupy as cp

    shapes = [(2**20,), (77,)]
    size = 2**20 + 77
    kwargs = {"global_clipnorm": 0.5, "skip_nonfinite": True}
    rng = np.random.default_rng(6)
    inits = [rng.normal(size=size).astype(np.float32) for _ in range(2)]
    steps = [rng.normal(size=size).astype(np.float32) for _ in range(6)]
    steps[2][11] = np.nan
    alone = []
    for init in inits:
        params, opt = fusedopt.FlatBuffer(cp.asarray(init), shapes), fusedopt.Adam(**kwargs)
        for g in steps:
            opt.apply(cp.asarray(g), params)
        alone.append(_state(opt, params))
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
    pairs = [(fusedopt.FlatBuffer(cp.asarray(init), shapes), fusedopt.Adam(**kwargs))
             for init in inits]
    cp.cuda.Device().synchronize()
    for g in steps:
        for stream, (params, opt) in zip(streams, pairs):
            with stream:
                opt.apply(cp.asarray(g), params)
    for stream in streams:
        stream.synchronize()
    for expected, (params, opt) in zip(alone, pairs):
        _assert_same_bits(_state(opt, params), expected, "two streams")
    params, opt = fusedopt.FlatBuffer(cp.asarray(inits[0]), shapes), fusedopt.Adam(**kwargs)
    for k, g in enumerate(steps):
        with streams[k % 2]:
            opt.apply(cp.asarray(g), params)
    streams[1].synchronize()  # the last step's stream; it waited for the other's
    _assert_same_bits(_state(opt, params), alone[0], "one optimizer, two streams")


def test_sharded_optimizer_on_one_gpu_rank_with_nccl(tmp_path):
    """fusedopt.distributed's CuPy/NCCL path (DLPack, factors and the loss scale on the
    device) on a world of one rank: equal to the single-process CUDA step up to the
    order of the global norm's sum (the sharded step sums on CuPy, the kernels in
    their own order)."""
    torch = pytest.importorskip("torch")
    import datetime
    import torch.distributed as dist
    import cupy as cp
    from fusedopt import distributed

    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("torch without CUDA or NCCL")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    try:
        rng = np.random.default_rng(0)
        shapes = [(3, 4), (5,), (), (0,), (1,), (2, 1, 3)]
        arrays = [rng.normal(size=s) for s in shapes]
        grads = [rng.normal(size=(25,)).astype(np.float32) for _ in range(10)]
        grads[4][7] = np.inf
        kwargs = {"global_clipnorm": 1.0, "skip_nonfinite": True, "loss_scale_factor": 2.0}
        ours = fusedopt.FlatBuffer.from_arrays(arrays, dtype=np.float32).to("gpu")
        theirs = fusedopt.FlatBuffer.from_arrays(arrays, dtype=np.float32).to("gpu")
        sharded = distributed.ShardedOptimizer(fusedopt.Adam(**kwargs), ours)
        single = fusedopt.Adam(**kwargs)
        for g in grads:
            sharded.apply(cp.asarray(g))
            single.apply(cp.asarray(g), theirs)
        np.testing.assert_allclose(cp.asnumpy(ours.data), cp.asnumpy(theirs.data),
                                   rtol=1e-6, atol=1e-7)
        assert sharded.iterations == single.iterations == 9
        assert sharded.skipped_steps == 1
        # A LossScaleOptimizer: its scale kept on the device, halved by the inf.
        ours = fusedopt.FlatBuffer.from_arrays(arrays, dtype=np.float32).to("gpu")
        lso = distributed.ShardedOptimizer(
            fusedopt.LossScaleOptimizer(fusedopt.Adam(), initial_scale=4.0,
                                        dynamic_growth_steps=3), ours)
        for g in grads:
            lso.apply(cp.asarray(g))
        assert lso.skipped_steps == 1 and lso.dynamic_scale == 8.0  # 4 -> 8 -> 4 -> 8
    finally:
        dist.destroy_process_group()
# ---------------------------------------------------------------- mixed precision
def _mixed_cases():
    from conftest import PRECISION_RULES, PRECISIONS, RULE_CASES

    rules = {c[0]: c for c in RULE_CASES}
    for rule in PRECISION_RULES:
        for precision_case in PRECISIONS:
            yield pytest.param(rules[rule], precision_case,
                               id=f"{rule}-{precision_case[0]}")
    yield pytest.param(("adam+clipnorm", "Adam", {"clipnorm": 0.5, "loss_scale_factor": 4.0}),
                       PRECISIONS[1], id="adam-clipnorm-scale-bf16-master")
    # Keras' options on 16-bit buffers (kernels/options.cuh): bitwise, 8 calls of N = 3
    # (two updates, overwrites at the second); and an unscale of 1/3, a float32 scalar.
    options = {"use_ema": True, "ema_overwrite_frequency": 2, "ema_momentum": 0.8,
               "gradient_accumulation_steps": 3}
    for rule in ("adam", "sgd-momentum", "lion"):
        _, cls_name, kwargs = rules[rule]
        for precision_case in PRECISIONS:
            yield pytest.param((f"{rule}+ema+accumulate", cls_name, {**kwargs, **options}),
                               precision_case, id=f"{rule}-ema-accumulate-{precision_case[0]}")
    yield pytest.param(("adam+accumulate+clipnorm", "Adam",
                        {"gradient_accumulation_steps": 3, "clipnorm": 0.5}),
                       PRECISIONS[3], id="adam-accumulate-clipnorm-bf16-all")
    for precision_case in PRECISIONS[:3]:
        yield pytest.param(("sgd+loss_scale", "SGD", {"learning_rate": 1.0,
                                                       "loss_scale_factor": 3.0}),
                           precision_case, id=f"sgd-loss-scale-3-{precision_case[0]}")
    # Lamb's kernels (kernels/lamb.cu) on every precision: weight decay, and clipnorm
    # with a loss scale (its trust ratio is a norm sum: within one 16-bit spacing).
    for precision_case in PRECISIONS:
        yield pytest.param(("lamb+decay", "Lamb", {"learning_rate": 0.05,
                                                   "weight_decay": 0.1}),
                           precision_case, id=f"lamb-decay-{precision_case[0]}")
    for precision_case in PRECISIONS[1:4]:
        yield pytest.param(("lamb+clipnorm", "Lamb", {"learning_rate": 0.05, "clipnorm": 0.5,
                                                      "loss_scale_factor": 4.0}),
                           precision_case, id=f"lamb-clipnorm-{precision_case[0]}")
    # and with Keras' options (8 calls of N = 3, overwrites at the second update).
    for precision_case in PRECISIONS:
        yield pytest.param(("lamb+ema+accumulate", "Lamb", {"learning_rate": 0.05, **options}),
                           precision_case, id=f"lamb-ema-accumulate-{precision_case[0]}")


@pytest.mark.parametrize("case,precision_case", list(_mixed_cases()))
@pytest.mark.parametrize("n", [31, 4097, 2**20 + 3])
def test_gpu_mixed_precision_matches_numpy_every_step(case, precision_case, n):
    """bfloat16/float16 buffers, other grad dtypes, master weights, bfloat16 state and
    stochastic rounding on the GPU against the NumPy reference: bitwise where no norm
    is summed (the same float32 operations, rounded at the same points), else within
    one 16-bit spacing. Guard regions catch writes outside the 16-bit buffers."""
    import cupy as cp

    from conftest import dtype_of

    _, cls_name, kwargs = case
    _, param, grad, options = precision_case
    kwargs = {**kwargs, **options}
    exact = not (kwargs.get("clipnorm") or kwargs.get("global_clipnorm") or cls_name == "Lamb")
    rng = np.random.default_rng(n)
    layout = [(n - 20,), (7,), (0,), (1,), (12,)]
    init = rng.normal(size=n).astype(np.float32).astype(dtype_of(param))
    backing, data = guarded(cp, init)
    gpu_params = fusedopt.FlatBuffer(data, layout)
    ref_params = fusedopt.FlatBuffer(init.copy(), layout)
    gpu = getattr(fusedopt, cls_name)(**kwargs)
    ref = getattr(fusedopt, cls_name)(executor="numpy", **kwargs)
    rtol = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10, "float32": 2e-6}
    for step in range(8):
        g = (rng.normal(size=n) * 0.7).astype(np.float32).astype(dtype_of(grad))
        ref.apply(g, ref_params)
        gpu.apply(cp.asarray(g), gpu_params)
        pairs = [("params", gpu_params.data, ref_params.data)]
        pairs += [(s, gpu.slots()[s], ref.slots()[s]) for s in ref.slot_names]
        for name, a, b in pairs:
            a = cp.asnumpy(a)
            assert a.dtype == b.dtype, name
            if exact:
                np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8),
                                              err_msg=f"{name}, step {step}")
            else:
                tol = rtol[b.dtype.name]
                np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64),
                                           rtol=tol, atol=tol, err_msg=f"{name}, step {step}")
    assert_guards_intact(cp, backing, n)


# ============================================== fusedopt.torch, 16-bit models
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_torch_16_bit_model_on_the_gpu(dtype_name):
    """fusedopt.torch on a CUDA bfloat16/float16 model: the CuPy arrays alias the
    tensors (bfloat16 through its int16 view), the state tensors alias the CuPy slots,
    and 20 steps through autograd with GradScaler (an inf step included) stay within
    one spacing (normwise) of torch's fused AdamW; with master_weights=True the params
    are the float32 master rounded to nearest."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    import math

    import fusedopt.torch as ft

    dtype = getattr(torch, dtype_name)
    spacing = {"bfloat16": 2.0 ** -7, "float16": 2.0 ** -10}[dtype_name]
    device = torch.device("cuda:0")

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(),
                                   torch.nn.Linear(9, 4)).to(device, dtype)

    state = {"state_dtype": "bfloat16"} if dtype_name == "bfloat16" else {}
    models = [model(), model()]
    opts = [ft.AdamW(models[0].parameters(), lr=0.01, **state),
            torch.optim.AdamW(models[1].parameters(), lr=0.01, fused=True)]
    (flat,) = opts[0].flat_parameters
    assert flat.flat_params.device == "gpu:0"
    assert flat.flat_params.data.data.ptr == flat.data.data_ptr()
    assert flat.flat_grads.data.data.ptr == flat.grad.data_ptr()
    assert np.dtype(flat.flat_params.data.dtype).name == dtype_name
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0 ** 8) for _ in opts]
    for t in range(STEPS):
        g = torch.Generator().manual_seed(1000 + t)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 4, generator=g)
        for m, opt, scaler in zip(models, opts, scalers):
            opt.zero_grad()
            scaler.scale(((m(x.to(device, dtype)) - y.to(device, dtype)) ** 2).mean()).backward()
            if t == 4:
                next(m.parameters()).grad[0, 0] = math.inf
            scaler.step(opt)
            scaler.update()
        for p, q in zip(*(m.parameters() for m in models)):
            diff = float((p.detach().double() - q.detach().double()).abs().max())
            assert diff <= spacing * float(q.detach().double().abs().max()), (t, diff)
    p = next(models[0].parameters())
    slot = opts[0]._buckets[0].optimizer.slots()["momentum"]
    assert opts[0].state[p]["exp_avg"].data_ptr() == slot.data.ptr

    master_model = model()
    opt = ft.AdamW(master_model.parameters(), lr=0.01, master_weights=True)
    for t in range(5):
        opt.zero_grad()
        master_model(torch.randn(16, 6, device=device, dtype=dtype)).square().mean().backward()
        opt.step()
    for p in master_model.parameters():
        master = opt.state[p]["master"]
        assert master.dtype == torch.float32 and master.device == p.device
        assert torch.equal(master.to(dtype), p.detach())


@pytest.mark.parametrize("cls_name", ["Muon", "Adafactor"])
def test_gpu_own_kernel_rules_refuse_16_bit_buffers(cls_name):
    """Muon's and Adafactor's kernels take uniform float32/float64 storage only:
    bfloat16 CuPy buffers are refused at the first apply, naming them, with nothing
    built. (Lamb's take them: test_gpu_mixed_precision_matches_numpy_every_step.)"""
    import cupy as cp

    from conftest import dtype_of

    ones = np.ones(64, np.float32).astype(dtype_of("bfloat16"))
    params = fusedopt.FlatBuffer(cp.asarray(ones), [(8, 8)])
    opt = getattr(fusedopt, cls_name)()
    with pytest.raises(ValueError, match="bfloat16 params"):
        opt.apply(cp.asarray(ones), params)
    assert not opt.built


# ------------------------------------------- EMA, accumulation, LossScaleOptimizer
def test_gpu_options_and_loss_scale_match_numpy_with_poisoned_steps():
    """EMA with overwrites, gradient accumulation, clipnorm and a LossScaleOptimizer's
    dynamic scale (growth and backoff) on the device, against the NumPy executor;
    then swapping the EMA weights in and out on the device."""
    import cupy as cp

    shapes = [(300_001,), (5,), (0,), (4097,)]
    size = sum(int(np.prod(s)) for s in shapes)
    rng = np.random.default_rng(8)
    init = rng.normal(size=size).astype(np.float32)
    steps = [(rng.normal(size=size) * 64).astype(np.float32) for _ in range(16)]
    for k in (3, 9, 10):
        steps[k][k * 7] = np.inf

    def make(executor="auto"):
        return fusedopt.LossScaleOptimizer(
            fusedopt.Adam(use_ema=True, ema_overwrite_frequency=3, ema_momentum=0.8,
                          gradient_accumulation_steps=2, clipnorm=1.0, executor=executor),
            initial_scale=64.0, dynamic_growth_steps=2)

    cpu, gpu = make("numpy"), make()
    cpu_params = fusedopt.FlatBuffer(init.copy(), shapes)
    gpu_params = fusedopt.FlatBuffer(cp.asarray(init), shapes)
    for k, g in enumerate(steps):
        cpu.apply(g, cpu_params)
        gpu.apply(cp.asarray(g), gpu_params)
        assert gpu.executor_name == "cuda"
        assert (gpu.dynamic_scale, gpu.step_counter) == (cpu.dynamic_scale, cpu.step_counter)
        assert_close(cp.asnumpy(gpu_params.data), cpu_params.data, np.float32, f"step {k}")
        for name in cpu.slot_names:
            assert_close(cp.asnumpy(cp.asarray(gpu.slots()[name])), cpu.slots()[name],
                         np.float32, f"{name}, step {k}")
    assert (gpu.iterations, gpu.skipped_steps) == (cpu.iterations, cpu.skipped_steps)
    loss = cp.asarray(np.float32(0.5))
    assert float(gpu.scale_loss(loss)) == 0.5 * cpu.dynamic_scale
    trained = cp.asnumpy(gpu_params.data)
    with gpu.ema_weights(gpu_params):
        np.testing.assert_array_equal(cp.asnumpy(gpu_params.data),
                                      cp.asnumpy(gpu.slots()["average"]))
    np.testing.assert_array_equal(cp.asnumpy(gpu_params.data), trained)


@pytest.mark.parametrize("cls_name, kwargs", [
    ("Lamb", {"clipnorm": 0.5, "weight_decay": 0.1}),
    ("Adafactor", {"clipnorm": 1.0}),
    ("Muon", {"global_clipnorm": 1.0, "weight_decay": 0.1}),
    # Keras' options inside the wrapped rule (kernels/whole.cuh)
    ("Lamb", {"gradient_accumulation_steps": 2, "use_ema": True, "ema_overwrite_frequency": 3,
              "global_clipnorm": 1.0}),
    ("Adafactor", {"gradient_accumulation_steps": 3, "use_ema": True, "clipnorm": 1.0}),
    ("Muon", {"gradient_accumulation_steps": 2, "use_ema": True, "ema_overwrite_frequency": 2}),
], ids=["lamb", "adafactor", "muon", "lamb-accumulate-ema", "adafactor-accumulate-ema",
        "muon-accumulate-ema"])
def test_gpu_loss_scale_around_own_kernel_rules_matches_numpy(cls_name, kwargs):
    """A LossScaleOptimizer around Lamb, Adafactor and Muon: their own kernels unscale by
    the device's dynamic scale and grow or halve it (poisoned steps), in float64 within
    1e-10 of the NumPy executor after every call."""
    import cupy as cp

    shapes = [(300, 200), (5,), (3, 40, 50), (), (1000, 130)]
    size = sum(int(np.prod(s)) for s in shapes)
    rng = np.random.default_rng(9)
    init = rng.normal(size=size)
    steps = [rng.normal(size=size) * 64 for _ in range(16)]
    for k in (3, 9, 10):
        steps[k][k * 7] = np.nan if k % 2 else np.inf

    def make(executor="auto"):
        return fusedopt.LossScaleOptimizer(
            getattr(fusedopt, cls_name)(executor=executor, **kwargs),
            initial_scale=64.0, dynamic_growth_steps=2)

    cpu, gpu = make("numpy"), make()
    cpu_params = fusedopt.FlatBuffer(init.copy(), shapes)
    gpu_params = fusedopt.FlatBuffer(cp.asarray(init), shapes)
    scales = []
    for k, g in enumerate(steps):
        cpu.apply(g, cpu_params)
        gpu.apply(cp.asarray(g), gpu_params)
        assert gpu.executor_name == "cuda"
        assert (gpu.dynamic_scale, gpu.step_counter, gpu.iterations, gpu.skipped_steps) == \
            (cpu.dynamic_scale, cpu.step_counter, cpu.iterations, cpu.skipped_steps)
        np.testing.assert_allclose(cp.asnumpy(gpu_params.data), cpu_params.data, rtol=1e-10,
                                   atol=1e-10 * float(np.max(np.abs(cpu_params.data))),
                                   err_msg=f"step {k}")
        for name in cpu.slot_names:
            want = np.asarray(cpu.slots()[name])
            np.testing.assert_allclose(cp.asnumpy(cp.asarray(gpu.slots()[name])), want,
                                       rtol=1e-10,
                                       atol=1e-10 * float(np.max(np.abs(want), initial=0.0)),
                                       err_msg=f"{name}, step {k}")
        scales.append(gpu.dynamic_scale)
    assert max(scales) > 64.0 and any(b < a for a, b in zip(scales, scales[1:]))
    assert gpu.skipped_steps == 3


OWN_OPTION_SHAPES = [(300, 200), (5,), (3, 40, 50), (), (1000, 130), (20, 30)]
OWN_OPTION_NAMES = ["dense_kernel", "bias", "conv_kernel", "scale", "out_kernel", "skip_kernel"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cls_name, kwargs", OWN_KERNEL_OPTIONS,
                         ids=["lamb", "adafactor", "muon"])
def test_gpu_own_kernel_rules_with_options_match_numpy(cls_name, kwargs, dtype):
    """use_ema (with overwrites) and gradient accumulation in Lamb's, Adafactor's and
    Muon's own kernels (kernels/whole.cuh), with a norm clip of the accumulated mean and
    two skipped calls, against the NumPy executor after every call (float64 within
    1e-10); Lamb and Adafactor also as one captured step replayed every call, equal to
    the eager steps to the bit (the phase comes from the device's step state)."""
    import cupy as cp

    size = sum(int(np.prod(s)) for s in OWN_OPTION_SHAPES)
    rng = np.random.default_rng(10)
    init = rng.normal(size=size).astype(dtype)
    steps = [(rng.normal(size=size) * rng.uniform(0.2, 2.0)).astype(dtype) for _ in range(16)]
    steps[4][11], steps[9][size - 1] = np.nan, -np.inf
    rtol = {np.float64: 1e-10, np.float32: RTOL[np.float32]}[dtype]

    def make(data):
        params = fusedopt.FlatBuffer(data, OWN_OPTION_SHAPES, names=OWN_OPTION_NAMES)
        return getattr(fusedopt, cls_name)(**kwargs), params

    cpu, cpu_params = make(init.copy())
    gpu, gpu_params = make(cp.asarray(init))
    graphed, graph_params = make(cp.asarray(init))
    grads = cp.zeros(size, dtype=dtype)
    replay = graphed.cuda_graph(grads, graph_params) if cls_name != "Muon" else None
    for k, g in enumerate(steps):
        cpu.apply(g, cpu_params)
        gpu.apply(cp.asarray(g), gpu_params)
        if replay is not None:
            grads[...] = cp.asarray(g)
            replay()
            _assert_same_bits(_state(graphed, graph_params), _state(gpu, gpu_params),
                              f"replay {k}")
        assert gpu.executor_name == "cuda"
        assert (gpu.iterations, gpu.skipped_steps) == (cpu.iterations, cpu.skipped_steps)
        for got, want in zip(_state(gpu, gpu_params), [cpu_params.data] +
                             [np.asarray(s) for s in cpu.slots().values()]):
            np.testing.assert_allclose(got, want, rtol=rtol,
                                       atol=rtol * float(np.max(np.abs(want), initial=0.0)),
                                       err_msg=f"call {k}")
    n = kwargs["gradient_accumulation_steps"]
    assert (gpu.iterations, gpu.skipped_steps) == (14 // n, 2)


def test_gpu_loss_scale_step_never_synchronises():
    """A LossScaleOptimizer's step, captured: the scale is read and updated on the
    device (a host read would fail the capture); replays grow it."""
    import cupy as cp

    n = 100_003
    params = fusedopt.FlatBuffer(cp.asarray(np.linspace(-1, 1, n, dtype=np.float32)), [(n,)])
    grads = cp.asarray(np.random.default_rng(0).normal(size=n).astype(np.float32))
    opt = fusedopt.LossScaleOptimizer(fusedopt.Adam(), initial_scale=8.0,
                                      dynamic_growth_steps=1)
    opt.apply(grads, params)  # build and compile outside the capture
    assert opt.dynamic_scale == 16.0
    loss = cp.ones((), np.float32)
    assert float(opt.scale_loss(loss)) == 16.0  # and the memory pool holds its blocks
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        opt.apply(grads, params)
        scaled = opt.scale_loss(loss)
        graph = stream.end_capture()
    for _ in range(3):
        graph.launch(stream)
    stream.synchronize()
    assert opt.dynamic_scale == 128.0 and float(scaled) == 128.0
