"""get_config / from_config, get(), the learning_rate property and setter, Keras 2
spellings in the config, and available()."""

import json
import os
import warnings

import numpy as np
import pytest

import fusedopt
from conftest import CASES, LAYOUTS, RULE_CASES, case_ids, random_grads, random_params
from fusedopt import FlatBuffer, schedules

LAYOUT = LAYOUTS["odd"]
ALL_NAMES = ["adadelta", "adafactor", "adagrad", "adam", "adamax", "adamw", "ftrl", "lamb",
             "lion", "muon", "nadam", "rmsprop", "schedulefreeadamw", "sgd"]
CLASS_OF = {"adadelta": "Adadelta", "adafactor": "Adafactor", "adagrad": "Adagrad",
            "adam": "Adam", "adamax": "Adamax", "adamw": "AdamW", "ftrl": "Ftrl",
            "lamb": "Lamb", "lion": "Lion", "muon": "Muon", "nadam": "Nadam",
            "rmsprop": "RMSprop",
            "schedulefreeadamw": "ScheduleFreeAdamW", "sgd": "SGD"}
KERAS3_BASE_KEYS = {"name", "learning_rate", "weight_decay", "clipnorm", "global_clipnorm",
                    "clipvalue", "use_ema", "ema_momentum", "ema_overwrite_frequency",
                    "loss_scale_factor", "gradient_accumulation_steps"}


def bits_equal(a, b):
    return a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))


def run(opt, dtype=np.float64, steps=5):
    params = FlatBuffer.from_arrays(random_params(LAYOUT, dtype, 11))
    for g in random_grads(LAYOUT, dtype, 12, steps, scale=2.0):
        opt.apply(FlatBuffer.from_arrays(g), params)
    return params


def assert_same_run(a, b, dtype=np.float64):
    pa, pb = run(a, dtype), run(b, dtype)
    assert bits_equal(pa.data, pb.data)
    assert a.iterations == b.iterations
    assert list(a.slots()) == list(b.slots())
    for name in a.slots():
        assert bits_equal(a.slots()[name], b.slots()[name])


# ------------------------------------------------------------- round trip
@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_config_round_trip(case):
    _, cls_name, kwargs = case
    cls = getattr(fusedopt, cls_name)
    opt = cls(**kwargs)
    config = opt.get_config()
    assert KERAS3_BASE_KEYS <= set(config)
    for key, value in kwargs.items():  # every argument given is in the config, as given
        assert config[key] == value, key
    rebuilt = cls.from_config(config)
    assert type(rebuilt) is cls
    assert rebuilt.get_config() == config
    # through JSON (configs are plain data) and through get()
    via_json = cls.from_config(json.loads(json.dumps(config)))
    assert via_json.get_config() == config
    via_get = fusedopt.get({"class_name": cls_name, "config": config})
    assert type(via_get) is cls and via_get.get_config() == config
    # the rebuilt optimizer makes bitwise-identical updates
    for dtype in (np.float64, np.float32):
        assert_same_run(cls(**kwargs), cls.from_config(config), dtype)


def test_from_config_does_not_mutate_its_argument():
    config = fusedopt.Adam(learning_rate=schedules.ExponentialDecay(0.1, 5, 0.5)).get_config()
    snapshot = json.loads(json.dumps(config))
    fusedopt.Adam.from_config(config)
    assert config == snapshot


def test_round_trip_changes_the_update_when_the_config_changes():
    """A control for the round-trip test: a different config gives different bits."""
    config = fusedopt.Adam().get_config()
    config["beta_1"] = 0.8
    pa, pb = run(fusedopt.Adam()), run(fusedopt.Adam.from_config(config))
    assert not np.array_equal(pa.data, pb.data)


@pytest.mark.parametrize("schedule", [
    schedules.ExponentialDecay(0.1, 10, 0.5, staircase=True),
    schedules.InverseTimeDecay(0.1, 3, 0.5),
    schedules.PiecewiseConstantDecay([2, 4], [0.1, 0.05, 0.01]),
    schedules.PolynomialDecay(0.1, 4, power=2.0, cycle=True),
    schedules.CosineDecay(0.01, 5, alpha=0.1, warmup_target=0.1, warmup_steps=2),
    schedules.CosineDecayRestarts(0.1, 2, t_mul=1.0, m_mul=0.5, alpha=0.1),
], ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("cls_name", ["SGD", "Adam", "Ftrl"])
def test_schedule_in_config(schedule, cls_name):
    cls = getattr(fusedopt, cls_name)
    opt = cls(learning_rate=schedule)
    config = opt.get_config()
    assert config["learning_rate"] == schedules.serialize(schedule)
    assert config["learning_rate"]["class_name"] == type(schedule).__name__
    rebuilt = cls.from_config(json.loads(json.dumps(config)))
    restored = rebuilt._learning_rate
    assert isinstance(restored, type(schedule)) and restored == schedule
    assert restored is not schedule
    assert_same_run(cls(learning_rate=schedule), rebuilt)


def test_callable_learning_rate_in_config():
    def lr():
        return 0.02

    config = fusedopt.Adam(learning_rate=lr).get_config()
    assert config["learning_rate"] is lr
    assert fusedopt.Adam.from_config(config).learning_rate == 0.02


# ----------------------------------------------------------------------- get
@pytest.mark.parametrize("name", ALL_NAMES)
def test_get_by_name_any_case(name):
    cls = getattr(fusedopt, CLASS_OF[name])
    for spelling in (name, name.upper(), CLASS_OF[name], name.capitalize()):
        opt = fusedopt.get(spelling)
        assert type(opt) is cls
        assert opt.get_config() == cls().get_config()  # defaults
    assert fusedopt.get(name) is not fusedopt.get(name)  # a new instance each time


def test_get_by_dict():
    opt = fusedopt.get({"class_name": "Adam", "config": {"learning_rate": 0.1,
                                                         "amsgrad": True}})
    assert type(opt) is fusedopt.Adam and opt.amsgrad and opt.learning_rate == 0.1
    assert type(fusedopt.get({"class_name": "nadam"})) is fusedopt.Nadam  # config optional
    sched = fusedopt.get({"class_name": "SGD", "config": {
        "learning_rate": schedules.serialize(schedules.ExponentialDecay(0.1, 2, 0.5))}})
    assert sched.learning_rate == 0.1
    assert isinstance(sched._learning_rate, schedules.ExponentialDecay)


def test_get_by_instance_returns_the_same_object():
    opt = fusedopt.Ftrl(l1_regularization_strength=0.1)
    assert fusedopt.get(opt) is opt


def test_available_lists_every_optimizer():
    assert fusedopt.available() == ALL_NAMES
    for name in fusedopt.available():
        assert isinstance(fusedopt.get(name), fusedopt.FusedOptimizer)


# --------------------------------------------------- learning_rate property
def test_learning_rate_property_float():
    opt = fusedopt.SGD(learning_rate=0.05)
    assert opt.learning_rate == 0.05 and isinstance(opt.learning_rate, float)
    run(opt, steps=3)
    assert opt.learning_rate == 0.05


def test_learning_rate_property_int_becomes_float():
    opt = fusedopt.SGD(learning_rate=1)
    assert opt.learning_rate == 1.0 and isinstance(opt.learning_rate, float)
    assert isinstance(opt.get_config()["learning_rate"], float)


def test_learning_rate_property_follows_the_schedule():
    sched = schedules.ExponentialDecay(0.1, 2, 0.5)
    opt = fusedopt.Adam(learning_rate=sched)
    assert opt.learning_rate == sched(0)
    for k in range(1, 6):
        run(opt, steps=1)
        assert opt.iterations == k
        assert opt.learning_rate == sched(k)


def test_learning_rate_property_callable_and_keras2_decay():
    values = iter([0.3, 0.2])
    opt = fusedopt.SGD(learning_rate=lambda: next(values))
    assert opt.learning_rate == 0.3 and opt.learning_rate == 0.2
    with pytest.warns(DeprecationWarning):
        opt = fusedopt.SGD(learning_rate=0.1, decay=0.5)
    run(opt, steps=4)
    assert opt.learning_rate == pytest.approx(0.1 / (1 + 0.5 * 4))


def test_learning_rate_setter():
    opt = fusedopt.SGD(learning_rate=0.1)
    p = np.zeros(2)
    opt.apply(np.ones(2), p)
    opt.learning_rate = 0.5
    assert opt.learning_rate == 0.5 and opt.get_config()["learning_rate"] == 0.5
    opt.apply(np.ones(2), p)
    np.testing.assert_allclose(p, [-0.6, -0.6])
    opt.learning_rate = 2  # ints are fine
    assert opt.learning_rate == 2.0


def test_learning_rate_setter_refused_with_a_schedule():
    sched = schedules.PiecewiseConstantDecay([1], [0.1, 0.01])
    opt = fusedopt.Adam(learning_rate=sched)
    with pytest.raises(TypeError, match="schedule"):
        opt.learning_rate = 0.5
    assert opt._learning_rate is sched and opt.learning_rate == 0.1


# ------------------------------------------------------------ Keras 2 spellings
def test_lr_alias():
    with pytest.warns(DeprecationWarning, match="lr"):
        opt = fusedopt.Adam(lr=0.02)
    config = opt.get_config()
    assert config["learning_rate"] == 0.02 and "lr" not in config
    rebuilt = fusedopt.Adam.from_config(config)  # no warning on the way back
    assert rebuilt.learning_rate == 0.02


def test_lr_alias_with_schedule():
    sched = schedules.InverseTimeDecay(0.1, 1, 0.5)
    with pytest.warns(DeprecationWarning):
        opt = fusedopt.SGD(lr=sched)
    assert opt.get_config()["learning_rate"] == schedules.serialize(sched)


def test_decay_in_config():
    with pytest.warns(DeprecationWarning, match="decay"):
        opt = fusedopt.SGD(learning_rate=0.1, decay=0.01, momentum=0.5)
    config = opt.get_config()
    assert config["decay"] == 0.01
    with pytest.warns(DeprecationWarning):
        rebuilt = fusedopt.SGD.from_config(config)
    assert rebuilt.get_config() == config
    with pytest.warns(DeprecationWarning):
        assert_same_run(fusedopt.SGD(learning_rate=0.1, decay=0.01, momentum=0.5), rebuilt)


def test_decay_zero_is_silent_and_absent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = fusedopt.Adam(decay=0.0)
    assert "decay" not in opt.get_config()


@pytest.mark.parametrize("cls_name", ["RMSprop", "Adagrad", "Adadelta", "Adam", "AdamW",
                                      "Adamax", "Nadam"])
def test_epsilon_none_means_1e_7(cls_name):
    opt = getattr(fusedopt, cls_name)(epsilon=None)
    assert opt.epsilon == 1e-7 and opt.get_config()["epsilon"] == 1e-7
    assert_same_run(getattr(fusedopt, cls_name)(epsilon=None),
                    getattr(fusedopt, cls_name)(epsilon=1e-7))


def test_nadam_schedule_decay_in_config():
    assert "schedule_decay" not in fusedopt.Nadam().get_config()
    opt = fusedopt.Nadam(schedule_decay=0.004)
    config = opt.get_config()
    assert config["schedule_decay"] == 0.004
    rebuilt = fusedopt.Nadam.from_config(config)
    assert rebuilt.schedule_decay == 0.004
    assert_same_run(fusedopt.Nadam(schedule_decay=0.004), rebuilt)
    # and it matters: Keras 2's momentum schedule differs from Keras 3's
    assert not np.array_equal(run(fusedopt.Nadam()).data,
                              run(fusedopt.Nadam(schedule_decay=0.004)).data)


def test_nadam_schedule_decay_1_is_keras3():
    """0.96^(1*t) is Keras 3's schedule: same bits as no schedule_decay."""
    assert np.array_equal(run(fusedopt.Nadam()).data,
                          run(fusedopt.Nadam(schedule_decay=1.0)).data)


def test_skip_nonfinite_in_config_only_when_set():
    assert "skip_nonfinite" not in fusedopt.Adam().get_config()
    config = fusedopt.Adam(skip_nonfinite=True).get_config()
    assert config["skip_nonfinite"] is True
    assert fusedopt.Adam.from_config(config).skip_nonfinite is True


def test_name():
    assert fusedopt.Adam(name="opt1").get_config()["name"] == "opt1"
    assert fusedopt.Adam().get_config()["name"] == "adam"


# ------------------------------------------------------------- against Keras
@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    return pytest.importorskip("keras")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_default_config_has_keras_keys_and_values(keras, name):
    kconfig = getattr(keras.optimizers, CLASS_OF[name])().get_config()
    config = fusedopt.get(name).get_config()
    assert set(config) == set(kconfig)
    for key in set(config) - {"name", "learning_rate"}:
        assert config[key] == kconfig[key], key
    # Keras stores the float learning rate in a float32 variable
    assert config["learning_rate"] == pytest.approx(kconfig["learning_rate"], rel=1e-7)


@pytest.mark.parametrize("case", RULE_CASES, ids=case_ids(RULE_CASES))
def test_config_loads_in_keras_and_back(keras, case):
    _, cls_name, kwargs = case
    config = getattr(fusedopt, cls_name)(**kwargs).get_config()
    kopt = getattr(keras.optimizers, cls_name).from_config(config)
    back = fusedopt.get(kopt)
    assert type(back) is getattr(fusedopt, cls_name)
    kconfig, bconfig = kopt.get_config(), back.get_config()
    for key in set(config) - {"learning_rate"}:
        assert bconfig[key] == config[key] == kconfig[key], key
    assert bconfig["learning_rate"] == pytest.approx(config["learning_rate"], rel=1e-7)
