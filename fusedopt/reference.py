"""The update rules in plain NumPy: the specification in code.

Each function applies one rule to a stretch of the flat buffers, in place, in the
order Keras 3 writes it (KERAS_RULES.md section 2), so float64 results match Keras
to rounding. It takes the parameter `p`, the gradient `g` (already unscaled,
clipped and with weight decay applied to `p` by the pipeline), the rule's state
slots (None for a slot the configuration does not create), then its per-step
scalars, in exactly the order the CUDA rule in kernels/<name>.cuh reads them.

The functions use only operators and ufuncs, so they also run on CuPy arrays (the
"unfused CuPy" baseline of the benchmarks). Scalars arrive already cast to the
buffer's dtype, so float32 buffers are updated in float32 arithmetic.
"""

import math

import numpy as np


def sgd(p, g, m, lr, momentum, nesterov):
    """SGD with optional (Nesterov) momentum; the velocity m is in units of lr.

    m <- momentum*m - lr*g;  p <- p + momentum*m - lr*g (nesterov)  or  p <- p + m
    Without momentum (m is None): p <- p - lr*g.
    """
    if m is None:
        p -= g * lr
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


# ------------------------------------------------------------------ the executor
# The pipeline around the rules, in Keras 3's order, as readable NumPy: the "numpy"
# executor (fusedopt.executor) and the oracle the host and CUDA executors are
# tested against.

# Elements processed per NumPy call: bounds the temporaries a rule creates and keeps
# them in cache; large enough that the per-chunk Python overhead is negligible.
CHUNK = 1 << 16


class ReferencePlan:
    """The NumPy executor for one optimizer on one layout (fusedopt.executor):
    the step's scalars from the optimizer's Python formulas (`_rule_scalars`, the
    schedules), then unscale -> clip -> weight decays -> rule, chunk by chunk, then
    count the step. Holds the counters [iterations, skipped steps, last step skipped]."""

    name = "numpy"

    def __init__(self, optimizer, params):
        self.optimizer = optimizer
        self.offsets = params.offsets
        self.write_state(optimizer._iterations, optimizer._skipped_steps,
                         optimizer._last_step_skipped)

    @property
    def next_iteration(self):
        return self.counters[0]

    def hyperparameters_changed(self, name):
        """Nothing to refresh: every step reads the optimizer's attributes."""

    def step(self, grads, params_data, slots, host_learning_rate=None):
        if self.optimizer.skip_nonfinite and not _all_finite(grads):
            self.counters[1] += 1
            self.counters[2] = True
            return
        pairs, segment_group = self.optimizer._segment_groups()
        # Each group's rate and scalars: m*lr, then the rule's scalars from it.
        values = [self.optimizer._step_scalars(self.counters[0], host_learning_rate, m)
                  + (decay,) for m, decay in pairs]
        # Non-finite gradients propagate as in Keras (or are skipped above); NumPy's
        # warnings about them would only repeat that.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            self._pipeline(params_data, grads, slots, values, segment_group)
        self.counters[0] += 1
        self.counters[2] = False

    def read_state(self):
        return tuple(self.counters)

    def join_current_stream(self):
        """Nothing to join: a NumPy step has finished when step() returns."""

    def write_state(self, iterations, skipped_steps, last_step_skipped):
        self.counters = [iterations, skipped_steps, last_step_skipped]

    def _pipeline(self, p_all, g_all, slots, values, segment_group):
        """`values`: (lr, scalars, decay on) of each segment group; `segment_group`:
        each segment's group (fusedopt.segments)."""
        opt = self.optimizer
        dt = p_all.dtype.type
        wd = dt(opt.weight_decay) if opt.weight_decay is not None else None
        l2 = dt(opt.coupled_weight_decay) if opt.coupled_weight_decay else None
        groups = [(dt(lr), tuple(dt(x) for x in scalars), wd if decay else None,
                   l2 if decay else None) for lr, scalars, decay in values]
        unscale = dt(1.0 / opt.loss_scale_factor) if opt.loss_scale_factor else None
        clipvalue = dt(opt.clipvalue) if opt.clipvalue else None
        factors = clip_factors(opt, g_all, self.offsets, unscale)
        rule = globals()[opt.rule]
        scratch = np.empty(min(CHUNK, p_all.size), dtype=p_all.dtype)
        per_segment = bool(opt.clipnorm) or len(groups) > 1
        for start, stop, segment in _chunks(self.offsets, per_segment):
            lr_t, c, wd, l2 = groups[segment_group[segment] if per_segment else 0]
            g = g_all[start:stop]
            p = p_all[start:stop]
            if unscale is not None or factors is not None or clipvalue is not None \
                    or l2 is not None:
                g = _copy_into(scratch, g)
                if unscale is not None:
                    g *= unscale
                if factors is not None:
                    g *= dt(factors[segment if opt.clipnorm else 0])
                if clipvalue is not None:
                    np.clip(g, -clipvalue, clipvalue, out=g)
                if l2 is not None:  # coupled decay: L2 in the gradient, from p before decay
                    g += p * l2
            if wd is not None:
                p -= p * wd * lr_t
            rule(p, g, *[s[start:stop] if s is not None else None for s in slots], *c)


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
        x = g[a:a + CHUNK]
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
