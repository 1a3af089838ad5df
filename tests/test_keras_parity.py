"""fusedopt against Keras 3's own optimizers, step by step (skipped where Keras is absent).

Keras runs on its JAX backend with 64-bit floats enabled. Every case of KERAS_CASES runs
for tens of steps on several variables; params must agree after every step
(float64 to 1e-10 relative, float32 to 2e-5) and the state slots at the end.
"""

import os

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_ENABLE_X64", "1")

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":  # pragma: no cover - depends on the environment
    pytest.skip("parity tests use Keras' JAX backend", allow_module_level=True)

import fusedopt  # noqa: E402
from conftest import KERAS_CASES, case_ids, random_grads, random_params  # noqa: E402

STEPS = 25
LAYOUT = [(3, 4), (5,), (), (1,), (2, 1, 3)]
TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-6)}

# fusedopt slot name -> Keras' attribute holding that slot's variables.
KERAS_SLOTS = {
    "momentum": ("momentums", "_momentums", "_m"),
    "velocity": ("_velocities", "velocities", "_v", "adam_velocities"),
    "velocity_hat": ("_velocity_hats",), "norm": ("_u",), "accumulator": ("_accumulators",),
    "linear": ("_linears",), "accumulated_grad": ("_accumulated_grads",),
    "accumulated_delta_var": ("_accumulated_delta_vars",),
    "average_gradient": ("_average_gradients",),
    "r": ("_r",), "c": ("_c",),  # Adafactor's factored statistics
    "average": ("_model_variables_moving_average",),
    "gradient_accumulator": ("_accumulated_gradients",),
}


def exact_float64_reductions(monkeypatch):
    """Keras' JAX backend takes the mean and the norm of a float64 tensor in float32
    (its type promotion maps (float64, float32) to float32); fusedopt's Adafactor and
    Muon take them in float64. Make Keras' keep float64 so 1e-10 compares formulas,
    not that loss (tests/test_keras_family.py shows it is the only difference)."""
    import jax.numpy as jnp
    from keras.src.backend.jax import linalg, numpy as knp

    original_mean, original_norm = knp.mean, linalg.norm

    def mean(x, axis=None, keepdims=False):
        x = jnp.asarray(x)
        if x.dtype == jnp.float64:
            return jnp.mean(x, axis=axis, keepdims=keepdims)
        return original_mean(x, axis=axis, keepdims=keepdims)

    def norm(x, ord=None, axis=None, keepdims=False):
        x = jnp.asarray(x)
        if x.dtype == jnp.float64:
            return jnp.linalg.norm(x, ord=ord, axis=axis, keepdims=keepdims)
        return original_norm(x, ord=ord, axis=axis, keepdims=keepdims)

    monkeypatch.setattr(knp, "mean", mean)
    monkeypatch.setattr(linalg, "norm", norm)


@pytest.fixture
def floatx(request):
    old = keras.config.floatx()
    keras.config.set_floatx(np.dtype(request.param).name)
    yield request.param
    keras.config.set_floatx(old)


def keras_stepper(kopt, kvars, compiled):
    """A function that applies one step's gradients with Keras' optimizer `kopt` to
    `kvars`. Not compiled: Keras' eager `apply`. Compiled: `stateless_apply` under
    jax.jit, the path of Keras' own JAX trainer (model.fit), with the results written
    back into the Keras variables, so callers read params, slots and iterations the same
    way. The compiled path is for what Keras' eager path recompiles at every step: its
    ops.cond of gradient accumulation (about 15 s for 25 steps instead of under 1 s),
    and LossScaleOptimizer, whose stateful apply leaks tracers on JAX."""
    to_tensors = lambda grads: [keras.ops.convert_to_tensor(g) for g in grads]  # noqa: E731
    if not compiled:
        return lambda grads: kopt.apply(to_tensors(grads), kvars)
    import jax

    kopt.build(kvars)
    stateless_apply = jax.jit(kopt.stateless_apply)

    def step(grads):
        values, state = stateless_apply([v.value for v in kopt.variables], to_tensors(grads),
                                        [v.value for v in kvars])
        for var, value in zip([*kvars, *kopt.variables], [*values, *state]):
            var.assign(value)
    return step


def run_both(cls_name, kwargs, dtype, steps=STEPS, keras_kwargs=None):
    init = random_params(LAYOUT, dtype, seed=1)
    grads = random_grads(LAYOUT, dtype, seed=2, steps=steps, scale=1.5)
    kvars = [keras.Variable(w.copy(), dtype=np.dtype(dtype).name) for w in init]
    kopt = getattr(keras.optimizers, cls_name)(**(keras_kwargs or kwargs))
    keras_step = keras_stepper(kopt, kvars, compiled=bool(kwargs.get("gradient_accumulation_steps")))
    flat = fusedopt.FlatBuffer.from_arrays(init)
    fopt = getattr(fusedopt, cls_name)(**kwargs)
    for step_grads in grads:
        keras_step(step_grads)
        fopt.apply(fusedopt.FlatBuffer.from_arrays(step_grads), flat)
        for kv, fv in zip(kvars, flat.views()):
            np.testing.assert_allclose(fv, np.asarray(kv.value), **TOL[dtype])
    n = kwargs.get("gradient_accumulation_steps") or 1
    assert fopt.iterations == int(kopt.iterations) == steps // n
    return kopt, fopt, flat


def compare_slots(kopt, fopt, dtype):
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in LAYOUT])
    for name, buf in fopt.slots().items():
        attrs = [a for a in KERAS_SLOTS[name] if getattr(kopt, a, None)]
        assert attrs, f"no Keras attribute found for slot {name}"
        kvars = getattr(kopt, attrs[0])
        if isinstance(fopt, fusedopt.Muon) and name == "velocity":
            # Keras keeps a velocity for AdamW variables only; fusedopt zeros elsewhere.
            adamw = [fopt.uses_adamw(i, s) for i, s in enumerate(LAYOUT)]
            assert [v is not None for v in kvars] == adamw
            kvars = [v for v in kvars if v is not None]
            for i, use in enumerate(adamw):
                if not use:
                    assert not buf[offsets[i]:offsets[i + 1]].any()
            buf = np.concatenate([buf[offsets[i]:offsets[i + 1]]
                                  for i, use in enumerate(adamw) if use])
        if name in ("r", "c"):  # Keras keeps a dummy scalar below rank 2; fusedopt nothing
            kvars = [v for v, shape in zip(kvars, LAYOUT) if len(shape) >= 2]
        kvals = np.concatenate([np.ravel(np.asarray(v.value)) for v in kvars])
        np.testing.assert_allclose(buf, kvals, **TOL[dtype])


@pytest.mark.parametrize("floatx", [np.float64, np.float32], indirect=True, ids=["f64", "f32"])
@pytest.mark.parametrize("case", KERAS_CASES, ids=case_ids(KERAS_CASES))
def test_matches_keras(case, floatx, monkeypatch):
    _, cls_name, kwargs = case
    if cls_name in ("Adafactor", "Muon"):
        exact_float64_reductions(monkeypatch)
    kopt, fopt, _ = run_both(cls_name, kwargs, floatx)
    if cls_name != "Lion":  # Keras' Lion keeps the momentum in `_momentums` too
        compare_slots(kopt, fopt, floatx)


@pytest.mark.parametrize("floatx", [np.float64], indirect=True, ids=["f64"])
@pytest.mark.parametrize("cls_name", ["SGD", "Adam", "Nadam", "AdamW", "Ftrl"])
def test_schedule_matches_keras(cls_name, floatx):
    schedule = dict(initial_learning_rate=0.05, decay_steps=4, decay_rate=0.5)
    run_both(cls_name, {"learning_rate": fusedopt.schedules.ExponentialDecay(**schedule)},
             floatx, keras_kwargs={
                 "learning_rate": keras.optimizers.schedules.ExponentialDecay(**schedule)})


@pytest.mark.parametrize("floatx", [np.float64], indirect=True, ids=["f64"])
def test_callable_learning_rate_matches_keras(floatx):
    run_both("Adam", {"learning_rate": lambda: 0.02}, floatx)


@pytest.mark.parametrize("floatx", [np.float64], indirect=True, ids=["f64"])
def test_keras2_decay_is_keras_inverse_time_decay(floatx):
    """decay= (Keras 2) equals Keras 3's InverseTimeDecay(lr, 1, decay)."""
    with pytest.warns(DeprecationWarning):
        run_both("SGD", {"lr": 0.1, "decay": 0.2, "momentum": 0.5}, floatx, keras_kwargs={
            "learning_rate": keras.optimizers.schedules.InverseTimeDecay(0.1, 1, 0.2),
            "momentum": 0.5})


@pytest.mark.parametrize("floatx", [np.float64], indirect=True, ids=["f64"])
def test_config_from_keras_builds_same_optimizer(floatx):
    kopt = keras.optimizers.Adam(learning_rate=0.01, amsgrad=True, clipnorm=0.5)
    fopt = fusedopt.get(kopt)
    assert isinstance(fopt, fusedopt.Adam) and fopt.amsgrad and fopt.clipnorm == 0.5
    assert fusedopt.get({"class_name": "Adam", "config": kopt.get_config()}).amsgrad
    sched = keras.optimizers.SGD(
        learning_rate=keras.optimizers.schedules.CosineDecay(0.1, 10, warmup_target=0.2,
                                                             warmup_steps=3))
    fsgd = fusedopt.SGD.from_config(sched.get_config())
    assert isinstance(fsgd._learning_rate, fusedopt.schedules.CosineDecay)
    for step in range(0, 16):
        # Keras evaluates part of CosineDecay in float32 even with floatx=float64.
        assert fsgd._learning_rate(step) == pytest.approx(
            float(sched._learning_rate(step)), rel=1e-6)
