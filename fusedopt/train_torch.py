"""`python -m fusedopt train --framework torch`: the digits MLP of fusedopt.train as a
`torch.nn.Module`, trained with fusedopt.torch.

The network, its initial weights, the data split and the minibatch order are the
NumPy job's (fusedopt.train); here autograd computes the gradients, straight into the
flat gradient buffers, and a `fusedopt.torch.FusedOptimizer` steps them. Weights and
biases are two parameter groups, so biases get no weight decay.
"""

import math
import time

import numpy as np

from . import torch as fused_torch  # first: without torch, an ImportError with the install hint
from . import precision
from . import train as job

import torch  # noqa: E402  (after the hint above)


def build_model(sizes, seed=0, dtype=np.float32, device="cpu"):
    """Dense + ReLU layers of `sizes` (no ReLU after the last), with the NumPy job's
    initial weights: job.init_params holds W as (fan_in, fan_out); nn.Linear as its
    transpose. For 16-bit dtypes the weights are drawn in float64 (as the NumPy job
    draws them) and rounded once, by torch's copy, to the storage dtype."""
    torch_dtype = _torch_dtype(dtype)
    init_dtype = np.float64 if torch_dtype in (torch.bfloat16, torch.float16) else dtype
    arrays = job.init_params(sizes, seed, init_dtype).views()
    layers = []
    for i, (w, b) in enumerate(zip(arrays[0::2], arrays[1::2])):
        linear = torch.nn.Linear(w.shape[0], w.shape[1], dtype=torch_dtype)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T)))
            linear.bias.copy_(torch.from_numpy(b))
        layers.append(linear)
        if i < len(arrays) // 2 - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).to(torch_device(device))


def param_groups(model):
    """Weights in one group, biases in a second with weight_decay 0: decay shrinks
    weights towards zero, and a bias has nothing to regularize."""
    weights = [p for name, p in model.named_parameters() if not name.endswith("bias")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    return [{"params": weights}, {"params": biases, "weight_decay": 0.0}]


def make_torch_optimizer(opt, model):
    """A fusedopt.torch.FusedOptimizer with `opt`'s rule and settings (a fusedopt
    optimizer from job.make_optimizer) over `model`'s parameter groups."""
    config = opt.get_config()
    lr = config.pop("learning_rate")
    if isinstance(lr, dict):
        raise ValueError("--framework torch takes a number as learning rate; schedules "
                         "are torch.optim.lr_scheduler's job there")
    config.pop("name")
    return fused_torch.FusedOptimizer(param_groups(model), job.optimizer_name(opt), lr=lr,
                                      **config)


def torch_device(device):
    """fusedopt's "cpu" / "gpu:N" as a torch device."""
    return torch.device("cpu" if device == "cpu" else f"cuda:{device.split(':')[1]}")


def _torch_dtype(dtype):
    """The torch dtype of a storage dtype (a name or a NumPy/ml_dtypes dtype)."""
    name = precision.resolve_dtype(dtype)
    return {"float32": torch.float32, "float64": torch.float64,
            "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def train_torch(opt, *, epochs, batch_size, hidden, seed, dtype, device, data, progress):
    """job.train()'s run with a torch model; the arguments are already checked by it.
    Returns a job.TrainResult (apply_seconds: the time inside optimizer.step())."""
    started = time.perf_counter()
    torch_dev = torch_device(device)
    model = build_model(job.layer_sizes(data.num_features, hidden, data.num_classes),
                        seed, dtype, device)
    optimizer = make_torch_optimizer(opt, model)
    # The inputs in the params' dtype (16-bit models run their passes in it, as a
    # bfloat16 torch loop does); labels stay integers.
    x_train, x_test = (torch.as_tensor(a, device=torch_dev).to(_torch_dtype(dtype))
                       for a in (data.x_train, data.x_test))
    y_train, y_test = (torch.as_tensor(a, device=torch_dev)
                       for a in (data.y_train, data.y_test))
    order_rng = np.random.default_rng([seed, 1])  # the NumPy job's minibatch order
    loss_history, accuracy_history = [], []
    apply_seconds, steps = 0.0, 0
    for epoch in range(1, epochs + 1):
        label = f"epoch {epoch:{len(str(epochs))}d}/{epochs}"
        order = torch.as_tensor(order_rng.permutation(len(data.y_train)), device=torch_dev)
        epoch_loss, epoch_steps, epoch_seconds = _train_epoch(
            model, optimizer, x_train[order], y_train[order], batch_size, progress, label)
        steps += epoch_steps
        apply_seconds += epoch_seconds
        loss_history.append(epoch_loss)
        accuracy_history.append(accuracy(model, x_test, y_test))
        progress.log(f"{label} loss {epoch_loss:.4f} test acc {accuracy_history[-1]:.2%}")
    return job.TrainResult(
        optimizer=job.optimizer_name(opt), settings=job.describe_optimizer(opt) + " [torch]",
        device=device, dtype=np.dtype(dtype).name, epochs=epochs, steps=steps,
        loss_history=loss_history, accuracy_history=accuracy_history,
        apply_seconds=apply_seconds, seconds=time.perf_counter() - started)


def _train_epoch(model, optimizer, x, labels, batch_size, progress, label):
    """One pass over (x, labels), already shuffled. Returns (mean minibatch loss,
    steps, seconds inside optimizer.step())."""
    batches = math.ceil(len(labels) / batch_size)
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)  # no sync per batch
    step_seconds = 0.0
    for b in range(batches):
        batch = slice(b * batch_size, (b + 1) * batch_size)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[batch]), labels[batch])
        loss.backward()
        step_seconds += _timed_step(optimizer, x.device)
        loss_sum += loss.detach()
        if progress.wants_update():
            progress.update(label, b + 1, batches, f"loss {float(loss_sum) / (b + 1):.4f}")
    return float(loss_sum) / batches, batches, step_seconds


def _timed_step(optimizer, device):
    """optimizer.step() and its seconds; on a GPU synchronised before and after, so
    the time is the step's own."""
    _synchronize(device)
    start = time.perf_counter()
    optimizer.step()
    _synchronize(device)
    return time.perf_counter() - start


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def accuracy(model, x, labels):
    """The fraction of `x` that `model` classifies as `labels`, as a Python float."""
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == labels).double().mean())
