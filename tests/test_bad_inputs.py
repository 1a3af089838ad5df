"""Every bad input is refused with a TypeError or ValueError that names the argument
(and the allowed range where there is one), before any buffer or counter changes.

Refusals during apply() and load_state_dict() are checked bitwise: params, grads,
every slot, iterations and built-ness are snapshotted before the call and compared
after it.
"""

import itertools
import math
import re
import types
import warnings

import numpy as np
import pytest

import fusedopt
from conftest import LAYOUTS, random_grads, random_params
from fusedopt import FlatBuffer, schedules

LAYOUT = LAYOUTS["mixed"]
OPTIMIZERS = ["SGD", "RMSprop", "Adagrad", "Adadelta", "Adam", "AdamW", "Adamax", "Nadam",
              "Ftrl", "Lion"]


# ----------------------------------------------------------------------- helpers
def make_params(dtype=np.float64, seed=0, layout=LAYOUT):
    return FlatBuffer.from_arrays(random_params(layout, dtype, seed))


def make_grads(dtype=np.float64, seed=1, layout=LAYOUT):
    return FlatBuffer.from_arrays(random_grads(layout, dtype, seed, 1)[0])


def stepped(cls_name="Adam", steps=2, dtype=np.float64, layout=LAYOUT, **kwargs):
    """An optimizer that has taken `steps` steps, its params and a fresh grads buffer."""
    opt = getattr(fusedopt, cls_name)(**kwargs)
    params = make_params(dtype, layout=layout)
    for g in random_grads(layout, dtype, 5, steps):
        opt.apply(FlatBuffer.from_arrays(g), params)
    return opt, params, make_grads(dtype, seed=9, layout=layout)


def _raw(x):
    return x.data if isinstance(x, FlatBuffer) else x


def bitwise_equal(a, b):
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.array_equal(a.view(np.uint8), b.view(np.uint8)))


class Snapshot:
    """Copies of everything a refused call must leave alone."""

    def __init__(self, opt, *buffers):
        self.opt = opt
        self.iterations = opt.iterations
        self.built = opt.built
        self.slots = {k: v.copy() for k, v in opt.slots().items()}
        self.buffers = [(b, _raw(b).copy()) for b in buffers if b is not None]

    def assert_unchanged(self):
        opt = self.opt
        assert opt.iterations == self.iterations
        assert opt.built == self.built
        slots = opt.slots()
        assert set(slots) == set(self.slots)
        for name, before in self.slots.items():
            assert bitwise_equal(slots[name], before), f"slot {name} changed"
        for buf, before in self.buffers:
            assert bitwise_equal(_raw(buf), before), "a buffer changed"


def valid_names_in(message):
    return [n.strip() for n in message.split("valid arguments:")[1].split(",")]


# ------------------------------------------------------------ learning rate (ctor)
@pytest.mark.parametrize("cls_name", OPTIMIZERS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -0.1, -1, np.float32("nan"),
                                   np.float64(-1e-3)],
                         ids=["nan", "inf", "-inf", "-0.1", "-1", "np-f32-nan", "np-negative"])
def test_bad_learning_rate_value(cls_name, value):
    with pytest.raises(ValueError, match="learning_rate"):
        getattr(fusedopt, cls_name)(learning_rate=value)


@pytest.mark.parametrize("cls_name", OPTIMIZERS)
@pytest.mark.parametrize("value", ["0.1", True, None, [0.1], (0.1,), {"lr": 0.1}, 1 + 0j,
                                   np.array([0.1])],
                         ids=["str", "bool", "None", "list", "tuple", "dict", "complex",
                              "array"])
def test_bad_learning_rate_type(cls_name, value):
    with pytest.raises(TypeError, match="learning_rate"):
        getattr(fusedopt, cls_name)(learning_rate=value)


def test_keras2_lr_alias_is_validated_too():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(ValueError, match=r"learning_rate|`lr`"):
            fusedopt.Adam(lr=-1.0)
        with pytest.raises(TypeError, match=r"learning_rate|`lr`"):
            fusedopt.Adam(lr="0.1")


@pytest.mark.parametrize("value", [-0.1, math.nan, math.inf], ids=["neg", "nan", "inf"])
def test_bad_keras2_decay(value):
    with pytest.raises(ValueError, match="decay"):
        fusedopt.SGD(decay=value)
    with pytest.raises(TypeError, match="decay"):
        fusedopt.SGD(decay="0.1")


def test_learning_rate_setter_validates_and_keeps_old_value():
    opt = fusedopt.SGD(learning_rate=0.1)
    for bad, err in [(-1.0, ValueError), (math.nan, ValueError), ("0.1", TypeError),
                     (None, TypeError), (True, TypeError)]:
        with pytest.raises(err, match="learning_rate"):
            opt.learning_rate = bad
        assert opt.learning_rate == 0.1


# ------------------------------------------------------------ betas / rho: [0, 1)
BETAS = [("Adam", "beta_1"), ("Adam", "beta_2"), ("AdamW", "beta_1"), ("AdamW", "beta_2"),
         ("Adamax", "beta_1"), ("Adamax", "beta_2"), ("Nadam", "beta_1"), ("Nadam", "beta_2"),
         ("Lion", "beta_1"), ("Lion", "beta_2"), ("RMSprop", "rho"), ("Adadelta", "rho")]


@pytest.mark.parametrize("cls_name,arg", BETAS, ids=[f"{c}-{a}" for c, a in BETAS])
@pytest.mark.parametrize("value", [-0.1, 1.0, 1, 1.5, -1e-12], ids=["-0.1", "1.0", "int1",
                                                                     "1.5", "tiny-neg"])
def test_beta_out_of_range(cls_name, arg, value):
    with pytest.raises(ValueError, match=arg) as info:
        getattr(fusedopt, cls_name)(**{arg: value})
    # the message states the allowed range
    assert re.search(r"[\[(]0(\.0)?, 1(\.0)?\)", str(info.value)), str(info.value)


@pytest.mark.parametrize("cls_name,arg", BETAS, ids=[f"{c}-{a}" for c, a in BETAS])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_beta_not_finite(cls_name, arg, value):
    with pytest.raises(ValueError, match=arg):
        getattr(fusedopt, cls_name)(**{arg: value})


@pytest.mark.parametrize("cls_name,arg", [b for b in BETAS if b != ("Lion", "beta_1")],
                         ids=[f"{c}-{a}" for c, a in BETAS if (c, a) != ("Lion", "beta_1")])
def test_beta_boundaries_accepted(cls_name, arg):
    """0 (also as an int) and values just below 1 are in [0, 1)."""
    for value in (0, 0.0, 0.999999):
        opt = getattr(fusedopt, cls_name)(**{arg: value})
        assert getattr(opt, arg) == float(value)


@pytest.mark.parametrize("value", [0, 0.0, -0.5], ids=["int0", "0.0", "neg"])
def test_lion_beta_1_zero_refused(value):
    with pytest.raises(ValueError, match="beta_1"):
        fusedopt.Lion(beta_1=value)


# ------------------------------------------------------- non-negative hyperparameters
NON_NEGATIVE = [
    (c, "epsilon") for c in ("RMSprop", "Adagrad", "Adadelta", "Adam", "AdamW", "Adamax", "Nadam")
] + [
    ("SGD", "momentum"), ("RMSprop", "momentum"),
    ("Adagrad", "initial_accumulator_value"), ("Ftrl", "initial_accumulator_value"),
    ("Ftrl", "l1_regularization_strength"), ("Ftrl", "l2_regularization_strength"),
    ("Ftrl", "l2_shrinkage_regularization_strength"), ("Ftrl", "beta"),
    ("Nadam", "schedule_decay"),
] + [
    (c, opt) for c in ("SGD", "Adam", "Ftrl") for opt in
    ("clipnorm", "clipvalue", "global_clipnorm", "weight_decay")
] + [("AdamW", "weight_decay")]


@pytest.mark.parametrize("cls_name,arg", NON_NEGATIVE, ids=[f"{c}-{a}" for c, a in NON_NEGATIVE])
@pytest.mark.parametrize("value", [-1e-3, -1, -math.inf, math.nan], ids=["neg", "neg-int",
                                                                        "-inf", "nan"])
def test_negative_or_nonfinite_refused(cls_name, arg, value):
    with pytest.raises(ValueError, match=arg):
        getattr(fusedopt, cls_name)(**{arg: value})


@pytest.mark.parametrize("cls_name", ["SGD", "RMSprop"])
def test_momentum_above_one_refused(cls_name):
    with pytest.raises(ValueError, match="momentum") as info:
        getattr(fusedopt, cls_name)(momentum=1.5)
    assert "[0.0, 1.0]" in str(info.value)


@pytest.mark.parametrize("value", [0, 0.0, -1.0], ids=["int0", "0.0", "neg"])
def test_loss_scale_factor_must_be_positive(value):
    with pytest.raises(ValueError, match="loss_scale_factor"):
        fusedopt.Adam(loss_scale_factor=value)


# --------------------------------------------------------------------- clipping
CLIPS = ["clipnorm", "clipvalue", "global_clipnorm"]
CLIP_COMBOS = [c for r in (2, 3) for c in itertools.combinations(CLIPS, r)]


@pytest.mark.parametrize("combo", CLIP_COMBOS, ids=["+".join(c) for c in CLIP_COMBOS])
@pytest.mark.parametrize("value", [1.0, 0.0], ids=["1.0", "zero-still-counts"])
def test_two_clip_options_refused(combo, value):
    with pytest.raises(ValueError, match="Only one of") as info:
        fusedopt.SGD(**{c: value for c in combo})
    for c in combo:
        assert c in str(info.value)


# ------------------------------------------------------------- unknown arguments
UNKNOWN = [("Adam", "foo"), ("Adam", "momentum"), ("SGD", "beta_1"), ("Adam", "schedule_decay"),
           ("Lion", "epsilon"), ("Adagrad", "rho"), ("Ftrl", "amsgrad"), ("AdamW", "l1")]


@pytest.mark.parametrize("cls_name,arg", UNKNOWN, ids=[f"{c}-{a}" for c, a in UNKNOWN])
def test_unknown_argument_refused(cls_name, arg):
    with pytest.raises(ValueError, match=arg) as info:
        getattr(fusedopt, cls_name)(**{arg: 0.5})
    # the message lists the valid arguments
    assert "learning_rate" in valid_names_in(str(info.value))


@pytest.mark.parametrize("cls_name", OPTIMIZERS)
def test_unknown_argument_message_lists_only_real_arguments(cls_name):
    """Every name offered as 'valid' must really be accepted by the constructor."""
    with pytest.raises(ValueError) as info:
        getattr(fusedopt, cls_name)(not_an_argument=1)
    names = valid_names_in(str(info.value))
    for arg in ("args", "kwargs", "self"):
        assert arg not in names, f"{arg!r} offered as a valid argument: {names}"


# ---------------------------------------------------------------------- types
WRONG_TYPES = [
    ("Adam", "beta_1", "0.9"), ("Adam", "beta_1", True), ("Adam", "beta_1", None),
    ("Adam", "beta_1", [0.9]), ("Adam", "beta_2", 1j),
    ("Adam", "epsilon", "1e-7"), ("Adam", "epsilon", False), ("Adam", "epsilon", [1e-7]),
    ("SGD", "momentum", None), ("SGD", "momentum", True), ("SGD", "momentum", "0.9"),
    ("SGD", "nesterov", 1), ("SGD", "nesterov", "yes"), ("SGD", "nesterov", None),
    ("Adam", "amsgrad", 1), ("Adam", "amsgrad", None), ("RMSprop", "centered", "no"),
    ("RMSprop", "rho", None), ("Adadelta", "rho", "0.9"),
    ("Adam", "clipnorm", "1"), ("Adam", "clipnorm", True), ("Adam", "clipvalue", [1.0]),
    ("Adam", "global_clipnorm", "2"), ("Adam", "weight_decay", "0.1"),
    ("Adam", "weight_decay", True), ("AdamW", "weight_decay", "0.1"),
    ("Adam", "loss_scale_factor", "2"), ("Adam", "name", 5), ("Adam", "skip_nonfinite", 1),
    ("Ftrl", "l1_regularization_strength", "0.1"), ("Ftrl", "l2_regularization_strength", None),
    ("Ftrl", "learning_rate_power", None), ("Ftrl", "beta", [0.0]),
    ("Adagrad", "initial_accumulator_value", None), ("Nadam", "schedule_decay", "0.004"),
    ("Lion", "beta_1", None), ("Adam", "ema_momentum", "0.99"),
]


@pytest.mark.parametrize("cls_name,arg,value", WRONG_TYPES,
                         ids=[f"{c}-{a}-{type(v).__name__}" for c, a, v in WRONG_TYPES])
def test_wrong_type_refused(cls_name, arg, value):
    with pytest.raises(TypeError, match=arg):
        getattr(fusedopt, cls_name)(**{arg: value})


def test_ints_and_numpy_scalars_accepted_where_keras_wants_floats():
    opt = fusedopt.SGD(learning_rate=1, momentum=0)
    assert opt.momentum == 0.0 and opt.learning_rate == 1.0
    opt = fusedopt.Adam(learning_rate=np.float32(0.5), beta_1=np.float64(0.5),
                        amsgrad=np.bool_(True))
    assert opt.beta_1 == 0.5 and opt.amsgrad is True


# ------------------------------------------------------------ optimizer specifics
def test_adamw_weight_decay_none_refused():
    with pytest.raises(ValueError, match="weight_decay"):
        fusedopt.AdamW(weight_decay=None)


@pytest.mark.parametrize("value", [0.1, 1.0, 1e-9], ids=["0.1", "1", "tiny"])
def test_ftrl_positive_learning_rate_power_refused(value):
    with pytest.raises(ValueError, match="learning_rate_power"):
        fusedopt.Ftrl(learning_rate_power=value)


def test_ftrl_zero_learning_rate_refused():
    with pytest.raises(ValueError, match="learning_rate"):
        fusedopt.Ftrl(learning_rate=0.0)


def test_ftrl_power_zero_and_negative_accepted():
    assert fusedopt.Ftrl(learning_rate_power=0.0).learning_rate_power == 0.0
    assert fusedopt.Ftrl(learning_rate_power=-2).learning_rate_power == -2.0


BAD_KERAS_OPTIONS = [
    ({"gradient_accumulation_steps": 1}, ValueError, "gradient_accumulation_steps"),
    ({"gradient_accumulation_steps": -2}, ValueError, "gradient_accumulation_steps"),
    ({"gradient_accumulation_steps": 2.0}, TypeError, "gradient_accumulation_steps"),
    ({"gradient_accumulation_steps": True}, TypeError, "gradient_accumulation_steps"),
    ({"use_ema": 1}, TypeError, "use_ema"),
    ({"use_ema": "yes"}, TypeError, "use_ema"),
    ({"ema_overwrite_frequency": 2}, ValueError, "use_ema"),  # would do nothing
    ({"use_ema": True, "ema_overwrite_frequency": 0}, ValueError, "ema_overwrite_frequency"),
    ({"use_ema": True, "ema_overwrite_frequency": 1.5}, TypeError, "ema_overwrite_frequency"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_KERAS_OPTIONS,
                         ids=[",".join(f"{k}={v}" for k, v in c[0].items())
                              for c in BAD_KERAS_OPTIONS])
def test_bad_ema_and_accumulation_options_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        fusedopt.Adam(**kwargs)


def test_ema_and_accumulation_off_values_accepted():
    """Keras' defaults, and its 0 for 'no accumulation', load from a Keras config."""
    opt = fusedopt.Adam(use_ema=False, ema_momentum=0.99, ema_overwrite_frequency=None,
                        gradient_accumulation_steps=0)
    config = opt.get_config()
    assert config["use_ema"] is False and config["gradient_accumulation_steps"] is None


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan], ids=["neg", "1.5", "nan"])
def test_ema_momentum_out_of_range(value):
    with pytest.raises(ValueError, match="ema_momentum"):
        fusedopt.Adam(ema_momentum=value)


# ---------------------------------------------- learning rate refused at step time
class DividesByZeroAfter(schedules.LearningRateSchedule):
    """A user schedule whose arithmetic fails from step `k` on."""

    def __init__(self, k):
        self.k = k

    def __call__(self, step):
        return 0.01 / (self.k - step) if step < self.k else 0.01 / 0


class NanAfter(schedules.LearningRateSchedule):
    """A user schedule that returns NaN from step `k` on."""

    def __init__(self, k):
        self.k = k

    def __call__(self, step):
        return 0.01 if step < self.k else math.nan

    def get_config(self):
        return {"k": self.k}


STEP_TIME_LR = [
    ("callable-nan", lambda: math.nan, ValueError),
    ("callable-inf", lambda: math.inf, ValueError),
    ("callable-negative", lambda: -0.01, ValueError),
    ("callable-None", lambda: None, TypeError),
    ("callable-list", lambda: [0.1], TypeError),
    ("callable-complex", lambda: 0.1 + 0j, TypeError),
    ("callable-str", lambda: "0.01", TypeError),
    ("callable-bool", lambda: True, TypeError),
    ("callable-np-nan", lambda: np.float32("nan"), ValueError),
    ("piecewise-negative-after-2", schedules.PiecewiseConstantDecay([1], [0.01, -0.01]),
     ValueError),
    ("exponential-negative-initial", schedules.ExponentialDecay(-0.01, 10, 0.5), ValueError),
    ("user-schedule-nan-after-2", NanAfter(2), ValueError),
    ("user-schedule-divides-by-zero", DividesByZeroAfter(1), ValueError),
]


@pytest.mark.parametrize("make,arg", [
    (lambda: schedules.ExponentialDecay(0.01, 2, -0.5), "decay_rate"),  # complex rates
    (lambda: schedules.InverseTimeDecay(0.01, 2, -1.0), "decay_rate"),  # a pole at step 2
    (lambda: schedules.PolynomialDecay(0.01, 2, power=-1.0), "power"),  # 1/0 at the end
    (lambda: schedules.CosineDecayRestarts(0.01, 1, t_mul=0.5), "t_mul"),  # log domain
], ids=["exponential-negative-rate", "inverse-time-pole", "polynomial-negative-power",
        "restarts-t_mul-below-1"])
def test_schedule_arguments_that_would_fail_later_are_refused_up_front(make, arg):
    """Keras accepts these and fails (or returns NaN/complex) some steps later."""
    with pytest.raises(ValueError, match=arg):
        make()


@pytest.mark.parametrize("cls_name", ["SGD", "Nadam", "Ftrl"])
@pytest.mark.parametrize("case", STEP_TIME_LR, ids=[c[0] for c in STEP_TIME_LR])
def test_bad_learning_rate_at_step_time_changes_nothing(case, cls_name):
    _, lr, err = case
    opt = getattr(fusedopt, cls_name)(learning_rate=lr)
    params, grads = make_params(), make_grads()
    failed_at = None
    for step in range(3):  # a schedule may turn bad after a few good steps
        snap = Snapshot(opt, params, grads)
        try:
            opt.apply(grads, params)
        except Exception as e:  # noqa: BLE001 - the type is checked just below
            failed_at = step
            assert isinstance(e, err), f"{type(e).__name__}: {e}"
            # names the argument, or the schedule that stands for it
            assert ("learning_rate" in str(e) or type(lr).__name__ in str(e)), str(e)
            snap.assert_unchanged()
            break
    assert failed_at is not None, "a bad learning rate was used for 3 steps"


def test_ftrl_schedule_reaching_zero_refused_at_step_time():
    opt = fusedopt.Ftrl(learning_rate=schedules.PiecewiseConstantDecay([0], [0.1, 0.0]))
    params, grads = make_params(), make_grads()
    opt.apply(grads, params)
    snap = Snapshot(opt, params, grads)
    with pytest.raises(ValueError, match="learning_rate"):
        opt.apply(grads, params)
    snap.assert_unchanged()


def test_ftrl_learning_rate_setter_zero_refused_by_step_time():
    opt, params, grads = stepped("Ftrl", learning_rate=0.1)
    try:
        opt.learning_rate = 0.0
    except ValueError as e:  # refusing at once is fine too
        assert "learning_rate" in str(e)
        return
    snap = Snapshot(opt, params, grads)
    with pytest.raises(ValueError, match="learning_rate"):
        opt.apply(grads, params)
    snap.assert_unchanged()


def test_keras2_decay_never_yields_bad_lr():
    with pytest.warns(DeprecationWarning):
        opt = fusedopt.SGD(learning_rate=0.1, decay=0.5)
    params, grads = make_params(), make_grads()
    for _ in range(3):
        opt.apply(grads, params)
    assert opt.learning_rate == pytest.approx(0.1 / (1 + 0.5 * 3))


# ------------------------------------------------------------------------ grads
class FakeGpuArray:
    """Enough of a CuPy array for fusedopt to see an array on gpu:0 (no CuPy needed)."""

    __module__ = "cupy._core.core"

    def __init__(self, like):
        self._a = like
        self.device = types.SimpleNamespace(id=0)
        self.dtype, self.ndim, self.size = like.dtype, like.ndim, like.size
        self.shape, self.nbytes = like.shape, like.nbytes
        self.flags = types.SimpleNamespace(c_contiguous=True)
        self.data = types.SimpleNamespace(ptr=0xDEAD0000)


def _bad_grads(params):
    size, f32 = params.size, np.float32
    other_shapes = [s for s in reversed(params.shapes)]  # same size, other layout
    big = np.zeros(2 * size)
    return {
        "flat-other-layout-same-size": FlatBuffer(np.zeros(size), other_shapes),
        "flat-other-size": FlatBuffer.zeros([(size + 1,)], np.float64),
        "flat-one-segment-same-size": FlatBuffer.zeros([(size,)], np.float64),
        "flat-float32": FlatBuffer.zeros(params.shapes, f32),
        "raw-wrong-size": np.zeros(size - 1),
        "raw-2d": np.zeros((1, size)),
        "raw-float32": np.zeros(size, f32),
        "raw-int": np.zeros(size, np.int64),
        "raw-non-contiguous": big[::2],
        "list": [0.0] * size,
        "None": None,
        "raw-on-gpu": FakeGpuArray(np.zeros(size)),
        "flat-on-gpu": FlatBuffer(FakeGpuArray(np.zeros(size)), params.shapes),
    }


BAD_GRADS = list(_bad_grads(make_params()))


@pytest.mark.parametrize("built", [True, False], ids=["built", "unbuilt"])
@pytest.mark.parametrize("which", BAD_GRADS)
def test_bad_grads_refused_with_nothing_changed(which, built):
    if built:
        opt, params, _ = stepped("Adam", amsgrad=True)
    else:
        opt, params = fusedopt.Adam(amsgrad=True), make_params()
    grads = _bad_grads(params)[which]
    on_host = isinstance(_raw(grads), np.ndarray)
    snap = Snapshot(opt, params, grads if on_host else None)
    with pytest.raises((TypeError, ValueError), match="grads"):
        opt.apply(grads, params)
    snap.assert_unchanged()


def test_grads_in_float64_for_float32_params_refused():
    opt, params, _ = stepped("Adam", dtype=np.float32)
    grads = make_grads(np.float64)
    snap = Snapshot(opt, params, grads)
    with pytest.raises(ValueError, match="dtype"):
        opt.apply(grads, params)
    snap.assert_unchanged()


def test_params_on_another_device_than_the_state_refused():
    """Built on the CPU; the same layout on a GPU must not be updated with CPU state."""
    opt, params, _ = stepped("Adam")
    gpu_params = FlatBuffer(FakeGpuArray(params.data), params.shapes)
    gpu_grads = FlatBuffer(FakeGpuArray(params.data.copy()), params.shapes)
    snap = Snapshot(opt, params)
    with pytest.raises(ValueError, match="params") as info:
        opt.apply(gpu_grads, gpu_params)
    assert "gpu:0" in str(info.value) and "cpu" in str(info.value)
    snap.assert_unchanged()


def test_params_on_another_device_than_grads_refused():
    params = FlatBuffer(FakeGpuArray(np.zeros(10)), [(10,)])
    opt = fusedopt.Adam()
    with pytest.raises(ValueError, match="grads"):
        opt.apply(np.zeros(10), params)
    assert not opt.built and opt.iterations == 0


@pytest.mark.parametrize("other", ["other-layout", "other-dtype", "other-size"])
def test_params_other_than_the_built_layout_refused(other):
    opt, params, _ = stepped("RMSprop", centered=True, momentum=0.5)
    new = {
        "other-layout": FlatBuffer(params.data.copy(), list(reversed(params.shapes))),
        "other-dtype": FlatBuffer.from_arrays(params.views(), dtype=np.float32),
        "other-size": make_params(layout=LAYOUT + [(2,)]),
    }[other]
    grads = new.zeros_like()
    snap = Snapshot(opt, params, new, grads)
    with pytest.raises(ValueError, match="params"):
        opt.apply(grads, new)
    snap.assert_unchanged()


@pytest.mark.parametrize("what", [3, "params", [1.0, 2.0], np.zeros((2, 3))],
                         ids=["int", "str", "list", "2d-array"])
def test_bad_params_type(what):
    opt = fusedopt.SGD()
    with pytest.raises((TypeError, ValueError), match="params"):
        opt.apply(np.zeros(6), what)
    assert not opt.built and opt.iterations == 0


# ------------------------------------------------------------- shared memory
def _aliasing(params, opt):
    backing = np.zeros(params.size * 2)
    backing[: params.size] = params.data
    p2 = FlatBuffer(backing[: params.size], params.shapes)
    return {
        "same-flatbuffer": (params, params),
        "params-data": (params.data, params),
        "flatbuffer-over-params-data": (FlatBuffer(params.data, params.shapes), params),
        "partial-overlap": (backing[params.size // 2: params.size // 2 + params.size], p2),
        "grads-is-a-slot": (opt.slots()["momentum"], params),
        "grads-flatbuffer-over-a-slot": (FlatBuffer(opt.slots()["velocity"], params.shapes),
                                         params),
    }


ALIAS_CASES = ["same-flatbuffer", "params-data", "flatbuffer-over-params-data",
               "partial-overlap", "grads-is-a-slot", "grads-flatbuffer-over-a-slot"]


@pytest.mark.parametrize("which", ALIAS_CASES)
def test_grads_sharing_memory_refused(which):
    opt, params, _ = stepped("Adam")
    grads, target = _aliasing(params, opt)[which]
    if target is not params:  # the partial-overlap case uses params in a bigger buffer
        opt, _, _ = stepped("Adam")
    snap = Snapshot(opt, target, grads)
    with pytest.raises(ValueError, match="share memory"):
        opt.apply(grads, target)
    snap.assert_unchanged()


def test_adjacent_but_disjoint_grads_accepted():
    n = make_params().size
    backing = np.zeros(2 * n)
    params = FlatBuffer(backing[:n], LAYOUT)
    params.data[:] = make_params().data
    grads = backing[n:]
    grads[:] = 0.5
    opt = fusedopt.SGD(learning_rate=0.1)
    opt.apply(grads, params)
    assert opt.iterations == 1
    np.testing.assert_array_equal(params.data, make_params().data - 0.1 * 0.5)


def test_params_aliasing_optimizer_state_refused():
    """Params that ARE one of the optimizer's slots would corrupt both."""
    opt, params, grads = stepped("Adam")
    alias = FlatBuffer(opt.slots()["momentum"], params.shapes)
    snap = Snapshot(opt, params, grads)
    with pytest.raises(ValueError, match="share memory|params"):
        opt.apply(grads, alias)
    snap.assert_unchanged()


@pytest.mark.parametrize("cls_name", ["Adam", "RMSprop", "Ftrl"])
@pytest.mark.parametrize("built", [True, False], ids=["built", "unbuilt"])
def test_read_only_params_refused_before_any_change(cls_name, built):
    """A read-only buffer cannot be updated; the refusal must come before the slots move."""
    if built:
        opt, params, grads = stepped(cls_name)
    else:
        opt, params, grads = getattr(fusedopt, cls_name)(), make_params(), make_grads()
    params.data.flags.writeable = False
    snap = Snapshot(opt, params, grads)
    with pytest.raises(ValueError, match="params|read-only"):
        opt.apply(grads, params)
    snap.assert_unchanged()


# -------------------------------------------------------------- buffer dtypes
@pytest.mark.parametrize("arrays", [
    [np.zeros(3, np.float32), np.zeros(2, np.float64)],
    [np.zeros(3, np.int64)], [np.zeros(3, np.int32)], [np.zeros(3, np.float16),
                                                       np.zeros(3, np.float32)],
    [np.zeros(3, np.complex128)], [np.zeros(3, bool)], [np.zeros(3, np.longdouble)]
    if np.dtype(np.longdouble) != np.float64 else [np.zeros(3, np.uint8)],
], ids=["mixed-f32-f64", "int64", "int32", "mixed-f16-f32", "complex", "bool",
        "longdouble-or-uint8"])
def test_from_arrays_refuses_bad_dtypes(arrays):
    with pytest.raises(ValueError, match="dtype|bfloat16 or float16"):
        FlatBuffer.from_arrays(arrays)


@pytest.mark.parametrize("dtype", [np.int64, np.int16, np.complex64, "int8", bool])
def test_from_arrays_refuses_non_float_target_dtype(dtype):
    with pytest.raises(ValueError, match="dtype"):
        FlatBuffer.from_arrays([np.zeros(3)], dtype=dtype)


def test_from_arrays_refuses_complex_input_even_with_float_target():
    with pytest.raises(ValueError, match="complex"):
        FlatBuffer.from_arrays([np.zeros(3, np.complex128)], dtype=np.float64)


@pytest.mark.parametrize("dtype", [np.int64, np.int16, np.complex128, bool])
def test_flatbuffer_and_raw_params_refuse_non_float(dtype):
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        FlatBuffer(np.zeros(4, dtype), [(4,)])
    opt = fusedopt.SGD()
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        opt.apply(np.zeros(4, dtype), np.zeros(4, dtype))
    assert not opt.built and opt.iterations == 0


# ------------------------------------------------------------------ state_dict
def _state(cls_name="Adam", dtype=np.float64, layout=LAYOUT, **kwargs):
    opt, _, _ = stepped(cls_name, dtype=dtype, layout=layout, **kwargs)
    return opt.state_dict()


def _malformed():
    good = _state()
    size = make_params().size

    def edit(**changes):
        s = {k: (dict(v) if isinstance(v, dict) else v) for k, v in good.items()}
        for path, value in changes.items():
            keys = path.split("__")
            target = s
            for k in keys[:-1]:
                target = target[k]
            if value is _DELETE:
                del target[keys[-1]]
            else:
                target[keys[-1]] = value
        return s

    return {
        "not-a-dict": ([good], TypeError),
        "None": (None, TypeError),
        "missing-optimizer": (edit(optimizer=_DELETE), ValueError),
        "missing-iterations": (edit(iterations=_DELETE), ValueError),
        "missing-layout": (edit(layout=_DELETE), ValueError),
        "missing-slots": (edit(slots=_DELETE), ValueError),
        "other-optimizer": (edit(optimizer="adamax"), ValueError),
        "optimizer-not-a-str": (edit(optimizer=5), ValueError),
        "iterations-str": (edit(iterations="3"), TypeError),
        "iterations-float": (edit(iterations=2.0), TypeError),
        "iterations-bool": (edit(iterations=True), TypeError),
        "iterations-negative": (edit(iterations=-1), ValueError),
        "layout-not-a-dict": (edit(layout=[1, 2]), ValueError),
        "layout-missing-dtype": (edit(layout__dtype=_DELETE), ValueError),
        "layout-shapes-garbage": (edit(layout__shapes="abc"), ValueError),
        "slots-not-a-dict": (edit(slots=[np.zeros(size)] * 2), ValueError),
        "slot-missing": (edit(slots__velocity=_DELETE), ValueError),
        "slot-extra": (edit(slots__velocity_hat=np.zeros(size)), ValueError),
        "slot-list": (edit(slots__momentum=[0.0] * size), TypeError),
        "slot-wrong-size": (edit(slots__momentum=np.zeros(size + 1)), ValueError),
        "slot-2d": (edit(slots__momentum=np.zeros((1, size))), ValueError),
        "slot-wrong-dtype": (edit(slots__momentum=np.zeros(size, np.float32)), ValueError),
        "slot-int": (edit(slots__momentum=np.zeros(size, np.int64)), ValueError),
        "skipped-steps-negative": (edit(skipped_steps=-1), ValueError),
        "last-step-skipped-not-bool": (edit(last_step_skipped="no"), TypeError),
    }


_DELETE = object()
MALFORMED = list(_malformed())


@pytest.mark.parametrize("built", [True, False], ids=["built", "unbuilt"])
@pytest.mark.parametrize("which", MALFORMED)
def test_malformed_state_refused_with_nothing_changed(which, built):
    state, err = _malformed()[which]
    if built:
        opt, params, grads = stepped("Adam", steps=3)
    else:
        opt, params, grads = fusedopt.Adam(), make_params(), make_grads()
    snap = Snapshot(opt, params, grads)
    with pytest.raises(err):
        opt.load_state_dict(state)
    snap.assert_unchanged()
    # an unbuilt optimizer holds no pending state after the refusal: it starts fresh
    if not built:
        with pytest.raises(ValueError, match="no state"):
            opt.state_dict()


MISMATCHED = {
    # name: (source optimizer, its kwargs, its layout, its dtype), target is Adam/LAYOUT/f64
    "from-adamax": ("Adamax", {}, LAYOUT, np.float64),
    "from-adamw": ("AdamW", {}, LAYOUT, np.float64),   # same slot names, other optimizer
    "from-nadam": ("Nadam", {}, LAYOUT, np.float64),
    "other-layout-same-size": ("Adam", {}, list(reversed(LAYOUT)), np.float64),
    "other-size": ("Adam", {}, LAYOUT + [(3,)], np.float64),
    "other-dtype": ("Adam", {}, LAYOUT, np.float32),
    "amsgrad-on": ("Adam", {"amsgrad": True}, LAYOUT, np.float64),
}


@pytest.mark.parametrize("which", list(MISMATCHED))
def test_mismatched_state_refused_when_built(which):
    src_cls, src_kwargs, layout, dtype = MISMATCHED[which]
    state = _state(src_cls, dtype=dtype, layout=layout, **src_kwargs)
    opt, params, grads = stepped("Adam", steps=3)
    snap = Snapshot(opt, params, grads)
    with pytest.raises(ValueError, match=r"optimizer|layout|slots|dtype|size|shape|segment"):
        opt.load_state_dict(state)
    snap.assert_unchanged()


SLOT_CONFIGS = [
    ("Adam", {"amsgrad": True}, {}),
    ("Adam", {}, {"amsgrad": True}),
    ("SGD", {"momentum": 0.9}, {}),
    ("SGD", {}, {"momentum": 0.9}),
    ("RMSprop", {"centered": True}, {}),
    ("RMSprop", {}, {"momentum": 0.5}),
    ("RMSprop", {"momentum": 0.5}, {"centered": True}),
]


@pytest.mark.parametrize("built", [True, False], ids=["built", "unbuilt"])
@pytest.mark.parametrize("cls_name,src,dst", SLOT_CONFIGS,
                         ids=[f"{c}-{s}-into-{d}" for c, s, d in SLOT_CONFIGS])
def test_other_slot_configuration_refused(cls_name, src, dst, built):
    state = _state(cls_name, **src)
    if built:
        opt, params, grads = stepped(cls_name, steps=3, **dst)
    else:
        opt, params, grads = getattr(fusedopt, cls_name)(**dst), make_params(), make_grads()
    snap = Snapshot(opt, params, grads)
    with pytest.raises(ValueError, match="slots"):
        opt.load_state_dict(state)
    snap.assert_unchanged()


def test_state_with_nan_slots_is_not_a_validation_matter():
    """Values are not judged (NaN state is legal Keras state); only structure is."""
    state = _state()
    state["slots"]["momentum"][:] = np.nan
    opt = fusedopt.Adam()
    opt.load_state_dict(state)
    assert opt.iterations == state["iterations"]


# ------------------------------------------------------------------------ get
def test_get_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="adamx") as info:
        fusedopt.get("adamx")
    for name in fusedopt.available():
        assert name in str(info.value)


@pytest.mark.parametrize("name", ["multioptimizer", "fusedoptimizer", "", " adam"])
def test_get_names_that_are_not_fusedopt_optimizers(name):
    with pytest.raises(ValueError, match="Unknown optimizer"):
        fusedopt.get(name)


@pytest.mark.parametrize("identifier,err", [
    (5, TypeError), (None, TypeError), (fusedopt.Adam, TypeError), (["adam"], TypeError),
    ({"config": {}}, ValueError), ({"class_name": "nope", "config": {}}, ValueError),
    ({"class_name": 5}, TypeError),
], ids=["int", "None", "class", "list", "no-class_name", "unknown-class_name",
        "class_name-int"])
def test_get_bad_identifier(identifier, err):
    with pytest.raises(err):
        fusedopt.get(identifier)


def test_get_dict_validates_the_config():
    with pytest.raises(ValueError, match="beta_1"):
        fusedopt.get({"class_name": "Adam", "config": {"beta_1": 2.0}})
    with pytest.raises(ValueError, match="bogus"):
        fusedopt.get({"class_name": "Adam", "config": {"bogus": 1}})
    with pytest.raises(TypeError, match="config"):
        fusedopt.Adam.from_config([("beta_1", 0.5)])


def test_lr_and_learning_rate_together_are_refused():
    with pytest.raises(ValueError, match="lr"):
        fusedopt.Adam(learning_rate=0.1, lr=0.2)


def test_ftrl_learning_rate_setter_refuses_zero():
    opt = fusedopt.Ftrl()
    with pytest.raises(ValueError, match="learning_rate"):
        opt.learning_rate = 0.0
    assert opt.learning_rate == 0.001


def test_nan_beta_message_states_the_range():
    with pytest.raises(ValueError, match=r"beta_1.*\[0\.0, 1\.0\)"):
        fusedopt.Adam(beta_1=math.nan)


@pytest.mark.parametrize("grads, params, name", [
    (np.ones(4, "int16"), np.ones(4, "int16"), "params"),
    (np.ones(4, "int64"), np.ones(4, "int64"), "params"),
    (np.ones(4), np.ones(8)[::2], "params"),
    (np.ones(4, "float16"), np.ones(4, "float64"), "grads"),
    (np.ones(4, "float64"), np.ones(4, "float32"), "grads"),
    (np.ones(8)[::2], np.ones(4), "grads"),
], ids=["int16", "int64", "strided-params", "float16-grads-float64-params",
        "float64-grads-float32-params", "strided-grads"])
def test_raw_array_errors_name_params_and_grads(grads, params, name):
    """Raw arrays are wrapped in a FlatBuffer internally; its argument `data` must not
    leak into the message."""
    opt = fusedopt.Adam()
    with pytest.raises(ValueError) as info:
        opt.apply(grads, params)
    message = str(info.value)
    assert f"`{name}`" in message and "`data`" not in message, message
    assert not opt.built
