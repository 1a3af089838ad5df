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


# ------------------------------------------------------------- is there a GPU?
# CUDA runtime status codes that mean "nothing to run on" rather than a fault.
_CUDA_ERROR_INSUFFICIENT_DRIVER = 35  # also what the runtime says when there is no driver
_CUDA_ERROR_NO_DEVICE = 100


def gpu_available():
    """True when CuPy imports and sees at least one CUDA device."""
    return gpu_problem() is None


def gpu_problem():
    """None when the GPU path can run here; otherwise a sentence saying what is
    missing, for error messages: CuPy, the NVIDIA driver (or a recent enough one),
    or a CUDA device. Never raises."""
    try:
        runtime = _cupy().cuda.runtime
    except RuntimeError:
        return ("CuPy is not installed: pip install 'fusedopt[cuda12]' "
                "(or 'fusedopt[cuda13]' for CUDA 13 drivers)")
    except Exception as e:  # a broken CuPy installation
        return f"CuPy is installed but does not import: {e}"
    return _runtime_problem(runtime)


def _runtime_problem(runtime):
    """What `runtime` (cupy.cuda.runtime, or a stand-in in tests) says is missing."""
    runtime_version = _cuda_version(_call(runtime.runtimeGetVersion))
    # cudaDriverGetVersion gives 0 when no driver is installed.
    driver = _call(runtime.driverGetVersion)
    if not isinstance(driver, int) or driver == 0:
        return (f"CuPy (CUDA runtime {runtime_version}) is installed, but no NVIDIA driver "
                "was found: install the NVIDIA driver (and, in a container, start it "
                "with the GPUs, e.g. docker run --gpus all)")
    count = _call(runtime.getDeviceCount)
    status = getattr(count, "status", None)
    if status == _CUDA_ERROR_INSUFFICIENT_DRIVER:
        return (f"the NVIDIA driver supports CUDA up to {_cuda_version(driver)}, older than "
                f"CuPy's CUDA runtime {runtime_version}: update the driver, or install "
                "the fusedopt extra of the driver's CUDA major version")
    if status == _CUDA_ERROR_NO_DEVICE or count == 0:
        return (f"the NVIDIA driver (CUDA {_cuda_version(driver)}) is installed but sees "
                "no CUDA device (check CUDA_VISIBLE_DEVICES, or that the container was "
                "started with the GPUs)")
    if isinstance(count, Exception):
        return f"CUDA cannot list the devices: {count}"
    return None


def _call(fn):
    """fn(), or the exception it raised."""
    try:
        return fn()
    except Exception as e:
        return e


def _cuda_version(number):
    """12080 -> "12.8" (CUDA's encoding, 1000 * major + 10 * minor)."""
    if not isinstance(number, int):
        return "of unknown version"
    return f"{number // 1000}.{number % 1000 // 10}"


def require_gpu(device):
    """If `device` names a GPU ("gpu", "cuda:1", ...) and none is usable, raise a
    RuntimeError saying what is missing, instead of CuPy's error from deep inside.
    A malformed device string is left to normalize_device's ValueError."""
    if not isinstance(device, str):
        return
    name, _, index = device.strip().lower().partition(":")
    if name in ("gpu", "cuda") and (not index or index.isdigit()):
        problem = gpu_problem()
        if problem is not None:
            raise RuntimeError(f"device {device!r}: no usable GPU here: {problem}")


# ------------------------------------------------------------------ compilation
class CupyBackend:
    """Arrays and compiled kernels on one CUDA device, through CuPy.

    Each kernel module (a rule for one dtype, or the reductions for one dtype) is
    compiled by `_kernels.compile_cubin` (NVRTC with fusedopt's own flags: CuPy's
    compiler would add -ftz=true), cached on disk per machine, and loaded through
    CuPy once per process and device. The sources are read from the installed
    package (fusedopt/kernels).
    """

    _functions = {}

    def __init__(self, device):
        self.device = device
        self.xp = _cupy()
        self.device_id = int(device.split(":")[1])
        with on_device(device):
            self.sm_count = self.xp.cuda.Device().attributes["MultiProcessorCount"]
            self.arch = f"sm_{self.xp.cuda.Device().compute_capability}"

    def function(self, rule, storage, name):
        """Kernel `name` of `rule`'s module (None: the reductions) for `storage`, a
        (param, grad, state) dtype-name tuple (the reductions read the grads' and the
        state's: gradient accumulation's slot)."""
        from . import _kernels

        storage = _kernels.as_storage(storage)
        key = (self.device_id, rule, storage, name)
        if key not in self._functions:
            source = (_kernels.reduce_source(*_kernels.reduce_key(storage)) if rule is None
                      else _kernels.rule_source(rule, *storage))
            cubin = _kernels.cached_cubin(source, self.arch, f"{rule or 'reduce'}.cu")
            with on_device(self.device):
                module = self.xp.RawModule(path=str(cubin))
                self._functions[key] = module.get_function(name)
        return self._functions[key]

    def load(self, kernel):
        """Compile and load `kernel` now (CuPy does it at first use otherwise)."""
        getattr(kernel, "kernel", None)

    def blocks_per_sm(self, kernel, block):
        """Resident blocks per SM for `kernel` at `block` threads: the occupancy API,
        which accounts for its registers and shared memory."""
        function = getattr(kernel, "kernel", kernel)  # a RawKernel or a cuda Function
        return self.xp.cuda.driver.occupancyMaxActiveBlocksPerMultiprocessor(
            function.ptr, block, 0)

    def on_device(self):
        return on_device(self.device)

    def to_host(self, array):
        return self.xp.asnumpy(array)

    # Streams: CuPy's current stream, and an event to order one after another.
    def current_stream(self):
        return self.xp.cuda.get_current_stream()

    def is_capturing(self, stream):
        return stream.ptr not in (0, 1) and stream.is_capturing()

    def order(self, before, stream):
        event = self.xp.cuda.Event(block=False, disable_timing=True)
        event.record(before)
        stream.wait_event(event)

    @contextlib.contextmanager
    def capture(self):
        """Stream capture on a side stream; the yielded graph's launch() replays the
        captured work on the current stream."""
        stream = self.xp.cuda.Stream(non_blocking=True)
        graph = _Graph()
        with stream:
            stream.begin_capture()
            try:
                yield graph
            finally:
                graph.graph = stream.end_capture()


class _Graph:
    graph = None

    def launch(self):
        self.graph.launch()


# ---------------------------------------------------------------------- a step
class StepPlan:
    """The device side of one optimizer on one layout: its step state, tables, scratch
    buffers and the launch sequence of a step. Built once (FusedOptimizer.build).

    The step state lives here, on the device (kernels/step.cuh): a hyperparameter block
    that the host rewrites only when a hyperparameter changes (`hyperparameters_changed`),
    and the counters, which the update kernel advances itself. A step's launches carry
    no argument that changes from step to step, so a step never waits for the host,
    allocates nothing, and replays correctly from a CUDA graph (`capture`).

    A step launches, in order, only what its options need:
      fusedopt_amp_inputs    (apply's grad_scale / found_inf, torch.amp.GradScaler) the
                             step's unscale and skip, read from device tensors
      fusedopt_sumsq         (norm clipping or skip_nonfinite) per-tile sums of squares
      fusedopt_clip_factors  (clipnorm or global_clipnorm) the factors the update reads
      fusedopt_skip_check    (skip_nonfinite) the verdict on this step's gradients
      fusedopt_<rule>        the fused update: every element read once, written once;
                             computes the step's scalars and advances the counters
    plus, before it, fusedopt_write_hyper when the learning rate is a Python callable
    (the host evaluates it each step).

    Streams: everything is enqueued on CuPy's current stream at the call (apply(), an
    assignment, a replay). When that stream differs from the one this optimizer last
    used, it first waits (an event) for the work already queued there, so one
    optimizer's steps never overlap; two optimizers have separate scratch and state
    and run concurrently on their streams.

    The executor interface (fusedopt/executor.py): without skip_nonfinite every
    queued step completes, so the host keeps the same count as the device and reading
    it costs no sync; with skip_nonfinite, or once a step came with a found_inf flag,
    only the device knows, and read_state syncs.
    """

    name = "cuda"

    def __init__(self, optimizer, params, backend=None):
        from . import _kernels

        self._k = _kernels
        self.optimizer = optimizer
        self.backend = backend or CupyBackend(params.device)
        self.dtype = params.dtype
        from .executor import host_key

        # (param, grad, state) dtype names of the kernels, for grads of the params'
        # dtype; grads of another accepted dtype get their own kernels (storage()).
        self.key = host_key(optimizer, params.dtype)
        self.math_dtype = np.float64 if self.key[0] == "float64" else np.float32
        self.offsets = params.offsets
        self.shapes = params.shapes
        self._stream = None       # the stream this optimizer's work was last queued on
        self._capturing = False
        self.epoch = 0            # bumped when the launch sequence changes (clip mode)
        self.host_learning_rate = False
        self._device_skips = optimizer.skip_nonfinite  # only the device counts the steps
        self._amp_unscale = False  # fusedopt_amp_inputs changed the block's unscale
        self._functions = {}
        xp = self.backend.xp
        with self.backend.on_device():
            self.hyper = xp.zeros(_kernels.HYPER.itemsize, dtype=np.uint8)
            self.state = xp.zeros(_kernels.STEP_STATE.itemsize, dtype=np.uint8)
            self._build_tables()
            self.write_hyperparameters()
            self.write_state(optimizer._iterations, optimizer._skipped_steps,
                             optimizer._last_step_skipped, optimizer._loss_scale_state)

    # ---------------------------------------------------- tables, for a clip mode
    def clip_mode(self):
        opt = self.optimizer
        if opt.clipnorm:
            return "segment"
        if opt.global_clipnorm:
            return "global"
        return None

    def storage(self, grad_dtype):
        """The storage key of the kernels for grads of `grad_dtype`."""
        name = np.dtype(grad_dtype).name
        return self.key if name == self.key[1] else (self.key[0], name, self.key[2])

    def _function(self, rule, name, key=None):
        """A kernel, compiled and loaded when the plan is built or at the first step
        with grads of a new dtype (never inside a capture)."""
        key = self.key if key is None else key
        if (name, key) not in self._functions:
            function = self.backend.function(rule, key, name)
            self.backend.load(function)
            self._functions[(name, key)] = function
        return self._functions[(name, key)]

    def _grid(self, rule, name):
        """One block per tile, at most as many as the kernel's occupancy keeps resident."""
        blocks = self.backend.blocks_per_sm(self._function(rule, name), self._k.BLOCK)
        return self.tiles.grid(self.backend.sm_count, blocks)

    def _build_tables(self):
        """The tile tables and scratch for the current clip mode and segment groups:
        built here, when they are set, never inside a step (a step allocates nothing)."""
        from . import segments

        xp, k, opt = self.backend.xp, self._k, self.optimizer
        self.mode = self.clip_mode()
        pairs, segment_group = opt._segment_groups()
        # Tiles inside segments (so inside groups too) for per-segment norms and for
        # the rules with per-variable sums (LAMB's trust ratio).
        if self.mode == "segment" or opt.whole_variable:
            tiles = k.TileTable(self.offsets, per_segment=True, sm_count=self.backend.sm_count)
            tile_group = np.asarray(segment_group, dtype=np.int32)[tiles.segment]
        else:  # tiles inside runs of one group (one run without groups)
            runs, run_group = segments.group_runs(self.offsets, segment_group)
            tiles = k.TileTable(runs, per_segment=True, sm_count=self.backend.sm_count)
            tile_group = run_group[tiles.segment]
        self.tiles = tiles
        self.group_structure = (len(pairs), tuple(segment_group))
        self.tile_start = xp.asarray(tiles.start)
        self.tile_segment = xp.asarray(tiles.segment)
        self.tile_group = xp.asarray(tile_group)
        self.groups = xp.asarray(segments.group_values(pairs))
        # Norm sums per segment (clipnorm) or over every tile (global_clipnorm).
        self.segment_tiles = xp.asarray(tiles.segment_tiles if self.mode == "segment"
                                        else np.array([0, tiles.count], dtype=np.int64))
        self.nsegments = len(tiles.segment_tiles) - 1 if self.mode == "segment" else 1
        reduce = self.mode is not None or opt.skip_nonfinite
        self.partial = xp.zeros(tiles.count, dtype=np.float64) if reduce else None
        self.tile_nonfinite = (xp.zeros(tiles.count, dtype=np.int32)
                               if opt.skip_nonfinite else None)
        self.factors = (xp.ones(max(1, self.nsegments), dtype=self.math_dtype) if self.mode
                        else None)
        if opt.skip_nonfinite:
            self._function(None, "fusedopt_skip_check")
        if opt.rule == "lamb":
            self._build_lamb_tables(tiles)
        elif opt.rule == "muon":
            self._build_muon_tables()
        elif opt.rule == "adafactor":
            self._build_adafactor_tables(tiles)
        else:
            self.update_grid = self._grid(opt.rule, f"fusedopt_{opt.rule}")
        self.sumsq_grid = self._grid(None, "fusedopt_sumsq") if reduce else None
        self.factors_grid = 1  # global_clipnorm: one segment
        if self.mode is not None:
            blocks = self.backend.blocks_per_sm(self._function(None, "fusedopt_clip_factors"),
                                                k.BLOCK)
            if self.mode == "segment":
                self.factors_grid = max(1, min(self.nsegments, self.backend.sm_count * blocks))
        self.epoch += 1

    def _build_lamb_tables(self, tiles):
        """LAMB's scratch (kernels/lamb.cu): two sums per tile, a ratio per segment."""
        xp, nsegments = self.backend.xp, len(tiles.segment_tiles) - 1
        self.lamb_segment_tiles = xp.asarray(tiles.segment_tiles)
        self.lamb_partial = xp.zeros(2 * max(1, tiles.count), dtype=np.float64)
        self.lamb_ratios = xp.ones(max(1, nsegments), dtype=self.math_dtype)
        self.update_grid = self._grid("lamb", "fusedopt_lamb_moments")
        self.apply_grid = self._grid("lamb", "fusedopt_lamb_apply")
        blocks = self.backend.blocks_per_sm(self._function("lamb", "fusedopt_lamb_ratios"),
                                            self._k.BLOCK)
        self.ratios_grid = max(1, min(nsegments, self.backend.sm_count * blocks))

    def _build_muon_tables(self):
        """Muon's scratch d (kernels/muon.cu) and its per-segment values."""
        self.muon_scratch = self.backend.xp.zeros(max(1, self.offsets[-1]), dtype=self.dtype)
        self.segment_values = None
        self._write_muon_segments()
        self.update_grid = self._grid("muon", "fusedopt_muon_moments")
        self.apply_grid = self._grid("muon", "fusedopt_muon_apply")

    def _write_muon_segments(self):
        """Which segments take the Muon step and their rms scales (they follow the
        names, shapes and hyperparameters): written in place, queued on the stream."""
        values, self.muon_matrices = self.optimizer._kernel_segments(self.shapes, self.offsets)
        values = np.asarray(values, dtype=np.float64)
        if self.segment_values is None:
            self.segment_values = self.backend.xp.asarray(values)
        else:
            self.segment_values[...] = self.backend.xp.asarray(values)

    def _enqueue_muon(self, grads, params_data, slots, nfactors, options):
        """Muon's step: the element-wise pass, Newton-Schulz on each Muon segment by
        CuPy's matrix products on the same stream, then the apply, which advances the
        step state. The matrix products allocate temporaries from CuPy's pool, which a
        captured graph must not hold on to: capturing is refused.

        `options`: use_ema's average and the gradient accumulator (or None). The
        kernels decide on the device whether a call only accumulates; the matrix
        products are left out of such a call when the host knows it too (its count of
        calls is exact: no skip_nonfinite, no found_inf). Otherwise they run on the
        scratch d, which the apply then does not read."""
        if self._capturing or self.backend.is_capturing(self.backend.current_stream()):
            raise RuntimeError("Muon's step runs matrix products with temporary buffers: it "
                               "cannot be captured as a CUDA graph")
        k, groups = self._k, (self.groups, np.int32(self.groups.size // 2))
        tiles = (self.tile_start, self.tile_segment, self.tile_group, np.int64(self.tiles.count))
        self._enqueue("muon", "fusedopt_muon_moments", self.update_grid, k.BLOCK, (
            params_data, grads, slots[0], slots[1], self.muon_scratch, *options, *tiles,
            self.factors, nfactors, self.segment_values, *groups, self.hyper, self.state))
        if self._device_skips or self._applies(self._host_counts[0]):
            self.optimizer._orthogonalise(self.muon_scratch, self.muon_matrices)
        self._enqueue("muon", "fusedopt_muon_apply", self.apply_grid, k.BLOCK, (
            params_data, self.muon_scratch, options[0], *tiles, self.segment_values, *groups,
            self.hyper, self.state))

    def _applies(self, calls):
        """Whether the call after `calls` applied ones runs the rule (step.cuh,
        fo_applies): every call, or every N-th under gradient accumulation."""
        n = self.optimizer.gradient_accumulation_steps or 1
        return (calls + 1) % n == 0

    def _enqueue_lamb(self, grads, params_data, slots, nfactors, options, master, key):
        """LAMB's update: two passes with the per-segment trust ratios between them;
        only the last launch advances the step state. `options`: use_ema's average and
        the gradient accumulator (or None); `master`: 16-bit params' float32 copy (or
        None); `key`: the storage key of the step's grads."""
        k, groups = self._k, (self.groups, np.int32(self.groups.size // 2))
        tiles = (self.tile_start, self.tile_segment, self.tile_group, np.int64(self.tiles.count))
        self._enqueue("lamb", "fusedopt_lamb_moments", self.update_grid, k.BLOCK, (
            params_data, grads, slots[0], slots[1], master, *options, *tiles, self.factors,
            nfactors, *groups, self.hyper, self.state, self.lamb_partial), key)
        self._enqueue("lamb", "fusedopt_lamb_ratios", self.ratios_grid, k.BLOCK, (
            self.lamb_partial, self.lamb_segment_tiles,
            np.int64(len(self.lamb_segment_tiles) - 1), self.lamb_ratios), key)
        self._enqueue("lamb", "fusedopt_lamb_apply", self.apply_grid, k.BLOCK, (
            params_data, slots[0], slots[1], master, options[0], *tiles, self.lamb_ratios,
            *groups, self.hyper, self.state), key)

    def _build_adafactor_tables(self, tiles):
        """Adafactor's segment table and scratch (kernels/adafactor.cu): two sums per
        tile, a row mean per leading index, two scales per segment."""
        xp, nsegments = self.backend.xp, len(tiles.segment_tiles) - 1
        table = self.optimizer._kernel_segments(self.shapes, self.offsets)
        self.adafactor_table = xp.asarray(table)
        self.adafactor_segment_tiles = xp.asarray(tiles.segment_tiles)
        self.adafactor_partial = xp.zeros(2 * max(1, tiles.count), dtype=np.float64)
        self.adafactor_means = xp.zeros(max(1, int(table[-1])), dtype=self.dtype)
        self.adafactor_scales = xp.ones(2 * max(1, nsegments), dtype=self.dtype)
        rows, items = int(table[-3]), int(table[-2] + table[-1])
        self.adafactor_grids = {}
        for name, count in (("pass", tiles.count), ("rows", rows),
                            ("columns", -(-items // self._k.BLOCK)), ("scales", nsegments)):
            blocks = self.backend.blocks_per_sm(
                self._function("adafactor", f"fusedopt_adafactor_{name}"), self._k.BLOCK)
            self.adafactor_grids[name] = max(1, min(count, self.backend.sm_count * blocks))
        self.update_grid = self.adafactor_grids["pass"]

    def _enqueue_adafactor(self, grads, params_data, slots, nfactors, options):
        """Adafactor's step (kernels/adafactor.cu): the element passes MOMENTS, RMS and
        APPLY (0, 1, 2) of fusedopt_adafactor_pass with the row, column and segment
        sums between them; only APPLY advances the step state. Slots: r, c, v.
        `options`: use_ema's average and the gradient accumulator (or None)."""
        k, grid = self._k, self.adafactor_grids
        r, c, v = slots[:3]
        table = (self.adafactor_table, np.int64(len(self.offsets) - 1))

        def element_pass(phase):
            self._enqueue("adafactor", "fusedopt_adafactor_pass", grid["pass"], k.BLOCK, (
                np.int32(phase), params_data, grads, v, r, c, self.adafactor_means, *options,
                self.tile_start, self.tile_segment, self.tile_group, np.int64(self.tiles.count),
                self.factors, nfactors, self.adafactor_scales, self.adafactor_table,
                self.groups, np.int32(self.groups.size // 2), self.hyper, self.state,
                self.adafactor_partial))

        element_pass(0)
        self._enqueue("adafactor", "fusedopt_adafactor_rows", grid["rows"], k.BLOCK, (
            v, r, *table, self.hyper, self.state))
        self._enqueue("adafactor", "fusedopt_adafactor_columns", grid["columns"], k.BLOCK, (
            v, r, c, self.adafactor_means, *table, self.hyper, self.state))
        element_pass(1)
        self._enqueue("adafactor", "fusedopt_adafactor_scales", grid["scales"], k.BLOCK, (
            self.adafactor_partial, self.adafactor_segment_tiles, table[1],
            self.adafactor_table, self.hyper, self.state, self.adafactor_scales))
        element_pass(2)

    # ----------------------------------------------------------- the step state
    def hyperparameters_changed(self, name):
        """A hyperparameter was set (`name`, or None for any; "segment_attributes" for
        the segment table): new tables if the clip mode or the grouping of segments
        changed, else new group values written in place (a captured step keeps
        working), and the block rewritten, queued on the current stream."""
        with self.backend.on_device():
            pairs, segment_group = self.optimizer._segment_groups()
            if self.clip_mode() != self.mode or \
                    (len(pairs), tuple(segment_group)) != self.group_structure:
                self._build_tables()
            else:
                from . import segments

                self.groups[...] = self.backend.xp.asarray(segments.group_values(pairs))
            if self.optimizer.rule == "muon":
                self._write_muon_segments()
            self.write_hyperparameters()
        if name in self.optimizer._running_product_inputs or \
                name == "gradient_accumulation_steps":
            # The product is a function of the updates done and these hyperparameters
            # (Nadam's beta_1): recompute it as the host executors do. Rare, so the
            # one read of the step count it needs is acceptable.
            self.write_state(*self.read_state())

    def write_hyperparameters(self, host_learning_rate=0.0):
        block, self.host_learning_rate = self._k.optimizer_hyper(self.optimizer,
                                                                 host_learning_rate)
        self._enqueue(None, "fusedopt_write_hyper", 1, 1, (self.hyper, block))

    def write_state(self, iterations, skipped_steps, last_step_skipped, loss_scale=None):
        """Set the device counters (build, load_state_dict; `iterations`: calls
        applied); Nadam's running product comes from the Python side as a function of
        the step count. The loss scale is kept unless given as (scale, counter): with a
        LossScaleOptimizer that reads it from the device (a sync, as rare as this)."""
        if loss_scale is None:
            loss_scale = self.read_loss_scale() if self.optimizer._dynamic_growth_steps \
                else (0.0, 0)
        state = self._k.pack_step_state(iterations, skipped_steps, last_step_skipped,
                                        self.optimizer._device_product(iterations), loss_scale)
        with self.backend.on_device():
            self._enqueue(None, "fusedopt_write_state", 1, 1, (self.state, state))
        self._host_counts = (iterations, skipped_steps, last_step_skipped)

    def _read_device_state(self):
        with self.backend.on_device():
            self.join_current_stream()
            raw = self.backend.to_host(self.state)
        return np.frombuffer(raw.tobytes(), dtype=self._k.STEP_STATE)[0]

    def read_state(self):
        """(iterations, skipped steps, last step skipped): the host's count while every
        step completes, else read from the device (a sync)."""
        if not self._device_skips:
            return self._host_counts
        state = self._read_device_state()
        self._host_counts = (int(state["iterations"]), int(state["skipped_steps"]),
                             bool(state["last_step_skipped"]))
        return self._host_counts

    def read_loss_scale(self):
        """A LossScaleOptimizer's (dynamic scale, finite steps since it changed), read
        from the device (a sync: only when asked, never by a step)."""
        state = self._read_device_state()
        return float(state["loss_scale"]), int(state["scale_counter"])

    def write_loss_scale(self, scale, counter):
        self.write_state(*self.read_state(), (float(np.float32(scale)), int(counter)))

    def loss_scale_view(self):
        """The dynamic scale as a one-element float64 device array (a view of the step
        state): scale_loss multiplies by it on the device, without a sync."""
        offset = self._k.STEP_STATE.fields["loss_scale"][1]
        return self.state[offset:offset + 8].view(np.float64)

    @property
    def next_iteration(self):
        """The step the next launch will be: exact without skip_nonfinite; with it, the
        count the host last read (the device may have skipped since)."""
        return self._host_counts[0]

    def count_launched_step(self):
        """A step was queued (or replayed): without skip_nonfinite it completes for sure."""
        if not self._device_skips:
            iterations, skipped, _ = self._host_counts
            self._host_counts = (iterations + 1, skipped, False)

    # ------------------------------------------------------------------ the step
    def step(self, grads, params_data, slots, host_learning_rate=None, amp=None):
        """Queue one step. `host_learning_rate`: this step's rate (before Keras 2's
        decay) when the host evaluates it (a callable); ignored otherwise. `amp`:
        (grad_scale, found_inf), CuPy arrays or None, read by fusedopt_amp_inputs."""
        with self.backend.on_device():
            if self.host_learning_rate or (amp is None and self._amp_unscale):
                self.write_hyperparameters(host_learning_rate or 0.0)
                self._amp_unscale = False
            if amp is not None:
                grad_scale, found_inf = amp
                unscale = self.optimizer._unscale()
                self._enqueue(None, "fusedopt_amp_inputs", 1, 1, (
                    grad_scale, found_inf, np.float64(1.0 if unscale is None else unscale),
                    self.hyper, self.state))
                self._amp_unscale = self._amp_unscale or grad_scale is not None
                if found_inf is not None:
                    self._device_skips = True
            self._enqueue_step(grads, params_data, slots)
        self.count_launched_step()

    def _enqueue_step(self, grads, params_data, slots):
        opt, mode, skip = self.optimizer, self.mode, self.optimizer.skip_nonfinite
        key = self.storage(grads.dtype)
        accumulator = opt._option_slots.get("gradient_accumulator")
        if mode is not None or skip:
            self._enqueue(None, "fusedopt_sumsq", self.sumsq_grid, self._k.BLOCK, (
                grads, accumulator, self.tile_start, np.int64(self.tiles.count), self.hyper,
                self.state, self.partial, self.tile_nonfinite), key)
        if mode is not None:
            self._enqueue(None, "fusedopt_clip_factors", self.factors_grid, self._k.BLOCK, (
                self.partial, self.segment_tiles, np.int64(self.nsegments),
                np.int32(mode == "global"), self.hyper, self.factors))
        if skip:
            self._enqueue(None, "fusedopt_skip_check", 1, self._k.BLOCK, (
                self.tile_nonfinite, np.int64(self.tiles.count), self.state))
        s = list(slots) + [None] * (3 - len(slots))
        nfactors = np.int32(1 if mode == "global" else self.nsegments)
        master, average = (opt._option_slots.get(k) for k in ("master", "average"))
        # The rules with kernels of their own take use_ema's average and the accumulator
        # too (Lamb, on any storage, the master copy as well).
        options = (average, accumulator)
        if opt.rule == "lamb":
            return self._enqueue_lamb(grads, params_data, s, nfactors, options, master, key)
        if opt.rule == "muon":
            return self._enqueue_muon(grads, params_data, s, nfactors, options)
        if opt.rule == "adafactor":
            return self._enqueue_adafactor(grads, params_data, s, nfactors, options)
        self._enqueue(opt.rule, f"fusedopt_{opt.rule}", self.update_grid, self._k.BLOCK, (
            params_data, grads, s[0], s[1], s[2], master, average, accumulator,
            self.tile_start, self.tile_segment,
            self.tile_group, np.int64(self.tiles.count), self.factors, nfactors, self.groups,
            np.int32(self.groups.size // 2), self.hyper, self.state), key)

    def _enqueue(self, rule, name, grid, block, args, key=None):
        if not self._capturing:
            self.join_current_stream()
        self._function(rule, name, key)((int(grid),), (int(block),), args)

    def join_current_stream(self):
        """Make the current stream wait for this optimizer's work on another stream.
        Not while the user captures a graph (apply() inside their capture): waiting
        there on an event from outside the capture is not allowed; replays of such a
        graph are ordered by the stream the user launches them on."""
        stream = self.backend.current_stream()
        if self._stream is not None and stream != self._stream:
            if self.backend.is_capturing(stream):
                return
            self.backend.order(self._stream, stream)
        self._stream = stream

    # ------------------------------------------------------------------ graphs
    def capture(self, grads, params_data, slots):
        """One step captured as a graph (nothing runs): the tables, scratch and state
        it reads are this plan's, so each replay is the next step."""
        with self.backend.on_device():
            self._capturing = True
            try:
                with self.backend.capture() as graph:
                    self._enqueue_step(grads, params_data, slots)
            finally:
                self._capturing = False
        return graph

    def replay(self, graph):
        with self.backend.on_device():
            self.join_current_stream()
            graph.launch()


class CapturedStep:
    """One optimizer step captured as a CUDA graph: FusedOptimizer.cuda_graph.
    Calling it replays the step, which is the next step every time: the learning rate,
    schedules, bias corrections, clip factors, skips and the counters all come from the
    optimizer's device state. It reads `grads` and updates `params` and the optimizer's
    state in place, so write each step's gradients into the same `grads` buffer."""

    def __init__(self, optimizer, plan, graph):
        self.optimizer, self.plan, self.graph = optimizer, plan, graph
        self.epoch = plan.epoch

    def __call__(self):
        opt, plan = self.optimizer, self.plan
        if opt._plan is not plan or plan.epoch != self.epoch:
            raise RuntimeError("the optimizer's launch sequence changed since this step was "
                               "captured (a clip option was switched): capture it again")
        if plan.host_learning_rate:
            raise RuntimeError("the learning rate is now evaluated on the host each step (a "
                               "callable), which a captured step cannot replay")
        plan.replay(self.graph)
        plan.count_launched_step()
