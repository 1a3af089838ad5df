"""LossScaleOptimizer: Keras parity (params, slots, scale, counter, iterations, with
skipped steps), validation, config round trips (its own and Keras'), state_dict and
checkpoints, the host executor, and refusals that change nothing."""

import os

import numpy as np
import pytest

import fusedopt
from conftest import random_grads, random_params
from fusedopt import FlatBuffer, LossScaleOptimizer

LAYOUT = [(3, 4), (5,), (), (2, 1, 3)]
# Steps whose gradients hold an inf or NaN: the scale halves, nothing else changes.
POISONED = {2, 7, 8}


def poisoned_grads(dtype, steps, seed=2, scale=1.0):
    out = []
    for step, grads in enumerate(random_grads(LAYOUT, dtype, seed, steps, scale=scale)):
        if step in POISONED:
            grads[0] = grads[0].copy()
            grads[0][1, 2] = np.nan if step % 2 else np.inf
        out.append(grads)
    return out


def bits(a):
    return np.asarray(a).view(np.uint8).tobytes()


# ------------------------------------------------------------------- Keras parity
@pytest.fixture
def keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":  # pragma: no cover - depends on the environment
        pytest.skip("parity tests use Keras' JAX backend")
    return keras


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("inner_kwargs", [
    {}, {"clipnorm": 1.0, "weight_decay": 0.1},
    # the scale in the step state with Keras' other options (the host executor's)
    {"use_ema": True, "ema_overwrite_frequency": 3, "gradient_accumulation_steps": 2,
     "clipnorm": 1.0},
], ids=["adam", "adam-clipnorm-decay", "adam-ema-accumulate-clipnorm"])
def test_matches_keras(keras, dtype, inner_kwargs):
    """Keras' stateful LossScaleOptimizer.apply leaks JAX tracers, so Keras runs
    through its compiled stateless_apply, the path of its own JAX trainer."""
    from test_keras_parity import keras_stepper

    old = keras.config.floatx()
    keras.config.set_floatx(np.dtype(dtype).name)
    try:
        steps = 14
        init = random_params(LAYOUT, dtype, seed=1)
        grads = poisoned_grads(dtype, steps, scale=64.0)  # gradients of a scaled loss
        kvars = [keras.Variable(w.copy()) for w in init]
        kopt = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(**inner_kwargs),
                                                   initial_scale=64.0, dynamic_growth_steps=3)
        keras_apply = keras_stepper(kopt, kvars, compiled=True)
        flat = FlatBuffer.from_arrays(init)
        fopt = LossScaleOptimizer(fusedopt.Adam(**inner_kwargs), initial_scale=64.0,
                                  dynamic_growth_steps=3)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)
        for step, g in enumerate(grads):
            keras_apply(g)
            fopt.apply(FlatBuffer.from_arrays(g), flat)
            for ours, theirs in zip(flat.views(), kvars):
                np.testing.assert_allclose(ours, np.asarray(theirs.value), **tol,
                                           err_msg=f"step {step}")
            assert fopt.dynamic_scale == float(kopt.dynamic_scale.value)
            assert fopt.step_counter == int(kopt.step_counter.value)
            assert fopt.iterations == int(kopt.iterations)
        assert fopt.skipped_steps == len(POISONED)
        for name, attr in (("momentum", "_momentums"), ("velocity", "_velocities")):
            theirs = np.concatenate([np.ravel(v.value) for v in
                                     getattr(kopt.inner_optimizer, attr)])
            np.testing.assert_allclose(fopt.slots()[name], theirs, **tol)
    finally:
        keras.config.set_floatx(old)


def test_keras_config_and_instance_build_the_same_wrapper(keras):
    kopt = keras.optimizers.LossScaleOptimizer(keras.optimizers.Nadam(learning_rate=0.01),
                                               initial_scale=128.0, dynamic_growth_steps=7)
    for identifier in (kopt, {"class_name": "LossScaleOptimizer", "config": kopt.get_config()}):
        opt = fusedopt.get(identifier)
        assert isinstance(opt, LossScaleOptimizer)
        assert isinstance(opt.inner_optimizer, fusedopt.Nadam)
        assert opt.inner_optimizer.get_config()["learning_rate"] == pytest.approx(0.01)
        assert (opt.initial_scale, opt.dynamic_growth_steps) == (128.0, 7)


# ------------------------------------------------------------- the scale rules
def test_growth_and_backoff_by_hand():
    opt = LossScaleOptimizer(fusedopt.SGD(learning_rate=0.5), initial_scale=4.0,
                             dynamic_growth_steps=2)
    p = FlatBuffer.from_arrays([np.ones(2)])
    expected = [  # (gradient, scale after, counter after, p after)
        (4.0, 4.0, 1, 0.5),     # g/4 = 1: p = 1 - 0.5
        (8.0, 8.0, 0, -0.5),    # second finite step in a row: the scale doubles
        (np.inf, 4.0, 0, -0.5),  # skipped: halved, nothing else changes
        (4.0, 4.0, 1, -1.0),
    ]
    for g, scale, counter, value in expected:
        opt.apply(np.full(2, g), p)
        assert (opt.dynamic_scale, opt.step_counter) == (scale, counter)
        np.testing.assert_array_equal(p.data, [value, value])
    assert (opt.iterations, opt.skipped_steps, opt.last_step_skipped) == (3, 1, False)
    assert opt.scale_loss(3.0) == 12.0


def test_scale_is_float32_and_a_skipped_step_changes_nothing_else():
    opt = LossScaleOptimizer(fusedopt.Adam(), initial_scale=0.1)
    assert opt.dynamic_scale == float(np.float32(0.1))
    p = FlatBuffer.from_arrays(random_params(LAYOUT, np.float32, 3))
    opt.apply(FlatBuffer.from_arrays(random_grads(LAYOUT, np.float32, 4, 1)[0]), p)
    before = [bits(p.data)] + [bits(s) for n, s in opt.slots().items() if n != "dynamic_scale"]
    bad = p.full_like(np.nan)
    opt.apply(bad, p)
    after = [bits(p.data)] + [bits(s) for n, s in opt.slots().items() if n != "dynamic_scale"]
    assert before[:-1] == after[:-1]  # params and every inner slot; the counter reset to 0
    assert opt.step_counter == 0 and opt.iterations == 1
    assert opt.dynamic_scale == float(np.float32(0.1) * np.float32(0.5))


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("kwargs, error, match", [
    ({"dynamic": False}, ValueError, "dynamic"),
    ({"clipnorm": 1.0}, ValueError, "clipnorm"),
    ({"use_ema": True}, ValueError, "use_ema"),
    ({"loss_scale_factor": 2.0}, ValueError, "loss_scale_factor"),
    ({"foo": 1}, ValueError, "foo"),
    ({"initial_scale": 0.0}, ValueError, "initial_scale"),
    ({"initial_scale": float("inf")}, ValueError, "initial_scale"),
    ({"initial_scale": "8"}, TypeError, "initial_scale"),
    ({"dynamic_growth_steps": 0}, ValueError, "dynamic_growth_steps"),
    ({"dynamic_growth_steps": 2.5}, TypeError, "dynamic_growth_steps"),
    ({"name": 3}, TypeError, "name"),
])
def test_bad_arguments_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        LossScaleOptimizer(fusedopt.Adam(), **kwargs)


def test_base_arguments_at_their_defaults_are_accepted():
    """What a Keras config of the wrapper may hold."""
    LossScaleOptimizer(fusedopt.Adam(), clipnorm=None, use_ema=False, ema_momentum=0.99)


@pytest.mark.parametrize("inner, error, match", [
    ("adam", TypeError, "inner_optimizer"),
    (None, TypeError, "inner_optimizer"),
    (LossScaleOptimizer(fusedopt.Adam()), TypeError, "inner_optimizer"),
    (fusedopt.Adam(loss_scale_factor=4.0), ValueError, "loss_scale_factor"),
])
def test_bad_inner_optimizer_refused(inner, error, match):
    with pytest.raises(error, match=match):
        LossScaleOptimizer(inner)


def test_an_inner_optimizer_that_stepped_without_skipping_is_refused():
    inner = fusedopt.Adam()
    inner.apply(np.ones(2), FlatBuffer.from_arrays([np.ones(2)]))
    with pytest.raises(ValueError, match="skip_nonfinite"):
        LossScaleOptimizer(inner)
    stepped = fusedopt.Adam(skip_nonfinite=True)
    stepped.apply(np.ones(2), FlatBuffer.from_arrays([np.ones(2)]))
    assert LossScaleOptimizer(stepped).iterations == 1


def test_bad_grads_change_nothing_not_even_the_scale():
    opt = LossScaleOptimizer(fusedopt.Adam(), initial_scale=16.0, dynamic_growth_steps=1)
    p = FlatBuffer.from_arrays([np.ones(3)])
    opt.apply(np.ones(3), p)
    state = opt.state_dict()
    for bad in (np.ones(4), np.ones(3, np.float32), [1.0, 1.0, 1.0]):
        with pytest.raises((TypeError, ValueError)):
            opt.apply(bad, p)
    assert opt.dynamic_scale == 32.0 and opt.state_dict()["iterations"] == state["iterations"]
    assert opt.inner_optimizer.loss_scale_factor is None


# ------------------------------------------------------- config, state, checkpoints
def test_config_round_trip_and_get():
    opt = LossScaleOptimizer(fusedopt.Adam(learning_rate=fusedopt.schedules.ExponentialDecay(
        0.1, 5, 0.5), amsgrad=True), initial_scale=32.0, dynamic_growth_steps=5, name="lso")
    config = opt.get_config()
    for rebuilt in (LossScaleOptimizer.from_config(config),
                    fusedopt.get({"class_name": "LossScaleOptimizer", "config": config})):
        assert isinstance(rebuilt, LossScaleOptimizer) and rebuilt.get_config() == config
    assert "lossscaleoptimizer" not in fusedopt.available()


def run(opt, params, grads):
    for g in grads:
        opt.apply(FlatBuffer.from_arrays(g), params)


@pytest.mark.parametrize("ext", ["npz", "safetensors"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_checkpoint_resume_is_bitwise_exact(tmp_path, dtype, ext):
    grads = poisoned_grads(dtype, 12, scale=16.0)

    def make():
        return LossScaleOptimizer(fusedopt.Nadam(clipnorm=1.0), initial_scale=16.0,
                                  dynamic_growth_steps=2)

    straight, straight_params = make(), FlatBuffer.from_arrays(random_params(LAYOUT, dtype, 1))
    run(straight, straight_params, grads)
    opt, params = make(), FlatBuffer.from_arrays(random_params(LAYOUT, dtype, 1))
    run(opt, params, grads[:8])
    fusedopt.save(tmp_path / f"lso.{ext}", opt, params)
    loaded, loaded_params = fusedopt.load(tmp_path / f"lso.{ext}")
    assert isinstance(loaded, LossScaleOptimizer)
    assert (loaded.dynamic_scale, loaded.step_counter) == (opt.dynamic_scale, opt.step_counter)
    run(loaded, loaded_params, grads[8:])
    assert bits(loaded_params.data) == bits(straight_params.data)
    for name, buf in straight.slots().items():
        assert bits(loaded.slots()[name]) == bits(buf), name
    assert (loaded.iterations, loaded.skipped_steps) == (straight.iterations, straight.skipped_steps)


def test_state_dict_round_trip_and_refusals():
    opt = LossScaleOptimizer(fusedopt.Adam(), initial_scale=8.0)
    p = FlatBuffer.from_arrays([np.ones(3)])
    run(opt, p, [[np.full(3, 8.0)], [np.full(3, np.inf)]])
    state = opt.state_dict()
    assert state["slots"]["dynamic_scale"].dtype == np.float32
    fresh = LossScaleOptimizer(fusedopt.Adam(), initial_scale=8.0)
    fresh.load_state_dict(state)
    assert (fresh.dynamic_scale, fresh.iterations, fresh.skipped_steps) == (4.0, 1, 1)
    bad_scale = dict(state, slots={**state["slots"], "dynamic_scale": np.array([4.0])})
    missing = dict(state, slots={k: v for k, v in state["slots"].items() if k != "step_counter"})
    other = dict(state, optimizer="adam")
    for bad in (bad_scale, missing, other, "state"):
        with pytest.raises((TypeError, ValueError)):
            fresh.load_state_dict(bad)
    assert fresh.dynamic_scale == 4.0


def test_host_executor_steps_like_the_numpy_executor():
    from fusedopt import host

    try:
        host.library("adam", np.float64)
    except host.HostBuildError as e:
        pytest.skip(f"no host build here: {e}")
    grads = poisoned_grads(np.float64, 10, scale=4.0)
    results = []
    for executor in ("host", "numpy"):
        opt = LossScaleOptimizer(fusedopt.Adam(executor=executor), initial_scale=4.0,
                                 dynamic_growth_steps=2)
        params = FlatBuffer.from_arrays(random_params(LAYOUT, np.float64, 1))
        run(opt, params, grads)
        assert opt.executor_name == executor
        results.append((bits(params.data), opt.dynamic_scale, opt.iterations))
    assert results[0] == results[1]


OWN_RULES = [("Lamb", {"clipnorm": 0.5, "weight_decay": 0.1}),
             ("Adafactor", {"clipnorm": 1.0}),
             ("Muon", {"global_clipnorm": 1.0, "weight_decay": 0.1}),
             # Keras' options inside the wrapped rule (kernels/whole_host.cpp)
             ("Lamb", {"gradient_accumulation_steps": 2, "use_ema": True,
                       "ema_overwrite_frequency": 3, "global_clipnorm": 1.0}),
             ("Adafactor", {"gradient_accumulation_steps": 3, "use_ema": True}),
             ("Muon", {"gradient_accumulation_steps": 2, "use_ema": True,
                       "ema_overwrite_frequency": 2, "clipnorm": 0.5})]
OWN_IDS = ["Lamb", "Adafactor", "Muon", "Lamb-accumulate-ema", "Adafactor-accumulate-ema",
           "Muon-accumulate-ema"]
OWN_LAYOUT = [(6, 5), (4,), (), (2, 3, 4), (7, 3)]  # matrices for Muon and Adafactor


@pytest.mark.parametrize("cls_name, kwargs", OWN_RULES, ids=OWN_IDS)
def test_host_executor_runs_own_kernel_rules_like_numpy(cls_name, kwargs):
    """Lamb, Adafactor and Muon's host kernels (whole_host.cpp, muon_host.cpp) unscale by
    the dynamic scale and grow or halve it: params, slots, scale, counter, iterations
    and skips after every call, against the NumPy executor; then a scale that
    underflowed to 0 skips the step there too."""
    from fusedopt import host

    try:
        host.library(cls_name.lower(), np.float64)
    except host.HostBuildError as e:
        pytest.skip(f"no host build here: {e}")
    rng = np.random.default_rng(4)
    grads = []
    for step in range(16):
        g = [rng.normal(size=s) * 16.0 for s in OWN_LAYOUT]
        if step in (2, 7, 8, 13):
            g[0].flat[step] = np.nan if step % 2 else np.inf
        grads.append(FlatBuffer.from_arrays(g).data)
    runs = {}
    for executor in ("host", "numpy"):
        opt = LossScaleOptimizer(getattr(fusedopt, cls_name)(executor=executor, **kwargs),
                                 initial_scale=16.0, dynamic_growth_steps=2)
        params = FlatBuffer.from_arrays(random_params(OWN_LAYOUT, np.float64, 5))
        records = []
        for g in grads:
            opt.apply(g.copy(), params)
            records.append(([params.data.copy()] + [np.array(s) for s in opt.slots().values()],
                            (opt.dynamic_scale, opt.step_counter, opt.iterations,
                             opt.skipped_steps)))
        assert opt.executor_name == executor
        runs[executor] = records
    for k, ((got, got_counts), (want, want_counts)) in enumerate(zip(runs["host"],
                                                                      runs["numpy"])):
        assert got_counts == want_counts, f"call {k}"
        for j, (x, y) in enumerate(zip(got, want)):
            np.testing.assert_allclose(x, y, rtol=1e-10,
                                       atol=1e-10 * float(np.max(np.abs(y), initial=0.0)),
                                       err_msg=f"call {k}, buffer {j}")
    scales = [counts[0] for _, counts in runs["numpy"]]
    assert max(scales) > 16.0 and any(b < a for a, b in zip(scales, scales[1:]))
    assert runs["numpy"][-1][1][3] == 4

    opt = LossScaleOptimizer(getattr(fusedopt, cls_name)(executor="host", **kwargs),
                             initial_scale=float(np.float32(1e-45)), dynamic_growth_steps=5)
    params = FlatBuffer.from_arrays(random_params(OWN_LAYOUT, np.float64, 6))
    opt.apply(np.full(params.size, np.nan), params)
    assert opt.dynamic_scale == 0.0 and opt.skipped_steps == 1
    before = [bits(params.data)] + [bits(s) for s in opt.slots().values()]
    opt.apply(np.full(params.size, 1e-3), params)
    assert [bits(params.data)] + [bits(s) for s in opt.slots().values()] == before
    assert (opt.iterations, opt.skipped_steps, opt.dynamic_scale) == (0, 2, 0.0)
