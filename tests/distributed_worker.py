"""One rank of tests/test_distributed.py: `python distributed_worker.py RANK WORLD PORT
JOB OUT`. JOB (a JSON file) lists the scenarios; this rank writes what it saw to
OUT/rank-RANK.npz and OUT/rank-RANK.json. gloo on 127.0.0.1, every collective bounded
by the process group's timeout."""

import datetime
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fusedopt  # noqa: E402
from fusedopt import distributed, schedules  # noqa: E402
from dist_common import STEPS, make_optimizer, make_params, rank_grads  # noqa: E402


def run_case(case, rank, world):
    """Params (and counters) after case['steps'] data-parallel steps."""
    params = make_params(case)
    opt = make_optimizer(case)
    sharded = distributed.ShardedOptimizer(opt, params)
    if case.get("load"):
        sharded.load(case["load"])
    start = case.get("start", 0)
    for step in range(start, start + case.get("steps", STEPS)):
        g = rank_grads(case, step, rank, world)
        if case.get("reduced"):
            g = sum(rank_grads(case, step, r, world) for r in range(world))
            g = np.divide(g, world, dtype=g.dtype)
        sharded.apply(g, reduced=bool(case.get("reduced")))
    if case.get("save"):
        sharded.save(case["save"])
    return params.data.copy(), {"iterations": sharded.iterations,
                                "skipped_steps": sharded.skipped_steps,
                                "state_nbytes": sharded.state_nbytes}


def run_bad(case, rank, world):
    """The error this rank raised (type and message), and whether params changed."""
    params = make_params(case, rank=rank)
    before = params.data.copy()
    try:
        sharded = distributed.ShardedOptimizer(make_optimizer(case), params)
        if case.get("load"):
            sharded.load(case["load"])
    except (TypeError, ValueError) as e:
        return {"error": type(e).__name__, "message": str(e),
                "unchanged": bool(np.array_equal(before, params.data)),
                "iterations": 0}
    return {"error": None, "iterations": sharded.iterations}


def main():
    rank, world, port = (int(x) for x in sys.argv[1:4])
    with open(sys.argv[4]) as f:
        job = json.load(f)
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=30))
    arrays, report = {}, {}
    for case in job:
        if case.get("bad"):
            report[case["id"]] = run_bad(case, rank, world)
        else:
            arrays[case["id"]], report[case["id"]] = run_case(case, rank, world)
    dist.barrier()
    dist.destroy_process_group()
    out = sys.argv[5]
    np.savez(os.path.join(out, f"rank-{rank}.npz"), **arrays)
    with open(os.path.join(out, f"rank-{rank}.json"), "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    _ = (fusedopt, schedules)
    main()
