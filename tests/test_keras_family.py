"""The reference rules of the rest of Keras 3's family (issue 15) against Keras itself.

Each test drives `fusedopt.reference.<rule>` directly, one variable (segment) at a
time, with this step's scalars computed here from the formulas of Keras' source, and
compares params and every slot with a Keras 3 optimizer (JAX backend) after every
step: float64 within 1e-10 relative, float32 within 2e-5, over 25 steps, on
variables of rank 0 to 3.

Keras' JAX backend computes `ops.mean` and `ops.norm` of float64 tensors in float32
(its type promotion maps (float64, float32) to float32). For the float64 checks of
the rules that use them (Adafactor, Muon) the `exact_reductions` fixture makes those
two ops compute in the input's dtype, so the comparison is of the formulas and their
order, not of that precision loss; `test_keras_float64_means_are_float32` shows the
loss is all that differs.
"""

import math
import os
import re

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_ENABLE_X64", "1")

keras = pytest.importorskip("keras")
if keras.backend.backend() != "jax":  # pragma: no cover - depends on the environment
    pytest.skip("parity tests use Keras' JAX backend", allow_module_level=True)

from fusedopt import reference  # noqa: E402
from test_keras_parity import keras_stepper  # noqa: E402

STEPS = 25
# Ranks 0 to 3; (6, 2) is tall (Muon transposes it), (2, 3, 4) factors its last two axes.
LAYOUT = [(3, 4), (5,), (), (1,), (2, 3, 4), (6, 2)]
TOL = {np.float64: dict(rtol=1e-10, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-6)}
DTYPES = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])


@pytest.fixture
def floatx(dtype):
    old = keras.config.floatx()
    keras.config.set_floatx(np.dtype(dtype).name)
    yield dtype
    keras.config.set_floatx(old)


@pytest.fixture
def exact_reductions(monkeypatch):
    """Keras' JAX mean and norm, computed in the input's own float dtype."""
    from test_keras_parity import exact_float64_reductions

    exact_float64_reductions(monkeypatch)


def make_inputs(dtype, layout=LAYOUT, steps=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.normal(size=s).astype(dtype) for s in layout]
    grads = [[(rng.normal(size=s) * rng.uniform(0.1, 2.0)).astype(dtype) for s in layout]
             for _ in range(steps)]
    return params, grads


def keras_step(kopt, kvars, step_grads):
    kopt.apply([keras.ops.convert_to_tensor(g) for g in step_grads], kvars)


def assert_close(ours, theirs, dtype, what):
    np.testing.assert_allclose(np.asarray(ours).ravel(), np.asarray(theirs).ravel(),
                               err_msg=what, **TOL[dtype])


def cast(dtype, *scalars):
    return tuple(dtype(x) for x in scalars)


def decay(p, weight_decay, lr):
    """Keras' decoupled weight decay before the rule: p <- p - p*wd*lr."""
    if weight_decay:
        dt = p.dtype.type
        p -= p * dt(weight_decay) * dt(lr)


# ------------------------------------------------------------- ScheduleFreeAdamW
@DTYPES
@pytest.mark.parametrize("kwargs", [
    {}, {"warmup_steps": 10, "learning_rate": 0.01},
    {"beta_1": 0.5, "beta_2": 0.7, "epsilon": 0.3, "weight_decay": 0.1},
], ids=["defaults", "warmup", "betas-eps-decay"])
def test_schedule_free_adamw(kwargs, dtype, floatx):
    h = dict(learning_rate=0.0025, beta_1=0.9, beta_2=0.999, epsilon=1e-8, warmup_steps=0,
             weight_decay=None) | kwargs
    params, grads = make_inputs(dtype)
    kvars = [keras.Variable(p.copy()) for p in params]
    kopt = keras.optimizers.ScheduleFreeAdamW(**kwargs)
    z = [p.copy() for p in params]  # Keras starts its "momentum" slot at the params
    v = [np.zeros_like(p) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        keras_step(kopt, kvars, step_grads)
        lr = h["learning_rate"]
        if h["warmup_steps"]:
            lr = lr * min(t / h["warmup_steps"], 1.0)
        b1, b2 = h["beta_1"], h["beta_2"]
        scalars = cast(dtype, lr, b1, 1 - b1, 1 - b2, 1 - b2 ** t, h["epsilon"], 1 / t, 1 - 1 / t)
        for p, g, zi, vi in zip(params, step_grads, z, v):
            p1, g1, z1, v1 = (x.reshape(-1) for x in (p, g, zi, vi))
            decay(p1, h["weight_decay"], h["learning_rate"])
            reference.schedule_free_adamw(p1, g1, z1, v1, *scalars)
        for i, (p, kv) in enumerate(zip(params, kvars)):
            assert_close(p, kv.value, dtype, f"y of variable {i} at step {t}")
    for ours, name in ((z, "_momentums"), (v, "_velocities")):
        for i, (a, kv) in enumerate(zip(ours, getattr(kopt, name))):
            assert_close(a, kv.value, dtype, f"{name}[{i}]")


# -------------------------------------------------------------------------- Lamb
@DTYPES
@pytest.mark.parametrize("kwargs", [
    {}, {"beta_1": 0.5, "beta_2": 0.7, "epsilon": 0.3, "learning_rate": 0.01},
    {"weight_decay": 0.1, "learning_rate": 0.02},
], ids=["defaults", "betas-eps", "decay"])
def test_lamb(kwargs, dtype, floatx):
    h = dict(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
             weight_decay=None) | kwargs
    params, grads = make_inputs(dtype)
    params[1][...] = 0  # a zero variable: ||p|| = 0 gives ratio 1
    kvars = [keras.Variable(p.copy()) for p in params]
    kopt = keras.optimizers.Lamb(**kwargs)
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        keras_step(kopt, kvars, step_grads)
        b1, b2 = h["beta_1"], h["beta_2"]
        scalars = cast(dtype, h["learning_rate"], 1 - b1, 1 - b2, 1 - b1 ** t, 1 - b2 ** t,
                       h["epsilon"])
        for p, g, mi, vi in zip(params, step_grads, m, v):
            p1, g1, m1, v1 = (x.reshape(-1) for x in (p, g, mi, vi))
            decay(p1, h["weight_decay"], h["learning_rate"])
            reference.lamb(p.shape, p1, g1, m1, v1, *scalars)
        for i, (p, kv) in enumerate(zip(params, kvars)):
            assert_close(p, kv.value, dtype, f"variable {i} at step {t}")
    for ours, name in ((m, "_momentums"), (v, "_velocities")):
        for i, (a, kv) in enumerate(zip(ours, getattr(kopt, name))):
            assert_close(a, kv.value, dtype, f"{name}[{i}]")


@pytest.mark.parametrize("p_sum, r_sum, expected", [
    (4.0, 1.0, 2.0), (0.0, 1.0, 1.0), (4.0, 0.0, 1.0), (0.0, 0.0, 1.0),
    (math.nan, 1.0, 1.0), (4.0, math.nan, 1.0), (math.inf, 1.0, math.inf),
])
def test_lamb_trust_ratio_edges(p_sum, r_sum, expected):
    """Keras: where(||p|| > 0, where(||r|| > 0, ||p||/||r||, 1), 1); NaN compares false."""
    assert reference.trust_ratio(p_sum, r_sum) == expected


# --------------------------------------------------------------------- Adafactor
@DTYPES
@pytest.mark.parametrize("kwargs", [
    {}, {"learning_rate": 0.05, "beta_2_decay": -0.5, "epsilon_2": 0.1, "clip_threshold": 0.5},
    {"relative_step": False, "learning_rate": 0.3, "epsilon_1": 1e-3, "weight_decay": 0.1},
], ids=["defaults", "decay-eps2-clip", "no-relative-step-decay"])
def test_adafactor(kwargs, dtype, floatx, exact_reductions):
    h = dict(learning_rate=0.001, beta_2_decay=-0.8, epsilon_1=1e-30, epsilon_2=1e-3,
             clip_threshold=1.0, weight_decay=None) | kwargs
    params, grads = make_inputs(dtype)
    kvars = [keras.Variable(p.copy()) for p in params]
    kopt = keras.optimizers.Adafactor(**kwargs)
    rows, cols = zip(*(reference.factored_shapes(p.shape) for p in params))
    r = [np.zeros(s, dtype) for s in rows]
    c = [np.zeros(s, dtype) for s in cols]
    v = [np.zeros_like(p) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        keras_step(kopt, kvars, step_grads)
        # relative_step's min(lr, 1/sqrt(t)) is taken again in rho: it changes nothing.
        rho = min(h["learning_rate"], 1 / math.sqrt(t))
        beta_2 = 1 - t ** h["beta_2_decay"]
        scalars = cast(dtype, rho, beta_2, 1 - beta_2, h["epsilon_1"], h["epsilon_2"],
                       h["clip_threshold"])
        for p, g, ri, ci, vi in zip(params, step_grads, r, c, v):
            p1, g1, v1 = (x.reshape(-1) for x in (p, g, vi))
            decay(p1, h["weight_decay"], h["learning_rate"])
            reference.adafactor(p.shape, p1, g1, ri.reshape(-1), ci.reshape(-1), v1, *scalars)
        for i, (p, kv) in enumerate(zip(params, kvars)):
            assert_close(p, kv.value, dtype, f"variable {i} at step {t}")
    for i, p in enumerate(params):
        assert_close(v[i], kopt._v[i].value, dtype, f"velocity[{i}]")
        if p.ndim >= 2:  # below rank 2 Keras keeps dummy scalars
            assert_close(r[i], kopt._r[i].value, dtype, f"r[{i}]")
            assert_close(c[i], kopt._c[i].value, dtype, f"c[{i}]")


@pytest.mark.parametrize("dtype", [np.float64], ids=["f64"])
def test_keras_float64_means_are_float32(dtype, floatx):
    """Without exact_reductions, Keras' float64 Adafactor differs from the float64
    reference by float32 rounding (and by more than 1e-10): the one difference."""
    params, grads = make_inputs(dtype, steps=3)
    kvars = [keras.Variable(p.copy()) for p in params]
    kopt = keras.optimizers.Adafactor(learning_rate=0.05)
    rows, cols = zip(*(reference.factored_shapes(p.shape) for p in params))
    r, c = [np.zeros(s) for s in rows], [np.zeros(s) for s in cols]
    v = [np.zeros_like(p) for p in params]
    for t, step_grads in enumerate(grads, start=1):
        keras_step(kopt, kvars, step_grads)
        scalars = (min(0.05, 1 / math.sqrt(t)), 1 - t ** -0.8, t ** -0.8, 1e-30, 1e-3, 1.0)
        for p, g, ri, ci, vi in zip(params, step_grads, r, c, v):
            reference.adafactor(p.shape, p.reshape(-1), g.reshape(-1), ri.reshape(-1),
                                ci.reshape(-1), vi.reshape(-1), *scalars)
    diff = max(np.max(np.abs(p - np.asarray(kv.value)) / (np.abs(p) + 1e-3))
               for p, kv in zip(params, kvars))
    assert 1e-10 < diff < 1e-5


def test_factored_shapes():
    assert reference.factored_shapes(()) == ((0,), (0,))
    assert reference.factored_shapes((5,)) == ((0,), (0,))
    assert reference.factored_shapes((3, 4)) == ((3,), (4,))
    assert reference.factored_shapes((2, 3, 4)) == ((2, 3), (2, 4))


# -------------------------------------------------------------------------- Muon
# A variable's path is its name here (Keras refuses "/" in a name).
MUON_NAMES = ["dense_kernel", "dense_bias", "scalar", "one", "conv_kernel", "token_embedding"]


def muon_uses_adamw(shape, name, exclude_layers, exclude_embeddings):
    """Keras' Muon._should_use_adamw, on a variable's shape and path."""
    if len(shape) != 2:
        return True
    if exclude_embeddings and "embedding" in name.lower():
        return True
    return any(re.search(k, name) for k in exclude_layers)


@DTYPES
@pytest.mark.parametrize("kwargs", [
    {},
    {"nesterov": False, "rms_rate": None, "momentum": 0.8, "ns_steps": 3,
     "exclude_embeddings": False, "learning_rate": 0.01},
    {"exclude_layers": ["den.e"], "exclude_embeddings": False, "adam_lr_ratio": 0.5, "adam_beta_1": 0.5,
     "adam_beta_2": 0.7, "epsilon": 0.3, "weight_decay": 0.1, "adam_weight_decay": 0.2},
], ids=["defaults", "plain-momentum-no-rms", "exclude-adam-args"])
def test_muon(kwargs, dtype, floatx, exact_reductions):
    h = dict(learning_rate=0.001, adam_beta_1=0.9, adam_beta_2=0.999, adam_weight_decay=0.004,
             epsilon=1e-7, weight_decay=0.004, exclude_layers=[], exclude_embeddings=True,
             muon_a=3.4445, muon_b=-4.7750, muon_c=2.0315, adam_lr_ratio=1, momentum=0.95,
             ns_steps=5, nesterov=True, rms_rate=0.2) | kwargs
    params, grads = make_inputs(dtype)
    kvars = [keras.Variable(p.copy(), name=n) for p, n in zip(params, MUON_NAMES)]
    kopt = keras.optimizers.Muon(**kwargs)
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    adamw = [muon_uses_adamw(p.shape, n, h["exclude_layers"], h["exclude_embeddings"])
             for p, n in zip(params, MUON_NAMES)]
    assert sum(adamw) < len(adamw)  # some variables take the Muon step
    lr = h["learning_rate"]
    for t, step_grads in enumerate(grads, start=1):
        keras_step(kopt, kvars, step_grads)
        b1, b2 = h["adam_beta_1"], h["adam_beta_2"]
        alpha = lr * h["adam_lr_ratio"] * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        for p, g, mi, vi, use_adamw in zip(params, step_grads, m, v, adamw):
            scale = 1.0
            if h["rms_rate"] is not None and p.ndim == 2:
                scale = math.sqrt(max(p.shape)) * h["rms_rate"]
            scalars = cast(dtype, lr, h["momentum"], h["nesterov"], h["ns_steps"], h["muon_a"],
                           h["muon_b"], h["muon_c"], alpha, 1 - b1, 1 - b2, h["epsilon"])
            p1, g1, m1, v1 = (x.reshape(-1) for x in (p, g, mi, vi))
            decay(p1, h["adam_weight_decay"] if use_adamw else h["weight_decay"], lr)
            reference.muon(p.shape, p1, g1, m1, v1, use_adamw, scale, *scalars)
        for i, (p, kv) in enumerate(zip(params, kvars)):
            assert_close(p, kv.value, dtype, f"variable {i} at step {t}")
    for i, use_adamw in enumerate(adamw):
        assert_close(m[i], kopt.momentums[i].value, dtype, f"momentum[{i}]")
        if use_adamw:
            assert_close(v[i], kopt.adam_velocities[i].value, dtype, f"velocity[{i}]")
        else:
            assert kopt.adam_velocities[i] is None and not v[i].any()


def test_newton_schulz_orthogonalises():
    """Five quintic steps bring every singular value into Keras' band around 1."""
    x = np.random.default_rng(3).normal(size=(6, 4))
    for y in (reference.newton_schulz(x, 5, 3.4445, -4.7750, 2.0315),
              reference.newton_schulz(x.T, 5, 3.4445, -4.7750, 2.0315)):
        s = np.linalg.svd(y, compute_uv=False)
        assert np.all((s > 0.6) & (s < 1.25)), s


# ------------------------------------------- EMA and gradient accumulation (§1.6, §1.7)
@DTYPES
@pytest.mark.parametrize("kwargs", [
    {"use_ema": True},
    {"use_ema": True, "ema_momentum": 0.7, "ema_overwrite_frequency": 3},
    {"gradient_accumulation_steps": 3},
    {"gradient_accumulation_steps": 2, "use_ema": True, "ema_momentum": 0.5,
     "ema_overwrite_frequency": 2, "learning_rate": 0.02},
], ids=["ema", "ema-overwrite", "accumulate", "accumulate-ema-overwrite"])
def test_adam_options_match_keras(kwargs, dtype, floatx):
    """The options' order around a rule: accumulate (N-1 micro-steps only add), average,
    the rule at iterations//N, then the moving average at iterations//N (every
    micro-step) and the overwrite when (iterations//N + 1) % frequency == 0."""
    h = dict(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, use_ema=False,
             ema_momentum=0.99, ema_overwrite_frequency=None,
             gradient_accumulation_steps=None) | kwargs
    params, grads = make_inputs(dtype)
    kvars = [keras.Variable(p.copy()) for p in params]
    n = h["gradient_accumulation_steps"] or 1
    kopt = keras.optimizers.Adam(**kwargs)
    keras_apply = keras_stepper(kopt, kvars, compiled=n > 1)
    flat = np.concatenate([p.ravel() for p in params])
    m, v, acc, avg = (np.zeros_like(flat) for _ in range(4))
    dt = np.dtype(dtype).type
    for micro, step_grads in enumerate(grads):
        keras_apply(step_grads)
        g = np.concatenate([x.ravel() for x in step_grads])
        it = micro // n  # Keras' optimizer.iterations: completed updates
        if (micro + 1) % n:
            acc += g
        else:
            g = (g + acc) / dt(n) if n > 1 else g
            acc[...] = 0
            t = it + 1
            b1, b2 = h["beta_1"], h["beta_2"]
            alpha = h["learning_rate"] * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
            reference.adam(flat, g, m, v, None, *cast(dtype, alpha, 1 - b1, 1 - b2, h["epsilon"]),
                           False)
        if h["use_ema"]:
            reference.ema(avg, flat, dt(h["ema_momentum"] if it else 0.0))
            freq = h["ema_overwrite_frequency"]
            if freq and (it + 1) % freq == 0:
                flat[...] = avg
        assert_close(flat, np.concatenate([np.ravel(kv.value) for kv in kvars]), dtype,
                     f"params after micro-step {micro}")
    assert int(kopt.iterations) == STEPS // n
    if h["use_ema"]:
        assert_close(avg, np.concatenate([np.ravel(a.value) for a in
                                          kopt._model_variables_moving_average]), dtype, "ema")
    if n > 1:
        assert_close(acc, np.concatenate([np.ravel(a.value) for a in
                                          kopt._accumulated_gradients]), dtype, "accumulator")


# ------------------------------------------------------------ LossScaleOptimizer
def test_loss_scale_update_matches_keras():
    """The dynamic scale and counter over finite and non-finite steps, and the inner
    optimizer's iterations (a skipped step does not count). Keras' stateful apply of
    LossScaleOptimizer leaks tracers on JAX, so this drives its compiled stateless_apply,
    the path Keras' own JAX trainer takes."""
    params, grads = make_inputs(np.float32, layout=[(3,), (2, 2)], steps=12, seed=5)
    finite = [True, True, False, True, True, True, True, False, False, True, True, True]
    kvars = [keras.Variable(p.copy()) for p in params]
    kopt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(), initial_scale=8.0,
                                               dynamic_growth_steps=3)
    keras_apply = keras_stepper(kopt, kvars, compiled=True)
    scale, counter, inner_iterations = 8.0, 0, 0
    for step_grads, ok in zip(grads, finite):
        if not ok:
            step_grads = [g.copy() for g in step_grads]
            step_grads[1][0, 1] = np.inf
        keras_apply(step_grads)
        scale, counter = reference.loss_scale_update(scale, counter, ok, 3)
        inner_iterations += ok
        assert float(kopt.dynamic_scale.value) == scale
        assert int(kopt.step_counter.value) == counter
        assert int(kopt.iterations) == inner_iterations
