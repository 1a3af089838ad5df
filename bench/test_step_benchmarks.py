"""pytest-benchmark benchmarks of one optimizer step (`pytest bench/`).

On the CPU they time the host executor (the kernels compiled for the CPU) and the
NumPy reference; with a GPU they also time the CUDA path (each round synchronises the
device). Throughput figures for the README come from
`python -m fusedopt bench`, which times with CUDA events and measures the copy
ceiling in the same run; these are for tracking regressions between commits.
"""

import numpy as np
import pytest

import fusedopt
from fusedopt import cuda

SIZES = [2**16, 2**20]
NAMES = ["sgd", "adam", "nadam", "ftrl", "lion"]


def make(xp, name, n, **kwargs):
    rng = np.random.default_rng(0)
    params = fusedopt.FlatBuffer(xp.asarray(rng.standard_normal(n, dtype=np.float32)), [(n,)])
    grads = xp.asarray(rng.standard_normal(n, dtype=np.float32) * 1e-2)
    opt = type(fusedopt.get(name))(**kwargs)
    opt.apply(grads, params)
    return opt, params, grads


@pytest.mark.parametrize("executor", ["host", "numpy"])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_cpu_step(benchmark, name, n, executor):
    opt, params, grads = make(np, name, n, executor=executor)
    benchmark(opt.apply, grads, params)


@pytest.mark.parametrize("executor", ["host", "numpy"])
@pytest.mark.parametrize("clip", ["global_clipnorm", "clipnorm"])
@pytest.mark.parametrize("n", SIZES)
def test_cpu_step_clip(benchmark, n, clip, executor):
    opt, params, grads = make(np, "adam", n, executor=executor, **{clip: 1.0})
    benchmark(opt.apply, grads, params)


@pytest.mark.skipif(not cuda.gpu_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("n", SIZES + [2**26])
@pytest.mark.parametrize("name", NAMES)
def test_cuda_step(benchmark, name, n):
    import cupy as cp

    opt, params, grads = make(cp, name, n)

    def step():
        opt.apply(grads, params)
        cp.cuda.runtime.deviceSynchronize()

    benchmark(step)
