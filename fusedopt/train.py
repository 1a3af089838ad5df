"""`python -m fusedopt train`: a small MLP trained on flat buffers, end to end.

Every weight and bias of the network lives in one FlatBuffer and every gradient in a
second one of the same layout:

    params = FlatBuffer.from_arrays([W1, b1, W2, b2, ...])
    grads = params.zeros_like()

The forward and backward passes are plain array code on `params.xp` (NumPy, or CuPy
when the buffers live on a GPU); the backward pass writes straight into
`grads.views()`, and one `opt.apply(grads, params)` per minibatch updates the whole
model. The data set is scikit-learn's bundled handwritten digits (8x8 images, 10
classes, no download), with a stratified held-out test split.

`--compare` trains once with every optimizer in `fusedopt.available()` at settings
chosen for this task (TASK_DEFAULTS) and writes a loss-curve PNG and a Markdown table.

scikit-learn and matplotlib are imported only when needed: pip install "fusedopt[train]".
"""

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time

import numpy as np

from . import cuda, precision
from ._progress import ProgressBar
from .flat import FlatBuffer
from .optimizer import FusedOptimizer, available, get

TRAIN_EXTRA_HINT = 'pip install "fusedopt[train]"'

# Settings per optimizer for this task (digits, MLP 64-128-64-10, batch 32), found by
# trying a few values each. Keras' defaults suit most adaptive rules; the exceptions:
# plain SGD needs momentum and a larger step; Adadelta is meant to run at 1.0 (its
# paper's form); Adagrad needs a larger step to move before its accumulated squares
# shrink it; Lion's sign updates want ~3x less than Adam's step. Ftrl needs a tiny
# initial accumulator: Keras' Ftrl starts its `linear` slot at zero, so its first step
# moves the weights to (1 - sqrt(n0/n1))*p0 - ..., pulling them towards zero unless
# n0 << g^2. At the default 0.1 the He-initialised weights collapse and the ReLU net
# barely learns (~69% at 20 epochs, or stuck at chance for other learning rates).
TASK_DEFAULTS = {
    "adadelta": {"learning_rate": 1.0},
    "adagrad": {"learning_rate": 0.05},
    "adam": {"learning_rate": 0.001},
    "adamax": {"learning_rate": 0.002},
    "adamw": {"learning_rate": 0.001},
    "ftrl": {"learning_rate": 0.03, "initial_accumulator_value": 1e-5},
    "lion": {"learning_rate": 0.0003},
    "nadam": {"learning_rate": 0.001},
    "rmsprop": {"learning_rate": 0.001},
    "sgd": {"learning_rate": 0.1, "momentum": 0.9},
    "schedulefreeadamw": {"learning_rate": 0.005},
    "lamb": {"learning_rate": 0.002},
    # float32 with Keras' epsilon_1 = 1e-30: an all-zero row and column of gradients
    # (always-zero pixels, dead units) make r*c underflow to 0, and 0/0 is NaN.
    "adafactor": {"learning_rate": 0.05, "epsilon_1": 1e-12},
    "muon": {"learning_rate": 0.001},
}

DEFAULT_OPTIMIZER = "adam"
DEFAULT_EPOCHS = 20
DEFAULT_BATCH_SIZE = 32
DEFAULT_HIDDEN = (128, 64)
DEFAULT_TEST_FRACTION = 0.25
DEFAULT_PLOT = "fusedopt-compare.png"
DEFAULT_TABLE = "fusedopt-compare.md"
FRAMEWORKS = ("numpy", "torch")

# Options passed through to every optimizer's constructor (None = not given).
OPTIMIZER_OPTIONS = ("learning_rate", "clipnorm", "global_clipnorm", "clipvalue",
                     "weight_decay", "master_weights", "state_dtype", "stochastic_rounding")
# Storage dtypes of the params and grads. The forward and backward passes compute in
# float32 for the 16-bit ones (fusedopt.precision: the math type), reading the params
# exactly and writing the gradients rounded to nearest, as a GPU's bfloat16 matmul with
# float32 accumulation would.
DTYPES = ("float32", "float64", "bfloat16", "float16")


class UsageError(ValueError):
    """A bad request from the user: reported as an error message, exit code 2."""


# ====================================================================== the data
@dataclasses.dataclass(frozen=True)
class Dataset:
    """Digits features in [0, 1] and integer labels, split into train and test."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def num_features(self):
        return self.x_train.shape[1]

    @property
    def num_classes(self):
        return int(max(self.y_train.max(), self.y_test.max())) + 1


def load_digits_dataset(seed=0, dtype=np.float32, test_fraction=DEFAULT_TEST_FRACTION):
    """scikit-learn's bundled digits (1797 images, no download), pixels scaled from
    0..16 to [0, 1], split with stratification so both halves see every class equally."""
    load_digits, train_test_split = _import_sklearn()
    digits = load_digits()
    x = (digits.data / 16.0).astype(dtype)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return Dataset(x_train, y_train, x_test, y_test)


def _import_sklearn():
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError(
            f"`fusedopt train` needs scikit-learn for its data set: {TRAIN_EXTRA_HINT}") from e
    return load_digits, train_test_split


# ======================================================================= the model
def layer_sizes(num_features, hidden, num_classes):
    """[inputs, hidden..., outputs], e.g. [64, 128, 64, 10]."""
    return [num_features, *hidden, num_classes]


def init_params(sizes, seed=0, dtype=np.float32, device="cpu"):
    """A FlatBuffer [W1, b1, W2, b2, ...] for dense layers of `sizes`.

    Weights are He-normal (std sqrt(2/fan_in), suited to ReLU), biases zero. They are
    drawn in float64 on the host from `seed`, so every dtype and device starts from
    the same values.
    """
    rng = np.random.default_rng(seed)
    arrays = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        arrays.append(rng.normal(0.0, math.sqrt(2.0 / fan_in), size=(fan_in, fan_out)))
        arrays.append(np.zeros(fan_out))
    return FlatBuffer.from_arrays(arrays, dtype=dtype).to(device)


def _layers(buffer):
    """(W, b) pairs: the views of a params or grads FlatBuffer, layer by layer."""
    views = buffer.views()
    return list(zip(views[0::2], views[1::2]))


def forward(params, x):
    """The activations of every layer: [x, h1, ..., logits]. Hidden layers are
    dense + ReLU; the last layer is dense only (softmax is in the loss)."""
    xp = params.xp
    activations = [x]
    layers = _layers(params)
    for i, (w, b) in enumerate(layers):
        z = activations[-1] @ w
        z += b
        if i < len(layers) - 1:
            xp.maximum(z, 0, out=z)
        activations.append(z)
    return activations


def cross_entropy(logits, labels, xp):
    """Mean softmax cross-entropy and the softmax probabilities, computed through the
    log-sum-exp with the row maximum subtracted so exp never overflows."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = xp.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    rows = xp.arange(labels.shape[0])
    loss = (xp.log(total[:, 0]) - shifted[rows, labels]).mean()
    return loss, exp / total


def loss_value(params, x, labels):
    """The mean cross-entropy of the network on (x, labels), without gradients."""
    return cross_entropy(forward(params, x)[-1], labels, params.xp)[0]


def loss_and_gradients(params, grads, x, labels):
    """Forward and backward pass on one minibatch: writes d(loss)/d(params) into
    `grads` (a FlatBuffer of the same layout) in place and returns the loss, a 0-d
    array on the buffers' device (reading it as a float would wait for a GPU)."""
    xp = params.xp
    activations = forward(params, x)
    loss, probabilities = cross_entropy(activations[-1], labels, xp)
    # d(mean CE)/d(logits) = (softmax - onehot) / n
    delta = probabilities
    delta[xp.arange(labels.shape[0]), labels] -= 1
    delta /= labels.shape[0]
    param_layers, grad_layers = _layers(params), _layers(grads)
    for i in reversed(range(len(param_layers))):
        w = param_layers[i][0]
        grad_w, grad_b = grad_layers[i]
        inputs = activations[i]
        xp.matmul(inputs.T, delta, out=grad_w)
        xp.sum(delta, axis=0, out=grad_b)
        if i > 0:
            # Back through ReLU: the input of layer i is the ReLU output of layer i-1,
            # so its gradient is zero wherever that output is zero.
            delta = delta @ w.T
            delta *= inputs > 0
    return loss


def predict(params, x):
    """Class indices (on the buffers' device)."""
    return forward(params, x)[-1].argmax(axis=1)


def accuracy(params, x, labels):
    """The fraction of `x` classified as `labels`, as a Python float."""
    return float((predict(params, x) == labels).mean())


# =================================================================== optimizers
def make_optimizer(name, **options):
    """Optimizer `name` at this task's settings (TASK_DEFAULTS), with `options`
    (learning_rate, clipnorm, ...; None = not given) taking precedence.

    Raises ValueError/TypeError from fusedopt for an unknown name or a bad value.
    """
    if not isinstance(name, str):
        raise TypeError(f"an optimizer name must be a string, got {type(name).__name__}")
    config = dict(TASK_DEFAULTS.get(name.lower(), {}))
    config.update({k: v for k, v in options.items() if v is not None})
    return get({"class_name": name, "config": config})


def optimizer_name(opt):
    """The name fusedopt.get() knows `opt` by ("adamw"; `opt.name` is "adam_w")."""
    return type(opt).__name__.lower()


def describe_optimizer(opt):
    """'sgd(learning_rate=0.1, momentum=0.9)': the learning rate and every setting
    that differs from the optimizer's own defaults, for logs and tables."""
    config = opt.get_config()
    try:
        defaults = type(opt)().get_config()
    except (TypeError, ValueError):  # a subclass with required arguments
        defaults = {}
    changed = {k: v for k, v in config.items()
               if k not in ("name", "learning_rate") and (k not in defaults or defaults[k] != v)}
    settings = {"learning_rate": config["learning_rate"], **changed}
    return f"{optimizer_name(opt)}({', '.join(f'{k}={_short(v)}' for k, v in settings.items())})"


def _short(value):
    return f"{value:g}" if isinstance(value, float) else repr(value)


# ====================================================================== training
@dataclasses.dataclass
class TrainResult:
    """What one training run produced: per-epoch history and timings."""

    optimizer: str            # the optimizer's name, e.g. "adam"
    settings: str             # describe_optimizer(): name and non-default settings
    device: str               # "cpu" or "gpu:N"
    dtype: str
    epochs: int
    steps: int                # optimizer steps (opt.apply calls)
    loss_history: list        # mean minibatch training loss of each epoch
    accuracy_history: list    # test accuracy after each epoch
    apply_seconds: float      # time inside opt.apply only
    seconds: float            # total wall time of the run

    @property
    def final_loss(self):
        return self.loss_history[-1] if self.loss_history else math.nan

    @property
    def test_accuracy(self):
        return self.accuracy_history[-1] if self.accuracy_history else math.nan

    @property
    def steps_per_second(self):
        return self.steps / self.apply_seconds if self.apply_seconds > 0 else math.nan

    def to_dict(self):
        """JSON-ready: non-finite numbers (a diverged loss) become null."""
        return _json_safe({
            "optimizer": self.optimizer,
            "settings": self.settings,
            "device": self.device,
            "dtype": self.dtype,
            "epochs": self.epochs,
            "train_loss": self.final_loss,
            "test_accuracy": self.test_accuracy,
            "steps": self.steps,
            "steps_per_second": self.steps_per_second,
            "seconds": self.seconds,
            "apply_seconds": self.apply_seconds,
            "loss_history": self.loss_history,
            "accuracy_history": self.accuracy_history,
        })


def resolve_device(device):
    """"auto" -> a GPU when one is usable, else "cpu"; "gpu"/"gpu:N" -> "gpu:N", but
    only when a GPU is usable (UsageError otherwise); "cpu" -> "cpu"."""
    device = device.strip().lower()
    if device == "auto":
        device = "gpu" if cuda.gpu_available() else "cpu"
    if device == "cpu":
        return "cpu"
    problem = cuda.gpu_problem()
    if problem is not None:
        raise UsageError(f"--device {device}: no usable GPU here: {problem}; "
                         "use --device cpu or auto")
    device = cuda.normalize_device(device)
    count = cuda.module_for(device).cuda.runtime.getDeviceCount()
    if int(device.split(":")[1]) >= count:
        raise UsageError(
            f"--device {device}: this machine has {count} GPU(s), gpu:0 to gpu:{count - 1}")
    return device


def train(optimizer=DEFAULT_OPTIMIZER, *, epochs=DEFAULT_EPOCHS, batch_size=DEFAULT_BATCH_SIZE,
          hidden=DEFAULT_HIDDEN, seed=0, dtype="float32", device="cpu", data=None,
          progress=None, framework="numpy"):
    """Train the digits MLP with `optimizer` and return a TrainResult.

    Args:
        optimizer: a name (built at TASK_DEFAULTS settings, see make_optimizer) or a
            FusedOptimizer instance (used as is; it must not have been built yet for
            another layout).
        epochs, batch_size, hidden: the run and the network's hidden layer widths.
        seed: fixes the split, the initial weights and the minibatch order.
        dtype: "float32", "float64", "bfloat16" or "float16": the storage of the
            parameters and gradients (the state's default follows fusedopt.precision:
            float64 for float64, else float32). 16-bit runs compute the forward and
            backward passes in float32 and round the gradients once.
        device: "cpu", "gpu", "gpu:N" or "auto".
        data: a Dataset to reuse (else load_digits_dataset(seed, dtype)).
        progress: a ProgressBar, or None for a silent run.
        framework: "numpy" (the forward and backward passes below, on NumPy/CuPy
            arrays) or "torch" (the same MLP as a torch.nn.Module, trained with
            fusedopt.torch; see fusedopt/train_torch.py).

    On the CPU the result is deterministic for a given seed. Training runs until
    `epochs` even if the loss becomes NaN (its history then shows it).
    """
    started = time.perf_counter()
    opt = optimizer if isinstance(optimizer, FusedOptimizer) else make_optimizer(optimizer)
    epochs = _positive_int("epochs", epochs)
    batch_size = _positive_int("batch_size", batch_size)
    hidden = tuple(_positive_int("hidden layer width", h) for h in hidden)
    dtype = precision.numpy_dtype(dtype)
    compute = np.dtype(precision.math_dtype(dtype.name))
    opt._precision_for(dtype.name)  # a refused combination, before anything runs
    device = resolve_device(device)
    progress = progress if progress is not None else ProgressBar(enabled=False)
    data = data if data is not None else load_digits_dataset(seed, compute)
    if framework not in FRAMEWORKS:
        raise ValueError(f"`framework` must be one of {', '.join(FRAMEWORKS)}, got {framework!r}")
    if framework == "torch":
        from .train_torch import train_torch

        return train_torch(opt, epochs=epochs, batch_size=batch_size, hidden=hidden, seed=seed,
                           dtype=dtype, device=device, data=data, progress=progress)

    params = init_params(layer_sizes(data.num_features, hidden, data.num_classes),
                         seed, dtype, device)
    grads = params.zeros_like()
    model = _Model(params, grads, compute)
    xp = params.xp
    with cuda.on_device(device):
        x_train, y_train = xp.asarray(data.x_train, dtype=compute), xp.asarray(data.y_train)
        x_test, y_test = xp.asarray(data.x_test, dtype=compute), xp.asarray(data.y_test)
        # The minibatch order comes from its own host-side stream, so it is the same
        # on every device and for every dtype.
        order_rng = np.random.default_rng([seed, 1])
        loss_history, accuracy_history = [], []
        apply_seconds, steps = 0.0, 0
        for epoch in range(1, epochs + 1):
            label = f"epoch {epoch:{len(str(epochs))}d}/{epochs}"
            order = xp.asarray(order_rng.permutation(len(data.y_train)))
            epoch_loss, epoch_steps, epoch_seconds = _train_epoch(
                opt, model, x_train[order], y_train[order], batch_size, progress, label)
            steps += epoch_steps
            apply_seconds += epoch_seconds
            loss_history.append(epoch_loss)
            accuracy_history.append(accuracy(model.computing(), x_test, y_test))
            progress.log(f"{label} loss {epoch_loss:.4f} test acc {accuracy_history[-1]:.2%}")
    return TrainResult(
        optimizer=optimizer_name(opt), settings=describe_optimizer(opt), device=device,
        dtype=dtype.name, epochs=epochs, steps=steps, loss_history=loss_history,
        accuracy_history=accuracy_history, apply_seconds=apply_seconds,
        seconds=time.perf_counter() - started)


class _Model:
    """The params and grads the optimizer updates (in the run's storage dtype) and, for
    16-bit storage, the float32 buffers the forward and backward passes compute in:
    each step reads the params exactly and writes the gradients rounded, once."""

    def __init__(self, params, grads, compute):
        self.params, self.grads = params, grads
        self.mixed = params.dtype != compute
        if self.mixed:
            with cuda.on_device(params.device):
                self.work = FlatBuffer(params.xp.zeros(params.size, compute), params.shapes)
                self.work_grads = self.work.zeros_like()

    def computing(self):
        """The params as the passes read them (the compute dtype's buffer, refreshed)."""
        if not self.mixed:
            return self.params
        self.work.data[...] = self.params.data  # exact: every 16-bit value is a float32
        return self.work

    def loss_and_gradients(self, x, labels):
        if not self.mixed:
            return loss_and_gradients(self.params, self.grads, x, labels)
        loss = loss_and_gradients(self.computing(), self.work_grads, x, labels)
        self.grads.data[...] = self.work_grads.data  # rounded to nearest even
        return loss


def _train_epoch(opt, model, x, labels, batch_size, progress, label):
    """One pass over (x, labels), already shuffled, in minibatches of `batch_size`
    (the last one smaller when they do not divide). Returns (mean minibatch loss,
    steps, seconds inside opt.apply)."""
    params, grads = model.params, model.grads
    xp = params.xp
    batches = math.ceil(len(labels) / batch_size)
    loss_sum = xp.zeros((), dtype=np.float64)  # on the device: no sync per batch
    apply_seconds = 0.0
    for b in range(batches):
        batch = slice(b * batch_size, (b + 1) * batch_size)
        loss_sum += model.loss_and_gradients(x[batch], labels[batch])
        apply_seconds += _timed_apply(opt, grads, params, xp)
        if progress.wants_update():  # reading loss_sum waits for a GPU: only when drawn
            progress.update(label, b + 1, batches, f"loss {float(loss_sum) / (b + 1):.4f}")
    return float(loss_sum) / batches, batches, apply_seconds


def _timed_apply(opt, grads, params, xp):
    """Run opt.apply and return the seconds it took. On a GPU the device is
    synchronised before and after, so the time is the step's own, not the backward
    pass still running before it nor a launch that has not finished yet."""
    _synchronize(xp)
    start = time.perf_counter()
    opt.apply(grads, params)
    _synchronize(xp)
    return time.perf_counter() - start


def _synchronize(xp):
    if xp is not np:
        xp.cuda.get_current_stream().synchronize()


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return int(value)


# ===================================================================== comparing
def compare(optimizers=None, *, options=None, progress=None, data=None, **train_kwargs):
    """train() once per optimizer, on the same data and seed; returns the TrainResults
    in the order given.

    `optimizers` holds names (default: every name in fusedopt.available()), each
    built at its TASK_DEFAULTS settings plus `options` (clipnorm, weight_decay, ...),
    or FusedOptimizer instances, used as they are. Every optimizer is built before
    any training starts, so a bad option fails at once, not after an hour.
    """
    optimizers = [opt if isinstance(opt, FusedOptimizer) else make_optimizer(opt, **(options or {}))
                  for opt in (available() if optimizers is None else optimizers)]
    progress = progress if progress is not None else ProgressBar(enabled=False)
    if data is None:
        compute = precision.math_dtype(train_kwargs.get("dtype", "float32"))
        data = load_digits_dataset(train_kwargs.get("seed", 0), np.dtype(compute))
    results = []
    for i, opt in enumerate(optimizers, 1):
        progress.log(f"[{i}/{len(optimizers)}] {describe_optimizer(opt)}")
        results.append(train(opt, progress=progress, data=data, **train_kwargs))
    return results


def markdown_table(results, timings=True):
    """A Markdown table: one row per run, in the order given.

    With timings=False it leaves out steps/s, the one column that changes from run to
    run: what is left is the same on every run with the same seed (on one machine),
    which is what the README shows (`--markdown`).
    """
    header = "| optimizer | settings | final train loss | test accuracy |"
    rule = "|---|---|---:|---:|"
    if timings:
        header, rule = header + " steps/s |", rule + "---:|"
    lines = [header, rule]
    for r in results:
        row = f"| {r.optimizer} | `{r.settings}` | {r.final_loss:.4f} | {r.test_accuracy:.2%} |"
        lines.append(row + (f" {r.steps_per_second:,.0f} |" if timings else ""))
    return "\n".join(lines) + "\n"


def plot_comparison(results, path, title):
    """Training loss per epoch (log scale) and test accuracy per epoch, one line per
    optimizer, written to `path` as a PNG.

    Uses matplotlib's Agg canvas directly rather than pyplot, so it never touches the
    caller's global backend or figure state.
    """
    Figure, FigureCanvasAgg, MaxNLocator = _import_matplotlib()
    figure = Figure(figsize=(13, 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    styles = ["-", "--", "-.", ":"]
    for i, r in enumerate(results):
        epochs = range(1, len(r.loss_history) + 1)
        style = dict(color=f"C{i % 10}", linestyle=styles[(i // 10) % len(styles)],
                     linewidth=1.8)
        label = f"{r.optimizer} ({r.test_accuracy:.1%})"
        loss_axes.plot(epochs, _positive_or_nan(r.loss_history), label=label, **style)
        accuracy_axes.plot(epochs, [100 * a for a in r.accuracy_history], **style)
    for axes in (loss_axes, accuracy_axes):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_axes.set_yscale("log")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("training loss (mean cross-entropy, log scale)")
    loss_axes.set_title("training loss")
    loss_axes.grid(True, which="both", alpha=0.3)
    accuracy_axes.set_xlabel("epoch")
    accuracy_axes.set_ylabel("test accuracy (%)")
    accuracy_axes.set_title("held-out test accuracy")
    accuracy_axes.set_ylim(_accuracy_floor(results), 100)
    accuracy_axes.grid(True, alpha=0.3)
    figure.legend(loc="outside right center", title="optimizer (final test acc.)",
                  fontsize="medium")
    figure.suptitle(title)
    figure.savefig(path)


def _positive_or_nan(values):
    """A log axis cannot show 0 or NaN; such points are left out of the line."""
    return [v if (math.isfinite(v) and v > 0) else math.nan for v in values]


def _accuracy_floor(results):
    """Zoom the accuracy axis onto where the curves are, in steps of 10%."""
    lowest = min((min(r.accuracy_history) for r in results if r.accuracy_history),
                 default=0.0)
    return max(0.0, math.floor(lowest * 10) * 10.0 - 5)


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ImportError(f"`fusedopt train --compare` needs matplotlib: {TRAIN_EXTRA_HINT}") from e
    return Figure, FigureCanvasAgg, MaxNLocator


# ============================================================ command line
def add_arguments(parser):
    """The options of `python -m fusedopt train`."""
    parser.add_argument(
        "--optimizer", metavar="NAME", default=None,
        help=f"one of {', '.join(available())} (default {DEFAULT_OPTIMIZER}); built at "
             "this task's settings (e.g. sgd: learning_rate=0.1, momentum=0.9), "
             "which the options below override")
    parser.add_argument("--learning-rate", type=float, metavar="LR",
                        help="learning rate (default: the optimizer's setting for this task; "
                             "with --compare it applies to every optimizer)")
    parser.add_argument("--clipnorm", type=float, help="clip each variable's gradient norm")
    parser.add_argument("--global-clipnorm", type=float, help="clip the global gradient norm")
    parser.add_argument("--clipvalue", type=float, help="clip each gradient element")
    parser.add_argument("--weight-decay", type=float, help="decoupled weight decay")
    parser.add_argument("--epochs", type=_positive_int_arg, default=DEFAULT_EPOCHS,
                        help=f"passes over the training set (default {DEFAULT_EPOCHS})")
    parser.add_argument("--batch-size", type=_positive_int_arg, default=DEFAULT_BATCH_SIZE,
                        help=f"minibatch size (default {DEFAULT_BATCH_SIZE})")
    parser.add_argument("--hidden", type=_hidden_arg, default=DEFAULT_HIDDEN, metavar="W1,W2",
                        help="hidden layer widths, comma-separated (default "
                             f"{','.join(map(str, DEFAULT_HIDDEN))}; '' for none)")
    parser.add_argument("--seed", type=_seed_arg, default=0,
                        help="fixes the split, the initial weights and the batch order (default 0)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="dtype of parameters and gradients (default float32; the "
                             "16-bit ones compute the passes in float32)")
    parser.add_argument("--master-weights", action="store_const", const=True, default=None,
                        help="keep a float32 master copy of 16-bit params")
    parser.add_argument("--state-dtype", choices=("float32", "bfloat16"), default=None,
                        help="dtype of the optimizer state (default float32, float64 for "
                             "--dtype float64)")
    parser.add_argument("--stochastic-rounding", action="store_const", const=True,
                        default=None, help="round bfloat16 params stochastically")
    parser.add_argument("--device", type=_device_arg, default="auto",
                        help="cpu, gpu, gpu:N or auto (a GPU when one is usable; default)")
    parser.add_argument("--framework", choices=FRAMEWORKS, default="numpy",
                        help="numpy: forward/backward written on NumPy/CuPy arrays (default); "
                             "torch: the same MLP as a torch.nn.Module, trained with "
                             "fusedopt.torch (needs PyTorch)")
    parser.add_argument("--distributed", action="store_true",
                        help="data-parallel under torchrun, the optimizer state sharded "
                             "across ranks (gloo on CPU; fusedopt/train_distributed.py)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object with the results on stdout, nothing else")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar, header or per-epoch lines on stderr")
    parser.add_argument("--compare", action="store_true",
                        help="train with every optimizer at its setting for this task; "
                             f"writes a loss-curve plot ({DEFAULT_PLOT}) and a Markdown "
                             f"table ({DEFAULT_TABLE}) unless --plot/--table say where "
                             "(with --markdown, only the files they name)")
    parser.add_argument("--plot", metavar="PATH", default=None,
                        help="write the loss and accuracy curves of the run(s) to this PNG")
    parser.add_argument("--table", metavar="PATH", default=None,
                        help="write a Markdown table of the run(s), steps/s included, here")
    parser.add_argument("--markdown", action="store_true",
                        help="print the results as a Markdown table without timings (the "
                             "same on every run with the same seed; the README's table) "
                             "instead of the text summary")


def run(args):
    """Run `python -m fusedopt train` with parsed `args`; returns the exit code."""
    if args.distributed:
        from . import train_distributed

        return train_distributed.run(args)
    try:
        job = _prepare(args)
    except (ValueError, TypeError) as e:
        # Bad option values (fusedopt reports them as ValueError/TypeError) are found
        # here, before any training: a command-line error, not a traceback. Errors
        # during training itself are bugs and keep their traceback.
        return _error(cli_spelling(str(e)))
    except ImportError as e:  # the `train` extra is not installed
        return _error(str(e), code=1)
    if args.compare:
        job.progress.log(_header(job, args))
        results = compare(job.optimizers, data=job.data, progress=job.progress,
                          **job.train_options)
    else:
        (opt,) = job.optimizers
        job.progress.log(_header(job, args) + f"; {describe_optimizer(opt)}")
        results = [train(opt, data=job.data, progress=job.progress, **job.train_options)]
    _write_files(args, job, results)
    _print_results(args, job, results)
    return 0


# fusedopt's messages quote argument names in backticks (`learning_rate`); on the
# command line the same value came from a flag, so the message names the flag.
CLI_FLAGS = {name: "--" + name.replace("_", "-") for name in OPTIMIZER_OPTIONS}


def cli_spelling(message):
    """`message` with the API names of command-line options replaced by their flags."""
    for name, flag in CLI_FLAGS.items():
        message = message.replace(f"`{name}=True`", flag).replace(f"`{name}`", flag)
    return message


@dataclasses.dataclass
class _Job:
    """Everything a run needs, built and checked before training starts."""

    optimizers: list
    data: Dataset
    progress: ProgressBar
    train_options: dict
    plot: str = None   # where to write the curves (None: not written)
    table: str = None  # where to write the Markdown table (None: not written)


def _prepare(args):
    if args.compare and args.optimizer is not None:
        raise UsageError("--optimizer and --compare cannot be combined "
                         "(--compare trains with every optimizer)")
    if args.json and args.markdown:
        raise UsageError("--json and --markdown cannot be combined (each is the whole of stdout)")
    options = {name: getattr(args, name) for name in OPTIMIZER_OPTIONS}
    names = available() if args.compare else [args.optimizer or DEFAULT_OPTIMIZER]
    optimizers = [_make_cli_optimizer(name, options) for name in names]
    for opt in optimizers:  # refused dtype combinations, before any training
        opt._precision_for(args.dtype)
    device = resolve_device(args.device)
    if args.framework == "torch":
        from . import train_torch  # noqa: F401 - without torch: the install hint, now
    plot, table = args.plot, args.table
    if args.compare and plot is None and table is None and not args.markdown:
        # --markdown is a print mode: regenerating the README leaves no files behind.
        plot, table = DEFAULT_PLOT, DEFAULT_TABLE
    if plot is not None:
        _import_matplotlib()
        _check_writable("--plot", plot)
    if table is not None:
        _check_writable("--table", table)
    return _Job(
        optimizers=optimizers,
        data=load_digits_dataset(args.seed, np.dtype(precision.math_dtype(args.dtype))),
        progress=ProgressBar(enabled=not args.quiet),
        train_options=dict(epochs=args.epochs, batch_size=args.batch_size,
                           hidden=args.hidden, seed=args.seed, dtype=args.dtype,
                           device=device, framework=args.framework),
        plot=plot, table=table)


def _make_cli_optimizer(name, options):
    if name.lower() not in available():
        raise UsageError(f"--optimizer: unknown optimizer {name!r}; valid names: "
                         f"{', '.join(available())}")
    return make_optimizer(name, **options)


def _check_writable(flag, path):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag}: cannot write {path}: folder {folder} does not exist")


def _write_files(args, job, results):
    if job.plot is not None:
        plot_comparison(results, job.plot, _title(args, results))
    if job.table is not None:
        with open(job.table, "w", encoding="utf-8") as f:
            f.write(f"{_title(args, results)}\n\n{markdown_table(results)}")
    written = [p for p in (job.plot, job.table) if p is not None]
    if written and not args.json:
        job.progress.log(f"wrote {' and '.join(written)}")


def _print_results(args, job, results):
    if args.markdown:
        print(markdown_table(results, timings=False), end="")
    elif args.json and args.compare:
        print(json.dumps({"results": [r.to_dict() for r in results],
                          "plot": job.plot, "table": job.table}, allow_nan=False))
    elif args.json:
        print(json.dumps(results[0].to_dict(), allow_nan=False))
    elif args.compare:
        print(markdown_table(results), end="")
    else:
        print(_summary(results[0]))


def _title(args, results):
    hidden = ",".join(map(str, args.hidden)) or "none"
    what = "fusedopt optimizers" if args.compare else f"fusedopt {results[0].settings}"
    return (f"{what}: digits MLP (hidden {hidden}), {args.epochs} epochs, "
            f"batch {args.batch_size}, {args.dtype}, seed {args.seed}")


def _header(job, args):
    data = job.data
    sizes = layer_sizes(data.num_features, args.hidden, data.num_classes)
    return (f"digits: {len(data.y_train)} train / {len(data.y_test)} test; "
            f"MLP {'-'.join(map(str, sizes))} ({parameter_count(sizes):,} parameters, "
            f"{args.dtype}, {job.train_options['device']})")


def parameter_count(sizes):
    """Weights and biases of dense layers of `sizes`."""
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def _summary(result):
    return (f"{result.settings}: test accuracy {result.test_accuracy:.2%}, "
            f"final train loss {result.final_loss:.4f}\n"
            f"{result.steps} optimizer steps in {result.apply_seconds:.3f} s: "
            f"{result.steps_per_second:,.0f} steps/s (opt.apply only)\n"
            f"wall time {result.seconds:.2f} s (forward, backward, steps and evaluation)")


def _error(message, code=2):
    sys.stderr.write(f"python -m fusedopt train: error: {message}\n")
    return code


def _json_safe(value):
    """Replace non-finite floats by None (JSON has no NaN), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# argparse types: a ValueError/ArgumentTypeError here becomes a usage error (exit 2).
def _int_arg(text, low, description):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}")
    return value


def _positive_int_arg(text):
    return _int_arg(text, 1, "a positive integer")


def _seed_arg(text):
    return _int_arg(text, 0, "an integer >= 0")


def _hidden_arg(text):
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        return tuple(_positive_int_arg(p) for p in parts)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive widths such as 128,64, got {text!r}") from None


def _device_arg(text):
    value = text.strip().lower()
    if not re.fullmatch(r"auto|cpu|(gpu|cuda)(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"expected cpu, gpu, gpu:N or auto, got {text!r}")
    return value
