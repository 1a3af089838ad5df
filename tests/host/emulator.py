"""A fusedopt.cuda backend that runs the real kernels on the CPU (cuda_emulator.h).

StepPlan launches through it exactly as through CuPy: same kernels, same argument
lists, same launch sequence, with NumPy arrays standing in for device memory. Like a
GPU it refuses what CUDA refuses: a grid or block outside CUDA's limits, an argument
whose type or size differs from the kernel's parameter (read from the kernel source),
more than 4 KiB of arguments, an access not aligned to its width. It also counts the
kernels' element accesses by width, records launches as stream capture does, and can
queue launches per stream and run the streams interleaved (`deferred`), honouring
the events a plan inserts between them.
"""

import contextlib
import ctypes
import re
from pathlib import Path

import numpy as np

from fusedopt import _kernels, host, precision

HERE = Path(__file__).parent
MAX_GRID = 2**31 - 1
MAX_BLOCK = 1024
MAX_ARGUMENT_BYTES = 4096
STRUCTS = {"Hyper": _kernels.HYPER, "StepState": _kernels.STEP_STATE}
SCALARS = {"long long": np.int64, "int": np.int32, "double": np.float64, "float": np.float32}


class LaunchError(RuntimeError):
    """What CUDA would refuse (cudaErrorInvalidValue, a misaligned address...)."""


FLAGS = ["-std=c++20", "-O1", "-pthread", "-ffp-contract=off", "-shared", "-fPIC",
         "-Wall", "-Werror", "-Wno-unused-parameter", "-Wno-unused-variable",
         "-Wno-maybe-uninitialized", "-Wno-unknown-pragmas"]


def build_one(key):
    """The emulator library of every rule for one storage key (param, grad, state
    dtype names, fusedopt._kernels.storage_key), built with the host executor's build
    machinery (compiler discovery, on-disk cache)."""
    rules = _kernels.rule_names()
    source = '#include "cuda_emulator.h"\n' + _kernels.storage_prelude(key)
    source += "".join(f'#include "{r}.cuh"\n' for r in rules)
    source += '#include "fused.cu"\n#include "reduce.cu"\n#include "emulator_entries.h"\n'
    source += "".join(f"EMU_RULE({r})\n" for r in rules if not _kernels.own_kernels(r))
    # Rules with kernels of their own (kernels/<rule>.cu, for the keys of
    # fusedopt._kernels.own_kernel_keys): entries in emulator_<rule>.h.
    source += "".join(f'#include "{r}.cu"\n#include "emulator_{r}.h"\n' for r in rules
                      if _kernels.own_kernels(r) and key in _kernels.own_kernel_keys(r))
    name = "emulator_" + _kernels.key_label(key).replace(":", "_")
    path = host.compile_library(source, name, flags=FLAGS,
                                include_dirs=[_kernels.kernel_dir(), HERE])
    library = ctypes.CDLL(str(path))
    library.emu_take_error.restype = ctypes.c_char_p
    return library


class Libraries(dict):
    """{storage key: CDLL}, each built at its first use (keys: (param, grad, state)
    tuples; a dtype name stands for all three)."""

    def __missing__(self, key):
        if isinstance(key, str):
            key = (key,) * 3
        key = _kernels.storage_key(*key)
        if key not in self.keys():
            dict.__setitem__(self, key, build_one(key))
        return dict.__getitem__(self, key)


def build():
    """The emulator libraries, {storage key: CDLL} built on demand (float32 and float64
    at once); None when there is no C++ compiler."""
    libraries = Libraries()
    try:
        for dtype in ("float32", "float64"):
            libraries[dtype]
    except host.CompilerNotFound:
        return None
    return libraries


# --------------------------------------------------------------- kernel signatures
_KERNEL = re.compile(r'extern "C" __global__ void __launch_bounds__\((\w+)\)\s+'
                     r'(FO_CAT\(fusedopt_, FUSEDOPT_RULE\)|\w+)\((.*?)\)\s*\{', re.S)


def signatures(source, rule=None):
    """{kernel name: (max threads per block, [parameter types])} from a translation unit."""
    out = {}
    for bound, name, params in _KERNEL.findall(source):
        if name.startswith("FO_CAT"):
            name = f"fusedopt_{rule}"
        types = []
        for param in params.split(","):
            words = param.replace("*", " * ").replace("__restrict__", " ").split()
            types.append(" ".join(w for w in words[:-1] if w != "const").replace(" *", "*"))
        out[name] = (_kernels.CONSTANTS[bound], types)
    return out


def _expected(ptype, key):
    """(numpy dtype or struct dtype, is_pointer) a parameter type asks for, in a module
    of storage `key` (param, grad, state)."""
    pointer = ptype.endswith("*")
    base = ptype.rstrip("*").strip()
    storage = {"FUSEDOPT_P": key[0], "FUSEDOPT_G": key[1], "FUSEDOPT_S": key[2],
               "FUSEDOPT_T": "float64" if key[0] == "float64" else "float32"}
    if base in storage:
        return precision.numpy_dtype(storage[base]), pointer
    if base in SCALARS:
        return np.dtype(SCALARS[base]), pointer
    if base in STRUCTS:
        return STRUCTS[base], pointer
    raise LaunchError(f"the emulator does not know the parameter type {ptype!r}")


def check_arguments(name, types, args, key):
    """Every argument has the parameter's type and size, as CUDA reads them from the
    argument buffer: a wrong size there shifts every later argument."""
    if len(args) != len(types):
        raise LaunchError(f"{name} takes {len(types)} arguments, got {len(args)}")
    total = 0
    for i, (ptype, arg) in enumerate(zip(types, args)):
        want, pointer = _expected(ptype, key)
        where = f"{name} argument {i} ({ptype})"
        if pointer:
            total += 8
            if arg is None:
                continue
            if not isinstance(arg, np.ndarray) or not arg.flags.c_contiguous:
                raise LaunchError(f"{where}: expected a contiguous device buffer, got {type(arg)}")
            if want.names is not None:  # a struct in device memory: raw bytes of its size
                if arg.dtype != np.uint8 or arg.nbytes != want.itemsize:
                    raise LaunchError(f"{where}: expected {want.itemsize} bytes, got {arg.nbytes}")
                if arg.ctypes.data % 8:
                    raise LaunchError(f"{where}: misaligned struct")
            elif arg.dtype != want:
                raise LaunchError(f"{where}: expected {want} elements, got {arg.dtype}")
        else:
            total += want.itemsize
            if want.names is not None:
                ok = isinstance(arg, np.ndarray) and arg.shape == () and arg.dtype == want
            else:
                ok = isinstance(arg, np.generic) and arg.dtype == want
            if not ok:
                raise LaunchError(f"{where}: expected {want} by value, got {type(arg).__name__} "
                                  f"{getattr(arg, 'dtype', '')}")
    if total > MAX_ARGUMENT_BYTES:
        raise LaunchError(f"{name}: {total} bytes of arguments, CUDA allows {MAX_ARGUMENT_BYTES}")


def _c_argument(a):
    if a is None:
        return None
    if isinstance(a, np.ndarray) and a.shape == () and a.dtype.names is not None:
        return np.ctypeslib.as_ctypes_type(a.dtype).from_buffer_copy(a.tobytes())
    if isinstance(a, np.ndarray):
        return ctypes.c_void_p(a.ctypes.data)
    return {np.int64: ctypes.c_longlong, np.int32: ctypes.c_int, np.float32: ctypes.c_float,
            np.float64: ctypes.c_double}[type(a)](a.item())


class EmulatedKernel:
    def __init__(self, backend, library, key, name, signature):
        self.backend, self.library, self.key, self.name = backend, library, key, name
        self.max_threads, self.types = signature
        self.fn = getattr(library, "emu_" + name)
        self.fn.restype = None

    def __call__(self, grid, block, args):
        self.backend.launch(self, grid, block, args)

    def run(self, grid, block, args):
        (g,), (b,) = grid, block
        if not 1 <= g <= MAX_GRID:
            raise LaunchError(f"{self.name}: grid of {g} blocks (CUDA: 1 to {MAX_GRID})")
        if not 1 <= b <= min(MAX_BLOCK, self.max_threads):
            raise LaunchError(f"{self.name}: block of {b} threads (this kernel: 1 to "
                              f"{min(MAX_BLOCK, self.max_threads)})")
        check_arguments(self.name, self.types, args, self.key)
        self.fn(ctypes.c_uint(g), ctypes.c_uint(b), *map(_c_argument, args))
        error = self.library.emu_take_error()
        if error:
            raise LaunchError(f"{self.name}: {error.decode()}")
        counts = self.backend.take_access_counts(self.library, self.name)
        if counts["misaligned"]:
            raise LaunchError(f"{self.name}: {counts['misaligned']} misaligned accesses")


class EmulatorBackend:
    """The backend interface of fusedopt.cuda.CupyBackend, on the CPU."""

    xp = np

    def __init__(self, libraries, sm_count=2, blocks_per_sm=3):
        self.libraries = libraries
        self.sm_count = sm_count
        self.occupancy = blocks_per_sm  # what the occupancy API would say for any kernel
        self.launches = []
        self.accesses = {}   # (kernel, load|store, bytes) -> count, since reset_accesses()
        self.deferred = False
        self._stream = "default"
        self._queues = {}
        self._recording = None
        self._signatures = {}

    # ----------------------------------------------------------------- kernels
    def function(self, rule, storage, name):
        """As CupyBackend.function: `storage` is the (param, grad, state) key. The
        reductions of a grad dtype are in every library built for it."""
        storage = _kernels.as_storage(storage)
        if rule is None:  # the reductions read the grads and the state (the accumulator):
            # any library of that pair
            pair = _kernels.reduce_key(storage)
            storage = next((k for k in self.libraries.keys() if _kernels.reduce_key(k) == pair),
                           _kernels.storage_key(pair[0], *pair))
        key = (rule, storage)
        if key not in self._signatures:
            source = (_kernels.reduce_source(*_kernels.reduce_key(storage)) if rule is None
                      else _kernels.rule_source(rule, *storage))
            self._signatures[key] = signatures(source, rule)
        return EmulatedKernel(self, self.libraries[storage], storage, name,
                              self._signatures[key][name])

    def load(self, kernel):
        pass  # built with the library

    def blocks_per_sm(self, kernel, block):
        return self.occupancy

    def launch(self, kernel, grid, block, args):
        self.launches.append(kernel.name)
        item = ("run", kernel, grid, block, args)
        if self._recording is not None:  # like stream capture: recorded, not run
            self._recording.append(item)
        elif self.deferred:
            self._queues.setdefault(self._stream, []).append(item)
        else:
            kernel.run(grid, block, args)

    def take_access_counts(self, library, kernel):
        raw = (ctypes.c_longlong * 11)()
        library.emu_take_access_counts(raw)
        for s, kind in enumerate(("load", "store")):
            for w in range(5):
                if raw[s * 5 + w]:
                    key = (kernel, kind, 1 << w)
                    self.accesses[key] = self.accesses.get(key, 0) + raw[s * 5 + w]
        return {"misaligned": raw[10]}

    def count(self, kind, width, kernel=None):
        """Element accesses (`kind` "load" or "store") of `width` bytes since
        reset_accesses(), by `kernel` or by all."""
        return sum(n for (name, k, w), n in self.accesses.items()
                   if k == kind and w == width and kernel in (None, name))

    def reset_accesses(self):
        self.accesses = {}

    # ----------------------------------------------------------------- streams
    def current_stream(self):
        return self._stream

    @contextlib.contextmanager
    def use_stream(self, name):
        previous, self._stream = self._stream, name
        try:
            yield
        finally:
            self._stream = previous

    def is_capturing(self, stream):
        return self._recording is not None

    def order(self, before, stream):
        """`stream`'s later work waits for everything queued on `before` so far."""
        if self.deferred:
            event = object()
            self._queues.setdefault(before, []).append(("record", event))
            self._queues.setdefault(stream, []).append(("wait", event))

    def synchronize(self):
        """Run the queued work, one item of each stream in turn (as two streams may
        interleave on a GPU), waits blocking a stream until their event is recorded."""
        recorded = set()
        queues = {s: list(q) for s, q in self._queues.items()}
        self._queues = {}
        while any(queues.values()):
            progressed = False
            for queue in queues.values():
                if not queue:
                    continue
                item = queue[0]
                if item[0] == "wait" and item[1] not in recorded:
                    continue
                queue.pop(0)
                progressed = True
                if item[0] == "record":
                    recorded.add(item[1])
                elif item[0] == "run":
                    item[1].run(*item[2:])
            if not progressed:
                raise LaunchError("streams wait on each other: deadlock")

    # ----------------------------------------------------------------- graphs
    @contextlib.contextmanager
    def capture(self):
        """Record the launches made inside the block, as CUDA stream capture does; the
        yielded graph's launch() replays them on the current stream."""
        graph = EmulatedGraph(self)
        self._recording = graph.items
        try:
            yield graph
        finally:
            self._recording = None

    def on_device(self):
        return contextlib.nullcontext()

    def to_host(self, array):
        if self.deferred:  # like cudaMemcpy: the queued work first
            self.synchronize()
        return np.array(array)


class EmulatedGraph:
    def __init__(self, backend):
        self.backend, self.items = backend, []

    def launch(self):
        for _, kernel, grid, block, args in self.items:
            self.backend.launch(kernel, grid, block, args)


def emulate(optimizer, params, libraries, sm_count=2, blocks_per_sm=3):
    """Build `optimizer` for `params` (NumPy) and route its steps through the emulated
    GPU path: fusedopt.cuda.StepPlan with this backend. Returns the backend."""
    from fusedopt.cuda import StepPlan

    if not optimizer.built:
        optimizer.executor = "numpy"  # a CPU plan is built first, then replaced
    optimizer.build(params)
    backend = EmulatorBackend(libraries, sm_count=sm_count, blocks_per_sm=blocks_per_sm)
    optimizer._plan = StepPlan(optimizer, params, backend=backend)
    return backend
