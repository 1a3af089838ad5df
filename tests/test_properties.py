"""Property-based tests (hypothesis) over random layouts, hyperparameters and options.

- The CPU path equals the golden formulas of tests/test_golden.py (scalar Python
  written from KERAS_RULES.md) for every optimizer.
- The GPU path equals the CPU path: the real kernels under the CPU emulator here,
  and on a real GPU where there is one. skip_nonfinite is part of the draw.
- Random invalid arguments are refused with a TypeError/ValueError naming the
  argument, and nothing changes.
"""

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fusedopt
from conftest import OPTIMIZER_NAMES
from emulator import emulate
from fusedopt import cuda
from test_golden import golden

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def unit(lo=0.0, hi=1.0):
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False)


# Valid hyperparameters per optimizer (bounded away from numerically degenerate corners
# such as Ftrl with an empty accumulator and no l2, where the update divides by zero).
HYPER = {
    "SGD": st.fixed_dictionaries({"momentum": unit(0, 0.99), "nesterov": st.booleans()}),
    "RMSprop": st.fixed_dictionaries({"rho": unit(0, 0.99), "momentum": unit(0, 0.9),
                                      "epsilon": unit(1e-7, 0.5), "centered": st.booleans()}),
    "Adagrad": st.fixed_dictionaries({"initial_accumulator_value": unit(0, 1),
                                      "epsilon": unit(1e-7, 0.5)}),
    "Adadelta": st.fixed_dictionaries({"rho": unit(0, 0.99), "epsilon": unit(1e-7, 0.5)}),
    "Adam": st.fixed_dictionaries({"beta_1": unit(0, 0.99), "beta_2": unit(0, 0.999),
                                   "epsilon": unit(1e-7, 0.5), "amsgrad": st.booleans()}),
    "AdamW": st.fixed_dictionaries({"beta_1": unit(0, 0.99), "weight_decay": unit(0, 0.5),
                                    "amsgrad": st.booleans()}),
    "Adamax": st.fixed_dictionaries({"beta_1": unit(0, 0.99), "beta_2": unit(0, 0.999),
                                     "epsilon": unit(1e-7, 0.5)}),
    "Nadam": st.fixed_dictionaries({"beta_1": unit(0, 0.99), "beta_2": unit(0, 0.999),
                                    "epsilon": unit(1e-7, 0.5)},
                                   optional={"schedule_decay": unit(0, 1)}),
    "Ftrl": st.fixed_dictionaries({
        "learning_rate_power": unit(-1, 0), "initial_accumulator_value": unit(0.01, 1),
        "l1_regularization_strength": unit(0, 0.1), "l2_regularization_strength": unit(0, 0.1),
        "l2_shrinkage_regularization_strength": unit(0, 0.1), "beta": unit(0, 1)}),
    "Lion": st.fixed_dictionaries({"beta_1": unit(0.01, 0.99), "beta_2": unit(0, 0.999)}),
    "ScheduleFreeAdamW": st.fixed_dictionaries({
        "beta_1": unit(0.05, 0.99), "beta_2": unit(0, 0.999), "epsilon": unit(1e-8, 0.5),
        "warmup_steps": st.integers(0, 5)}),
    "Lamb": st.fixed_dictionaries({"beta_1": unit(0, 0.99), "beta_2": unit(0, 0.999),
                                   "epsilon": unit(1e-7, 0.5)}),
    "Adafactor": st.fixed_dictionaries({
        "beta_2_decay": unit(-1, -0.1), "epsilon_1": unit(1e-30, 1e-3),
        "epsilon_2": unit(0, 0.1), "clip_threshold": unit(0.1, 2),
        "relative_step": st.booleans()}),
    "Muon": st.fixed_dictionaries({
        "adam_beta_1": unit(0, 0.99), "adam_beta_2": unit(0, 0.999), "epsilon": unit(1e-7, 0.5),
        "adam_weight_decay": st.one_of(st.none(), unit(0, 0.3)), "momentum": unit(0, 0.99),
        "ns_steps": st.integers(0, 5), "nesterov": st.booleans(),
        "rms_rate": st.one_of(st.none(), unit(0, 1)), "adam_lr_ratio": unit(0, 2)}),
}
assert set(HYPER) == set(OPTIMIZER_NAMES)

CLIP = st.one_of(st.just({}), st.builds(lambda v: {"clipnorm": v}, unit(0.01, 5)),
                 st.builds(lambda v: {"global_clipnorm": v}, unit(0.01, 5)),
                 st.builds(lambda v: {"clipvalue": v}, unit(0.01, 5)))


KERNEL_OPTIMIZERS = tuple(n for n in OPTIMIZER_NAMES if getattr(fusedopt, n).rule in
                          fusedopt._kernels.rule_names())


@st.composite
def configurations(draw, kernels=False):
    """An optimizer and valid arguments; with `kernels`, only what the kernels run
    (no reference-only rule, EMA or gradient accumulation)."""
    cls_name = draw(st.sampled_from(KERNEL_OPTIMIZERS if kernels else OPTIMIZER_NAMES))
    kwargs = dict(draw(HYPER[cls_name]))
    if not kernels and draw(st.booleans()):
        kwargs.update(use_ema=True, ema_momentum=draw(unit(0, 1)),
                      ema_overwrite_frequency=draw(st.sampled_from([None, 1, 2])))
    if not kernels and draw(st.booleans()):
        kwargs["gradient_accumulation_steps"] = draw(st.integers(2, 3))
    kwargs["learning_rate"] = draw(unit(1e-3, 0.3))
    kwargs.update(draw(CLIP))
    if cls_name != "AdamW" and draw(st.booleans()):
        kwargs["weight_decay"] = draw(unit(0, 0.3))
    if draw(st.booleans()):
        kwargs["loss_scale_factor"] = draw(st.sampled_from([0.25, 2.0, 1024.0, 3.0]))
    return cls_name, kwargs


# Layouts: empty segments, scalars, single elements, odd sizes, many segments.
SHAPE = st.one_of(st.just(()), st.just((0,)), st.just((1,)),
                  st.integers(2, 9).map(lambda n: (n,)),
                  st.tuples(st.integers(1, 4), st.integers(1, 5)),
                  st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)))
LAYOUTS = st.lists(SHAPE, min_size=1, max_size=12)


def values(seed, size, steps):
    rng = np.random.default_rng(seed)
    p0 = rng.normal(size=size)
    grads = [rng.normal(size=size) * rng.uniform(0.05, 3.0) for _ in range(steps)]
    return p0, grads


def assert_close(actual, desired, rtol, what, scale=None):
    """Elementwise relative, with an absolute floor of rtol times `scale` (default: the
    buffer's largest value). Cancellations between state terms (Ftrl's n'^p - n^p with a
    tiny gradient) turn last-bit differences of pow into small absolute errors, so the
    floor must follow the magnitudes that meet in the update, state included."""
    desired = np.asarray(desired, dtype=np.float64)
    if scale is None:
        scale = float(np.max(np.abs(desired), initial=0.0))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=rtol * scale, err_msg=what)


@settings(max_examples=150, **SETTINGS)
@given(config=configurations(), layout=LAYOUTS, seed=st.integers(0, 2**32 - 1))
def test_cpu_path_equals_the_golden_formulas(config, layout, seed):
    cls_name, kwargs = config
    sizes = [math.prod(s) for s in layout]
    p0, grads = values(seed, sum(sizes), steps=3)
    opt = getattr(fusedopt, cls_name)(**kwargs)
    params = fusedopt.FlatBuffer(p0.copy(), layout)
    expected = golden(cls_name, kwargs, shapes=layout, p0=p0.tolist(),
                      grads=[g.tolist() for g in grads])
    for step, (g, (p, slots)) in enumerate(zip(grads, expected)):
        opt.apply(g, params)
        assert_close(params.data, p, 1e-9, f"params, step {step}")
        for name, vals in slots.items():
            assert_close(opt.slots()[name], vals, 1e-9, f"{name}, step {step}")


def run_both(cls_name, kwargs, layout, seed, dtype, gpu_setup, poison_steps=()):
    """The CPU path and a GPU path (set up by `gpu_setup(opt, params)`) on the same
    inputs; `poison_steps` get a NaN or inf gradient element."""
    size = sum(math.prod(s) for s in layout)
    p0, grads = values(seed, size, steps=4)
    cpu_opt = getattr(fusedopt, cls_name)(**kwargs)
    gpu_opt = getattr(fusedopt, cls_name)(**kwargs)
    cpu = fusedopt.FlatBuffer(p0.astype(dtype), layout)
    gpu = gpu_setup(gpu_opt, fusedopt.FlatBuffer(p0.astype(dtype), layout))
    for step, g in enumerate(grads):
        g = g.astype(dtype)
        if step in poison_steps and size:
            g[step % size] = [np.nan, np.inf, -np.inf][step % 3]
        cpu_opt.apply(g, cpu)
        gpu_opt.apply(cuda.module_for(gpu.device).asarray(g), gpu)
        rtol = 1e-12 if dtype == np.float64 else 2e-5
        buffers = [cpu.data] + list(cpu_opt.slots().values())
        scale = max(float(np.max(np.abs(b[np.isfinite(b)]), initial=0.0)) for b in buffers)
        assert_close(cuda.to_device(gpu.data, "cpu"), cpu.data, rtol, f"params, step {step}",
                     scale)
        for name in cpu_opt.slot_names:
            assert_close(cuda.to_device(gpu_opt.slots()[name], "cpu"), cpu_opt.slots()[name],
                         rtol, f"{name}, step {step}", scale)
    assert gpu_opt.iterations == cpu_opt.iterations
    assert gpu_opt.skipped_steps == cpu_opt.skipped_steps


SKIP = st.one_of(st.just(((), False)),
                 st.builds(lambda s: (s, True), st.sets(st.integers(0, 3), max_size=3)))


@settings(max_examples=40, **SETTINGS)
@given(config=configurations(kernels=True), layout=LAYOUTS, seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float64, np.float32]), skip=SKIP)
def test_emulated_gpu_path_equals_the_cpu_path(emulator_libraries, config, layout, seed,
                                               dtype, skip):
    cls_name, kwargs = config
    poison, skip_nonfinite = skip
    kwargs = {**kwargs, "skip_nonfinite": skip_nonfinite}

    def setup(opt, params):
        emulate(opt, params, emulator_libraries)
        return params

    run_both(cls_name, kwargs, layout, seed, dtype, setup, poison_steps=poison)


@pytest.mark.skipif(not cuda.gpu_available(), reason="no CUDA GPU")
@settings(max_examples=200, **SETTINGS)
@given(config=configurations(kernels=True), layout=LAYOUTS, seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float64, np.float32]), skip=SKIP)
def test_gpu_path_equals_the_cpu_path(config, layout, seed, dtype, skip):
    cls_name, kwargs = config
    poison, skip_nonfinite = skip
    run_both(cls_name, {**kwargs, "skip_nonfinite": skip_nonfinite}, layout, seed, dtype,
             lambda opt, params: params.to("gpu"), poison_steps=poison)


# ----------------------------------------------------------------- invalid input
BAD_NUMBERS = st.sampled_from([-1.0, -1e-9, math.nan, math.inf, -math.inf])
WRONG_TYPES = st.sampled_from(["0.1", [0.1], True, object(), b"1"])

# (argument, strategy of bad values) per optimizer; shared options for all of them.
BAD_COMMON = {
    "learning_rate": st.one_of(BAD_NUMBERS, st.sampled_from(["0.1", [0.1], True, b"1"])),
    "clipnorm": st.one_of(BAD_NUMBERS, WRONG_TYPES),
    "global_clipnorm": st.one_of(BAD_NUMBERS, WRONG_TYPES),
    "clipvalue": st.one_of(BAD_NUMBERS, WRONG_TYPES),
    "weight_decay": st.one_of(BAD_NUMBERS, WRONG_TYPES),
    "loss_scale_factor": st.one_of(BAD_NUMBERS, st.just(0.0), WRONG_TYPES),
}
BAD_BETA = st.one_of(st.sampled_from([-0.1, 1.0, 1.5, math.nan, math.inf]), WRONG_TYPES)
BAD_SPECIFIC = {
    "SGD": {"momentum": st.one_of(st.sampled_from([-0.5, 1.5, math.nan]), WRONG_TYPES),
            "nesterov": st.sampled_from([1, "yes", None])},
    "RMSprop": {"rho": BAD_BETA, "epsilon": BAD_NUMBERS, "centered": st.just("no")},
    "Adagrad": {"initial_accumulator_value": BAD_NUMBERS, "epsilon": BAD_NUMBERS},
    "Adadelta": {"rho": BAD_BETA, "epsilon": BAD_NUMBERS},
    "Adam": {"beta_1": BAD_BETA, "beta_2": BAD_BETA, "epsilon": BAD_NUMBERS,
             "amsgrad": st.just(1)},
    "AdamW": {"beta_1": BAD_BETA, "weight_decay": st.one_of(BAD_NUMBERS, st.none())},
    "Adamax": {"beta_1": BAD_BETA, "beta_2": BAD_BETA, "epsilon": BAD_NUMBERS},
    "Nadam": {"beta_1": BAD_BETA, "beta_2": BAD_BETA, "schedule_decay": BAD_NUMBERS},
    "Ftrl": {"learning_rate_power": st.sampled_from([0.5, math.nan, math.inf]),
             "l1_regularization_strength": BAD_NUMBERS, "beta": BAD_NUMBERS,
             "l2_regularization_strength": BAD_NUMBERS,
             "l2_shrinkage_regularization_strength": BAD_NUMBERS,
             "initial_accumulator_value": BAD_NUMBERS, "learning_rate": st.just(0.0)},
    "Lion": {"beta_1": st.sampled_from([0.0, 1.0, -0.5, math.nan]), "beta_2": BAD_BETA},
    "ScheduleFreeAdamW": {"beta_1": st.sampled_from([0.0, 1.0, -0.5, math.nan]),
                          "beta_2": BAD_BETA, "epsilon": BAD_NUMBERS,
                          "warmup_steps": st.sampled_from([-1, 2.5, "3", True])},
    "Lamb": {"beta_1": BAD_BETA, "beta_2": BAD_BETA, "epsilon": BAD_NUMBERS},
    "Adafactor": {"beta_2_decay": st.sampled_from([0.5, math.nan, math.inf, "x"]),
                  "epsilon_1": BAD_NUMBERS, "epsilon_2": BAD_NUMBERS,
                  "clip_threshold": st.one_of(BAD_NUMBERS, st.just(0.0)),
                  "relative_step": st.sampled_from([1, "yes", None])},
    "Muon": {"adam_beta_1": BAD_BETA, "adam_beta_2": BAD_BETA, "momentum": BAD_BETA,
             "adam_weight_decay": BAD_NUMBERS, "ns_steps": st.sampled_from([-1, 2.0, "5"]),
             "nesterov": st.sampled_from([1, "yes", None]), "rms_rate": BAD_NUMBERS,
             "adam_lr_ratio": BAD_NUMBERS, "muon_a": st.sampled_from([math.nan, "3"]),
             "exclude_layers": st.sampled_from(["dense", [1], ["("]]),
             "segment_names": st.sampled_from(["a", [1], 3])},
}


@st.composite
def bad_constructor_argument(draw):
    cls_name = draw(st.sampled_from(OPTIMIZER_NAMES))
    options = {**BAD_COMMON, **BAD_SPECIFIC[cls_name]}
    arg = draw(st.sampled_from(sorted(options)))
    return cls_name, arg, draw(options[arg])


@settings(max_examples=300, **SETTINGS)
@given(bad=bad_constructor_argument())
def test_invalid_constructor_arguments_are_refused_by_name(bad):
    cls_name, arg, value = bad
    assume(not (arg == "learning_rate" and value == 0.0 and cls_name != "Ftrl"))
    with pytest.raises((TypeError, ValueError), match=arg):
        getattr(fusedopt, cls_name)(**{arg: value})


@st.composite
def bad_step(draw):
    """A valid optimizer and params, and one thing wrong with the step's gradients."""
    cls_name, kwargs = draw(configurations())
    layout = draw(LAYOUTS.filter(lambda lay: sum(math.prod(s) for s in lay) > 0))
    size = sum(math.prod(s) for s in layout)
    kind = draw(st.sampled_from(["dtype", "size", "ndim", "layout", "type", "alias",
                                 "schedule"]))
    return cls_name, kwargs, layout, size, kind


@settings(max_examples=150, **SETTINGS)
@given(bad=bad_step(), seed=st.integers(0, 2**32 - 1))
def test_invalid_steps_change_nothing(bad, seed):
    cls_name, kwargs, layout, size, kind = bad
    p0, grads = values(seed, size, steps=2)
    if kind == "schedule":  # a learning rate that turns bad on the second step
        kwargs = {**kwargs, "learning_rate": fusedopt.schedules.PiecewiseConstantDecay(
            [0], [0.01, -1.0 if cls_name != "Ftrl" else 0.0])}
    opt = getattr(fusedopt, cls_name)(**kwargs)
    params = fusedopt.FlatBuffer(p0.copy(), layout)
    opt.apply(grads[0], params)
    iterations = opt.iterations
    before = [params.data.copy()] + [s.copy() for s in opt.slots().values()]
    g = grads[1]
    bad_grads = {
        "dtype": g.astype(np.float32),
        "size": np.append(g, 1.0),
        "ndim": g.reshape(1, -1),
        "layout": fusedopt.FlatBuffer(g.copy(), [(size,)]) if len(layout) > 1
        else fusedopt.FlatBuffer(g.astype(np.float32), layout),
        "type": list(g),
        "alias": params.data,
        "schedule": g,
    }[kind]
    with pytest.raises((TypeError, ValueError)):
        opt.apply(bad_grads, params)
    after = [params.data] + list(opt.slots().values())
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert opt.iterations == iterations and opt.state_dict()["iterations"] == 1
