"""Golden values for the first steps of every rule and option, computed independently.

The oracle below is a plain-Python, one-element-at-a-time transcription of
KERAS_RULES.md (sections 1, 2 and 8 and "fusedopt's contract"). It does not import
fusedopt.reference and, where a textbook arrangement exists, uses it instead of the
library's (Adam with bias-corrected moments, weight decay as p*(1 - wd*lr), clipping
as g*c/norm only when norm > c, Nadam's momentum product recomputed from scratch every step).
The second half pins hand-computed numbers, each derived in a comment.
"""

import math
import warnings

import numpy as np
import pytest

import fusedopt
from conftest import ATOL, CASES, RTOL, RULE_CASES, case_ids
from fusedopt.schedules import ExponentialDecay

DTYPES = pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])

# ------------------------------------------------------------------- the inputs
LAYOUT = [(2, 2), (), (1,), (0,), (3,)]
SIZES = [math.prod(s) for s in LAYOUT]
# Dyadic values, so float32 and float64 runs start from exactly the same numbers.
P0 = [0.5, -1.25, 2.0, -0.75, 1.5, -0.25, 0.875, -3.0, 0.0625]
G = [  # one row per step, flat in LAYOUT order; signs and magnitudes vary per step
    [0.75, -2.5, 0.125, 1.5, 0.375, -0.0625, 1.25, -0.5, 0.25],
    [-0.25, 0.5, -0.125, 0.0625, -1.75, 0.3125, -0.4375, 0.125, -0.1875],
    [1.5, 0.25, -0.75, -1.0, 0.5, 2.5, 0.0625, 0.75, -1.25],
    [-0.5, -0.125, 0.375, 0.625, -0.0625, -0.25, 0.5, -1.5, 0.125],
]

# ------------------------------------------------------- the oracle: defaults (§8)
COMMON = dict(weight_decay=None, clipnorm=None, global_clipnorm=None, clipvalue=None,
              loss_scale_factor=None, coupled_weight_decay=None, maximize=False, use_ema=False,
              ema_momentum=0.99, ema_overwrite_frequency=None, gradient_accumulation_steps=None)
DEFAULTS = {
    "SGD": dict(learning_rate=0.01, momentum=0.0, nesterov=False, dampening=0.0,
                momentum_in_gradient_units=False),
    "RMSprop": dict(learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7, centered=False),
    "Adagrad": dict(learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7),
    "Adadelta": dict(learning_rate=0.001, rho=0.95, epsilon=1e-7),
    "Adam": dict(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False,
                 epsilon_after_bias_correction=False),
    "AdamW": dict(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, amsgrad=False,
                  epsilon_after_bias_correction=False, weight_decay=0.004),
    "Adamax": dict(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7),
    "Nadam": dict(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                  schedule_decay=None),
    "Ftrl": dict(learning_rate=0.001, learning_rate_power=-0.5, initial_accumulator_value=0.1,
                 l1_regularization_strength=0.0, l2_regularization_strength=0.0,
                 l2_shrinkage_regularization_strength=0.0, beta=0.0),
    "Lion": dict(learning_rate=0.001, beta_1=0.9, beta_2=0.99),
    "ScheduleFreeAdamW": dict(learning_rate=0.0025, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                              warmup_steps=0),
    "Lamb": dict(learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7),
    "Adafactor": dict(learning_rate=0.001, beta_2_decay=-0.8, epsilon_1=1e-30, epsilon_2=1e-3,
                      clip_threshold=1.0, relative_step=True),
    "Muon": dict(learning_rate=0.001, adam_beta_1=0.9, adam_beta_2=0.999,
                 adam_weight_decay=0.004, epsilon=1e-7, weight_decay=0.004, exclude_layers=[],
                 exclude_embeddings=True, muon_a=3.4445, muon_b=-4.7750, muon_c=2.0315,
                 adam_lr_ratio=1, momentum=0.95, ns_steps=5, nesterov=True, rms_rate=0.2),
}


def initial_slots(name, h, p=None):
    """{slot: initial value} for the slots this configuration keeps (§8), for an
    element whose param is p."""
    if name == "SGD":
        return {"momentum": 0.0} if h["momentum"] else {}
    if name == "RMSprop":
        return {"velocity": 0.0, **({"momentum": 0.0} if h["momentum"] > 0 else {}),
                **({"average_gradient": 0.0} if h["centered"] else {})}
    if name == "Adagrad":
        return {"accumulator": h["initial_accumulator_value"]}
    if name == "Adadelta":
        return {"accumulated_grad": 0.0, "accumulated_delta_var": 0.0}
    if name in ("Adam", "AdamW"):
        return {"momentum": 0.0, "velocity": 0.0, **({"velocity_hat": 0.0} if h["amsgrad"] else {})}
    if name == "Adamax":
        return {"momentum": 0.0, "norm": 0.0}
    if name == "Nadam":
        return {"momentum": 0.0, "velocity": 0.0}
    if name == "Ftrl":
        return {"accumulator": h["initial_accumulator_value"], "linear": 0.0}
    if name == "ScheduleFreeAdamW":
        return {"momentum": p, "velocity": 0.0}  # z starts at the params
    if name in ("Lamb", "Muon"):
        return {"momentum": 0.0, "velocity": 0.0}
    return {"momentum": 0.0}  # Lion


# ------------------------------------------- the oracle: one element of each rule (§2)
# Each takes the hyperparameters h, the element's state s (a dict, updated in place),
# p, g, lr and t = iterations + 1, and returns the new p.
def sgd(h, s, p, g, lr, t):
    mu = h["momentum"]
    if mu == 0:
        return p - lr * g
    if h["momentum_in_gradient_units"]:  # torch.optim.SGD: the buffer starts at g
        buf = g if t == 1 else mu * s["momentum"] + (1 - h["dampening"]) * g
        s["momentum"] = buf
        return p - lr * (g + mu * buf if h["nesterov"] else buf)
    s["momentum"] = velocity = mu * s["momentum"] - lr * g
    return p + (mu * velocity - lr * g if h["nesterov"] else velocity)


def rmsprop(h, s, p, g, lr, t):
    rho = h["rho"]
    s["velocity"] = rho * s["velocity"] + (1 - rho) * g * g
    variance = s["velocity"]
    if h["centered"]:
        s["average_gradient"] = rho * s["average_gradient"] + (1 - rho) * g
        variance -= s["average_gradient"] ** 2
    step = lr * g / math.sqrt(variance + h["epsilon"])
    if h["momentum"] > 0:
        s["momentum"] = step = h["momentum"] * s["momentum"] + step
    return p - step


def adagrad(h, s, p, g, lr, t):
    s["accumulator"] += g * g
    return p - lr * g / math.sqrt(s["accumulator"] + h["epsilon"])


def adadelta(h, s, p, g, lr, t):
    rho, eps = h["rho"], h["epsilon"]
    s["accumulated_grad"] = rho * s["accumulated_grad"] + (1 - rho) * g * g
    step = g * math.sqrt(s["accumulated_delta_var"] + eps) / math.sqrt(s["accumulated_grad"] + eps)
    s["accumulated_delta_var"] = rho * s["accumulated_delta_var"] + (1 - rho) * step * step
    return p - lr * step


def adam(h, s, p, g, lr, t):
    """Textbook form: lr*m_hat/(sqrt(v_hat) + eps_hat). Keras' eps sits outside the sqrt
    of the *uncorrected* v, so here it becomes eps_hat = eps/sqrt(1 - beta_2^t); torch's
    (epsilon_after_bias_correction) is the textbook's own, eps_hat = eps."""
    b1, b2 = h["beta_1"], h["beta_2"]
    s["momentum"] = b1 * s["momentum"] + (1 - b1) * g
    s["velocity"] = b2 * s["velocity"] + (1 - b2) * g * g
    v = s["velocity"]
    if h["amsgrad"]:
        s["velocity_hat"] = v = max(s["velocity_hat"], v)  # the max of the raw v
    correction_2 = 1 - b2 ** t
    m_hat, v_hat = s["momentum"] / (1 - b1 ** t), v / correction_2
    eps_hat = h["epsilon"] if h["epsilon_after_bias_correction"] else \
        h["epsilon"] / math.sqrt(correction_2)
    return p - lr * m_hat / (math.sqrt(v_hat) + eps_hat)


def adamax(h, s, p, g, lr, t):
    b1 = h["beta_1"]
    s["momentum"] = b1 * s["momentum"] + (1 - b1) * g
    s["norm"] = max(h["beta_2"] * s["norm"], abs(g))
    return p - lr / (1 - b1 ** t) * s["momentum"] / (s["norm"] + h["epsilon"])


def nadam_mu(h, k):
    """Keras 3: beta_1*(1 - 0.5*0.96^k); Keras 2's schedule_decay=s: 0.96^(s*k)."""
    exponent = k if h["schedule_decay"] is None else h["schedule_decay"] * k
    return h["beta_1"] * (1 - 0.5 * 0.96 ** exponent)


def nadam(h, s, p, g, lr, t):
    b1, b2 = h["beta_1"], h["beta_2"]
    mu_t, mu_next = nadam_mu(h, t), nadam_mu(h, t + 1)
    product = math.prod(nadam_mu(h, k) for k in range(1, t + 1))
    s["momentum"] = b1 * s["momentum"] + (1 - b1) * g
    s["velocity"] = b2 * s["velocity"] + (1 - b2) * g * g
    m_hat = (mu_next * s["momentum"] / (1 - product * mu_next)
             + (1 - mu_t) * g / (1 - product))
    v_hat = s["velocity"] / (1 - b2 ** t)
    return p - lr * m_hat / (math.sqrt(v_hat) + h["epsilon"])


def ftrl(h, s, p, g, lr, t):
    power = -h["learning_rate_power"]
    l1, l2 = h["l1_regularization_strength"], h["l2_regularization_strength"]
    n_old, n = s["accumulator"], s["accumulator"] + g * g
    sigma = (n ** power - n_old ** power) / lr
    shrunk_g = g + 2 * h["l2_shrinkage_regularization_strength"] * p
    s["linear"] = z = s["linear"] + shrunk_g - sigma * p
    s["accumulator"] = n
    if abs(z) <= l1:
        return 0.0
    return -(z - math.copysign(l1, z)) / ((n ** power + h["beta"]) / lr + 2 * l2)


def lion(h, s, p, g, lr, t):
    c = h["beta_1"] * s["momentum"] + (1 - h["beta_1"]) * g
    s["momentum"] = h["beta_2"] * s["momentum"] + (1 - h["beta_2"]) * g
    return p - lr * ((c > 0) - (c < 0))  # sign(0) = 0


def schedule_free_adamw(h, s, p, g, lr, t):
    """Defazio et al.'s form: x is the average of the z iterates (x <- x + (z - x)/t),
    y = b1*x + (1-b1)*z is what the params hold; Keras recovers x from y and z."""
    b1, b2 = h["beta_1"], h["beta_2"]
    if h["warmup_steps"]:
        lr = lr * min(t / h["warmup_steps"], 1.0)
    x = (p - (1 - b1) * s["momentum"]) / b1
    s["velocity"] = b2 * s["velocity"] + (1 - b2) * g * g
    s["momentum"] -= lr * g / (math.sqrt(s["velocity"] / (1 - b2 ** t)) + h["epsilon"])
    x += (s["momentum"] - x) / t
    return b1 * x + (1 - b1) * s["momentum"]


RULES = dict(SGD=sgd, RMSprop=rmsprop, Adagrad=adagrad, Adadelta=adadelta, Adam=adam,
             AdamW=adam, Adamax=adamax, Nadam=nadam, Ftrl=ftrl, Lion=lion,
             ScheduleFreeAdamW=schedule_free_adamw)


# Rules of whole variables: (h, the elements' states, the segment's params, grads and
# shape, lr, t) -> the segment's new params.
def lamb(h, states, ps, gs, shape, lr, t):
    b1, b2 = h["beta_1"], h["beta_2"]
    r = []
    for s, g in zip(states, gs):
        s["momentum"] = b1 * s["momentum"] + (1 - b1) * g
        s["velocity"] = b2 * s["velocity"] + (1 - b2) * g * g
        m_hat, v_hat = s["momentum"] / (1 - b1 ** t), s["velocity"] / (1 - b2 ** t)
        r.append(m_hat / (math.sqrt(v_hat) + h["epsilon"]))
    p_norm, r_norm = math.hypot(*ps), math.hypot(*r)
    ratio = p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0
    return [p - ratio * lr * x for p, x in zip(ps, r)]


def rms(xs):
    return math.sqrt(sum(x * x for x in xs) / len(xs)) if xs else math.nan


def adafactor(h, states, ps, gs, shape, lr, t):
    """Factored over the last two axes: the statistics are a row vector (mean over
    columns) and a column vector (mean over rows) per leading index, kept in
    states[0]["r"] and ["c"] for the whole segment."""
    rho = min(lr, 1 / math.sqrt(t))
    alpha = max(h["epsilon_2"], rms(ps)) * rho
    beta = 1 - t ** h["beta_2_decay"]
    sq = [g * g + h["epsilon_1"] for g in gs]
    if len(shape) >= 2:
        rows, cols = shape[-2], shape[-1]
        lead = math.prod(shape[:-2])
        r, c = states[0]["r"], states[0]["c"]
        for k in range(lead):
            block = [sq[k * rows * cols + i * cols:k * rows * cols + (i + 1) * cols]
                     for i in range(rows)]
            for i in range(rows):
                r[k * rows + i] = beta * r[k * rows + i] + (1 - beta) * sum(block[i]) / cols
            for j in range(cols):
                c[k * cols + j] = (beta * c[k * cols + j]
                                   + (1 - beta) * sum(row[j] for row in block) / rows)
            r_mean = sum(r[k * rows:(k + 1) * rows]) / rows
            for i in range(rows):
                for j in range(cols):
                    states[k * rows * cols + i * cols + j]["velocity"] = (
                        r[k * rows + i] / r_mean * c[k * cols + j])
    else:
        for s, x in zip(states, sq):
            s["velocity"] = beta * s["velocity"] + (1 - beta) * x
    u = [g / math.sqrt(s["velocity"]) for s, g in zip(states, gs)]
    scale = max(1.0, rms(u) / h["clip_threshold"])
    return [p - alpha * x / scale for p, x in zip(ps, u)]


def matmul(x, y):
    return [[sum(a * b for a, b in zip(row, col)) for col in zip(*y)] for row in x]


def transpose(x):
    return [list(col) for col in zip(*x)]


def newton_schulz(x, steps, a, b, c):
    """The quintic iteration on the wide orientation, in lists of rows."""
    tall = len(x) > len(x[0])
    if tall:
        x = transpose(x)
    norm = math.sqrt(sum(v * v for row in x for v in row))
    x = [[v / (norm + 1e-7) for v in row] for row in x]
    for _ in range(steps):
        gram = matmul(x, transpose(x))
        poly = [[b * u + c * w for u, w in zip(r1, r2)]
                for r1, r2 in zip(gram, matmul(gram, gram))]
        x = [[a * u + w for u, w in zip(r1, r2)] for r1, r2 in zip(x, matmul(poly, x))]
    return transpose(x) if tall else x


def muon(h, states, ps, gs, shape, lr, t):
    """2-D segments: momentum m = mu*m + g, Newton-Schulz of g + mu*m (nesterov) or m,
    scaled by sqrt(max(rows, cols))*rms_rate; other segments: Adam, lr*adam_lr_ratio
    (the golden layout has no names, so none is excluded by name)."""
    if len(shape) != 2:
        ah = dict(beta_1=h["adam_beta_1"], beta_2=h["adam_beta_2"], epsilon=h["epsilon"],
                  amsgrad=False, epsilon_after_bias_correction=False)
        return [adam(ah, s, p, g, lr * h["adam_lr_ratio"], t) for s, p, g in zip(states, ps, gs)]
    mu = h["momentum"]
    for s, g in zip(states, gs):
        s["momentum"] = mu * s["momentum"] + g
    d = [g + mu * s["momentum"] if h["nesterov"] else s["momentum"] for s, g in zip(states, gs)]
    rows, cols = shape
    x = newton_schulz([d[i * cols:(i + 1) * cols] for i in range(rows)], h["ns_steps"],
                      h["muon_a"], h["muon_b"], h["muon_c"])
    scale = 1.0 if h["rms_rate"] is None else math.sqrt(max(rows, cols)) * h["rms_rate"]
    return [p - lr * v * scale for p, v in zip(ps, (v for row in x for v in row))]


SEGMENT_RULES = dict(Lamb=lamb, Adafactor=adafactor, Muon=muon)


def weight_decay(cls_name, h, shape):
    """The decoupled weight decay of a segment: Muon's differs for its AdamW segments."""
    if cls_name == "Muon" and len(shape) != 2:
        return h["adam_weight_decay"]
    return h["weight_decay"]


def segment_state(name, h, shape):
    """Per-element states of a segment, and the names of the slots they hold."""
    size = math.prod(shape)
    if name == "Adafactor":
        states = [{"velocity": 0.0} for _ in range(size)]
        if states:
            rows = math.prod(shape[:-1]) if len(shape) >= 2 else 0
            cols = math.prod(shape[:-2]) * shape[-1] if len(shape) >= 2 else 0
            states[0].update(r=[0.0] * rows, c=[0.0] * cols)
        return states
    return [initial_slots(name, h) for _ in range(size)]


def slot_values(name, h, state, shapes):
    """{slot: flat values} in fusedopt's layout: Adafactor's r and c are per segment."""
    if name != "Adafactor":
        return {k: [s[k] for s in state] for k in initial_slots(name, h, 0.0)}
    out = {"r": [], "c": [], "velocity": [s["velocity"] for s in state]}
    start = 0
    for shape in shapes:
        size = math.prod(shape)
        if size and len(shape) >= 2:
            out["r"] += state[start]["r"]
            out["c"] += state[start]["c"]
        start += size
    return out


# ------------------------------------------------------ the oracle: the pipeline (§1)
def segments(flat, sizes=SIZES):
    start = 0
    for size in sizes:
        yield flat[start:start + size]
        start += size


def shrink_to_norm(xs, c):
    norm = math.hypot(*xs)
    return [x * c / norm for x in xs] if norm > c else xs


def clip(g, h, sizes=SIZES):
    """clipnorm | global_clipnorm | clipvalue, on the unscaled gradient."""
    if h["clipnorm"]:
        g = [x for seg in segments(g, sizes) for x in shrink_to_norm(seg, h["clipnorm"])]
    elif h["global_clipnorm"]:
        g = shrink_to_norm(g, h["global_clipnorm"])
    elif h["clipvalue"]:
        g = [min(max(x, -h["clipvalue"]), h["clipvalue"]) for x in g]
    return g


def golden(cls_name, kwargs, lr_at=None, shapes=LAYOUT, p0=P0, grads=G):
    """Yield (params, {slot: values}) after each call, as flat lists of floats, for a
    layout of segment `shapes`, initial params `p0` and one flat gradient list per call.

    The pipeline (§1): unscale; with gradient accumulation (N) only add into the
    accumulator on N-1 calls of N and use the mean on the N-th; clip; decay; the rule
    at t = updates + 1; then the moving average and its overwrite."""
    h = {**COMMON, **DEFAULTS[cls_name], **kwargs}
    lr0, decay = h.pop("lr", h["learning_rate"]), h.pop("decay", 0.0)
    lr_at = lr_at or (lambda it: lr0)
    sizes = [math.prod(s) for s in shapes]
    whole = cls_name in SEGMENT_RULES
    state = [x for shape in shapes for x in segment_state(cls_name, h, shape)] if whole \
        else [initial_slots(cls_name, h, x) for x in p0]
    n = h["gradient_accumulation_steps"] or 1
    p, accumulator, average = list(p0), [0.0] * len(p0), [0.0] * len(p0)
    for calls, g in enumerate(grads):
        updates = calls // n
        lr = lr_at(calls) / (1 + decay * calls)  # schedules see the calls
        if h["loss_scale_factor"]:
            g = [x / h["loss_scale_factor"] for x in g]
        if h["maximize"]:  # torch's maximize: climb, from the first stage on
            g = [-x for x in g]
        if (calls + 1) % n:
            accumulator = [a + x for a, x in zip(accumulator, g)]
        else:
            g = [(x + a) / n for x, a in zip(g, accumulator)]
            accumulator = [0.0] * len(p0)
            g = clip(g, h, sizes)
            if h["coupled_weight_decay"]:  # torch Adam's L2: from p before decoupled decay
                g = [gx + h["coupled_weight_decay"] * x for gx, x in zip(g, p)]
            p = [x * (1 - (weight_decay(cls_name, h, shape) or 0.0) * lr)
                 for ps, shape in zip(segments(p, sizes), shapes) for x in ps]
            if whole:
                p = [x for ps, gs, ss, shape in zip(segments(p, sizes), segments(g, sizes),
                                                    segments(state, sizes), shapes)
                     for x in SEGMENT_RULES[cls_name](h, ss, ps, gs, shape, lr, updates + 1)]
            else:
                p = [RULES[cls_name](h, s, x, gx, lr, updates + 1)
                     for s, x, gx in zip(state, p, g)]
        slots = slot_values(cls_name, h, state, shapes)
        if h["use_ema"]:
            momentum = h["ema_momentum"] if updates else 0.0  # the first copies p
            average = [momentum * a + (1 - momentum) * x for a, x in zip(average, p)]
            frequency = h["ema_overwrite_frequency"]
            if frequency and (updates + 1) % frequency == 0:
                p = list(average)
            slots["average"] = list(average)
        if n > 1:
            slots["gradient_accumulator"] = list(accumulator)
        yield p, slots


# -------------------------------------------------------------------- test helpers
def assert_close(actual, expected, dtype, what="params"):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected,
                               rtol=RTOL[dtype], atol=ATOL[dtype], err_msg=what)


def check_against_golden(opt, cls_name, kwargs, dtype, lr_at=None, before_step=None):
    flat = fusedopt.FlatBuffer(np.array(P0, dtype=dtype), LAYOUT)
    grads = flat.zeros_like()
    for it, (p, slots) in enumerate(golden(cls_name, kwargs, lr_at=lr_at)):
        if before_step:
            before_step(it)
        grads.data[...] = G[it]
        opt.apply(grads, flat)
        assert opt.iterations == (it + 1) // (kwargs.get("gradient_accumulation_steps") or 1)
        assert_close(flat.data, p, dtype, f"params after step {it + 1}")
        assert set(opt.slots()) == set(slots)
        for name, values in slots.items():
            assert_close(opt.slots()[name], values, dtype, f"slot {name} after step {it + 1}")


def run(opt, params, grad_steps, dtype=np.float64):
    """Apply each step's per-segment gradients; return the per-segment params after
    each step (as float64 arrays)."""
    flat = fusedopt.FlatBuffer.from_arrays([np.asarray(x, dtype=dtype) for x in params])
    grads = flat.zeros_like()
    history = []
    for step in grad_steps:
        for view, g in zip(grads.views(), step):
            view[...] = g
        opt.apply(grads, flat)
        history.append([v.astype(np.float64) for v in flat.views()])
    return history


# ------------------------------------------------------------ every rule and option
def test_inputs_exercise_every_clip_branch():
    """Guards the data above: each clip mode must bite on some steps/segments only."""
    norms = [[math.hypot(*seg) for seg in segments(g) if seg] for g in G]
    assert any(n > 1.0 for row in norms for n in row)      # clipnorm=1.0 bites ...
    assert any(n < 1.0 for row in norms for n in row)      # ... and leaves some alone
    global_norms = [math.hypot(*g) for g in G]
    assert min(global_norms) < 2.0 < max(global_norms)    # global_clipnorm=2.0
    assert {abs(x) > 0.5 for g in G for x in g} == {True, False}  # clipvalue=0.5
    assert all(x != 0 for g in G for x in g)


RULE_KWARGS = {case_id: kwargs for case_id, _, kwargs in RULE_CASES}
# Beyond conftest's CASES: Keras 2's Nadam schedule, and options combined (each clip
# mode after unscaling; weight decay with clipping on rules that read p).
EXTRA_CASES = [
    ("nadam-schedule_decay-keras2", "Nadam", {"schedule_decay": 0.004}),
    ("nadam-schedule_decay-0.5", "Nadam", {"schedule_decay": 0.5, "learning_rate": 0.01}),
    ("adam+loss_scale+clipnorm", "Adam", {"loss_scale_factor": 4.0, "clipnorm": 0.5}),
    ("sgd-momentum+loss_scale+global_clipnorm", "SGD",
     {"momentum": 0.9, "loss_scale_factor": 0.25, "global_clipnorm": 2.0}),
    ("rmsprop+loss_scale+clipvalue", "RMSprop", {"loss_scale_factor": 2.0, "clipvalue": 0.25}),
    ("ftrl-all+weight_decay+clipnorm", "Ftrl",
     {**RULE_KWARGS["ftrl-all"], "weight_decay": 0.5, "clipnorm": 1.0}),
    ("lion+weight_decay+global_clipnorm", "Lion",
     {"learning_rate": 0.01, "weight_decay": 0.5, "global_clipnorm": 1.0}),
]
GOLDEN_CASES = CASES + EXTRA_CASES


@DTYPES
@pytest.mark.parametrize("case", GOLDEN_CASES, ids=case_ids(GOLDEN_CASES))
def test_first_steps_match_golden(case, dtype):
    _, cls_name, kwargs = case
    check_against_golden(getattr(fusedopt, cls_name)(**kwargs), cls_name, kwargs, dtype)


@pytest.mark.parametrize("cls_name", ["RMSprop", "Adagrad", "Adadelta", "Adam", "Adamax", "Nadam"])
def test_epsilon_none_is_keras_epsilon(cls_name):
    opt = getattr(fusedopt, cls_name)(learning_rate=0.01, epsilon=None)
    check_against_golden(opt, cls_name, {"learning_rate": 0.01, "epsilon": 1e-7}, np.float64)


# One case per class with its richest variant; the learning rate is replaced below.
LR_CASES = [c for c in RULE_CASES if c[0] in (
    "sgd-nesterov", "rmsprop-centered-momentum-eps", "adagrad-init-eps", "adadelta-paper",
    "adam-amsgrad", "adamw-amsgrad", "adamax-eps", "nadam-betas", "ftrl-all", "lion-betas")]
CALLABLE_LRS = [0.03, 0.01, 0.05, 0.02]  # what the callable returns at each step


def lr_forms(box):
    """form -> (constructor kwargs, the lr of step `it` before Keras 2 decay, warns?)."""
    return {
        "schedule": ({"learning_rate": ExponentialDecay(0.05, 2, 0.5)},
                     lambda it: 0.05 * 0.5 ** (it / 2), False),  # step = it, 0 first
        "callable": ({"learning_rate": lambda: box[0]}, CALLABLE_LRS.__getitem__, False),
        "lr-alias": ({"lr": 0.03}, lambda it: 0.03, True),
        "decay": ({"learning_rate": 0.05, "decay": 0.5}, lambda it: 0.05, True),
        "lr+decay": ({"lr": 0.05, "decay": 0.5}, lambda it: 0.05, True),
    }


@DTYPES
@pytest.mark.parametrize("form", list(lr_forms(None)))
@pytest.mark.parametrize("case", LR_CASES, ids=case_ids(LR_CASES))
def test_learning_rate_forms_match_golden(case, form, dtype):
    _, cls_name, kwargs = case
    box = [None]
    lr_kwargs, lr_at, warns = lr_forms(box)[form]
    kwargs = {k: v for k, v in kwargs.items() if k != "learning_rate"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = getattr(fusedopt, cls_name)(**kwargs, **lr_kwargs)
    assert any(w.category is DeprecationWarning for w in caught) == warns

    def before_step(it):
        box[0] = CALLABLE_LRS[it]

    golden_kwargs = {**kwargs, **{k: v for k, v in lr_kwargs.items() if k == "decay"}}
    check_against_golden(opt, cls_name, golden_kwargs, dtype, lr_at=lr_at,
                         before_step=before_step)


# -------------------------------------------------------- hand-computed literals
@DTYPES
def test_sgd_literal(dtype):
    # p = 1 - 0.1*0.5 = 0.95, then 0.95 - 0.1*(-1) = 1.05
    history = run(fusedopt.SGD(learning_rate=0.1), [[1.0]], [[[0.5]], [[-1.0]]], dtype)
    assert_close([h[0][0] for h in history], [0.95, 1.05], dtype)


@DTYPES
def test_sgd_momentum_and_nesterov_literals(dtype):
    grads = [[[1.0]], [[1.0]]]
    # m1 = -0.1; p1 = 1 + m1 = 0.9.  m2 = 0.9*(-0.1) - 0.1 = -0.19; p2 = 0.9 - 0.19 = 0.71
    plain = run(fusedopt.SGD(0.1, momentum=0.9), [[1.0]], grads, dtype)
    assert_close([h[0][0] for h in plain], [0.9, 0.71], dtype)
    # nesterov: p1 = 1 + 0.9*(-0.1) - 0.1 = 0.81; p2 = 0.81 + 0.9*(-0.19) - 0.1 = 0.539
    nesterov = run(fusedopt.SGD(0.1, momentum=0.9, nesterov=True), [[1.0]], grads, dtype)
    assert_close([h[0][0] for h in nesterov], [0.81, 0.539], dtype)


@DTYPES
def test_adam_first_step_is_lr_times_sign_without_epsilon(dtype):
    # t = 1: m_hat = g and v_hat = g^2, so the step is lr*g/|g| whatever |g| is.
    history = run(fusedopt.Adam(learning_rate=0.1, epsilon=0.0), [[1.0, 1.0, -2.0]],
                  [[[2.0, -0.003, 40.0]]], dtype)
    assert_close(history[0][0], [0.9, 1.1, -2.1], dtype)


@DTYPES
def test_adam_literal_with_large_epsilon(dtype):
    opt = fusedopt.Adam(learning_rate=0.1, beta_1=0.5, beta_2=0.75, epsilon=0.3)
    history = run(opt, [[1.0]], [[[2.0]], [[-2.0]]], dtype)
    # t=1: m = 1, v = 1, alpha = 0.1*sqrt(0.25)/0.5 = 0.1: p = 1 - 0.1*1/(1 + 0.3) = 12/13
    # t=2: m = 1 + (-2-1)*0.5 = -0.5, v = 1 + (4-1)*0.25 = 1.75,
    #      alpha = 0.1*sqrt(1 - 0.5625)/(1 - 0.25): p = 12/13 + alpha*0.5/(sqrt(1.75) + 0.3)
    alpha_2 = 0.1 * math.sqrt(0.4375) / 0.75
    assert_close([h[0][0] for h in history],
                 [12 / 13, 12 / 13 + alpha_2 * 0.5 / (math.sqrt(1.75) + 0.3)], dtype)


@DTYPES
def test_amsgrad_keeps_the_max_of_raw_velocity(dtype):
    # beta_2 = 0.5, g = 2, 1.5, 0.1: raw v = 2, 2.125, 1.0675 (v = 0.5*v + 0.5*g^2).
    # The bias-corrected v would fall at step 2 (4 -> 2.833), the raw v rises: velocity_hat
    # follows the raw v (2, 2.125), then keeps 2.125 when v drops to 1.0675.
    opts = [fusedopt.Adam(0.1, beta_1=0.5, beta_2=0.5, amsgrad=a) for a in (True, False)]
    flats = [fusedopt.FlatBuffer.from_arrays([np.ones(1, dtype)]) for _ in opts]
    expected = [(2.0, 2.0), (2.125, 2.125), (2.125, 1.0675)]
    for g, (vhat, v) in zip([2.0, 1.5, 0.1], expected):
        for opt, flat in zip(opts, flats):
            opt.apply(fusedopt.FlatBuffer.from_arrays([np.full(1, g, dtype)]), flat)
        assert_close(opts[0].slots()["velocity_hat"], [vhat], dtype)
        assert_close(opts[0].slots()["velocity"], [v], dtype)
        assert_close(opts[1].slots()["velocity"], [v], dtype)
        # The same step as plain Adam while vhat == v, a smaller one once vhat > v.
        if vhat == v:
            assert_close(flats[0].data, flats[1].data, dtype)
    assert abs(flats[0].data[0] - 1) < abs(flats[1].data[0] - 1) - 1e-3


@DTYPES
def test_rmsprop_centered_momentum_literal(dtype):
    opt = fusedopt.RMSprop(learning_rate=0.1, rho=0.5, momentum=0.5, epsilon=0.0, centered=True)
    history = run(opt, [[1.0]], [[[2.0]], [[-1.0]]], dtype)
    # step 1: v = 2, a = 1, v - a^2 = 1, inc = 0.1*2/1 = 0.2, mom = 0.2, p = 0.8
    # step 2: v = 1 + 0.5 = 1.5, a = 0.5 - 0.5 = 0, inc = -0.1/sqrt(1.5),
    #         mom = 0.1 + inc, p = 0.8 - mom
    assert_close([h[0][0] for h in history], [0.8, 0.7 + 0.1 / math.sqrt(1.5)], dtype)


@DTYPES
def test_adagrad_and_adadelta_literals(dtype):
    # Adagrad: acc = 0.5 + 1 = 1.5; p = 1 - 0.1*1/sqrt(1.5 + 0.3)
    history = run(fusedopt.Adagrad(0.1, initial_accumulator_value=0.5, epsilon=0.3),
                  [[1.0]], [[[1.0]]], dtype)
    assert_close(history[0][0], [1 - 0.1 / math.sqrt(1.8)], dtype)
    # Adadelta, rho = 0.5, eps = 1: eg = 0.5*4 = 2; delta = sqrt(0 + 1)*2/sqrt(2 + 1);
    # p = 1 - delta.  Step 2 (g = 2): eg = 1 + 2 = 3, ed = 0.5*delta^2,
    # delta2 = sqrt(ed + 1)*2/sqrt(3 + 1); p -= delta2
    delta = 2 / math.sqrt(3)
    delta_2 = math.sqrt(0.5 * delta ** 2 + 1) * 2 / 2
    history = run(fusedopt.Adadelta(1.0, rho=0.5, epsilon=1.0), [[1.0]], [[[2.0]], [[2.0]]], dtype)
    assert_close([h[0][0] for h in history], [1 - delta, 1 - delta - delta_2], dtype)


@DTYPES
def test_adamax_literal(dtype):
    # t=1: m = 0.1*2 = 0.2, u = max(0, 2) = 2: p = 1 - 0.1/(1 - 0.9)*0.2/(2 + 0) = 0.9
    # t=2 (g = -1): m = 0.18 - 0.1 = 0.08, u = max(0.999*2, 1) = 1.998,
    #               p = 0.9 - 0.1/(1 - 0.81)*0.08/1.998
    history = run(fusedopt.Adamax(0.1, epsilon=0.0), [[1.0]], [[[2.0]], [[-1.0]]], dtype)
    assert_close([h[0][0] for h in history], [0.9, 0.9 - 0.1 / 0.19 * 0.08 / 1.998], dtype)


@DTYPES
def test_nadam_first_step_keras3_and_keras2_schedules(dtype):
    # t=1, eps=0: m = 0.1 g, v_hat = g^2, so the step is lr*(0.1*u2/(1 - u1*u2) + 1).
    # Keras 3: u1 = 0.9*(1 - 0.5*0.96) = 0.468, u2 = 0.9*(1 - 0.5*0.96^2) = 0.48528
    keras3 = run(fusedopt.Nadam(0.1, epsilon=0.0), [[1.0]], [[[2.0]]], dtype)
    assert_close(keras3[0][0], [1 - 0.1 * (1 + 0.1 * 0.48528 / (1 - 0.468 * 0.48528))], dtype)
    # Keras 2, schedule_decay=0.004: u_k = 0.9*(1 - 0.5*0.96^(0.004 k))
    u1, u2 = (0.9 * (1 - 0.5 * 0.96 ** (0.004 * k)) for k in (1, 2))
    keras2 = run(fusedopt.Nadam(0.1, epsilon=0.0, schedule_decay=0.004), [[1.0]], [[[2.0]]], dtype)
    assert_close(keras2[0][0], [1 - 0.1 * (1 + 0.1 * u2 / (1 - u1 * u2))], dtype)
    assert abs(keras3[0][0][0] - keras2[0][0][0]) > 1e-4


@DTYPES
def test_ftrl_literal(dtype):
    # n: 0.1 -> 1.1; sigma = (sqrt(1.1) - sqrt(0.1))/0.1; z = 1 - sigma*1;
    # p = -z/(sqrt(1.1)/0.1)   (l1 = l2 = 0)
    history = run(fusedopt.Ftrl(learning_rate=0.1), [[1.0]], [[[1.0]]], dtype)
    z = 1 - (math.sqrt(1.1) - math.sqrt(0.1)) / 0.1
    assert_close(history[0][0], [-z * 0.1 / math.sqrt(1.1)], dtype)
    # l1 = 10 >= |z|: the variable is set to exactly 0
    history = run(fusedopt.Ftrl(0.1, l1_regularization_strength=10.0), [[1.0]], [[[1.0]]], dtype)
    assert history[0][0][0] == 0.0


@DTYPES
def test_ftrl_sees_the_decayed_param(dtype):
    # Weight decay first: p = 2*(1 - 0.5*0.1) = 1.9, then z = 1 - sigma*1.9 with
    # sigma = (sqrt(1.1) - sqrt(0.1))/0.1, and p = -z*0.1/sqrt(1.1) = 1.23178...
    # (with the undecayed p = 2 it would be 1.30163...).
    history = run(fusedopt.Ftrl(learning_rate=0.1, weight_decay=0.5), [[2.0]], [[[1.0]]], dtype)
    z = 1 - (math.sqrt(1.1) - math.sqrt(0.1)) / 0.1 * 1.9
    assert_close(history[0][0], [-z * 0.1 / math.sqrt(1.1)], dtype)


@DTYPES
def test_lion_sign_of_zero_is_zero(dtype):
    opt = fusedopt.Lion(learning_rate=0.1, beta_1=0.5, beta_2=0.5)
    history = run(opt, [[1.0, 1.0, 1.0]], [[[2.0, 0.0, -3.0]], [[-1.0, 0.0, 1.0]]], dtype)
    # step 1: c = 0.5*g = [1, 0, -1.5] -> p = 1 - 0.1*[1, 0, -1];  m = [1, 0, -1.5]
    # step 2: c = 0.5*m + 0.5*g = [0, 0, -0.25] -> only the last element moves
    assert_close(history[0][0], [0.9, 1.0, 1.1], dtype)
    assert_close(history[1][0], [0.9, 1.0, 1.2], dtype)


@DTYPES
def test_clipnorm_is_per_segment(dtype):
    # [3, 4] has norm 5 > 1: scaled to [0.6, 0.8]; [0.5] and the scalar 0.25 stay.
    opt = fusedopt.SGD(learning_rate=1.0, clipnorm=1.0)
    history = run(opt, [np.zeros(2), np.zeros(1), np.zeros(()), np.zeros(0)],
                  [[[3.0, 4.0], [0.5], 0.25, []]], dtype)
    for got, want in zip(history[0], [[-0.6, -0.8], [-0.5], -0.25, []]):
        assert_close(got, want, dtype)


@DTYPES
def test_loss_scale_is_divided_out_before_clipnorm(dtype):
    # g / 4 = [3, 4] -> clipped to [0.6, 0.8]; clipping first would give [0.15, 0.2].
    opt = fusedopt.SGD(learning_rate=1.0, clipnorm=1.0, loss_scale_factor=4.0)
    history = run(opt, [np.zeros(2)], [[[12.0, 16.0]]], dtype)
    assert_close(history[0][0], [-0.6, -0.8], dtype)


@DTYPES
def test_loss_scale_factor_divides_the_gradient(dtype):
    # g = 2/4 = 0.5: p = 1 - 0.1*0.5 = 0.95
    history = run(fusedopt.SGD(0.1, loss_scale_factor=4.0), [[1.0]], [[[2.0]]], dtype)
    assert_close(history[0][0], [0.95], dtype)


@DTYPES
def test_global_clipnorm_literal(dtype):
    # Step 1: global norm sqrt(9 + 16 + 144) = 13 > 2.6, scale 0.2: g = [0.6, 0.8], [2.4].
    # Step 2: norm 1.3 < 2.6: unchanged.
    opt = fusedopt.SGD(learning_rate=1.0, global_clipnorm=2.6)
    history = run(opt, [np.zeros(2), np.zeros(1)],
                  [[[3.0, 4.0], [12.0]], [[0.3, 0.4], [1.2]]], dtype)
    assert_close(np.concatenate(history[0]), [-0.6, -0.8, -2.4], dtype)
    assert_close(np.concatenate(history[1]), [-0.9, -1.2, -3.6], dtype)


@DTYPES
def test_clipvalue_literal(dtype):
    opt = fusedopt.SGD(learning_rate=1.0, clipvalue=0.5)
    history = run(opt, [np.zeros(4)], [[[-2.0, 0.3, 5.0, -0.4]]], dtype)
    assert_close(history[0][0], [0.5, -0.3, -0.5, 0.4], dtype)


@DTYPES
def test_weight_decay_literals(dtype):
    # SGD: p = 2*(1 - 0.5*0.1) - 0.1*1 = 1.8 and -4*0.95 - 0.1 = -3.9
    history = run(fusedopt.SGD(0.1, weight_decay=0.5), [[2.0, -4.0]], [[[1.0, 1.0]]], dtype)
    assert_close(history[0][0], [1.8, -3.9], dtype)
    # AdamW's default weight_decay = 0.004 scales with lr, not with Adam's alpha:
    # p = 1*(1 - 0.004*0.1) - 0.1*sign(g) (first Adam step, eps = 0)
    history = run(fusedopt.AdamW(0.1, epsilon=0.0), [[1.0]], [[[2.0]]], dtype)
    assert_close(history[0][0], [0.9996 - 0.1], dtype)


@DTYPES
def test_learning_rate_form_literals(dtype):
    # Schedule: 0.1 * 0.5^step, step 0 on the first step: p = 1 - 0.1 - 0.05 - 0.025
    grads = [[[1.0]]] * 3
    sched = run(fusedopt.SGD(ExponentialDecay(0.1, 1, 0.5)), [[1.0]], grads, dtype)
    assert_close([h[0][0] for h in sched], [0.9, 0.85, 0.825], dtype)
    # Keras 2 decay: lr/(1 + decay*iterations) = 0.1, 0.05, 0.1/3
    with pytest.warns(DeprecationWarning):
        opt = fusedopt.SGD(lr=0.1, decay=1.0)
    decayed = run(opt, [[1.0]], grads, dtype)
    assert_close([h[0][0] for h in decayed], [0.9, 0.85, 0.85 - 0.1 / 3], dtype)
    # A callable of no arguments is called for each step.
    box = [0.1]
    opt = fusedopt.SGD(lambda: box[0])
    flat = fusedopt.FlatBuffer.from_arrays([np.ones(1, dtype)])
    for lr, want in [(0.1, 0.9), (0.3, 0.6)]:
        box[0] = lr
        opt.apply(fusedopt.FlatBuffer.from_arrays([np.ones(1, dtype)]), flat)
        assert_close(flat.data, [want], dtype)


@pytest.mark.parametrize("kwargs", [{"lr": 0.1}, {"decay": 0.1}], ids=["lr", "decay"])
def test_keras2_spellings_warn(kwargs):
    with pytest.warns(DeprecationWarning):
        fusedopt.Adam(**kwargs)
