"""fusedopt.torch on bfloat16 and float16 models (CPU torch): flattening aliases the
16-bit parameters zero-copy, the torch-compatible optimizers take fusedopt's
mixed-precision options (master_weights, state_dtype, stochastic_rounding, seed), state
keeps its dtype through state_dict(), and GradScaler still works.

Measured here (torch 2.14 CPU, the small MLP of test_torch, 25 steps through
autograd): fusedopt.torch.AdamW/Adam with state_dtype="bfloat16" on bfloat16 params
give params bitwise equal to torch.optim.AdamW/Adam(fused=True) at every step (both
load bfloat16, compute in float32 and round to nearest once per store; torch's fused
CPU kernel keeps the state in the params' dtype, hence state_dtype="bfloat16"); the
state agrees within one bfloat16 spacing (torch's lerp for exp_avg rounds differently
from fusedopt's m + (g - m)(1 - beta1) in a few elements). torch's foreach and
for-loop implementations round every intermediate to bfloat16 and differ by many
spacings: they are not a reference for a float32-math kernel.
"""

import io
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fusedopt.torch")
pytest.importorskip("ml_dtypes")

from fusedopt import precision  # noqa: E402
from test_torch import STEPS, loss_of, mlp, snapshot, assert_unchanged, train_step  # noqa: E402

SIXTEEN = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="f16")]
# One spacing at 1.0 (the relative rounding error bound of a store is half of it).
SPACING = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}


def bits(t):
    return t.detach().view(torch.int16).clone()


def assert_within(a, b, dtype, spacings=1.0):
    """Normwise: |a - b| <= spacings * SPACING * (|b| + max|b|)."""
    tol = spacings * SPACING[dtype]
    b = b.detach().double()
    scale = float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a.detach().double(), b, rtol=tol, atol=tol * max(scale, 1e-30))


# ================================================================== flattening
@pytest.mark.parametrize("dtype", SIXTEEN)
def test_16_bit_model_flattens_zero_copy_and_autograd_works(dtype):
    model = mlp(dtype)
    before = [p.detach().clone() for p in model.parameters()]
    (flat,) = ft.flatten_parameters(model)
    assert flat.dtype == dtype and flat.data.dtype == dtype
    params, grads = flat.flat_params.data, flat.flat_grads.data
    assert params.dtype == precision.numpy_dtype(ft._DTYPE_NAMES[dtype])
    assert grads.dtype == params.dtype
    # Zero-copy: the NumPy arrays are the tensors' memory.
    assert params.ctypes.data == flat.data.data_ptr()
    assert grads.ctypes.data == flat.grad.data_ptr()
    start, end = flat.data.data_ptr(), flat.data.data_ptr() + flat.data.nbytes
    for p, b, off in zip(model.parameters(), before, flat.offsets):
        assert torch.equal(p.detach(), b)
        assert start <= p.data_ptr() < end
        assert p.data_ptr() == start + off * p.element_size()
    loss_of(model, 0).backward()
    assert float(flat.grad.abs().sum()) > 0
    for p, off in zip(model.parameters(), flat.offsets):
        assert p.grad.dtype == dtype
        assert p.grad.data_ptr() == flat.grad.data_ptr() + off * p.element_size()
    # A write through the NumPy alias is seen by the tensor (and back).
    params.view(np.uint16)[0] = bits(flat.data)[1].numpy().view(np.uint16)
    assert torch.equal(bits(flat.data)[0], bits(flat.data)[1])


def test_tensor_alias_of_a_bfloat16_array_is_zero_copy():
    array = np.arange(6, dtype=np.float32).astype(precision.numpy_dtype("bfloat16"))
    tensor = ft._tensor_alias(array)
    assert tensor.dtype == torch.bfloat16 and tensor.data_ptr() == array.ctypes.data
    assert tensor.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


# ===================================================== parity with torch fused
ADAM_CASES = [
    pytest.param(ft.AdamW, torch.optim.AdamW, {"lr": 0.01}, id="adamw"),
    pytest.param(ft.AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "eps": 1e-3,
                                               "betas": (0.8, 0.95)}, id="adamw-wd-eps"),
    pytest.param(ft.AdamW, torch.optim.AdamW, {"lr": 0.01, "amsgrad": True}, id="adamw-amsgrad"),
    pytest.param(ft.Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}, id="adam-l2"),
]


@pytest.mark.parametrize("ours,theirs,options", ADAM_CASES)
def test_bf16_adam_bitwise_equal_to_torch_fused(ours, theirs, options):
    """bfloat16 params and state, 25 steps through autograd: params bitwise equal to
    torch's fused implementation at every step, state within one bfloat16 spacing."""
    models = [mlp(torch.bfloat16), mlp(torch.bfloat16)]
    opts = [ours(models[0].parameters(), state_dtype="bfloat16", **options),
            theirs(models[1].parameters(), fused=True, **options)]
    for t in range(STEPS):
        for model, opt in zip(models, opts):
            train_step(model, opt, t)
        for p, q in zip(*(m.parameters() for m in models)):
            assert torch.equal(bits(p), bits(q)), f"step {t}"
    for p, q in zip(*(m.parameters() for m in models)):
        mine, theirs_ = opts[0].state[p], opts[1].state[q]
        assert set(mine) == set(theirs_)
        assert float(mine["step"]) == float(theirs_["step"]) == STEPS
        for key in set(theirs_) - {"step"}:
            assert mine[key].dtype == torch.bfloat16
            assert_within(mine[key], theirs_[key], torch.bfloat16)


@pytest.mark.parametrize("dtype", SIXTEEN)
@pytest.mark.parametrize("ours,theirs,options", [
    pytest.param(ft.AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.05}, id="adamw"),
    pytest.param(ft.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.05},
                 id="sgd-momentum-l2")])
def test_16_bit_trajectory_close_to_torch_fused(ours, theirs, options, dtype):
    """The default fusedopt state (float32) against torch's fused step (state in the
    params' dtype): 25 steps through autograd, max|a - b| <= k spacings * max|b| per
    parameter, k = 4 for bfloat16 and 16 for float16 (measured worst: 1.5 and 8.8;
    torch's float16 exp_avg_sq loses small g**2 to float16's range, fusedopt's float32
    state does not, so the float16 trajectories part further)."""
    k = {torch.bfloat16: 4, torch.float16: 16}[dtype]
    models = [mlp(dtype), mlp(dtype)]
    opts = [ours(models[0].parameters(), **options),
            theirs(models[1].parameters(), fused=True, **options)]
    for t in range(STEPS):
        for model, opt in zip(models, opts):
            train_step(model, opt, t)
        for p, q in zip(*(m.parameters() for m in models)):
            assert p.dtype == dtype
            diff = float((p.detach().double() - q.detach().double()).abs().max())
            assert diff <= k * SPACING[dtype] * float(q.detach().double().abs().max()), t


def _fixed_grads(params, t):
    g = torch.Generator().manual_seed(500 + t)
    return [torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in params]


@pytest.mark.parametrize("cls,options", [
    pytest.param(ft.AdamW, {"lr": 0.01, "weight_decay": 0.1}, id="adamw"),
    pytest.param(ft.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True}, id="sgd-nesterov")])
def test_master_weights_equal_a_float32_run_bitwise(cls, options):
    """master_weights=True on bfloat16 params: the float32 master and the state are
    bitwise those of a float32 fusedopt.torch run started from the same (bfloat16)
    values and fed the same gradients (bfloat16, converted exactly to float32); the
    bfloat16 params are the master rounded to nearest after every step."""
    low = mlp(torch.bfloat16)
    high = mlp(torch.bfloat16).to(torch.float32)  # the bfloat16 values, exactly
    ours = cls(low.parameters(), master_weights=True, **options)
    ref = cls(high.parameters(), **options)
    for t in range(STEPS):
        for p, q, g in zip(low.parameters(), high.parameters(),
                           _fixed_grads(list(low.parameters()), t)):
            p.grad.copy_(g)
            q.grad.copy_(g.float())
        ours.step()
        ref.step()
        for p, q in zip(low.parameters(), high.parameters()):
            master = ours.state[p]["master"]
            assert master.dtype == torch.float32
            assert torch.equal(master, q.detach()), f"step {t}"
            assert torch.equal(bits(p), bits(q.detach().to(torch.bfloat16))), f"step {t}"
    for p, q in zip(low.parameters(), high.parameters()):
        for key, value in ref.state[q].items():
            assert torch.equal(ours.state[p][key], value), key


# ================================================================ state_dict
@pytest.mark.parametrize("cls,options", [
    pytest.param(ft.AdamW, {"lr": 0.01, "amsgrad": True}, id="adamw-amsgrad"),
    pytest.param(ft.SGD, {"lr": 0.05, "momentum": 0.9}, id="sgd-momentum")])
@pytest.mark.parametrize("precision_options,slot_dtype", [
    pytest.param({"state_dtype": "bfloat16"}, torch.bfloat16, id="bf16-state"),
    pytest.param({"master_weights": True}, torch.float32, id="master"),
    pytest.param({"stochastic_rounding": True, "seed": 7}, torch.float32, id="sr")])
def test_state_dict_round_trip_keeps_slot_dtypes(cls, options, precision_options,
                                                 slot_dtype):
    """state_dict() -> torch.save/load -> a new optimizer: every slot keeps its dtype
    (bfloat16 state; the master float32), and the two continue bitwise equal."""
    models = [mlp(torch.bfloat16), mlp(torch.bfloat16)]
    first = cls(models[0].parameters(), **options, **precision_options)
    for t in range(5):
        train_step(models[0], first, t)
    saved = first.state_dict()
    for state in saved["state"].values():
        for key, value in state.items():
            if key != "step":
                assert value.dtype == (torch.float32 if key == "master" else slot_dtype), key
        if precision_options.get("master_weights"):
            assert "master" in state
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    with torch.no_grad():
        for p, q in zip(*(m.parameters() for m in models)):
            q.copy_(p)
    second = cls(models[1].parameters(), **options, **precision_options)
    second.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    for p, q in zip(*(m.parameters() for m in models)):
        for key, value in first.state[p].items():
            assert torch.equal(second.state[q][key], value), key
            assert second.state[q][key].dtype == value.dtype
    for t in range(5, 10):
        for model, opt in zip(models, (first, second)):
            train_step(model, opt, t)
        for p, q in zip(*(m.parameters() for m in models)):
            assert torch.equal(bits(p), bits(q)), f"step {t}"


def test_torch_fused_checkpoint_loads_into_bf16_state():
    """torch.optim.AdamW's state_dict (bfloat16 state for bfloat16 params) loads into
    fusedopt.torch.AdamW(state_dtype="bfloat16") value for value."""
    models = [mlp(torch.bfloat16), mlp(torch.bfloat16)]
    theirs = torch.optim.AdamW(models[1].parameters(), lr=0.01, fused=True)
    for t in range(3):
        train_step(models[1], theirs, t)
    with torch.no_grad():
        for p, q in zip(*(m.parameters() for m in models)):
            p.copy_(q)
    ours = ft.AdamW(models[0].parameters(), lr=0.01, state_dtype="bfloat16")
    ours.load_state_dict(theirs.state_dict())
    for p, q in zip(*(m.parameters() for m in models)):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.state[p][key], theirs.state[q][key])
    for t in range(3, 8):
        for model, opt in zip(models, (ours, theirs)):
            train_step(model, opt, t)
        for p, q in zip(*(m.parameters() for m in models)):
            assert torch.equal(bits(p), bits(q)), f"step {t}"


# ========================================================= stochastic rounding
def _sr_run(seed, steps=6, **extra):
    model = mlp(torch.bfloat16)
    opt = ft.AdamW(model.parameters(), lr=1e-3, stochastic_rounding=True, seed=seed, **extra)
    for t in range(steps):
        train_step(model, opt, t)
    return [bits(p) for p in model.parameters()]


def test_stochastic_rounding_is_deterministic_given_a_seed():
    a, b, other = _sr_run(3), _sr_run(3), _sr_run(4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(not torch.equal(x, y) for x, y in zip(a, other))


def test_stochastic_rounding_rounds_to_a_neighbour_of_the_float32_value():
    """One step: with a master copy the float32 result is known; the stochastically
    rounded params are one of its two bfloat16 neighbours, and not always the
    nearest (lr 1e-3 moves most params by less than a spacing)."""
    models = [mlp(torch.bfloat16), mlp(torch.bfloat16)]
    sr = ft.AdamW(models[0].parameters(), lr=1e-3, stochastic_rounding=True, seed=11)
    master = ft.AdamW(models[1].parameters(), lr=1e-3, master_weights=True)
    for model, opt in zip(models, (sr, master)):
        train_step(model, opt, 0)
    off_nearest = 0
    for p, q in zip(*(m.parameters() for m in models)):
        exact = master.state[q]["master"]
        x = p.detach().float()
        down = exact.to(torch.bfloat16).float()
        # The bfloat16 neighbours of `exact`: truncation toward zero and one step away.
        trunc = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32)
        away = (trunc.view(torch.int32) + 0x10000).view(torch.float32)
        assert bool(((x == trunc) | (x == away)).all())
        off_nearest += int((x != down).sum())
    assert off_nearest > 0


# ================================================================== bad inputs
@pytest.mark.parametrize("cls", [ft.AdamW, ft.Adam, ft.SGD])
@pytest.mark.parametrize("kwargs,error,match", [
    pytest.param({"stochastic_rounding": True}, ValueError, "stochastic_rounding",
                 id="sr-float16"),
    pytest.param({"state_dtype": "float16"}, ValueError, "state_dtype", id="f16-state"),
    pytest.param({"state_dtype": "int8"}, ValueError, "state_dtype", id="int-state"),
    pytest.param({"master_weights": "yes"}, TypeError, "master_weights", id="master-str"),
    pytest.param({"stochastic_rounding": 1}, TypeError, "stochastic_rounding", id="sr-int"),
    pytest.param({"seed": -1}, ValueError, "seed", id="seed-negative"),
    pytest.param({"seed": 1.5}, TypeError, "seed", id="seed-float"),
])
def test_bad_precision_options_raise_before_anything_changes(cls, kwargs, error, match):
    model = mlp(torch.float16)
    snap = snapshot(model.parameters())
    with pytest.raises(error, match=match):
        cls(model.parameters(), **kwargs)
    assert_unchanged(snap)
    # Not flattened: a valid optimizer can still take the parameters.
    cls(model.parameters())


@pytest.mark.parametrize("kwargs,match", [
    pytest.param({"master_weights": True}, "master_weights", id="master-float32"),
    pytest.param({"stochastic_rounding": True}, "stochastic_rounding", id="sr-float32"),
    pytest.param({"master_weights": True, "stochastic_rounding": True}, "choose one",
                 id="master-and-sr"),
])
def test_options_refused_for_the_params_dtype(kwargs, match):
    model = mlp(torch.float32)
    snap = snapshot(model.parameters())
    with pytest.raises(ValueError, match=match):
        ft.AdamW(model.parameters(), **kwargs)
    assert_unchanged(snap)


def test_refused_precision_in_a_later_group_changes_nothing():
    """A bfloat16 group and a float16 group with stochastic rounding: refused before
    the first group is flattened."""
    a, b = mlp(torch.bfloat16), mlp(torch.float16)
    snap = snapshot(list(a.parameters()) + list(b.parameters()))
    with pytest.raises(ValueError, match=r"param_groups\[1\].*stochastic_rounding"):
        ft.AdamW([{"params": a.parameters()},
                  {"params": b.parameters(), "stochastic_rounding": True}])
    assert_unchanged(snap)
    assert not hasattr(next(a.parameters()), "_fusedopt_flat")


def test_keras_rule_optimizer_takes_the_options():
    model = mlp(torch.bfloat16)
    opt = ft.FusedOptimizer(model.parameters(), "lion", lr=1e-3, state_dtype="bfloat16")
    train_step(model, opt, 0)
    state = opt.state[next(model.parameters())]
    assert {v.dtype for k, v in state.items() if k != "step"} == {torch.bfloat16}


@pytest.mark.parametrize("options", [{}, {"master_weights": True},
                                     {"state_dtype": "bfloat16", "ema_overwrite_frequency": 3}],
                         ids=["f32-average", "master", "bf16-average-overwrite"])
def test_bf16_model_ema_equals_fusedopt_and_swaps_back_bitwise(options):
    """use_ema on a bfloat16 model: the steps and the average are fusedopt's on the same
    bfloat16 buffer bit for bit, the swap puts the average (rounded to bfloat16) in the
    model, and swapping back restores the trained bfloat16 weights exactly."""
    import fusedopt

    model = mlp(torch.bfloat16)
    start = [p.detach().clone() for p in model.parameters()]
    opt = ft.FusedOptimizer(model.parameters(), "adam", lr=1e-2, use_ema=True,
                            ema_momentum=0.8, **options)
    (flat,) = opt.flat_parameters
    reference = fusedopt.Adam(learning_rate=1e-2, use_ema=True, ema_momentum=0.8,
                              executor="numpy", **options)
    buffer = fusedopt.FlatBuffer.from_arrays(  # the start, bfloat16 bits as they are
        [p.view(torch.int16).numpy().view(flat.flat_params.dtype) for p in start])
    for t in range(7):
        train_step(model, opt, t)
        reference.apply(flat.flat_grads.data.copy(), buffer)
        assert np.array_equal(flat.flat_params.data.view(np.int16), buffer.data.view(np.int16))
    average = reference.slots()["average"]
    trained = [bits(p) for p in model.parameters()]
    with opt.ema_weights():
        held = flat.flat_params.data.astype(np.float32)
        np.testing.assert_array_equal(held, average.astype(flat.flat_params.dtype)
                                      .astype(np.float32))
        assert not np.array_equal(held, buffer.data.astype(np.float32))
    for p, b in zip(model.parameters(), trained):
        assert torch.equal(bits(p), b)
    assert np.array_equal(opt._buckets[0].optimizer.slots()["average"].view(np.uint8),
                          average.view(np.uint8))


# ================================================================= GradScaler
@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscale-clip"])
def test_grad_scaler_with_bf16_params(unscale_first):
    """GradScaler (float32 scale and found_inf) with bfloat16 params: steps with an
    inf gradient change nothing, the others match torch's fused AdamW within one
    bfloat16 spacing."""
    inf_at = (2, 3, 7)
    models = [mlp(torch.bfloat16), mlp(torch.bfloat16)]
    opts = [ft.AdamW(models[0].parameters(), lr=0.01, state_dtype="bfloat16"),
            torch.optim.AdamW(models[1].parameters(), lr=0.01, fused=True)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=4)
               for _ in opts]
    for t in range(12):
        for model, opt, scaler in zip(models, opts, scalers):
            opt.zero_grad()
            scaler.scale(loss_of(model, t)).backward()
            if t in inf_at:
                next(model.parameters()).grad[0, 0] = math.inf
            if unscale_first:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            before = [bits(p) for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            moved = any(not torch.equal(b, bits(p))
                        for b, p in zip(before, model.parameters()))
            assert moved == (t not in inf_at), (type(opt).__module__, t)
        for p, q in zip(*(m.parameters() for m in models)):
            assert_within(p, q, torch.bfloat16)
    assert scalers[0].get_scale() == scalers[1].get_scale()


# ==================================================================== training
def test_train_framework_torch_bfloat16_reaches_95_percent():
    """`python -m fusedopt train --framework torch --dtype bfloat16`'s run (Adam, 20
    epochs, a bfloat16 torch model whose passes run in bfloat16, no master copy)."""
    pytest.importorskip("sklearn")
    from fusedopt import train

    result = train.train("adam", framework="torch", dtype="bfloat16", device="cpu")
    assert result.dtype == "bfloat16"
    assert result.test_accuracy >= 0.95, result.accuracy_history
