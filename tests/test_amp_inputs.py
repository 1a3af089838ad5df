"""apply(grads, params, grad_scale=, found_inf=): torch.amp.GradScaler's scale and inf
flag handed to the step as 1-element arrays on the buffers' device and read where the
step runs (the kernels on a GPU: fusedopt_amp_inputs), on every executor, the GPU's
kernels through the emulator.

The oracle is the same optimizer without them, stepped on grads/scale and not stepped
at all where found_inf is set (while skipped_steps counts the skip, as skip_nonfinite
counts its own). Scales are powers of two, so dividing first is exact and the results
must be equal bit for bit; a scale of 3 is compared within float tolerance.
"""

import numpy as np
import pytest

import fusedopt
from conftest import random_grads, random_params
from emulator import emulate

LAYOUT = [(700,), (3, 7), (), (0,), (1,), (33,)]
STEPS = 8
INF_AT = (2, 5)
SCALES = [2.0 ** 12, 2.0 ** 12, 2.0 ** 11, 2.0 ** 11, 2.0 ** 11, 2.0 ** 11, 2.0 ** 12, 2.0 ** 12]

AMP_CASES = [
    ("adam", "Adam", {"learning_rate": 0.01}),
    ("adamw-torch-clipnorm", "AdamW", {"epsilon_after_bias_correction": True, "clipnorm": 1.0,
                                       "weight_decay": 0.1}),
    ("sgd-torch-momentum-global-clip", "SGD",
     {"momentum": 0.9, "momentum_in_gradient_units": True, "dampening": 0.1,
      "coupled_weight_decay": 0.01, "global_clipnorm": 2.0}),
    ("nadam-loss-scale-maximize", "Nadam", {"loss_scale_factor": 4.0, "maximize": True}),
    ("rmsprop-skip-nonfinite", "RMSprop", {"skip_nonfinite": True, "clipvalue": 0.5}),
    # Keras' options: a flagged call neither accumulates nor counts; the scale divides
    # each call's gradient before it joins the accumulator (kernels/options.cuh).
    ("adam-accumulate-ema-clipnorm-loss-scale", "Adam",
     {"gradient_accumulation_steps": 2, "use_ema": True, "ema_overwrite_frequency": 2,
      "clipnorm": 1.0, "loss_scale_factor": 2.0}),
]


def run(case, executor, libraries, amp, scales=SCALES, inf_at=INF_AT, with_scale=True):
    """(params, slots, counters) after STEPS steps. With `amp` the scale and the flag go
    to apply(); without, the oracle: grads divided first, flagged steps not applied."""
    _, cls_name, kwargs = case
    opt = getattr(fusedopt, cls_name)(**kwargs)
    params = fusedopt.FlatBuffer.from_arrays(random_params(LAYOUT, np.float32, seed=1))
    if executor == "emulated":
        emulate(opt, params, libraries[0])
    else:
        opt.executor = executor
        opt.build(params)
    grads = random_grads(LAYOUT, np.float32, seed=2, steps=STEPS)
    for t, (g, scale) in enumerate(zip(grads, scales)):
        scale = scale if with_scale else 1.0
        flat = fusedopt.FlatBuffer.from_arrays([x * np.float32(scale) for x in g]).data
        found = np.array([1.0 if t in inf_at else 0.0], np.float32)
        if amp:
            grad_scale = np.array([scale], np.float32) if with_scale else None
            opt.apply(flat, params, grad_scale=grad_scale, found_inf=found)
        elif t not in inf_at:
            opt.apply(flat / np.float32(scale), params)
    counters = (opt.iterations, opt.skipped_steps, opt.last_step_skipped)
    return params.data.copy(), {k: v.copy() for k, v in opt.slots().items()}, counters


@pytest.fixture(scope="module")
def libraries(request):
    return (request.getfixturevalue("emulator_libraries"),)


@pytest.mark.parametrize("executor", ["numpy", "host", "emulated"])
@pytest.mark.parametrize("case", AMP_CASES, ids=[c[0] for c in AMP_CASES])
def test_scale_and_inf_flag_match_dividing_and_skipping(case, executor, libraries):
    params, slots, counters = run(case, executor, libraries, amp=True)
    want_params, want_slots, (iterations, skipped, _) = run(case, "numpy", libraries, amp=False)
    np.testing.assert_array_equal(params, want_params)
    for name in want_slots:
        np.testing.assert_array_equal(slots[name], want_slots[name], err_msg=name)
    # Skips are counted as skip_nonfinite counts them; the oracle never saw those steps.
    n = case[2].get("gradient_accumulation_steps") or 1  # iterations: updates
    assert counters == ((STEPS - len(INF_AT)) // n, skipped + len(INF_AT), False)


@pytest.mark.parametrize("executor", ["numpy", "host", "emulated"])
def test_inf_flag_alone_and_a_scale_that_is_not_a_power_of_two(executor, libraries):
    case = AMP_CASES[1]
    flag_only = run(case, executor, libraries, amp=True, with_scale=False)
    oracle = run(case, "numpy", libraries, amp=False, with_scale=False)
    np.testing.assert_array_equal(flag_only[0], oracle[0])
    three = run(case, executor, libraries, amp=True, scales=[3.0] * STEPS, inf_at=())
    oracle = run(case, "numpy", libraries, amp=False, scales=[3.0] * STEPS, inf_at=())
    np.testing.assert_allclose(three[0], oracle[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("executor", ["numpy", "host", "emulated"])
def test_a_step_without_scale_after_one_with_uses_the_optimizers_own(executor, libraries):
    """The GPU path writes the scaled unscale into its block; a later plain step must
    not inherit it."""
    results = []
    for amp in (True, False):
        opt = fusedopt.Adam(0.01, loss_scale_factor=2.0)
        params = fusedopt.FlatBuffer.from_arrays(random_params(LAYOUT, np.float32, seed=1))
        if executor == "emulated":
            emulate(opt, params, libraries[0])
        else:
            opt.executor = executor
        g = fusedopt.FlatBuffer.from_arrays(random_grads(LAYOUT, np.float32, 3, 1)[0]).data
        if amp:
            opt.apply(g * np.float32(8), params, grad_scale=np.array([8.0], np.float32))
        else:
            opt.apply(g, params)
        opt.apply(g, params)
        results.append(params.data.copy())
    np.testing.assert_array_equal(*results)


@pytest.mark.parametrize("grad_scale, found_inf, error, message", [
    (2.0, None, TypeError, "`grad_scale` must be a 1-element float32 array"),
    (np.array([2.0]), None, ValueError, "`grad_scale` must hold one float32 element"),
    (None, np.zeros(2, np.float32), ValueError, "`found_inf` must hold one float32"),
    (None, [0.0], TypeError, "`found_inf` must be a 1-element"),
])
def test_bad_amp_inputs_are_refused_with_nothing_changed(grad_scale, found_inf, error, message):
    opt = fusedopt.Adam()
    params = fusedopt.FlatBuffer.from_arrays([np.ones(5, np.float32)])
    with pytest.raises(error, match=message):
        opt.apply(np.ones(5, np.float32), params, grad_scale=grad_scale, found_inf=found_inf)
    assert not opt.built and np.array_equal(params.data, np.ones(5, np.float32))


# Lamb, Muon and Adafactor: kernels of their own (kernels/lamb*.c*, muon*.c*,
# adafactor*.c*), which read the scale and the flag as the fused pass does (the CUDA
# path through the hyperparameter block fusedopt_amp_inputs writes; the host steps
# through the plan's pointers).
OWN_KERNEL_CASES = [
    ("lamb-clipnorm-decay", "Lamb", {"learning_rate": 0.01, "clipnorm": 1.0,
                                     "weight_decay": 0.1}),
    ("lamb-skip-nonfinite", "Lamb", {"learning_rate": 0.01, "skip_nonfinite": True}),
    ("muon-global-clip", "Muon", {"learning_rate": 0.01, "global_clipnorm": 2.0}),
    ("adafactor-clipnorm-decay", "Adafactor", {"learning_rate": 0.01, "clipnorm": 1.0,
                                               "weight_decay": 0.1}),
    ("adafactor-skip-nonfinite", "Adafactor", {"skip_nonfinite": True}),
]


@pytest.mark.parametrize("executor", ["host", "emulated"])
@pytest.mark.parametrize("case", OWN_KERNEL_CASES, ids=[c[0] for c in OWN_KERNEL_CASES])
def test_own_kernels_read_the_scale_and_inf_flag(case, executor, libraries):
    """Bit for bit the same executor stepped on grads/scale with flagged steps left out
    (its per-segment sums differ in order from NumPy's, so the NumPy executor, given
    the same inputs, is compared within float tolerance)."""
    params, slots, counters = run(case, executor, libraries, amp=True)
    want_params, want_slots, (_, skipped, _) = run(case, executor, libraries, amp=False)
    np.testing.assert_array_equal(params, want_params)
    for name in want_slots:
        np.testing.assert_array_equal(slots[name], want_slots[name], err_msg=name)
    assert counters == (STEPS - len(INF_AT), skipped + len(INF_AT), False)
    reference = run(case, "numpy", libraries, amp=True)
    np.testing.assert_allclose(params, reference[0], rtol=1e-4, atol=1e-6)
    assert counters == reference[2]
