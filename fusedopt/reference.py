"""The update rules in plain NumPy: the specification in code.

Each function applies one rule to a stretch of the flat buffers, in place, in the
order Keras 3 writes it (KERAS_RULES.md section 2), so float64 results match Keras
to rounding. It takes the parameter `p`, the gradient `g` (already unscaled,
clipped and with weight decay applied to `p` by the pipeline), the rule's state
slots (None for a slot the configuration does not create), then its per-step
scalars, in exactly the order the CUDA rule in kernels/<name>.cuh reads them.

The functions use only operators and ufuncs, so they also run on CuPy arrays (the
"unfused CuPy" baseline of the benchmarks). Scalars arrive already cast to the
math dtype, so float32 buffers are updated in float32 arithmetic.

Mixed precision (fusedopt.precision): the rules always see arrays of the math dtype
(float32, or float64 for float64 buffers). ReferencePlan loads 16-bit buffers into it
exactly, once, and stores the results back rounded, once: to nearest even, or for
bfloat16 params with stochastic_rounding, stochastically; with master weights the rule
updates the float32 master and the params receive it rounded. Keras' options' slots
(use_ema's average, gradient accumulation's accumulator) are state slots, rounded
the same way; the average reads the master, or the params as stored. The same points
as kernels/storage.cuh, options.cuh and fused.cu round.
"""

import math

import numpy as np

from . import precision


def sgd(p, g, m, lr, momentum, nesterov, gradient_units, buffer_momentum, gradient_weight):
    """SGD with optional (Nesterov) momentum; the velocity m is in units of lr.

    m <- momentum*m - lr*g;  p <- p + momentum*m - lr*g (nesterov)  or  p <- p + m
    Without momentum (m is None): p <- p - lr*g.
    gradient_units (torch's form): m <- buffer_momentum*m + gradient_weight*g
    (0 and 1 on the first step, else momentum and 1 - dampening);
    p <- p - lr*(g + momentum*m) (nesterov)  or  p <- p - lr*m.
    """
    if m is None:
        p -= g * lr
        return
    if gradient_units:
        m[...] = m * buffer_momentum + g * gradient_weight
        p -= (g + m * momentum if nesterov else m) * lr
        return
    m[...] = m * momentum - g * lr
    if nesterov:
        p += m * momentum - g * lr
    else:
        p += m


def rmsprop(p, g, v, mom, a, lr, rho, one_minus_rho, epsilon, momentum, centered):
    """RMSprop, epsilon inside the sqrt (Keras 3).

    v <- rho*v + (1-rho)*g^2;  centered: a <- rho*a + (1-rho)*g, d = v - a^2 + eps
    (else d = v + eps);  inc = lr*g/sqrt(d);  momentum > 0: mom <- momentum*mom + inc,
    p <- p - mom;  else p <- p - inc.
    """
    v[...] = rho * v + one_minus_rho * (g * g)
    if centered:
        a[...] = rho * a + one_minus_rho * g
        denominator = v - a * a + epsilon
    else:
        denominator = v + epsilon
    increment = lr * g / np.sqrt(denominator)
    if momentum > 0:
        mom[...] = momentum * mom + increment
        p -= mom
    else:
        p -= increment


def adagrad(p, g, acc, lr, epsilon):
    """Adagrad, epsilon inside the sqrt: acc <- acc + g^2;  p <- p - lr*g/sqrt(acc + eps)."""
    acc += g * g
    p -= lr * g / np.sqrt(acc + epsilon)


def adadelta(p, g, eg, ed, lr, rho, one_minus_rho, epsilon):
    """Adadelta: eg <- rho*eg + (1-rho)*g^2;  delta = -sqrt(ed+eps)*g/sqrt(eg+eps);
    ed <- rho*ed + (1-rho)*delta^2;  p <- p + lr*delta  (delta uses the old ed)."""
    eg[...] = rho * eg + one_minus_rho * (g * g)
    delta = -(np.sqrt(ed + epsilon) * g) / np.sqrt(eg + epsilon)
    ed[...] = rho * ed + one_minus_rho * (delta * delta)
    p += lr * delta


def adam(p, g, m, v, vhat, alpha, one_minus_beta_1, one_minus_beta_2, epsilon, amsgrad):
    """Adam / AMSGrad with the bias corrections folded into alpha, epsilon outside the sqrt.

    alpha = lr*sqrt(1-beta_2^t)/(1-beta_1^t);  m <- m + (g-m)(1-beta_1);
    v <- v + (g^2-v)(1-beta_2);  amsgrad: vhat <- max(vhat, v), use vhat;
    p <- p - m*alpha/(sqrt(v) + eps).
    """
    m += (g - m) * one_minus_beta_1
    v += (g * g - v) * one_minus_beta_2
    if amsgrad:
        np.maximum(vhat, v, out=vhat)
        v = vhat
    p -= (m * alpha) / (np.sqrt(v) + epsilon)


def adamax(p, g, m, u, lr, one_minus_beta_1, beta_2, one_minus_beta_1_power, epsilon):
    """Adamax (infinity norm): m <- m + (g-m)(1-beta_1);  u <- max(beta_2*u, |g|);
    p <- p - lr*m/((1-beta_1^t)*(u + eps))."""
    m += (g - m) * one_minus_beta_1
    np.maximum(beta_2 * u, np.abs(g), out=u)
    p -= (lr * m) / (one_minus_beta_1_power * (u + epsilon))


def nadam(p, g, m, v, lr, one_minus_beta_1, one_minus_beta_2, u_t1, one_minus_u_t,
          one_minus_u_product_t, one_minus_u_product_t1, one_minus_beta_2_power, epsilon):
    """Nadam with Keras 3's momentum schedule u_t = beta_1*(1 - 0.5*0.96^t) and
    u_product_t = u_1*...*u_t:
    m <- m + (g-m)(1-beta_1);  v <- v + (g^2-v)(1-beta_2);
    m_hat = u_{t+1}*m/(1-u_product_t*u_{t+1}) + (1-u_t)*g/(1-u_product_t);
    v_hat = v/(1-beta_2^t);  p <- p - m_hat*lr/(sqrt(v_hat) + eps).
    """
    m += (g - m) * one_minus_beta_1
    v += (g * g - v) * one_minus_beta_2
    m_hat = (u_t1 * m) / one_minus_u_product_t1 + (one_minus_u_t * g) / one_minus_u_product_t
    v_hat = v / one_minus_beta_2_power
    p -= (m_hat * lr) / (np.sqrt(v_hat) + epsilon)


def ftrl(p, g, n, z, lr, learning_rate_power, l1, l2_eff, two_l2_shrinkage):
    """FTRL-proximal (Keras 3), with l2_eff = l2 + beta/(2*lr):
    g~ = g + 2*s*p;  n' = n + g^2;  z <- z + g~ - ((n'^-lrp - n^-lrp)/lr)*p;
    p <- (clip(z, -l1, l1) - z)/(n'^-lrp/lr + 2*l2_eff);  n <- n'.
    The parameter is overwritten in closed form; the accumulator uses the raw g.
    """
    g_tilde = g + two_l2_shrinkage * p
    n_new = n + g * g
    n_new_power = _power(n_new, -learning_rate_power)
    z += g_tilde - ((n_new_power - _power(n, -learning_rate_power)) / lr) * p
    quadratic = n_new_power / lr + 2 * l2_eff
    p[...] = (np.clip(z, -l1, l1) - z) / quadratic
    n[...] = n_new


def _power(x, exponent):
    """x**exponent, with the default exponent 0.5 as a correctly rounded sqrt (as TF
    does) so the difference n'^0.5 - n^0.5, which cancels, rounds the same everywhere."""
    return np.sqrt(x) if exponent == 0.5 else x ** exponent


def lion(p, g, m, lr, beta_1, one_minus_beta_1, beta_2, one_minus_beta_2):
    """Lion (Chen et al. 2023): p <- p - lr*sign(beta_1*m + (1-beta_1)*g), then
    m <- beta_2*m + (1-beta_2)*g  (the parameter update uses the old m)."""
    p -= lr * np.sign(m * beta_1 + g * one_minus_beta_1)
    m[...] = m * beta_2 + g * one_minus_beta_2


def schedule_free_adamw(p, g, z, v, lr, beta_1, one_minus_beta_1, one_minus_beta_2,
                        one_minus_beta_2_power, epsilon, weight, one_minus_weight):
    """Schedule-Free AdamW (Defazio et al., 2024) as Keras 3 writes it. `p` holds y,
    the interpolation the gradient is taken at; `z` (Keras' "momentum" slot, started
    at a copy of the params) is the SGD sequence; x, the average, is not stored: it is
    recovered from y and the old z. lr already carries the warmup factor min(t/W, 1),
    weight = 1/t.

    v <- v + (g^2 - v)(1-beta_2);  z' = z - lr*g/(sqrt(v/(1-beta_2^t)) + eps);
    x = (y - (1-beta_1)*z)/beta_1;  x' = (1-weight)*x + weight*z';
    y <- (1-beta_1)*z' + beta_1*x'
    """
    x = (p - one_minus_beta_1 * z) / beta_1  # from the old y and z, before z moves
    v += (g * g - v) * one_minus_beta_2
    z -= (lr * g) / (np.sqrt(v / one_minus_beta_2_power) + epsilon)
    x = one_minus_weight * x + weight * z
    p[...] = one_minus_beta_1 * z + beta_1 * x


# ------------------------------------------------------------ whole-variable rules
# These read reductions over a whole variable (a segment of the flat buffer), so they
# run once per segment and take its `shape` first. Their float64 sums are the
# reductions the kernels compute on the device, per segment.

def lamb(shape, p, g, m, v, lr, one_minus_beta_1, one_minus_beta_2, one_minus_beta_1_power,
         one_minus_beta_2_power, epsilon, stored=None):
    """LAMB (You et al., 2020) as Keras 3 writes it: an Adam direction r, scaled per
    variable by the trust ratio ||p||/||r|| (1 when either norm is 0 or NaN). There is
    no weight-decay term inside r: decoupled decay has already been applied to p.

    m <- m + (g-m)(1-beta_1);  v <- v + (g^2-v)(1-beta_2);
    r = (m/(1-beta_1^t)) / (sqrt(v/(1-beta_2^t)) + eps);  p <- p - ratio*lr*r

    `stored(x)` (16-bit state) rounds x in place to what its slot holds once stored: r
    is computed from the m and v stored, as Keras reads its variables back after
    assigning them (and as kernels/lamb.cu's second pass reads them).
    """
    m += (g - m) * one_minus_beta_1
    v += (g * g - v) * one_minus_beta_2
    if stored is not None:
        stored(m)
        stored(v)
    r = (m / one_minus_beta_1_power) / (np.sqrt(v / one_minus_beta_2_power) + epsilon)
    ratio = trust_ratio(sum_of_squares(p), sum_of_squares(r))
    p -= (p.dtype.type(ratio) * lr) * r


def trust_ratio(p_sum_of_squares, r_sum_of_squares):
    """Keras' Lamb ratio ||p||/||r||, or 1 unless both norms are > 0 (NaN gives 1)."""
    p_norm, r_norm = math.sqrt(p_sum_of_squares), math.sqrt(r_sum_of_squares)
    return p_norm / r_norm if p_norm > 0 and r_norm > 0 else 1.0


def sum_of_squares(x):
    """sum(x^2) in float64, whatever x's dtype: the per-segment reduction."""
    x = np.asarray(x, dtype=np.float64).ravel()
    return float(np.dot(x, x)) if x.size else 0.0


# Slot specs (FusedOptimizer._slot_specs): the initial value "a copy of the params",
# and the two slot shapes that are not the params' (Adafactor's row and column
# statistics). A slot of such a shape is a flat buffer of its own, whose segment i
# holds segment i's statistics: slot_shapes gives its segment table.
PARAMS = "params"
ROWS, COLUMNS = "rows", "columns"


def slot_shapes(kind, shapes):
    """The per-segment shapes of a slot of `kind` (None: the params' own shapes)."""
    if kind is None:
        return tuple(tuple(s) for s in shapes)
    index = {ROWS: 0, COLUMNS: 1}[kind]
    return tuple(factored_shapes(s)[index] for s in shapes)


def factored_shapes(shape):
    """The shapes of Adafactor's row and column statistics for a variable of `shape`:
    shape[:-1] and shape[:-2] + shape[-1:] for rank >= 2 (Keras factors the last two
    axes); (0,) and (0,) below rank 2, which keep the full second moment instead."""
    shape = tuple(shape)
    if len(shape) < 2:
        return (0,), (0,)
    return shape[:-1], shape[:-2] + shape[-1:]


def adafactor(shape, p, g, r, c, v, rho, beta_2, one_minus_beta_2, epsilon_1, epsilon_2,
              clip_threshold, stored=None):
    """Adafactor (Shazeer & Stern, 2018) as Keras 3 writes it, on one variable.
    (`stored`: as lamb's, not used yet: its 16-bit state runs on this executor only.)

    `r` and `c` are the variable's row and column statistics (factored_shapes; empty
    below rank 2), `v` the full-size second moment, which for rank >= 2 is rebuilt
    from r and c every step, as Keras does. rho = min(lr, 1/sqrt(t)) and
    beta_2 = 1 - t^beta_2_decay are this step's scalars; rms(x) = sqrt(mean(x^2)).

    alpha = max(eps_2, rms(p))*rho;  G = g^2 + eps_1;
    rank >= 2: r <- beta_2*r + (1-beta_2)*mean(G, -1);  c <- beta_2*c + (1-beta_2)*mean(G, -2);
               v = r/mean(r, -1) (outer) c,  per leading index
    else:      v <- beta_2*v + (1-beta_2)*G
    u = g/sqrt(v);  p <- p - alpha * u/max(1, rms(u)/clip_threshold)
    """
    shape = tuple(shape)
    p_, g_, v_ = p.reshape(shape), g.reshape(shape), v.reshape(shape)
    dt = p.dtype.type
    alpha = np.maximum(epsilon_2, _rms(p)) * rho
    regulated = g_ * g_ + epsilon_1
    if len(shape) >= 2:
        r_, c_ = (s.reshape(t) for s, t in zip((r, c), factored_shapes(shape)))
        r_[...] = beta_2 * r_ + one_minus_beta_2 * _mean(regulated, -1)
        c_[...] = beta_2 * c_ + one_minus_beta_2 * _mean(regulated, -2)
        v_[...] = (r_ / _mean(r_, -1, keepdims=True))[..., None] * c_[..., None, :]
    else:
        v_[...] = beta_2 * v_ + one_minus_beta_2 * regulated
    u = g_ / np.sqrt(v_)
    u_hat = u / np.maximum(dt(1), _rms(u) / clip_threshold)
    p_ -= alpha * u_hat


def _mean(x, axis=None, keepdims=False):
    """np.mean's own arithmetic (a sum, then one division by the count), but a mean
    over nothing is a quiet NaN, as in Keras."""
    count = x.size if axis is None else x.shape[axis]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(x, axis=axis, keepdims=keepdims) / x.dtype.type(count)


def _rms(x):
    return np.sqrt(_mean(x * x))


def muon(shape, p, g, m, v, use_adamw, rms_scale, lr, momentum, nesterov, ns_steps, muon_a,
         muon_b, muon_c, alpha, one_minus_beta_1, one_minus_beta_2, epsilon, stored=None):
    """Muon (Jordan et al., 2024) as Keras 3 writes it, on one variable.
    (`stored`: as lamb's, not used yet: its 16-bit state runs on this executor only.)

    A variable Muon does not handle (use_adamw: not 2-D, or excluded by name) takes
    the Adam step with alpha = lr*adam_lr_ratio*sqrt(1-beta_2^t)/(1-beta_1^t); `v` is
    used only there. A 2-D variable takes the Muon step, with `rms_scale` =
    sqrt(max(rows, cols))*rms_rate (1 when rms_rate is None):

    m <- m + (g + m*(momentum-1));  d = g + momentum*m (nesterov) or m;
    p <- p - lr*newton_schulz(d)*rms_scale
    """
    if use_adamw:
        adam(p, g, m, v, None, alpha, one_minus_beta_1, one_minus_beta_2, epsilon, False)
        return
    m += g + m * (momentum - 1)
    d = g + momentum * m if nesterov else m
    update = newton_schulz(d.reshape(shape), int(ns_steps), muon_a, muon_b, muon_c)
    p -= ((lr * update) * rms_scale).ravel()


def newton_schulz(x, steps, a, b, c):
    """The quintic Newton-Schulz iteration of Keras' Muon, an approximate UV^T of x's
    SVD: x/(||x||_F + 1e-7), then `steps` times A = XX^T, X <- aX + (bA + cA^2)X,
    working on the wide orientation (x transposed when it has more rows than columns)."""
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = np.swapaxes(x, -1, -2)
    x = x / (np.sqrt(np.sum(x * x, axis=(-2, -1), keepdims=True)) + x.dtype.type(1e-7))
    for _ in range(steps):
        gram = x @ np.swapaxes(x, -1, -2)
        x = a * x + (b * gram + (c * gram) @ gram) @ x
    return np.swapaxes(x, -1, -2) if tall else x


# ------------------------------------------------- options around every rule (§1)

def ema(average, p, momentum):
    """Keras' moving average of the weights, after the step: average <- mom*average +
    (1-mom)*p, with mom = 0 on the first update (the average starts as p) and
    ema_momentum afterwards; 1-mom is taken in the math dtype (Keras takes it in the
    variable's: the same for float32 and float64 variables). `average` and `p` are
    math-dtype arrays (ReferencePlan._moving_average loads and stores 16-bit storage)."""
    average[...] = momentum * average + (1 - momentum) * p


def loss_scale_update(scale, counter, finite, growth_steps):
    """Keras' dynamic loss scale after one step: (new scale, new counter).
    Non-finite gradients halve the scale and reset the counter (the step is skipped);
    `growth_steps` finite steps in a row double it."""
    if not finite:
        return scale * 0.5, 0
    if counter == growth_steps - 1:
        return scale * 2.0, 0
    return scale, counter + 1


# ------------------------------------------------------------------ the executor
# The pipeline around the rules, in Keras 3's order, as readable NumPy: the "numpy"
# executor (fusedopt.executor) and the oracle the host and CUDA executors are
# tested against.

# Elements processed per NumPy call: bounds the temporaries a rule creates and keeps
# them in cache; large enough that the per-chunk Python overhead is negligible.
CHUNK = 1 << 16


class ReferencePlan:
    """The NumPy executor for one optimizer on one layout (fusedopt.executor): the
    step's scalars from the optimizer's Python formulas (`_rule_scalars`, the
    schedules; per segment group, fusedopt.segments), then, in Keras 3's order,

        unscale -> [accumulate] -> clip -> weight decays -> rule -> [EMA]

    chunk by chunk (or segment by segment for rules that read whole variables), then
    count the call. Holds the counters [calls applied, skipped steps, last step
    skipped]; with gradient accumulation Keras' `iterations` is calls // N."""

    name = "numpy"

    def __init__(self, optimizer, params):
        self.optimizer = optimizer
        self.offsets = params.offsets
        self.shapes = params.shapes
        # Where each rule slot's segments start: the params' offsets, or those of
        # Adafactor's factored statistics.
        self.slot_offsets = [
            None if spec is None else _offsets(slot_shapes(spec[2] if len(spec) > 2 else None,
                                                           params.shapes))
            for spec in optimizer._slot_specs()]
        self.write_state(optimizer._iterations, optimizer._skipped_steps,
                         optimizer._last_step_skipped)
        self.write_loss_scale(*optimizer._loss_scale_state)

    @property
    def next_iteration(self):
        return self.counters[0]

    def read_loss_scale(self):
        """A LossScaleOptimizer's (dynamic scale, finite steps since it changed)."""
        return float(self.loss_scale[0]), int(self.loss_scale[1])

    def write_loss_scale(self, scale, counter):
        self.loss_scale = [np.float32(scale), int(counter)]  # float32, as Keras keeps it

    def hyperparameters_changed(self, name):
        """Nothing to refresh: every step reads the optimizer's attributes."""

    def step(self, grads, params_data, slots, host_learning_rate=None, amp=None):
        opt = self.optimizer
        grad_scale, found_inf = amp if amp is not None else (None, None)
        growth = opt._dynamic_growth_steps  # a LossScaleOptimizer's inner optimizer
        # A 16-bit inf or NaN counts as any other. A dynamic scale of 0 (underflowed)
        # would turn every gradient into inf or NaN: such a step is skipped too.
        if (opt.skip_nonfinite and not _all_finite(grads)) or \
                (found_inf is not None and found_inf.reshape(-1)[0] != 0) or \
                (growth and not self.loss_scale[0]):
            self.counters[1] += 1
            self.counters[2] = True
            if growth:
                self.write_loss_scale(*loss_scale_update(*self.loss_scale, False, growth))
            return
        calls = self.counters[0]
        pairs, segment_group = opt._segment_groups()
        # Each group's rate and scalars: m*lr, then the rule's scalars from it.
        values = [opt._step_scalars(calls, host_learning_rate, m) + (decay,)
                  for m, decay in pairs]
        # The unscale is a math-type scalar, as the kernels' (T)unscale (step.cuh):
        # for 16-bit params float32, never rounded to the params' 16 bits.
        dt = _math_dtype(params_data.dtype).type
        unscale = opt._unscale()
        if grad_scale is not None:  # in double, as kernels/reduce.cu's fusedopt_amp_inputs
            unscale = (1.0 if unscale is None else unscale) / float(grad_scale.reshape(-1)[0])
        if growth:  # then the dynamic scale, in double, as kernels/step.cuh's fo_phase
            unscale = (1.0 if unscale is None else unscale) / float(self.loss_scale[0])
        unscale = None if unscale is None else dt(unscale)
        # Non-finite gradients propagate as in Keras (or are skipped above); NumPy's
        # warnings about them would only repeat that.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            accumulator = opt._option_slots.get("gradient_accumulator")
            if accumulator is not None:
                n = opt.gradient_accumulation_steps
                grads = accumulate(accumulator, grads, unscale, n, (calls + 1) % n == 0)
                unscale = None
            if grads is not None:
                self._pipeline(params_data, grads, slots, values, segment_group, unscale,
                               calls)
            average = opt._option_slots.get("average")
            if average is not None:
                self._moving_average(params_data, average, calls // opt._accumulation, calls)
        self.counters[0] += 1
        self.counters[2] = False
        if growth:
            self.write_loss_scale(*loss_scale_update(*self.loss_scale, True, growth))

    def read_state(self):
        return tuple(self.counters)

    def join_current_stream(self):
        """Nothing to join: a NumPy step has finished when step() returns."""

    def write_state(self, iterations, skipped_steps, last_step_skipped):
        self.counters = [iterations, skipped_steps, last_step_skipped]

    def _moving_average(self, params, average, iterations, calls):
        """Keras' EMA after the update, at `iterations` updates done before this call
        (`calls`: the calls before it, what stochastic rounding hashes).

        It averages what the model holds after the step: the float32 master when there
        is one, else the params as stored (16-bit: rounded, to nearest or
        stochastically). The average is a state slot: computed in the math dtype and
        stored rounded to nearest once. An overwrite copies the average as stored into
        the master (exact) and into the params, rounded as every param store
        (kernels/options.cuh, fo_moving_average; fused.cu; host.cpp)."""
        opt = self.optimizer
        master = opt._option_slots.get("master")
        held = master if master is not None else _as_math(params)
        value = _as_math(average)
        ema(value, held, held.dtype.type(opt.ema_momentum if iterations else 0.0))
        if value is not average:
            precision.store_nearest(average, value)
            value = _as_math(average)
        frequency = opt.ema_overwrite_frequency
        if frequency and (iterations + 1) % frequency == 0:
            if master is not None:
                master[...] = value
            _Stores(params, None, opt.stochastic_rounding, opt.seed, calls).store_params(
                value, 0, params.size)

    def _pipeline(self, p_all, g_all, slots, values, segment_group, unscale, calls=0):
        """`values`: (lr, scalars, decay on) of each segment group; `segment_group`:
        each segment's group (fusedopt.segments); `calls`: the step's count before it
        (what stochastic rounding hashes)."""
        opt = self.optimizer
        dt = _math_dtype(p_all.dtype).type
        stores = _Stores(p_all, opt._option_slots.get("master"),
                         opt.stochastic_rounding, opt.seed, calls)
        l2 = dt(opt.coupled_weight_decay) if opt.coupled_weight_decay else None
        groups = [(dt(lr), tuple(dt(x) for x in scalars), decay, l2 if decay else None)
                  for lr, scalars, decay in values]
        clipvalue = dt(opt.clipvalue) if opt.clipvalue else None
        factors = clip_factors(opt, g_all, self.offsets, unscale)
        rule = globals()[opt.rule]
        whole = opt.whole_variable
        scratch = np.empty(p_all.size if whole else min(CHUNK, p_all.size), dtype=dt)
        per_segment = bool(opt.clipnorm) or len(groups) > 1 or whole
        chunks = _segments(self.offsets) if whole else _chunks(self.offsets, per_segment)
        for start, stop, segment in chunks:
            lr_t, c, decay, l2 = groups[segment_group[segment] if per_segment else 0]
            g_view = g_all[start:stop]
            g = _as_math(g_view)
            p = stores.load_params(start, stop)
            if unscale is not None or factors is not None or clipvalue is not None \
                    or l2 is not None:
                if g is g_view:  # the caller's grads: work on a copy
                    g = _copy_into(scratch, g)
                if unscale is not None:
                    g *= unscale
                if factors is not None:
                    g *= dt(factors[segment if opt.clipnorm else 0])
                if clipvalue is not None:
                    np.clip(g, -clipvalue, clipvalue, out=g)
                if l2 is not None:  # coupled decay: L2 in the gradient, from p before decay
                    g += p * l2
            if not whole:
                if decay and opt.weight_decay is not None:
                    p -= p * dt(opt.weight_decay) * lr_t
                state = [s[start:stop] if s is not None else None for s in slots]
                loaded = [None if s is None else _as_math(s) for s in state]
                rule(p, g, *loaded, *c)
                stores.store(p, start, stop, state, loaded)
                continue
            shape = self.shapes[segment]
            wd = opt._segment_weight_decay(segment, shape) if decay else None
            if wd is not None:
                p -= p * dt(wd) * lr_t
            state = [None if s is None else s[o[segment]:o[segment + 1]]
                     for s, o in zip(slots, self.slot_offsets)]
            loaded = [None if s is None else _as_math(s) for s in state]
            narrow = [s for s, x in zip(state, loaded) if s is not None and x is not s]
            stored = _stored_as(narrow[0].dtype) if narrow else None
            rule(shape, p, g, *loaded, *opt._segment_arguments(segment, shape), *c,
                 stored=stored)
            stores.store(p, start, stop, state, loaded)


def _math_dtype(dtype):
    """float64 for float64 storage, else float32 (fusedopt.precision)."""
    return np.dtype(np.float64 if np.dtype(dtype) == np.float64 else np.float32)


def _as_math(x):
    """x itself when stored in its math dtype, else a new math-dtype array of its
    values (exact: every 16-bit value is a float32 value)."""
    return x if x.dtype == _math_dtype(x.dtype) else precision.load(x)


def _stored_as(dtype):
    """x -> x rounded in place to the values a slot of 16-bit `dtype` holds once x is
    stored in it (rounded to nearest once: _Stores.store's rounding, which then keeps
    them as they are)."""
    def stored(x):
        slot = np.empty(x.shape, dtype)
        precision.store_nearest(slot, x)
        x[...] = precision.load(slot)
    return stored


class _Stores:
    """Where a rule's results go: the params (from the master copy when there is one,
    rounded to nearest or stochastically) and the state slots (rounded to nearest when
    narrower than the math dtype). Each value is rounded once."""

    def __init__(self, params, master, stochastic, seed, step):
        self.params, self.master = params, master
        self.stochastic = bool(stochastic) and params.dtype.name == "bfloat16"
        self.seed, self.step = seed, step

    def load_params(self, start, stop):
        """The math copy a rule updates in place: the master's (a view: updated in
        place), the params' own view, or a loaded copy of 16-bit params."""
        if self.master is not None:
            return self.master[start:stop]
        return _as_math(self.params[start:stop])

    def store(self, p, start, stop, state, loaded):
        for dst, x in zip(state, loaded):
            if dst is not None and x is not dst:
                precision.store_nearest(dst, x)
        self.store_params(p, start, stop)

    def store_params(self, p, start, stop):
        """params[start:stop] <- the math values p, rounded (nothing to do when p is
        the params' own view, updated in place)."""
        dst = self.params[start:stop]
        if p.dtype == dst.dtype:
            if p is not dst and not np.shares_memory(p, dst):
                dst[...] = p
            return
        if self.stochastic:
            precision.store_stochastic(dst, p, self.seed, self.step, start=start)
        else:
            precision.store_nearest(dst, p)


def accumulate(accumulator, g, unscale, steps, apply):
    """Keras' gradient accumulation on one call, with the (unscaled) gradient g: add
    it into the accumulator and return None; or, on the call that applies, return
    (g + accumulator)/steps and zero the accumulator. In the math dtype: 16-bit grads
    and accumulator are loaded exactly, the sum stored back rounded to nearest once
    (the accumulator is a state slot); the mean is a math-dtype array."""
    acc = _as_math(accumulator)
    g = _as_math(g)
    if unscale is not None:
        g = g * unscale
    if not apply:
        acc += g
        if acc is not accumulator:
            precision.store_nearest(accumulator, acc)
        return None
    mean = (g + acc) / acc.dtype.type(steps)
    accumulator[...] = 0
    return mean


def clip_factors(opt, g, offsets, unscale):
    """Multipliers for the unscaled gradient: one per segment (clipnorm), one for
    all (global_clipnorm), or None. Norms are summed in float64."""
    if opt.clipnorm:
        sums = [_sum_of_squares(g[a:b], unscale) for a, b in zip(offsets[:-1], offsets[1:])]
        return [clipnorm_factor(s, opt.clipnorm) for s in sums]
    if opt.global_clipnorm:
        return [global_clipnorm_factor(_sum_of_squares(g, unscale), opt.global_clipnorm)]
    return None


def clipnorm_factor(sum_of_squares, clipnorm):
    """Keras' per-variable clip, g*c/max(|g|, c), as one factor; NaN propagates."""
    norm = math.sqrt(sum_of_squares) if sum_of_squares > 0 else sum_of_squares
    if math.isnan(norm):
        return math.nan
    return clipnorm / max(norm, clipnorm)


def global_clipnorm_factor(sum_of_squares, clipnorm):
    """Keras' clip_by_global_norm scale, c*min(1/n, 1/c); NaN when n is not finite."""
    norm = math.sqrt(sum_of_squares)
    if not math.isfinite(norm):
        return math.nan
    inverse = math.inf if norm == 0 else 1.0 / norm
    return clipnorm * min(inverse, 1.0 / clipnorm)


def _sum_of_squares(g, unscale):
    total = 0.0
    for a in range(0, g.size, CHUNK):
        x = _as_math(g[a:a + CHUNK])  # the unscaled product is rounded in the math dtype
        if unscale is not None:
            x = x * unscale
        x = x.astype(np.float64)
        # einsum, not np.dot: BLAS threads on a busy machine can stall a dot for
        # milliseconds, and a single-threaded loop sums in the same order every time.
        total += float(np.einsum("i,i->", x, x))
    return total


def _copy_into(scratch, x):
    out = scratch[: x.size]
    np.copyto(out, x)
    return out


def _all_finite(g):
    return all(np.isfinite(g[a:a + CHUNK]).all() for a in range(0, g.size, CHUNK))


def _offsets(shapes):
    sizes = [math.prod(s) for s in shapes]
    return tuple(int(x) for x in np.concatenate(([0], np.cumsum(sizes, dtype=np.int64))))


def _segments(offsets):
    """(start, stop, segment) of every segment, whole."""
    for segment, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
        yield a, b, segment


def _chunks(offsets, per_segment):
    """(start, stop, segment) ranges of at most CHUNK elements; with per_segment they
    never straddle a segment boundary (each segment has its own clip factor and group)."""
    if per_segment:
        for segment, (a, b) in enumerate(zip(offsets[:-1], offsets[1:])):
            for start in range(a, b, CHUNK):
                yield start, min(start + CHUNK, b), segment
    else:
        for start in range(0, offsets[-1], CHUNK):
            yield start, min(start + CHUNK, offsets[-1]), 0
