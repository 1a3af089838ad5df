"""One small class per rule: Keras 3 arguments and defaults, slots, per-step scalars.

Each class names its rule (`rule`, the file kernels/<rule>.cuh and the function
reference.<rule>), declares its hyperparameters with the check each must pass
(`Hyperparameter`: the constructor and `opt.x = value` share it), lists its state
slots with their initial values, and computes the per-step scalars its rule reads, in
the rule's argument order. Everything else (the common options, the pipeline, state,
config) is FusedOptimizer's.
"""

import math
import re

import numpy as np

from . import _validate as check
from . import reference
from .optimizer import (COLUMNS, KERAS_DEFAULT_EPSILON, PARAMS, ROWS, FusedOptimizer,
                        Hyperparameter)

__all__ = ["SGD", "RMSprop", "Adagrad", "Adadelta", "Adam", "AdamW", "Adamax", "Nadam",
           "Ftrl", "Lion", "ScheduleFreeAdamW", "Lamb", "Adafactor", "Muon"]


def _epsilon(name, value):
    """Keras 2's epsilon=None means the backend epsilon, 1e-7."""
    return KERAS_DEFAULT_EPSILON if value is None else check.non_negative(name, value)


def _momentum():
    return Hyperparameter(check.real, low=0.0, high=1.0)


class SGD(FusedOptimizer):
    """Gradient descent with optional momentum and Nesterov momentum.

    momentum == 0:  p <- p - lr*g
    otherwise:      m <- momentum*m - lr*g;  p <- p + m
    nesterov:       p <- p + momentum*m - lr*g   (with the new m)

    momentum_in_gradient_units=True (fusedopt's own, default False) is
    torch.optim.SGD's form: the buffer holds gradients, not steps, and lr applies
    after it, so a changing lr does not rescale the past (and `dampening` may be set):
                    m <- momentum*m + (1-dampening)*g  (on the first step m <- g);
                    p <- p - lr*m,  nesterov: p <- p - lr*(g + momentum*m)
    """

    rule = "sgd"
    momentum = _momentum()
    nesterov = Hyperparameter(check.boolean)
    dampening = Hyperparameter(check.real, low=0.0, high=1.0)
    momentum_in_gradient_units = Hyperparameter(check.boolean)

    def __init__(self, learning_rate=0.01, momentum=0.0, nesterov=False, dampening=0.0,
                 momentum_in_gradient_units=False, **kwargs):
        super().__init__(learning_rate, momentum=momentum, nesterov=nesterov,
                         dampening=dampening,
                         momentum_in_gradient_units=momentum_in_gradient_units, **kwargs)

    def _check_hyperparameters(self):
        if self.dampening and not self.momentum_in_gradient_units:
            raise ValueError("`dampening` needs `momentum_in_gradient_units=True` (torch's "
                             f"form of momentum), got dampening={self.dampening!r}")
        super()._check_hyperparameters()

    def get_config(self):
        config = super().get_config()
        # Only when set, so that Keras' configs stay Keras' (Keras has neither key).
        if not self.momentum_in_gradient_units:
            config.pop("momentum_in_gradient_units", None)
            config.pop("dampening", None)
        return config

    def _slot_specs(self):
        return (("momentum", 0.0) if self.momentum != 0 else None,)

    def _rule_scalars(self, lr, t):
        # Torch's form starts its buffer at the first gradient: m <- 0*m + 1*g at t = 1.
        first = t == 1
        return (lr, self.momentum, float(self.nesterov), float(self.momentum_in_gradient_units),
                0.0 if first else self.momentum, 1.0 if first else 1 - self.dampening)


class RMSprop(FusedOptimizer):
    """RMSprop, epsilon inside the square root (Keras 3).

    v <- rho*v + (1-rho)*g^2;  centered: a <- rho*a + (1-rho)*g, d = v - a^2 + eps,
    else d = v + eps;  inc = lr*g/sqrt(d);  p <- p - inc, or with momentum
    mom <- momentum*mom + inc, p <- p - mom.
    """

    rule = "rmsprop"
    rho = Hyperparameter(check.beta)
    momentum = _momentum()
    epsilon = Hyperparameter(_epsilon)
    centered = Hyperparameter(check.boolean)

    def __init__(self, learning_rate=0.001, rho=0.9, momentum=0.0, epsilon=1e-7,
                 centered=False, **kwargs):
        super().__init__(learning_rate, rho=rho, momentum=momentum, epsilon=epsilon,
                         centered=centered, **kwargs)

    def _slot_specs(self):
        return (
            ("velocity", 0.0),
            ("momentum", 0.0) if self.momentum > 0 else None,
            ("average_gradient", 0.0) if self.centered else None,
        )

    def _rule_scalars(self, lr, t):
        return lr, self.rho, 1 - self.rho, self.epsilon, self.momentum, float(self.centered)


class Adagrad(FusedOptimizer):
    """Adagrad, epsilon inside the square root (Keras 3).

    acc <- acc + g^2  (acc starts at initial_accumulator_value);
    p <- p - lr*g/sqrt(acc + eps)
    """

    rule = "adagrad"
    initial_accumulator_value = Hyperparameter(check.non_negative)
    epsilon = Hyperparameter(_epsilon)

    def __init__(self, learning_rate=0.001, initial_accumulator_value=0.1, epsilon=1e-7,
                 **kwargs):
        super().__init__(learning_rate, initial_accumulator_value=initial_accumulator_value,
                         epsilon=epsilon, **kwargs)

    def _slot_specs(self):
        return (("accumulator", self.initial_accumulator_value),)

    def _rule_scalars(self, lr, t):
        return lr, self.epsilon


class Adadelta(FusedOptimizer):
    """Adadelta. With Keras' default learning_rate=0.001 it moves slowly; the paper's
    form is learning_rate=1.0.

    eg <- rho*eg + (1-rho)*g^2;  delta = -sqrt(ed + eps)*g/sqrt(eg + eps);
    ed <- rho*ed + (1-rho)*delta^2;  p <- p + lr*delta
    """

    rule = "adadelta"
    rho = Hyperparameter(check.beta)
    epsilon = Hyperparameter(_epsilon)

    def __init__(self, learning_rate=0.001, rho=0.95, epsilon=1e-7, **kwargs):
        super().__init__(learning_rate, rho=rho, epsilon=epsilon, **kwargs)

    def _slot_specs(self):
        return ("accumulated_grad", 0.0), ("accumulated_delta_var", 0.0)

    def _rule_scalars(self, lr, t):
        return lr, self.rho, 1 - self.rho, self.epsilon


class Adam(FusedOptimizer):
    """Adam (Kingma & Ba, 2015), optionally AMSGrad; epsilon outside the square root.

    alpha = lr*sqrt(1-beta_2^t)/(1-beta_1^t);  m <- m + (g-m)(1-beta_1);
    v <- v + (g^2-v)(1-beta_2);  amsgrad: vhat <- max(vhat, v) and v := vhat;
    p <- p - m*alpha/(sqrt(v) + eps)

    epsilon_after_bias_correction=True (fusedopt's own, default False) is
    torch.optim.Adam's form (the paper's Algorithm 1): epsilon is added after
    bias-correcting sqrt(v), p <- p - (lr/(1-beta_1^t))*m/(sqrt(v)/sqrt(1-beta_2^t) + eps).
    That is the rule above with eps' = eps*sqrt(1-beta_2^t): only a per-step scalar
    differs (see _epsilon_at, and its twin in kernels/adam.cuh).
    """

    rule = "adam"
    beta_1 = Hyperparameter(check.beta)
    beta_2 = Hyperparameter(check.beta)
    epsilon = Hyperparameter(_epsilon)
    amsgrad = Hyperparameter(check.boolean)
    epsilon_after_bias_correction = Hyperparameter(check.boolean)

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 amsgrad=False, epsilon_after_bias_correction=False, **kwargs):
        super().__init__(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         amsgrad=amsgrad,
                         epsilon_after_bias_correction=epsilon_after_bias_correction, **kwargs)

    def get_config(self):
        config = super().get_config()
        # Only when set, so that Keras' configs stay Keras' (Keras has no such key).
        if not self.epsilon_after_bias_correction:
            config.pop("epsilon_after_bias_correction", None)
        return config

    def _slot_specs(self):
        return (
            ("momentum", 0.0),
            ("velocity", 0.0),
            ("velocity_hat", 0.0) if self.amsgrad else None,
        )

    def _rule_scalars(self, lr, t):
        alpha = lr * math.sqrt(1 - self.beta_2 ** t) / (1 - self.beta_1 ** t)
        return alpha, 1 - self.beta_1, 1 - self.beta_2, self._epsilon_at(t), float(self.amsgrad)

    def _epsilon_at(self, t):
        """The epsilon the rule adds to sqrt(v) at step t. Keras (TF's ApplyAdam, the
        paper's epsilon-hat) adds `epsilon` itself. Torch adds it to the bias-corrected
        sqrt(v)/sqrt(1-beta_2^t); alpha above already carries sqrt(1-beta_2^t), so
        torch's update is this rule with epsilon*sqrt(1-beta_2^t)."""
        if not self.epsilon_after_bias_correction:
            return self.epsilon
        return self.epsilon * math.sqrt(1 - self.beta_2 ** t)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), Keras 3's AdamW:
    p <- p - p*weight_decay*lr before the Adam step. weight_decay defaults to 0.004.
    torch.optim.AdamW decays the same way (p *= 1 - lr*weight_decay); with
    epsilon_after_bias_correction=True this is torch's AdamW (whose defaults differ:
    epsilon=1e-8, weight_decay=0.01)."""

    def __init__(self, learning_rate=0.001, weight_decay=0.004, beta_1=0.9, beta_2=0.999,
                 epsilon=1e-7, amsgrad=False, **kwargs):
        super().__init__(learning_rate, beta_1, beta_2, epsilon, amsgrad,
                         weight_decay=weight_decay, **kwargs)

    def _check_hyperparameters(self):
        if self.weight_decay is None:
            raise ValueError("`weight_decay` must be a number for AdamW, got None")
        super()._check_hyperparameters()


class Adamax(FusedOptimizer):
    """Adamax, Adam with the infinity norm (Kingma & Ba, 2015, section 7).

    m <- m + (g-m)(1-beta_1);  u <- max(beta_2*u, |g|);
    p <- p - lr*m/((1-beta_1^t)*(u + eps))
    """

    rule = "adamax"
    beta_1 = Hyperparameter(check.beta)
    beta_2 = Hyperparameter(check.beta)
    epsilon = Hyperparameter(_epsilon)

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, **kwargs):
        super().__init__(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         **kwargs)

    def _slot_specs(self):
        return ("momentum", 0.0), ("norm", 0.0)

    def _rule_scalars(self, lr, t):
        return lr, 1 - self.beta_1, self.beta_2, 1 - self.beta_1 ** t, self.epsilon


class Nadam(FusedOptimizer):
    """Nadam (Dozat, 2016) with Keras 3's momentum schedule.

    u_t = beta_1*(1 - 0.5*0.96^t), u_product_t = u_1*...*u_t;
    m <- m + (g-m)(1-beta_1);  v <- v + (g^2-v)(1-beta_2);
    m_hat = u_{t+1}*m/(1 - u_product_t*u_{t+1}) + (1-u_t)*g/(1 - u_product_t);
    p <- p - lr*m_hat/(sqrt(v/(1-beta_2^t)) + eps)
    Keras 2's `schedule_decay=s`, when given, uses 0.96^(s*t) instead of 0.96^t.
    """

    rule = "nadam"
    beta_1 = Hyperparameter(check.beta)
    beta_2 = Hyperparameter(check.beta)
    epsilon = Hyperparameter(_epsilon)
    schedule_decay = Hyperparameter(check.optional_real, low=0.0)  # Keras 2 only

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
                 schedule_decay=None, **kwargs):
        super().__init__(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         schedule_decay=schedule_decay, **kwargs)
        # ((beta_1, schedule_decay), t, u_product after t steps)
        self._u_product_memo = (None, 0, 1.0)

    def get_config(self):
        config = super().get_config()
        if config["schedule_decay"] is None:  # Keras 3 has no such argument
            del config["schedule_decay"]
        return config

    def _slot_specs(self):
        return ("momentum", 0.0), ("velocity", 0.0)

    def _u(self, t):
        exponent = t if self.schedule_decay is None else self.schedule_decay * t
        return 1.0 - 0.5 * 0.96 ** exponent

    def _u_product(self, t):
        # Keras keeps u_product as a variable multiplied once per step, in this
        # order. It is a pure function of t: replaying the same products from 1.0
        # gives the same bits, so it needs no place in the state. Memoised forward,
        # for the current beta_1 and schedule_decay: after either is assigned the
        # product is that of the new values from step 1 (Keras would go on from the
        # product accumulated so far).
        key = (self.beta_1, self.schedule_decay)
        memo_key, k, product = self._u_product_memo
        if memo_key != key or k > t:
            k, product = 0, 1.0
        while k < t:
            k += 1
            product = product * self.beta_1 * self._u(k)
        self._u_product_memo = (key, k, product)
        return product

    def _running_product(self, iterations):
        return self._u_product(iterations)

    _running_product_inputs = ("beta_1", "schedule_decay")

    def _rule_scalars(self, lr, t):
        u_t = self.beta_1 * self._u(t)
        u_t1 = self.beta_1 * self._u(t + 1)
        u_product_t = self._u_product(t)
        u_product_t1 = u_product_t * u_t1
        return (lr, 1 - self.beta_1, 1 - self.beta_2, u_t1, 1 - u_t, 1 - u_product_t,
                1 - u_product_t1, 1 - self.beta_2 ** t, self.epsilon)


class Ftrl(FusedOptimizer):
    """FTRL-proximal (McMahan et al., 2013), Keras 3's form with l2_eff = l2 + beta/(2*lr):

    g~ = g + 2*l2_shrinkage*p;  n' = n + g^2;
    z <- z + g~ - ((n'^-lrp - n^-lrp)/lr)*p;
    p <- (clip(z, -l1, l1) - z)/(n'^-lrp/lr + 2*l2_eff);  n <- n'
    """

    rule = "ftrl"
    learning_rate_power = Hyperparameter(check.real, high=0.0)
    initial_accumulator_value = Hyperparameter(check.non_negative)
    l1_regularization_strength = Hyperparameter(check.non_negative)
    l2_regularization_strength = Hyperparameter(check.non_negative)
    l2_shrinkage_regularization_strength = Hyperparameter(check.non_negative)
    beta = Hyperparameter(check.non_negative)

    def __init__(self, learning_rate=0.001, learning_rate_power=-0.5,
                 initial_accumulator_value=0.1, l1_regularization_strength=0.0,
                 l2_regularization_strength=0.0, l2_shrinkage_regularization_strength=0.0,
                 beta=0.0, **kwargs):
        super().__init__(
            learning_rate, learning_rate_power=learning_rate_power,
            initial_accumulator_value=initial_accumulator_value,
            l1_regularization_strength=l1_regularization_strength,
            l2_regularization_strength=l2_regularization_strength,
            l2_shrinkage_regularization_strength=l2_shrinkage_regularization_strength,
            beta=beta, **kwargs)

    def _check_learning_rate_value(self, lr):
        if lr <= 0:
            raise ValueError(f"Ftrl divides by the learning rate: `learning_rate` must be > 0, got {lr!r}")

    def _slot_specs(self):
        return ("accumulator", self.initial_accumulator_value), ("linear", 0.0)

    def _rule_scalars(self, lr, t):
        l2_eff = self.l2_regularization_strength + self.beta / (2.0 * lr)
        return (lr, self.learning_rate_power, self.l1_regularization_strength, l2_eff,
                2 * self.l2_shrinkage_regularization_strength)


class Lion(FusedOptimizer):
    """Lion (Chen et al., 2023): the sign of an interpolated momentum.

    p <- p - lr*sign(beta_1*m + (1-beta_1)*g);  m <- beta_2*m + (1-beta_2)*g
    """

    rule = "lion"
    # Keras refuses beta_1 = 0 (Lion degenerates to signSGD); betas are < 1 here.
    beta_1 = Hyperparameter(check.real, low=0.0, high=1.0, low_open=True, high_open=True)
    beta_2 = Hyperparameter(check.beta)

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.99, **kwargs):
        super().__init__(learning_rate, beta_1=beta_1, beta_2=beta_2, **kwargs)

    def _slot_specs(self):
        return (("momentum", 0.0),)

    def _rule_scalars(self, lr, t):
        return lr, self.beta_1, 1 - self.beta_1, self.beta_2, 1 - self.beta_2


class ScheduleFreeAdamW(FusedOptimizer):
    """Schedule-Free AdamW (Defazio et al., 2024), Keras 3's form. The params hold y,
    the point gradients are taken at; the `momentum` slot is the SGD sequence z and
    starts as a copy of the params; the average x = (y - (1-beta_1)*z)/beta_1 is not
    stored. With t = iterations + 1 and lr' = lr*min(t/warmup_steps, 1):

    v <- v + (g^2-v)(1-beta_2);  z' = z - lr'*g/(sqrt(v/(1-beta_2^t)) + eps);
    x' = (1-1/t)*x + z'/t;  y <- (1-beta_1)*z' + beta_1*x'
    """

    rule = "schedule_free_adamw"
    # x is recovered from y by dividing by beta_1: Keras gives NaN at beta_1 = 0.
    beta_1 = Hyperparameter(check.real, low=0.0, high=1.0, low_open=True, high_open=True)
    beta_2 = Hyperparameter(check.beta)
    epsilon = Hyperparameter(check.non_negative)
    warmup_steps = Hyperparameter(check.integer, low=0)

    def __init__(self, learning_rate=0.0025, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 warmup_steps=0, **kwargs):
        super().__init__(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         warmup_steps=warmup_steps, **kwargs)

    def _slot_specs(self):
        return ("momentum", PARAMS), ("velocity", 0.0)

    def _rule_scalars(self, lr, t):
        if self.warmup_steps:
            lr = lr * min(t / self.warmup_steps, 1.0)
        weight = 1.0 / t
        return (lr, self.beta_1, 1 - self.beta_1, 1 - self.beta_2, 1 - self.beta_2 ** t,
                self.epsilon, weight, 1 - weight)


class Lamb(FusedOptimizer):
    """LAMB (You et al., 2020), Keras 3's form: Adam's direction scaled per variable
    (per segment) by the trust ratio ||p||/||r||, 1 unless both norms are > 0.

    m <- m + (g-m)(1-beta_1);  v <- v + (g^2-v)(1-beta_2);
    r = (m/(1-beta_1^t))/(sqrt(v/(1-beta_2^t)) + eps);  p <- p - ratio*lr*r
    """

    rule = "lamb"
    whole_variable = True
    beta_1 = Hyperparameter(check.beta)
    beta_2 = Hyperparameter(check.beta)
    epsilon = Hyperparameter(_epsilon)

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7, **kwargs):
        super().__init__(learning_rate, beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                         **kwargs)

    def _slot_specs(self):
        return ("momentum", 0.0), ("velocity", 0.0)

    def _rule_scalars(self, lr, t):
        return (lr, 1 - self.beta_1, 1 - self.beta_2, 1 - self.beta_1 ** t,
                1 - self.beta_2 ** t, self.epsilon)


class Adafactor(FusedOptimizer):
    """Adafactor (Shazeer & Stern, 2018), Keras 3's form. Variables of rank >= 2 keep
    row and column statistics of their last two axes (slots `r` and `c`, which are
    not the size of the params: see reference.factored_shapes) and rebuild the full
    second moment `velocity` from them each step; smaller ones keep `velocity` only.

    rho = min(lr, 1/sqrt(t));  alpha = max(epsilon_2, rms(p))*rho;
    beta = 1 - t^beta_2_decay;  u = g/sqrt(v);  p <- p - alpha*u/max(1, rms(u)/clip_threshold)
    `relative_step` is kept for Keras' config: Keras applies min(lr, 1/sqrt(t)) in
    rho whether it is set or not. The host and CUDA executors run it as passes with
    per-row, per-column and per-variable sums between them (kernels/adafactor.cu).
    """

    rule = "adafactor"
    whole_variable = True
    # beta_2_decay > 0 would make 1 - t^decay negative from t = 2 on.
    beta_2_decay = Hyperparameter(check.real, high=0.0)
    epsilon_1 = Hyperparameter(check.non_negative)
    epsilon_2 = Hyperparameter(check.non_negative)
    clip_threshold = Hyperparameter(check.real, low=0.0, low_open=True)
    relative_step = Hyperparameter(check.boolean)

    def __init__(self, learning_rate=0.001, beta_2_decay=-0.8, epsilon_1=1e-30, epsilon_2=1e-3,
                 clip_threshold=1.0, relative_step=True, **kwargs):
        super().__init__(learning_rate, beta_2_decay=beta_2_decay, epsilon_1=epsilon_1,
                         epsilon_2=epsilon_2, clip_threshold=clip_threshold,
                         relative_step=relative_step, **kwargs)

    def _slot_specs(self):
        return ("r", 0.0, ROWS), ("c", 0.0, COLUMNS), ("velocity", 0.0)

    @staticmethod
    def _kernel_segments(shapes, offsets):
        """For the host and CUDA executors: the segment table of kernels/adafactor.cuh, as
        float64 (exact for these integers), 6 values per segment and a row of totals:
        element offset, rows R (-1: not factored), columns C, and where the segment's
        entries start in the r slot, the c slot (the NumPy executor's flat slots:
        reference.slot_shapes) and the kernels' scratch of row means (one per leading
        index, prod(shape[:-2]))."""
        table, r, c, lead = [], 0, 0, 0
        for shape, offset in zip(shapes, offsets):
            shape = tuple(shape)
            if len(shape) < 2:
                table.append((offset, -1, 0, r, c, lead))
                continue
            rows, cols, leading = shape[-2], shape[-1], math.prod(shape[:-2])
            table.append((offset, rows, cols, r, c, lead))
            r, c, lead = r + leading * rows, c + leading * cols, lead + leading
        table.append((offsets[len(shapes)], -1, 0, r, c, lead))
        return np.asarray(table, dtype=np.float64).ravel()

    def _rule_scalars(self, lr, t):
        beta = 1 - t ** self.beta_2_decay
        return (min(lr, 1 / math.sqrt(t)), beta, 1 - beta, self.epsilon_1, self.epsilon_2,
                self.clip_threshold)


def _regex_list(name, value):
    """Keras' `exclude_layers or []`: a list of regular expressions."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise TypeError(f"`{name}` must be a list of regular expressions, got "
                        f"{type(value).__name__}: {value!r}")
    for pattern in value:
        if not isinstance(pattern, str):
            raise TypeError(f"`{name}` must hold strings, got {type(pattern).__name__}")
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"`{name}`: {pattern!r} is not a regular expression: {e}") from e
    return list(value)


def _names(name, value):
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or \
            not all(isinstance(n, str) for n in value):
        raise TypeError(f"`{name}` must be a list of strings, got {value!r}")
    return tuple(value)


class Muon(FusedOptimizer):
    """Muon (Jordan et al., 2024), Keras 3's form: Newton-Schulz-orthogonalised
    momentum for 2-D variables, AdamW for the rest. Per variable (segment):

    2-D, not excluded:  m <- m + (g + m*(momentum-1));  d = g + momentum*m (nesterov) or m;
                        p <- p - lr*NS(d)*sqrt(max(rows, cols))*rms_rate
    otherwise:          Adam with lr*adam_lr_ratio, betas adam_beta_1/2
    Weight decay is weight_decay on Muon variables and adam_weight_decay on AdamW ones.

    Keras excludes variables by their path: "embedding" in it (exclude_embeddings) or
    a match of a regex of exclude_layers. A segment's name is the FlatBuffer's
    (`FlatBuffer(..., names=...)`), or `segment_names` (fusedopt's own, one name per
    segment, kept in the config) when given; a segment without a name is never
    excluded by name, and exclude_layers without any names is refused at build().
    """

    rule = "muon"
    whole_variable = True
    adam_beta_1 = Hyperparameter(check.beta)
    adam_beta_2 = Hyperparameter(check.beta)
    epsilon = Hyperparameter(_epsilon)
    exclude_layers = Hyperparameter(_regex_list)
    muon_a = Hyperparameter(check.real)
    muon_b = Hyperparameter(check.real)
    muon_c = Hyperparameter(check.real)
    adam_lr_ratio = Hyperparameter(check.non_negative)
    momentum = Hyperparameter(check.beta)
    ns_steps = Hyperparameter(check.integer, low=0)
    nesterov = Hyperparameter(check.boolean)
    exclude_embeddings = Hyperparameter(check.boolean)
    adam_weight_decay = Hyperparameter(check.optional_real, low=0.0)
    rms_rate = Hyperparameter(check.optional_real, low=0.0)
    segment_names = Hyperparameter(_names)

    def __init__(self, learning_rate=0.001, adam_beta_1=0.9, adam_beta_2=0.999,
                 adam_weight_decay=0.004, epsilon=1e-7, weight_decay=0.004, exclude_layers=None,
                 exclude_embeddings=True, muon_a=3.4445, muon_b=-4.7750, muon_c=2.0315,
                 adam_lr_ratio=1, momentum=0.95, ns_steps=5, nesterov=True, rms_rate=0.2,
                 segment_names=None, **kwargs):
        super().__init__(
            learning_rate, weight_decay=weight_decay, adam_beta_1=adam_beta_1,
            adam_beta_2=adam_beta_2, adam_weight_decay=adam_weight_decay, epsilon=epsilon,
            exclude_layers=exclude_layers, exclude_embeddings=exclude_embeddings,
            muon_a=muon_a, muon_b=muon_b, muon_c=muon_c, adam_lr_ratio=adam_lr_ratio,
            momentum=momentum, ns_steps=ns_steps, nesterov=nesterov, rms_rate=rms_rate,
            segment_names=segment_names, **kwargs)

    def get_config(self):
        config = super().get_config()
        if self.segment_names is None:  # fusedopt's own: absent from Keras' configs
            del config["segment_names"]
        else:
            config["segment_names"] = list(self.segment_names)
        return config

    def build(self, params):
        if not self.built:
            count = len(params.shapes) if hasattr(params, "shapes") else 1
            if self.segment_names is not None and count != len(self.segment_names):
                raise ValueError(f"`segment_names` names {len(self.segment_names)} segments, "
                                 f"but `params` has {count}")
            if self.exclude_layers and self.segment_names is None and \
                    getattr(params, "names", None) is None:
                raise ValueError("`exclude_layers` matches variable names, but the segments "
                                 "have none: build the FlatBuffer with names=, or pass "
                                 "`segment_names`")
        super().build(params)

    def _names(self):
        return self.segment_names if self.segment_names is not None else self._buffer_names

    def uses_adamw(self, index, shape):
        """Whether segment `index` (of `shape`) takes the AdamW step (Keras'
        Muon._should_use_adamw, on the segment's name when it has one)."""
        if len(shape) != 2:
            return True
        names = self._names()
        if names is None:
            return False
        name = names[index]
        if self.exclude_embeddings and "embedding" in name.lower():
            return True
        return any(re.search(pattern, name) for pattern in self.exclude_layers)

    def _segment_arguments(self, index, shape):
        rms_scale = 1.0
        if self.rms_rate is not None and len(shape) == 2:
            rms_scale = math.sqrt(max(shape)) * self.rms_rate
        return self.uses_adamw(index, shape), rms_scale

    def _segment_weight_decay(self, index, shape):
        return self.adam_weight_decay if self.uses_adamw(index, shape) else self.weight_decay

    def _slot_specs(self):
        # The velocity is read by AdamW segments only; Muon segments keep zeros there.
        return ("momentum", 0.0), ("velocity", 0.0)

    def _device_hyperparameters(self):
        """kernels/muon.cuh's order; the names and shapes reach the kernels as each
        segment's value (_kernel_segments), not here."""
        return (self.adam_beta_1, self.adam_beta_2, self.epsilon, self.muon_a, self.muon_b,
                self.muon_c, float(self.adam_lr_ratio), self.momentum, float(self.ns_steps),
                float(self.nesterov),
                -1.0 if self.adam_weight_decay is None else float(self.adam_weight_decay))

    def _kernel_segments(self, shapes, offsets):
        """For the host and CUDA executors: each segment's value for the kernels (its
        rms scale for a Muon segment, -1 for an AdamW one) and the (start, stop, shape)
        of the non-empty Muon segments, which Newton-Schulz orthogonalises."""
        values, matrices = [], []
        for index, shape in enumerate(shapes):
            use_adamw, rms_scale = self._segment_arguments(index, tuple(shape))
            values.append(-1.0 if use_adamw else float(rms_scale))
            if not use_adamw and offsets[index + 1] > offsets[index]:
                matrices.append((int(offsets[index]), int(offsets[index + 1]), tuple(shape)))
        return values, matrices

    def _orthogonalise(self, d, matrices):
        """d <- newton_schulz(d) on each Muon segment, in place: matrix products of the
        buffer's array library (NumPy on the host; CuPy, so cuBLAS, on the GPU: queued
        on the current stream, no host sync)."""
        dt = d.dtype.type
        for start, stop, shape in matrices:
            d[start:stop] = reference.newton_schulz(
                d[start:stop].reshape(shape), int(self.ns_steps), dt(self.muon_a),
                dt(self.muon_b), dt(self.muon_c)).ravel()

    def _rule_scalars(self, lr, t):
        b1, b2 = self.adam_beta_1, self.adam_beta_2
        alpha = lr * self.adam_lr_ratio * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        return (lr, self.momentum, float(self.nesterov), self.ns_steps, self.muon_a,
                self.muon_b, self.muon_c, alpha, 1 - b1, 1 - b2, self.epsilon)
