"""`python -m fusedopt train --distributed`: the digits MLP trained data-parallel, the
optimizer state sharded across ranks (fusedopt.distributed.ShardedOptimizer).

Launched by torchrun, which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT:

    torchrun --standalone --nproc-per-node 2 -m fusedopt train --distributed --device cpu --json

Every rank holds the same data set, initial weights and minibatch order (the same
seed); --batch-size is per rank, so a step consumes batch_size x world_size examples,
each rank its own slice. Each rank's gradient is weighted by its share of the step's
examples, so their mean over ranks is the gradient of the mean loss over the step's
examples (DistributedDataParallel's convention). CPU buffers run on gloo; GPU buffers
(one GPU per rank, LOCAL_RANK) on NCCL, which is written but untested here.
Rank 0 prints the result; with --json one JSON object that includes every rank's
optimizer-state bytes.
"""

import datetime
import json
import math
import os
import time

import numpy as np

from . import cuda
from .train import (UsageError, _error, _json_safe, _make_cli_optimizer, accuracy,
                    describe_optimizer, init_params, layer_sizes, load_digits_dataset,
                    loss_and_gradients, DEFAULT_OPTIMIZER, OPTIMIZER_OPTIONS)

TIMEOUT_SECONDS = 120  # every collective of the run


def check_arguments(args):
    """UsageError for options --distributed does not combine with, before any process
    group exists."""
    for flag, bad in (("--compare", args.compare), ("--plot", args.plot),
                      ("--table", args.table), ("--markdown", args.markdown),
                      ("--framework torch", args.framework != "numpy")):
        if bad:
            raise UsageError(f"--distributed cannot be combined with {flag}")
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
               if v not in os.environ]
    if missing:
        raise UsageError(f"--distributed runs under torchrun, which sets {', '.join(missing)}: "
                         "torchrun --standalone --nproc-per-node N -m fusedopt train "
                         "--distributed ...")


def run(args):
    """The distributed job; returns the exit code (0 on every rank)."""
    try:
        check_arguments(args)
        opt = _make_cli_optimizer(args.optimizer or DEFAULT_OPTIMIZER,
                                  {n: getattr(args, n) for n in OPTIMIZER_OPTIONS})
        device = _device(args.device)
    except (ValueError, TypeError) as e:
        return _error(str(e))
    import torch.distributed as dist

    dist.init_process_group("gloo" if device == "cpu" else "nccl",
                            timeout=datetime.timedelta(seconds=TIMEOUT_SECONDS))
    try:
        result = train(opt, args, device)
    finally:
        dist.destroy_process_group()
    if result is not None:
        print(json.dumps(_json_safe(result), allow_nan=False) if args.json else
              _summary(result), flush=True)
    return 0


def _device(device):
    if device in ("cpu", "auto"):
        return "cpu"  # gloo; a GPU run asks for it by name
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda.require_gpu(f"gpu:{local}")
    import torch

    torch.cuda.set_device(local)  # NCCL's device for this rank
    return f"gpu:{local}"


def train(opt, args, device):
    """Train on this rank; rank 0 returns the result dict, the others None."""
    import torch.distributed as dist

    from .distributed import ShardedOptimizer

    started = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = np.dtype(args.dtype)
    data = load_digits_dataset(args.seed, dtype)
    params = init_params(layer_sizes(data.num_features, args.hidden, data.num_classes),
                         args.seed, dtype, device)
    grads = params.zeros_like()
    sharded = ShardedOptimizer(opt, params)
    xp = params.xp
    with cuda.on_device(device):
        x_train, y_train = xp.asarray(data.x_train, dtype=dtype), xp.asarray(data.y_train)
        order_rng = np.random.default_rng([args.seed, 1])
        loss_history, accuracy_history, step_seconds, steps = [], [], 0.0, 0
        for _ in range(args.epochs):
            order = xp.asarray(order_rng.permutation(len(data.y_train)))
            loss, n, seconds = _epoch(sharded, params, grads, x_train[order],
                                      y_train[order], args.batch_size, rank, world)
            loss_history.append(loss)
            steps += n
            step_seconds += seconds
            accuracy_history.append(accuracy(params, xp.asarray(data.x_test, dtype=dtype),
                                             xp.asarray(data.y_test)))
    state_bytes = [None] * world
    dist.all_gather_object(state_bytes, sharded.state_nbytes)
    if rank:
        return None
    return {
        "optimizer": describe_optimizer(opt), "device": device, "dtype": dtype.name,
        "world_size": world, "backend": dist.get_backend(),
        "epochs": args.epochs, "batch_size_per_rank": args.batch_size,
        "steps": steps, "train_loss": loss_history[-1],
        "test_accuracy": accuracy_history[-1], "loss_history": loss_history,
        "accuracy_history": accuracy_history,
        "step_seconds": step_seconds, "seconds": time.perf_counter() - started,
        "state_bytes_per_rank": state_bytes, "state_bytes_total": sum(state_bytes),
        # What one process would hold (Adafactor's factored slots are not params-sized).
        "state_bytes_one_process": params.dtype.itemsize * sum(
            opt._slot_size(spec, params.layout) for spec in opt._all_slot_specs()),
    }


def _epoch(sharded, params, grads, x, labels, batch_size, rank, world):
    """One pass in global batches of batch_size x world; (mean loss on this rank's
    slices, steps, seconds in sharded.apply)."""
    xp = params.xp
    global_batch = batch_size * world
    steps = math.ceil(len(labels) / global_batch)
    loss_sum, seconds = 0.0, 0.0
    for b in range(steps):
        start = b * global_batch
        total = min(global_batch, len(labels) - start)
        mine = slice(start + rank * batch_size, min(start + (rank + 1) * batch_size,
                                                    start + total))
        n = max(mine.stop - mine.start, 0)
        if n:
            loss_sum += float(loss_and_gradients(params, grads, x[mine], labels[mine]))
            # Weighted by this rank's share of the step's examples: the mean over
            # ranks is then the gradient of the mean loss over all of them.
            grads.data[...] *= n * world / total
        else:
            grads.data[...] = 0
        t = time.perf_counter()
        sharded.apply(grads)
        seconds += time.perf_counter() - t
    return loss_sum / steps, steps, seconds


def _summary(result):
    return (f"{result['optimizer']} on {result['world_size']} ranks ({result['backend']}): "
            f"test accuracy {result['test_accuracy']:.2%}, final train loss "
            f"{result['train_loss']:.4f}\noptimizer state per rank: "
            f"{result['state_bytes_per_rank']} bytes (one process: "
            f"{result['state_bytes_one_process']})\n{result['steps']} steps, "
            f"{result['step_seconds']:.3f} s in the sharded step, wall {result['seconds']:.2f} s")
