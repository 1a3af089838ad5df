"""The GPU path: the only module that imports CuPy.

CuPy is imported lazily, the first time a CuPy array or a "gpu" device is met, so
`import fusedopt` works on machines without CuPy or a GPU.
"""

import contextlib
import functools

import numpy as np


# ---------------------------------------------------------------- array modules
def is_gpu_array(x):
    """True for a CuPy array, decided without importing CuPy."""
    return type(x).__module__.split(".")[0] == "cupy" and hasattr(x, "device")


@functools.lru_cache(maxsize=None)
def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "the GPU path needs CuPy: pip install 'fusedopt[cuda12]' or 'fusedopt[cuda13]'"
        ) from e
    return cupy


def device_of(x):
    """"cpu" for NumPy arrays, "gpu:N" for CuPy arrays on device N."""
    return f"gpu:{x.device.id}" if is_gpu_array(x) else "cpu"


def normalize_device(device):
    """Accept "cpu", "gpu", "cuda", "gpu:N", "cuda:N"; return "cpu" or "gpu:N"."""
    if not isinstance(device, str):
        raise TypeError(f"`device` must be a string such as 'cpu' or 'gpu', got {device!r}")
    name, _, index = device.strip().lower().partition(":")
    if name == "cpu" and not index:
        return "cpu"
    if name in ("gpu", "cuda"):
        if not index:
            return f"gpu:{_cupy().cuda.Device().id}"
        if index.isdigit():
            return f"gpu:{int(index)}"
    raise ValueError(f"`device` must be 'cpu', 'gpu' or 'gpu:N', got {device!r}")


def module_for(device):
    return np if device == "cpu" else _cupy()


def on_device(device):
    """Context manager making `device` current for CuPy allocations (no-op on CPU)."""
    if device == "cpu":
        return contextlib.nullcontext()
    return _cupy().cuda.Device(int(device.split(":")[1]))


def to_device(array, device):
    """Copy `array` (NumPy or CuPy) to `device`."""
    if device == "cpu":
        return _cupy().asnumpy(array) if is_gpu_array(array) else np.array(array)
    with on_device(device):
        return _cupy().array(array)


def gpu_available():
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        return _cupy().cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: all mean "no GPU here"
        return False


# ------------------------------------------------------------------ compilation
class CupyBackend:
    """Arrays and compiled kernels on one CUDA device, through CuPy.

    Each kernel module (a rule for one dtype, or the reductions for one dtype) is
    compiled by NVRTC once per process and device; CuPy also caches it on disk. The
    sources are read from the installed package (fusedopt/kernels).
    """

    _functions = {}

    def __init__(self, device):
        self.device = device
        self.xp = _cupy()
        self.device_id = int(device.split(":")[1])
        with on_device(device):
            self.sm_count = self.xp.cuda.Device().attributes["MultiProcessorCount"]

    def function(self, rule, dtype, name):
        key = (self.device_id, rule, np.dtype(dtype).name, name)
        if key not in self._functions:
            from . import _kernels

            source = (_kernels.reduce_source(dtype) if rule is None
                      else _kernels.rule_source(rule, dtype))
            with on_device(self.device):
                module = self.xp.RawModule(code=source, options=_kernels.NVRTC_OPTIONS)
                self._functions[key] = module.get_function(name)
        return self._functions[key]

    def on_device(self):
        return on_device(self.device)

    def to_host(self, array):
        return self.xp.asnumpy(array)


# ---------------------------------------------------------------------- a step
class StepPlan:
    """The device side of one optimizer on one layout: tables, scratch buffers and the
    launch sequence of a step. Built once (FusedOptimizer.build); a step allocates
    nothing and never waits for the host, so it can also be captured in a CUDA graph.

    A step launches, in order, only what its options need:
      fusedopt_sumsq         (norm clipping or skip_nonfinite) per-tile sums of squares
      fusedopt_clip_factors  (clipnorm or global_clipnorm) the factors the update reads
      fusedopt_skip_check    (skip_nonfinite) count the step or the skip on the device
      fusedopt_<rule>        the fused update: every element read once, written once
    """

    MAX_TABLE_ROWS = 1 << 20  # beyond this a skip_nonfinite step syncs once to compact
    name = "cuda"  # the executor interface: fusedopt/executor.py

    def __init__(self, optimizer, params, backend=None):
        from . import _kernels

        self._k = _kernels
        self.optimizer = optimizer
        self.backend = backend or CupyBackend(params.device)
        self.dtype = params.dtype
        self.offsets = params.offsets
        self._tables_mode = None
        self._counters = None
        self.next_row = optimizer._iterations
        # Without skip_nonfinite every step counts, so the host knows the count.
        self._host_iterations = optimizer._iterations
        with self.backend.on_device():
            self._build_tables()
            if optimizer.skip_nonfinite:
                self._build_counters(optimizer._iterations, optimizer._skipped_steps,
                                     optimizer._last_step_skipped)

    # The tables depend on the clip mode; rebuilt if the options change after build.
    def _clip_mode(self):
        opt = self.optimizer
        if opt.clipnorm:
            return "segment", opt.clipnorm
        if opt.global_clipnorm:
            return "global", opt.global_clipnorm
        return None, None

    def _build_tables(self):
        xp, k = self.backend.xp, self._k
        mode, _ = self._clip_mode()
        tiles = k.TileTable(self.offsets, per_segment=(mode == "segment"),
                            sm_count=self.backend.sm_count)
        self.tiles = tiles
        self.grid = tiles.grid(self.backend.sm_count, 8)  # the occupancy API comes next
        self.tile_start = xp.asarray(tiles.start)
        self.tile_segment = xp.asarray(tiles.segment)
        self.segment_tiles = xp.asarray(tiles.segment_tiles)
        self.nsegments = len(tiles.segment_tiles) - 1
        self.partial = xp.zeros(tiles.count, dtype=np.float64)
        self.tile_nonfinite = (xp.zeros(tiles.count, dtype=np.int32)
                               if self.optimizer.skip_nonfinite else None)
        self.factors = xp.ones(max(1, self.nsegments), dtype=self.dtype)
        self._tables_mode = mode

    def _build_counters(self, iterations, skipped, last_skipped):
        xp = self.backend.xp
        self.row_bytes = self._k.step_scalars_dtype(self.dtype).itemsize
        self.table_rows = 1024
        self.table = xp.zeros(self.table_rows * self.row_bytes, dtype=np.uint8)
        # [iterations, skipped steps, last step skipped, iteration of the table's row 0]
        self._counters = xp.asarray(
            np.array([iterations, skipped, int(last_skipped), iterations], dtype=np.int64))
        self._base = iterations
        self.next_row = iterations

    @property
    def next_iteration(self):
        """The iteration whose scalars the next step needs (with skip_nonfinite, the
        newest the device can be at)."""
        return self.next_row if self.optimizer.skip_nonfinite else self._host_iterations

    # ----------------------------------------------------------------- the step
    def hyperparameters_changed(self, name):
        """Nothing to refresh: each step packs the options and scalars it launches with."""

    def step(self, grads, params_data, slots, host_learning_rate=None):
        """Launch one step with the scalars of iteration `next_iteration` (with
        skip_nonfinite, the newest iteration the device can be at)."""
        opt, k = self.optimizer, self._k
        lr, scalars = opt._step_scalars(self.next_iteration, host_learning_rate)
        mode, clipnorm = self._clip_mode()
        with self.backend.on_device():
            if self._tables_mode != mode:  # clip options changed after build
                self._build_tables()
            skip = opt.skip_nonfinite
            st = k.pack_step_scalars(self.dtype, lr, scalars)
            pro = k.pack_prologue(self.dtype, opt.loss_scale_factor, opt.clipvalue,
                                  opt.weight_decay)
            if mode is not None or skip:
                self._launch(None, "fusedopt_sumsq", self.grid, (
                    grads, self.tile_start, np.int64(self.tiles.count),
                    pro["unscale"][0], self.partial, self.tile_nonfinite))
            if mode is not None:
                grid = 1 if mode == "global" else max(1, min(self.nsegments, self.grid))
                self._launch(None, "fusedopt_clip_factors", grid, (
                    self.partial, self.segment_tiles, np.int64(self.nsegments),
                    np.float64(clipnorm), np.int32(mode == "global"), self.factors))
            if skip:
                self._record_row(st)
            s = list(slots) + [None] * (3 - len(slots))
            self._launch(opt.rule, f"fusedopt_{opt.rule}", self.grid, (
                params_data, grads, s[0], s[1], s[2],
                self.tile_start, self.tile_segment, np.int64(self.tiles.count), pro, st,
                self.factors if mode is not None else None,
                np.int32(1 if mode == "global" else self.nsegments),
                self.table if skip else None, self._counters if skip else None))
            if not skip:
                self._host_iterations += 1

    def _launch(self, rule, name, grid, args):
        fn = self.backend.function(rule, self.dtype, name)
        fn((int(grid),), (self._k.BLOCK,), args)

    def _record_row(self, st):
        row_index = self.next_row - self._base
        if row_index >= self.table_rows:
            row_index = self._make_room(row_index)
        self._launch(None, "fusedopt_skip_check", 1, (
            self.tile_nonfinite, np.int64(self.tiles.count), self._counters, st,
            np.int64(row_index), self.table))
        self.next_row += 1

    # ------------------------------------------------------- skip_nonfinite rows
    # Row r of the table holds the scalars of iteration base + r; the device reads the
    # row of its own iteration count. Rows below that count are dead, but the host
    # learns the count only by reading it (a sync), so it compacts the table then.
    def _make_room(self, row_index):
        if self.table_rows * 2 > self.MAX_TABLE_ROWS:
            self.read_state()  # one sync per MAX_TABLE_ROWS steps at most
            row_index = self.next_row - self._base
        if row_index >= self.table_rows:
            grown = self.backend.xp.zeros(self.table_rows * 2 * self.row_bytes, dtype=np.uint8)
            grown[: self.table.size] = self.table
            self.table, self.table_rows = grown, self.table_rows * 2
        return row_index

    def read_state(self):
        """(iterations, skipped steps, last step skipped), read from the device: a sync."""
        if self._counters is None:
            return self._host_iterations, 0, False
        with self.backend.on_device():
            it, skipped, last, base = (int(x) for x in self.backend.to_host(self._counters))
            if it > base:
                start, live = (it - base) * self.row_bytes, (self.next_row - it) * self.row_bytes
                self.table[:live] = self.table[start:start + live].copy()
                self._counters[3:4] = it
                self._base = it
        return it, skipped, bool(last)

    def write_state(self, iterations, skipped_steps, last_step_skipped):
        """After load_state_dict: the device counters take the loaded values."""
        with self.backend.on_device():
            if self._counters is not None:
                self._build_counters(iterations, skipped_steps, last_step_skipped)
            self.next_row = iterations
            self._host_iterations = iterations
