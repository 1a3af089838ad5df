"""The classes of issue 15 beyond what CASES covers: which executor runs them (and the
refusals of the others), ScheduleFreeAdamW's slot initialisation, Adafactor's
factored slots in the state, Muon's segment names, EMA swapping and finalising,
gradient accumulation's counters."""

import math
import os

import numpy as np
import pytest

import fusedopt
from conftest import random_grads, random_params
from fusedopt import FlatBuffer

LAYOUT = [(3, 4), (5,), (), (2, 3, 2)]


def params_and_grads(dtype=np.float64, steps=3, layout=LAYOUT):
    params = FlatBuffer.from_arrays(random_params(layout, dtype, 1))
    grads = [FlatBuffer.from_arrays(g) for g in random_grads(layout, dtype, 2, steps)]
    return params, grads


def bits(a):
    return np.asarray(a).view(np.uint8).tobytes()


# ------------------------------------------------------------------- executors
# Keras' options on the rules with kernels of their own: every executor runs them on
# float32/float64 buffers (kernels/whole.cuh, whole_host.cpp); on 16-bit buffers Lamb's
# kernels run them too (tests/test_mixed_precision.py compares them with NumPy), Muon's
# and Adafactor's are refused by the host and CUDA executors.
OWN_KERNEL_OPTIONS = [
    ("Lamb", {"use_ema": True}, "use_ema"), ("Muon", {"use_ema": True}, "use_ema"),
    ("Adafactor", {"use_ema": True}, "use_ema"),
    ("Lamb", {"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
    ("Muon", {"gradient_accumulation_steps": 3}, "gradient_accumulation_steps"),
    ("Adafactor", {"gradient_accumulation_steps": 2}, "gradient_accumulation_steps"),
]


@pytest.mark.parametrize("cls_name, kwargs, option", OWN_KERNEL_OPTIONS,
                         ids=[f"{c}-{r}" for c, _, r in OWN_KERNEL_OPTIONS])
def test_options_on_own_kernel_rules_run_on_the_host_and_16_bit_is_refused(cls_name, kwargs,
                                                                            option):
    from fusedopt import host

    try:
        host.library(getattr(fusedopt, cls_name).rule, np.float64)
    except host.HostBuildError as e:
        pytest.skip(f"no host build here: {e}")
    runs = {}
    for executor in ("auto", "host", "numpy"):
        params, grads = params_and_grads(steps=4)
        opt = getattr(fusedopt, cls_name)(executor=executor, **kwargs)
        for g in grads:
            opt.apply(g, params)
        assert opt.executor_name == ("numpy" if executor == "numpy" else "host")
        assert opt._reference_only(params.dtype) == ""
        runs[executor] = [params.data.copy()] + [s.copy() for s in opt.slots().values()]
    assert option == "use_ema" or opt.iterations == 4 // kwargs[option]
    for a, b, c in zip(runs["auto"], runs["host"], runs["numpy"]):
        assert bits(a) == bits(b)
        np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-14)
    # Moving a built optimizer onto the host executor is accepted too.
    params, grads = params_and_grads(steps=2)
    moved = getattr(fusedopt, cls_name)(executor="numpy", **kwargs)
    moved.apply(grads[0], params)
    moved.executor = "host"
    moved.apply(grads[1], params)
    assert moved.executor_name == "host"
    # 16-bit buffers: Lamb runs them on the host; the others are refused by the host
    # executor, before anything is built or written.
    import ml_dtypes

    half = FlatBuffer.from_arrays(random_params(LAYOUT, np.float32, 1), dtype=ml_dtypes.bfloat16)
    before = bits(half.data)
    refused = getattr(fusedopt, cls_name)(executor="host", **kwargs)
    if cls_name == "Lamb":  # two calls: one update with gradient_accumulation_steps=2
        for _ in range(2):
            refused.apply(np.ones(half.size, ml_dtypes.bfloat16), half)
        assert refused.executor_name == "host" and bits(half.data) != before
        return
    with pytest.raises(ValueError, match="bfloat16"):
        refused.apply(np.ones(half.size, ml_dtypes.bfloat16), half)
    assert bits(half.data) == before and not refused.built and refused.iterations == 0


def test_schedule_free_adamw_runs_on_the_host_executor_like_numpy():
    from fusedopt import host

    try:
        host.library("schedule_free_adamw", np.float64)
    except host.HostBuildError as e:
        pytest.skip(f"no host build here: {e}")
    results = []
    for executor in ("host", "numpy"):
        params, grads = params_and_grads(steps=5)
        opt = fusedopt.ScheduleFreeAdamW(learning_rate=0.01, warmup_steps=3, executor=executor)
        for g in grads:
            opt.apply(g, params)
        assert opt.executor_name == executor
        results.append((params.data.copy(), opt.slots()["momentum"].copy()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-13)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-13)


# ----------------------------------------------------------- ScheduleFreeAdamW
def test_schedule_free_z_starts_as_a_copy_of_the_params():
    params, _ = params_and_grads()
    opt = fusedopt.ScheduleFreeAdamW()
    opt.build(params)
    z = opt.slots()["momentum"]
    assert bits(z) == bits(params.data) and not np.shares_memory(z, params.data)
    assert not opt.slots()["velocity"].any()


@pytest.mark.parametrize("beta_1", [0.0, 1.0])
def test_schedule_free_beta_1_must_be_inside_0_1(beta_1):
    with pytest.raises(ValueError, match="beta_1"):
        fusedopt.ScheduleFreeAdamW(beta_1=beta_1)


# -------------------------------------------------------------------- Adafactor
def test_adafactor_factored_slots_have_the_factored_sizes_and_load_back():
    params, grads = params_and_grads()
    opt = fusedopt.Adafactor()
    for g in grads:
        opt.apply(g, params)
    # r: shape[:-1] of (3, 4) and (2, 3, 2): 3 + 6; c: shape[:-2] + shape[-1:]: 4 + 4.
    assert opt.slots()["r"].size == 9 and opt.slots()["c"].size == 8
    assert opt.slots()["velocity"].size == params.size
    state = opt.state_dict()
    fresh = fusedopt.Adafactor()
    fresh.load_state_dict(state)
    fresh.build(params)
    assert all(bits(fresh.slots()[k]) == bits(v) for k, v in opt.slots().items())
    bad = dict(state, slots={**state["slots"], "r": np.zeros(params.size)})
    with pytest.raises(ValueError, match="'r' has shape"):
        fusedopt.Adafactor().load_state_dict(bad)


def test_adafactor_relative_step_is_kept_but_changes_nothing():
    """Keras takes min(lr, 1/sqrt(t)) in rho whether relative_step is set or not."""
    runs = []
    for relative_step in (True, False):
        params, grads = params_and_grads()
        opt = fusedopt.Adafactor(learning_rate=2.0, relative_step=relative_step)
        for g in grads:
            opt.apply(g, params)
        runs.append(bits(params.data))
        assert opt.get_config()["relative_step"] is relative_step
    assert runs[0] == runs[1]


# ------------------------------------------------------------------------- Muon
def test_muon_segment_names_choose_the_adamw_segments():
    opt = fusedopt.Muon(exclude_layers=["^out"], segment_names=[
        "dense_kernel", "bias", "scale", "token_embedding", "out_kernel", "conv"])
    shapes = [(3, 4), (4,), (), (6, 2), (4, 2), (2, 2, 2)]
    # 2-D and not excluded -> Muon; embeddings, exclude_layers and other ranks -> AdamW.
    assert [opt.uses_adamw(i, s) for i, s in enumerate(shapes)] == \
        [False, True, True, True, True, True]
    without = fusedopt.Muon(exclude_embeddings=False, segment_names=[
        "dense_kernel", "bias", "scale", "token_embedding", "out_kernel", "conv"])
    assert [without.uses_adamw(i, s) for i, s in enumerate(shapes)] == \
        [False, True, True, False, False, True]
    assert fusedopt.Muon.from_config(opt.get_config()).segment_names == opt.segment_names


def test_muon_with_segment_names_matches_keras_named_variables():
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "jax":  # pragma: no cover
        pytest.skip("parity tests use Keras' JAX backend")
    names = ["dense_kernel", "token_embedding", "out_kernel", "bias"]
    layout = [(3, 4), (5, 2), (4, 2), (4,)]
    old = keras.config.floatx()
    keras.config.set_floatx("float32")
    try:
        init = random_params(layout, np.float32, 5)
        kvars = [keras.Variable(w.copy(), name=n) for w, n in zip(init, names)]
        kopt = keras.optimizers.Muon(learning_rate=0.01, exclude_layers=["^out"])
        flat = FlatBuffer.from_arrays(init)
        fopt = fusedopt.Muon(learning_rate=0.01, exclude_layers=["^out"], segment_names=names)
        for g in random_grads(layout, np.float32, 6, 10):
            kopt.apply([keras.ops.convert_to_tensor(x) for x in g], kvars)
            fopt.apply(FlatBuffer.from_arrays(g), flat)
            for ours, kv in zip(flat.views(), kvars):
                np.testing.assert_allclose(ours, np.asarray(kv.value), rtol=2e-5, atol=2e-6)
        assert [v is None for v in kopt.adam_velocities] == [True, False, False, False]
    finally:
        keras.config.set_floatx(old)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"exclude_layers": "dense", "segment_names": ["a"]}, TypeError, "exclude_layers"),
    ({"exclude_layers": ["("], "segment_names": ["a"]}, ValueError, "exclude_layers"),
    ({"segment_names": "a"}, TypeError, "segment_names"),
    ({"ns_steps": -1}, ValueError, "ns_steps"),
    ({"momentum": 1.0}, ValueError, "momentum"),
])
def test_muon_bad_arguments_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        fusedopt.Muon(**kwargs)


def test_muon_segment_names_must_match_the_layout():
    params, grads = params_and_grads()
    opt = fusedopt.Muon(segment_names=["a", "b"])
    with pytest.raises(ValueError, match="segment_names"):
        opt.apply(grads[0], params)
    assert not opt.built


def test_muon_exclude_layers_needs_names_and_takes_the_flat_buffers():
    params, grads = params_and_grads()
    opt = fusedopt.Muon(exclude_layers=["dense"])
    with pytest.raises(ValueError, match="names"):
        opt.apply(grads[0], params)
    assert not opt.built
    named = FlatBuffer(params.data.copy(), params.shapes,
                       names=["dense_kernel", "bias", "scale", "conv"])
    opt.apply(grads[0], named)
    assert opt.uses_adamw(0, (3, 4))  # excluded by the buffer's name
    plain = fusedopt.Muon()
    plain.apply(grads[0], FlatBuffer(params.data.copy(), params.shapes,
                                     names=["dense_kernel", "bias", "scale", "conv"]))
    assert not plain.uses_adamw(0, (3, 4))


# -------------------------------------------------------------------------- EMA
def test_swap_ema_weights_is_its_own_inverse_and_blocks_steps():
    params, grads = params_and_grads(steps=4)
    opt = fusedopt.Adam(learning_rate=0.1, use_ema=True, ema_momentum=0.5)
    for g in grads[:3]:
        opt.apply(g, params)
    trained, average = bits(params.data), bits(opt.slots()["average"])
    assert trained != average
    opt.swap_ema_weights(params)
    assert bits(params.data) == average and bits(opt.slots()["average"]) == trained
    with pytest.raises(ValueError, match="swap"):
        opt.apply(grads[3], params)
    assert bits(params.data) == average and opt.iterations == 3
    opt.swap_ema_weights(params)
    assert bits(params.data) == trained
    with pytest.raises(RuntimeError):
        with opt.ema_weights(params) as inside:
            assert bits(inside.data) == average
            raise RuntimeError("evaluation failed")
    assert bits(params.data) == trained  # swapped back on the way out
    opt.finalize_variable_values(params)
    assert bits(params.data) == average == bits(opt.slots()["average"])


def test_state_is_neither_saved_nor_loaded_while_the_ema_weights_are_in(tmp_path):
    """Swapped in, the average slot (or a copy kept aside) holds the params: a state
    saved then would store the two the wrong way round. Refused, nothing changed."""
    params, grads = params_and_grads(steps=3)
    opt = fusedopt.Adam(learning_rate=0.1, use_ema=True)
    for g in grads:
        opt.apply(g, params)
    state = opt.state_dict()
    with opt.ema_weights(params):
        held = bits(params.data)
        with pytest.raises(ValueError, match="state_dict: `params` hold the EMA weights"):
            opt.state_dict()
        with pytest.raises(ValueError, match="swap them back before saving"):
            fusedopt.save(tmp_path / "run.safetensors", opt, params)
        with pytest.raises(ValueError, match="load_state_dict: .*before loading"):
            opt.load_state_dict(state)
        assert bits(params.data) == held and not (tmp_path / "run.safetensors").exists()
    after = opt.state_dict()
    for name, slot in state["slots"].items():
        assert bits(after["slots"][name]) == bits(slot), name


def test_ema_methods_refuse_without_ema_or_before_a_step():
    params, grads = params_and_grads()
    with pytest.raises(ValueError, match="use_ema"):
        fusedopt.Adam().swap_ema_weights(params)
    fusedopt.Adam().finalize_variable_values(params)  # Keras: nothing to do without EMA
    with pytest.raises(ValueError, match="apply"):
        fusedopt.Adam(use_ema=True).swap_ema_weights(params)


def test_first_ema_update_copies_the_params():
    params, grads = params_and_grads()
    opt = fusedopt.SGD(learning_rate=0.1, use_ema=True)
    opt.apply(grads[0], params)
    assert bits(opt.slots()["average"]) == bits(params.data)


# ------------------------------------------------------------ gradient accumulation
def test_accumulation_counts_updates_and_schedules_see_calls():
    seen = []

    class Recording(fusedopt.schedules.LearningRateSchedule):
        def __call__(self, step):
            seen.append(step)
            return 0.1

        def get_config(self):
            return {}

    params, grads = params_and_grads(steps=7)
    opt = fusedopt.SGD(learning_rate=Recording(), gradient_accumulation_steps=3)
    for g in grads:
        before = bits(params.data)
        opt.apply(g, params)
        assert (bits(params.data) == before) == (len(seen) % 3 != 0)
    assert opt.iterations == 2 and opt.state_dict()["iterations"] == 7
    assert seen == list(range(7))
    assert not opt.slots()["gradient_accumulator"].any() or len(seen) % 3
    np.testing.assert_allclose(opt.slots()["gradient_accumulator"], grads[6].data, rtol=0)


def test_accumulated_update_is_the_mean_gradient():
    params, grads = params_and_grads(steps=3)
    accumulated = fusedopt.SGD(learning_rate=0.1, gradient_accumulation_steps=3)
    for g in grads:
        accumulated.apply(g, params)
    reference, _ = params_and_grads()
    mean = (grads[2].data + (grads[1].data + grads[0].data)) / 3
    fusedopt.SGD(learning_rate=0.1).apply(mean, reference)
    assert bits(params.data) == bits(reference.data)
    assert math.isclose(accumulated.learning_rate, 0.1)
