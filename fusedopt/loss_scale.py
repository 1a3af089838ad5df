"""LossScaleOptimizer: Keras 3's dynamic loss scaling around any fusedopt optimizer.

    opt = fusedopt.LossScaleOptimizer(fusedopt.Adam(), initial_scale=2**15)
    loss = opt.scale_loss(loss)          # backward pass on the scaled loss
    opt.apply(grads, params)             # unscale, step or skip, update the scale

A step whose gradients are all finite divides them by the scale and runs the inner
optimizer; after `dynamic_growth_steps` such steps in a row the scale doubles. A step
with any inf or NaN gradient is skipped (params, slots and the inner iterations stay
as they were) and halves the scale. The scale is float32, as Keras keeps it.

The inner optimizer does the work with its own machinery, on every executor: it
runs with skip_nonfinite (its executor checks the gradients in the pass that reads
them, and counts the skip in its counters), and its step state holds the scale and
its counter next to those counters (kernels/step.cuh: StepState.loss_scale and
scale_counter; reference.ReferencePlan for the NumPy executor). The step unscales by
the scale and updates it itself, so on a GPU a step never waits for the host and a
captured step (cuda_graph) replays the scale's growth and backoff. Reading
`dynamic_scale` or `step_counter` there is a sync, asked for, never per step;
`scale_loss` of a CuPy loss multiplies by the scale on the device. Rules with kernels
of their own (Lamb, Adafactor, Muon) do the same in those kernels (kernels/whole.cuh,
muon.cu, whole_host.cpp, muon_host.cpp).

A dynamic scale of 0 (after some 165 non-finite steps in a row in float32) would make
every gradient inf or NaN: such a step is skipped like a non-finite one.

state_dict, load_state_dict and checkpoints carry the scale and its counter as two
slots of one element each (the counter in float64, which holds every integer below
2**53 and which both checkpoint containers store).
"""

import numpy as np

from . import _validate as check
from . import cuda
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
        inner._dynamic_growth_steps = self.dynamic_growth_steps
        if inner.built:  # a new plan for it, chosen with the wrapper's settings
            inner.executor = inner.executor
        self.inner_optimizer = inner
        self._write_scale(float(np.float32(self.initial_scale)), 0)
        inner._hyperparameters_changed(None)  # a built inner plan learns the growth steps

    # ------------------------------------------------------------ the scale
    def _read_scale(self):
        """(scale, counter) from where the step state lives (a GPU read syncs)."""
        inner = self.inner_optimizer
        if inner._plan is not None:
            return inner._plan.read_loss_scale()
        return inner._loss_scale_state

    def _write_scale(self, scale, counter):
        inner = self.inner_optimizer
        if inner._plan is not None:
            inner._plan.write_loss_scale(scale, counter)
        else:
            inner._loss_scale_state = (float(np.float32(scale)), int(counter))

    @property
    def dynamic_scale(self):
        """The current loss scale (the initial one before the first step)."""
        return float(self._read_scale()[0])

    @property
    def step_counter(self):
        """Finite steps since the scale last changed."""
        return int(self._read_scale()[1])

    def scale_loss(self, loss):
        """loss * the current scale: differentiate this, then apply(). A CuPy loss on
        the GPU executor is multiplied by the scale on the device (no sync)."""
        plan = self.inner_optimizer._plan
        if cuda.is_gpu_array(loss) and getattr(plan, "name", None) == "cuda":
            return loss * plan.loss_scale_view()[0].astype(loss.dtype)
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
        return self.inner_optimizer.built

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
        """The inner optimizer's (live) slots, and copies of the scale and its counter."""
        if not self.built:
            return {}
        return {**self.inner_optimizer.slots(), **dict(zip(_OWN_SLOTS, self._own_arrays()))}

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
        self.inner_optimizer.build(params)

    def apply(self, grads, params):
        """Unscale and step, or skip a step with non-finite gradients; then update the
        scale: all inside the inner optimizer's step (on a GPU, on the device). Every
        argument is checked (by the inner optimizer) before anything changes."""
        self.inner_optimizer.apply(grads, params)

    def cuda_graph(self, grads, params):
        """The inner optimizer's captured step: each replay unscales by the device's
        scale and updates it, as apply() does."""
        return self.inner_optimizer.cuda_graph(grads, params)

    # ------------------------------------------------------------ state
    def state_dict(self):
        state = self.inner_optimizer.state_dict()
        state["optimizer"] = "lossscaleoptimizer"
        state["inner_optimizer"] = type(self.inner_optimizer).__name__.lower()
        state["slots"].update(zip(_OWN_SLOTS, self._own_arrays()))
        return state

    def _own_arrays(self):
        scale, counter = self._read_scale()
        return [np.array([scale], np.float32), np.array([counter], np.float64)]

    def load_state_dict(self, state):
        inner_state, own = self._parse_state(state)
        self.inner_optimizer.load_state_dict(inner_state)
        self._write_scale(float(own[0][0]), int(own[1][0]))

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
