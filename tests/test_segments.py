"""Parameter groups on the flat buffer (issue 14): per-segment learning-rate multipliers
and weight decay on/off (fusedopt/segments.py), on every executor.

The independent oracle: segment s of one optimizer with multiplier m[s] and decay
d[s] must equal, bit for bit, a separate optimizer on that segment alone with
learning rate m[s]*lr and weight decay on or off (the NumPy reference runs both).
The host executor and the CUDA kernels (through the emulator) must equal the
reference, with one update launch per step.
"""

import os

import numpy as np
import pytest

import fusedopt
from conftest import KERNEL_RULE_CASES, RULE_CASES, case_ids, random_grads, random_params
from emulator import emulate
from fusedopt import _kernels
from fusedopt.reference import slot_shapes
from fusedopt.segments import MAX_GROUPS

LAYOUT = [(300,), (7,), (50, 3), (0,), (5,), ()]
MULTIPLIERS = [1.0, 0.5, 2.0, 3.0, 0.25, 1.0]
DECAY = [True, False, True, False, False, True]
STEPS = 4
TOL = {np.float64: dict(rtol=1e-12), np.float32: dict(rtol=2e-6)}


def with_decay(kwargs):
    return {"weight_decay": 0.05, **kwargs}


def grouped(cls_name, kwargs, dtype, layout=LAYOUT, executor="numpy", **options):
    params = fusedopt.FlatBuffer.from_arrays(random_params(layout, dtype, seed=3))
    opt = getattr(fusedopt, cls_name)(**with_decay(kwargs), **options, executor=executor)
    opt.set_segment_attributes(lr_multipliers=MULTIPLIERS[:len(layout)],
                               decay=DECAY[:len(layout)])
    return opt, params


def run(opt, params, dtype, layout=LAYOUT, steps=STEPS):
    for g in random_grads(layout, dtype, seed=4, steps=steps):
        opt.apply(fusedopt.FlatBuffer.from_arrays(g), params)
    return [params.data.copy()] + [s.copy() for s in opt.slots().values()]


def separate(cls_name, kwargs, dtype, segment, options=None):
    """The oracle: segment `segment` alone, its own optimizer with lr*m and decay or not."""
    base = getattr(fusedopt, cls_name)(**kwargs)
    decay = DECAY[segment]
    # AdamW requires a weight decay: without one it is Adam.
    cls = "Adam" if cls_name == "AdamW" and not decay else cls_name
    arguments = {**with_decay(kwargs), **(options or {}),
                 "learning_rate": base.learning_rate * MULTIPLIERS[segment],
                 "weight_decay": with_decay(kwargs)["weight_decay"] if decay else None}
    if cls_name == "Muon" and not decay:  # decay off turns Muon's AdamW decay off too
        arguments["adam_weight_decay"] = None
    opt = getattr(fusedopt, cls)(**arguments, executor="numpy")
    params = fusedopt.FlatBuffer.from_arrays([random_params(LAYOUT, dtype, seed=3)[segment]])
    for g in random_grads(LAYOUT, dtype, seed=4, steps=STEPS):
        opt.apply(fusedopt.FlatBuffer.from_arrays([g[segment]]), params)
    return [params.data.copy()] + [s.copy() for s in opt.slots().values()]


def assert_close(actual, desired, dtype):
    """Within the dtype's tolerance relative to each buffer's largest finite value (Ftrl's
    closed form cancels: an element near 0 carries the rounding of the large ones)."""
    assert len(actual) == len(desired)
    rtol = TOL[dtype]["rtol"]
    for k, (a, d) in enumerate(zip(actual, desired)):
        scale = float(np.max(np.abs(d[np.isfinite(d)]), initial=0.0))
        np.testing.assert_allclose(a, d, rtol=rtol, atol=rtol * scale, err_msg=f"buffer {k}")


# --------------------------------------------------------------- the oracle
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("options", [{}, {"clipnorm": 0.5}], ids=["plain", "clipnorm"])
@pytest.mark.parametrize("case", RULE_CASES, ids=case_ids(RULE_CASES))
def test_reference_equals_separate_optimizers_bitwise(case, options, dtype):
    _, cls_name, kwargs = case
    opt, params = grouped(cls_name, kwargs, dtype, **options)
    together = run(opt, params, dtype)
    # Each buffer's segment table: the params', or Adafactor's factored statistics'.
    tables = [params.offsets] + [
        np.cumsum([0] + [int(np.prod(x)) for x in slot_shapes(
            spec[2] if len(spec) > 2 else None, LAYOUT)]) for spec in opt._all_slot_specs()]
    for s in range(len(LAYOUT)):
        alone = separate(cls_name, kwargs, dtype, s, options)
        for k, (x, y, o) in enumerate(zip(together, alone, tables)):
            np.testing.assert_array_equal(x[o[s]:o[s + 1]], y, err_msg=f"segment {s}, buffer {k}")


@pytest.mark.parametrize("executor", ["numpy", "host"])
def test_decay_off_also_turns_coupled_decay_off(executor):
    """torch's Adam(weight_decay) is fusedopt's coupled decay (L2 in the gradient); a
    segment with decay off gets neither decay."""
    layout = [(40,), (9,)]
    params = fusedopt.FlatBuffer.from_arrays(random_params(layout, np.float64, seed=3))
    opt = fusedopt.Adam(0.01, coupled_weight_decay=0.1, executor=executor)
    opt.set_segment_attributes(lr_multipliers=[1.0, 2.0], decay=[True, False])
    grads = random_grads(layout, np.float64, seed=4, steps=3)
    for g in grads:
        opt.apply(fusedopt.FlatBuffer.from_arrays(g), params)
    for s, (options, lr) in enumerate([({"coupled_weight_decay": 0.1}, 0.01), ({}, 0.02)]):
        alone = fusedopt.FlatBuffer.from_arrays([random_params(layout, np.float64, seed=3)[s]])
        ref = fusedopt.Adam(lr, **options, executor="numpy")
        for g in grads:
            ref.apply(fusedopt.FlatBuffer.from_arrays([g[s]]), alone)
        np.testing.assert_allclose(params[s], alone.data, rtol=1e-13, atol=1e-15)


def test_multiplier_and_decay_change_the_result():
    """The oracle test can fail: a group's multiplier or decay switch is not ignored."""
    plain = run(*grouped("AdamW", {}, np.float64), np.float64)
    for change in ({"lr_multipliers": [1.0] * 6}, {"decay": [True] * 6}):
        opt, params = grouped("AdamW", {}, np.float64)
        opt.set_segment_attributes(**change)
        other = run(opt, params, np.float64)
        assert not np.array_equal(other[0], plain[0])
        assert np.array_equal(other[0][:300], plain[0][:300])  # segment 0 is (1, on) in both


# ------------------------------------------------------------ the executors
EXECUTOR_OPTIONS = [{}, {"clipnorm": 0.5}, {"global_clipnorm": 1.0}, {"clipvalue": 0.3},
                    {"skip_nonfinite": True, "loss_scale_factor": 4.0}]
OPTION_IDS = ["plain", "clipnorm", "global_clipnorm", "clipvalue", "skip-scaled"]
# Large enough for several tiles per run (MIN_TILE = 2048) and a run of merged segments.
BIG_LAYOUT = [(5000,), (7,), (3000,), (0,), (9,), ()]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("options", EXECUTOR_OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("case", KERNEL_RULE_CASES, ids=case_ids(KERNEL_RULE_CASES))
def test_host_executor_equals_reference(case, options, dtype):
    _, cls_name, kwargs = case
    desired = run(*grouped(cls_name, kwargs, dtype, BIG_LAYOUT, **options), dtype, BIG_LAYOUT)
    opt, params = grouped(cls_name, kwargs, dtype, BIG_LAYOUT, executor="host", **options)
    opt.num_threads = 3  # several threads, runs split between them
    actual = run(opt, params, dtype, BIG_LAYOUT)
    assert opt.executor_name == "host"
    assert_close(actual, desired, dtype)


# The emulator is slow: every rule with the two tilings (runs of a group; segments with
# clipnorm), every option with a few rules.
EMULATED = ([pytest.param(c, o, id=f"{c[0]}-{i}") for c in KERNEL_RULE_CASES
             for o, i in zip(EXECUTOR_OPTIONS[:2], OPTION_IDS[:2])]
            + [pytest.param(c, o, id=f"{c[0]}-{i}") for c in KERNEL_RULE_CASES
               if c[0] in ("adamw-amsgrad", "sgd-nesterov", "ftrl-all", "nadam")
               for o, i in zip(EXECUTOR_OPTIONS[2:], OPTION_IDS[2:])])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case, options", EMULATED)
def test_emulated_cuda_equals_reference_in_one_launch(case, options, dtype,
                                                      emulator_libraries):
    _, cls_name, kwargs = case
    desired = run(*grouped(cls_name, kwargs, dtype, BIG_LAYOUT, **options), dtype, BIG_LAYOUT)
    opt, params = grouped(cls_name, kwargs, dtype, BIG_LAYOUT, **options)
    backend = emulate(opt, params, emulator_libraries)
    actual = run(opt, params, dtype, BIG_LAYOUT)
    assert_close(actual, desired, dtype)
    # The update's launches (a rule's own kernels: the last, which advances the counters;
    # Adafactor's runs its three element passes), the same whatever the groups.
    update = _kernels.rule_kernels(opt.rule)[-1]
    updates = [n for n in backend.launches if n == update]
    assert len(updates) == STEPS * (3 if opt.rule == "adafactor" else 1)
    # Every tile lies inside one group: its group's run, or its segment with clipnorm.
    plan = opt._plan
    starts, groups = plan.tiles.start, np.asarray(plan.tile_group)
    _, segment_group = opt._segment_groups()
    for k in range(plan.tiles.count):
        covered = [s for s, (a, b) in enumerate(zip(params.offsets[:-1], params.offsets[1:]))
                   if a < starts[k + 1] and starts[k] < b]
        assert {segment_group[s] for s in covered} == {groups[k]}


def test_emulated_attributes_changed_between_steps(emulator_libraries):
    """New multipliers of the same grouping are written in place (a captured step keeps
    its tables); a new grouping rebuilds the tables. Both steps equal the reference."""
    results = []
    for emulated in (False, True):
        opt, params = grouped("Adam", {}, np.float64, BIG_LAYOUT)
        if emulated:
            emulate(opt, params, emulator_libraries)
        grads = random_grads(BIG_LAYOUT, np.float64, seed=5, steps=3)
        opt.apply(fusedopt.FlatBuffer.from_arrays(grads[0]), params)
        tables = getattr(opt._plan, "tile_start", None)
        opt.set_segment_attributes(lr_multipliers=[m * 2 for m in MULTIPLIERS])
        if emulated:
            assert opt._plan.tile_start is tables  # same grouping: values only
        opt.apply(fusedopt.FlatBuffer.from_arrays(grads[1]), params)
        opt.set_segment_attributes(lr_multipliers=None, decay=[True, False] * 3)
        opt.apply(fusedopt.FlatBuffer.from_arrays(grads[2]), params)
        results.append([params.data.copy()] + [s.copy() for s in opt.slots().values()])
    assert_close(results[1], results[0], np.float64)


def test_emulated_captured_step_uses_new_multipliers(emulator_libraries):
    """A captured step replays with multipliers set after the capture (same grouping:
    the group values are rewritten in place, the tables the graph reads are kept)."""
    results = []
    for emulated in (False, True):
        opt, params = grouped("Adam", {}, np.float64, BIG_LAYOUT)
        grads = fusedopt.FlatBuffer.from_arrays(random_grads(BIG_LAYOUT, np.float64, seed=8,
                                                             steps=1)[0])
        if emulated:
            emulate(opt, params, emulator_libraries)
            step = opt.cuda_graph(grads.data, params)
        else:
            def step():
                opt.apply(grads, params)
        step()
        opt.set_segment_attributes(lr_multipliers=[m * 3 for m in MULTIPLIERS])
        step()
        results.append(params.data.copy())
    assert_close(results[1:], results[:1], np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_host_threads_split_runs(dtype):
    """Above the host's parallel threshold: threads' ranges start and end inside runs
    of a group and inside clipped segments."""
    layout = [(70001,), (3,), (50000,), (1,), (90000,), (13,)]
    results = []
    for executor in ("numpy", "host"):
        opt, params = grouped("Adam", {}, dtype, layout, executor, clipnorm=5.0)
        opt.num_threads = 4
        results.append(run(opt, params, dtype, layout, steps=2))
    assert opt._plan.threads_used == 4
    assert_close(results[1], results[0], dtype)


def test_host_attributes_changed_between_steps():
    results = []
    for executor in ("numpy", "host"):
        opt, params = grouped("SGD", {"momentum": 0.9}, np.float64, BIG_LAYOUT, executor)
        grads = random_grads(BIG_LAYOUT, np.float64, seed=5, steps=2)
        opt.apply(fusedopt.FlatBuffer.from_arrays(grads[0]), params)
        opt.set_segment_attributes(lr_multipliers=[0.0, 1.0, 1.0, 1.0, 2.0, 2.0])
        opt.apply(fusedopt.FlatBuffer.from_arrays(grads[1]), params)
        results.append(params.data.copy())
    np.testing.assert_allclose(results[1], results[0], rtol=1e-12)


# ------------------------------------------------- exclude_from_weight_decay
def test_exclude_by_names_and_indices():
    params = fusedopt.FlatBuffer.from_arrays(random_params([(3,), (2,), (4,)], np.float64, seed=0),
                                             names=["dense/kernel", "dense/bias", "norm/gamma"])
    opt = fusedopt.AdamW(weight_decay=0.1)
    opt.exclude_from_weight_decay(var_list=[2], var_names=["bias"])
    opt.build(params)
    assert opt.segment_table.decay == (True, False, False)
    assert opt.segment_table.multipliers == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="before the optimizer is built"):
        opt.exclude_from_weight_decay(var_names=["kernel"])
    assert opt.segment_table.decay == (True, False, False)


def test_exclude_from_weight_decay_matches_keras():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":
        pytest.skip("Keras parity uses the JAX backend")
    names = ["kernel", "bias", "gamma", "beta"]
    layout = [(3, 4), (4,), (4,), (4,)]
    init = random_params(layout, np.float64, seed=1)
    grads = random_grads(layout, np.float64, seed=2, steps=10, scale=1.5)
    old = keras.config.floatx()
    keras.config.set_floatx("float64")
    try:
        kvars = [keras.Variable(w.copy(), dtype="float64", name=n) for w, n in zip(init, names)]
        kopt = keras.optimizers.AdamW(learning_rate=0.01, weight_decay=0.2)
        kopt.exclude_from_weight_decay(var_list=[kvars[2]], var_names=["bias"])
        flat = fusedopt.FlatBuffer.from_arrays(init, names=names)
        fopt = fusedopt.AdamW(learning_rate=0.01, weight_decay=0.2)
        fopt.exclude_from_weight_decay(var_list=[2], var_names=["bias"])
        for step_grads in grads:
            kopt.apply([keras.ops.convert_to_tensor(g) for g in step_grads], kvars)
            fopt.apply(fusedopt.FlatBuffer.from_arrays(step_grads), flat)
    finally:
        keras.config.set_floatx(old)
    for kv, fv in zip(kvars, flat.views()):
        np.testing.assert_allclose(fv, np.asarray(kv.value), rtol=1e-10, atol=1e-12)
    # Without the exclusions the decayed segments differ: the test can fail.
    plain = fusedopt.FlatBuffer.from_arrays(init)
    popt = fusedopt.AdamW(learning_rate=0.01, weight_decay=0.2)
    for step_grads in grads:
        popt.apply(fusedopt.FlatBuffer.from_arrays(step_grads), plain)
    assert not np.allclose(plain.views()[1], np.asarray(kvars[1].value), rtol=1e-10)


# --------------------------------------------------- state, checkpoints, config
@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_checkpoint_round_trip(tmp_path, suffix):
    layout = [(4,), (3,), (5,)]
    grads = random_grads(layout, np.float64, seed=7, steps=6)

    def fresh():
        params = fusedopt.FlatBuffer.from_arrays(random_params(layout, np.float64, seed=6),
                                                 names=["w", "b", "norm"])
        opt = fusedopt.AdamW(learning_rate=0.01, weight_decay=0.1)
        opt.set_segment_attributes(lr_multipliers=[1.0, 0.5, 2.0])
        opt.exclude_from_weight_decay(var_names=["^b$", "norm"])
        return opt, params

    opt, params = fresh()
    for g in grads:
        opt.apply(fusedopt.FlatBuffer.from_arrays(g), params)
    expected = params.data.copy()
    opt, params = fresh()
    for g in grads[:3]:
        opt.apply(fusedopt.FlatBuffer.from_arrays(g), params)
    path = tmp_path / f"ckpt{suffix}"
    fusedopt.save(path, opt, params)
    loaded, loaded_params = fusedopt.load(path)
    assert loaded.segment_table == opt.segment_table
    assert loaded.segment_table.decay == (True, False, False)
    assert loaded_params.names == ("w", "b", "norm")
    assert loaded.get_config()["segment_attributes"] == opt.get_config()["segment_attributes"]
    for g in grads[3:]:
        loaded.apply(fusedopt.FlatBuffer.from_arrays(g), loaded_params)
    np.testing.assert_array_equal(loaded_params.data, expected)


def test_state_dict_restores_the_table_without_names():
    params = fusedopt.FlatBuffer.from_arrays([np.ones(2), np.ones(3)], names=["w", "bias"])
    opt = fusedopt.AdamW(weight_decay=0.1)
    opt.exclude_from_weight_decay(var_names=["bias"])
    opt.set_segment_attributes(lr_multipliers=[1.0, 0.5])
    opt.apply(np.ones(5), params)
    state = opt.state_dict()
    assert state["segment_attributes"] == {"lr_multipliers": [1.0, 0.5], "decay": [True, False]}
    other = fusedopt.AdamW(weight_decay=0.1)
    other.load_state_dict(state)
    other.build(fusedopt.FlatBuffer.from_arrays([np.ones(2), np.ones(3)]))  # no names
    assert other.segment_table == opt.segment_table


def test_config_round_trip():
    opt = fusedopt.AdamW(weight_decay=0.1)
    opt.set_segment_attributes(lr_multipliers=[1.0, 0.5], decay=[True, True])
    opt.exclude_from_weight_decay(var_list=[1], var_names=["bias"])
    config = opt.get_config()
    assert config["segment_attributes"] == {
        "lr_multipliers": [1.0, 0.5], "decay": [True, True],
        "exclude_from_weight_decay": {"var_list": [1], "var_names": ["bias"]}}
    again = fusedopt.get({"class_name": "AdamW", "config": config})
    assert again.get_config() == config
    assert "segment_attributes" not in fusedopt.AdamW().get_config()  # Keras' keys only


# ------------------------------------------------------------------ bad inputs
def test_wrong_length_refused_at_build_with_nothing_changed():
    params = fusedopt.FlatBuffer.from_arrays([np.ones(2), np.ones(3)])
    before = params.data.copy()
    opt = fusedopt.Adam()
    opt.set_segment_attributes(lr_multipliers=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="`lr_multipliers` has 3 values but `params` have 2"):
        opt.apply(np.ones(5), params)
    assert not opt.built and opt.iterations == 0
    np.testing.assert_array_equal(params.data, before)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"lr_multipliers": [1.0, -1.0]}, ValueError, r"lr_multipliers\[1\]` must be finite and >= 0"),
    ({"lr_multipliers": [1.0, float("nan")]}, ValueError, r"lr_multipliers\[1\]"),
    ({"lr_multipliers": [1.0, "2"]}, TypeError, r"lr_multipliers\[1\]` must be a number"),
    ({"lr_multipliers": 2.0}, TypeError, "`lr_multipliers` must be a list"),
    ({"decay": [True, 1]}, TypeError, r"decay\[1\]` must be True or False"),
    ({"decay": [True]}, ValueError, "`decay` has 1 values but `params` have 2"),
])
def test_bad_attributes_after_build_change_nothing(kwargs, error, match):
    params = fusedopt.FlatBuffer.from_arrays([np.ones(2), np.ones(3)])
    opt = fusedopt.AdamW(weight_decay=0.1)
    opt.set_segment_attributes(lr_multipliers=[1.0, 0.5])
    opt.build(params)
    table = opt.segment_table
    with pytest.raises(error, match=match):
        opt.set_segment_attributes(**kwargs)
    assert opt.segment_table == table
    assert opt._segment_request.lr_multipliers == (1.0, 0.5)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"var_list": [5]}, ValueError, "`var_list` names segment 5, but `params` have 2"),
    ({"var_list": ["a"]}, TypeError, r"var_list\[0\]` must be a segment index"),
    ({"var_names": ["bias"]}, ValueError, "`var_names` .* but `params` have none"),
    ({"var_names": ["("]}, ValueError, r"var_names\[0\]` is not a valid regular expression"),
    ({"var_names": [3]}, TypeError, r"var_names\[0\]` must be a string"),
])
def test_bad_exclusions(kwargs, error, match):
    params = fusedopt.FlatBuffer.from_arrays([np.ones(2), np.ones(3)])
    opt = fusedopt.AdamW(weight_decay=0.1)
    with pytest.raises(error, match=match):
        opt.exclude_from_weight_decay(**kwargs)
        opt.build(params)
    assert not opt.built


def test_too_many_groups_refused():
    params = fusedopt.FlatBuffer.from_arrays([np.ones(1)] * (MAX_GROUPS + 1))
    opt = fusedopt.SGD()
    opt.set_segment_attributes(lr_multipliers=[1.0 + i for i in range(MAX_GROUPS + 1)])
    with pytest.raises(ValueError, match=f"at most {MAX_GROUPS}"):
        opt.build(params)
    opt.set_segment_attributes(lr_multipliers=[1.0 + i % MAX_GROUPS
                                               for i in range(MAX_GROUPS + 1)])
    opt.apply(np.ones(MAX_GROUPS + 1), params)  # exactly MAX_GROUPS groups run


def test_ftrl_refuses_a_zero_group_rate_before_the_step():
    params = fusedopt.FlatBuffer.from_arrays([np.ones(2), np.ones(3)])
    before = params.data.copy()
    opt = fusedopt.Ftrl()
    opt.set_segment_attributes(lr_multipliers=[1.0, 0.0])
    with pytest.raises(ValueError, match="Ftrl divides by the learning rate"):
        opt.apply(np.ones(5), params)
    np.testing.assert_array_equal(params.data, before)
    assert opt.iterations == 0


def test_bad_segment_attributes_in_config_and_state():
    with pytest.raises(TypeError, match="`segment_attributes` must be a dict"):
        fusedopt.Adam(segment_attributes=[1.0])
    with pytest.raises(ValueError, match="unknown keys"):
        fusedopt.Adam(segment_attributes={"lr": [1.0]})
    params = fusedopt.FlatBuffer.from_arrays([np.ones(2), np.ones(3)])
    opt = fusedopt.Adam()
    opt.apply(np.ones(5), params)
    state = opt.state_dict()
    state["segment_attributes"] = {"lr_multipliers": [1.0], "decay": [True]}
    with pytest.raises(ValueError, match=r"state\['segment_attributes'\]"):
        opt.load_state_dict(state)
    assert opt.segment_table.is_default


def test_flatbuffer_names():
    flat = fusedopt.FlatBuffer.from_arrays([np.ones(2)], names=["w"])
    assert flat.names == ("w",) and flat.copy().names == ("w",)
    assert flat.layout == fusedopt.FlatBuffer.from_arrays([np.ones(2)]).layout
    with pytest.raises(ValueError, match="`names` has 2 entries but there are 1"):
        fusedopt.FlatBuffer.from_arrays([np.ones(2)], names=["a", "b"])
    with pytest.raises(TypeError, match=r"`names\[0\]` must be a string"):
        fusedopt.FlatBuffer(np.ones(2), [(2,)], names=[1])
