"""One rank of tests/test_distributed.py: `python distributed_worker.py RANK WORLD PORT
JOB OUT`. JOB (a JSON file) lists phases, run in order by every rank: {"world": w,
"cases": [...]} runs the cases on ranks 0..w-1, in a process group of those ranks
(the others wait), and each of them writes what it saw to OUT/w<w>-rank-<r>.npz and
.json; {"copy": [[src, dst], ...], "remove": [path, ...]} is done by rank 0 (files of
checkpoints, between phases). One process per rank for every phase: torch is
imported once. gloo on 127.0.0.1; every collective of a case is bounded by its
group's COLLECTIVE_TIMEOUT, the waits between phases by the default group's."""

import datetime
import json
import os
import shutil
import sys
import traceback

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import fusedopt  # noqa: E402
from fusedopt import distributed, schedules  # noqa: E402
from dist_common import STEPS, make_optimizer, make_params, rank_grads  # noqa: E402


COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)


def run_case(case, rank, world, arrays, group):
    """Params after case['steps'] data-parallel steps into arrays[id], after each step
    into arrays[id@trace] (and, with 'ema_swap', after swapping in the EMA weights,
    back, and finalizing); the counters."""
    params = make_params(case)
    opt = make_optimizer(case)
    sharded = distributed.ShardedOptimizer(opt, params, group=group)
    if case.get("load"):
        sharded.load(case["load"])
    start = case.get("start", 0)
    trace = []  # the params after every step: what the next forward pass would see
    for step in range(start, start + case.get("steps", STEPS)):
        g = rank_grads(case, step, rank, world)
        if case.get("reduced"):
            g = sum(rank_grads(case, step, r, world) for r in range(world))
            g = np.divide(g, world, dtype=g.dtype)
        sharded.apply(g, reduced=bool(case.get("reduced")))
        trace.append(params.data.copy())
    arrays[case["id"] + "@trace"] = np.stack(trace)
    if case.get("save"):
        sharded.save(case["save"])
    arrays[case["id"]] = params.data.copy()
    report = {"iterations": sharded.iterations, "skipped_steps": sharded.skipped_steps,
              "state_nbytes": sharded.state_nbytes, "bounds": sharded.bounds}
    if "loss_scale" in case:
        report["dynamic_scale"] = sharded.dynamic_scale
        report["step_counter"] = sharded.step_counter
    if case.get("ema_swap"):
        sharded.swap_ema_weights()
        arrays[case["id"] + "@swapped"] = params.data.copy()
        try:
            sharded.apply(rank_grads(case, 0, rank, world))
        except ValueError as e:
            report["refused_while_swapped"] = str(e)
        sharded.swap_ema_weights()
        arrays[case["id"] + "@back"] = params.data.copy()
        sharded.finalize_variable_values()
        arrays[case["id"] + "@final"] = params.data.copy()
    return report


def run_bad(case, rank, world, group):
    """The error this rank raised (type and message), and whether params changed."""
    params = make_params(case, rank=rank)
    before = params.data.copy()
    try:
        sharded = distributed.ShardedOptimizer(make_optimizer(case), params, group=group)
        if case.get("load"):
            sharded.load(case["load"])
    except (TypeError, ValueError) as e:
        return {"error": type(e).__name__, "message": str(e),
                "unchanged": bool(np.array_equal(before, params.data)),
                "iterations": 0}
    return {"error": None, "iterations": sharded.iterations}


def run_phase(cases, rank, world, group, out):
    arrays, report = {}, {}
    for case in cases:
        # Each case reports on its own: one that raises (on every rank alike) leaves
        # the others to run and to be checked.
        try:
            if case.get("bad"):
                report[case["id"]] = run_bad(case, rank, world, group)
            else:
                report[case["id"]] = run_case(case, rank, world, arrays, group)
        except Exception as e:  # noqa: BLE001 (reported to the test, which fails it)
            report[case["id"]] = {"failed": f"{type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc()[-3000:]}
    np.savez(os.path.join(out, f"w{world}-rank-{rank}.npz"), **arrays)
    with open(os.path.join(out, f"w{world}-rank-{rank}.json"), "w") as f:
        json.dump(report, f)


def main():
    rank, world, port = (int(x) for x in sys.argv[1:4])
    with open(sys.argv[4]) as f:
        job = json.load(f)
    out = sys.argv[5]
    import torch.distributed as dist

    # The default group only waits between phases (a phase on fewer ranks takes long);
    # the cases run in groups with the short timeout.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=job["wait"]))
    groups = {w: dist.new_group(list(range(w)), timeout=COLLECTIVE_TIMEOUT)
              for w in range(1, world + 1)}
    for phase in job["phases"]:
        if "world" in phase and rank < phase["world"]:
            run_phase(phase["cases"], rank, phase["world"], groups[phase["world"]], out)
        elif "copy" in phase and rank == 0:
            for src, dst in phase["copy"]:
                shutil.copy(src, dst)
            for path in phase.get("remove", ()):
                os.unlink(path)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _ = (fusedopt, schedules)
    main()
