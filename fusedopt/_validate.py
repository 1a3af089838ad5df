"""Argument checks shared by optimizers, schedules and buffers.

Every check names the argument and the allowed range, and runs before anything is
touched, so a bad call never leaves a buffer or a counter half-updated.
"""

import math
import numbers

import numpy as np


def real(name, value, *, low=None, high=None, low_open=False, high_open=False):
    """Return `value` as a Python float after checking type, finiteness and range.

    Ints are accepted where Keras demands a float (learning_rate=1, momentum=0);
    bools are refused because `momentum=True` is always a mistake.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{name}` must be a real number, got {type(value).__name__}: {value!r}"
        )
    value = float(value)
    if not math.isfinite(value):
        where = "" if low is None and high is None else \
            f" and in {_interval(low, high, low_open, high_open)}"
        raise ValueError(f"`{name}` must be finite{where}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"`{name}` must be in {_interval(low, high, low_open, high_open)}, got {value!r}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"`{name}` must be in {_interval(low, high, low_open, high_open)}, got {value!r}")
    return value


def optional_real(name, value, **bounds):
    """`real`, but None passes through (an option that is off)."""
    return None if value is None else real(name, value, **bounds)


def integer(name, value, *, low=None):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}: {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {value!r}")
    return value


def boolean(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {type(value).__name__}: {value!r}")
    return bool(value)


def string(name, value):
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a string, got {type(value).__name__}: {value!r}")
    return value


def beta(name, value):
    """Decay rates (betas, rho): a weight on the past, in [0, 1)."""
    return real(name, value, low=0.0, high=1.0, high_open=True)


def non_negative(name, value):
    return real(name, value, low=0.0)


def _interval(low, high, low_open, high_open):
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    lo = "-inf" if low is None else repr(low)
    hi = "inf" if high is None else repr(high)
    if high is None:
        right = ")"
    if low is None:
        left = "("
    return f"{left}{lo}, {hi}{right}"
