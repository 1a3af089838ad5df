"""fusedopt from PyTorch: a model's parameters and gradients in flat buffers, and a
`torch.optim.Optimizer` that updates them with fusedopt's fused step.

    opt = fusedopt.torch.AdamW(model.parameters(), lr=1e-3)          # torch's AdamW
    opt = fusedopt.torch.FusedOptimizer(model.parameters(), "nadam")  # a Keras 3 rule
    loss.backward(); opt.step(); opt.zero_grad()

Flattening: the parameters of each dtype are copied once into one 1-D tensor (one per
set of param groups that differ only in lr and weight_decay), and every `param.data`
becomes a view of it; every `param.grad` becomes a view of a second flat tensor, so
`backward()` accumulates straight into the flat gradients. fusedopt sees the same
memory through DLPack (NumPy on the CPU, CuPy on a GPU): no copy, one fused step per
flat buffer, with each group's lr and weight decay carried per segment.

Semantics: `FusedOptimizer(params, name, ...)` runs fusedopt's rule `name` with
Keras 3 semantics and Keras' argument names (`lr` is torch's name for
`learning_rate`). `Adam`, `AdamW` and `SGD` take torch.optim's arguments and defaults
and update as torch does: Adam's epsilon added after the bias correction, decoupled
decay by lr*weight_decay, or (Adam without decoupled decay, SGD) weight_decay*p added to
the gradient (fusedopt's coupled_weight_decay); SGD's momentum buffer in gradient units
with dampening, first step buf = g (fusedopt's momentum_in_gradient_units); maximize
negates the gradients in the step's first stage.

Mixed precision: bfloat16 and float16 parameters are accepted (a bfloat16 tensor is
aliased through its int16 view, since NumPy cannot import bfloat16 DLPack). Adam,
AdamW and SGD take fusedopt's master_weights, state_dtype, stochastic_rounding and seed
as keyword arguments (and param-group keys), FusedOptimizer as any Keras argument; a
combination the params' dtype does not take is refused before anything is flattened.

torch.amp.GradScaler: these optimizers handle scaling themselves
(`_step_supports_amp_scaling`): the fused step reads GradScaler's `grad_scale` and
`found_inf` tensors where it runs (on a GPU, in the kernels), unscales the gradients
on the way and skips the step when found_inf is set, with no host sync.

Importing this module imports torch; `import fusedopt` never does.
"""

import contextlib
import math
import numbers
import weakref
from collections.abc import Mapping

import numpy as np

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the machine
    raise ImportError("fusedopt.torch needs PyTorch: pip install 'fusedopt[torch]'") from e

from . import cuda, precision
from .flat import FlatBuffer
from .optimizer import get as _get_optimizer
from .segments import MAX_GROUPS

__all__ = ["FlatParameters", "flatten_parameters", "FusedOptimizer", "Adam", "AdamW", "SGD"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# fusedopt's name of each torch dtype (fusedopt.precision.DTYPES).
_DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32",
                torch.bfloat16: "bfloat16", torch.float16: "float16"}


# ==================================================================== flattening
class FlatParameters:
    """Parameters of one device and dtype whose storage is one flat tensor.

    Made by `flatten_parameters` (or by an optimizer of this module). Attributes:
        params: the parameters, in order.
        data: the flat 1-D tensor; `params[i].data` is a view of it.
        grad: the flat 1-D gradient tensor; `params[i].grad` is a view of it.
        flat_params, flat_grads: fusedopt FlatBuffers whose `data` aliases `data`
            and `grad` (NumPy arrays on the CPU, CuPy on a GPU, through DLPack).
    """

    def __init__(self, params):
        self.params = list(params)
        first = self.params[0]
        self.shapes = [tuple(p.shape) for p in self.params]
        sizes = [p.numel() for p in self.params]
        self.offsets = np.concatenate(([0], np.cumsum(sizes, dtype=np.int64))).tolist()
        self.data = torch.empty(self.offsets[-1], dtype=first.dtype, device=first.device)
        self.grad = torch.zeros_like(self.data)
        self._grad_views = []
        with torch.no_grad():
            for i, p in enumerate(self.params):
                view, grad_view = self._segment(self.data, i), self._segment(self.grad, i)
                view.copy_(p)
                if p.grad is not None:  # keep what was accumulated before flattening
                    grad_view.copy_(p.grad)
                p.data = view
                p.grad = grad_view
                self._grad_views.append(grad_view)
                p._fusedopt_flat = weakref.ref(self)  # for the "flattened twice" check
        self._param_pointers = [p.data_ptr() for p in self.params]
        self.flat_params = FlatBuffer(_array_alias(self.data), self.shapes)
        self.flat_grads = FlatBuffer(_array_alias(self.grad), self.shapes)

    @property
    def device(self):
        return self.data.device

    @property
    def dtype(self):
        return self.data.dtype

    def __len__(self):
        return len(self.params)

    def __repr__(self):
        return (f"FlatParameters({len(self)} parameters, {self.data.numel()} elements, "
                f"{self.dtype}, {self.device})")

    def _segment(self, flat, i):
        return flat[self.offsets[i]:self.offsets[i + 1]].view(self.shapes[i])

    def holds(self, param):
        """Whether `param`'s storage is still this buffer's (model.to(dtype) or
        .cuda() after flattening give a parameter new storage)."""
        start = self.data.data_ptr()
        return start <= param.data_ptr() < start + max(1, self.data.nbytes) \
            and param.dtype == self.dtype and param.device == self.device

    def check_in_place(self, where="`params`"):
        """Raise ValueError if a parameter no longer lives in the flat buffer. Pointers
        suffice (checked every step, so kept cheap): `data` keeps the buffer's memory
        alive, so no new storage can appear at a parameter's old address."""
        pointers = [p.data_ptr() for p in self.params]
        if pointers == self._param_pointers:
            return
        for i, (p, pointer) in enumerate(zip(self.params, self._param_pointers)):
            if p.data_ptr() != pointer:
                raise ValueError(
                    f"{where}: parameter {i} (shape {tuple(p.shape)}) no longer lives in the "
                    "flat buffer: its storage was replaced after flattening (model.to(), "
                    ".cuda(), .double() or an assignment to .data). Move the model first, "
                    "then create the optimizer")

    def stray_gradients(self, where="`params`"):
        """[(i, grad)] for each parameter whose .grad is not its view of the flat
        gradient (backward() after Module.zero_grad(), create_graph=True, or an
        assignment). Raise ValueError for a missing or sparse gradient."""
        if all(p.grad is view for p, view in zip(self.params, self._grad_views)):
            return []  # the common case, checked every step
        strays = []
        for i, (p, view) in enumerate(zip(self.params, self._grad_views)):
            g = p.grad
            if g is view:
                continue
            if g is None:
                raise ValueError(
                    f"{where}: parameter {i} (shape {tuple(p.shape)}) has no gradient "
                    "(.grad is None, e.g. after Module.zero_grad() and a backward pass that "
                    "did not reach it). torch.optim would skip it, but a fused step updates "
                    "every parameter of its flat buffer (momentum and weight decay would "
                    "move it): use this optimizer's zero_grad(), which zeroes gradients in "
                    "place, or leave the parameter out of the optimizer")
            if g.layout != torch.strided:
                raise ValueError(
                    f"{where}: parameter {i} (shape {tuple(p.shape)}) has a sparse gradient "
                    f"({g.layout}); fusedopt.torch needs dense gradients (e.g. "
                    "nn.Embedding(sparse=False))")
            strays.append((i, g))
        return strays

    def adopt_gradients(self, strays):
        """Copy stray gradients into the flat buffer and make .grad its view again."""
        with torch.no_grad():
            for i, g in strays:
                self._grad_views[i].copy_(g)
                self.params[i].grad = self._grad_views[i]

    def reattach_gradients(self):
        """Make every .grad its view of the flat gradient again (values not kept)."""
        for p, view in zip(self.params, self._grad_views):
            if p.grad is not view:
                p.grad = view


def flatten_parameters(params):
    """Move the parameters of a module (or an iterable of parameters) into flat
    buffers, one per dtype, and return them as a list of FlatParameters.

    Every parameter must be a leaf tensor that requires grad, float32, float64,
    bfloat16 or float16, on one CPU or CUDA device, and not flattened already; each
    violation raises a
    TypeError or ValueError before any parameter changes. Afterwards `param.data` and
    `param.grad` are views of `flat.data` and `flat.grad`; the parameters keep their
    values and any gradient they had.

    Use the FlatBuffers with any fusedopt optimizer:
        (flat,) = flatten_parameters(model)
        opt = fusedopt.Adam()
        loss.backward(); opt.apply(flat.flat_grads, flat.flat_params)
    """
    if isinstance(params, torch.nn.Module):
        params = params.parameters()
    tensors = _checked_parameters(params)
    return [FlatParameters(same_dtype) for same_dtype in _by_dtype(tensors)]


def _checked_parameters(params, taken=(), device=None, where="`params`"):
    """`params` as a list of tensors, each fit to be flattened; `taken` holds ids of
    parameters already in the optimizer, `device` the device they live on."""
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{where} must be an iterable of tensors, got a single tensor; "
                        "wrap it in a list")
    if isinstance(params, (set, frozenset)):
        raise TypeError(f"{where} must be an ordered collection (a list), not a set: the "
                        "order of a set changes between runs")
    try:
        tensors = list(params)
    except TypeError:
        raise TypeError(f"{where} must be an iterable of tensors, got "
                        f"{type(params).__name__}") from None
    if not tensors:
        raise ValueError(f"{where} is empty: there is nothing to optimize")
    for i, p in enumerate(tensors):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{where}: item {i} is a {type(p).__name__}, not a tensor")
    devices = {p.device for p in tensors} | ({device} if device is not None else set())
    if len(devices) > 1:
        raise ValueError(
            f"{where} live on several devices ({', '.join(sorted(map(str, devices)))}); "
            "one fusedopt.torch optimizer steps the parameters of one device: create one "
            "optimizer per device")
    seen = set(taken)
    for i, p in enumerate(tensors):
        _check_parameter(p, i, where)
        if id(p) in seen:
            raise ValueError(f"{where}: parameter {i} (shape {tuple(p.shape)}) is given twice "
                             "(or is already in this optimizer)")
        seen.add(id(p))
    return tensors


def _check_parameter(p, i, where):
    shape = tuple(p.shape)
    if not p.is_leaf:
        raise ValueError(f"{where}: parameter {i} (shape {shape}) is not a leaf tensor (it is "
                         "computed from other tensors); only leaves can be optimized")
    if not p.requires_grad:
        raise ValueError(
            f"{where}: parameter {i} (shape {shape}) does not require grad; a fused step "
            "would still update it. Pass only trainable parameters, e.g. "
            "[p for p in model.parameters() if p.requires_grad]")
    if p.layout != torch.strided:
        raise ValueError(f"{where}: parameter {i} (shape {shape}) is sparse ({p.layout}); "
                         "only dense parameters can be flattened")
    if p.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{where}: parameter {i} (shape {shape}) has dtype {p.dtype}; "
                         "fusedopt supports torch.float32, torch.float64, torch.bfloat16 "
                         "and torch.float16")
    if p.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{where}: parameter {i} (shape {shape}) lives on {p.device}; "
                         "fusedopt runs on the CPU and on CUDA devices")
    if p.grad is not None and p.grad.layout != torch.strided:
        raise ValueError(f"{where}: parameter {i} (shape {shape}) has a sparse gradient; "
                         "fusedopt.torch needs dense gradients")
    owner = getattr(p, "_fusedopt_flat", None)
    owner = owner() if owner is not None else None
    if owner is not None and owner.holds(p):
        raise ValueError(f"{where}: parameter {i} (shape {shape}) is already flattened (by "
                         "flatten_parameters or another fusedopt.torch optimizer); flattening "
                         "it again would detach it from the first flat buffer")


def _by_dtype(tensors):
    groups = {}
    for p in tensors:
        groups.setdefault(p.dtype, []).append(p)
    return list(groups.values())


def _array_alias(tensor):
    """A NumPy (CPU) or CuPy (CUDA) array sharing `tensor`'s memory, through DLPack.
    NumPy cannot import a bfloat16 DLPack tensor: a bfloat16 tensor travels as its
    int16 view and is viewed back as fusedopt's bfloat16 dtype
    (precision.numpy_dtype("bfloat16"), ml_dtypes'), the same memory."""
    bf16 = tensor.dtype == torch.bfloat16
    source = tensor.view(torch.int16) if bf16 else tensor
    if tensor.device.type == "cuda":
        array = cuda.module_for(f"gpu:{tensor.device.index}").from_dlpack(source)
    else:
        array = np.from_dlpack(source)
        if not array.flags.writeable:  # some NumPy versions import DLPack read-only
            array = source.numpy()     # the same memory, through the buffer protocol
    return array.view(precision.numpy_dtype("bfloat16")) if bf16 else array


def _tensor_alias(array):
    """A torch tensor sharing a fusedopt array's memory (DLPack); the inverse of
    `_array_alias`. A bfloat16 array cannot export DLPack: it travels as its int16 view
    and the tensor is viewed back as torch.bfloat16."""
    if np.dtype(array.dtype).name == "bfloat16":
        return torch.from_dlpack(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_dlpack(array)


def _torch_stream(device):
    """Run fusedopt's CUDA launches on torch's current stream, so that a step is
    ordered after the backward pass that wrote the gradients (no sync)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    cupy = cuda.module_for(f"gpu:{device.index}")
    stream = torch.cuda.current_stream(device)
    return cupy.cuda.ExternalStream(stream.cuda_stream, device.index)


def _bump_versions(params):
    """fusedopt writes the parameters through NumPy/CuPy, which torch's version
    counters do not see; bump them as an in-place torch update would, so autograd still
    refuses a backward pass through values the step overwrote."""
    try:
        torch.autograd.graph.increment_version(params)
    except TypeError:  # torch versions whose increment_version takes one tensor
        for p in params:
            torch.autograd.graph.increment_version(p)


# ===================================================================== optimizers
class _Bucket:
    """One flat buffer (the parameters of one dtype of the param groups `groups`, in
    order) and the fusedopt optimizer that steps it. `configs` holds each group's
    (fusedopt name, arguments) as the optimizer was last set up for; `segment_groups`
    each segment's position in `groups`."""

    def __init__(self, groups, segment_groups, flat, optimizer, configs):
        self.groups = groups
        self.segment_groups = segment_groups
        self.flat = flat
        self.optimizer = optimizer
        self.configs = configs
        self.slot_tensors = _slot_tensors(optimizer)

    def replace_optimizer(self, optimizer, configs):
        self.optimizer, self.configs = optimizer, configs
        self.slot_tensors = _slot_tensors(optimizer)

    def where(self):
        return " and ".join(f"param_groups[{i}]" for i in self.groups)


# The weight decays a group may switch off (fusedopt's decoupled one and the coupled L2
# of torch's Adam); a per-segment decay switch turns both off.
_DECAY_KEYS = ("weight_decay", "coupled_weight_decay")


def _shared(config):
    """What param groups sharing one flat buffer must agree on: everything but the
    learning rate and the weight decays."""
    name, arguments = config
    return name, {k: v for k, v in arguments.items()
                  if k != "learning_rate" and k not in _DECAY_KEYS}


def _decays(config):
    """A group's weight decays, 0 where unset: all 0 means decay off."""
    return tuple(config[1].get(k) or 0.0 for k in _DECAY_KEYS)


def _merged(configs, where):
    """(name, arguments) of the one fusedopt optimizer stepping param groups whose
    configs differ only in lr and weight_decay, with each group's (lr multiplier,
    decay on): the optimizer's learning rate is 1 and a group's multiplier its lr, so
    a segment steps with exactly its group's lr; the groups' weight decays must be 0
    (decay off) or one common value. Raises ValueError naming `where` otherwise."""
    shared = _shared(configs[0])
    decays = {_decays(c) for c in configs if any(_decays(c))}
    if any(_shared(c) != shared for c in configs) or len(decays) > 1:
        raise ValueError(
            f"{where} share one flat buffer (they differed only in lr and weight_decay when "
            "they were added), so they must keep the same other hyperparameters and one "
            "nonzero weight_decay (or 0)")
    name, arguments = configs[0]
    arguments = dict(arguments, learning_rate=1.0)
    if decays:  # the one nonzero setting; the groups without decay switch it off
        arguments.update({k: v for k, v in zip(_DECAY_KEYS, decays.pop()) if k in arguments})
    attributes = [(c[1]["learning_rate"], any(_decays(c))) for c in configs]
    return name, arguments, attributes


def _slot_tensors(optimizer):
    """{slot name: a torch tensor aliasing the fusedopt state buffer} (DLPack)."""
    return {name: _tensor_alias(buf) for name, buf in optimizer.slots().items()}


class _ParameterState(Mapping):
    """`optimizer.state[param]`: live views of the parameter's segment of each state
    buffer, under torch's names, and its step count (read when asked)."""

    def __init__(self, optimizer, bucket, index):
        self._optimizer, self._bucket, self._index = optimizer, bucket, index

    def _names(self):
        return {self._optimizer._state_name(n): n for n in self._bucket.slot_tensors}

    def __getitem__(self, key):
        bucket = self._bucket
        if key == "step":
            return torch.tensor(float(bucket.optimizer.iterations), dtype=torch.float32)
        name = self._names()[key]
        return bucket.flat._segment(bucket.slot_tensors[name], self._index)

    def __iter__(self):
        return iter(["step", *self._names()])

    def __len__(self):
        return 1 + len(self._bucket.slot_tensors)

    def __repr__(self):
        return repr({k: self[k] for k in self})


_EMA_KEYS = ("use_ema", "ema_momentum", "ema_overwrite_frequency")


class FusedOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer running fusedopt's rule `optimizer` (Keras 3 semantics).

    Args:
        params: an iterable of parameters, or of dicts (parameter groups), as for any
            torch optimizer (named parameters too).
        optimizer: a fusedopt name: one of fusedopt.available().
        lr: the learning rate (default: the rule's Keras default). The step uses
            `param_groups[i]["lr"]`, so torch.optim.lr_scheduler works.
        **hyperparameters: the rule's Keras arguments (weight_decay, beta_1,
            clipnorm, ...). Each is also a key of every parameter group, so a group can
            set its own, e.g. {"params": biases, "weight_decay": 0.0}.

    Parameter groups that differ only in `lr` and `weight_decay` (0, or one common
    nonzero value) share one flat buffer per dtype and one fusedopt optimizer, with a
    learning-rate multiplier and weight decay on/off per segment (fusedopt.segments):
    one fused pass for all of them, each parameter stepped exactly with its group's lr.
    Groups that differ in any other hyperparameter (betas, eps, amsgrad, ...) get flat
    buffers and fused passes of their own. `clipnorm` is per parameter, and
    `global_clipnorm` clips the gradients of each flat buffer together. Groups sharing a
    buffer must keep sharing: a later edit giving one of them other hyperparameters
    (or a second nonzero weight_decay) is refused at step().

    Differences from torch.optim:
        - zero_grad() zeroes the gradients in place (set_to_none is accepted but
          gradients stay views of the flat buffer), and step() refuses a parameter
          whose .grad is None instead of skipping it: a fused step updates its whole
          flat buffer.
        - Every parameter must be a float32/float64/bfloat16/float16 leaf that requires
          grad, all on one
          device; create the optimizer after moving the model (model.to()).
        - add_param_group() is supported: the new group gets its own flat buffer.
        - With torch.amp.GradScaler the step unscales the gradients inside the fused
          pass and is skipped when they hold inf/NaN: GradScaler's scale and inf flag
          stay device tensors that the step reads where it runs (no host sync); a
          skipped step counts in the fusedopt optimizer's skipped_steps, and
          state[p]["step"] does not advance, as in torch. After scaler.unscale_(opt)
          only the inf flag is passed.

    Keras' EMA: with use_ema=True (ema_momentum, ema_overwrite_frequency: for the whole
    optimizer, not per group) each parameter's moving average is `state[p]["average"]`;
    swap_ema_weights() / `with opt.ema_weights():` put the averages in the model (for
    evaluation) and back, finalize_variable_values() keeps them, in place on the
    parameters' device. gradient_accumulation_steps is refused: torch accumulates
    gradients across backward() calls itself.
    """

    _state_names = {}  # fusedopt slot name -> the name in `state` (torch's, for Adam)
    _stepless = False  # whether torch's own state of this optimizer lacks "step" (SGD)
    # torch.amp.GradScaler then hands step() its scale and inf flag (as the attributes
    # grad_scale and found_inf) instead of unscaling every gradient in a pass of its
    # own: the fused step unscales them on the way.
    _step_supports_amp_scaling = True
    _not_group_keys = ("name", "learning_rate", "use_ema", "ema_momentum",
                       "ema_overwrite_frequency", "gradient_accumulation_steps")

    def __init__(self, params, optimizer="adam", lr=None, **hyperparameters):
        if not isinstance(optimizer, str):
            raise TypeError(f"`optimizer` must be a fusedopt optimizer name such as 'adamw', "
                            f"got {type(optimizer).__name__}")
        for key, why in (("learning_rate", "pass lr= (torch's name, kept in param_groups)"),
                         ("decay", "use a torch.optim.lr_scheduler"),
                         ("skip_nonfinite", "use torch.amp.GradScaler, which skips steps "
                                            "with inf/NaN gradients"),
                         ("gradient_accumulation_steps",
                          "torch accumulates gradients itself: run backward() on N "
                          "micro-batches (each loss divided by N for their mean) and "
                          "step() once")):
            # (gradient accumulation's off value, None, as Keras' configs hold it, passes)
            if key in hyperparameters and not (key == "gradient_accumulation_steps"
                                               and hyperparameters[key] is None):
                raise ValueError(f"`{key}` is not an argument of fusedopt.torch.FusedOptimizer: "
                                 f"{why}")
        if lr is not None:
            hyperparameters["learning_rate"] = _learning_rate(lr, "`lr`")
        template = _get_optimizer({"class_name": optimizer, "config": hyperparameters})
        config = template.get_config()
        self._rule_name = optimizer.lower()
        self._keras_keys = [k for k in config if k not in self._not_group_keys]
        # Keras' EMA options act on the whole optimizer, not per group: every flat
        # buffer's fusedopt optimizer takes them (swap_ema_weights).
        self._ema_options = {k: config[k] for k in _EMA_KEYS}
        defaults = {"lr": config["learning_rate"], **{k: config[k] for k in self._keras_keys}}
        self._setup(params, defaults)

    # ------------------------------------------------------------ subclass API
    def _fusedopt_config(self, group, where):
        """(fusedopt name, constructor arguments) for a parameter group; raises
        TypeError/ValueError naming the group's key for a bad value."""
        arguments = {"learning_rate": _learning_rate(group["lr"], f"{where}['lr']")}
        arguments.update({k: group[k] for k in self._keras_keys})
        arguments.update(self._ema_options)
        return self._rule_name, arguments

    def _state_name(self, slot):
        return self._state_names.get(slot, slot)

    # ------------------------------------------------------------------ set-up
    def _setup(self, params, defaults):
        self._buckets = []
        if isinstance(params, torch.Tensor):
            raise TypeError("`params` must be an iterable of tensors or of dicts (parameter "
                            "groups), got a single tensor; wrap it in a list")
        if isinstance(params, (set, frozenset)):
            raise TypeError("`params` must be an ordered collection (a list), not a set: the "
                            "order of a set changes between runs")
        groups = list(params)
        if not groups:
            raise ValueError("`params` is empty: there is nothing to optimize")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        # Every group is checked before the first is flattened, so a bad group leaves
        # every parameter as it was.
        taken, device = set(), None
        for i, group in enumerate(groups):
            tensors = self._check_group(group, defaults, taken, device, f"param_groups[{i}]")
            taken.update(id(p) for p in tensors)
            device = tensors[0].device
        self._initial_groups = True  # add_param_group: torch's bookkeeping only
        super().__init__(groups, defaults)  # calls add_param_group for each group
        del self._initial_groups
        self._add_buckets(range(len(self.param_groups)))

    def _check_group(self, group, defaults, taken, device, where):
        """Check a parameter group completely (its parameters and its hyperparameters)
        without changing anything; return its tensors."""
        if not isinstance(group, dict):
            raise TypeError(f"{where} must be a dict, got {type(group).__name__}")
        if "params" not in group:
            raise ValueError(f"{where} has no 'params'")
        params = group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, (set, frozenset)):
            params = list(params)  # a generator is read once, here, as torch does
        group["params"] = params
        tensors = _checked_parameters([p[1] if isinstance(p, tuple) else p for p in params],
                                      taken, device, f"{where}['params']")
        template, _ = self._new_fusedopt({**defaults, **group}, where)
        for dtype in {p.dtype for p in tensors}:
            # The mixed-precision options against the params' dtype (e.g.
            # stochastic_rounding with float16 params), before anything is flattened.
            try:
                template._precision_for(_DTYPE_NAMES[dtype])
            except (TypeError, ValueError) as e:
                raise type(e)(f"{where} ({dtype} params): {e}") from e
        return tensors

    def _new_fusedopt(self, group, where):
        config = self._fusedopt_config(group, where)
        name, arguments = config
        try:
            return _get_optimizer({"class_name": name, "config": dict(arguments)}), config
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from e

    def add_param_group(self, param_group):
        """Add a group (a dict with 'params' and any hyperparameters); its parameters
        are flattened into new flat buffers of their own, stepped from 0 as torch
        steps new parameters. Raises before anything changes."""
        if getattr(self, "_initial_groups", False):
            super().add_param_group(param_group)  # checked by _setup, flattened after
            return
        where = f"param_groups[{len(self.param_groups)}]"
        taken = {id(p) for g in self.param_groups for p in g["params"]}
        device = self._buckets[0].flat.device if self._buckets else None
        self._check_group(param_group, self.defaults, taken, device, where)
        super().add_param_group(param_group)  # torch's bookkeeping: defaults, names
        self._add_buckets([len(self.param_groups) - 1])

    def _add_buckets(self, indices):
        """Flatten the param groups `indices` (already checked): groups whose settings
        differ only in lr and weight_decay (0 or one common value) share a flat buffer
        per dtype and one fusedopt optimizer, with per-segment lr multipliers and
        weight decay on/off (fusedopt.segments): one fused step for all of them."""
        plans = []  # [shared config, dtype, [group index], [config], [tensor], [position]]
        for i in indices:
            config = self._fusedopt_config(self.param_groups[i], f"param_groups[{i}]")
            for tensors in _by_dtype(self.param_groups[i]["params"]):
                plan = next((b for b in plans if self._joins(b, config, tensors[0].dtype)),
                            None)
                if plan is None:
                    plan = [_shared(config), tensors[0].dtype, [], [], [], []]
                    plans.append(plan)
                plan[2].append(i)
                plan[3].append(config)
                plan[4].extend(tensors)
                plan[5].extend([len(plan[2]) - 1] * len(tensors))
        for _, _, groups, configs, tensors, positions in plans:
            flat = FlatParameters(tensors)
            where = " and ".join(f"param_groups[{i}]" for i in groups)
            optimizer = self._bucket_optimizer(positions, configs, where)
            optimizer.build(flat.flat_params)
            bucket = _Bucket(groups, positions, flat, optimizer, configs)
            self._buckets.append(bucket)
            for k, p in enumerate(flat.params):
                self.state[p] = _ParameterState(self, bucket, k)

    @staticmethod
    def _joins(plan, config, dtype):
        decays = {_decays(c) for c in plan[3] + [config] if any(_decays(c))}
        return (plan[0] == _shared(config) and plan[1] == dtype and len(decays) <= 1
                and len(plan[2]) < MAX_GROUPS)

    def _bucket_optimizer(self, segment_groups, configs, where):
        """A new fusedopt optimizer (not built) for a bucket of groups with `configs`,
        whose segment s belongs to the group configs[segment_groups[s]]."""
        name, arguments, attributes = _merged(configs, where)
        try:
            optimizer = _get_optimizer({"class_name": name, "config": arguments})
        except (TypeError, ValueError) as e:
            raise type(e)(f"{where}: {e}") from e
        optimizer.set_segment_attributes(
            lr_multipliers=[attributes[g][0] for g in segment_groups],
            decay=[attributes[g][1] for g in segment_groups])
        return optimizer

    @property
    def flat_parameters(self):
        """The FlatParameters of every group and dtype, in order."""
        return [b.flat for b in self._buckets]

    # -------------------------------------------------------------------- step
    def zero_grad(self, set_to_none=True):
        """Zero every gradient in place: one fill per flat buffer. `set_to_none` is
        accepted for torch's signature, but gradients are never set to None: they stay
        views of the flat gradient buffer that backward() accumulates into."""
        for bucket in self._buckets:
            bucket.flat.check_in_place()
            bucket.flat.reattach_gradients()
            bucket.flat.grad.zero_()

    def step(self, closure=None):
        """One fused step of every flat buffer; returns the closure's loss, if any.

        Everything is checked first (parameters still in their buffers, gradients,
        every group's hyperparameters); a bad value raises with nothing changed.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._ema_swapped():
            raise ValueError("the parameters hold the EMA weights (swap_ema_weights); swap "
                             "them back before the next step")
        plans = [self._plan(bucket) for bucket in self._buckets]
        grad_scale, found_inf = self._grad_scaler_request()
        for bucket, (strays, change) in zip(self._buckets, plans):
            bucket.flat.adopt_gradients(strays)
            if change is not None:
                change()
        for bucket in self._buckets:
            self._run(bucket, grad_scale, found_inf)
        return loss

    def _plan(self, bucket):
        """(stray gradients, the change of the bucket's optimizer or None): all checks
        of a step, with nothing changed yet."""
        where = bucket.where()
        bucket.flat.check_in_place(f"{where}['params']")
        strays = bucket.flat.stray_gradients(f"{where}['params']")
        configs = [self._fusedopt_config(self.param_groups[i], f"param_groups[{i}]")
                   for i in bucket.groups]
        if configs == bucket.configs:
            return strays, None
        name, arguments, attributes = _merged(configs, where)
        if (name, arguments) == _merged(bucket.configs, where)[:2]:
            # Only the groups' lrs or decay switches changed (an lr scheduler): new
            # segment attributes, the same optimizer and state.
            optimizer, segment_groups = bucket.optimizer, bucket.segment_groups

            def set_attributes():
                optimizer.set_segment_attributes(
                    lr_multipliers=[attributes[g][0] for g in segment_groups],
                    decay=[attributes[g][1] for g in segment_groups])
                bucket.configs = configs
            return strays, set_attributes
        # Another hyperparameter changed (a scheduler cycling betas, a user editing a
        # group): a new fusedopt optimizer with the same state, built through its public
        # API, so its own checks apply.
        optimizer = self._bucket_optimizer(bucket.segment_groups, configs, where)
        state = bucket.optimizer.state_dict()
        state.pop("segment_attributes", None)  # the new optimizer's own apply
        state["optimizer"] = type(optimizer).__name__.lower()  # e.g. adam <-> adamw
        try:
            optimizer.load_state_dict(state)
        except ValueError as e:
            raise ValueError(f"{where}: this change alters the optimizer's state slots, "
                             f"which cannot change after construction: {e}") from e
        optimizer.build(bucket.flat.flat_params)
        return strays, lambda: bucket.replace_optimizer(optimizer, configs)

    def _grad_scaler_request(self):
        """(grad_scale, found_inf): the tensors torch.amp.GradScaler sets on an optimizer
        with `_step_supports_amp_scaling` around its call to step() (grad_scale None
        after unscale_()), or None each. Never read here: the fused step reads them on
        their device, so step() does not wait for the GPU."""
        return getattr(self, "grad_scale", None), getattr(self, "found_inf", None)

    def _run(self, bucket, grad_scale, found_inf):
        optimizer, flat = bucket.optimizer, bucket.flat
        with _torch_stream(flat.device):
            optimizer.apply(flat.flat_grads, flat.flat_params,
                            grad_scale=_step_input(grad_scale, flat.device, "grad_scale"),
                            found_inf=_step_input(found_inf, flat.device, "found_inf"))
        _bump_versions(flat.params)

    # --------------------------------------------------------------------- EMA
    # Keras' use_ema for torch models: every parameter's moving average is a state slot
    # ("average") of its flat buffer; these swap it into the parameters and back in
    # place, one exchange per flat buffer on torch's current stream (no host copy).
    def swap_ema_weights(self):
        """Exchange every parameter with its moving average (use_ema=True): the model
        then holds the EMA weights, e.g. for evaluation. Call it again to swap back;
        step() is refused meanwhile. Refused before the first step (no average yet)."""
        self._check_ema("swap_ema_weights")
        for bucket in self._buckets:
            with _torch_stream(bucket.flat.device):
                bucket.optimizer.swap_ema_weights(bucket.flat.flat_params)
            _bump_versions(bucket.flat.params)

    def ema_weights(self):
        """A context manager: the parameters hold their moving averages inside the
        block (`with opt.ema_weights(): evaluate(model)`), their own values after it."""

        @contextlib.contextmanager
        def swapped():
            self.swap_ema_weights()
            try:
                yield self
            finally:
                self.swap_ema_weights()

        return swapped()

    def finalize_variable_values(self):
        """Keras' end of training: copy every moving average into its parameter (the
        averages are kept). Without use_ema nothing changes, as in Keras."""
        if not self._uses_ema():
            return
        self._check_ema("finalize_variable_values")
        if self._ema_swapped():
            raise ValueError("the parameters hold the EMA weights already "
                             "(swap_ema_weights)")
        for bucket in self._buckets:
            with _torch_stream(bucket.flat.device):
                bucket.optimizer.finalize_variable_values(bucket.flat.flat_params)
            _bump_versions(bucket.flat.params)

    def _uses_ema(self):
        return all(b.optimizer.use_ema for b in self._buckets)

    def _ema_swapped(self):
        return any(b.optimizer._ema_swapped for b in self._buckets)

    def _check_ema(self, what):
        """Everything a swap or finalize needs, checked on every flat buffer before
        any changes (ValueError otherwise)."""
        if not self._uses_ema():
            raise ValueError(f"{what} needs an optimizer made with `use_ema=True`")
        for bucket in self._buckets:
            bucket.flat.check_in_place(f"{bucket.where()}['params']")
            # Calls counted, not updates: every call (an accumulating one too) moves
            # the average.
            if bucket.optimizer._counters()[0] == 0 and not bucket.optimizer._ema_swapped:
                raise ValueError(f"{what}: {bucket.where()} has no moving average yet; "
                                 "step() first")

    # ------------------------------------------------------------------- state
    def state_dict(self):
        """torch's layout: {"state": {index: {"step": tensor, slot: tensor}},
        "param_groups": [...]}, with copies of the state (not live views). Refused
        while the parameters hold the EMA weights (swap_ema_weights)."""
        for bucket in self._buckets:
            bucket.optimizer._refuse_while_swapped("state_dict", "saving")
        state_dict = super().state_dict()
        state_dict["state"] = {
            index: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
            for index, s in state_dict["state"].items()}
        return state_dict

    def load_state_dict(self, state_dict):
        """Restore a state_dict() of this optimizer (or torch.optim's Adam/AdamW for
        this module's Adam/AdamW): hyperparameters of every group, the step count and
        every state tensor. Refused, with nothing changed, if it does not fit (or
        while the parameters hold the EMA weights)."""
        for bucket in self._buckets:
            bucket.optimizer._refuse_while_swapped("load_state_dict", "loading")
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        groups, states = self._parse_state_dict(state_dict)
        changes = []
        for bucket in self._buckets:
            configs = [self._fusedopt_config({**self.param_groups[i], **groups[i]},
                                             f"state_dict['param_groups'][{i}]")
                       for i in bucket.groups]
            where = " and ".join(f"state_dict['param_groups'][{i}]" for i in bucket.groups)
            optimizer = self._bucket_optimizer(bucket.segment_groups, configs, where)
            fused_state = self._bucket_state(bucket, optimizer, states)
            if fused_state is not None:
                optimizer.load_state_dict(fused_state)
            optimizer.build(bucket.flat.flat_params)
            changes.append((bucket, optimizer, configs))
        for group, saved in zip(self.param_groups, groups):
            group.update(saved)
        for bucket, optimizer, configs in changes:
            bucket.replace_optimizer(optimizer, configs)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _parse_state_dict(self, state_dict):
        """(saved hyperparameters of each group, {parameter id: its saved state})."""
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("`state_dict` must be a dict with 'state' and 'param_groups', "
                             "as state_dict() returns")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"`state_dict` has {len(saved_groups)} parameter groups, this "
                             f"optimizer {len(self.param_groups)}")
        groups, states = [], {}
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if not isinstance(saved, dict) or "params" not in saved:
                raise ValueError(f"`state_dict['param_groups'][{i}]` must be a dict with "
                                 "'params'")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"`state_dict` group {i} has {len(saved['params'])} parameters, "
                                 f"this optimizer's {len(group['params'])}")
            for index, p in zip(saved["params"], group["params"]):
                if index in state_dict["state"]:
                    states[id(p)] = state_dict["state"][index]
            groups.append({k: v for k, v in saved.items()
                           if k not in ("params", "param_names")})
        return groups, states

    def _bucket_state(self, bucket, optimizer, states):
        """fusedopt's state_dict for a bucket from torch's per-parameter states, or
        None when no parameter has one (a fresh start, as torch's lazy state)."""
        flat, where = bucket.flat, "`state_dict['state']`"
        present = [states.get(id(p)) for p in flat.params]
        if all(s is None for s in present):
            return None
        if any(s is None for s in present):
            raise ValueError(f"{where} holds state for some parameters of a flat buffer but "
                             "not for others; fusedopt steps them together")
        expected = {"step", *(self._state_name(n) for n in optimizer.slot_names)}
        steps = set()
        for i, (p, s) in enumerate(zip(flat.params, present)):
            if set(s) | {"step"} != expected or ("step" not in s and not self._stepless):
                raise ValueError(f"{where}: a parameter's state holds {sorted(s)}, this "
                                 f"configuration keeps {sorted(expected)}")
            # torch's SGD keeps no step count: a state with buffers is past its first step.
            steps.add(float(s["step"]) if "step" in s else 1.0)
            for key in expected - {"step"}:
                if tuple(s[key].shape) != tuple(p.shape):
                    raise ValueError(f"{where}: {key!r} has shape {tuple(s[key].shape)}, its "
                                     f"parameter {tuple(p.shape)}")
        if len(steps) != 1 or not float(next(iter(steps))).is_integer():
            raise ValueError(f"{where}: the parameters of one flat buffer must share one whole "
                             f"step count, got {sorted(steps)}")
        # Each slot in its own dtype (the state dtype; the master copy float32): values
        # go through float64, which holds every one of them exactly, so a saved
        # bfloat16 or float32 slot comes back bit for bit.
        param_dtype = _DTYPE_NAMES[flat.dtype]
        slots = {name: np.concatenate([
            s[self._state_name(name)].detach().to("cpu", torch.float64).reshape(-1).numpy()
            for s in present]).astype(precision.numpy_dtype(
                optimizer._slot_dtype(name, param_dtype)))
            for name in optimizer.slot_names}
        return {"optimizer": type(optimizer).__name__.lower(), "iterations": int(steps.pop()),
                "layout": flat.flat_params.layout.to_dict(), "slots": slots}


def _step_input(value, device, name):
    """GradScaler's `grad_scale` or `found_inf` as a 1-element float32 array on
    `device` aliasing the tensor (DLPack), for FusedOptimizer.apply; None stays None.
    Only device operations (a view; a conversion or a copy queued on the stream when
    the dtype or device differs): nothing is read on the host."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        value = torch.tensor(float(value), device=device)  # a number set by hand
    if value.numel() != 1:
        raise ValueError(f"`{name}` from the GradScaler must have one element, got shape "
                         f"{tuple(value.shape)}")
    value = value.reshape(1)
    if value.dtype != torch.float32 or value.device != device:
        value = value.to(device=device, dtype=torch.float32, non_blocking=True)
    return _array_alias(value.contiguous())


def _learning_rate(lr, where):
    """A group's lr as a float (a 0-d tensor is read once, on change checks)."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"{where} must be a number or a 1-element tensor, got shape "
                             f"{tuple(lr.shape)}")
        lr = lr.item()
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise TypeError(f"{where} must be a number, got {type(lr).__name__}")
    lr = float(lr)
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"{where} must be finite and >= 0, got {lr!r}")
    return lr


# ======================================================== torch-compatible Adam
class Adam(FusedOptimizer):
    """torch.optim.Adam's arguments, defaults and update, as one fused step.

    The update is torch's: epsilon is added after bias-correcting sqrt(v) (fusedopt's
    Adam with epsilon_after_bias_correction=True), and with decoupled_weight_decay
    (or AdamW) p *= 1 - lr*weight_decay before it; without, weight_decay*p is added to
    the gradient (L2, fusedopt's coupled_weight_decay). `state[p]` holds torch's
    "step", "exp_avg", "exp_avg_sq" (and "max_exp_avg_sq" with amsgrad), and
    state_dict() has torch's layout, so checkpoints move between this class and
    torch.optim.Adam.

    torch's other constructor arguments: `maximize` is supported (the gradients are
    negated in the step's first stage, fusedopt's `maximize`); `capturable` is
    accepted and changes nothing, since fusedopt's step state (step counts, the rate,
    bias corrections) lives on the device already; `foreach` and `fused` are accepted
    and change nothing, since the step is always one fused pass per flat buffer;
    `differentiable=True` is refused (a ValueError): the step writes the parameters
    outside autograd.

    fusedopt's mixed-precision options, for bfloat16/float16 params: `master_weights`
    (a float32 copy, state[p]["master"]), `state_dtype` ("bfloat16": the state as
    torch's fused step keeps it for bfloat16 params; the params then match torch's
    fused CPU step bit for bit in tests/test_torch_bf16.py, the state within one
    bfloat16 spacing), `stochastic_rounding` and `seed` (bfloat16 params).
    """

    _state_names = {"momentum": "exp_avg", "velocity": "exp_avg_sq",
                    "velocity_hat": "max_exp_avg_sq"}
    _always_decoupled = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 master_weights=False, state_dtype=None, stochastic_rounding=False, seed=0):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "amsgrad": amsgrad, "maximize": maximize, "foreach": foreach,
                    "capturable": capturable, "differentiable": differentiable,
                    "fused": fused, "decoupled_weight_decay": decoupled_weight_decay,
                    **_precision_defaults(master_weights, state_dtype, stochastic_rounding,
                                          seed)}
        self._setup(params, defaults)

    def _fusedopt_config(self, group, where):
        maximize = _torch_flags(group, where)
        betas = group["betas"]
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"{where}['betas'] must be a pair (beta1, beta2), got {betas!r}")
        beta_1, beta_2 = (_real(b, f"{where}['betas']") for b in betas)
        for b in (beta_1, beta_2):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{where}['betas'] must lie in [0, 1), got {tuple(betas)}")
        eps = _real(group["eps"], f"{where}['eps']")
        weight_decay = _real(group["weight_decay"], f"{where}['weight_decay']")
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"{where}['eps'] must be finite and >= 0, got {eps!r}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"{where}['weight_decay'] must be finite and >= 0, got "
                             f"{weight_decay!r}")
        decoupled = self._always_decoupled or bool(group.get("decoupled_weight_decay"))
        if not isinstance(group["amsgrad"], bool):
            raise TypeError(f"{where}['amsgrad'] must be a bool, got {group['amsgrad']!r}")
        arguments = {"learning_rate": _learning_rate(group["lr"], f"{where}['lr']"),
                     "beta_1": beta_1, "beta_2": beta_2, "epsilon": eps,
                     "amsgrad": group["amsgrad"], "epsilon_after_bias_correction": True,
                     "maximize": maximize, **_precision_arguments(group)}
        if decoupled:
            return "adamw", {**arguments, "weight_decay": weight_decay}
        # torch's Adam adds weight_decay*p to the gradient: fusedopt's coupled decay.
        return "adam", {**arguments, "coupled_weight_decay": weight_decay or None}


class AdamW(Adam):
    """torch.optim.AdamW's arguments, defaults and update, as one fused step: Adam with
    p *= 1 - lr*weight_decay first (weight_decay defaults to 0.01, torch's).
    See Adam for the state layout and what is not supported."""

    _always_decoupled = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, master_weights=False, state_dtype=None,
                 stochastic_rounding=False, seed=0):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach,
                         maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, master_weights=master_weights,
                         state_dtype=state_dtype, stochastic_rounding=stochastic_rounding,
                         seed=seed)


# fusedopt's mixed-precision options (fusedopt.precision), keyword arguments of Adam,
# AdamW and SGD and keys of their param groups, passed to the fusedopt optimizer as they
# are: it checks them (errors name the argument), and step() refuses a combination that
# the params' dtype does not take before anything is flattened.
_PRECISION_KEYS = ("master_weights", "state_dtype", "stochastic_rounding", "seed")


def _precision_defaults(master_weights, state_dtype, stochastic_rounding, seed):
    return {"master_weights": master_weights, "state_dtype": state_dtype,
            "stochastic_rounding": stochastic_rounding, "seed": seed}


def _precision_arguments(group):
    """The mixed-precision options of a group for the fusedopt optimizer (absent keys,
    e.g. a torch.optim state_dict's groups, mean the defaults)."""
    defaults = _precision_defaults(False, None, False, 0)
    return {k: group.get(k, defaults[k]) for k in _PRECISION_KEYS}


def _torch_flags(group, where):
    """Check torch's boolean constructor arguments of a group; return `maximize`.
    capturable, foreach and fused change nothing here (see Adam); differentiable=True
    is refused."""
    for key in ("maximize", "capturable", "differentiable"):
        if not isinstance(group.get(key, False), bool):
            raise TypeError(f"{where}['{key}'] must be a bool, got {group[key]!r}")
    for key in ("foreach", "fused"):
        if group.get(key) is not None and not isinstance(group[key], bool):
            raise TypeError(f"{where}['{key}'] must be a bool or None, got {group[key]!r}")
    if group.get("differentiable"):
        raise ValueError(f"{where}['differentiable']=True is not supported: fusedopt's fused "
                         "step writes the parameters outside autograd, so it cannot be "
                         "differentiated through; use torch.optim for that")
    return bool(group.get("maximize", False))


# ========================================================= torch-compatible SGD
class SGD(FusedOptimizer):
    """torch.optim.SGD's arguments, defaults and update, as one fused step:

        g <- g + weight_decay*p  (L2, fusedopt's coupled_weight_decay)
        buf <- g on the first step, else momentum*buf + (1 - dampening)*g
        p <- p - lr*(g + momentum*buf)  with nesterov, else  p <- p - lr*buf

    (fusedopt's SGD with momentum_in_gradient_units=True). `state[p]` holds torch's
    "momentum_buffer" (with momentum > 0) and the step count "step", which torch's SGD
    does not keep: a torch SGD state_dict (without "step") loads as one step done (the
    buffers exist, so the next step is not the first). `maximize`, `foreach`, `fused`
    and `differentiable` as for Adam.
    """

    _state_names = {"momentum": "momentum_buffer"}
    _stepless = True

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, master_weights=False, state_dtype=None, stochastic_rounding=False,
                 seed=0):
        defaults = {"lr": lr, "momentum": momentum, "dampening": dampening,
                    "weight_decay": weight_decay, "nesterov": nesterov, "maximize": maximize,
                    "foreach": foreach, "differentiable": differentiable, "fused": fused,
                    **_precision_defaults(master_weights, state_dtype, stochastic_rounding,
                                          seed)}
        self._setup(params, defaults)

    def _fusedopt_config(self, group, where):
        maximize = _torch_flags(group, where)
        momentum = _real(group["momentum"], f"{where}['momentum']")
        dampening = _real(group["dampening"], f"{where}['dampening']")
        weight_decay = _real(group["weight_decay"], f"{where}['weight_decay']")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"{where}['weight_decay'] must be finite and >= 0, got "
                             f"{weight_decay!r}")
        if not isinstance(group["nesterov"], bool):
            raise TypeError(f"{where}['nesterov'] must be a bool, got {group['nesterov']!r}")
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError(f"{where}: nesterov momentum needs momentum > 0 and dampening 0 "
                             f"(as torch.optim.SGD), got momentum={momentum!r}, "
                             f"dampening={dampening!r}")
        return "sgd", {"learning_rate": _learning_rate(group["lr"], f"{where}['lr']"),
                       "momentum": momentum, "nesterov": group["nesterov"],
                       "dampening": dampening, "momentum_in_gradient_units": True,
                       "coupled_weight_decay": weight_decay or None, "maximize": maximize,
                       **_precision_arguments(group)}


def _real(value, where):
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} must be a number, got {type(value).__name__}")
    return float(value)
