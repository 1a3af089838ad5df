"""LossScaleOptimizer: Keras 3's dynamic loss scaling around any fusedopt optimizer.

    opt = fusedopt.LossScaleOptimizer(fusedopt.Adam(), initial_scale=2**15)
    loss = opt.scale_loss(loss)          # backward pass on the scaled loss
    opt.apply(grads, params)             # unscale, step or skip, update the scale

A step whose gradients are all finite divides them by the scale and runs the inner
optimizer; after `dynamic_growth_steps` such steps in a row the scale doubles. A step
with any inf or NaN gradient is skipped (params, slots and the inner iterations stay
as they were) and halves the scale. The scale is float32, as Keras keeps it.

The inner optimizer does the work with its own machinery: it runs with
skip_nonfinite (its executor checks the gradients in the pass that reads them, and
counts the skip in its counters) and with loss_scale_factor = the scale (its
prologue unscales). The scale and its counter are state slots of one element each,
so state_dict, load_state_dict and checkpoints carry them (the counter in float64,
which holds every integer below 2**53 and which both checkpoint containers store).
"""

import numpy as np

from . import _validate as check
from . import cuda, reference
from .flat import FlatBuffer
from .optimizer import _WRAPPERS, FusedOptimizer, get

# Keras' base-optimizer arguments and their defaults: the wrapper refuses any other
# value (they belong on the inner optimizer), as Keras does.
_BASE_DEFAULTS = {
    "weight_decay": None, "clipnorm": None, "global_clipnorm": None, "clipvalue": None,
    "use_ema": False, "ema_momentum": 0.99, "ema_overwrite_frequency": None,
    "loss_scale_factor": None, "gradient_accumulation_steps": None,
}
_OWN_SLOTS = ("dynamic_scale", "step_counter")


class LossScaleOptimizer(FusedOptimizer):
    """Dynamic loss scaling (Keras 3's LossScaleOptimizer) around `inner_optimizer`.

    Args:
        inner_optimizer: the fusedopt optimizer to wrap (or its config dict). It must
            not have a loss_scale_factor of its own, and must not have stepped yet
            unless it was built with skip_nonfinite=True.
        initial_scale: the first loss scale (> 0); Keras' default 2**15.
        dynamic_growth_steps: finite steps in a row after which the scale doubles.
        name: a name for the optimizer.
    `iterations`, `learning_rate` and the EMA methods are the inner optimizer's.
    """

    def __init__(self, inner_optimizer, initial_scale=2.0 ** 15, dynamic_growth_steps=2000,
                 name=None, **kwargs):
        if not kwargs.pop("dynamic", True):
            raise ValueError("LossScaleOptimizer has no `dynamic=False`: set "
                             "`loss_scale_factor` on the optimizer itself instead")
        for arg, default in _BASE_DEFAULTS.items():
            if arg in kwargs and kwargs.pop(arg) != default:
                raise ValueError(f"LossScaleOptimizer does not support `{arg}`; set `{arg}` "
                                 "on the `inner_optimizer`")
        if kwargs:
            raise ValueError(f"LossScaleOptimizer got unknown argument(s) {sorted(kwargs)}; "
                             "valid arguments: inner_optimizer, initial_scale, "
                             "dynamic_growth_steps, name")
        inner = get(inner_optimizer) if isinstance(inner_optimizer, dict) else inner_optimizer
        if not isinstance(inner, FusedOptimizer) or isinstance(inner, LossScaleOptimizer):
            raise TypeError("`inner_optimizer` must be a fusedopt optimizer (not a "
                            f"LossScaleOptimizer), got {type(inner_optimizer).__name__}")
        if inner.loss_scale_factor is not None:
            raise ValueError("`inner_optimizer` has loss_scale_factor="
                             f"{inner.loss_scale_factor!r}; the LossScaleOptimizer sets the "
                             "scale: build the inner optimizer without it")
        if inner.built and not inner.skip_nonfinite:
            raise ValueError("`inner_optimizer` has already stepped without skip_nonfinite; "
                             "wrap it before its first step (or build it with "
                             "skip_nonfinite=True)")
        self.initial_scale = check.real("initial_scale", initial_scale, low=0.0, low_open=True)
        self.dynamic_growth_steps = check.integer("dynamic_growth_steps", dynamic_growth_steps,
                                                  low=1)
        self.name = "loss_scale_optimizer" if name is None else name
        inner._skip_nonfinite = True  # a non-finite step is skipped, as in Keras
        self.inner_optimizer = inner
        self._scale = None  # [dynamic_scale] (float32) and [step_counter] (float64) once built
        self._pending_scale = None

    # ------------------------------------------------------------ the scale
    @property
    def dynamic_scale(self):
        """The current loss scale (the initial one before the first step)."""
        if self._scale is not None:
            return float(cuda.to_device(self._scale[0], "cpu")[0])
        if self._pending_scale is not None:
            return float(self._pending_scale[0][0])
        return float(np.float32(self.initial_scale))

    @property
    def step_counter(self):
        """Finite steps since the scale last changed."""
        if self._scale is not None:
            return int(cuda.to_device(self._scale[1], "cpu")[0])
        if self._pending_scale is not None:
            return int(self._pending_scale[1][0])
        return 0

    def scale_loss(self, loss):
        """loss * the current scale: differentiate this, then apply()."""
        return loss * self.dynamic_scale

    # ------------------------------------------------------------ delegation
    # The wrapper has no hyperparameters of the base class of its own: these read and
    # set the inner optimizer's, or its own name.
    @property
    def name(self):
        return self._wrapper_name

    @name.setter
    def name(self, value):
        self._wrapper_name = check.string("name", value)

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    @property
    def skipped_steps(self):
        return self.inner_optimizer.skipped_steps

    @property
    def last_step_skipped(self):
        return self.inner_optimizer.last_step_skipped

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, value):
        self.inner_optimizer.learning_rate = value

    @property
    def built(self):
        return self.inner_optimizer.built and self._scale is not None

    @property
    def _layout(self):
        return self.inner_optimizer._layout

    @property
    def _device(self):
        return self.inner_optimizer._device

    @property
    def slot_names(self):
        return self.inner_optimizer.slot_names + _OWN_SLOTS

    def slots(self):
        if not self.built:
            return {}
        return {**self.inner_optimizer.slots(), **dict(zip(_OWN_SLOTS, self._scale))}

    @property
    def executor(self):
        return self.inner_optimizer.executor

    @executor.setter
    def executor(self, value):
        self.inner_optimizer.executor = value

    @property
    def executor_name(self):
        return self.inner_optimizer.executor_name

    def swap_ema_weights(self, params):
        self.inner_optimizer.swap_ema_weights(params)

    def ema_weights(self, params):
        return self.inner_optimizer.ema_weights(params)

    def finalize_variable_values(self, params):
        self.inner_optimizer.finalize_variable_values(params)

    # ------------------------------------------------------------ build and step
    def build(self, params):
        self._check_cpu(params)
        self.inner_optimizer.build(params)
        if self._scale is not None:
            return
        if self._pending_scale is not None:
            scale, counter = self._pending_scale
        else:
            scale = np.array([self.initial_scale], np.float32)
            counter = np.zeros(1, np.float64)
        self._scale = [scale.copy(), counter.copy()]
        self._pending_scale = None

    def apply(self, grads, params):
        """Unscale and step, or skip a step with non-finite gradients; then update the
        scale. Every argument is checked (by the inner optimizer) before anything
        changes."""
        self._check_cpu(params)
        scale, counter = self.dynamic_scale, self.step_counter
        if scale == 0.0:
            raise ValueError("the dynamic loss scale has underflowed to 0 (every recent "
                             "step had non-finite gradients); nothing was changed")
        inner = self.inner_optimizer
        inner.loss_scale_factor = scale
        try:
            inner.apply(grads, params)
        finally:
            inner.loss_scale_factor = None
        self.build(params)
        scale, counter = reference.loss_scale_update(
            np.float32(scale), counter, not inner.last_step_skipped, self.dynamic_growth_steps)
        self._scale[0][0] = scale
        self._scale[1][0] = counter

    def _check_cpu(self, params):
        # The scale is read on the host before each step; on a GPU that would be a
        # synchronisation per step, which fusedopt's CUDA path never does.
        if isinstance(params, FlatBuffer):
            device = params.device
        elif isinstance(params, np.ndarray) or cuda.is_gpu_array(params):
            device = cuda.device_of(params)
        else:
            return  # not a buffer: the inner optimizer names what is wrong
        if device != "cpu":
            raise ValueError("LossScaleOptimizer runs on CPU (NumPy) buffers so far; on "
                             "the GPU the scale is not kept on the device yet")

    # ------------------------------------------------------------ state
    def state_dict(self):
        state = self.inner_optimizer.state_dict()
        state["optimizer"] = "lossscaleoptimizer"
        state["inner_optimizer"] = type(self.inner_optimizer).__name__.lower()
        state["slots"].update(zip(_OWN_SLOTS, (a.copy() for a in self._own_arrays())))
        return state

    def _own_arrays(self):
        if self._scale is not None:
            return self._scale
        if self._pending_scale is not None:
            return self._pending_scale
        return [np.array([self.initial_scale], np.float32), np.zeros(1, np.float64)]

    def load_state_dict(self, state):
        inner_state, own = self._parse_state(state)
        self.inner_optimizer.load_state_dict(inner_state)
        if self._scale is not None:
            self._scale[0][...] = own[0]
            self._scale[1][...] = own[1]
        else:
            self._pending_scale = own

    def _parse_state(self, state):
        """(the inner optimizer's state, [scale, counter]) after checking everything."""
        if not isinstance(state, dict):
            raise TypeError(f"`state` must be a dict from state_dict(), got {type(state).__name__}")
        if state.get("optimizer") != "lossscaleoptimizer":
            raise ValueError(f"`state` comes from optimizer {state.get('optimizer')!r}, this "
                             "is 'lossscaleoptimizer'")
        slots = state.get("slots")
        if not isinstance(slots, dict) or not set(_OWN_SLOTS) <= set(slots):
            raise ValueError(f"`state` lacks the loss scale's slots {list(_OWN_SLOTS)}")
        own = []
        for name, dtype in zip(_OWN_SLOTS, (np.float32, np.float64)):
            arr = np.asarray(cuda.to_device(slots[name], "cpu"))
            if arr.shape != (1,) or arr.dtype != dtype:
                raise ValueError(f"slot {name!r} must be a ({dtype.__name__}) array of one "
                                 f"element, got {arr.dtype} of shape {arr.shape}")
            own.append(arr.copy())
        counter = own[1][0]
        if not (np.isfinite(own[0][0]) and own[0][0] >= 0) or not (
                counter >= 0 and counter == np.floor(counter) and counter < 2 ** 53):
            raise ValueError(f"the saved loss scale {own[0][0]} or counter {own[1][0]} is invalid")
        inner_state = dict(state, optimizer=type(self.inner_optimizer).__name__.lower(),
                           slots={k: v for k, v in slots.items() if k not in _OWN_SLOTS})
        inner_state.pop("inner_optimizer", None)
        self.inner_optimizer._parse_state(inner_state)
        return inner_state, own

    # ------------------------------------------------------------ config
    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": {"class_name": type(self.inner_optimizer).__name__,
                                "config": self.inner_optimizer.get_config()},
            "initial_scale": self.initial_scale,
            "dynamic_growth_steps": self.dynamic_growth_steps,
        }

    @classmethod
    def from_config(cls, config):
        if not isinstance(config, dict):
            raise TypeError(f"`config` must be a dict, got {type(config).__name__}")
        return cls(**config)

    def __repr__(self):
        return (f"LossScaleOptimizer({self.inner_optimizer!r}, initial_scale="
                f"{self.initial_scale!r}, dynamic_growth_steps={self.dynamic_growth_steps!r})")


_WRAPPERS["lossscaleoptimizer"] = LossScaleOptimizer
