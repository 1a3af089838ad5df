"""The GPU path's kernels and launch sequence, run on the CPU by an emulator.

fusedopt.cuda.StepPlan drives the real kernels of fused.cu and reduce.cu, compiled
for the host with tests/host/cuda_emulator.h, through the same launch code it uses
with CuPy. That covers tiling, the aligned and unaligned paths, per-segment and
global clip factors from the block reductions, skip_nonfinite bookkeeping and the
launch count of a step; only real-GPU effects (races, speed) are left to the GPU tests.
"""

import numpy as np
import pytest

import fusedopt
from fusedopt import _kernels
from conftest import KERNEL_CASES, case_ids, random_grads, random_params
from emulator import emulate

# Segments: several tiles long, odd, empty, scalar; 2100 is not a multiple of 4.
LAYOUT = [(2100,), (3, 7), (), (0,), (1,), (4500,), (33,)]
STEPS = 5
RTOL = {np.float64: 1e-12, np.float32: 2e-6}


@pytest.fixture
def libraries(emulator_libraries):
    return emulator_libraries


emulated = emulate


def assert_close(actual, desired, dtype, what):
    rtol = RTOL[dtype]
    scale = float(np.max(np.abs(desired[np.isfinite(desired)]), initial=0.0))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale, err_msg=what)


def run_pair(cls_name, kwargs, dtype, libraries, grads_list, layout=LAYOUT, misalign=False):
    """The same steps on the NumPy path and the emulated GPU path; compared each step."""
    init = random_params(layout, dtype, seed=11)
    ref_params = fusedopt.FlatBuffer.from_arrays(init)
    gpu_params = fusedopt.FlatBuffer.from_arrays(init)
    if misalign:  # one element in: 16-byte loads impossible, the scalar path runs
        backing = np.zeros(gpu_params.size + 1, dtype=dtype)
        backing[1:] = gpu_params.data
        gpu_params = fusedopt.FlatBuffer(backing[1:], gpu_params.shapes)
    ref = getattr(fusedopt, cls_name)(**kwargs)
    gpu = getattr(fusedopt, cls_name)(**kwargs)
    backend = emulated(gpu, gpu_params, libraries)
    step_pair(ref, gpu, ref_params, gpu_params, grads_list, dtype)
    return ref, gpu, backend, gpu_params


def step_pair(ref, gpu, ref_params, gpu_params, grads_list, dtype):
    """Each step's grads through both optimizers; params, every slot and the counts
    compared after each step."""
    for step, grads in enumerate(grads_list):
        g = fusedopt.FlatBuffer.from_arrays(grads).data
        ref.apply(g, ref_params)
        gpu.apply(g.copy(), gpu_params)
        assert_close(gpu_params.data, ref_params.data, dtype, f"params, step {step}")
        for name in ref.slot_names:
            assert_close(gpu.slots()[name], ref.slots()[name], dtype, f"{name}, step {step}")
        assert gpu.iterations == ref.iterations


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=case_ids(KERNEL_CASES))
def test_emulated_gpu_path_matches_numpy(libraries, case, dtype):
    _, cls_name, kwargs = case
    grads = random_grads(LAYOUT, dtype, seed=12, steps=STEPS, scale=0.8)
    run_pair(cls_name, kwargs, dtype, libraries, grads)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kwargs", [{}, {"clipnorm": 0.5}, {"global_clipnorm": 1.0}],
                         ids=["plain", "clipnorm", "global"])
def test_unaligned_buffers_take_the_scalar_path_with_the_same_bits(libraries, kwargs, dtype):
    grads = random_grads(LAYOUT, dtype, seed=13, steps=3)
    *_, aligned = run_pair("Adam", kwargs, dtype, libraries, grads)
    *_, unaligned = run_pair("Adam", kwargs, dtype, libraries, grads, misalign=True)
    np.testing.assert_array_equal(aligned.data, unaligned.data)


@pytest.mark.parametrize("kwargs,launches", [
    ({}, ["fusedopt_adam"]),
    ({"clipvalue": 0.1, "weight_decay": 0.1, "loss_scale_factor": 8.0}, ["fusedopt_adam"]),
    ({"clipnorm": 1.0}, ["fusedopt_sumsq", "fusedopt_clip_factors", "fusedopt_adam"]),
    ({"global_clipnorm": 1.0}, ["fusedopt_sumsq", "fusedopt_clip_factors", "fusedopt_adam"]),
    ({"skip_nonfinite": True}, ["fusedopt_sumsq", "fusedopt_skip_check", "fusedopt_adam"]),
    ({"skip_nonfinite": True, "clipnorm": 1.0},
     ["fusedopt_sumsq", "fusedopt_clip_factors", "fusedopt_skip_check", "fusedopt_adam"]),
])
def test_one_update_launch_per_step(libraries, kwargs, launches):
    """The update is one kernel; reductions run only when an option needs them."""
    params = fusedopt.FlatBuffer.from_arrays(random_params(LAYOUT, np.float32, seed=1))
    opt = fusedopt.Adam(**kwargs)
    backend = emulated(opt, params, libraries)
    backend.launches.clear()  # the build's writes of the step state
    opt.apply(params.zeros_like().data + 0.5, params)
    assert backend.launches == launches


def test_per_segment_factors_follow_their_tiles(libraries):
    """A large-norm segment is clipped, a small-norm one is not, even when both
    span several tiles and the blocks stride over them."""
    layout = [(9000,), (7000,)]
    params = fusedopt.FlatBuffer.from_arrays([np.zeros(s) for s in layout])
    opt = fusedopt.SGD(learning_rate=1.0, clipnorm=1.0)
    emulated(opt, params, libraries, sm_count=1)
    assert opt._plan.tiles.count > 4 and opt._plan.update_grid < opt._plan.tiles.count
    g = np.concatenate([np.full(9000, 1.0), np.full(7000, 1e-4)])  # norms 94.9 and 0.0084
    opt.apply(g, params)
    np.testing.assert_allclose(params.data[:9000], -1.0 / np.sqrt(9000), rtol=1e-13)
    np.testing.assert_allclose(params.data[9000:], -1e-4, rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cls_name,kwargs", [
    ("Adam", {"skip_nonfinite": True}),
    ("Nadam", {"skip_nonfinite": True, "global_clipnorm": 1.0}),
    ("SGD", {"skip_nonfinite": True, "momentum": 0.9, "clipnorm": 0.3,
             "learning_rate": fusedopt.schedules.ExponentialDecay(0.1, 2, 0.5)}),
    ("Lamb", {"skip_nonfinite": True, "clipnorm": 0.3, "weight_decay": 0.1}),
], ids=["adam", "nadam-global", "sgd-clipnorm-schedule", "lamb-clipnorm-decay"])
def test_skip_nonfinite_on_the_device_matches_numpy(libraries, cls_name, kwargs, dtype):
    """Skipped steps leave everything bitwise unchanged and later steps use the
    scalars of the device's own iteration count (bias corrections, schedules)."""
    grads = random_grads(LAYOUT, dtype, seed=14, steps=8)
    grads[2][0].flat[5] = np.nan
    grads[3][5].flat[100] = np.inf
    grads[5][1].flat[0] = -np.inf
    init = random_params(LAYOUT, dtype, seed=15)
    ref_params = fusedopt.FlatBuffer.from_arrays(init)
    gpu_params = fusedopt.FlatBuffer.from_arrays(init)
    ref = getattr(fusedopt, cls_name)(**kwargs)
    gpu = getattr(fusedopt, cls_name)(**kwargs)
    emulated(gpu, gpu_params, libraries)
    for step, step_grads in enumerate(grads):
        before = [gpu_params.data.copy()] + [s.copy() for s in gpu.slots().values()]
        g = fusedopt.FlatBuffer.from_arrays(step_grads).data
        ref.apply(g, ref_params)
        gpu.apply(g, gpu_params)
        skipped = step in (2, 3, 5)
        assert gpu.last_step_skipped == ref.last_step_skipped == skipped
        if skipped:
            after = [gpu_params.data] + list(gpu.slots().values())
            for a, b in zip(before, after):
                np.testing.assert_array_equal(a, b)
        assert_close(gpu_params.data, ref_params.data, dtype, f"params, step {step}")
    assert gpu.iterations == ref.iterations == 5
    assert gpu.skipped_steps == ref.skipped_steps == 3


def test_emulated_steps_are_deterministic(libraries):
    grads = random_grads(LAYOUT, np.float32, seed=16, steps=4)
    results = []
    for _ in range(2):
        *_, params = run_pair("Adam", {"global_clipnorm": 0.7}, np.float32, libraries, grads)
        results.append(params.data.copy())
    np.testing.assert_array_equal(results[0], results[1])


def test_state_dict_round_trip_through_the_device_counters(libraries):
    params = fusedopt.FlatBuffer.from_arrays([np.linspace(-1, 1, 50)])
    opt = fusedopt.Adam(skip_nonfinite=True)
    emulated(opt, params, libraries)
    opt.apply(np.full(50, 0.2), params)
    opt.apply(np.full(50, np.nan), params)
    state = opt.state_dict()
    assert (state["iterations"], state["skipped_steps"], state["last_step_skipped"]) == (1, 1, True)
    opt.apply(np.full(50, 0.2), params)
    opt.load_state_dict(state)
    assert (opt.iterations, opt.skipped_steps, opt.last_step_skipped) == (1, 1, True)
    assert opt._plan.read_state() == (1, 1, True)


# ------------------------------------------------------------------------ LAMB
LAMB = ["fusedopt_lamb_moments", "fusedopt_lamb_ratios", "fusedopt_lamb_apply"]


def device_iterations(plan):
    return int(np.frombuffer(plan.state.tobytes(), dtype=_kernels.STEP_STATE)[0]["iterations"])


@pytest.mark.parametrize("kwargs,launches", [
    ({}, LAMB),
    ({"clipnorm": 1.0}, ["fusedopt_sumsq", "fusedopt_clip_factors"] + LAMB),
    ({"skip_nonfinite": True}, ["fusedopt_sumsq", "fusedopt_skip_check"] + LAMB),
], ids=["plain", "clipnorm", "skip"])
def test_lamb_is_two_passes_and_advances_the_counters_once(libraries, kwargs, launches):
    """Two passes over the elements with the per-segment ratios between them; the
    device's iteration count moves once per step (only the last launch advances it)."""
    params = fusedopt.FlatBuffer.from_arrays(random_params(LAYOUT, np.float32, seed=1))
    opt = fusedopt.Lamb(**kwargs)
    backend = emulated(opt, params, libraries)
    for step in range(3):
        backend.launches.clear()
        opt.apply(params.zeros_like().data + 0.5, params)
        assert backend.launches == launches
        assert device_iterations(opt._plan) == opt.iterations == step + 1


def test_lamb_reads_and_writes_40_bytes_per_float32_element(libraries):
    """The bytes model of fusedopt/bench.py: pass 1 reads p, g, m, v and writes m, v;
    pass 2 reads p, m, v and writes p; nothing else touches an element."""
    layout = [(3000,), (5, 7), (1,)]
    params = fusedopt.FlatBuffer.from_arrays(random_params(layout, np.float32, seed=1))
    opt = fusedopt.Lamb()
    backend = emulated(opt, params, libraries)
    backend.reset_accesses()
    opt.apply(params.zeros_like().data + 0.5, params)
    n = params.size
    assert backend.count("load", 4, "fusedopt_lamb_moments") == 4 * n
    assert backend.count("store", 4, "fusedopt_lamb_moments") == 2 * n
    assert backend.count("load", 4, "fusedopt_lamb_apply") == 3 * n
    assert backend.count("store", 4, "fusedopt_lamb_apply") == n
    assert 4 * (backend.count("load", 4) + backend.count("store", 4)) == 40 * n


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_lamb_ratios_of_segments_over_many_tiles_and_few_blocks(libraries, dtype):
    """One block strides over every tile: each segment's norms are the sums of all its
    tiles, and a zero segment keeps the ratio 1 (Keras)."""
    layout = [(9000,), (7000,), (50,)]
    grads = random_grads(layout, dtype, seed=17, steps=3)
    init = random_params(layout, dtype, seed=18)
    init[2][:] = 0  # ||p|| = 0: the ratio is 1
    ref_params, gpu_params = (fusedopt.FlatBuffer.from_arrays(init) for _ in range(2))
    ref, gpu = fusedopt.Lamb(learning_rate=0.01), fusedopt.Lamb(learning_rate=0.01)
    emulated(gpu, gpu_params, libraries, sm_count=1, blocks_per_sm=1)
    assert gpu._plan.update_grid == 1 and gpu._plan.tiles.count > 6
    for step, g in enumerate(grads):
        g = fusedopt.FlatBuffer.from_arrays(g).data
        ref.apply(g, ref_params)
        gpu.apply(g.copy(), gpu_params)
        assert_close(gpu_params.data, ref_params.data, dtype, f"params, step {step}")


@pytest.mark.parametrize("kwargs", [
    {"clipnorm": 0.5},
    # a call that only accumulates takes fused.cu's vector path where the buffers allow
    # (kernels/whole.cuh, whole_accumulate), the scalar one otherwise
    {"clipnorm": 0.5, "gradient_accumulation_steps": 2, "use_ema": True,
     "ema_overwrite_frequency": 1},
], ids=["clipnorm", "clipnorm-accumulate-ema"])
def test_lamb_bits_do_not_depend_on_the_buffers_alignment(libraries, kwargs):
    grads = random_grads(LAYOUT, np.float32, seed=13, steps=4)
    ref, gpu, _, aligned = run_pair("Lamb", kwargs, np.float32, libraries, grads)
    _, other, _, unaligned = run_pair("Lamb", kwargs, np.float32, libraries, grads,
                                      misalign=True)
    np.testing.assert_array_equal(aligned.data, unaligned.data)
    for name in ref.slot_names:
        np.testing.assert_array_equal(gpu.slots()[name], other.slots()[name], err_msg=name)


# ------------------------------------------------------------------------ Muon
# Matrices of several tiles, tall and wide, an excluded one, an embedding, vectors.
MUON_LAYOUT = [(60, 50), (7,), (130, 40), (3, 7), (), (20, 30), (5, 4)]
MUON_NAMES = ["dense_kernel", "bias", "out_kernel", "token_embedding", "scale", "skip_kernel",
              "tiny"]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kwargs", [
    {},
    {"nesterov": False, "rms_rate": None, "ns_steps": 3, "weight_decay": 0.1,
     "adam_weight_decay": None, "clipnorm": 0.5},
    {"exclude_layers": ["^skip"], "skip_nonfinite": True, "global_clipnorm": 1.0,
     "loss_scale_factor": 4.0},
    {"exclude_layers": ["^skip"], "skip_nonfinite": True, "clipnorm": 0.5,
     "gradient_accumulation_steps": 2, "use_ema": True, "ema_overwrite_frequency": 2},
], ids=["defaults", "plain-clipnorm", "excluded-global-skip", "excluded-accumulate-ema-skip"])
def test_muon_matrices_match_numpy(libraries, kwargs, dtype):
    grads = random_grads(MUON_LAYOUT, dtype, seed=21, steps=5)
    grads[2][1].flat[3] = np.nan  # skipped with skip_nonfinite, propagates otherwise
    init = random_params(MUON_LAYOUT, dtype, seed=22)
    ref_params, gpu_params = (fusedopt.FlatBuffer.from_arrays(init, names=MUON_NAMES)
                              for _ in range(2))
    ref, gpu = fusedopt.Muon(**kwargs), fusedopt.Muon(**kwargs)
    emulated(gpu, gpu_params, libraries, sm_count=1, blocks_per_sm=2)
    adamw = [gpu.uses_adamw(i, s) for i, s in enumerate(MUON_LAYOUT)]
    assert adamw[3] and not adamw[0] and not adamw[2] and adamw[5] == ("exclude_layers" in kwargs)
    step_pair(ref, gpu, ref_params, gpu_params, grads, dtype)
    assert (gpu.iterations, gpu.skipped_steps) == (ref.iterations, ref.skipped_steps)


def test_muon_is_two_launches_around_the_matrix_products(libraries):
    """Moments, the matrix products (not kernels of ours), apply; the counters move
    once per step. Bytes per float32 element: AdamW segments 28 (Adam's), Muon
    segments 20 + 12 = 32."""
    params = fusedopt.FlatBuffer.from_arrays(random_params(MUON_LAYOUT, np.float32, seed=1),
                                             names=MUON_NAMES)
    opt = fusedopt.Muon()
    backend = emulated(opt, params, libraries)
    adamw = sum(int(np.prod(s)) for i, s in enumerate(MUON_LAYOUT) if opt.uses_adamw(i, s))
    muon = params.size - adamw
    for step in range(2):
        backend.launches.clear()
        backend.reset_accesses()
        opt.apply(params.zeros_like().data + 0.5, params)
        assert backend.launches == ["fusedopt_muon_moments", "fusedopt_muon_apply"]
        assert device_iterations(opt._plan) == opt.iterations == step + 1
        assert backend.count("load", 4, "fusedopt_muon_moments") == 4 * adamw + 3 * muon
        assert backend.count("store", 4, "fusedopt_muon_moments") == 3 * adamw + 2 * muon
        assert backend.count("load", 4, "fusedopt_muon_apply") == 2 * muon
        assert backend.count("store", 4, "fusedopt_muon_apply") == muon


def test_muon_capture_is_refused_before_anything_changes(libraries):
    params = fusedopt.FlatBuffer.from_arrays(random_params(MUON_LAYOUT, np.float32, seed=1))
    opt = fusedopt.Muon()
    emulated(opt, params, libraries)
    before = params.data.copy()
    with pytest.raises(RuntimeError, match="cannot be captured"):
        opt.cuda_graph(params.zeros_like().data + 0.5, params)
    np.testing.assert_array_equal(params.data, before)
    assert opt.iterations == device_iterations(opt._plan) == 0


def test_muon_hyperparameters_set_between_steps_reach_the_kernels(libraries):
    """exclude_embeddings and rms_rate decide each segment's step and scale."""
    grads = random_grads(MUON_LAYOUT, np.float64, seed=23, steps=4)
    init = random_params(MUON_LAYOUT, np.float64, seed=24)
    ref_params, gpu_params = (fusedopt.FlatBuffer.from_arrays(init, names=MUON_NAMES)
                              for _ in range(2))
    ref, gpu = fusedopt.Muon(), fusedopt.Muon()
    emulated(gpu, gpu_params, libraries)
    for step, g in enumerate(grads):
        if step == 2:
            for opt in (ref, gpu):
                opt.exclude_embeddings = False
                opt.rms_rate = 0.5
        g = fusedopt.FlatBuffer.from_arrays(g).data
        ref.apply(g, ref_params)
        gpu.apply(g.copy(), gpu_params)
        assert_close(gpu_params.data, ref_params.data, np.float64, f"params, step {step}")


# ------------------------------------------------------------------- Adafactor
# Factored segments: rows longer than a block (3, 700), tall (130, 40) and wide, rank 3,
# a column (300, 1) and a row (1, 300), and empty ones (0, 3), (4, 0) (Keras' mean over
# nothing: NaN statistics); unfactored vectors and a scalar.
ADAFACTOR_LAYOUT = [(3, 700), (7,), (130, 40), (2, 3, 5), (0, 3), (), (300, 1), (4, 0),
                    (1, 300), (33,)]
# The element passes (MOMENTS, RMS, APPLY) are one kernel, launched three times.
ADAFACTOR = ["fusedopt_adafactor_pass", "fusedopt_adafactor_rows",
             "fusedopt_adafactor_columns", "fusedopt_adafactor_pass",
             "fusedopt_adafactor_scales", "fusedopt_adafactor_pass"]
# float64 within 1e-10 of the NumPy executor over the steps (the sums are added in
# another order); float32 as for every other rule.
ADAFACTOR_RTOL = {np.float64: 1e-10, np.float32: RTOL[np.float32]}


def adafactor_pair(kwargs, dtype, make_gpu, steps=5, seed=31):
    """Adafactor on the NumPy executor and on `make_gpu(opt, params)`'s, compared every
    step: params and every slot (r, c, velocity), NaN where NumPy has NaN."""
    grads = random_grads(ADAFACTOR_LAYOUT, dtype, seed=seed, steps=steps)
    grads[2][2].flat[3] = np.nan  # skipped with skip_nonfinite, propagates otherwise
    init = random_params(ADAFACTOR_LAYOUT, dtype, seed=seed + 1)
    ref_params, gpu_params = (fusedopt.FlatBuffer.from_arrays(init) for _ in range(2))
    ref, gpu = fusedopt.Adafactor(**kwargs), fusedopt.Adafactor(**kwargs)
    ref.executor = "numpy"
    make_gpu(gpu, gpu_params)
    rtol = ADAFACTOR_RTOL[dtype]
    for step, g in enumerate(grads):
        g = fusedopt.FlatBuffer.from_arrays(g).data
        with np.errstate(invalid="ignore"):
            ref.apply(g, ref_params)
        gpu.apply(g.copy(), gpu_params)
        pairs = [("params", gpu_params.data, ref_params.data)]
        pairs += [(n, gpu.slots()[n], ref.slots()[n]) for n in ref.slot_names]
        for name, a, b in pairs:
            finite = b[np.isfinite(b)]
            scale = float(np.max(np.abs(finite), initial=0.0))
            np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * scale,
                                       err_msg=f"{name}, step {step}")
    assert (gpu.iterations, gpu.skipped_steps) == (ref.iterations, ref.skipped_steps)
    return ref, gpu


ADAFACTOR_OPTIONS = [
    {},
    {"learning_rate": 0.05, "beta_2_decay": -0.5, "epsilon_1": 1e-3, "epsilon_2": 0.1,
     "clip_threshold": 0.5, "relative_step": False, "clipnorm": 0.5, "weight_decay": 0.1},
    {"skip_nonfinite": True, "global_clipnorm": 1.0, "loss_scale_factor": 4.0,
     "clipvalue": None, "learning_rate": fusedopt.schedules.CosineDecay(0.01, 10)},
    {"clipvalue": 0.3, "coupled_weight_decay": 0.01, "maximize": True,
     "segment_attributes": {"lr_multipliers": [1, 0.5, 1, 2, 1, 1, 1, 1, 3, 1],
                            "decay": [True, False] * 5}, "weight_decay": 0.05},
    {"gradient_accumulation_steps": 2, "use_ema": True, "ema_overwrite_frequency": 1,
     "clipnorm": 0.5, "skip_nonfinite": True, "loss_scale_factor": 4.0},
]
ADAFACTOR_IDS = ["defaults", "all-clipnorm-decay", "skip-global-scale-schedule",
                 "clipvalue-coupled-maximize-segments", "accumulate-ema-clipnorm-skip"]


def on_host(opt, params):
    opt.executor = "host"
    opt.build(params)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kwargs", ADAFACTOR_OPTIONS, ids=ADAFACTOR_IDS)
@pytest.mark.parametrize("executor", ["emulated", "host"])
def test_adafactor_matrices_match_numpy(libraries, executor, kwargs, dtype):
    """The emulated GPU path with few blocks striding over many tiles, rows and
    columns; the host executor (kernels/adafactor_host.cpp) on the same layout."""
    adafactor_pair(kwargs, dtype, on_host if executor == "host" else lambda opt, params:
                   emulated(opt, params, libraries, sm_count=1, blocks_per_sm=2))


def test_adafactor_is_six_launches_and_moves_44_or_32_bytes_per_float32_element(libraries):
    """The launch sequence (the element-pass kernel three times), one counter advance per
    step, and the bytes model of
    fusedopt/bench.py, element accesses counted per kernel: a factored element is read
    and written 11 times (4 bytes each), an unfactored one 8 times."""
    params = fusedopt.FlatBuffer.from_arrays(random_params(ADAFACTOR_LAYOUT, np.float32, 1))
    opt = fusedopt.Adafactor()
    backend = emulated(opt, params, libraries)
    f = sum(int(np.prod(s)) for s in ADAFACTOR_LAYOUT if len(s) >= 2)
    u = params.size - f
    for step in range(2):
        backend.launches.clear()
        backend.reset_accesses()
        opt.apply(params.zeros_like().data + 0.5, params)
        assert backend.launches == ADAFACTOR
        assert device_iterations(opt._plan) == opt.iterations == step + 1
        counts = {name: (backend.count("load", 4, name), backend.count("store", 4, name))
                  for name in ADAFACTOR}
        n = f + u
        assert counts == {
            # MOMENTS: p, g, unfactored v; v (or G). RMS: p, g. APPLY: p, g, unfactored v;
            # p, factored v.
            "fusedopt_adafactor_pass": ((2 * n + u) + 2 * f + (2 * n + u), n + (n + f)),
            "fusedopt_adafactor_rows": (f, 0), "fusedopt_adafactor_columns": (f, 0),  # G
            "fusedopt_adafactor_scales": (0, 0)}
        total = 4 * sum(a + b for a, b in counts.values())
        assert total == 44 * f + 32 * u


def test_adafactor_skipped_steps_and_graph_replays(libraries):
    """A skipped step writes nothing in any of the six kernels, and a captured step
    replays as the next step (the counters, rho and beta come from the device)."""
    layout = ADAFACTOR_LAYOUT
    init = random_params(layout, np.float64, seed=5)
    params = fusedopt.FlatBuffer.from_arrays(init)
    ref_params = fusedopt.FlatBuffer.from_arrays(init)
    opt = fusedopt.Adafactor(skip_nonfinite=True)
    ref = fusedopt.Adafactor(skip_nonfinite=True, executor="numpy")
    emulated(opt, params, libraries)
    grads = params.zeros_like().data
    graph = opt.cuda_graph(grads, params)
    for step, g in enumerate(random_grads(layout, np.float64, seed=6, steps=4)):
        g = fusedopt.FlatBuffer.from_arrays(g).data
        if step == 1:
            g[5] = np.inf
        before = [params.data.copy()] + [s.copy() for s in opt.slots().values()]
        grads[...] = g
        graph()
        ref.apply(g, ref_params)
        if step == 1:
            for a, b in zip(before, [params.data] + list(opt.slots().values())):
                np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(params.data, ref_params.data, rtol=1e-12, atol=1e-14)
    assert (opt.iterations, opt.skipped_steps) == (ref.iterations, ref.skipped_steps) == (3, 1)


@pytest.mark.parametrize("first,second", [("numpy", "host"), ("host", "emulated"),
                                          ("emulated", "numpy")])
def test_adafactor_checkpoints_move_between_executors(libraries, tmp_path, first, second):
    """A checkpoint written by one executor loads into another and the run goes on as
    if it had never moved: r and c are the NumPy executor's flat slots everywhere."""
    from fusedopt import checkpoint

    layout = ADAFACTOR_LAYOUT
    init = random_params(layout, np.float64, seed=7)
    grads = [fusedopt.FlatBuffer.from_arrays(g).data
             for g in random_grads(layout, np.float64, seed=8, steps=6)]

    def on(executor, opt, params):
        if executor == "emulated":
            emulated(opt, params, libraries)
        else:
            opt.executor = executor
            opt.build(params)
        return opt

    straight_params = fusedopt.FlatBuffer.from_arrays(init)
    straight = on("numpy", fusedopt.Adafactor(weight_decay=0.01), straight_params)
    params = fusedopt.FlatBuffer.from_arrays(init)
    opt = on(first, fusedopt.Adafactor(weight_decay=0.01), params)
    for g in grads[:3]:
        with np.errstate(invalid="ignore"):
            straight.apply(g, straight_params)
        opt.apply(g.copy(), params)
    path = tmp_path / "adafactor.safetensors"
    checkpoint.save(path, opt, params)
    moved_params = fusedopt.FlatBuffer.from_arrays(init)
    moved = on(second, fusedopt.Adafactor(weight_decay=0.01), moved_params)
    checkpoint.load(path, optimizer=moved, params=moved_params)
    assert moved.iterations == 3
    for g in grads[3:]:
        with np.errstate(invalid="ignore"):
            straight.apply(g, straight_params)
        moved.apply(g.copy(), moved_params)
    np.testing.assert_allclose(moved_params.data, straight_params.data, rtol=1e-10, atol=1e-13)
    for name in straight.slot_names:
        np.testing.assert_allclose(moved.slots()[name], straight.slots()[name], rtol=1e-10,
                                   atol=1e-13, err_msg=name)
