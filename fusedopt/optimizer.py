"""FusedOptimizer: validation, the update pipeline, the step counter, state and config.

The pipeline, in Keras 3's order, lives here and nowhere else:

    unscale (1/loss_scale_factor) -> clip (clipnorm per segment | global_clipnorm |
    clipvalue) -> coupled weight decay (g += p*coupled_weight_decay, fusedopt's own) ->
    decoupled weight decay (p -= p*wd*lr) -> the rule -> iterations += 1

A subclass says only what its rule needs: its hyperparameters, its state slots and
the per-step scalars its rule reads (`_rule_scalars`). The rule's math lives in
`kernels/<rule>.cuh` (run by the CUDA and host executors) and `reference.<rule>`
(NumPy, the oracle). Which executor runs a step (fusedopt.executor) is decided by
where the buffers are and what this machine can build; this module holds no
array-library code of its own.
"""

import copy
import math
import numbers
import warnings
from typing import NamedTuple

import numpy as np

from . import _kernels, cuda, precision, schedules
from . import _validate as check
from .segments import SegmentRequest
from . import executor as executors
from .flat import SUPPORTED_DTYPES, FlatBuffer, Layout, _span
from .reference import COLUMNS, PARAMS, ROWS, slot_shapes  # noqa: F401 (slot specs use them)

KERAS_DEFAULT_EPSILON = 1e-7

_REGISTRY = {}
# Optimizers that wrap another (LossScaleOptimizer): get() and checkpoints find them
# by name, but they are not in available() (they cannot be built from a name alone).
_WRAPPERS = {}


class Hyperparameter:
    """An optimizer setting that is checked whenever it is set.

    Declared once on the class (`beta_1 = Hyperparameter(check.beta)`); the
    constructor and an assignment such as `opt.beta_1 = 0.8` both go through
    FusedOptimizer._set_hyperparameters: the same check, the same cross-argument
    rules, nothing stored unless everything passes. The value lives in the instance
    as `_<name>`.

    Args:
        check: a function of (name, value, **bounds) from fusedopt._validate (or of
            the same form) returning the value to store or raising TypeError/ValueError.
        **bounds: passed on to `check` (low=, high=, ...).
    """

    def __init__(self, check, **bounds):
        self._check = check
        self._bounds = bounds

    def __set_name__(self, owner, name):
        self.name = name
        self.storage = "_" + name

    def __get__(self, opt, owner=None):
        if opt is None:
            return self
        return opt.__dict__[self.storage]

    def __set__(self, opt, value):
        opt._set_hyperparameters({self.name: value})

    def validate(self, opt, value):
        """The value to store, or TypeError/ValueError naming the argument."""
        return self._check(self.name, value, **self._bounds)


class _LearningRate(Hyperparameter):
    """`learning_rate`: reads as the rate the next step will use (a schedule or a
    callable evaluated now); set to a number, a callable or a schedule. As in Keras,
    an optimizer created with a schedule refuses a new learning rate."""

    def __init__(self):
        super().__init__(lambda name, value: _check_learning_rate(value))

    def __get__(self, opt, owner=None):
        if opt is None:
            return self
        # Schedules see the calls applied, as in Keras, also under accumulation.
        return opt._learning_rate_at(opt._counters()[0])

    def validate(self, opt, value):
        if isinstance(opt.__dict__.get(self.storage), schedules.LearningRateSchedule):
            raise TypeError(
                "This optimizer was created with a learning-rate schedule; "
                "its learning rate cannot be set to a number"
            )
        return super().validate(opt, value)


class _Name(Hyperparameter):
    """`name`: a string; None means the class name in snake case ("adam_w")."""

    def __init__(self):
        super().__init__(check.string)

    def validate(self, opt, value):
        return super().validate(opt, _snake_case(type(opt).__name__) if value is None else value)


def _hyperparameter_fields(cls):
    """{name: Hyperparameter} of `cls`, base classes' first, in declaration order."""
    fields = {}
    for klass in reversed(cls.__mro__):
        fields.update({k: v for k, v in vars(klass).items() if isinstance(v, Hyperparameter)})
    return fields


class FusedOptimizer:
    """Base class of every fusedopt optimizer.

    Common arguments (Keras 3 names and defaults):
        learning_rate: a number >= 0, a callable of no arguments, or a
            `fusedopt.schedules.LearningRateSchedule` (called with the iteration
            count before the step, 0 on the first step).
        weight_decay: decoupled weight decay, p <- p - p*weight_decay*lr before the rule.
        coupled_weight_decay: fusedopt's own (not Keras'): an L2 term added to the
            clipped gradient, g <- g + coupled_weight_decay*p (from p before any
            decoupled decay), as torch.optim.Adam's `weight_decay`. None (default): off.
        clipnorm: clip each variable's (segment's) gradient to this L2 norm.
        global_clipnorm: clip all gradients together to this global L2 norm.
        clipvalue: clip each gradient element to [-clipvalue, clipvalue].
            At most one of clipnorm, global_clipnorm and clipvalue may be set.
        loss_scale_factor: gradients are divided by it before anything else.
        maximize: fusedopt's own (not Keras'), as torch.optim's `maximize`: the
            gradients are negated in the same first stage (the unscale multiplier is
            -1/loss_scale_factor), so the step climbs the objective. Default False.
        skip_nonfinite: if True, a step whose gradients hold inf or NaN changes
            nothing (params, state and iterations stay as they were) and is counted
            in `skipped_steps`. Default False: NaN propagates, as in Keras.
        name: a name for the optimizer.
        executor: who runs the steps on CPU buffers (fusedopt.executor): "auto"
            (default: the kernels compiled for this CPU, "host", when a C++ compiler
            can build them, else the NumPy reference), "host", or "numpy" (the
            reference). CuPy buffers always run the CUDA kernels ("auto" or "cuda").
        num_threads: threads of the host executor; None (default) uses every core
            this process may run on. Results do not depend on it.
        segment_attributes: per-segment learning-rate multipliers and weight decay
            on/off, as get_config() writes them (see set_segment_attributes and
            exclude_from_weight_decay); None (default): every segment alike.
        master_weights: keep a float32 copy of 16-bit (bfloat16/float16) params as
            the slot "master": the rule updates it and the params receive it rounded
            to nearest, in the same pass. Only for 16-bit params.
        state_dtype: the dtype of the state slots: None (default: float32, float64
            for float64 params), "float32" or "bfloat16" (float64 params: float64).
            Slots are updated in float32 and stored rounded to nearest; so are
            use_ema's `average` and the `gradient_accumulator`. The average is of
            what the model holds after the step (the master, else the params as
            stored), and an overwrite writes the stored average into the master and
            the params (kernels/options.cuh).
        stochastic_rounding: bfloat16 params without a master copy are stored
            rounded stochastically (unbiased), from a hash of `seed`, the step count
            and the element's index: deterministic, nothing else to checkpoint.
        seed: the stochastic rounding's seed, an integer in [0, 2**64).
        Which dtypes of params, grads and state go together: fusedopt.precision.
    executor and num_threads are not hyperparameters: they are not in get_config().
    Keras 2 spellings are accepted: `lr=` (alias of learning_rate) and `decay=`
    (inverse-time decay, lr / (1 + decay * iterations)), with a DeprecationWarning.

    Every hyperparameter (the arguments above but skip_nonfinite, and each rule's own)
    is an attribute that may be assigned: `opt.beta_1 = 0.8` runs the constructor's
    checks (see Hyperparameter and _set_hyperparameters) and changes nothing if refused.
    """

    rule = None  # the rule's name: kernels/<rule>.cuh and reference.<rule>
    # The rule's own Hyperparameters, in declaration order (derived, see
    # __init_subclass__): what get_config() adds to the common arguments.
    _hyperparameters = ()

    learning_rate = _LearningRate()
    weight_decay = Hyperparameter(check.optional_real, low=0.0)
    coupled_weight_decay = Hyperparameter(check.optional_real, low=0.0)
    clipnorm = Hyperparameter(check.optional_real, low=0.0)
    clipvalue = Hyperparameter(check.optional_real, low=0.0)
    global_clipnorm = Hyperparameter(check.optional_real, low=0.0)
    loss_scale_factor = Hyperparameter(check.optional_real, low=0.0, low_open=True)
    maximize = Hyperparameter(check.boolean)
    use_ema = Hyperparameter(lambda name, v: False if v is None else check.boolean(name, v))
    ema_momentum = Hyperparameter(check.real, low=0.0, high=1.0)
    ema_overwrite_frequency = Hyperparameter(
        lambda name, v: None if v is None else check.integer(name, v, low=1))
    gradient_accumulation_steps = Hyperparameter(lambda name, v: _check_accumulation(name, v))
    # Mixed precision (fusedopt.precision): master_weights and state_dtype decide the
    # state's buffers, so they are fixed once there is state; stochastic rounding and
    # its seed may change between steps.
    master_weights = Hyperparameter(check.boolean)
    state_dtype = Hyperparameter(
        lambda name, v: None if v is None else precision.resolve_dtype(v, name))
    stochastic_rounding = Hyperparameter(check.boolean)
    seed = Hyperparameter(lambda name, v: precision._uint64(v, name))
    name = _Name()

    # Rules that read whole variables (`whole_variable = True`) run once per segment,
    # reference.<rule>(shape, p, g, *slots, *segment arguments, *scalars).
    whole_variable = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        common = _hyperparameter_fields(FusedOptimizer)
        cls._hyperparameters = tuple(n for n in _hyperparameter_fields(cls) if n not in common)
        if cls.rule is not None:
            _REGISTRY[cls.__name__.lower()] = cls

    def __init__(
        self,
        learning_rate,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
        skip_nonfinite=False,
        executor="auto",
        num_threads=None,
        segment_attributes=None,
        coupled_weight_decay=None,
        maximize=False,
        master_weights=False,
        state_dtype=None,
        stochastic_rounding=False,
        seed=0,
        **kwargs,
    ):
        # A subclass passes its own hyperparameters on in kwargs, so that all of them
        # are checked together, in one place (_set_hyperparameters).
        learning_rate = self._keras2_learning_rate(learning_rate, kwargs)
        self._decay = self._keras2_decay(kwargs)
        rule_values = {k: kwargs.pop(k) for k in self._hyperparameters if k in kwargs}
        if kwargs:
            raise ValueError(
                f"{type(self).__name__} got unknown argument(s) {sorted(kwargs)}; "
                f"valid arguments: {', '.join(self._argument_names())}"
            )
        self._skip_nonfinite = check.boolean("skip_nonfinite", skip_nonfinite)
        self._executor = executors.check_executor(executor)
        self._num_threads = _check_num_threads(num_threads)
        self._segment_request = SegmentRequest.from_config(segment_attributes)
        self._segment_table = None  # the request resolved against the buffer by build()
        self._buffer_names = None  # the FlatBuffer's segment names, set by build()
        # The step counters until build(); then the plan holds them.
        self._iterations = 0
        self._skipped_steps = 0
        self._last_step_skipped = False
        # Set by a LossScaleOptimizer wrapping this one: its dynamic_growth_steps, and
        # (scale, finite steps since it changed) until a plan holds them (step state).
        self._dynamic_growth_steps = None
        self._loss_scale_state = (0.0, 0)
        self._layout = None   # set by build(): the layout every buffer must have
        self._device = None
        self._slots = None    # rule-ordered list: a 1-D array per slot, None where absent
        self._option_slots = None  # {"average": EMA, "gradient_accumulator": ...} present
        self._ema_swapped = False  # params hold the moving average (swap_ema_weights)
        self._ema_saved_params = None  # the params meanwhile, when their dtype is not the average's
        self._pending_state = None
        self._plan = None     # the executor's plan (fusedopt.executor) once built
        self._grads_dtype = None  # the latest step's grads dtype (_reference_only)
        self._set_hyperparameters(dict(
            learning_rate=learning_rate, weight_decay=weight_decay, clipnorm=clipnorm,
            clipvalue=clipvalue, global_clipnorm=global_clipnorm,
            loss_scale_factor=loss_scale_factor, coupled_weight_decay=coupled_weight_decay,
            maximize=maximize, use_ema=use_ema, ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            gradient_accumulation_steps=gradient_accumulation_steps,
            master_weights=master_weights, state_dtype=state_dtype,
            stochastic_rounding=stochastic_rounding, seed=seed,
            name=name, **rule_values), notify=False)

    # ------------------------------------------------------------- hyperparameters
    def _set_hyperparameters(self, values, *, notify=True):
        """The one way hyperparameters are set, by the constructor and by assignment
        (`opt.beta_1 = 0.8` comes here through its Hyperparameter).

        Each value goes through its own check, then the cross-argument rules run on
        the optimizer as it would be, and an optimizer with state refuses a change
        that would add or drop a state slot. Only then is anything stored, so a
        refused assignment changes nothing and every stored configuration is one
        the constructor (and so `load`) accepts.
        """
        fields = _hyperparameter_fields(type(self))
        checked = {name: fields[name].validate(self, value) for name, value in values.items()}
        candidate = copy.copy(self)  # shares the buffers; only its settings differ
        candidate.__dict__.update({fields[n].storage: v for n, v in checked.items()})
        candidate._check_hyperparameters()
        if self.built or self._pending_state is not None:
            self._check_same_slots(candidate, checked)
        self.__dict__.update({fields[n].storage: v for n, v in checked.items()})
        if notify:
            for name in checked:
                self._hyperparameters_changed(name)

    def _check_hyperparameters(self):
        """Rules that tie hyperparameters together, run on every construction and
        assignment; a subclass adds its own and calls super()."""
        clip_options = [f"`{n}`" for n in ("clipnorm", "clipvalue", "global_clipnorm")
                        if getattr(self, n) is not None]
        if len(clip_options) > 1:
            raise ValueError(
                "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set; "
                f"got {', '.join(clip_options)}"
            )
        if not callable(self._learning_rate):
            self._check_learning_rate_value(self._learning_rate)
        if self.__dict__.get("_dynamic_growth_steps") and self.loss_scale_factor is not None:
            raise ValueError("`loss_scale_factor`: this optimizer is wrapped by a "
                             "LossScaleOptimizer, whose dynamic scale unscales the gradients")
        if self.ema_overwrite_frequency is not None and not self.use_ema:
            # Keras ignores it then; it would silently do nothing.
            raise ValueError("`ema_overwrite_frequency` needs `use_ema=True`")
        if self.master_weights and self.stochastic_rounding:
            raise ValueError("`stochastic_rounding=True` rounds the param write when there "
                             "is no master copy; with `master_weights=True` the float32 "
                             "master keeps the precision: choose one")
        if self.state_dtype == "float16":
            raise ValueError("`state_dtype` float16 is not accepted (float16 cannot hold "
                             "second moments: g**2 leaves its range); use bfloat16")
        dtype = self._known_param_dtype()
        if dtype is not None:
            self._precision_for(dtype)  # raises for a combination that is refused

    def _known_param_dtype(self):
        """The params' dtype once known (built, or a loaded state), else None."""
        if self.__dict__.get("_layout") is not None:
            return self._layout.dtype
        pending = self.__dict__.get("_pending_state")
        return None if pending is None else pending["layout"].dtype

    def _precision_for(self, param_dtype, grad_dtype=None):
        """The checked fusedopt.precision.Precision of this optimizer on params of
        `param_dtype` (and grads of `grad_dtype`, default the params'); ValueError
        naming the argument when the combination is refused."""
        return precision.resolve_precision(param_dtype, grad_dtype, self.state_dtype,
                                           self.master_weights, self.stochastic_rounding)

    def _slot_dtype(self, name, param_dtype):
        """A slot's dtype name: the master copy's float32, every other slot's the state
        dtype (default float32; float64 for float64 params)."""
        if name == "master":
            return "float32"
        return self._precision_for(param_dtype).state

    def _check_same_slots(self, candidate, changed):
        # The state was allocated (or loaded) for the current slots; a setting that
        # adds or drops one (SGD momentum 0 <-> > 0, amsgrad, centered) cannot apply
        # to it.
        if candidate.slot_names != self.slot_names:
            names = ", ".join(f"`{n}`" for n in changed)
            raise ValueError(
                f"{names}: this change would turn the state slots {list(self.slot_names)} "
                f"into {list(candidate.slot_names)}, but this optimizer already has state; "
                "set it before the first step, or start a new optimizer"
            )
        dtype = self._known_param_dtype()
        before = self._precision_for(dtype).state
        after = candidate._precision_for(dtype).state
        if before != after:
            raise ValueError(
                f"`state_dtype`: this change would store the state as {after}, but this "
                f"optimizer already has {before} state; set it before the first step, or "
                "start a new optimizer")

    # ---------------------------------------------------------------- subclass API
    def _slot_specs(self):
        """The rule's state slots, in rule order: (name, initial value), or None
        for a slot this configuration does not create. The initial value may be
        PARAMS (a copy of the params). A third item, ROWS or COLUMNS, makes a slot
        of Adafactor's factored shapes (reference.slot_shapes) instead of the params'."""
        raise NotImplementedError

    def _rule_scalars(self, lr, t):
        """The rule's per-step scalars, in the order reference.<rule> takes them.
        `lr` is this step's learning rate and `t = iterations + 1`."""
        raise NotImplementedError

    def _check_learning_rate_value(self, lr):
        """Rule-specific limits on this step's learning rate (Ftrl divides by it)."""

    def _segment_arguments(self, index, shape):
        """What else a whole-variable rule needs to know of segment `index`."""
        return ()

    def _segment_weight_decay(self, index, shape):
        """The decoupled weight decay of segment `index` (Muon's differs per variable)."""
        return self.weight_decay

    def _unscale(self):
        """The gradients' first multiplier (Hyper.unscale, the NumPy pipeline's):
        1/loss_scale_factor, negated with maximize; None when it is 1."""
        if not (self.loss_scale_factor or self.maximize):
            return None
        return (-1.0 if self.maximize else 1.0) / (self.loss_scale_factor or 1.0)

    # What the kernels' step state reads (kernels/step.cuh): the rule's hyperparameters
    # in the order of `_hyperparameters` (booleans as 0/1, an unset optional one such
    # as Nadam's schedule_decay as -1), and a running product the rule keeps over
    # completed steps (Nadam's), as a function of the step count.
    def _device_hyperparameters(self):
        values = (getattr(self, name) for name in self._hyperparameters)
        return tuple(-1.0 if v is None else float(v) for v in values)

    def _running_product(self, iterations):
        return 1.0

    def _device_product(self, calls):
        """The running product the step state holds after `calls` calls applied: that
        of the updates among them (gradient accumulation: calls // N)."""
        return self._running_product(calls // self._accumulation)

    # The hyperparameters _running_product depends on: setting one recomputes it.
    _running_product_inputs = ()

    def _learning_rate_spec(self):
        """The learning rate as the kernels' step state holds it: a number, (schedule
        class name, config) for fusedopt's own schedules, or None for what only the
        host can evaluate (a callable, or a schedule of another class)."""
        lr = self._learning_rate
        if isinstance(lr, schedules.LearningRateSchedule):
            if type(lr) in schedules.BUILTIN:
                return type(lr).__name__, lr.get_config()
            return None
        return None if callable(lr) else lr

    # ------------------------------------------------------------------ properties
    @property
    def skip_nonfinite(self):
        """Fixed at construction: it decides whether the host can count the steps
        (without it every GPU step counts; with it only the device knows)."""
        return self._skip_nonfinite

    @property
    def iterations(self):
        """Completed (not skipped) updates: Keras' `optimizer.iterations`. With
        gradient_accumulation_steps = N it is the calls applied // N, as in Keras."""
        return self._counters()[0] // self._accumulation

    @property
    def _accumulation(self):
        return self.gradient_accumulation_steps or 1

    @property
    def skipped_steps(self):
        """Steps skipped for non-finite gradients (only with skip_nonfinite=True)."""
        return self._counters()[1]

    @property
    def last_step_skipped(self):
        """Whether the most recent call to apply() was skipped for non-finite gradients."""
        return self._counters()[2]

    def _counters(self):
        """(iterations, skipped steps, last step skipped), from where the step's state
        lives: the plan once built (a GPU read synchronises), else this object."""
        if self._plan is not None:
            return self._plan.read_state()
        return self._iterations, self._skipped_steps, self._last_step_skipped

    @property
    def executor(self):
        """The executor asked for: "auto", "host", "numpy" or "cuda". Assigning one
        after build() moves the step to it (counters and state carry over)."""
        return self._executor

    @executor.setter
    def executor(self, value):
        value = executors.check_executor(value)
        if self._plan is None:
            self._executor = value
            return
        previous = self._executor
        self._iterations, self._skipped_steps, self._last_step_skipped = self._counters()
        if self._dynamic_growth_steps:  # a LossScaleOptimizer's scale moves along
            self._loss_scale_state = self._plan.read_loss_scale()
        self._executor = value
        try:
            self._plan = executors.plan_for(self, self._buffers)
        except Exception:
            self._executor = previous
            raise

    @property
    def executor_name(self):
        """The executor that runs this optimizer's steps ("host", "numpy" or "cuda"),
        or None before build()."""
        return None if self._plan is None else self._plan.name

    @property
    def num_threads(self):
        """Threads of the host executor (None: every core available)."""
        return self._num_threads

    @num_threads.setter
    def num_threads(self, value):
        self._num_threads = _check_num_threads(value)

    @property
    def built(self):
        return self._layout is not None

    @property
    def slot_names(self):
        """Names of the state slots this configuration keeps: the options' (Keras'
        order: EMA `average`, then `gradient_accumulator`), then the rule's."""
        return tuple(spec[0] for spec in self._all_slot_specs())

    def slots(self):
        """{slot name: the 1-D state buffer} (live buffers, not copies)."""
        if not self.built:
            return {}
        rule = {spec[0]: buf for spec, buf in zip(self._slot_specs(), self._slots)
                if spec is not None}
        return {**self._option_slots, **rule}

    def _option_slot_specs(self):
        return tuple(spec for spec in (
            ("average", 0.0) if self.use_ema else None,
            ("gradient_accumulator", 0.0) if self.gradient_accumulation_steps else None,
            ("master", PARAMS) if self.master_weights else None,
        ) if spec is not None)

    def _all_slot_specs(self):
        return self._option_slot_specs() + tuple(s for s in self._slot_specs() if s is not None)

    def _slot_size(self, spec, layout):
        kind = spec[2] if len(spec) > 2 else None
        return sum(math.prod(s) for s in slot_shapes(kind, layout.shapes))

    def _reference_only(self, param_dtype=None):
        """Why only the NumPy executor can run this configuration ('' when any can):
        what the kernels do not implement yet. Other executors refuse it. With
        `param_dtype` (and the latest step's grads dtype), also the storage a rule with
        kernels of its own cannot run (`_own_kernel_storage`: Lamb every storage,
        Adafactor and Muon uniform float32/float64 only). Keras' options use_ema and
        gradient accumulation run on every executor for every rule with a kernel: in
        fused.cu's pass and host.cpp, and in the own kernels of Lamb, Adafactor and Muon
        (kernels/whole.cuh, whole_host.cpp), all with kernels/options.cuh's per-element
        functions; a LossScaleOptimizer's dynamic scale likewise (kernels/step.cuh:
        fo_phase, fo_advance). On 16-bit buffers those options run wherever the rule
        does: every storage in the fused pass and Lamb's kernels, float32/float64 of one
        dtype in Adafactor's and Muon's."""
        if self.rule not in _kernels.rule_names():
            return f"the {type(self).__name__} rule has no kernel yet"
        if _kernels.own_kernels(self.rule) and param_dtype is not None:
            return self._own_kernel_storage(param_dtype, self._grads_dtype)
        return ""

    def _own_kernel_storage(self, param_dtype, grad_dtype):
        """For a rule with kernels of its own: the storage options its kernels do not
        run ('' when they run them). Lamb's kernels take every accepted storage
        combination, Keras' options included (fusedopt._kernels.own_kernel_keys);
        Adafactor's and Muon's take float32 or float64 params, grads and state of one
        dtype."""
        param = np.dtype(param_dtype).name
        p = self._precision_for(param, None if grad_dtype is None else np.dtype(grad_dtype).name)
        if _kernels.own_kernel_keys(self.rule) is not _kernels.OWN_KERNEL_KEYS:
            return ""
        reasons = []
        if p.param not in ("float32", "float64"):
            reasons.append(f"{p.param} params")
        if p.grad != p.param:
            reasons.append(f"{p.grad} grads")
        if p.state != p.param:
            reasons.append(f"`state_dtype={p.state!r}`")
        if p.master_weights:
            reasons.append("`master_weights=True`")
        if p.stochastic_rounding:
            reasons.append("`stochastic_rounding=True`")
        if not reasons:
            return ""
        return (" and ".join(reasons) + " (its kernels take float32 or float64 params, grads "
                "and state of one dtype)")

    # ----------------------------------------------------------------------- build
    def build(self, params):
        """Allocate the state slots for `params` (a FlatBuffer) on its device.

        apply() builds on first use; call build() to allocate ahead of time.
        """
        params = _as_params(params)
        if self.built:
            self._check_same_layout(params.layout, params.device, "params")
            return
        self._precision_for(params.layout.dtype)  # refused combinations, before anything
        slots = []
        pending = self._pending_state
        if pending is not None and pending["layout"] != params.layout:
            raise ValueError(
                "the loaded state_dict does not match `params`: "
                + pending["layout"].describe_difference(params.layout)
            )
        buffers = BufferInfo(params.offsets, params.dtype, params.device, params.shapes)
        # A loaded state's table (resolved when it was saved) wins over the request.
        table = None if pending is None else pending["segment_table"]
        self._segment_table = table or self._segment_request.resolve(len(params), params.names)
        self._buffer_names = params.names  # a plan may read them (Muon's exclusions)
        try:
            plan = executors.plan_for(self, buffers)  # may refuse
        except Exception:
            self._segment_table = self._buffer_names = None
            raise
        with cuda.on_device(params.device):
            slots = [None if spec is None else self._new_slot(spec, params, pending)
                     for spec in self._slot_specs()]
            option_slots = {spec[0]: self._new_slot(spec, params, pending)
                            for spec in self._option_slot_specs()}
        self._slots = slots
        self._option_slots = option_slots
        self._slot_spans = [_span(s) for s in (*slots, *option_slots.values())
                            if s is not None and s.size]
        self._layout = params.layout
        self._device = params.device
        self._pending_state = None
        self._plan = plan
        self._buffers = buffers

    def _new_slot(self, spec, params, pending):
        dtype = _storage_dtype(self._slot_dtype(spec[0], params.layout.dtype))
        if pending is not None:
            return _copy_to(pending["slots"][spec[0]], params.device, dtype)
        if spec[1] is PARAMS:
            # The master copy: exact (16-bit values are float32 values); a slot in a
            # narrower state dtype: rounded to nearest even.
            return params.data.astype(dtype, copy=True)
        return params.xp.full(self._slot_size(spec, params.layout), spec[1], dtype=dtype)

    # ------------------------------------------------------------------------- EMA
    def swap_ema_weights(self, params):
        """Exchange the params and the EMA `average` in place, on their device (no
        host round trip). Call it again to swap back; steps are refused meanwhile.
        `with opt.ema_weights(params):` does both around a block (evaluation)."""
        params = self._check_ema_params(params, "swap_ema_weights")
        average = self._option_slots["average"]
        self._plan.join_current_stream()
        with cuda.on_device(self._device):
            if average.dtype != params.data.dtype:
                # 16-bit params or state: an exchange would round the one into the
                # other's dtype. The params are kept aside (the average stays as it is)
                # and hold the average rounded to nearest until they come back.
                if self._ema_swapped:
                    params.data[...] = self._ema_saved_params
                    self._ema_saved_params = None
                else:
                    self._ema_saved_params = params.data.copy()
                    params.data[...] = average
            else:
                saved = params.data.copy()
                params.data[...] = average
                average[...] = saved
        self._ema_swapped = not self._ema_swapped

    def ema_weights(self, params):
        """A context manager: the params hold the moving average inside the block."""
        import contextlib

        @contextlib.contextmanager
        def swapped():
            self.swap_ema_weights(params)
            try:
                yield params
            finally:
                self.swap_ema_weights(params)

        return swapped()

    def finalize_variable_values(self, params):
        """Keras' end of training: with use_ema, copy the moving average into the
        params (rounded to nearest for 16-bit params) and into the float32 master copy
        when there is one (the average is kept); without, nothing changes."""
        if not self.use_ema:
            return
        params = self._check_ema_params(params, "finalize_variable_values")
        if self._ema_swapped:
            raise ValueError("`params` hold the EMA weights already (swap_ema_weights)")
        self._plan.join_current_stream()
        with cuda.on_device(self._device):
            average = self._option_slots["average"]
            params.data[...] = average
            if self._option_slots.get("master") is not None:
                self._option_slots["master"][...] = average

    def _refuse_while_swapped(self, what, doing):
        """While the params hold the EMA weights the average slot (or a copy kept
        aside) holds the params: a state saved or loaded then would mix the two."""
        if self._ema_swapped:
            raise ValueError(f"{what}: `params` hold the EMA weights (swap_ema_weights); "
                             f"swap them back before {doing} the state")

    def _check_ema_params(self, params, what):
        if not self.use_ema:
            raise ValueError(f"{what} needs an optimizer built with `use_ema=True`")
        params = _as_params(params)
        if not self.built:
            raise ValueError(f"{what}: this optimizer has no moving average yet; apply() first")
        self._check_same_layout(params.layout, params.device, "params")
        _check_writable(params.data)
        return params

    # ------------------------------------------------------------ segment attributes
    _KEEP = object()

    def set_segment_attributes(self, *, lr_multipliers=_KEEP, decay=_KEEP):
        """Per-segment learning-rate multipliers and weight decay on/off (fusedopt.segments):
        `lr_multipliers` one number >= 0 per segment (segment s steps with m[s]*lr, as
        this optimizer with learning rate m[s]*lr would), `decay` one bool per segment
        (False: no weight decay there). An argument left out is kept; None resets it
        to the default (1, on). Before build() the lengths are checked when the buffer
        is known; afterwards at once. Allowed between steps: the next step uses them.
        Refused with nothing changed (TypeError/ValueError naming the argument)."""
        changes = {}
        if lr_multipliers is not self._KEEP:
            changes["lr_multipliers"] = lr_multipliers
        if decay is not self._KEEP:
            changes["decay"] = decay
        self._set_segment_request(self._segment_request.replace(**changes))

    def exclude_from_weight_decay(self, var_list=None, var_names=None):
        """Keras' exclusion from weight decay: segments given by index in `var_list`,
        and segments whose name (FlatBuffer(..., names=...)) contains a match of any
        regular expression in `var_names` (re.search, as Keras matches variable
        names). Replaces the previous exclusions; as in Keras, only before build()."""
        if self.built:
            raise ValueError("`exclude_from_weight_decay()` can only be configured before "
                             "the optimizer is built.")
        self._set_segment_request(self._segment_request.replace(
            exclude_indices=var_list or (), exclude_names=var_names or ()))

    @property
    def segment_table(self):
        """Each segment's (lr multiplier, weight decay on) as resolved by build():
        a fusedopt.segments.SegmentTable, or None before build()."""
        return self._segment_table

    def _set_segment_request(self, request):
        table = None
        if self.built:
            table = request.resolve(len(self._layout.shapes), self._buffer_names)
        self._segment_request = request
        if self._pending_state is not None:
            self._pending_state["segment_table"] = None  # what is asked now wins
        if table is not None:
            self._segment_table = table
            self._hyperparameters_changed("segment_attributes")

    def _lr_multipliers(self):
        """The distinct learning-rate multipliers the next step will use."""
        table = self._segment_table
        if table is None and self._pending_state is not None:
            table = self._pending_state["segment_table"]
        if table is not None:
            return set(table.multipliers)
        return set(self._segment_request.lr_multipliers or (1.0,))

    def _segment_groups(self):
        """For the executors: the distinct (multiplier, decay) pairs and each segment's
        group (fusedopt.segments.SegmentTable.groups)."""
        return self._segment_table.groups()

    # ----------------------------------------------------------------------- apply
    def apply(self, grads, params, *, grad_scale=None, found_inf=None):
        """One update of every variable in `params` from `grads`; iterations += 1.

        `params` is a FlatBuffer (or a contiguous 1-D array, one segment); `grads` is a
        FlatBuffer of the same layout or a 1-D array of the same size, dtype and device.

        `grad_scale` and `found_inf` (torch.amp.GradScaler's protocol, fusedopt.torch):
        1-element float32 arrays on the buffers' device, read by the step where it runs
        (on a GPU by the kernels, so the host never waits for them). The gradients are
        divided by grad_scale, on top of loss_scale_factor; when found_inf is nonzero
        the step changes nothing and is counted in `skipped_steps`, as skip_nonfinite
        counts its skips. Every argument is checked before anything changes.
        """
        params = _as_params(params)
        grads = self._check_grads(grads, params)
        amp = _check_amp_inputs(grad_scale, found_inf, params.device)
        self._check_own_kernel_grads(grads.dtype)
        if self.built:
            self._check_same_layout(params.layout, params.device, "params")
        _check_writable(params.data)
        _check_no_overlap(grads, params, self._slot_spans if self.built else ())
        if self._ema_swapped:
            raise ValueError("`params` hold the EMA weights (swap_ema_weights); swap them "
                             "back before the next step")
        if len(params) == 0:
            return  # Keras: no variables, no update, no increment
        host_learning_rate = self._step_learning_rate()
        self._grads_dtype = np.dtype(grads.dtype)  # the executor choice reads it
        self.build(params)
        if amp is None:
            self._plan.step(grads, params.data, self._slots, host_learning_rate)
        else:
            self._plan.step(grads, params.data, self._slots, host_learning_rate, amp=amp)

    def cuda_graph(self, grads, params):
        """Capture one step, apply(grads, params), as a CUDA graph; return a callable
        that replays it: `step = opt.cuda_graph(grads, params)`, then `step()` per step.

        Each replay is the next step, exactly as apply() would run it: the learning
        rate (a number or a fusedopt schedule), bias corrections, clipping, weight
        decay and skip_nonfinite are computed on the device from its step counter and
        hyperparameter block, and a hyperparameter assigned between replays is used by
        the next one. `opt.iterations` counts replays. The graph reads `grads` and
        updates `params` and the state in place: write each step's gradients into the
        same `grads` buffer. Not replayable, refused here: a callable learning rate
        (evaluated on the host each step). Switching the clip option afterwards
        changes the launch sequence: the old capture then refuses to run.
        """
        params = _as_params(params)
        grads = self._check_grads(grads, params)
        self._check_own_kernel_grads(grads.dtype)
        if self.built:
            self._check_same_layout(params.layout, params.device, "params")
        _check_no_overlap(grads, params, self._slot_spans if self.built else ())
        if len(params) == 0:
            raise ValueError("`params` are empty: there is no step to capture")
        if params.device == "cpu" and getattr(self._plan, "name", None) != "cuda":
            raise ValueError("`params` live on the CPU: cuda_graph() needs CuPy arrays")
        if not self._learning_rate_in_block():
            raise ValueError(
                "`learning_rate` is evaluated on the host each step (a callable, or a "
                "schedule the device cannot compute), so a captured step cannot replay it; "
                "use a number or a fusedopt.schedules schedule")
        self._step_learning_rate()
        self._grads_dtype = np.dtype(grads.dtype)
        self.build(params)
        return cuda.CapturedStep(self, self._plan,
                                 self._plan.capture(grads, params.data, self._slots))

    def _step_learning_rate(self):
        """Refuse a bad learning rate for the coming step before anything changes.
        Returns the rate before Keras 2's decay when only the host can evaluate it (a
        callable, a schedule of another class), else None: the executors compute the
        rate from the step state (kernels/step.cuh; reference.ReferencePlan in Python)."""
        # With skip_nonfinite on a GPU only the device knows how many steps were
        # skipped; the plan names the newest iteration the step can be.
        it = self._plan.next_iteration if self._plan is not None else self._iterations
        raw = self._raw_learning_rate(it)
        lr = self._decayed_learning_rate(raw, it)
        for m in self._lr_multipliers() - {1.0}:
            self._check_learning_rate_value(lr * m)  # Ftrl divides by each group's rate
        return None if self._learning_rate_in_block() else raw[0]

    def _learning_rate_in_block(self):
        """Whether the hyperparameter block (kernels/step.cuh) can compute the rate."""
        spec = self._learning_rate_spec()
        if isinstance(spec, tuple):
            from . import _kernels

            return _kernels.pack_learning_rate(spec) is not None
        return spec is not None

    def _hyperparameters_changed(self, name):
        """Called after a hyperparameter `name` was accepted and stored (`opt.beta_1 =
        0.8`; None: any of them, e.g. by load_state_dict), never by the constructor:
        the executor rewrites its copy of the hyperparameter block (on a GPU queued on
        the current stream, with new tables if the clip option changed)."""
        plan = getattr(self, "_plan", None)
        if plan is not None:
            plan.hyperparameters_changed(name)

    # The oracle's per-step scalars (the NumPy executor and the tests use them; the
    # kernels compute the same in kernels/step.cuh). `it` counts the calls applied:
    # schedules see it, the rule sees t = it // N + 1 (Keras' gradient accumulation).
    def _step_scalars(self, it, host_learning_rate=None, multiplier=1.0):
        """(lr, the rule's scalars) of step `it` for a segment group whose learning-rate
        multiplier is `multiplier`: the rate is multiplied before the scalars are
        computed from it (fusedopt.segments), exactly as kernels/step.cuh does."""
        if host_learning_rate is None:
            lr = self._learning_rate_at(it)
        else:
            lr = self._decayed_learning_rate((host_learning_rate, "the learning_rate callable"), it)
        lr = lr * multiplier
        t = it // self._accumulation + 1
        return lr, tuple(float(x) for x in self._rule_scalars(lr, t))

    def _learning_rate_at(self, it):
        return self._decayed_learning_rate(self._raw_learning_rate(it), it)

    def _raw_learning_rate(self, it):
        """(the rate before Keras 2's decay, where it came from), checked to be a number."""
        lr = self._learning_rate
        if isinstance(lr, schedules.LearningRateSchedule):
            source = f"the schedule {type(lr).__name__} at step {it}"
            try:
                value = lr(it)
            except (ArithmeticError, ValueError) as e:
                raise ValueError(f"`learning_rate`: {source} failed: {e}") from e
        elif callable(lr):
            value, source = lr(), "the learning_rate callable"
        else:
            value, source = lr, "learning_rate"
        if isinstance(value, (str, bytes, bool, np.bool_)):
            raise TypeError(f"`learning_rate`: {source} returned {value!r}, which is not a number")
        try:
            value = float(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"`learning_rate`: {source} returned {value!r}, which is not a "
                            "number") from e
        return value, source

    def _decayed_learning_rate(self, raw, it):
        value, source = raw
        if self._decay:
            value = value / (1.0 + self._decay * it)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"`learning_rate` must be finite and >= 0; {source} gave {value!r}")
        self._check_learning_rate_value(value)
        return value

    # ---------------------------------------------------------------------- checks
    def _check_grads(self, grads, params):
        if isinstance(grads, FlatBuffer):
            if grads.device != params.device:
                raise ValueError(f"`grads` live on {grads.device} but `params` on {params.device}")
            self._check_grad_dtype(grads.dtype, params.dtype)
            if grads.layout.shapes != params.layout.shapes:
                raise ValueError(
                    "`grads` layout differs from `params`: "
                    + params.layout.describe_difference(Layout(grads.layout.shapes,
                                                               params.layout.dtype))
                )
            return grads.data
        if not (isinstance(grads, np.ndarray) or cuda.is_gpu_array(grads)):
            raise TypeError(
                f"`grads` must be a FlatBuffer or a 1-D array, got {type(grads).__name__}"
            )
        if cuda.device_of(grads) != params.device:
            raise ValueError(
                f"`grads` live on {cuda.device_of(grads)} but `params` on {params.device}"
            )
        self._check_grad_dtype(grads.dtype, params.dtype)
        if grads.ndim != 1 or grads.size != params.size:
            raise ValueError(
                f"`grads` must be 1-D with {params.size} elements like `params`, "
                f"got shape {tuple(grads.shape)}"
            )
        if not grads.flags.c_contiguous:
            raise ValueError("`grads` must be contiguous")
        return grads

    def _check_own_kernel_grads(self, grad_dtype):
        """A rule with kernels of its own for float32/float64 of one dtype (Adafactor,
        Muon) runs its host/CUDA plan on grads of the params' dtype only (the plan was
        chosen at the first step's grads); others are refused, naming `grads`, before
        anything changes. Lamb's kernels take every accepted grads dtype (checked with
        the params' by _check_grad_dtype)."""
        plan = self._plan
        if plan is None or getattr(plan, "name", None) not in ("host", "cuda") or \
                not _kernels.own_kernels(self.rule):
            return
        grad, param = np.dtype(grad_dtype).name, np.dtype(self._layout.dtype).name
        if _kernels.own_kernel_keys(self.rule) is not _kernels.OWN_KERNEL_KEYS:
            return
        if grad != param:
            raise ValueError(
                f"`grads` dtype {grad}: {type(self).__name__} runs on the {plan.name} executor "
                f"with grads of the params' dtype ({param}) only; pass {param} grads, or use "
                "executor='numpy'")

    def _check_grad_dtype(self, grad_dtype, param_dtype):
        """Grads may be of another dtype than the params (fusedopt.precision.GRAD_DTYPES:
        e.g. bfloat16 grads for float32 params); the rest is refused, naming `grads`."""
        grad, param = np.dtype(grad_dtype).name, np.dtype(param_dtype).name
        if grad == param:
            return
        accepted = precision.GRAD_DTYPES.get(param, (param,))
        if grad not in accepted:
            raise ValueError(f"`grads` dtype {grad} is not accepted with `params` dtype {param}; "
                             f"accepted: {', '.join(accepted)} (fusedopt.precision)")

    def _check_same_layout(self, layout, device, what):
        if layout != self._layout:
            raise ValueError(
                f"`{what}` do not match the layout this optimizer was built for: "
                + self._layout.describe_difference(layout)
            )
        if device != self._device:
            raise ValueError(
                f"`{what}` live on {device} but this optimizer's state lives on "
                f"{self._device}; move it with load_state_dict(state_dict()) on a new optimizer"
            )

    # ----------------------------------------------------------------------- state
    def state_dict(self):
        """Everything needed to resume exactly: iterations, layout and slot copies.

        Slot arrays are copies on the optimizer's device (NumPy or CuPy);
        `load_state_dict` accepts either, so a state moves between CPU and GPU.
        """
        if not self.built and self._pending_state is None:
            raise ValueError(
                "this optimizer has no state yet: call build(params) or apply() first"
            )
        self._refuse_while_swapped("state_dict", "saving")
        if self.built:
            layout = self._layout
            self._plan.join_current_stream()  # copies queue on the current stream
            slots = {name: buf.copy() for name, buf in self.slots().items()}
        else:
            layout = self._pending_state["layout"]
            slots = {k: v.copy() for k, v in self._pending_state["slots"].items()}
        state = {
            "optimizer": type(self).__name__.lower(),
            # Keras' raw counter (`_iterations`): the calls applied, which under
            # gradient accumulation is N times `iterations`.
            "iterations": self._counters()[0],
            "layout": layout.to_dict(),
            "slots": slots,
        }
        if self.skip_nonfinite:
            state["skipped_steps"] = self.skipped_steps
            state["last_step_skipped"] = self.last_step_skipped
        # Resolved per segment, so a state restores them without the names they may
        # have been matched by; left out only when nothing was ever asked.
        table = self._segment_table if self.built else self._pending_state["segment_table"]
        if table is not None and not (table.is_default and self._segment_request.is_default):
            state["segment_attributes"] = table.to_dict()
        return state

    def load_state_dict(self, state):
        """Restore a `state_dict()`; refused, with nothing changed, if it comes from
        another optimizer, slot configuration, layout or dtype."""
        self._refuse_while_swapped("load_state_dict", "loading")
        parsed = self._parse_state(state)
        table = parsed["segment_table"]  # None: the optimizer keeps its own
        if self.built:
            if parsed["layout"] != self._layout:
                raise ValueError(
                    "the state_dict's layout does not match this optimizer's: "
                    + self._layout.describe_difference(parsed["layout"])
                )
            if table is not None:
                self._segment_table = table
            self._plan.join_current_stream()
            with cuda.on_device(self._device):
                for name, buf in self.slots().items():
                    buf[...] = _copy_to(parsed["slots"][name], self._device, buf.dtype)
            self._plan.write_state(parsed["iterations"], parsed["skipped_steps"],
                                   parsed["last_step_skipped"])
            self._hyperparameters_changed(None)
        else:
            self._pending_state = parsed
        self._iterations = parsed["iterations"]
        self._skipped_steps = parsed["skipped_steps"]
        self._last_step_skipped = parsed["last_step_skipped"]

    def _parse_state(self, state):
        if not isinstance(state, dict):
            raise TypeError(f"`state` must be a dict from state_dict(), got {type(state).__name__}")
        missing = {"optimizer", "iterations", "layout", "slots"} - set(state)
        if missing:
            raise ValueError(f"`state` is missing {sorted(missing)}; is it from state_dict()?")
        mine = type(self).__name__.lower()
        if state["optimizer"] != mine:
            raise ValueError(f"`state` comes from optimizer {state['optimizer']!r}, this is {mine!r}")
        iterations = check.integer("state['iterations']", state["iterations"], low=0)
        try:
            layout = Layout.from_dict(state["layout"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"`state['layout']` is malformed: {e}") from e
        slots = state["slots"]
        if not isinstance(slots, dict) or set(slots) != set(self.slot_names):
            got = sorted(slots) if isinstance(slots, dict) else slots
            raise ValueError(
                f"`state` holds slots {got}, but this {type(self).__name__} configuration "
                f"keeps {list(self.slot_names)}"
            )
        for spec in self._all_slot_specs():
            name, arr = spec[0], slots[spec[0]]
            if not (isinstance(arr, np.ndarray) or cuda.is_gpu_array(arr)):
                raise TypeError(f"slot {name!r} must be an array, got {type(arr).__name__}")
            size = self._slot_size(spec, layout)
            if arr.ndim != 1 or arr.size != size:
                raise ValueError(
                    f"slot {name!r} has shape {tuple(arr.shape)}, expected ({size},)"
                )
            want = self._slot_dtype(name, layout.dtype)
            if np.dtype(arr.dtype).name != want:
                raise ValueError(f"slot {name!r} has dtype {arr.dtype}, expected {want}"
                                 + (" (this optimizer's state_dtype)" if name != "master"
                                    and want != layout.dtype else ""))
        skipped = check.integer("state['skipped_steps']", state.get("skipped_steps", 0), low=0)
        last = check.boolean("state['last_step_skipped']", state.get("last_step_skipped", False))
        table = _parse_segment_table(state.get("segment_attributes"), len(layout.shapes))
        return {
            "segment_table": table,
            "iterations": iterations,
            "layout": layout,
            "slots": {k: v.copy() for k, v in slots.items()},
            "skipped_steps": skipped,
            "last_step_skipped": last,
        }

    # ---------------------------------------------------------------------- config
    def get_config(self):
        """The constructor arguments, Keras 3 keys first; `from_config` inverts it."""
        lr = self._learning_rate
        if isinstance(lr, schedules.LearningRateSchedule):
            lr = schedules.serialize(lr)
        config = {
            "name": self.name,
            "learning_rate": lr,
            "weight_decay": self.weight_decay,
            "clipnorm": self.clipnorm,
            "global_clipnorm": self.global_clipnorm,
            "clipvalue": self.clipvalue,
            "use_ema": self.use_ema,
            "ema_momentum": self.ema_momentum,
            "ema_overwrite_frequency": self.ema_overwrite_frequency,
            "loss_scale_factor": self.loss_scale_factor,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
        }
        config.update({k: getattr(self, k) for k in self._hyperparameters})
        if self.skip_nonfinite:
            config["skip_nonfinite"] = True
        if self.coupled_weight_decay is not None:  # fusedopt's own: absent by default
            config["coupled_weight_decay"] = self.coupled_weight_decay
        if self.maximize:  # fusedopt's own: absent by default
            config["maximize"] = True
        # Mixed precision (fusedopt's own): only what differs from the defaults.
        for key, default in (("master_weights", False), ("state_dtype", None),
                             ("stochastic_rounding", False), ("seed", 0)):
            if getattr(self, key) != default:
                config[key] = getattr(self, key)
        segments = self._segment_request.to_config()
        if segments is not None:
            config["segment_attributes"] = segments
        if self._decay:
            config["decay"] = self._decay
        return config

    @classmethod
    def from_config(cls, config):
        if not isinstance(config, dict):
            raise TypeError(f"`config` must be a dict, got {type(config).__name__}")
        config = dict(config)
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = schedules.deserialize(config["learning_rate"])
        return cls(**config)

    def __repr__(self):
        hyper = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._hyperparameters)
        return f"{type(self).__name__}(learning_rate={self._learning_rate!r}, {hyper})"

    # ------------------------------------------------------- Keras 2 compatibility
    def _keras2_learning_rate(self, learning_rate, kwargs):
        if "lr" not in kwargs:
            return learning_rate
        import inspect

        default = inspect.signature(type(self).__init__).parameters["learning_rate"].default
        if learning_rate is not default and learning_rate != default:
            raise ValueError("pass either `learning_rate` or its Keras 2 alias `lr`, not both")
        warnings.warn("`lr` is deprecated (Keras 2); use `learning_rate`",
                      DeprecationWarning, stacklevel=4)
        return kwargs.pop("lr")

    @staticmethod
    def _keras2_decay(kwargs):
        if "decay" not in kwargs:
            return 0.0
        decay = check.real("decay", kwargs.pop("decay"), low=0.0)
        if decay:
            warnings.warn(
                "`decay` is Keras 2's inverse-time decay, lr / (1 + decay * iterations); "
                "fusedopt applies it. In Keras 3 use schedules.InverseTimeDecay",
                DeprecationWarning, stacklevel=4)
        return decay

    def _argument_names(self):
        import inspect

        names = []
        for klass in type(self).__mro__[:-1]:  # not object
            if "__init__" in vars(klass):
                for p in inspect.signature(klass.__init__).parameters.values():
                    if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) \
                            and p.name != "self" and p.name not in names:
                        names.append(p.name)
        return names + ["lr", "decay"]


# ---------------------------------------------------------------------- helpers
class BufferInfo(NamedTuple):
    """What an executor's plan needs to know of the buffers it will update."""

    offsets: tuple
    dtype: np.dtype
    device: str
    shapes: tuple = ()  # the segments' shapes, for rules that read whole variables


def _as_params(params):
    if isinstance(params, FlatBuffer):
        return params
    if isinstance(params, np.ndarray) or cuda.is_gpu_array(params):
        # Checked here, not left to FlatBuffer, whose messages name its own `data`.
        if params.ndim != 1:
            raise ValueError(
                f"`params` must be a FlatBuffer or a 1-D array, got shape {tuple(params.shape)}"
            )
        if not params.flags.c_contiguous:
            raise ValueError("`params` must be contiguous")
        if np.dtype(params.dtype).name not in SUPPORTED_DTYPES:
            raise ValueError(f"`params` must be float64, float32, bfloat16 or float16, "
                             f"got {params.dtype}")
        return FlatBuffer(params, [params.shape])
    raise TypeError(f"`params` must be a FlatBuffer or a 1-D array, got {type(params).__name__}")


def _check_amp_inputs(grad_scale, found_inf, device):
    """(grad_scale, found_inf) for the executors, or None when both are None."""
    if grad_scale is None and found_inf is None:
        return None
    for name, x in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if x is None:
            continue
        if not (isinstance(x, np.ndarray) or cuda.is_gpu_array(x)):
            raise TypeError(f"`{name}` must be a 1-element float32 array (NumPy or CuPy), "
                            f"got {type(x).__name__}")
        if x.size != 1 or np.dtype(x.dtype) != np.float32:
            raise ValueError(f"`{name}` must hold one float32 element, got shape "
                             f"{tuple(x.shape)} and dtype {x.dtype}")
        if cuda.device_of(x) != device:
            raise ValueError(f"`{name}` lives on {cuda.device_of(x)} but `params` on {device}")
    return grad_scale, found_inf


def _parse_segment_table(saved, nsegments):
    """A state_dict's 'segment_attributes' as a SegmentTable (None when absent: the
    optimizer keeps its own); ValueError/TypeError naming the key."""
    if saved is None:
        return None
    where = "state['segment_attributes']"
    if not isinstance(saved, dict) or set(saved) != {"lr_multipliers", "decay"}:
        raise ValueError(f"`{where}` must be a dict with 'lr_multipliers' and 'decay'")
    try:
        table = SegmentRequest(saved["lr_multipliers"], saved["decay"]).resolve(nsegments)
    except (TypeError, ValueError) as e:
        raise type(e)(f"`{where}`: {e}") from e
    return table


def _check_num_threads(value):
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`num_threads` must be a positive integer or None, "
                        f"got {type(value).__name__}: {value!r}")
    if value < 1:
        raise ValueError(f"`num_threads` must be >= 1 (or None for every core), got {value!r}")
    return int(value)


def _check_learning_rate(lr):
    if isinstance(lr, schedules.LearningRateSchedule):
        return lr
    if _is_keras_schedule(lr):
        return schedules.deserialize({"class_name": type(lr).__name__, "config": lr.get_config()})
    if isinstance(lr, numbers.Real) and not isinstance(lr, (bool, np.bool_)):
        return check.real("learning_rate", lr, low=0.0)
    if callable(lr):
        return lr
    raise TypeError(
        "`learning_rate` must be a number, a callable of no arguments or a "
        f"LearningRateSchedule, got {type(lr).__name__}: {lr!r}"
    )


def _is_keras_schedule(obj):
    return any(k.__module__.startswith("keras") and k.__name__ == "LearningRateSchedule"
               for k in type(obj).__mro__)


def _check_accumulation(name, steps):
    """None (or Keras' 0) for off, else an integer >= 2, as Keras requires."""
    if steps is None or (steps == 0 and not isinstance(steps, (bool, np.bool_))):
        return None
    return check.integer(name, steps, low=2)


def _check_writable(data):
    if isinstance(data, np.ndarray) and not data.flags.writeable:
        raise ValueError("`params` are read-only; the optimizer updates them in place")


def _check_no_overlap(grads, params, slot_spans):
    """The fused step reads and writes every buffer once: they must be distinct.
    Spans of params and state are computed once (FlatBuffer, build); only the
    gradient's is taken per step."""
    g = _span(grads)
    p = params.span
    if _spans_overlap(g, p):
        raise ValueError("`grads` share memory with params; pass a separate gradient buffer")
    for s in slot_spans:
        if _spans_overlap(g, s):
            raise ValueError("`grads` share memory with optimizer state; pass a separate "
                             "gradient buffer")
        if _spans_overlap(p, s):
            raise ValueError("`params` share memory with this optimizer's state")


def _spans_overlap(a, b):
    return a[0] is not None and a[0] == b[0] and a[1] < b[2] and b[1] < a[2]


def _storage_dtype(name):
    """The array dtype of a storage dtype name (bfloat16: ml_dtypes' in NumPy, which
    CuPy arrays take too)."""
    return precision.numpy_dtype(name)


def _copy_to(array, device, dtype):
    if device == "cpu":
        return np.array(cuda.to_device(array, "cpu"), dtype=dtype)
    return cuda.to_device(array, device).astype(dtype, copy=False)


def _snake_case(name):
    out = []
    for i, ch in enumerate(name):
        if ch.isupper() and i and not name[i - 1].isupper():
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


def get(identifier):
    """An optimizer from a name ("adam", any case), a config dict
    ({"class_name": "Adam", "config": {...}}), a Keras optimizer, or an instance."""
    if isinstance(identifier, FusedOptimizer):
        return identifier
    if isinstance(identifier, str):
        return _lookup(identifier)()
    if isinstance(identifier, dict):
        if "class_name" not in identifier:
            raise ValueError(f"an optimizer config needs 'class_name', got keys {sorted(identifier)}")
        return _lookup(identifier["class_name"]).from_config(identifier.get("config", {}))
    if hasattr(identifier, "get_config") and type(identifier).__name__.lower() in {
            **_REGISTRY, **_WRAPPERS}:
        return _lookup(type(identifier).__name__).from_config(identifier.get_config())
    raise TypeError(
        "`identifier` must be an optimizer name, a config dict or an optimizer, "
        f"got {type(identifier).__name__}"
    )


def _lookup(name):
    if not isinstance(name, str):
        raise TypeError(f"an optimizer name must be a string, got {type(name).__name__}")
    cls = _REGISTRY.get(name.lower()) or _WRAPPERS.get(name.lower())
    if cls is None:
        raise ValueError(
            f"Unknown optimizer {name!r}; valid names: {', '.join(sorted(_REGISTRY))}"
        )
    return cls


def available():
    """The names `get` accepts."""
    return sorted(_REGISTRY)
