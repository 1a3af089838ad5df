"""fusedopt.torch's torch-compatible SGD, maximize and torch's other constructor
arguments, and torch.amp.GradScaler without a host sync, against torch.optim on CPU
torch (the for-loop, foreach and fused implementations), 25 steps of a small MLP
through autograd: params every step, every state tensor at the end.
"""

import copy
import math

import numpy as np
import pytest

import fusedopt
from fusedopt import cuda

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fusedopt.torch")

from test_torch import (STEPS, _grad_scaler_loop, assert_close, loss_of, mlp,  # noqa: E402
                        run_against_torch, snapshot, assert_unchanged, train_step)

IMPLEMENTATIONS = [pytest.param({"foreach": False}, id="for-loop"),
                   pytest.param({"foreach": True}, id="foreach"),
                   pytest.param({"fused": True}, id="fused")]


def assert_same_sgd_state(models, opts, dtype=torch.float32):
    """torch's SGD keeps only momentum_buffer (nothing without momentum); ours adds the
    step count."""
    for p, q in zip(*(m.parameters() for m in models)):
        ours, theirs = opts[0].state[p], opts[1].state[q]
        assert set(ours) - {"step"} == set(theirs) - {"step"}  # torch keeps a loaded one
        for key in set(theirs) - {"step"}:
            assert_close(ours[key], theirs[key], dtype)


# ================================================================ torch's SGD
SGD_CASES = [
    pytest.param({"lr": 0.05}, id="plain"),
    pytest.param({"lr": 0.05, "weight_decay": 0.1}, id="l2"),
    pytest.param({"lr": 0.05, "momentum": 0.9}, id="momentum"),
    pytest.param({"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05},
                 id="momentum-dampening-l2"),
    pytest.param({"lr": 0.05, "momentum": 0.8, "nesterov": True}, id="nesterov"),
    pytest.param({"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.1},
                 id="nesterov-l2"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("options", SGD_CASES)
def test_sgd_matches_torch_optim_sgd(options, impl, dtype):
    models, opts = run_against_torch(lambda p: ft.SGD(p, **options),
                                     lambda p: torch.optim.SGD(p, **options, **impl), dtype)
    assert_same_sgd_state(models, opts, dtype)
    assert float(opts[0].state[next(models[0].parameters())]["step"]) == STEPS


def test_keras_momentum_would_fail_the_torch_comparison():
    """The parity test tells the two momentum forms apart: with a changing lr, Keras'
    velocity (in units of lr) differs from torch's buffer (in gradient units)."""
    scheduler = lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.3)  # noqa
    keras_mode = lambda p: ft.FusedOptimizer(p, "sgd", lr=0.05, momentum=0.9)  # noqa: E731
    theirs = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)  # noqa: E731
    with pytest.raises(AssertionError):
        run_against_torch(keras_mode, theirs, scheduler=scheduler)
    run_against_torch(lambda p: ft.SGD(p, lr=0.05, momentum=0.9), theirs, scheduler=scheduler)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("scheduler", [
    pytest.param(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.3), id="step"),
    # OneCycleLR cycles SGD's momentum too: the fused optimizer follows it.
    pytest.param(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=STEPS),
                 id="one-cycle"),
])
def test_sgd_follows_lr_schedulers(scheduler, impl):
    options = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
    models, opts = run_against_torch(lambda p: ft.SGD(p, **options),
                                     lambda p: torch.optim.SGD(p, **options, **impl),
                                     scheduler=scheduler)
    assert_same_sgd_state(models, opts)
    assert opts[0].param_groups[0]["lr"] == opts[1].param_groups[0]["lr"]
    assert opts[0].param_groups[0]["momentum"] == opts[1].param_groups[0]["momentum"]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_sgd_param_groups_without_decay_on_biases_share_one_buffer(impl):
    def groups(params):
        params = list(params)
        return [{"params": params[0::2]},
                {"params": params[1::2], "lr": 0.02, "weight_decay": 0.0}]
    options = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}
    models, opts = run_against_torch(lambda p: ft.SGD(groups(p), **options),
                                     lambda p: torch.optim.SGD(groups(p), **options, **impl))
    assert_same_sgd_state(models, opts)
    assert len(opts[0].flat_parameters) == 1  # one buffer, one fused step


def test_sgd_add_param_group_starts_its_buffer_at_the_first_gradient():
    def per_step(t, model, opt):
        if t == 5:
            opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.02,
                                 "dampening": 0.5})
        train_step(model, opt, t)

    options = {"lr": 0.05, "momentum": 0.9}
    models, opts = run_against_torch(
        lambda p: ft.SGD(list(p)[:2], **options),
        lambda p: torch.optim.SGD(list(p)[:2], **options, foreach=False), per_step=per_step)
    assert_same_sgd_state(models, opts)
    assert len(opts[0].flat_parameters) == 2  # dampening differs: a buffer of its own


@pytest.mark.parametrize("direction", ["torch-to-fusedopt", "fusedopt-to-torch"])
def test_sgd_checkpoints_move_between_torch_and_fusedopt(direction):
    options = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}
    fused = lambda p: ft.SGD(p, **options)  # noqa: E731
    plain = lambda p: torch.optim.SGD(p, **options, foreach=False)  # noqa: E731
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
    for p, q in zip(target_model.parameters(), source_model.parameters()):
        assert_close(p.detach(), q.detach())
    fused_opt, fused_model = (target, target_model) if direction == "torch-to-fusedopt" \
        else (source, source_model)
    plain_opt, plain_model = (source, source_model) if direction == "torch-to-fusedopt" \
        else (target, target_model)
    assert_same_sgd_state([fused_model, plain_model], [fused_opt, plain_opt])


# ==================================================== maximize and the other args
MAXIMIZE_CASES = [
    pytest.param(ft.Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}, id="adam-l2"),
    pytest.param(ft.AdamW, torch.optim.AdamW, {"lr": 0.01, "amsgrad": True}, id="adamw-amsgrad"),
    pytest.param(ft.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.1},
                 id="sgd-momentum-l2"),
    pytest.param(ft.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True},
                 id="sgd-nesterov"),
]


@pytest.mark.parametrize("impl", [pytest.param({"foreach": False}, id="for-loop"),
                                  pytest.param({"fused": True}, id="fused")])
@pytest.mark.parametrize("ours, theirs, options", MAXIMIZE_CASES)
def test_maximize_matches_torch(ours, theirs, options, impl):
    models, opts = run_against_torch(lambda p: ours(p, **options, maximize=True),
                                     lambda p: theirs(p, **options, maximize=True, **impl))
    check = assert_same_sgd_state if ours is ft.SGD else _assert_same_adam_state
    check(models, opts)


def _assert_same_adam_state(models, opts):
    for p, q in zip(*(m.parameters() for m in models)):
        ours, theirs = opts[0].state[p], opts[1].state[q]
        assert set(ours) == set(theirs)
        for key in set(theirs) - {"step"}:
            assert_close(ours[key], theirs[key])


def test_maximize_climbs():
    """Against the rule itself, not only torch: maximizing -loss is minimizing loss."""
    models = [mlp(), mlp()]
    up = ft.SGD(models[0].parameters(), lr=0.05, momentum=0.9, maximize=True)
    down = ft.SGD(models[1].parameters(), lr=0.05, momentum=0.9)
    for t in range(5):
        up.zero_grad()
        (-loss_of(models[0], t)).backward()
        up.step()
        train_step(models[1], down, t)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


@pytest.mark.parametrize("ours, theirs", [(ft.Adam, torch.optim.Adam),
                                          (ft.AdamW, torch.optim.AdamW)])
def test_capturable_foreach_and_fused_are_accepted_and_change_nothing(ours, theirs):
    """capturable: fusedopt's step state is on the device already; foreach/fused: the
    step is one fused pass whatever they say."""
    for kwargs in ({"capturable": True}, {"foreach": True}, {"fused": True},
                   {"foreach": False, "fused": False}):
        models, opts = run_against_torch(lambda p: ours(p, lr=0.01, **kwargs),
                                         lambda p: theirs(p, lr=0.01, foreach=False), steps=5)
        assert opts[0].param_groups[0][next(iter(kwargs))] == kwargs[next(iter(kwargs))]


@pytest.mark.parametrize("make, error, message", [
    (lambda p: ft.Adam(p, differentiable=True), ValueError, r"\['differentiable'\]=True is not"),
    (lambda p: ft.AdamW(p, differentiable=True), ValueError, "differentiable"),
    (lambda p: ft.SGD(p, differentiable=True), ValueError, "differentiable"),
    (lambda p: ft.SGD(p, maximize="yes"), TypeError, r"\['maximize'\] must be a bool"),
    (lambda p: ft.Adam(p, capturable=1), TypeError, r"\['capturable'\] must be a bool"),
    (lambda p: ft.AdamW(p, fused="on"), TypeError, r"\['fused'\] must be a bool or None"),
    (lambda p: ft.SGD(p, nesterov=True), ValueError, "nesterov momentum needs momentum > 0"),
    (lambda p: ft.SGD(p, momentum=0.9, dampening=0.1, nesterov=True), ValueError,
     "dampening 0"),
    (lambda p: ft.SGD(p, momentum=-0.1), ValueError, "momentum"),
    (lambda p: ft.SGD(p, weight_decay=-1.0), ValueError, r"\['weight_decay'\]"),
    (lambda p: ft.SGD(p, lr=math.inf), ValueError, r"\['lr'\] must be finite"),
    (lambda p: ft.SGD(p, nesterov=1), TypeError, r"\['nesterov'\] must be a bool"),
    (lambda p: ft.SGD([{"params": p, "momentum": "x"}]), TypeError, r"\['momentum'\] must be"),
])
def test_refused_arguments_change_nothing(make, error, message):
    model = mlp()
    snap = snapshot(model.parameters())
    with pytest.raises(error, match=message):
        make(model.parameters())
    assert_unchanged(snap)
    ft.SGD(model.parameters())  # nothing was flattened


def test_a_group_edited_to_differentiable_is_refused_at_step_with_nothing_changed():
    model = mlp()
    opt = ft.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_step(model, opt, 0)
    opt.param_groups[0]["differentiable"] = True
    loss_of(model, 1).backward()
    snap = snapshot(model.parameters())
    with pytest.raises(ValueError, match="differentiable"):
        opt.step()
    assert_unchanged(snap)


# ============================================================ GradScaler, no sync
GRAD_SCALER_CASES = [
    pytest.param(ft.Adam, torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.05}, id="adam-l2"),
    pytest.param(ft.AdamW, torch.optim.AdamW, {"lr": 0.01}, id="adamw"),
    pytest.param(ft.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "nesterov": True,
                                           "weight_decay": 0.01}, id="sgd-nesterov"),
    pytest.param(ft.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "dampening": 0.2},
                 id="sgd-dampening"),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("unscale_first", [False, True], ids=["scaled", "unscale-clip"])
@pytest.mark.parametrize("ours, theirs, options", GRAD_SCALER_CASES)
def test_grad_scaler_with_skips_and_scale_updates_matches_torch(ours, theirs, options, impl,
                                                                unscale_first):
    inf_at = (0, 3, 4)  # a skipped first step too: SGD's buffer must still start at g
    if ours is ft.SGD and impl.get("fused"):
        # torch's fused SGD allocates its buffers uninitialised (empty_like) on a first
        # step that GradScaler skips, and dampens the next step as if it were not the
        # first: its for-loop and foreach agree with fusedopt (buf = g), fused does not.
        inf_at = (1, 3, 4)
    per_step, scalers = _grad_scaler_loop(inf_at, unscale_first)
    models, opts = run_against_torch(lambda p: ours(p, **options),
                                     lambda p: theirs(p, **options, **impl), per_step=per_step)
    check = assert_same_sgd_state if ours is ft.SGD else _assert_same_adam_state
    check(models, opts)
    steps = float(opts[0].state[next(models[0].parameters())]["step"])
    assert steps == STEPS - len(inf_at)
    (bucket,) = opts[0]._buckets
    assert bucket.optimizer.skipped_steps == len(inf_at)  # counted as skip_nonfinite counts
    ours_scale, theirs_scale = (scalers[id(o)].get_scale() for o in opts)
    assert ours_scale == theirs_scale != 2.0 ** 12  # the skips and the growth happened alike


# What reads a tensor's value on the host (a sync for a CUDA tensor).
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu",
              "__array__", "__format__", "__repr__", "equal", "is_nonzero", "allclose"}


class _Record(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((getattr(func, "__name__", str(func)), args, kwargs))
        return func(*args, **kwargs)


def _touches(call, tensors):
    _, args, kwargs = call
    flat = list(args) + list(kwargs.values())
    return any(any(a is t for t in tensors) for a in flat)


def _recorded_step(opt, model, scaler, t, inside=None):
    """scaler.step(opt) with every torch call of opt.step() recorded, and the arrays
    fusedopt's apply() received; returns (calls, scaler tensors, apply's inputs)."""
    received, seen = [], {}
    original_apply = fusedopt.FusedOptimizer.apply
    original_step = type(opt).step

    def apply(self, grads, params, **kwargs):
        received.append(kwargs)
        return original_apply(self, grads, params, **kwargs)

    def step(self, closure=None):
        seen["tensors"] = [self.grad_scale, self.found_inf]
        with _Record() as record:
            if inside is not None:
                inside(self)
            out = original_step(self, closure)
        seen["calls"] = record.calls
        return out

    opt.zero_grad()
    scaler.scale(loss_of(model, t)).backward()
    mp = pytest.MonkeyPatch()
    mp.setattr(fusedopt.FusedOptimizer, "apply", apply)
    mp.setattr(type(opt), "step", step)
    try:
        scaler.step(opt)
    finally:
        mp.undo()
    scaler.update()
    return seen["calls"], seen["tensors"], received


def test_the_step_reads_no_grad_scaler_value_on_the_host():
    """During step() no torch function reads GradScaler's scale or inf flag to the host
    (no .item(), bool(), ...: each a sync on a GPU), no counter is read from the plan
    (a sync on a GPU once skips are device-side), and fusedopt receives arrays aliasing
    the tensors' memory: the fused step reads the values where it runs."""
    model = mlp()
    opt = ft.AdamW(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    plan_type = type(opt._buckets[0].optimizer._plan)
    mp = pytest.MonkeyPatch()

    def no_read(self):
        raise AssertionError("step() read the step counters from the plan")
    mp.setattr(plan_type, "read_state", no_read)
    try:
        calls, tensors, received = _recorded_step(opt, model, scaler, 0)
    finally:
        mp.undo()
    assert all(isinstance(x, torch.Tensor) for x in tensors)
    assert calls, "the recording saw nothing"
    for call in calls:
        if _touches(call, tensors):
            assert call[0] not in HOST_READS, call[0]
    ((kwargs),) = received
    for name, tensor in zip(("grad_scale", "found_inf"), tensors):
        array = kwargs[name]
        assert isinstance(array, np.ndarray) and array.shape == (1,)
        assert array.ctypes.data == tensor.data_ptr()  # the tensor's memory, not a copy
    assert opt._buckets[0].optimizer.iterations == 1


def test_the_host_read_check_catches_a_read():
    """The check above can fail: a step that reads found_inf with .item() is caught."""
    model = mlp()
    opt = ft.AdamW(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    calls, tensors, _ = _recorded_step(opt, model, scaler, 0,
                                       inside=lambda o: o.found_inf.item())
    assert any(c[0] == "item" and _touches(c, tensors) for c in calls)


def test_grad_scale_set_by_hand_and_other_dtypes_are_converted_on_the_device():
    """A float64 scale tensor (or a number) is converted with device operations; the
    result equals stepping on gradients divided first."""
    models = [mlp(), mlp()]
    opts = [ft.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    for t in range(3):
        for k, (model, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            (loss_of(model, t) * (8.0 if k == 0 else 1.0)).backward()
            if k == 0:
                opt.grad_scale = torch.tensor(8.0, dtype=torch.float64) if t % 2 else 8.0
                opt.found_inf = torch.zeros((), dtype=torch.float64)
            opt.step()
        del opts[0].grad_scale, opts[0].found_inf
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


# ========================================================================= GPU
gpu = pytest.mark.skipif(not (torch.cuda.is_available() and cuda.gpu_available()),
                         reason="needs a CUDA GPU with CuPy")


@gpu
@pytest.mark.parametrize("ours, theirs, options", GRAD_SCALER_CASES)
def test_gpu_grad_scaler_matches_torch_fused(ours, theirs, options):
    device = torch.device("cuda:0")
    models = [mlp().to(device), mlp().to(device)]
    opts = [ours(models[0].parameters(), **options),
            theirs(models[1].parameters(), **options, fused=True)]
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0 ** 12, growth_interval=4)
               for _ in opts]
    for t in range(STEPS):
        for model, opt, scaler in zip(models, opts, scalers):
            opt.zero_grad()
            x, y = (a.to(device) for a in _batch(t))
            scaler.scale(((model(x) - y) ** 2).mean()).backward()
            if t in (1, 4, 9):  # not 0: see the fused SGD note above
                next(model.parameters()).grad[0, 0] = math.inf
            scaler.step(opt)
            scaler.update()
        for p, q in zip(*(m.parameters() for m in models)):
            assert_close(p.detach(), q.detach())
    assert scalers[0].get_scale() == scalers[1].get_scale()
    assert float(opts[0].state[next(models[0].parameters())]["step"]) == STEPS - 3


def _batch(t):
    from test_torch import batch
    return batch(t)


@gpu
def test_gpu_step_with_grad_scaler_never_waits_for_the_device():
    """step() returns while the GPU is still busy with work queued before it (a sleep
    kernel): it neither synchronises nor reads the scale or the inf flag; torch's sync
    debug mode sees no synchronising call either."""
    device = torch.device("cuda:0")
    model = mlp().to(device)
    opt = ft.AdamW(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    for t in range(3):  # compile and warm up, then one step measured
        opt.zero_grad()
        x, y = (a.to(device) for a in _batch(t))
        scaler.scale(((model(x) - y) ** 2).mean()).backward()
        torch.cuda.synchronize()
        if t == 2:
            torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU time queued before the step
            torch.cuda.set_sync_debug_mode("error")
            try:
                scaler.step(opt)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert not torch.cuda.current_stream().query(), "step() waited for the GPU"
        else:
            scaler.step(opt)
        scaler.update()
    torch.cuda.synchronize()
    assert float(opt.state[next(model.parameters())]["step"]) == 3


@pytest.mark.parametrize("ours, theirs, options", [GRAD_SCALER_CASES[1], GRAD_SCALER_CASES[2]])
def test_grad_scaler_under_bf16_autocast_matches_torch(ours, theirs, options):
    """The forward pass under CPU autocast (bfloat16), GradScaler's documented loop, an
    inf injected at two steps: the same params and state as torch's for-loop."""
    scalers = {}

    def per_step(t, model, opt):
        scaler = scalers.setdefault(
            id(opt), torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=3))
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_of(model, t)
        scaler.scale(loss.float()).backward()
        if t in (2, 7):
            next(model.parameters()).grad[0, 0] = math.nan
        scaler.step(opt)
        scaler.update()

    models, opts = run_against_torch(lambda p: ours(p, **options),
                                     lambda p: theirs(p, **options, foreach=False),
                                     per_step=per_step)
    check = assert_same_sgd_state if ours is ft.SGD else _assert_same_adam_state
    check(models, opts)
    assert float(opts[0].state[next(models[0].parameters())]["step"]) == STEPS - 2
    assert len({s.get_scale() for s in scalers.values()}) == 1
