"""What tests/test_distributed.py and its worker processes build the same way: params,
optimizers and each rank's gradients for a scenario (a JSON-able dict)."""

import numpy as np

import fusedopt
from fusedopt import schedules

STEPS = 10
LAYOUTS = {
    # () (0,) and (1,) segments; with 3 ranks the (3, 4) and (2, 1, 3) segments straddle.
    "mixed": [(3, 4), (5,), (), (0,), (1,), (2, 1, 3)],
    # Whole-variable rules: uneven shards at segment boundaries, a rank owning only an
    # empty segment and a big one.
    "odd": [(7,), (1,), (13, 3), (0,), (129,)],
    # Matrices on every rank, for Muon's per-segment names.
    "matrices": [(4, 3), (5,), (3, 5), (2, 2), (7,)],
    # One variable: too few for a whole-variable rule on 2 or more ranks.
    "single": [(37,)],
}


def layout_of(case, rank=None):
    shapes = [tuple(s) for s in LAYOUTS[case.get("layout", "mixed")]]
    if rank:  # a bad-input scenario: ranks other than 0 add a segment
        shapes = shapes + [(2,)]
    return shapes


def dtype_of(case, rank=None):
    if case.get("dtype_per_rank") and rank:
        return np.float64
    return np.dtype(case.get("dtype", "float32")).type


def make_params(case, rank=None):
    shapes = layout_of(case, rank if case.get("layout_per_rank") else None)
    rng = np.random.default_rng(case.get("seed", 0))
    arrays = [rng.normal(size=s) for s in shapes]
    return fusedopt.FlatBuffer.from_arrays(arrays, dtype=dtype_of(case, rank),
                                           names=case.get("names"))


def make_optimizer(case):
    kwargs = dict(case.get("kwargs", {}))
    if isinstance(kwargs.get("learning_rate"), dict):
        kwargs["learning_rate"] = schedules.deserialize(kwargs["learning_rate"])
    opt = getattr(fusedopt, case["cls"])(executor=case.get("executor", "numpy"), **kwargs)
    if "loss_scale" in case:  # {"initial_scale": ..., "dynamic_growth_steps": ...}
        opt = fusedopt.LossScaleOptimizer(opt, **case["loss_scale"])
    return opt


def rank_grads(case, step, rank, world):
    """This rank's flat gradient: multiples of 1/64 scaled per segment by a power of
    two, so that the sum over ranks is exact in any order (the mean is then one
    rounding, the same as a single process's)."""
    shapes = layout_of(case)
    dtype = dtype_of(case)
    rng = np.random.default_rng([case.get("seed", 0), step, rank, world])
    parts = []
    for s in shapes:
        scale = 2.0 ** rng.integers(-3, 3)
        parts.append((np.round(rng.normal(size=s) * 64) / 64 * scale).ravel())
    g = np.concatenate(parts).astype(dtype)
    if case.get("inf") == [step, rank]:
        g[g.size // 2] = np.inf
    return g


def single_process(case, world, steps=STEPS, opt=None, params=None, start=0, trace=None):
    """The same run in one process, on the mean of every rank's gradients; the params
    after every step appended to `trace` (a list) when given."""
    opt = opt or make_optimizer(case)
    params = params or make_params(case)
    for step in range(start, start + steps):
        g = sum(rank_grads(case, step, r, world) for r in range(world))
        opt.apply(np.divide(g, world, dtype=g.dtype), params)
        if trace is not None:
            trace.append(params.data.copy())
    return opt, params
