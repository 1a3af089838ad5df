"""state_dict / load_state_dict give an exact (bitwise) resume."""

import numpy as np
import pytest

import fusedopt
from conftest import CASES, LAYOUTS, case_ids, random_grads, random_params
from fusedopt import FlatBuffer, schedules

LAYOUT = LAYOUTS["mixed"]
WARMUP, N = 4, 5
DTYPES = [np.float64, np.float32]
DTYPE_IDS = ["f64", "f32"]


def bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(
        a.view(np.uint8), b.view(np.uint8))


def assert_same_state(a, b, pa, pb):
    assert a.iterations == b.iterations
    assert bits_equal(pa.data, pb.data), "params differ"
    sa, sb = a.slots(), b.slots()
    assert list(sa) == list(sb)
    for name in sa:
        assert bits_equal(sa[name], sb[name]), f"slot {name} differs"


def grads_list(dtype, seed, steps):
    return [FlatBuffer.from_arrays(g) for g in random_grads(LAYOUT, dtype, seed, steps, 1.5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=case_ids(CASES))
def test_resume_is_bitwise_exact(case, dtype):
    _, cls_name, kwargs = case
    cls = getattr(fusedopt, cls_name)
    params = FlatBuffer.from_arrays(random_params(LAYOUT, dtype, 1))
    opt = cls(**kwargs)
    for g in grads_list(dtype, 2, WARMUP):
        opt.apply(g, params)
    state, params_copy = opt.state_dict(), params.copy()
    assert state["iterations"] == WARMUP  # the calls applied (Keras' raw counter)
    n = kwargs.get("gradient_accumulation_steps") or 1  # iterations: updates done
    later = grads_list(dtype, 3, N)
    for g in later:
        opt.apply(g, params)

    resumed = cls.from_config(opt.get_config())
    resumed.load_state_dict(state)
    assert resumed.iterations == WARMUP // n
    for g in later:
        resumed.apply(g, params_copy)
    assert_same_state(opt, resumed, params, params_copy)
    assert opt.iterations == (WARMUP + N) // n
    # the state moved: a resume that restarted from scratch would not match
    assert not bits_equal(params.data, FlatBuffer.from_arrays(random_params(LAYOUT, dtype, 1)).data)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in (
    "adam-amsgrad", "rmsprop-centered-momentum-eps", "nadam", "ftrl-all", "sgd-momentum")],
    ids=lambda c: c[0])
def test_state_dict_contents(case):
    _, cls_name, kwargs = case
    opt = getattr(fusedopt, cls_name)(**kwargs)
    params = FlatBuffer.from_arrays(random_params(LAYOUT, np.float64, 1))
    for g in grads_list(np.float64, 2, 3):
        opt.apply(g, params)
    state = opt.state_dict()
    assert state["optimizer"] == cls_name.lower()
    assert state["iterations"] == 3
    assert state["layout"] == params.layout.to_dict()
    assert set(state["slots"]) == set(opt.slot_names) == set(opt.slots())
    for name, arr in state["slots"].items():
        assert arr.shape == (params.size,) and arr.dtype == params.dtype
        assert bits_equal(arr, opt.slots()[name])


def test_state_dict_values_are_copies():
    opt = fusedopt.Adam(amsgrad=True)
    params = FlatBuffer.from_arrays(random_params(LAYOUT, np.float64, 1))
    for g in grads_list(np.float64, 2, 3):
        opt.apply(g, params)
    live = {k: v.copy() for k, v in opt.slots().items()}
    state = opt.state_dict()
    for name, arr in state["slots"].items():
        assert not np.shares_memory(arr, opt.slots()[name])
        arr[:] = 1e9
    state["iterations"] = 99
    state["layout"]["shapes"][0][0] = 1000
    state["layout"]["dtype"] = "float32"
    assert opt.iterations == 3
    assert opt.state_dict()["layout"] == params.layout.to_dict()
    for name in live:
        assert bits_equal(opt.slots()[name], live[name])


def test_loaded_state_is_copied_not_aliased():
    src = fusedopt.Adam()
    params = FlatBuffer.from_arrays(random_params(LAYOUT, np.float64, 1))
    for g in grads_list(np.float64, 2, 3):
        src.apply(g, params)
    state = src.state_dict()
    keep = {k: v.copy() for k, v in state["slots"].items()}
    for built in (True, False):
        dst = fusedopt.Adam()
        if built:
            dst.build(params)
        dst.load_state_dict(state)
        for arr in state["slots"].values():
            arr[:] = -7.0  # mutate the dict after loading
        dst.build(params)
        for name, arr in dst.slots().items():
            assert bits_equal(arr, keep[name])
            assert not np.shares_memory(arr, state["slots"][name])
        for k, v in keep.items():
            state["slots"][k][:] = v


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cls_name,kwargs", [
    ("Adam", {"amsgrad": True}), ("Nadam", {}), ("Ftrl", {"initial_accumulator_value": 0.3}),
    ("Adagrad", {"initial_accumulator_value": 0.5}),
], ids=["adam-amsgrad", "nadam", "ftrl", "adagrad"])
def test_load_before_first_apply(cls_name, kwargs, dtype):
    """A state loaded into an unbuilt optimizer is pending and applied at build."""
    cls = getattr(fusedopt, cls_name)
    src = cls(**kwargs)
    params = FlatBuffer.from_arrays(random_params(LAYOUT, dtype, 1))
    for g in grads_list(dtype, 2, 3):
        src.apply(g, params)
    state, params_copy = src.state_dict(), params.copy()

    dst = cls(**kwargs)
    dst.load_state_dict(state)
    assert not dst.built and dst.iterations == 3
    # the pending state is reported back as it was loaded
    pending = dst.state_dict()
    assert pending["iterations"] == 3 and pending["layout"] == state["layout"]
    for name in state["slots"]:
        assert bits_equal(pending["slots"][name], state["slots"][name])
    later = grads_list(dtype, 3, 4)
    for g in later:
        src.apply(g, params)
        dst.apply(g, params_copy)
    assert_same_state(src, dst, params, params_copy)


def test_load_before_build_then_explicit_build():
    src = fusedopt.Adagrad(initial_accumulator_value=0.1)
    params = FlatBuffer.from_arrays(random_params(LAYOUT, np.float64, 1))
    src.apply(grads_list(np.float64, 2, 1)[0], params)
    dst = fusedopt.Adagrad(initial_accumulator_value=0.1)
    dst.load_state_dict(src.state_dict())
    dst.build(params)
    assert dst.built
    assert bits_equal(dst.slots()["accumulator"], src.slots()["accumulator"])
    # not the initial value: the loaded state won over the fresh slots
    assert not np.all(dst.slots()["accumulator"] == 0.1)


@pytest.mark.parametrize("how", ["other-shapes-same-size", "other-size", "other-dtype"])
def test_pending_state_mismatch_refused_at_build(how):
    src = fusedopt.Adam()
    params = FlatBuffer.from_arrays(random_params(LAYOUT, np.float64, 1))
    src.apply(grads_list(np.float64, 2, 1)[0], params)
    dst = fusedopt.Adam()
    dst.load_state_dict(src.state_dict())
    other = {
        "other-shapes-same-size": FlatBuffer(params.data.copy(), list(reversed(LAYOUT))),
        "other-size": FlatBuffer.from_arrays(random_params(LAYOUT + [(2,)], np.float64, 1)),
        "other-dtype": FlatBuffer.from_arrays(params.views(), dtype=np.float32),
    }[how]
    before, grads = other.data.copy(), other.zeros_like()
    with pytest.raises(ValueError, match="state_dict"):
        dst.apply(grads, other)
    with pytest.raises(ValueError, match="state_dict"):
        dst.build(other)
    assert not dst.built and dst.iterations == 1
    assert bits_equal(other.data, before)
    # the pending state is still there and still applies to the right params
    dst.apply(params.zeros_like(), params.copy())
    assert dst.built and dst.iterations == 2


def test_built_optimizer_refuses_state_of_other_layout():
    a, b = fusedopt.Adam(), fusedopt.Adam()
    pa = FlatBuffer.from_arrays(random_params(LAYOUT, np.float64, 1))
    pb = FlatBuffer(pa.data.copy(), list(reversed(LAYOUT)))
    a.apply(pa.zeros_like(), pa)
    b.apply(pb.zeros_like(), pb)
    with pytest.raises(ValueError, match="layout"):
        a.load_state_dict(b.state_dict())


def test_state_dict_before_build_refused():
    with pytest.raises(ValueError, match="no state"):
        fusedopt.Adam().state_dict()


def test_state_dict_after_build_without_apply():
    opt = fusedopt.Ftrl(initial_accumulator_value=0.25)
    params = FlatBuffer.from_arrays(random_params(LAYOUT, np.float32, 1))
    opt.build(params)
    state = opt.state_dict()
    assert state["iterations"] == 0
    assert np.all(state["slots"]["accumulator"] == np.float32(0.25))
    assert np.all(state["slots"]["linear"] == 0)


def test_load_into_itself_and_rewind():
    """Loading an earlier state into the same optimizer rewinds it exactly."""
    opt = fusedopt.Nadam()
    params = FlatBuffer.from_arrays(random_params(LAYOUT, np.float64, 1))
    gs = grads_list(np.float64, 2, 8)
    for g in gs[:3]:
        opt.apply(g, params)
    state, p3 = opt.state_dict(), params.copy()
    for g in gs[3:]:
        opt.apply(g, params)
    end_params, end_slots = params.data.copy(), {k: v.copy() for k, v in opt.slots().items()}
    opt.load_state_dict(state)
    params.data[:] = p3.data
    assert opt.iterations == 3
    for g in gs[3:]:
        opt.apply(g, params)
    assert bits_equal(params.data, end_params)
    for k, v in end_slots.items():
        assert bits_equal(opt.slots()[k], v)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("kwargs", [{}, {"schedule_decay": 0.004}, {"beta_1": 0.8}],
                         ids=["keras3", "keras2-schedule_decay", "beta_1"])
def test_nadam_resume_derives_u_product_from_iterations(kwargs, dtype):
    """Nadam keeps no u_product slot: it is replayed from iterations, bit for bit,
    whichever iteration count is loaded (also a smaller one than the memo's)."""
    params = FlatBuffer.from_arrays(random_params(LAYOUT, dtype, 1))
    gs = grads_list(dtype, 2, 30)
    ref = fusedopt.Nadam(**kwargs)
    states = {}
    for i, g in enumerate(gs):
        if i in (0, 7, 20):
            states[i] = (ref.state_dict() if ref.built else None, params.copy())
        ref.apply(g, params)
    assert set(ref.state_dict()["slots"]) == {"momentum", "velocity"}
    # resume from the latest point first, then rewind a long-lived optimizer to earlier ones
    reused = fusedopt.Nadam(**kwargs)
    for start in (20, 7):
        state, p = states[start]
        reused.load_state_dict(state)
        p = p.copy()
        for g in gs[start:]:
            reused.apply(g, p)
        assert bits_equal(p.data, params.data), f"resume at {start} differs"
        assert reused.iterations == 30


@pytest.mark.parametrize("schedule", [
    schedules.ExponentialDecay(0.05, decay_steps=3, decay_rate=0.5, staircase=True),
    schedules.PiecewiseConstantDecay([4, 6], [0.1, 0.01, 0.001]),
    schedules.CosineDecay(0.01, 6, alpha=0.1, warmup_target=0.05, warmup_steps=3),
    schedules.CosineDecayRestarts(0.05, 2, t_mul=2.0, m_mul=0.5),
    schedules.PolynomialDecay(0.05, 5, power=2.0, cycle=True),
], ids=["exponential-staircase", "piecewise", "cosine-warmup", "restarts", "polynomial"])
@pytest.mark.parametrize("cls_name", ["Adam", "SGD", "Ftrl", "AdamW"])
def test_resume_mid_schedule(schedule, cls_name):
    """The schedule resumes at the loaded step: the resumed run matches, and its
    learning_rate property equals the schedule at the loaded iteration."""
    cls = getattr(fusedopt, cls_name)
    kwargs = {"momentum": 0.9} if cls_name == "SGD" else {}
    params = FlatBuffer.from_arrays(random_params(LAYOUT, np.float64, 1))
    gs = grads_list(np.float64, 2, 12)
    opt = cls(learning_rate=schedule, **kwargs)
    for g in gs[:5]:
        opt.apply(g, params)
    state, p5 = opt.state_dict(), params.copy()
    for g in gs[5:]:
        opt.apply(g, params)

    resumed = cls.from_config(opt.get_config())
    assert resumed.learning_rate == schedule(0)
    resumed.load_state_dict(state)
    assert resumed.learning_rate == schedule(5)
    for g in gs[5:]:
        resumed.apply(g, p5)
    assert_same_state(opt, resumed, params, p5)
    assert resumed.learning_rate == schedule(12)


def test_resume_with_keras2_decay():
    kwargs = dict(learning_rate=0.1, decay=0.3, momentum=0.5)
    with pytest.warns(DeprecationWarning):
        opt = fusedopt.SGD(**kwargs)
    params = FlatBuffer.from_arrays(random_params(LAYOUT, np.float64, 1))
    gs = grads_list(np.float64, 2, 8)
    for g in gs[:3]:
        opt.apply(g, params)
    state, p = opt.state_dict(), params.copy()
    for g in gs[3:]:
        opt.apply(g, params)
    with pytest.warns(DeprecationWarning):
        resumed = fusedopt.SGD.from_config(opt.get_config())
    resumed.load_state_dict(state)
    assert resumed.learning_rate == pytest.approx(0.1 / (1 + 0.3 * 3))
    for g in gs[3:]:
        resumed.apply(g, p)
    assert_same_state(opt, resumed, params, p)


def test_skip_nonfinite_counters_resume():
    opt = fusedopt.Adam(skip_nonfinite=True)
    params = FlatBuffer.from_arrays(random_params(LAYOUT, np.float64, 1))
    bad = params.full_like(np.nan)
    opt.apply(grads_list(np.float64, 2, 1)[0], params)
    opt.apply(bad, params)
    state = opt.state_dict()
    assert state["iterations"] == 1 and state["skipped_steps"] == 1
    assert state["last_step_skipped"] is True
    other = fusedopt.Adam(skip_nonfinite=True)
    other.load_state_dict(state)
    assert other.iterations == 1 and other.skipped_steps == 1 and other.last_step_skipped
