"""Learning-rate schedules against hand-written formulas (KERAS_RULES.md section 2.14),
their validation and serialization, and against keras.optimizers.schedules itself."""

import json
import math
import os

import numpy as np
import pytest

import fusedopt
from fusedopt import schedules as S


# ------------------------------------------------------ hand-written references
def ref_exponential(lr0, d, rate, staircase, step):
    p = step / d
    if staircase:
        p = math.floor(p)
    return lr0 * rate ** p


def ref_inverse_time(lr0, d, rate, staircase, step):
    p = step / d
    if staircase:
        p = math.floor(p)
    return lr0 / (1 + rate * p)


def ref_piecewise(boundaries, values, step):
    if step <= boundaries[0]:
        return values[0]
    for i in range(1, len(boundaries)):
        if boundaries[i - 1] < step <= boundaries[i]:
            return values[i]
    return values[-1]


def ref_polynomial(lr0, d, end, power, cycle, step):
    if cycle:
        d = d * (1 if step == 0 else math.ceil(step / d))
    else:
        step = min(step, d)
    return (lr0 - end) * (1 - step / d) ** power + end


def ref_cosine(lr0, d, alpha, step, target=None, warmup=0):
    if target is None:
        s = min(step, d)
        return lr0 * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * s / d)) + alpha)
    s = min(step, d + warmup)
    if s < warmup:
        return lr0 + (target - lr0) * s / warmup
    return target * ((1 - alpha) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / d)) + alpha)


def ref_restarts(lr0, first, t_mul, m_mul, alpha, step):
    """SGDR by walking the periods: period i lasts first*t_mul^i steps, peaks at
    lr0*m_mul^i (scaled between alpha and 1) and restarts exactly at its start."""
    i, start, period = 0, 0.0, float(first)
    while step >= start + period:
        start += period
        period *= t_mul
        i += 1
    frac = (step - start) / period
    cosine = 0.5 * m_mul ** i * (1 + math.cos(math.pi * frac))
    return lr0 * ((1 - alpha) * cosine + alpha)


# (id, fusedopt schedule, reference(step), steps to check)
CASES = [
    ("exponential", S.ExponentialDecay(0.1, 10, 0.5),
     lambda s: ref_exponential(0.1, 10, 0.5, False, s), [0, 1, 5, 9, 10, 11, 20, 55, 1000]),
    ("exponential-staircase", S.ExponentialDecay(0.1, 10, 0.5, staircase=True),
     lambda s: ref_exponential(0.1, 10, 0.5, True, s), [0, 1, 9, 10, 11, 19, 20, 21, 99]),
    ("exponential-growth", S.ExponentialDecay(0.01, 3, 1.5),
     lambda s: ref_exponential(0.01, 3, 1.5, False, s), [0, 1, 2, 3, 4, 30]),
    ("inverse-time", S.InverseTimeDecay(0.1, 5, 0.5),
     lambda s: ref_inverse_time(0.1, 5, 0.5, False, s), [0, 1, 4, 5, 6, 10, 500]),
    ("inverse-time-staircase", S.InverseTimeDecay(0.1, 5, 0.5, staircase=True),
     lambda s: ref_inverse_time(0.1, 5, 0.5, True, s), [0, 1, 4, 5, 6, 9, 10, 11]),
    ("piecewise", S.PiecewiseConstantDecay([3, 7], [0.1, 0.05, 0.01]),
     lambda s: ref_piecewise([3, 7], [0.1, 0.05, 0.01], s), [0, 1, 2, 3, 4, 6, 7, 8, 100]),
    ("piecewise-one-boundary", S.PiecewiseConstantDecay([0], [1.0, 0.5]),
     lambda s: ref_piecewise([0], [1.0, 0.5], s), [0, 1, 2]),
    ("polynomial", S.PolynomialDecay(0.1, 10),
     lambda s: ref_polynomial(0.1, 10, 1e-4, 1.0, False, s), [0, 1, 5, 9, 10, 11, 100]),
    ("polynomial-power", S.PolynomialDecay(0.1, 10, end_learning_rate=0.01, power=2.0),
     lambda s: ref_polynomial(0.1, 10, 0.01, 2.0, False, s), [0, 1, 5, 10, 15]),
    ("polynomial-sqrt", S.PolynomialDecay(0.1, 8, end_learning_rate=0.0, power=0.5),
     lambda s: ref_polynomial(0.1, 8, 0.0, 0.5, False, s), [0, 1, 4, 7, 8, 9]),
    ("polynomial-cycle", S.PolynomialDecay(0.1, 10, end_learning_rate=0.01, power=2.0,
                                           cycle=True),
     lambda s: ref_polynomial(0.1, 10, 0.01, 2.0, True, s), [0, 1, 9, 10, 11, 19, 20, 21, 35]),
    ("cosine", S.CosineDecay(0.1, 10),
     lambda s: ref_cosine(0.1, 10, 0.0, s), [0, 1, 5, 9, 10, 11, 50]),
    ("cosine-alpha", S.CosineDecay(0.1, 10, alpha=0.2),
     lambda s: ref_cosine(0.1, 10, 0.2, s), [0, 3, 10, 12]),
    ("cosine-warmup", S.CosineDecay(0.0, 10, alpha=0.1, warmup_target=0.2, warmup_steps=4),
     lambda s: ref_cosine(0.0, 10, 0.1, s, 0.2, 4), [0, 1, 2, 3, 4, 5, 9, 13, 14, 15, 40]),
    ("cosine-warmup-from-lr0", S.CosineDecay(0.05, 6, warmup_target=0.1, warmup_steps=3),
     lambda s: ref_cosine(0.05, 6, 0.0, s, 0.1, 3), [0, 1, 3, 4, 9, 10]),
    ("restarts", S.CosineDecayRestarts(0.1, 10),
     lambda s: ref_restarts(0.1, 10, 2.0, 1.0, 0.0, s), [0, 1, 9, 10, 11, 29, 30, 31, 70, 150]),
    ("restarts-t_mul-1", S.CosineDecayRestarts(0.1, 10, t_mul=1.0),
     lambda s: ref_restarts(0.1, 10, 1.0, 1.0, 0.0, s), [0, 5, 9, 10, 15, 20, 21, 105]),
    ("restarts-m_mul", S.CosineDecayRestarts(0.1, 4, t_mul=2.0, m_mul=0.5, alpha=0.1),
     lambda s: ref_restarts(0.1, 4, 2.0, 0.5, 0.1, s), [0, 2, 3, 4, 5, 11, 12, 13, 28, 60]),
    ("restarts-t_mul-1-m_mul", S.CosineDecayRestarts(1.0, 3, t_mul=1.0, m_mul=0.9),
     lambda s: ref_restarts(1.0, 3, 1.0, 0.9, 0.0, s), [0, 2, 3, 4, 6, 7, 30]),
    ("restarts-t_mul-1.5", S.CosineDecayRestarts(0.1, 8, t_mul=1.5, m_mul=0.8, alpha=0.05),
     lambda s: ref_restarts(0.1, 8, 1.5, 0.8, 0.05, s), [0, 7, 8, 19, 20, 38, 39]),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_against_hand_written_formula(case):
    _, schedule, ref, steps = case
    for step in steps:
        got = schedule(step)
        assert isinstance(got, float)
        assert got == pytest.approx(ref(step), rel=1e-12, abs=1e-15), f"step {step}"
    # and on every step in between
    for step in range(0, max(steps) + 1):
        assert schedule(step) == pytest.approx(ref(step), rel=1e-12, abs=1e-15), f"step {step}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_numpy_integer_steps(case):
    _, schedule, _, steps = case
    for step in steps:
        assert schedule(np.int64(step)) == schedule(step)


def test_literal_values():
    """A few values worked out by hand, independent of the reference functions."""
    assert S.ExponentialDecay(1.0, 10, 0.5)(20) == 0.25
    assert S.ExponentialDecay(1.0, 10, 0.5, staircase=True)(19) == 0.5
    assert S.InverseTimeDecay(1.0, 2, 1.0)(4) == pytest.approx(1 / 3)
    assert S.InverseTimeDecay(1.0, 2, 1.0, staircase=True)(5) == pytest.approx(1 / 3)
    assert S.PiecewiseConstantDecay([5], [1.0, 2.0])(5) == 1.0
    assert S.PiecewiseConstantDecay([5], [1.0, 2.0])(6) == 2.0
    assert S.PolynomialDecay(1.0, 10, end_learning_rate=0.0)(5) == 0.5
    assert S.PolynomialDecay(1.0, 10, end_learning_rate=0.0)(50) == 0.0
    # cycle: step 15 decays over 20 steps
    assert S.PolynomialDecay(1.0, 10, end_learning_rate=0.0, cycle=True)(15) == 0.25
    assert S.CosineDecay(1.0, 10)(5) == pytest.approx(0.5)
    assert S.CosineDecay(1.0, 10, alpha=0.5)(10) == pytest.approx(0.5)
    assert S.CosineDecay(0.0, 10, warmup_target=1.0, warmup_steps=4)(2) == 0.5
    assert S.CosineDecay(0.0, 10, warmup_target=1.0, warmup_steps=4)(4) == 1.0
    # SGDR: period 10 then 20; the second period starts at step 10 at full height
    assert S.CosineDecayRestarts(1.0, 10)(10) == pytest.approx(1.0)
    assert S.CosineDecayRestarts(1.0, 10)(20) == pytest.approx(0.5)
    assert S.CosineDecayRestarts(1.0, 10, m_mul=0.5)(10) == pytest.approx(0.5)


@pytest.mark.parametrize("t_mul", [2.0, 1.5, 3.0, 10.0, 1.0, 4.0])
def test_restarts_start_at_their_peak(t_mul):
    """At the first step of restart i the rate is the new peak lr0*m_mul^i, never the
    end of the previous period (which would be alpha*lr0)."""
    first, m_mul, alpha = 10, 0.5, 0.1
    schedule = S.CosineDecayRestarts(1.0, first, t_mul=t_mul, m_mul=m_mul, alpha=alpha)
    start, period = 0.0, float(first)
    for i in range(6):
        if start == int(start):
            expected = (1 - alpha) * m_mul ** i + alpha
            assert schedule(int(start)) == pytest.approx(expected, rel=1e-9), (
                f"restart {i} at step {int(start)}")
        start += period
        period *= t_mul


def test_schedule_in_optimizer_sees_pre_increment_step():
    sched = S.PiecewiseConstantDecay([0, 1], [0.5, 0.25, 0.125])
    opt = fusedopt.SGD(learning_rate=sched)
    p = np.zeros(1)
    seen = []
    for _ in range(4):
        before = p.copy()
        opt.apply(np.ones(1), p)
        seen.append(float(before[0] - p[0]))
    assert seen == [0.5, 0.25, 0.125, 0.125]


# ---------------------------------------------------------------- validation
DECAY_STEPS_CTORS = {
    "ExponentialDecay": lambda d: S.ExponentialDecay(0.1, d, 0.5),
    "InverseTimeDecay": lambda d: S.InverseTimeDecay(0.1, d, 0.5),
    "PolynomialDecay": lambda d: S.PolynomialDecay(0.1, d),
    "CosineDecay": lambda d: S.CosineDecay(0.1, d),
    "CosineDecayRestarts": lambda d: S.CosineDecayRestarts(0.1, d),
}


@pytest.mark.parametrize("name", list(DECAY_STEPS_CTORS))
@pytest.mark.parametrize("value,err", [(0, ValueError), (-1, ValueError), (-0.5, ValueError),
                                       (0.0, ValueError), (math.nan, ValueError),
                                       (math.inf, ValueError), ("10", TypeError),
                                       (True, TypeError), (None, TypeError)],
                         ids=["0", "-1", "-0.5", "0.0", "nan", "inf", "str", "bool", "None"])
def test_decay_steps_validation(name, value, err):
    arg = "first_decay_steps" if name == "CosineDecayRestarts" else "decay_steps"
    with pytest.raises(err, match=arg):
        DECAY_STEPS_CTORS[name](value)


@pytest.mark.parametrize("boundaries,values", [
    ([1, 2], [0.1, 0.2]), ([1], [0.1, 0.2, 0.3]), ([], []), ([1, 2, 3], [0.1]),
], ids=["too-few-values", "too-many-values", "both-empty", "one-value"])
def test_piecewise_length_mismatch(boundaries, values):
    with pytest.raises(ValueError, match="boundaries"):
        S.PiecewiseConstantDecay(boundaries, values)


def test_piecewise_other_validation():
    with pytest.raises(ValueError, match="boundaries"):
        S.PiecewiseConstantDecay([5, 2], [0.1, 0.2, 0.3])
    with pytest.raises(TypeError, match="values"):
        S.PiecewiseConstantDecay([5], [0.1, "x"])
    with pytest.raises(TypeError, match="boundaries"):
        S.PiecewiseConstantDecay(["5"], [0.1, 0.2])
    with pytest.raises(ValueError, match="values"):
        S.PiecewiseConstantDecay([5], [0.1, math.nan])
    # a single value and no boundaries is a constant
    assert S.PiecewiseConstantDecay([], [0.3])(1000) == 0.3


@pytest.mark.parametrize("ctor,err,match", [
    (lambda: S.ExponentialDecay("0.1", 10, 0.5), TypeError, "initial_learning_rate"),
    (lambda: S.ExponentialDecay(math.nan, 10, 0.5), ValueError, "initial_learning_rate"),
    (lambda: S.ExponentialDecay(0.1, 10, math.inf), ValueError, "decay_rate"),
    (lambda: S.ExponentialDecay(0.1, 10, 0.5, staircase="yes"), TypeError, "staircase"),
    (lambda: S.InverseTimeDecay(0.1, 10, None), TypeError, "decay_rate"),
    (lambda: S.InverseTimeDecay(0.1, 10, 0.5, staircase=1), TypeError, "staircase"),
    (lambda: S.PolynomialDecay(0.1, 10, cycle=1), TypeError, "cycle"),
    (lambda: S.PolynomialDecay(0.1, 10, power="2"), TypeError, "power"),
    (lambda: S.PolynomialDecay(0.1, 10, end_learning_rate=math.nan), ValueError,
     "end_learning_rate"),
    (lambda: S.CosineDecay(0.1, 10, alpha="0"), TypeError, "alpha"),
    (lambda: S.CosineDecay(0.1, 10, warmup_target=0.2, warmup_steps=-1), ValueError,
     "warmup_steps"),
    (lambda: S.CosineDecay(0.1, 10, warmup_target="0.2"), TypeError, "warmup_target"),
    (lambda: S.CosineDecayRestarts(0.1, 10, t_mul=0.0), ValueError, "t_mul"),
    (lambda: S.CosineDecayRestarts(0.1, 10, t_mul=-2.0), ValueError, "t_mul"),
    (lambda: S.CosineDecayRestarts(0.1, 10, m_mul=None), TypeError, "m_mul"),
    (lambda: S.CosineDecayRestarts(0.1, 10, alpha=math.inf), ValueError, "alpha"),
], ids=["lr0-str", "lr0-nan", "rate-inf", "staircase-str", "inverse-rate-None",
        "inverse-staircase-int", "cycle-int", "power-str", "end-nan", "alpha-str",
        "warmup-steps-negative", "warmup-target-str", "t_mul-0", "t_mul-negative",
        "m_mul-None", "restarts-alpha-inf"])
def test_argument_validation(ctor, err, match):
    with pytest.raises(err, match=match):
        ctor()


def test_base_class_is_abstract():
    with pytest.raises(NotImplementedError):
        S.LearningRateSchedule()(0)
    with pytest.raises(NotImplementedError):
        S.LearningRateSchedule().get_config()


# ------------------------------------------------------------- serialization
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_serialize_round_trip(case):
    _, schedule, _, steps = case
    data = S.serialize(schedule)
    assert data["class_name"] == type(schedule).__name__
    assert data["module"] == "keras.optimizers.schedules"
    assert data["config"] == schedule.get_config()
    again = S.deserialize(json.loads(json.dumps(data)))
    assert type(again) is type(schedule) and again == schedule
    assert again.get_config() == schedule.get_config()
    assert type(schedule).from_config(schedule.get_config()) == schedule
    for step in steps:
        assert again(step) == schedule(step)
    assert type(schedule).__name__ in repr(schedule)


def test_equality_depends_on_config():
    assert S.ExponentialDecay(0.1, 10, 0.5) == S.ExponentialDecay(0.1, 10, 0.5)
    assert S.ExponentialDecay(0.1, 10, 0.5) != S.ExponentialDecay(0.1, 10, 0.6)
    assert S.ExponentialDecay(0.1, 10, 0.5) != S.InverseTimeDecay(0.1, 10, 0.5)


@pytest.mark.parametrize("bad,err", [
    ({"class_name": "StepDecay", "config": {}}, ValueError),
    ({"config": {}}, ValueError), ("ExponentialDecay", ValueError), (None, ValueError),
    ({"class_name": "ExponentialDecay", "config": {"decay_steps": 0, "initial_learning_rate":
                                                   0.1, "decay_rate": 0.5}}, ValueError),
], ids=["unknown-class", "no-class_name", "str", "None", "invalid-config"])
def test_deserialize_refuses(bad, err):
    with pytest.raises(err):
        S.deserialize(bad)


def test_deserialize_unknown_lists_valid_names():
    with pytest.raises(ValueError, match="StepDecay") as info:
        S.deserialize({"class_name": "StepDecay", "config": {}})
    for name in ("ExponentialDecay", "CosineDecayRestarts", "PiecewiseConstantDecay"):
        assert name in str(info.value)


def test_serialize_refuses_non_schedules():
    with pytest.raises(TypeError, match="schedule"):
        S.serialize(lambda step: 0.1)


# --------------------------------------------------------------- against Keras
@pytest.fixture(scope="module")
def keras_schedules():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    keras = pytest.importorskip("keras")
    old = keras.config.floatx()
    keras.config.set_floatx("float64")
    yield keras
    keras.config.set_floatx(old)


def keras_values(keras, schedule, steps):
    """Keras' schedule at every step; vectorised with jax.vmap on the JAX backend."""
    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp
        return np.asarray(jax.vmap(schedule)(jnp.asarray(steps)), dtype=np.float64)
    return np.array([float(np.asarray(schedule(s))) for s in steps])


KERAS_STEPS = list(range(0, 160)) + [199, 200, 201, 500, 1000, 1209, 1210, 1211, 1110, 3000]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_keras(keras_schedules, case):
    keras = keras_schedules
    _, schedule, _, _ = case
    kclass = getattr(keras.optimizers.schedules, type(schedule).__name__)
    ksched = kclass.from_config(schedule.get_config())
    expected = keras_values(keras, ksched, KERAS_STEPS)
    got = np.array([schedule(s) for s in KERAS_STEPS])
    # Keras evaluates parts of some schedules in float32: rtol 1e-6, and an atol of
    # float32 rounding at these rates (<= 0.2) where the rate itself is near 0.
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("t_mul,m_mul,first", [(3.0, 0.5, 10), (10.0, 0.5, 10), (1.5, 0.7, 7),
                                               (2.0, 0.9, 5), (1.0, 0.8, 6)],
                         ids=["t3", "t10", "t1.5", "t2", "t1"])
def test_restarts_match_keras_over_many_periods(keras_schedules, t_mul, m_mul, first):
    keras = keras_schedules
    args = dict(initial_learning_rate=1.0, first_decay_steps=first, t_mul=t_mul,
                m_mul=m_mul, alpha=0.1)
    ksched = keras.optimizers.schedules.CosineDecayRestarts(**args)
    schedule = S.CosineDecayRestarts(**args)
    steps = list(range(0, 2000))
    expected = keras_values(keras, ksched, steps)
    got = np.array([schedule(s) for s in steps])
    bad = [s for s, g, e in zip(steps, got, expected) if not math.isclose(g, e, rel_tol=1e-6)]
    assert not bad, f"differs from Keras at steps {bad[:10]}: " + ", ".join(
        f"{s}: {schedule(s)} vs {float(expected[s])}" for s in bad[:3])


def test_keras_serialized_form_and_objects_are_accepted(keras_schedules):
    keras = keras_schedules
    ks = keras.optimizers.schedules
    for kobj in [ks.ExponentialDecay(0.1, 7, 0.9, staircase=True),
                 ks.CosineDecay(0.1, 10, alpha=0.1, warmup_target=0.3, warmup_steps=2),
                 ks.PiecewiseConstantDecay([2, 5], [0.3, 0.2, 0.1]),
                 ks.CosineDecayRestarts(0.2, 3, t_mul=1.0, m_mul=0.5)]:
        ours = S.deserialize(ks.serialize(kobj))
        assert type(ours).__name__ == type(kobj).__name__
        np.testing.assert_allclose([ours(s) for s in range(20)],
                                   keras_values(keras, kobj, list(range(20))), rtol=1e-6)
        # a Keras schedule object given as learning_rate becomes a fusedopt schedule
        opt = fusedopt.SGD(learning_rate=kobj)
        assert isinstance(opt.get_config()["learning_rate"], dict)
        assert opt.learning_rate == ours(0)
    # and fusedopt's serialized form loads in Keras
    back = ks.deserialize(S.serialize(S.InverseTimeDecay(0.1, 4, 0.5, staircase=True)))
    assert float(np.asarray(back(9))) == pytest.approx(S.InverseTimeDecay(0.1, 4, 0.5, True)(9))
