"""A fusedopt.cuda backend that runs the real kernels on the CPU (cuda_emulator.h).

StepPlan launches through it exactly as through CuPy: same kernels, same argument
lists, same launch sequence, with NumPy arrays standing in for device memory.
"""

import contextlib
import ctypes
from pathlib import Path

import numpy as np

from fusedopt import _kernels, host

HERE = Path(__file__).parent


def build():
    """Compile one emulator library per dtype with the host executor's build machinery
    (compiler discovery, on-disk cache); return {dtype name: CDLL}, or None when there
    is no C++ compiler."""
    flags = ["-std=c++20", "-O1", "-pthread", "-ffp-contract=off", "-shared", "-fPIC",
             "-Wall", "-Werror", "-Wno-unused-parameter", "-Wno-unused-variable",
             "-Wno-maybe-uninitialized", "-Wno-unknown-pragmas"]
    libraries = {}
    for dtype, ctype in _kernels.CTYPES.items():
        rules = _kernels.rule_names()
        source = '#include "cuda_emulator.h"\n' + f"#define FUSEDOPT_T {ctype}\n"
        source += "".join(f'#include "{r}.cuh"\n' for r in rules)
        source += '#include "fused.cu"\n#include "reduce.cu"\n#include "emulator_entries.h"\n'
        source += "".join(f"EMU_RULE({r})\n" for r in rules)
        try:
            path = host.compile_library(source, f"emulator_{dtype.name}", flags=flags,
                                        include_dirs=[_kernels.kernel_dir(), HERE])
        except host.CompilerNotFound:
            return None
        libraries[dtype.name] = ctypes.CDLL(str(path))
    return libraries


def _c_argument(a):
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return ctypes.c_void_p(a.ctypes.data)
    if isinstance(a, np.int64):
        return ctypes.c_longlong(int(a))
    if isinstance(a, np.int32):
        return ctypes.c_int(int(a))
    if isinstance(a, np.float32):
        return ctypes.c_float(float(a))
    if isinstance(a, np.float64):
        return ctypes.c_double(float(a))
    raise TypeError(f"unexpected kernel argument {type(a).__name__}")


class EmulatedKernel:
    def __init__(self, backend, fn, name):
        self.backend, self.fn, self.name = backend, fn, name
        self.fn.restype = None

    def __call__(self, grid, block, args):
        self.backend.launch(self, grid, block, args)

    def run(self, grid, block, args):
        self.fn(ctypes.c_uint(grid[0]), ctypes.c_uint(block[0]), *map(_c_argument, args))


class EmulatorBackend:
    """The backend interface of fusedopt.cuda.CupyBackend, on the CPU."""

    xp = np

    def __init__(self, libraries, sm_count=2):
        self.libraries = libraries
        self.sm_count = sm_count
        self.launches = []
        self._recording = None

    def function(self, rule, dtype, name):
        fn = getattr(self.libraries[np.dtype(dtype).name], "emu_" + name)
        return EmulatedKernel(self, fn, name)

    def launch(self, kernel, grid, block, args):
        self.launches.append(kernel.name)
        if self._recording is not None:  # like stream capture: recorded, not run
            self._recording.append((kernel, grid, block, args))
        else:
            kernel.run(grid, block, args)

    @contextlib.contextmanager
    def capture(self):
        """Record the launches made inside the block, as CUDA stream capture does;
        the yielded list holds (kernel, grid, block, args) to replay."""
        self._recording = recorded = []
        try:
            yield recorded
        finally:
            self._recording = None

    @staticmethod
    def replay(recorded):
        for kernel, grid, block, args in recorded:
            kernel.run(grid, block, args)

    def on_device(self):
        return contextlib.nullcontext()

    def to_host(self, array):
        return np.array(array)


def emulate(optimizer, params, libraries, sm_count=2):
    """Build `optimizer` for `params` (NumPy) and route its steps through the emulated
    GPU path: fusedopt.cuda.StepPlan with this backend. Returns the backend."""
    from fusedopt.cuda import StepPlan

    if not optimizer.built:
        optimizer.executor = "numpy"  # a CPU plan is built first, then replaced
    optimizer.build(params)
    backend = EmulatorBackend(libraries, sm_count=sm_count)
    optimizer._plan = StepPlan(optimizer, params, backend=backend)
    return backend
