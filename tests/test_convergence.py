"""Every optimizer converges: an ill-conditioned quadratic and the Rosenbrock function.

Gradients are computed analytically and written into the grads FlatBuffer each step.
Hyperparameters are chosen per optimizer the way a user would: sign-like or
normalised rules (RMSprop, Lion, Adadelta) get a decaying learning-rate schedule, since
with a constant one they hover around the minimum at a distance set by the step size.
"""

import math

import numpy as np
import pytest

import fusedopt
from fusedopt.schedules import CosineDecay, ExponentialDecay

# -------------------------------------------------------------------- the problems
# f(x) = 0.5 * sum(a_i x_i^2), curvatures from 1 to 100 (condition number 100), over
# segments of several shapes; the curvatures are shuffled so each segment mixes them.
QUAD_SHAPES = [(4,), (2, 3), (), (1,), (8,)]
_rng = np.random.default_rng(7)
CURVATURE = _rng.permutation(np.logspace(0, 2, 20))
X0 = _rng.uniform(-2.0, 2.0, 20)


def quadratic_loss(x):
    return 0.5 * float(np.sum(CURVATURE * np.asarray(x, np.float64) ** 2))


def minimize_quadratic(opt, steps, dtype):
    flat = fusedopt.FlatBuffer(X0.astype(dtype), QUAD_SHAPES)
    grads = flat.zeros_like()
    curvature = CURVATURE.astype(dtype)
    for _ in range(steps):
        np.multiply(curvature, flat.data, out=grads.data)
        opt.apply(grads, flat)
    assert opt.iterations == steps
    return flat.data


# f(x, y) = (1 - x)^2 + 100 (y - x^2)^2, minimum 0 at (1, 1); x and y in two segments.
ROSENBROCK_START = (-1.2, 1.0)


def rosenbrock(x, y):
    return (1 - x) ** 2 + 100 * (y - x * x) ** 2


def minimize_rosenbrock(opt, steps, shapes=((), (1,))):
    flat = fusedopt.FlatBuffer(np.array(ROSENBROCK_START), shapes)
    grads = flat.zeros_like()
    for _ in range(steps):
        x, y = flat.data
        grads.data[0] = -2 * (1 - x) - 400 * x * (y - x * x)
        grads.data[1] = 200 * (y - x * x)
        opt.apply(grads, flat)
    return tuple(float(v) for v in flat.data)


# ------------------------------------------------------- optimizers and their settings
# (id, factory, steps). Factories, so each run starts from fresh state.
QUADRATIC = [
    ("SGD", lambda: fusedopt.SGD(0.015), 1000),
    ("RMSprop", lambda: fusedopt.RMSprop(ExponentialDecay(0.01, 200, 0.5)), 1500),
    ("Adagrad", lambda: fusedopt.Adagrad(0.5), 1000),
    ("Adadelta", lambda: fusedopt.Adadelta(CosineDecay(1.0, 3000)), 3000),
    ("Adam", lambda: fusedopt.Adam(0.05), 1500),
    ("AdamW", lambda: fusedopt.AdamW(0.05), 1500),
    ("Adamax", lambda: fusedopt.Adamax(0.05), 1500),
    ("Nadam", lambda: fusedopt.Nadam(0.01), 1500),
    ("Ftrl", lambda: fusedopt.Ftrl(0.5), 1000),
    ("Lion", lambda: fusedopt.Lion(ExponentialDecay(0.01, 200, 0.5)), 1500),
    ("ScheduleFreeAdamW", lambda: fusedopt.ScheduleFreeAdamW(0.05), 1500),
    # Lamb's and Adafactor's steps are relative to the params, which shrink to 0 here.
    ("Lamb", lambda: fusedopt.Lamb(0.02), 1500),
    ("Adafactor", lambda: fusedopt.Adafactor(0.5), 1500),
    # The (2, 3) segment takes the Muon step, of a fixed size: the rate must decay.
    ("Muon", lambda: fusedopt.Muon(ExponentialDecay(0.1, 200, 0.5)), 1500),
]

ROSENBROCK = [
    ("SGD-momentum", lambda: fusedopt.SGD(0.002, momentum=0.9), 5000),
    ("SGD-nesterov", lambda: fusedopt.SGD(0.001, momentum=0.9, nesterov=True), 5000),
    ("RMSprop", lambda: fusedopt.RMSprop(ExponentialDecay(0.01, 500, 0.5)), 5000),
    ("Adagrad", lambda: fusedopt.Adagrad(0.5), 10000),
    ("Adadelta", lambda: fusedopt.Adadelta(CosineDecay(1.0, 10000, alpha=0.001), rho=0.9), 10000),
    ("Adam", lambda: fusedopt.Adam(0.01), 5000),
    # Decoupled decay moves the minimum off (1, 1); keep it small for this check.
    ("AdamW", lambda: fusedopt.AdamW(0.01, weight_decay=1e-4), 5000),
    ("Adamax", lambda: fusedopt.Adamax(0.02), 5000),
    ("Nadam", lambda: fusedopt.Nadam(0.01), 5000),
    ("Ftrl", lambda: fusedopt.Ftrl(0.5), 10000),
    ("Lion", lambda: fusedopt.Lion(ExponentialDecay(0.01, 200, 0.5)), 3000),
    # The params hold y, which keeps moving with z at a fixed lr: anneal it to stop.
    ("ScheduleFreeAdamW", lambda: fusedopt.ScheduleFreeAdamW(CosineDecay(0.01, 10000),
                                                             beta_2=0.99), 10000),
    # A scalar variable's trust ratio |p|/|r| keeps a Lamb step shorter than |p|, so x
    # could never cross 0 from -1.2: Lamb gets (x, y) as one variable (ROSENBROCK_SHAPES).
    ("Lamb", lambda: fusedopt.Lamb(CosineDecay(0.01, 5000)), 5000),
    ("Adafactor", lambda: fusedopt.Adafactor(ExponentialDecay(0.1, 1000, 0.5)), 10000),
    # Two scalar segments: Muon's AdamW step (its weight decay would pull off (1, 1)).
    ("Muon", lambda: fusedopt.Muon(0.01, adam_weight_decay=None), 5000),
]
ROSENBROCK_SHAPES = {"Lamb": [(2,)]}


def ids(configs):
    return [c[0] for c in configs]


def test_every_optimizer_is_covered():
    classes = set(fusedopt.optimizers.__all__)
    assert {type(make()).__name__ for _, make, _ in QUADRATIC} == classes
    assert {type(make()).__name__ for _, make, _ in ROSENBROCK} == classes


# ------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name, make, steps", QUADRATIC, ids=ids(QUADRATIC))
def test_quadratic(name, make, steps, dtype):
    x = minimize_quadratic(make(), steps, dtype)
    assert quadratic_loss(x) < 1e-6 * quadratic_loss(X0)


@pytest.mark.parametrize("name, make, steps", ROSENBROCK, ids=ids(ROSENBROCK))
def test_rosenbrock(name, make, steps):
    x, y = minimize_rosenbrock(make(), steps, *[ROSENBROCK_SHAPES[n] for n in [name]
                                                 if n in ROSENBROCK_SHAPES])
    assert rosenbrock(x, y) < 1e-5  # from 24.2 at the start
    assert math.hypot(x - 1, y - 1) < 1e-2
