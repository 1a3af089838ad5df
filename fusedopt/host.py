"""The host executor: the CUDA kernels' own rules, compiled for the CPU.

kernels/host.cpp runs `fused_element` (common.cuh + <rule>.cuh, exactly the code the
GPU runs) over the same tile table as kernels/fused.cu, with a pool of threads
across tiles. This module builds it with the machine's C++ compiler at first use,
caches the library on disk and calls it through ctypes.

Why ctypes and not an extension module: the library has no Python C-API dependency,
so it builds without Python's headers (often not installed), one build serves every
Python version and it can be built lazily on any machine with a compiler. A step is
one foreign call, a few microseconds, next to milliseconds of memory traffic.

The cache (``$FUSEDOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedopt`` or
``~/.cache/fusedopt``) holds one library per rule and dtype, named by a hash of the
expanded source, the compiler (path and version) and the flags, so editing a kernel
or changing compiler builds anew. Libraries are written to a temporary name and
renamed, so processes building at once never load a half-written file.

Without a compiler (or when the build fails) CPU steps use the NumPy reference, with
one HostBuildWarning saying what is missing.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import numpy as np

from . import _kernels, segments

# Bumped when the way libraries are built changes in a way the key does not see.
CACHE_FORMAT = 1

# -ffp-contract=off: no fused multiply-add, so the CPU rounds like the NumPy reference
#   and the GPU (--fmad=false). -fno-math-errno: sqrt may then be a vector instruction;
#   results are unchanged (IEEE sqrt is correctly rounded either way, only errno differs).
COMMON_FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-pthread", "-ffp-contract=off",
                "-fno-fast-math", "-fno-math-errno")
# GCC's loop unswitching gives up on a body as large as a rule's; the options a rule
# tests per element (clipvalue, weight decay, amsgrad, ...) are loop invariants, and
# unswitched loops vectorise.
GCC_FLAGS = ("--param", "max-unswitch-insns=1000", "--param", "max-unswitch-level=6")
# This CPU's vector width: Adam's sqrt and division are then 8 floats an instruction
# (AVX) rather than 4. The bits are the same (IEEE operations, no contraction); the
# library is keyed on the CPU too, and built without it where the compiler refuses it.
NATIVE_FLAGS = ("-march=native",)

COMPILERS = ("c++", "g++", "clang++")


class HostBuildError(RuntimeError):
    """The host library cannot be built here (no compiler, or the build failed)."""


class CompilerNotFound(HostBuildError):
    """No C++ compiler on this machine (or $CXX names one that does not run)."""


class HostBuildWarning(UserWarning):
    """CPU steps fall back to the NumPy reference: the host library cannot be built."""


# ------------------------------------------------------------------ the compiler
@functools.lru_cache(maxsize=None)
def find_compiler():
    """(path, version line, family) of the C++ compiler: $CXX if set, else the first
    of c++, g++, clang++ on PATH. Raises HostBuildError naming what is missing."""
    requested = os.environ.get("CXX")
    candidates = [requested] if requested else list(COMPILERS)
    for name in candidates:
        path = shutil.which(name)
        if path is None:
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        version = out.splitlines()[0].strip() if out.strip() else "unknown"
        family = "clang" if "clang" in out.lower() else "gcc" if _is_gcc(out) else "other"
        return path, version, family
    if requested:
        raise CompilerNotFound(f"the C++ compiler CXX={requested!r} was not found or does not run")
    raise CompilerNotFound(f"no C++ compiler found (looked for {', '.join(COMPILERS)} on PATH; "
                         "set CXX to use another)")


def _is_gcc(version_text):
    text = version_text.lower()
    return "free software foundation" in text or text.startswith(("g++", "gcc", "c++ (gcc"))


def default_flags(family):
    return COMMON_FLAGS + (GCC_FLAGS if family == "gcc" else ())


def cache_dir():
    root = os.environ.get("FUSEDOPT_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "fusedopt")
    return Path(root) / "host"


# ------------------------------------------------------------------ building
def compile_library(source, name, flags=None, include_dirs=()):
    """Compile the C++ translation unit `source` into a shared library and return its
    path, reusing the cached one when source, included files, compiler and flags are
    unchanged. `flags` replaces the default optimisation flags (the tests' builds use
    their own warnings and standard); `include_dirs` are hashed into the key.

    Shared by the host executor and the tests' builds of the rules and the emulator.
    Raises HostBuildError when there is no compiler or it fails.
    """
    compiler, version, family = find_compiler()
    flags = tuple(default_flags(family) if flags is None else flags)
    key = hashlib.sha256()
    for part in (str(CACHE_FORMAT), compiler, version, cpu_identity(), *flags, source):
        key.update(part.encode() + b"\0")
    for directory in include_dirs:
        key.update(_directory_digest(directory).encode())
    digest = key.hexdigest()[:20]
    target = _writable_cache() / f"{name}-{digest}.so"
    if target.exists():
        return target
    with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{name}-", suffix=".so",
                                     delete=False) as tmp:
        partial = Path(tmp.name)
    command = [compiler, *flags, "-x", "c++", "-", "-o", str(partial)]
    for directory in include_dirs:
        command += ["-I", str(directory)]
    try:
        result = subprocess.run(command, input=source.encode(), capture_output=True, timeout=600)
        if result.returncode != 0:
            log = result.stderr.decode(errors="replace").strip()
            raise HostBuildError(f"{Path(compiler).name} failed to build {name} "
                                 f"(exit {result.returncode}):\n{log[-3000:]}")
        os.replace(partial, target)  # atomic: no process ever loads a partial file
    except OSError as e:
        raise HostBuildError(f"could not build {name} with {compiler}: {e}") from e
    finally:
        partial.unlink(missing_ok=True)
    return target


@functools.lru_cache(maxsize=None)
def cpu_identity():
    """What -march=native depends on: the architecture, the CPU model and its feature
    flags (a cache shared between machines must not hand one CPU's code to another)."""
    parts = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    parts.append(line.strip())
                if key in ("flags", "Features"):
                    break
    except OSError:
        pass
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _writable_cache():
    """The cache directory, or a private temporary one when it cannot be written."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if os.access(directory, os.W_OK):
            return directory
    except OSError:
        pass
    return Path(_private_cache())


@functools.lru_cache(maxsize=None)
def _private_cache():
    return tempfile.mkdtemp(prefix="fusedopt-host-")


def _directory_digest(directory):
    h = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def rule_source(rule, dtype, grad=None, state=None):
    """The translation unit exporting fusedopt_host_step for one rule and storage
    combination (params of `dtype`, grads of `grad`, state of `state`; both default to
    `dtype`), with every local include inlined (so the cache key sees every line). A
    rule with a step of its own (kernels/<rule>_host.cpp, LAMB's two passes) exports
    that, for the storage its kernels take (fusedopt._kernels.own_kernel_keys)."""
    key = _kernels.storage_key(dtype, grad, state)
    if (_kernels.kernel_dir() / f"{rule}_host.cpp").is_file():
        if key not in _kernels.own_kernel_keys(rule):
            raise ValueError(f"{rule} has a host step for uniform float32/float64 storage "
                             f"only, not {_kernels.key_label(key)}")
        return _kernels.expand_includes(
            _kernels.storage_prelude(key) + f'#include "{rule}.cuh"\n#include "{rule}_host.cpp"\n')
    prelude = (f"#define FUSEDOPT_RULE {rule}\n"
               + _kernels.storage_prelude(key)
               + f'#include "{rule}.cuh"\n'
               '#include "host.cpp"\n')
    return _kernels.expand_includes(prelude)


@functools.lru_cache(maxsize=None)
def _load(rule, key):
    source = rule_source(rule, *key)
    name = f"fusedopt_{rule}_{_kernels.key_label(key).replace(':', '_')}"
    # 16-bit storage runs the same math-type loops as uniform storage (kernels/host.cpp,
    # "other storage"), so it builds with the same flags in about the same time.
    flags = default_flags(find_compiler()[2])
    try:
        path = compile_library(source, name, flags=flags + NATIVE_FLAGS)
    except HostBuildError:
        path = compile_library(source, name, flags=flags)  # a compiler without -march=native
    return ctypes.CDLL(str(path))


def library(rule, dtype, grad=None, state=None):
    """The step function of the host library of `rule` for params of `dtype`, grads of
    `grad` and state of `state` (both default to `dtype`), built on first use (cached
    on disk). Raises HostBuildError when it cannot be built."""
    fn = _load(rule, _kernels.storage_key(dtype, grad, state)).fusedopt_host_step
    fn.restype = ctypes.c_int
    # p, g, three slots, the master copy, use_ema's average, the gradient accumulator,
    # the plan, the hyperparameters and the step state (the rules with kernels of their
    # own take the same arguments).
    fn.argtypes = [ctypes.c_void_p] * 11
    return fn


def ceiling_functions():
    """(copy, scale) over the step's thread pool, the benchmark's CPU ceilings:
    copy(dst, src, n, num_threads) copies n floats; scale(x, n, s, num_threads)
    multiplies n floats by s in place (read and written once, like a step's state)."""
    lib = _load("adam", ("float32",) * 3)
    copy, scale = lib.fusedopt_host_copy, lib.fusedopt_host_scale
    copy.restype = scale.restype = None
    copy.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_int]
    scale.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_float, ctypes.c_int]
    return copy, scale


# ------------------------------------------------------------------ fallback
_warned = False


def library_or_warn(rule, dtype, grad=None, state=None):
    """`library(rule, dtype, grad, state)`, or None after warning (once per process)
    that CPU steps use the NumPy reference because the host library cannot be built."""
    global _warned
    try:
        return library(rule, dtype, grad, state)
    except HostBuildError as e:
        if not _warned:
            _warned = True
            warnings.warn(
                f"fusedopt: the fast CPU path is unavailable, so CPU steps use the NumPy "
                f"reference (several times slower): {e}", HostBuildWarning, stacklevel=4)
        return None


def _reset_for_tests():
    """Forget the compiler, loaded libraries and the warning (tests simulate machines)."""
    global _warned
    _warned = False
    find_compiler.cache_clear()
    cpu_identity.cache_clear()
    _load.cache_clear()
    _private_cache.cache_clear()


def default_num_threads():
    """Every core this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# ------------------------------------------------------------------ the executor
class _Plan(ctypes.Structure):
    """Mirror of HostPlan in kernels/host.cpp."""

    _fields_ = [
        ("tile_start", ctypes.c_void_p),
        ("ntiles", ctypes.c_longlong),
        ("sum_start", ctypes.c_void_p),
        ("sum_segment", ctypes.c_void_p),
        ("nsums", ctypes.c_longlong),
        ("segment_tiles", ctypes.c_void_p),
        ("offsets", ctypes.c_void_p),
        ("nsegments", ctypes.c_longlong),
        ("clip_mode", ctypes.c_int),
        ("skip_nonfinite", ctypes.c_int),
        ("clipnorm", ctypes.c_double),
        ("partial", ctypes.c_void_p),
        ("nonfinite", ctypes.c_void_p),
        ("num_threads", ctypes.c_int),
        ("threads_used", ctypes.c_int),
        ("run_start", ctypes.c_void_p),
        ("run_group", ctypes.c_void_p),
        ("nruns", ctypes.c_longlong),
        ("groups", ctypes.c_void_p),
        ("ngroups", ctypes.c_longlong),
        ("grad_scale", ctypes.c_void_p),
        ("found_inf", ctypes.c_void_p),
        ("segment_values", ctypes.c_void_p),
    ]


CLIP_MODES = {None: 0, "segment": 1, "global": 2}


class HostPlan:
    """The host executor for one optimizer on one layout (fusedopt.executor).

    Holds the hyperparameter block and the step state (counters, Nadam's running
    product) as the kernels define them (kernels/step.cuh, mirrored in _kernels): the
    library computes each step's learning rate and scalars from them and advances the
    counters itself, as the GPU does on the device. The block is rewritten only when a
    hyperparameter changes (hyperparameters_changed); a rate that only the host can
    evaluate (a callable) is written into it before each step. The tile table is
    rebuilt only when the clip option changes.
    """

    name = "host"

    def __init__(self, optimizer, params, fn):
        self.optimizer = optimizer
        self.fn = fn  # for grads of the params' dtype; others built at their first step
        self.dtype = np.dtype(params.dtype)
        self._functions = {self.dtype.name: fn}
        self.offsets = np.array(params.offsets, dtype=np.int64)
        # Tiles as for one SM: the host's must not depend on the thread count.
        self.tiles = _kernels.TileTable(params.offsets, per_segment=False, sm_count=1)
        self.hyper = np.zeros((), _kernels.HYPER)
        self.state = np.zeros((), _kernels.STEP_STATE)
        self.host_learning_rate = False
        self._default_threads = default_num_threads()
        self._plan = _Plan()
        self._plan.skip_nonfinite = int(optimizer.skip_nonfinite)
        self._mode = object()  # no tables yet
        self.shapes = params.shapes
        if optimizer.rule == "muon":  # kernels/muon_host.cpp: a second entry, a scratch d
            self._muon_apply = _load(optimizer.rule, _kernels.storage_key(
                params.dtype)).fusedopt_host_muon_apply
            self._muon_apply.restype = None
            self._muon_apply.argtypes = [ctypes.c_void_p] * 6
            self._muon_scratch = np.zeros(max(1, self.offsets[-1]), dtype=params.dtype)
        if optimizer.rule == "adafactor":  # kernels/adafactor_host.cpp reads the shapes
            self._segment_values = optimizer._kernel_segments(self.shapes, params.offsets)
            self._plan.segment_values = self._segment_values.ctypes.data
        self.write_state(optimizer._iterations, optimizer._skipped_steps,
                         optimizer._last_step_skipped)
        self.write_loss_scale(*optimizer._loss_scale_state)
        self.hyperparameters_changed(None)

    def hyperparameters_changed(self, name):
        """Rewrite the hyperparameter block and the segment groups; new tile tables if
        the clip option changed."""
        block, self.host_learning_rate = _kernels.optimizer_hyper(self.optimizer)
        self.hyper[...] = block
        opt = self.optimizer
        self._write_groups()
        if opt.rule == "muon":
            values, self._muon_matrices = opt._kernel_segments(self.shapes, self.offsets)
            self._segment_values = np.asarray(values, dtype=np.float64)
            self._plan.segment_values = self._segment_values.ctypes.data
        mode = "segment" if opt.clipnorm else "global" if opt.global_clipnorm else None
        if mode != self._mode:
            # The update runs over self.tiles; sums per segment need tiles that never
            # straddle a segment (kernels/host.cpp, HostPlan).
            # (whole-variable rules: kernels/<rule>_host.cpp runs over these).
            per_segment = mode == "segment" or opt.whole_variable
            sums = self.tiles if not per_segment else _kernels.TileTable(
                self.offsets, per_segment=True, sm_count=1)
            self._arrays = (self.tiles.start, sums.start, sums.segment, sums.segment_tiles,
                            self.offsets, np.zeros(sums.count, np.float64),
                            np.zeros(sums.count, np.int32))
            plan = self._plan
            plan.tile_start, plan.sum_start, plan.sum_segment, plan.segment_tiles, plan.offsets, \
                plan.partial, plan.nonfinite = (a.ctypes.data for a in self._arrays)
            plan.ntiles, plan.nsums = self.tiles.count, sums.count
            plan.nsegments = len(self.offsets) - 1
            plan.clip_mode = CLIP_MODES[mode]
            self.sum_tiles, self._mode = sums, mode
        if name in opt._running_product_inputs or name == "gradient_accumulation_steps":
            # The running product (Nadam's) is a function of the updates done and these
            # hyperparameters: recompute it, as the NumPy executor does.
            self.write_state(*self.read_state())

    def _write_groups(self):
        """The segment groups' values and runs (fusedopt/segments.py) for the library."""
        pairs, segment_group = self.optimizer._segment_groups()
        runs, run_group = segments.group_runs(self.offsets.tolist(), segment_group)
        self._groups = (runs, run_group, segments.group_values(pairs))
        plan = self._plan
        plan.run_start, plan.run_group, plan.groups = (a.ctypes.data for a in self._groups)
        plan.nruns, plan.ngroups = len(run_group), len(pairs)

    @property
    def next_iteration(self):
        return int(self.state["iterations"])

    def function(self, grad_dtype):
        """The library for grads of `grad_dtype` (mixed precision: fusedopt.precision),
        built at its first use; RuntimeError when it cannot be built here."""
        name = np.dtype(grad_dtype).name
        if name not in self._functions:
            from .executor import host_key

            try:
                self._functions[name] = library(self.optimizer.rule,
                                                *host_key(self.optimizer, self.dtype, name))
            except HostBuildError as e:
                raise RuntimeError(f"the host executor cannot build the kernels for {name} "
                                   f"grads: {e}") from e
        return self._functions[name]

    def step(self, grads, params_data, slots, host_learning_rate=None, amp=None):
        fn = self.function(grads.dtype)  # before anything is written
        if host_learning_rate is not None:
            self.hyper["lr"]["initial"] = host_learning_rate
        self._plan.num_threads = self.optimizer.num_threads or self._default_threads
        # GradScaler's scale and inf flag: pointers the library reads during the step.
        grad_scale, found_inf = amp if amp is not None else (None, None)
        self._plan.grad_scale = None if grad_scale is None else grad_scale.ctypes.data
        self._plan.found_inf = None if found_inf is None else found_inf.ctypes.data
        s = [None if x is None else x.ctypes.data for x in slots] + [None] * (3 - len(slots))
        master = self.optimizer._option_slots.get("master")
        master = None if master is None else master.ctypes.data
        plan, hyper, state = (ctypes.addressof(self._plan), self.hyper.ctypes.data,
                              self.state.ctypes.data)
        options = self.optimizer._option_slots
        average, accumulator = (None if options.get(k) is None else options[k].ctypes.data
                                for k in ("average", "gradient_accumulator"))
        if self.optimizer.rule == "muon":  # uniform float32/float64: no master copy
            return self._muon_step(fn, grads, params_data, s, average, accumulator, plan,
                                   hyper, state)
        fn(params_data.ctypes.data, grads.ctypes.data, s[0], s[1], s[2], master, average,
           accumulator, plan, hyper, state)

    def _muon_step(self, fn, grads, params_data, s, average, accumulator, plan, hyper, state):
        """Muon: the element-wise pass (AdamW segments done, d for the Muon ones),
        Newton-Schulz by NumPy's matrix products on each Muon segment of d, then the
        apply, which advances the counters (kernels/muon_host.cpp). GradScaler's inputs
        are read by both passes (a found_inf skips the step as skip_nonfinite does). A
        skipped call, or one of gradient accumulation that only adds (the first pass
        says which), runs no matrix products."""
        d = self._muon_scratch
        if fn(params_data.ctypes.data, grads.ctypes.data, s[0], s[1], d.ctypes.data, None,
              average, accumulator, plan, hyper, state):
            self.optimizer._orthogonalise(d, self._muon_matrices)
        self._muon_apply(params_data.ctypes.data, d.ctypes.data, average, plan, hyper, state)

    def join_current_stream(self):
        """Nothing to join: a host step has finished when step() returns."""

    @property
    def threads_used(self):
        """How many threads the last step ran on (small buffers run on one)."""
        return self._plan.threads_used

    def read_state(self):
        state = self.state
        return (int(state["iterations"]), int(state["skipped_steps"]),
                bool(state["last_step_skipped"]))

    def write_state(self, iterations, skipped_steps, last_step_skipped):
        """Set the counters (`iterations`: calls applied); the loss scale is kept."""
        self.state[...] = _kernels.pack_step_state(
            iterations, skipped_steps, last_step_skipped,
            self.optimizer._device_product(iterations), self.read_loss_scale())

    def read_loss_scale(self):
        """A LossScaleOptimizer's (dynamic scale, finite steps since it changed)."""
        return float(self.state["loss_scale"]), int(self.state["scale_counter"])

    def write_loss_scale(self, scale, counter):
        self.state["loss_scale"] = float(np.float32(scale))
        self.state["scale_counter"] = int(counter)
