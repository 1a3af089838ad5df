"""Step time of fusedopt.distributed.ShardedOptimizer(Adam) against torch's
ZeroRedundancyOptimizer wrapping torch.optim.AdamW(fused=True), in one run, on the
same model sizes and the same process group:

    torchrun --standalone --nproc-per-node 2 bench/distributed_step.py [--sizes N,...]

Both sides include the gradient reduction: fusedopt's step is reduce-scatter + shard
update + all-gather; the torch side is one all-reduce of a flat gradient buffer (what
DistributedDataParallel does, in buckets) + ZeroRedundancyOptimizer.step() (its shard
update + broadcasts). Rank 0 prints one JSON line per size: the median of --repeat
steps after --warmup, in milliseconds.
"""

import argparse
import datetime
import json
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer

import fusedopt
from fusedopt.distributed import ShardedOptimizer


def shapes_for(size):
    """An MLP-like layout of about `size` elements: square-ish weight matrices and biases."""
    width = max(int((size / 4) ** 0.5), 1)
    return [(width, width), (width,)] * 4


def time_steps(step, warmup, repeat):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeat):
        dist.barrier()
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def bench(size, warmup, repeat):
    rank = dist.get_rank()
    shapes = shapes_for(size)
    rng = np.random.default_rng(0)
    params = fusedopt.FlatBuffer.from_arrays([rng.normal(size=s) for s in shapes],
                                             dtype=np.float32)
    grads = np.random.default_rng(rank + 1).normal(size=params.size).astype(np.float32)
    sharded = ShardedOptimizer(fusedopt.Adam(1e-3), params)
    ours = time_steps(lambda: sharded.apply(grads), warmup, repeat)

    flat_grad = torch.from_numpy(grads.copy())
    tparams, offset = [], 0
    for s in shapes:
        n = int(np.prod(s))
        p = torch.nn.Parameter(torch.from_numpy(rng.normal(size=s).astype(np.float32)))
        p.grad = flat_grad[offset:offset + n].view(s)  # DDP-style: grads in one buffer
        tparams.append(p)
        offset += n
    zero = ZeroRedundancyOptimizer(tparams, optimizer_class=torch.optim.AdamW, lr=1e-3,
                                   fused=True)

    def torch_step():
        dist.all_reduce(flat_grad)
        flat_grad.div_(dist.get_world_size())
        zero.step()

    theirs = time_steps(torch_step, warmup, repeat)
    return {"elements": params.size, "world_size": dist.get_world_size(),
            "backend": dist.get_backend(), "executor": sharded.inner.executor_name,
            "fusedopt_sharded_adam_ms": round(ours, 3),
            "torch_zero_adamw_fused_ms": round(theirs, 3),
            "state_bytes_per_rank": sharded.state_nbytes}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="16384,1048576,8388608")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            result = bench(size, args.warmup, args.repeat)
            if dist.get_rank() == 0:
                print(json.dumps(result), flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
