"""fusedopt.torch: flat parameters and gradients, the torch.optim.Optimizer, and the
torch-compatible Adam/AdamW (epsilon_after_bias_correction), on CPU torch.

Parity with torch.optim runs 25 steps of a small MLP through autograd, in both of
torch's CPU implementations (the for-loop and fused=True), and compares params every
step and every state tensor at the end. Keras-mode steps must equal fusedopt on NumPy
buffers bit for bit.
"""

import copy
import gc
import io
import math

import numpy as np
import pytest

import fusedopt
from fusedopt import cuda

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fusedopt.torch")

STEPS = 25
# Normwise tolerances for torch parity: |a - b| <= RTOL*|b| + ATOL*max|b|. torch and
# fusedopt round the same formula in different orders (lerp vs m + (g-m)(1-b1), eps
# inside vs outside the bias correction).
TOL = {torch.float32: (2e-5, 1e-5), torch.float64: (1e-12, 1e-12)}
TORCH_IMPLEMENTATIONS = [pytest.param({"foreach": False}, id="for-loop"),
                         pytest.param({"fused": True}, id="fused")]


def assert_close(a, b, dtype=torch.float32):
    rtol, atol = TOL[dtype]
    scale = float(b.abs().max()) if b.numel() else 0.0
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(scale, 1e-30))


def mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(),
                               torch.nn.Linear(9, 4)).to(dtype)


def batch(t, dtype=torch.float32):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(16, 6, generator=g, dtype=dtype), torch.randn(16, 4, generator=g, dtype=dtype)


def loss_of(model, t):
    x, y = batch(t, next(model.parameters()).dtype)
    return ((model(x) - y) ** 2).mean()


def train_step(model, opt, t):
    opt.zero_grad()
    loss_of(model, t).backward()
    opt.step()


def snapshot(params):
    return [(p, p.data_ptr(), p.detach().clone(), _dense_copy(p.grad if p.is_leaf else None))
            for p in params]


def _dense_copy(grad):
    if grad is None:
        return None
    return grad.to_dense() if grad.layout != torch.strided else grad.clone()


def assert_unchanged(snap):
    for p, pointer, value, grad in snap:
        assert p.data_ptr() == pointer
        assert torch.equal(p.detach(), value)
        if grad is None:
            assert not p.is_leaf or p.grad is None
        else:
            assert torch.equal(_dense_copy(p.grad), grad)


def inside(tensor, flat):
    """Whether `tensor`'s memory lies in the 1-D tensor `flat`."""
    start = flat.data_ptr()
    return start <= tensor.data_ptr() < start + flat.nbytes


# ================================================================== flattening
def test_flattened_params_and_grads_are_views_of_the_flat_buffers():
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    (flat,) = ft.flatten_parameters(model)
    for p, value in zip(model.parameters(), before):
        assert inside(p, flat.data) and inside(p.grad, flat.grad)
        assert torch.equal(p.detach(), value)  # values kept
        assert torch.count_nonzero(p.grad) == 0
    # fusedopt's FlatBuffers alias the torch storage (DLPack), in both directions.
    assert np.shares_memory(flat.flat_params.data, flat.data.numpy())
    assert np.shares_memory(flat.flat_grads.data, flat.grad.numpy())
    assert flat.flat_params.data.__array_interface__["data"][0] == flat.data.data_ptr()
    flat.flat_params.data[0] = 123.0
    assert next(model.parameters()).view(-1)[0].item() == 123.0
    assert flat.flat_params.shapes == tuple(tuple(p.shape) for p in model.parameters())


def test_backward_accumulates_straight_into_the_flat_gradient():
    model, reference = mlp(), mlp()
    (flat,) = ft.flatten_parameters(model)
    for t in (0, 1):  # two backward passes accumulate, as torch does
        loss_of(model, t).backward()
        loss_of(reference, t).backward()
    expected = torch.cat([p.grad.reshape(-1) for p in reference.parameters()])
    torch.testing.assert_close(flat.grad, expected, rtol=1e-6, atol=1e-7)
    assert np.array_equal(flat.flat_grads.data, flat.grad.numpy())


def test_flattening_keeps_gradients_accumulated_before():
    model = mlp()
    loss_of(model, 0).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    (flat,) = ft.flatten_parameters(model.parameters())
    assert torch.equal(flat.grad, torch.cat([g.reshape(-1) for g in grads]))


def test_one_flat_buffer_per_dtype():
    a = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(2, 2, dtype=torch.float64))
    c = torch.nn.Parameter(torch.randn(5))
    flats = ft.flatten_parameters([a, b, c])
    assert [(f.dtype, [tuple(p.shape) for p in f.params]) for f in flats] == [
        (torch.float32, [(3,), (5,)]), (torch.float64, [(2, 2)])]
    assert flats[0].flat_params.dtype == np.float32 and flats[1].flat_params.dtype == np.float64


def test_module_to_and_state_dict_still_work():
    model = mlp()
    opt = ft.AdamW(model.parameters())
    (flat,) = opt.flat_parameters
    model.to("cpu")  # same device and dtype: nothing moves
    assert all(flat.holds(p) for p in model.parameters())
    state = copy.deepcopy(model.state_dict())
    assert all(torch.equal(v, p) for v, p in zip(state.values(), model.parameters()))
    train_step(model, opt, 0)
    model.load_state_dict(state)  # copies into the flat buffer, in place
    assert torch.equal(flat.data, torch.cat([v.reshape(-1) for v in state.values()]))
    assert all(flat.holds(p) for p in model.parameters())
    train_step(model, opt, 1)


def test_moving_the_model_after_flattening_is_refused_at_step():
    model = mlp()
    opt = ft.Adam(model.parameters())
    loss_of(model, 0).backward()
    model.double()  # new storage for every parameter
    snap = snapshot(model.parameters())
    flat_before = opt.flat_parameters[0].data.clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\].*no longer lives"):
        opt.step()
    assert_unchanged(snap)
    assert torch.equal(opt.flat_parameters[0].data, flat_before)
    ft.flatten_parameters(model)  # the moved parameters may be flattened anew


def test_autograd_still_refuses_a_backward_through_overwritten_params():
    """fusedopt writes through NumPy; the optimizer bumps torch's version counters so
    autograd detects the in-place update, as with a torch optimizer."""
    model = mlp()
    opt = ft.Adam(model.parameters())
    loss_of(model, 0).backward()
    pending = loss_of(model, 1)  # saved tensors include the params
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        pending.backward()


# ============================================================ the optimizer class
def test_it_is_a_torch_optimizer_with_amp_support():
    opt = ft.AdamW(mlp().parameters(), lr=0.01)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt._step_supports_amp_scaling
    assert opt.param_groups[0]["lr"] == 0.01 and opt.param_groups[0]["weight_decay"] == 0.01


def test_zero_grad_keeps_the_gradients_in_the_flat_buffer():
    model = mlp()
    opt = ft.Adam(model.parameters())
    (flat,) = opt.flat_parameters
    loss_of(model, 0).backward()
    for set_to_none in (True, False):
        opt.zero_grad(set_to_none=set_to_none)
        assert torch.count_nonzero(flat.grad) == 0
        assert all(p.grad is not None for p in model.parameters())
        loss_of(model, 0).backward()
        assert torch.count_nonzero(flat.grad) > 0


@pytest.mark.parametrize("detach", ["module_zero_grad", "create_graph", "assignment"])
def test_gradients_detached_from_the_flat_buffer_are_adopted_at_step(detach):
    """Module.zero_grad() sets .grad to None and backward then makes a new tensor;
    create_graph=True replaces .grad; so does an assignment. step() copies such a
    gradient into the flat buffer and makes .grad its view again."""
    model, reference = mlp(), mlp()
    opt, ref_opt = ft.Adam(model.parameters(), lr=0.01), ft.Adam(reference.parameters(), lr=0.01)
    train_step(reference, ref_opt, 0)
    if detach == "module_zero_grad":
        model.zero_grad()
        loss_of(model, 0).backward()
    elif detach == "create_graph":
        with pytest.warns(UserWarning, match="reference cycle"):
            loss_of(model, 0).backward(create_graph=True)
    else:
        loss_of(model, 0).backward()
        for p in model.parameters():
            p.grad = p.grad.clone()
    opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
        assert inside(p.grad, opt.flat_parameters[0].grad)
    if detach == "create_graph":
        for p in model.parameters():
            p.grad = None  # break the cycle the warning is about


def test_a_parameter_without_gradient_is_refused_not_skipped():
    model = mlp()
    opt = ft.AdamW(model.parameters())
    loss_of(model, 0).backward()
    first = next(model.parameters())
    first.grad = None
    snap = snapshot(model.parameters())
    with pytest.raises(ValueError, match=r"parameter 0 .* has no gradient"):
        opt.step()
    assert_unchanged(snap)
    assert float(opt.state[first]["step"]) == 0


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
def test_a_sparse_gradient_is_refused_at_step():
    p = torch.nn.Parameter(torch.randn(4))
    opt = ft.Adam([p])
    p.grad = torch.sparse_coo_tensor([[1]], [2.0], (4,))
    value = p.detach().clone()
    with pytest.raises(ValueError, match="sparse gradient"):
        opt.step()
    assert torch.equal(p.detach(), value)


def test_a_step_changes_exactly_the_parameters_torch_would():
    """Only the optimizer's parameters move, all of them that torch moves."""
    torch.manual_seed(3)
    models = [torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 5),
                                  torch.nn.Linear(5, 2)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [ft.AdamW(models[0][1].parameters()), torch.optim.AdamW(models[1][1].parameters())]
    changed = []
    for model, opt in zip(models, opts):
        before = [p.detach().clone() for p in model.parameters()]
        model(torch.randn(3, 4, generator=torch.Generator().manual_seed(0))).sum().backward()
        opt.step()
        changed.append([not torch.equal(b, p) for b, p in zip(before, model.parameters())])
    assert changed[0] == changed[1] == [False, False, True, True, False, False]


def test_step_returns_the_closure_loss_and_runs_it_with_grad():
    model, reference = mlp(), mlp()
    opt, ref_opt = ft.Adam(model.parameters()), ft.Adam(reference.parameters())
    expected = loss_of(model, 0).detach()

    def closure():
        opt.zero_grad()
        loss = loss_of(model, 0)
        loss.backward()
        return loss

    with torch.no_grad():  # as in a training loop's step(closure) under no_grad
        loss = opt.step(closure)
    train_step(reference, ref_opt, 0)
    assert torch.equal(loss.detach(), expected)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)


# ============================================================ Keras mode, bitwise
KERAS_CASES = [
    ("adam", {}), ("adamw", {"weight_decay": 0.05}), ("adam", {"amsgrad": True, "clipnorm": 0.5}),
    ("nadam", {}), ("sgd", {"momentum": 0.9, "nesterov": True}), ("rmsprop", {"centered": True}),
    ("adagrad", {}), ("adadelta", {"global_clipnorm": 0.3}), ("adamax", {}), ("lion", {}),
    ("ftrl", {"l1_regularization_strength": 0.01}),
]


@pytest.mark.parametrize("name, options", KERAS_CASES, ids=[
    f"{n}-{'-'.join(o) or 'default'}" for n, o in KERAS_CASES])
def test_keras_mode_equals_fusedopt_on_numpy_buffers_bitwise(name, options):
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4,), (1,), (2, 3, 2)]
    initial = [rng.normal(size=s).astype(np.float32) for s in shapes]
    params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in initial]
    opt = ft.FusedOptimizer(params, name, lr=0.01, **options)
    reference = fusedopt.get({"class_name": name, "config": {"learning_rate": 0.01, **options}})
    flat = fusedopt.FlatBuffer.from_arrays(initial)
    for _ in range(5):
        grads = [rng.normal(size=s).astype(np.float32) for s in shapes]
        for p, g in zip(params, grads):
            p.grad.copy_(torch.from_numpy(g))
        opt.step()
        reference.apply(fusedopt.FlatBuffer.from_arrays(grads), flat)
        assert np.array_equal(opt.flat_parameters[0].flat_params.data, flat.data)
    ours = opt._buckets[0].optimizer.slots()
    for slot, buf in reference.slots().items():
        assert np.array_equal(ours[slot], buf), slot
        assert torch.equal(opt.state[params[0]][slot], torch.from_numpy(buf[:12].reshape(3, 4)))


def test_keras_mode_groups_differing_in_lr_and_decay_equal_separate_optimizers():
    """Two groups that differ only in lr and weight_decay share one flat buffer and one
    fused step; each equals its own fusedopt optimizer bit for bit."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=5).astype(np.float32), rng.normal(size=3).astype(np.float32)
    pa, pb = torch.nn.Parameter(torch.from_numpy(a.copy())), torch.nn.Parameter(torch.from_numpy(b.copy()))
    opt = ft.FusedOptimizer([{"params": [pa]}, {"params": [pb], "lr": 0.1, "weight_decay": 0.0}],
                            "adamw", lr=0.01, weight_decay=0.3)
    refs = [(fusedopt.AdamW(0.01, weight_decay=0.3), a.copy()), (fusedopt.AdamW(0.1, 0.0), b.copy())]
    for _ in range(4):
        ga, gb = rng.normal(size=5).astype(np.float32), rng.normal(size=3).astype(np.float32)
        pa.grad.copy_(torch.from_numpy(ga))
        pb.grad.copy_(torch.from_numpy(gb))
        opt.step()
        for (ref, p), g in zip(refs, (ga, gb)):
            ref.apply(g, p)
    assert np.array_equal(pa.detach().numpy(), refs[0][1])
    assert np.array_equal(pb.detach().numpy(), refs[1][1])
    assert len(opt.flat_parameters) == 1


def _no_decay_groups(params):
    """torch's usual recipe: weight decay on matrices, none on biases."""
    params = list(params)
    return [{"params": [p for p in params if p.ndim > 1]},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": 0.02}]


@pytest.mark.parametrize("impl", TORCH_IMPLEMENTATIONS)
def test_groups_without_decay_on_biases_share_one_buffer_and_one_step(impl, monkeypatch):
    options = {"lr": 0.01, "weight_decay": 0.1}
    applies = []
    original = fusedopt.FusedOptimizer.apply

    def counting_apply(self, grads, params, **kwargs):
        applies.append(params.size)
        return original(self, grads, params, **kwargs)

    monkeypatch.setattr(fusedopt.FusedOptimizer, "apply", counting_apply)
    models, opts = run_against_torch(
        lambda p: ft.AdamW(_no_decay_groups(p), **options),
        lambda p: torch.optim.AdamW(_no_decay_groups(p), **options, **impl),
        scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(
            o, [lambda e: 0.9 ** e, lambda e: 1.0 / (1 + e)]))  # the lr ratio changes
    assert_same_state(models, opts)
    (flat,) = opts[0].flat_parameters  # both groups, one flat buffer
    assert len(flat.params) == len(list(models[0].parameters()))
    assert applies == [flat.data.numel()] * STEPS  # one fused step per optimizer step
    table = opts[0]._buckets[0].optimizer.segment_table
    assert table.decay == tuple(p.ndim > 1 for p in flat.params)


@pytest.mark.parametrize("impl", TORCH_IMPLEMENTATIONS)
def test_adam_l2_groups_without_decay_share_one_buffer(impl):
    options = {"lr": 0.01, "weight_decay": 0.1}
    models, opts = run_against_torch(lambda p: ft.Adam(_no_decay_groups(p), **options),
                                     lambda p: torch.optim.Adam(_no_decay_groups(p), **options,
                                                                **impl))
    assert_same_state(models, opts)
    assert len(opts[0].flat_parameters) == 1


def test_groups_differing_in_other_hyperparameters_keep_separate_buffers():
    params = list(mlp().parameters())
    opt = ft.AdamW([{"params": params[:2]}, {"params": params[2:], "betas": (0.5, 0.9)}])
    assert len(opt.flat_parameters) == 2
    params = list(mlp().parameters())
    opt = ft.AdamW([{"params": params[:2], "weight_decay": 0.1},
                    {"params": params[2:], "weight_decay": 0.2}])
    assert len(opt.flat_parameters) == 2  # one decay value per buffer


def test_shared_groups_that_diverge_are_refused_with_nothing_changed():
    model = mlp()
    opt = ft.AdamW(_no_decay_groups(model.parameters()), lr=0.01)
    train_step(model, opt, 0)
    opt.param_groups[1]["betas"] = (0.5, 0.9)
    loss_of(model, 1).backward()
    snap = snapshot(model.parameters())
    with pytest.raises(ValueError, match=r"param_groups\[0\] and param_groups\[1\] share one"):
        opt.step()
    assert_unchanged(snap)


def test_the_step_uses_the_learning_rate_in_param_groups():
    p = torch.nn.Parameter(torch.randn(6))
    opt = ft.FusedOptimizer([p], "adam", lr=0.1)
    reference, flat = fusedopt.Adam(0.1), p.detach().numpy().copy()
    for lr in (0.1, 0.0, 0.03):
        opt.param_groups[0]["lr"] = lr
        reference.learning_rate = lr
        p.grad.copy_(torch.randn(6))
        before = p.detach().clone()
        opt.step()
        reference.apply(p.grad.numpy().copy(), flat)
        assert np.array_equal(p.detach().numpy(), flat)
        assert torch.equal(p.detach(), before) == (lr == 0.0)


# ============================================================ torch-compatible mode
def run_against_torch(ours, theirs, dtype=torch.float32, steps=STEPS, scheduler=None,
                      per_step=None):
    """Train two copies of mlp(); `ours`/`theirs` make an optimizer from parameters.
    Params are compared after every step; the optimizers are returned."""
    models = [mlp(dtype), mlp(dtype)]
    opts = [ours(models[0].parameters()), theirs(models[1].parameters())]
    schedulers = [scheduler(o) for o in opts] if scheduler else [None, None]
    for t in range(steps):
        for model, opt, sched in zip(models, opts, schedulers):
            if per_step:
                per_step(t, model, opt)
            else:
                train_step(model, opt, t)
            if sched:
                sched.step()
        for p, q in zip(*(m.parameters() for m in models)):
            assert_close(p.detach(), q.detach(), dtype)
    return models, opts


def assert_same_state(models, opts, dtype=torch.float32):
    for p, q in zip(*(m.parameters() for m in models)):
        ours, theirs = opts[0].state[p], opts[1].state[q]
        assert set(ours) == set(theirs)
        assert float(ours["step"]) == float(theirs["step"])
        for key in set(theirs) - {"step"}:
            assert_close(ours[key], theirs[key], dtype)


ADAM_CASES = [
    pytest.param(ft.AdamW, torch.optim.AdamW, {}, id="adamw-defaults"),
    pytest.param(ft.AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.2, "eps": 1e-3,
                                               "betas": (0.8, 0.95)}, id="adamw-wd-eps"),
    pytest.param(ft.AdamW, torch.optim.AdamW, {"lr": 0.01, "amsgrad": True}, id="adamw-amsgrad"),
    pytest.param(ft.Adam, torch.optim.Adam, {"lr": 0.01, "eps": 1e-4}, id="adam"),
    pytest.param(ft.Adam, torch.optim.Adam, {"lr": 0.01, "amsgrad": True}, id="adam-amsgrad"),
    pytest.param(ft.Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1,
                                             "decoupled_weight_decay": True}, id="adam-decoupled"),
    # torch's coupled decay: weight_decay*p added to the gradient (fusedopt's
    # coupled_weight_decay).
    pytest.param(ft.Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}, id="adam-l2"),
    pytest.param(ft.Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.05, "amsgrad": True},
                 id="adam-l2-amsgrad"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("impl", TORCH_IMPLEMENTATIONS)
@pytest.mark.parametrize("ours, theirs, options", ADAM_CASES)
def test_torch_mode_matches_torch_optim(ours, theirs, options, impl, dtype):
    models, opts = run_against_torch(lambda p: ours(p, **options),
                                     lambda p: theirs(p, **options, **impl), dtype)
    assert_same_state(models, opts, dtype)


@pytest.mark.parametrize("impl", TORCH_IMPLEMENTATIONS)
@pytest.mark.parametrize("scheduler", [
    pytest.param(lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 0.9 ** e), id="lambda"),
    pytest.param(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.3), id="step"),
    # OneCycleLR also cycles betas[0] every step: the fused optimizers follow it.
    pytest.param(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=STEPS),
                 id="one-cycle"),
])
def test_torch_mode_follows_lr_schedulers(scheduler, impl):
    options = {"lr": 0.01, "weight_decay": 0.05}
    models, opts = run_against_torch(lambda p: ft.AdamW(p, **options),
                                     lambda p: torch.optim.AdamW(p, **options, **impl),
                                     scheduler=scheduler)
    assert_same_state(models, opts)
    assert opts[0].param_groups[0]["lr"] == opts[1].param_groups[0]["lr"]


def test_keras_epsilon_would_fail_the_torch_comparison():
    """The parity tests can tell where epsilon goes: Keras' placement (the default of
    fusedopt.Adam) does not match torch within the tolerance."""
    options = {"lr": 0.01, "eps": 1e-3}
    keras_mode = lambda p: ft.FusedOptimizer(p, "adam", lr=0.01, epsilon=1e-3)  # noqa: E731
    with pytest.raises(AssertionError):
        run_against_torch(keras_mode, lambda p: torch.optim.Adam(p, **options, foreach=False))
    run_against_torch(lambda p: ft.Adam(p, **options),
                      lambda p: torch.optim.Adam(p, **options, foreach=False))


def _grad_scaler_loop(inf_at, unscale_first):
    """A per_step for run_against_torch: GradScaler's documented loop, each optimizer
    with its own scaler; at steps `inf_at` a gradient is inf and nothing may move."""
    scalers = {}

    def per_step(t, model, opt):
        scaler = scalers.setdefault(
            id(opt), torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=4))
        opt.zero_grad()
        scaler.scale(loss_of(model, t)).backward()
        if t in inf_at:
            next(model.parameters()).grad[0, 0] = math.inf
        if unscale_first:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert moved == (t not in inf_at)
    return per_step, scalers


@pytest.mark.parametrize("impl", TORCH_IMPLEMENTATIONS)
@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscale-clip"])
def test_torch_mode_with_grad_scaler(impl, unscale_first):
    options = {"lr": 0.01, "weight_decay": 0.05}
    inf_at = (3, 4, 11)
    per_step, scalers = _grad_scaler_loop(inf_at, unscale_first)
    models, opts = run_against_torch(lambda p: ft.AdamW(p, **options),
                                     lambda p: torch.optim.AdamW(p, **options, **impl),
                                     per_step=per_step)
    assert_same_state(models, opts)
    assert float(opts[0].state[next(models[0].parameters())]["step"]) == STEPS - len(inf_at)
    ours, theirs = (scalers[id(o)].get_scale() for o in opts)
    assert ours == theirs != 2.0 ** 12  # the skips and the growth happened alike


def test_grad_scaler_scale_is_unscaled_inside_the_step():
    """With the scaled path (no unscale_), gradients reach step() scaled and the fused
    step divides them: the flat gradient still holds scaled values afterwards."""
    model, reference = mlp(), mlp()
    opt, ref_opt = ft.Adam(model.parameters(), lr=0.01), ft.Adam(reference.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    scaler.scale(loss_of(model, 0)).backward()
    scaled = opt.flat_parameters[0].grad.clone()
    scaler.step(opt)
    train_step(reference, ref_opt, 0)
    assert torch.equal(opt.flat_parameters[0].grad, scaled)
    torch.testing.assert_close(scaled / 2.0 ** 10, ref_opt.flat_parameters[0].grad)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    assert opt._buckets[0].optimizer.loss_scale_factor is None  # restored after the step


@pytest.mark.parametrize("impl", TORCH_IMPLEMENTATIONS)
def test_param_groups_match_torch(impl):
    def groups(params):
        params = list(params)
        return [{"params": params[0::2]},
                {"params": params[1::2], "lr": 0.03, "weight_decay": 0.0, "betas": (0.5, 0.9)}]
    options = {"lr": 0.01, "weight_decay": 0.1}
    models, opts = run_against_torch(lambda p: ft.AdamW(groups(p), **options),
                                     lambda p: torch.optim.AdamW(groups(p), **options, **impl))
    assert_same_state(models, opts)
    assert len(opts[0].flat_parameters) == 2


def test_add_param_group_and_group_changes_match_torch():
    """A group added later starts at step 0 (as torch's new parameters do); a group's
    weight_decay edited mid-run takes effect at the next step."""
    def per_step(t, model, opt):
        if t == 5:
            opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.02})
        if t == 9:
            opt.param_groups[0]["weight_decay"] = 0.5
        train_step(model, opt, t)

    options = {"lr": 0.01, "weight_decay": 0.05}
    models, opts = run_against_torch(
        lambda p: ft.AdamW(list(p)[:2], **options),
        lambda p: torch.optim.AdamW(list(p)[:2], **options, foreach=False), per_step=per_step)
    assert_same_state(models, opts)
    assert float(opts[0].state[models[0][2].weight]["step"]) == STEPS - 5


def test_changing_a_group_in_a_way_that_changes_the_state_is_refused():
    model = mlp()
    opt = ft.AdamW(model.parameters())
    train_step(model, opt, 0)
    opt.param_groups[0]["amsgrad"] = True
    loss_of(model, 1).backward()
    snap = snapshot(model.parameters())
    with pytest.raises(ValueError, match=r"param_groups\[0\].*state slots"):
        opt.step()
    assert_unchanged(snap)
    opt.param_groups[0]["amsgrad"] = False
    opt.param_groups[0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['betas'\] must lie in \[0, 1\)"):
        opt.step()
    assert_unchanged(snap)


# ================================================================== state_dict
@pytest.mark.parametrize("make", [
    pytest.param(lambda p: ft.AdamW(p, lr=0.01, amsgrad=True), id="adamw"),
    pytest.param(lambda p: ft.FusedOptimizer(p, "nadam", lr=0.01, clipnorm=1.0), id="keras-nadam"),
    pytest.param(lambda p: ft.FusedOptimizer(p, "adagrad", lr=0.05), id="keras-adagrad"),
    pytest.param(lambda p: ft.SGD(p, lr=0.05, momentum=0.9, nesterov=True), id="torch-sgd"),
])
def test_state_dict_round_trip_resumes_exactly(make):
    model = mlp()
    opt = make(model.parameters())
    for t in range(6):
        train_step(model, opt, t)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    for t in range(6, 12):
        train_step(model, opt, t)

    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = mlp(seed=5)
    resumed.load_state_dict(saved["model"])
    resumed_opt = make(resumed.parameters())
    resumed_opt.load_state_dict(saved["opt"])
    for t in range(6, 12):
        train_step(resumed, resumed_opt, t)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], resumed_opt.state[q][key]), key


def test_state_dict_is_a_copy_in_torchs_layout():
    model = mlp()
    opt = ft.Adam(model.parameters(), lr=0.01)
    train_step(model, opt, 0)
    state = opt.state_dict()
    assert set(state["state"]) == {0, 1, 2, 3}
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert state["param_groups"][0]["params"] == [0, 1, 2, 3]
    saved = state["state"][0]["exp_avg"].clone()
    train_step(model, opt, 1)
    assert torch.equal(state["state"][0]["exp_avg"], saved)  # not a live view


@pytest.mark.parametrize("direction", ["torch-to-fusedopt", "fusedopt-to-torch"])
def test_checkpoints_move_between_torch_adamw_and_fusedopt(direction):
    options = {"lr": 0.01, "weight_decay": 0.1}
    fused = lambda p: ft.AdamW(p, **options)  # noqa: E731
    plain = lambda p: torch.optim.AdamW(p, **options, foreach=False)  # noqa: E731
    make_source, make_target = (plain, fused) if direction == "torch-to-fusedopt" else (fused, plain)
    source_model = mlp()
    source = make_source(source_model.parameters())
    for t in range(5):
        train_step(source_model, source, t)
    model_state, opt_state = copy.deepcopy((source_model.state_dict(), source.state_dict()))
    target_model = mlp(seed=9)
    target = make_target(target_model.parameters())
    target_model.load_state_dict(model_state)
    target.load_state_dict(opt_state)
    for t in range(5, 10):
        train_step(source_model, source, t)
        train_step(target_model, target, t)
    models, opts = [target_model, source_model], [target, source]
    for p, q in zip(*(m.parameters() for m in models)):
        assert_close(p.detach(), q.detach())
    assert_same_state(models, opts)
    assert float(target.state[next(target_model.parameters())]["step"]) == 10


def test_load_state_dict_refuses_what_does_not_fit():
    model = mlp()
    opt = ft.AdamW(model.parameters())
    train_step(model, opt, 0)
    good = opt.state_dict()
    train_step(model, opt, 1)
    before = copy.deepcopy(opt.state_dict())

    def broken(edit):
        state = copy.deepcopy(good)
        edit(state)
        return state

    cases = [
        (broken(lambda s: s["param_groups"].append(dict(s["param_groups"][0]))), "2 parameter groups"),
        (broken(lambda s: s["param_groups"][0]["params"].pop()), "3 parameters"),
        (broken(lambda s: s["state"][1].pop("exp_avg")), "keeps"),
        (broken(lambda s: s["state"][1].__setitem__("exp_avg", torch.zeros(2))), "shape"),
        (broken(lambda s: s["state"][2].__setitem__("step", torch.tensor(7.0))), "one whole step"),
        (broken(lambda s: s["state"].pop(3)), "some parameters"),
        (broken(lambda s: s["param_groups"][0].__setitem__("eps", -1.0)), r"\['eps'\]"),
        ({"state": {}}, "'state' and 'param_groups'"),
    ]
    for state, message in cases:
        with pytest.raises(ValueError, match=message):
            opt.load_state_dict(state)
        after = opt.state_dict()
        assert after["param_groups"] == before["param_groups"]
        for i in before["state"]:
            for key in before["state"][i]:
                assert torch.equal(after["state"][i][key], before["state"][i][key])


# ================================================================== bad inputs
def bad_parameter_cases():
    def leaf(*shape, **kw):
        return torch.nn.Parameter(torch.randn(*shape, **kw))

    owners = []  # a flat buffer counts as an owner while it is alive

    def already_flat():
        p = leaf(3)
        owners.append(ft.flatten_parameters([p]))
        return [p]

    def sparse_grad():
        p = leaf(4)
        p.grad = torch.sparse_coo_tensor([[0]], [1.0], (4,))
        return [p]

    def duplicate():
        p = leaf(3)
        return [p, p]

    return [
        ("mixed-devices", lambda: [leaf(3), torch.nn.Parameter(torch.empty(3, device="meta"))],
         ValueError, r"several devices \(cpu, meta\)"),
        ("meta-device", lambda: [torch.nn.Parameter(torch.empty(3, device="meta"))],
         ValueError, "lives on meta"),
        ("non-leaf", lambda: [leaf(3) * 2], ValueError, "not a leaf"),
        ("no-grad", lambda: [leaf(3), torch.nn.Parameter(torch.randn(2), requires_grad=False)],
         ValueError, "parameter 1 .* does not require grad"),
        # float16 and bfloat16 are accepted (tests/test_torch_bf16.py).
        ("complex64", lambda: [leaf(3, dtype=torch.complex64)], ValueError, "complex64"),
        ("sparse-grad", sparse_grad, ValueError, "sparse gradient"),
        ("flattened-twice", already_flat, ValueError, "already flattened"),
        ("duplicate", duplicate, ValueError, "given twice"),
        ("not-a-tensor", lambda: [leaf(3), 1.0], TypeError, "item 1 is a float"),
        ("empty", lambda: [], ValueError, "empty"),
    ]


BAD_PARAMETERS = bad_parameter_cases()
ENTRY_POINTS = [
    pytest.param(ft.flatten_parameters, id="flatten"),
    pytest.param(lambda p: ft.AdamW(p), id="AdamW"),
    pytest.param(lambda p: ft.FusedOptimizer(p, "lion"), id="FusedOptimizer"),
]


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name, make, error, message", BAD_PARAMETERS,
                         ids=[c[0] for c in BAD_PARAMETERS])
def test_bad_parameters_are_refused_with_nothing_changed(name, make, error, message, entry):
    params = make()
    snap = snapshot([p for p in params
                     if isinstance(p, torch.Tensor) and p.device.type != "meta"])
    with pytest.raises(error, match=message):
        entry(params)
    assert_unchanged(snap)
    if name != "flattened-twice":
        assert not any(hasattr(p, "_fusedopt_flat") for p, *_ in snap)


def test_a_bad_later_group_leaves_the_first_group_unflattened():
    good = torch.nn.Parameter(torch.randn(3))
    pointer = good.data_ptr()
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]: parameter 0 .*complex64"):
        ft.AdamW([{"params": [good]},
                  {"params": [torch.nn.Parameter(torch.randn(2, dtype=torch.complex64))]}])
    assert good.data_ptr() == pointer and good.grad is None


def test_two_optimizers_cannot_share_parameters():
    model = mlp()
    first = ft.AdamW(model.parameters())
    with pytest.raises(ValueError, match="already flattened"):
        ft.AdamW(model.parameters())
    opt = ft.Adam(mlp().parameters())
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]: .*already"):
        opt.add_param_group({"params": list(model.parameters())[:1]})
    assert len(opt.param_groups) == 1
    del first  # once the first optimizer is gone, nothing else steps the parameters
    gc.collect()
    ft.AdamW(model.parameters())


@pytest.mark.parametrize("make, error, message", [
    (lambda p: ft.AdamW(p, differentiable=True), ValueError, "differentiable"),
    (lambda p: ft.AdamW(p, lr=-1.0), ValueError, r"\['lr'\] must be finite and >= 0"),
    (lambda p: ft.AdamW(p, betas=(0.9, 1.0)), ValueError, r"\['betas'\] must lie in"),
    (lambda p: ft.AdamW(p, betas=0.9), TypeError, r"\['betas'\] must be a pair"),
    (lambda p: ft.AdamW(p, eps=-1e-8), ValueError, r"\['eps'\]"),
    (lambda p: ft.AdamW(p, weight_decay=math.nan), ValueError, r"\['weight_decay'\]"),
    (lambda p: ft.AdamW([{"params": p, "lr": "fast"}]), TypeError, r"\['lr'\] must be a number"),
    (lambda p: ft.FusedOptimizer(p, "adamm"), ValueError, "Unknown optimizer 'adamm'"),
    (lambda p: ft.FusedOptimizer(p, fusedopt.Adam()), TypeError, "`optimizer` must be a fusedopt"),
    (lambda p: ft.FusedOptimizer(p, "adam", learning_rate=0.1), ValueError, "pass lr="),
    (lambda p: ft.FusedOptimizer(p, "adam", skip_nonfinite=True), ValueError, "GradScaler"),
    (lambda p: ft.FusedOptimizer(p, "adam", beta_1=1.5), ValueError, "beta_1"),
    (lambda p: ft.FusedOptimizer([{"params": p, "clipnorm": -1.0}], "sgd"), ValueError,
     r"param_groups\[0\]: .*clipnorm"),
    (lambda p: ft.FusedOptimizer(p, "sgd", colour="red"), ValueError, "unknown argument"),
    (lambda p: ft.AdamW(next(iter(p))), TypeError, "single tensor"),
    (lambda p: ft.AdamW(set(p)), TypeError, "not a set"),
])
def test_bad_hyperparameters_are_refused_with_nothing_changed(make, error, message):
    model = mlp()
    snap = snapshot(model.parameters())
    with pytest.raises(error, match=message):
        make(model.parameters())
    assert_unchanged(snap)
    ft.AdamW(model.parameters())  # nothing was flattened


# ============================================ fusedopt's epsilon_after_bias_correction
def test_epsilon_after_bias_correction_golden_two_steps():
    """By hand, torch's formula: p -= lr/(1-b1^t) * m/(sqrt(v)/sqrt(1-b2^t) + eps)."""
    lr, b1, b2, eps = 0.1, 0.8, 0.9, 0.05
    p0 = np.array([0.5, -1.5, 2.0, 0.0])
    grads = [np.array([0.1, -0.2, 3.0, 0.0]), np.array([-0.4, 0.3, 1.0, 2.0])]
    p, m, v, expected = p0.copy(), np.zeros(4), np.zeros(4), []
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr / (1 - b1 ** t) * m / (np.sqrt(v) / math.sqrt(1 - b2 ** t) + eps)
        expected.append(p.copy())
    opt = fusedopt.Adam(lr, b1, b2, eps, epsilon_after_bias_correction=True)
    keras = fusedopt.Adam(lr, b1, b2, eps)
    params, keras_params = p0.copy(), p0.copy()
    for g, want in zip(grads, expected):
        opt.apply(g.copy(), params)
        keras.apply(g.copy(), keras_params)
        np.testing.assert_allclose(params, want, rtol=1e-12, atol=1e-15)
    assert not np.allclose(keras_params, expected[-1], rtol=1e-3)  # the flag matters


def test_epsilon_after_bias_correction_in_config_and_checkpoint(tmp_path):
    assert "epsilon_after_bias_correction" not in fusedopt.AdamW().get_config()
    opt = fusedopt.AdamW(0.01, epsilon_after_bias_correction=True)
    config = opt.get_config()
    assert config["epsilon_after_bias_correction"] is True
    assert fusedopt.AdamW.from_config(config).epsilon_after_bias_correction is True
    params = fusedopt.FlatBuffer.from_arrays([np.ones(3, np.float32)])
    opt.apply(params.full_like(0.5), params)
    fusedopt.save(tmp_path / "run.npz", opt, params)
    loaded, _ = fusedopt.load(tmp_path / "run.npz")
    assert loaded.epsilon_after_bias_correction is True
    with pytest.raises(TypeError, match="epsilon_after_bias_correction"):
        fusedopt.Adam(epsilon_after_bias_correction="yes")


# ===================================================================== the job
@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from fusedopt import train

    return train.load_digits_dataset(0)


def test_train_framework_torch_reaches_95_percent(digits):
    from fusedopt import train

    result = train.train("adamw", data=digits, framework="torch", device="cpu")
    assert result.test_accuracy >= 0.95
    assert result.steps == 20 * math.ceil(len(digits.y_train) / 32)
    assert result.settings.endswith("[torch]")


def test_train_torch_biases_get_no_weight_decay():
    from fusedopt import train, train_torch

    model = train_torch.build_model([4, 3, 2], seed=0)
    opt = train_torch.make_torch_optimizer(train.make_optimizer("adamw", weight_decay=0.5), model)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]
    before = [p.detach().clone() for p in model.parameters()]
    model[0].bias.data.fill_(1.0)
    model[2].bias.data.fill_(1.0)
    opt.zero_grad()
    opt.step()  # zero gradients: only decay moves anything
    for (name, p), b in zip(model.named_parameters(), before):
        if name.endswith("bias"):
            assert torch.all(p == 1.0), name
        else:
            torch.testing.assert_close(p, b * (1 - 0.5 * 0.001))


def test_train_torch_starts_from_the_numpy_jobs_weights():
    from fusedopt import train, train_torch

    model = train_torch.build_model([5, 4, 3], seed=2)
    flat = train.init_params([5, 4, 3], seed=2)
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    with torch.no_grad():
        ours = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, train.forward(flat, x)[-1], rtol=1e-5, atol=1e-6)


# ========================================================================= EMA
def _ema_pair(**options):
    """A float32 and a float64 parameter (two flat buffers) under the torch optimizer,
    and fusedopt optimizers on NumPy buffers stepping the same values."""
    rng = np.random.default_rng(3)
    initial = [rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=5)]
    params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in initial]
    opt = ft.FusedOptimizer(params, "adam", lr=0.05, use_ema=True, **options)
    config = {"learning_rate": 0.05, "use_ema": True, **options}
    references = [(fusedopt.get({"class_name": "adam", "config": config}),
                   fusedopt.FlatBuffer.from_arrays([a])) for a in initial]
    return rng, params, opt, references


def _ema_steps(rng, params, opt, references, steps):
    for _ in range(steps):
        for p, (reference, flat) in zip(params, references):
            g = rng.normal(size=p.shape).astype(flat.dtype)
            p.grad.copy_(torch.from_numpy(g))
            reference.apply(g.ravel(), flat)
        opt.step()


@pytest.mark.parametrize("options", [{"ema_momentum": 0.9}, {"ema_overwrite_frequency": 3}],
                         ids=["ema", "ema-overwrite3"])
def test_ema_weights_swap_into_the_model_and_back(options):
    rng, params, opt, references = _ema_pair(**options)
    _ema_steps(rng, params, opt, references, 5)
    own = [p.detach().clone() for p in params]
    averages = [reference.slots()["average"] for reference, _ in references]
    for p, (_, flat) in zip(params, references):  # the steps as fusedopt's, bit for bit
        assert np.array_equal(p.detach().numpy().ravel(), flat.data)
    assert not any(np.array_equal(a, o.numpy().ravel()) for a, o in zip(averages, own))
    with opt.ema_weights():
        for p, average in zip(params, averages):
            assert np.array_equal(p.detach().numpy().ravel(), average)
        with pytest.raises(ValueError, match="hold the EMA weights"):
            opt.step()
        with pytest.raises(ValueError, match="already"):
            opt.finalize_variable_values()
        with pytest.raises(ValueError, match="state_dict: .*swap them back before saving"):
            opt.state_dict()
        for p, average in zip(params, averages):  # refused with nothing changed
            assert np.array_equal(p.detach().numpy().ravel(), average)
    for p, o in zip(params, own):
        assert torch.equal(p.detach(), o)
    for p, average in zip(params, averages):  # the average is its own again
        assert np.array_equal(opt.state[p]["average"].numpy().ravel(), average)
    _ema_steps(rng, params, opt, references, 2)  # training goes on exactly
    for p, (_, flat) in zip(params, references):
        assert np.array_equal(p.detach().numpy().ravel(), flat.data)


def test_finalize_copies_the_averages_into_the_model():
    rng, params, opt, references = _ema_pair(ema_momentum=0.8)
    _ema_steps(rng, params, opt, references, 4)
    opt.finalize_variable_values()
    for p, (reference, _) in zip(params, references):
        average = reference.slots()["average"]
        assert np.array_equal(p.detach().numpy().ravel(), average)
        assert np.array_equal(opt.state[p]["average"].numpy().ravel(), average)


def test_ema_weights_are_refused_without_use_ema_or_before_a_step():
    params = [torch.nn.Parameter(torch.ones(3))]
    plain = ft.FusedOptimizer(params, "adam", lr=0.1)
    with pytest.raises(ValueError, match="needs an optimizer made with `use_ema=True`"):
        plain.swap_ema_weights()
    plain.finalize_variable_values()  # Keras: nothing to do without use_ema
    assert torch.equal(params[0].detach(), torch.ones(3))
    fresh = ft.FusedOptimizer([torch.nn.Parameter(torch.ones(3))], "adam", use_ema=True)
    with pytest.raises(ValueError, match="no moving average yet; step\\(\\) first"):
        fresh.swap_ema_weights()
    with pytest.raises(ValueError, match="no moving average yet"):
        fresh.finalize_variable_values()


def test_gradient_accumulation_is_refused_naming_torchs_own():
    """Silently ignored before: refused now, pointing to torch's accumulation."""
    with pytest.raises(ValueError, match="`gradient_accumulation_steps` is not an argument "
                                         ".*run backward\\(\\) on N micro-batches"):
        ft.FusedOptimizer([torch.nn.Parameter(torch.ones(3))], "adam",
                          gradient_accumulation_steps=2)


def test_ema_options_reach_every_flat_buffer_and_the_state():
    rng, params, opt, references = _ema_pair(ema_momentum=0.7, ema_overwrite_frequency=2)
    assert all(b.optimizer.use_ema and b.optimizer.ema_momentum == 0.7
               and b.optimizer.ema_overwrite_frequency == 2 for b in opt._buckets)
    _ema_steps(rng, params, opt, references, 3)
    state = opt.state_dict()
    resumed = ft.FusedOptimizer([torch.nn.Parameter(p.detach().clone()) for p in params],
                                "adam", lr=0.05, use_ema=True, ema_momentum=0.7,
                                ema_overwrite_frequency=2)
    resumed.load_state_dict(state)
    for p, q in zip(params, resumed.param_groups[0]["params"]):
        assert torch.equal(resumed.state[q]["average"], opt.state[p]["average"])


# ========================================================================= GPU
gpu = pytest.mark.skipif(not (torch.cuda.is_available() and cuda.gpu_available()),
                         reason="needs a CUDA GPU with CuPy")


@gpu
def test_gpu_flat_buffers_alias_through_dlpack_and_match_torch():
    device = torch.device("cuda:0")
    models = [mlp().to(device), mlp().to(device)]
    opts = [ft.AdamW(models[0].parameters(), lr=0.01),
            torch.optim.AdamW(models[1].parameters(), lr=0.01, fused=True)]
    (flat,) = opts[0].flat_parameters
    assert flat.flat_params.device == "gpu:0"
    assert flat.flat_params.data.data.ptr == flat.data.data_ptr()
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0 ** 10) for _ in opts]
    for t in range(STEPS):
        for model, opt, scaler in zip(models, opts, scalers):
            opt.zero_grad()
            x, y = (a.to(device) for a in batch(t))
            scaler.scale(((model(x) - y) ** 2).mean()).backward()
            if t == 4:
                next(model.parameters()).grad[0, 0] = math.inf
            scaler.step(opt)
            scaler.update()
    for p, q in zip(*(m.parameters() for m in models)):
        assert_close(p.detach(), q.detach())


@gpu
def test_gpu_ema_weights_swap_on_the_device_and_match_the_cpu():
    """The same steps on a CUDA model and a CPU one: the GPU's averages, swapped into
    the model on the device, agree with the CPU's within float32 rounding (autograd's
    gradients differ in their last bits between the two), and swapping back restores
    the trained weights exactly."""
    device = torch.device("cuda:0")
    models = [mlp(), mlp().to(device)]
    opts = [ft.FusedOptimizer(m.parameters(), "adam", lr=0.01, use_ema=True, ema_momentum=0.9)
            for m in models]
    for t in range(5):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            x, y = (a.to(next(model.parameters()).device) for a in batch(t))
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
    cpu_average = [opts[0].state[p]["average"].clone() for p in models[0].parameters()]
    trained = [p.detach().clone() for p in models[1].parameters()]
    with opts[1].ema_weights():
        for p, a in zip(models[1].parameters(), cpu_average):
            assert p.device == device
            assert_close(p.detach().cpu(), a)
    for p, q in zip(models[1].parameters(), trained):
        assert torch.equal(p.detach(), q)
