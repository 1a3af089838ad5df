"""Writes the .npz checkpoint fixtures that prove old checkpoints still load.

The committed files were written by fusedopt's original .npz checkpoint code (commit
7083766, before the safetensors format); tests/test_checkpoint_formats.py loads them
with today's code and compares them bit for bit with `RUNS` replayed. Never rewrite
them with a newer fusedopt: their point is to be old.

    PYTHONPATH=. python tests/data/make_npz_fixtures.py
"""

from pathlib import Path

import numpy as np

import fusedopt

HERE = Path(__file__).parent
LAYOUT = [(4, 3), (5,), (), (0,), (1,)]


def params(dtype):
    rng = np.random.default_rng(7)
    return fusedopt.FlatBuffer.from_arrays([rng.normal(size=s).astype(dtype) for s in LAYOUT])


def grads(step, size, dtype):
    return np.random.default_rng(100 + step).normal(size=size).astype(dtype)


def adam_f64():
    return fusedopt.Adam(learning_rate=0.01, clipnorm=1.0), np.float64, 3, []


def nadam_f32():
    schedule = fusedopt.schedules.PiecewiseConstantDecay([2], [0.1, 0.01])
    opt = fusedopt.Nadam(learning_rate=schedule, skip_nonfinite=True, weight_decay=0.01)
    return opt, np.float32, 4, [2]  # step 2's gradient is NaN: skipped


RUNS = {"v1-adam-f64.npz": adam_f64, "v1-nadam-f32.npz": nadam_f32}


def replay(run):
    """(optimizer, params) after the run's steps, from scratch."""
    opt, dtype, steps, nan_steps = run()
    # The files were written by the NumPy pipeline (before the host executor existed);
    # the host executor's per-step scalars may differ from Python's by an ulp.
    opt.executor = "numpy"
    p = params(dtype)
    for step in range(steps):
        g = grads(step, p.size, dtype)
        if step in nan_steps:
            g[0] = np.nan
        opt.apply(g, p)
    return opt, p


if __name__ == "__main__":
    for name, run in RUNS.items():
        fusedopt.save(HERE / name, *replay(run))
        print("wrote", HERE / name)
