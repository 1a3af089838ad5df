"""Learning-rate schedules with Keras 3's names, arguments and formulas.

A schedule is called with the optimizer's iteration counter before it is
incremented (0 on the first step) and returns a Python float. Arithmetic is done in
float64 on the host; the optimizer casts the result to the buffer's dtype.
"""

import math

from . import _validate as check

__all__ = [
    "LearningRateSchedule",
    "ExponentialDecay",
    "InverseTimeDecay",
    "PiecewiseConstantDecay",
    "PolynomialDecay",
    "CosineDecay",
    "CosineDecayRestarts",
    "serialize",
    "deserialize",
]


class LearningRateSchedule:
    """Base class: subclasses implement `__call__(step)` and `get_config()`."""

    def __call__(self, step):
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(step)")

    def get_config(self):
        raise NotImplementedError(f"{type(self).__name__} must implement get_config()")

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    __hash__ = object.__hash__


def _decay_steps(name, value):
    check.real(name, value)
    if value <= 0:
        raise ValueError(f"`{name}` must be > 0, got {value!r}")
    return value


class _RateDecay(LearningRateSchedule):
    """Shared by the two schedules driven by decay_rate and step / decay_steps."""

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase, name):
        self.initial_learning_rate = check.real("initial_learning_rate", initial_learning_rate)
        self.decay_steps = _decay_steps("decay_steps", decay_steps)
        # A negative rate gives complex rates (exponential) or a pole (inverse time).
        self.decay_rate = check.real("decay_rate", decay_rate, low=0.0)
        self.staircase = check.boolean("staircase", staircase)
        self.name = name

    def _progress(self, step):
        """step / decay_steps, floored if staircase."""
        p = float(step) / float(self.decay_steps)
        return math.floor(p) if self.staircase else p

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "decay_rate": self.decay_rate,
            "staircase": self.staircase,
            "name": self.name,
        }


class ExponentialDecay(_RateDecay):
    """lr0 * decay_rate ** (step / decay_steps), the exponent floored if staircase."""

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False,
                 name="ExponentialDecay"):
        super().__init__(initial_learning_rate, decay_steps, decay_rate, staircase, name)

    def __call__(self, step):
        return self.initial_learning_rate * float(self.decay_rate) ** self._progress(step)


class InverseTimeDecay(_RateDecay):
    """lr0 / (1 + decay_rate * step / decay_steps), the ratio floored if staircase."""

    def __init__(self, initial_learning_rate, decay_steps, decay_rate, staircase=False,
                 name="InverseTimeDecay"):
        super().__init__(initial_learning_rate, decay_steps, decay_rate, staircase, name)

    def __call__(self, step):
        return self.initial_learning_rate / (1.0 + float(self.decay_rate) * self._progress(step))


class PiecewiseConstantDecay(LearningRateSchedule):
    """values[0] while step <= boundaries[0], values[i] while boundaries[i-1] < step <=
    boundaries[i], values[-1] after the last boundary."""

    def __init__(self, boundaries, values, name="PiecewiseConstant"):
        boundaries, values = list(boundaries), list(values)
        if len(boundaries) != len(values) - 1:
            raise ValueError(
                "`boundaries` must have one element fewer than `values`, got "
                f"{len(boundaries)} boundaries and {len(values)} values"
            )
        for b in boundaries:
            check.real("boundaries", b)
        if any(b1 < b0 for b0, b1 in zip(boundaries, boundaries[1:])):
            raise ValueError(f"`boundaries` must be non-decreasing, got {boundaries}")
        for v in values:
            check.real("values", v)
        self.boundaries = boundaries
        self.values = values
        self.name = name

    def __call__(self, step):
        for boundary, value in zip(self.boundaries, self.values):
            if step <= boundary:
                return float(value)
        return float(self.values[-1])

    def get_config(self):
        return {"boundaries": self.boundaries, "values": self.values, "name": self.name}


class PolynomialDecay(LearningRateSchedule):
    """(lr0 - end) * (1 - s/D)**power + end with s = min(step, D); with cycle, D grows
    to the first multiple of decay_steps past step."""

    def __init__(self, initial_learning_rate, decay_steps, end_learning_rate=0.0001,
                 power=1.0, cycle=False, name="PolynomialDecay"):
        self.initial_learning_rate = check.real("initial_learning_rate", initial_learning_rate)
        self.decay_steps = _decay_steps("decay_steps", decay_steps)
        self.end_learning_rate = check.real("end_learning_rate", end_learning_rate)
        # (1 - p)**power with p = 1 at the end of the decay: a negative power divides by 0.
        self.power = check.real("power", power, low=0.0)
        self.cycle = check.boolean("cycle", cycle)
        self.name = name

    def __call__(self, step):
        step = float(step)
        decay_steps = float(self.decay_steps)
        if self.cycle:
            multiplier = 1.0 if step == 0 else math.ceil(step / self.decay_steps)
            decay_steps = decay_steps * multiplier
        else:
            step = min(step, decay_steps)
        p = step / decay_steps
        return (self.initial_learning_rate - self.end_learning_rate) * (1 - p) ** self.power \
            + self.end_learning_rate

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "end_learning_rate": self.end_learning_rate,
            "power": self.power,
            "cycle": self.cycle,
            "name": self.name,
        }


class CosineDecay(LearningRateSchedule):
    """Cosine decay from lr0 (or, after a linear warmup from lr0, from warmup_target)
    to alpha times that value over decay_steps."""

    def __init__(self, initial_learning_rate, decay_steps, alpha=0.0, name="CosineDecay",
                 warmup_target=None, warmup_steps=0):
        self.initial_learning_rate = check.real("initial_learning_rate", initial_learning_rate)
        self.decay_steps = _decay_steps("decay_steps", decay_steps)
        self.alpha = check.real("alpha", alpha)
        self.name = name
        self.warmup_target = check.optional_real("warmup_target", warmup_target)
        self.warmup_steps = check.real("warmup_steps", warmup_steps, low=0.0)

    def _decay(self, step, decay_from):
        cosine = 0.5 * (1.0 + math.cos(math.pi * (step / float(self.decay_steps))))
        return decay_from * ((1 - self.alpha) * cosine + self.alpha)

    def __call__(self, step):
        step = float(step)
        if self.warmup_target is None:
            return self._decay(min(step, float(self.decay_steps)), self.initial_learning_rate)
        step = min(step, float(self.decay_steps) + float(self.warmup_steps))
        if step < self.warmup_steps:
            delta = self.warmup_target - self.initial_learning_rate
            return delta * (step / float(self.warmup_steps)) + self.initial_learning_rate
        return self._decay(step - float(self.warmup_steps), self.warmup_target)

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "decay_steps": self.decay_steps,
            "alpha": self.alpha,
            "name": self.name,
            "warmup_target": self.warmup_target,
            "warmup_steps": self.warmup_steps,
        }


class CosineDecayRestarts(LearningRateSchedule):
    """SGDR: cosine decay that restarts after first_decay_steps, each period t_mul
    times longer and its peak m_mul times lower."""

    def __init__(self, initial_learning_rate, first_decay_steps, t_mul=2.0, m_mul=1.0,
                 alpha=0.0, name="SGDRDecay"):
        self.initial_learning_rate = check.real("initial_learning_rate", initial_learning_rate)
        self.first_decay_steps = _decay_steps("first_decay_steps", first_decay_steps)
        # Periods that shrink (t_mul < 1) add up to a finite time, after which the
        # restart index is undefined.
        self._t_mul = check.real("t_mul", t_mul, low=1.0)
        self._m_mul = check.real("m_mul", m_mul)
        self.alpha = check.real("alpha", alpha)
        self.name = name

    def __call__(self, step):
        fraction = float(step) / float(self.first_decay_steps)
        t_mul = self._t_mul
        if t_mul == 1.0:
            i_restart = math.floor(fraction)
            fraction -= i_restart
        else:
            i_restart = math.floor(math.log(1.0 - fraction * (1.0 - t_mul)) / math.log(t_mul))
            # The ratio of logs can land a hair under an integer exactly at a restart
            # (log(243)/log(3) = 4.999...): make i the last period that has started.
            periods = lambda i: (1.0 - t_mul ** i) / (1.0 - t_mul)  # noqa: E731
            if periods(i_restart + 1) <= fraction:
                i_restart += 1
            elif periods(i_restart) > fraction:
                i_restart -= 1
            sum_r = periods(i_restart)
            fraction = (fraction - sum_r) / t_mul ** i_restart
        m_fac = self._m_mul ** i_restart
        cosine = 0.5 * m_fac * (1.0 + math.cos(math.pi * fraction))
        return self.initial_learning_rate * ((1 - self.alpha) * cosine + self.alpha)

    def get_config(self):
        return {
            "initial_learning_rate": self.initial_learning_rate,
            "first_decay_steps": self.first_decay_steps,
            "t_mul": self._t_mul,
            "m_mul": self._m_mul,
            "alpha": self.alpha,
            "name": self.name,
        }


# Keras' six schedules: closed-form functions of the step that the kernels also
# compute (kernels/step.cuh), so a step's rate never comes from the host.
BUILTIN = (ExponentialDecay, InverseTimeDecay, PiecewiseConstantDecay, PolynomialDecay,
           CosineDecay, CosineDecayRestarts)
_SCHEDULES = {cls.__name__: cls for cls in BUILTIN}


def serialize(schedule):
    """The Keras 3 serialized form: {"module", "class_name", "config", "registered_name"}."""
    if not isinstance(schedule, LearningRateSchedule):
        raise TypeError(f"`schedule` must be a LearningRateSchedule, got {type(schedule).__name__}")
    return {
        "module": "keras.optimizers.schedules",
        "class_name": type(schedule).__name__,
        "config": schedule.get_config(),
        "registered_name": None,
    }


def deserialize(config):
    """A schedule from `serialize`'s output (also what Keras' get_config() writes)."""
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(f"a serialized schedule must be a dict with 'class_name', got {config!r}")
    name = config["class_name"]
    if name not in _SCHEDULES:
        raise ValueError(
            f"unknown learning-rate schedule {name!r}; valid: {', '.join(sorted(_SCHEDULES))}"
        )
    return _SCHEDULES[name].from_config(dict(config.get("config", {})))
