"""Assigning a hyperparameter (`opt.momentum = 2.0`) runs exactly the constructor's
checks, cross-argument rules included; a refused assignment changes nothing; an
accepted one reaches the next step and the `_hyperparameters_changed` hook; and
`save` never writes a configuration that `load` refuses."""

import math

import numpy as np
import pytest

import fusedopt
from conftest import OPTIMIZER_NAMES
from fusedopt import FlatBuffer, schedules
from fusedopt.optimizer import Hyperparameter, _hyperparameter_fields

# Values that probe every check: wrong types, non-finite, out of every range used.
PROBES = [None, True, "0.5", math.nan, math.inf, -1.0, -1e-12, 0, 0.0, 0.5, 1, 1.0, 2.0,
          -0.5]


def fields_of(cls_name):
    cls = getattr(fusedopt, cls_name)
    return [name for name in _hyperparameter_fields(cls)]


CASES = [(cls_name, name) for cls_name in OPTIMIZER_NAMES for name in fields_of(cls_name)]


def outcome(make):
    """("ok", config) or (exception type, message) of building an optimizer."""
    try:
        return "ok", make().get_config()
    except (TypeError, ValueError) as e:
        return type(e), str(e)


def assigned(cls, name, value):
    opt = cls()
    setattr(opt, name, value)
    return opt


@pytest.mark.parametrize("cls_name,name", CASES, ids=[f"{c}.{n}" for c, n in CASES])
def test_assignment_is_checked_exactly_like_the_constructor(cls_name, name):
    cls = getattr(fusedopt, cls_name)
    for value in PROBES:
        by_constructor = outcome(lambda: cls(**{name: value}))
        by_assignment = outcome(lambda: assigned(cls, name, value))
        assert by_assignment == by_constructor, (name, value)


@pytest.mark.parametrize("cls_name,name", CASES, ids=[f"{c}.{n}" for c, n in CASES])
def test_refused_assignment_changes_nothing(cls_name, name):
    cls = getattr(fusedopt, cls_name)
    opt = cls()
    before = opt.get_config()
    for value in PROBES:
        try:
            setattr(opt, name, value)
        except (TypeError, ValueError):
            assert opt.get_config() == before, (name, value)
        else:
            opt = cls()  # accepted: start again from the defaults


def test_the_issue_examples():
    opt = fusedopt.SGD(0.1, momentum=0.5)
    with pytest.raises(ValueError, match=r"`momentum` must be in \[0.0, 1.0\]"):
        opt.momentum = 2.0
    with pytest.raises(ValueError, match="`clipnorm`"):
        opt.clipnorm = -0.5
    assert (opt.momentum, opt.clipnorm) == (0.5, None)

    opt = fusedopt.SGD(0.1, clipnorm=0.5)
    with pytest.raises(ValueError, match="Only one of `clipnorm`, `clipvalue`"):
        opt.clipvalue = 0.01
    assert (opt.clipnorm, opt.clipvalue) == (0.5, None)
    opt.clipnorm = None  # one at a time is fine
    opt.clipvalue = 0.01
    assert opt.get_config()["clipvalue"] == 0.01


def test_cross_argument_rules_hold_on_assignment():
    with pytest.raises(ValueError, match="weight_decay"):
        fusedopt.AdamW().weight_decay = None
    ftrl = fusedopt.Ftrl(learning_rate=0.1)
    with pytest.raises(ValueError, match="learning_rate"):
        ftrl.learning_rate = 0.0
    assert ftrl.learning_rate == 0.1
    opt = fusedopt.Adam(learning_rate=schedules.ExponentialDecay(0.1, 10, 0.5))
    with pytest.raises(TypeError, match="schedule"):
        opt.learning_rate = 0.5


def test_an_assigned_value_drives_the_next_step():
    params = FlatBuffer.from_arrays([np.linspace(-1, 1, 7)])
    grads = params.full_like(0.3)
    assigned_opt = fusedopt.SGD(0.1, momentum=0.5)
    assigned_opt.apply(grads, params.copy())  # built and stepped with momentum 0.5
    assigned_opt.momentum, assigned_opt.learning_rate, assigned_opt.clipvalue = 0.8, 0.2, 0.1
    reference = fusedopt.SGD(0.2, momentum=0.8, clipvalue=0.1)
    reference.load_state_dict(assigned_opt.state_dict())
    a, b = params.copy(), params.copy()
    assigned_opt.apply(grads, a)
    reference.apply(grads, b)
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_array_equal(assigned_opt.slots()["momentum"], reference.slots()["momentum"])


def test_nadam_schedule_follows_an_assigned_beta_1():
    opt = fusedopt.Nadam()
    for t in range(1, 6):
        opt._rule_scalars(0.001, t)  # fills the memoised product for beta_1 = 0.9
    opt.beta_1 = 0.5
    assert opt._rule_scalars(0.001, 5) == fusedopt.Nadam(beta_1=0.5)._rule_scalars(0.001, 5)


def test_a_setting_that_would_change_the_state_slots_is_refused_once_there_is_state():
    params = FlatBuffer.from_arrays([np.ones(5)])
    opt = fusedopt.SGD(0.1)
    opt.momentum = 0.9  # no state yet: fine
    opt.momentum = 0.0
    opt.apply(params.full_like(1.0), params)
    with pytest.raises(ValueError, match="`momentum`.*already has state"):
        opt.momentum = 0.5
    assert opt.momentum == 0.0 and opt.slot_names == ()
    adam = fusedopt.Adam()
    adam.build(params)
    with pytest.raises(ValueError, match="`amsgrad`"):
        adam.amsgrad = True
    adam.beta_1 = 0.5  # same slots: fine after build
    # A loaded but not yet built state counts too.
    source = fusedopt.RMSprop()
    source.build(params)
    rms = fusedopt.RMSprop()
    rms.load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match="`centered`"):
        rms.centered = True


def test_hook_runs_after_each_accepted_assignment_only(monkeypatch):
    calls = []

    def record(opt, name):  # sees the value already stored
        calls.append((name, getattr(opt, name) if name != "learning_rate"
                      else opt._learning_rate))

    # Patched on the class, not subclassed: a subclass would join the registry
    # (fusedopt.available()) for the rest of the session.
    monkeypatch.setattr(fusedopt.Adam, "_hyperparameters_changed", record)
    opt = fusedopt.Adam(learning_rate=0.01, clipnorm=1.0)
    assert calls == []  # the constructor does not call it
    opt.beta_1 = 0.8
    opt.learning_rate = 0.5
    opt.clipnorm = None
    opt.weight_decay = 0.1
    opt.loss_scale_factor = 2.0
    opt.epsilon = 1e-3
    assert calls == [("beta_1", 0.8), ("learning_rate", 0.5), ("clipnorm", None),
                     ("weight_decay", 0.1), ("loss_scale_factor", 2.0), ("epsilon", 1e-3)]
    for name, bad in [("beta_2", 1.0), ("learning_rate", -1.0), ("epsilon", "x")]:
        with pytest.raises((TypeError, ValueError)):
            setattr(opt, name, bad)
    assert len(calls) == 6


def test_skip_nonfinite_is_read_only():
    opt = fusedopt.Adam(skip_nonfinite=True)
    with pytest.raises(AttributeError):
        opt.skip_nonfinite = False
    assert opt.skip_nonfinite is True


# fusedopt's own settings, off by default: in a config only when set (to the value
# here), so that a Keras optimizer's config stays one Keras can read.
FUSEDOPT_ONLY = {("Adam", "epsilon_after_bias_correction"): True,
                 ("AdamW", "epsilon_after_bias_correction"): True,
                 ("Muon", "segment_names"): ["kernel"],
                 ("SGD", "momentum_in_gradient_units"): True,
                 ("SGD", "dampening"): 0.5}
# What a FUSEDOPT_ONLY setting needs beside it to be accepted.
FUSEDOPT_ONLY_WITH = {("SGD", "dampening"): {"momentum_in_gradient_units": True}}


def test_every_rule_hyperparameter_is_declared_once_and_in_the_config():
    for cls_name in OPTIMIZER_NAMES:
        cls = getattr(fusedopt, cls_name)
        config = cls().get_config()
        for name in cls._hyperparameters:
            assert isinstance(getattr(cls, name), Hyperparameter)
            if (cls_name, name) in FUSEDOPT_ONLY:
                assert name not in config, (cls_name, name)
                value = FUSEDOPT_ONLY[cls_name, name]
                extra = FUSEDOPT_ONLY_WITH.get((cls_name, name), {})
                assert cls(**{name: value}, **extra).get_config()[name] == value, \
                    (cls_name, name)
            elif not (cls_name == "Nadam" and name == "schedule_decay"):  # Keras 2 only
                assert name in config, (cls_name, name)


@pytest.mark.parametrize("cls_name,name", CASES, ids=[f"{c}.{n}" for c, n in CASES])
def test_save_never_writes_what_load_refuses(tmp_path, cls_name, name):
    """Whatever assignments are accepted, the file loads back with the same config."""
    cls = getattr(fusedopt, cls_name)
    # The mixed-precision switches are for 16-bit params (float32 ones refuse them at
    # build, so save refuses too); bfloat16 needs safetensors.
    sixteen = name in ("master_weights", "stochastic_rounding")
    params = FlatBuffer.from_arrays([np.ones(4, "float32")],
                                    dtype="bfloat16" if sixteen else None)
    for value in PROBES:
        opt = cls(learning_rate=0.1)
        try:
            setattr(opt, name, value)
        except (TypeError, ValueError):
            continue
        path = tmp_path / ("x.safetensors" if sixteen else "x.npz")
        fusedopt.save(path, opt, params)
        loaded, _ = fusedopt.load(path)
        assert loaded.get_config() == opt.get_config()


def test_save_refuses_a_configuration_load_would_refuse(tmp_path):
    """Even one reached by writing private storage, bypassing the checks."""
    opt = fusedopt.SGD(0.1, clipnorm=0.5)
    opt.__dict__["_clipvalue"] = 0.01
    params = FlatBuffer.from_arrays([np.ones(4)])
    with pytest.raises(ValueError, match="cannot be loaded.*Only one of"):
        fusedopt.save(tmp_path / "x.npz", opt, params)
    assert list(tmp_path.iterdir()) == [] and not opt.built
