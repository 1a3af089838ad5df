"""`python -m fusedopt bench`: optimizer-step throughput against the copy ceiling and peers.

In one run on one device it measures:
  - the ceiling: device-to-device copy bandwidth (bytes read + written) at each size;
    on the CPU a copy split across every core with the host executor's thread pool
    (and, for reference, NumPy's single-threaded copy);
  - fusedopt's step for every optimizer at sizes 2^16 ... 2^28 (float32) and the bytes
    it must move per element (ARCHITECTURE.md, "Performance model"); on the CPU both
    the host executor (the kernels compiled for the CPU) and the NumPy reference; one
    flat buffer, or for Adafactor and Muon, whose steps depend on the segments' shapes,
    a few matrices and a vector (matrix_shapes, layout "matrices");
  - Adam over many small variables, 10k and 50k segments, with and without per-segment
    clipnorm (the cost of clipping per variable);
  - peers on the same sizes: the NumPy reference applied to CuPy arrays (unfused
    CuPy), torch.optim with fused=True and foreach=True on one flat tensor and on ~200
    tensors, optax's jitted adam with and without clip_by_global_norm, and torch's
    clip_grad_norm_ + fused Adam against fusedopt Adam with global_clipnorm;
  - a torch model's ~200 parameters stepped by fusedopt.torch.AdamW (flattened, one
    fused step, its whole Python step() included) against torch.optim.AdamW(fused=True)
    on the same parameters, timed alternately in each round (layout "torch-model");
  - host overhead: microseconds per step for a 1M-parameter, 100-tensor model
    (fusedopt's apply(), fusedopt.torch's step() and torch's fused Adam).
  - mixed precision (PRECISIONS): Adam and SGD with bfloat16 params and grads (with a
    float32 master, stochastic rounding, bfloat16 state), float32 params with bfloat16
    grads or state, each against its own bytes per element (precision_step_bytes),
    and torch's fused and foreach Adam/SGD on bfloat16 tensors (whose state is then
    bfloat16 too: the "bf16-state" point).
A peer that is not installed is reported as missing. On a machine without a GPU the
same command compares the host executor and the NumPy reference with torch's fused and
foreach CPU optimizers and optax, over every core.

Timing on a GPU: CUDA events around each step, after warm-up; a spin kernel runs
first so the host has queued the whole step before the start event fires (device
time, not launch latency); the median of the repeats; buffer sets rotated so that
the working set exceeds twice the L2 cache. optax is timed by the host clock around
a blocking call (JAX hides its streams), so it includes one dispatch per step.
"""

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from . import _kernels, cuda, host, precision, reference
from ._progress import ProgressBar
from .optimizer import get

IMPLS = ("fusedopt", "fusedopt-numpy", "cupy-unfused", "torch-fused", "torch-foreach", "optax",
         "torch-clip+fused", "optax-clip", "copy", "inplace", "copy-1thread", "fusedopt-torch")
CEILINGS = ("copy", "inplace")  # rows whose GB/s bound a step's (see measure_copy)
# Many small variables: (segments, elements), the layouts of the per-variable clip rows.
SEGMENT_LAYOUTS = {"10k-segments": (10_000, 1 << 20), "50k-segments": (50_000, 1 << 22)}
# Benchmarked configurations: Keras defaults, except SGD with the usual momentum.
CONFIGS = {"sgd": {"momentum": 0.9}}
TORCH_PEERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "adagrad": "Adagrad"}
# Keras' options around Adam, each a row "adam+<option>": (its arguments, the calls one
# timed point makes: a whole accumulation cycle, whose calls differ).
OPTION_ROWS = {"ema": ({"use_ema": True}, 1),
               "accumulate4": ({"gradient_accumulation_steps": 4}, 4),
               "accumulate4-ema": ({"gradient_accumulation_steps": 4, "use_ema": True}, 4),
               "loss-scale": ({}, 1)}
# Option rows whose optimizer is wrapped (the wrapper's class name, in fusedopt).
OPTION_WRAPPERS = {"loss-scale": "LossScaleOptimizer"}
CLIP_NORM = 1.0
# Mixed-precision points: label -> (param dtype, grad dtype, optimizer options). The
# label is the rows' "dtype"; plain float32 rows say "float32".
PRECISIONS = {
    "bf16+master": ("bfloat16", "bfloat16", {"master_weights": True}),
    "bf16": ("bfloat16", "bfloat16", {}),
    "bf16+stochastic": ("bfloat16", "bfloat16", {"stochastic_rounding": True}),
    "bf16-state": ("bfloat16", "bfloat16", {"state_dtype": "bfloat16"}),
    "f32-bf16grads": ("float32", "bfloat16", {}),
    "f32-bf16state": ("float32", "float32", {"state_dtype": "bfloat16"}),
}
PRECISION_OPTIMIZERS = ("adam", "sgd")


def add_arguments(parser):
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                        help="where to measure (auto: the GPU when there is one)")
    parser.add_argument("--sizes", default=None,
                        help="log2 sizes, e.g. 16-28 or 20,24 (default: 16-28 step 2 on "
                             "a GPU, 16-22 on the CPU)")
    parser.add_argument("--optimizers", default="all",
                        help="comma-separated names (default: every optimizer)")
    parser.add_argument("--repeats", type=_count_arg(1), default=None,
                        help="timed steps per point (default 30 on a GPU, 7 on the CPU)")
    parser.add_argument("--warmup", type=_count_arg(0), default=5,
                        help="untimed steps before each point (default 5)")
    parser.add_argument("--rounds", type=_count_arg(1), default=None,
                        help="run the whole plan this many times and report each point's "
                             "median over the rounds (default: 3 on the CPU, where other "
                             "processes share the cores and load drifts; 1 on a GPU)")
    parser.add_argument("--no-peers", action="store_true", help="measure fusedopt only")
    parser.add_argument("--tests", default=None, metavar="JSON",
                        help="a test-count record {passed, failed, skipped} to embed")
    parser.add_argument("--out", default="bench/results", help="directory for the record")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (it is drawn only on a terminal anyway)")


def run(args):
    device = args.device
    if device == "auto":
        device = "gpu" if cuda.gpu_available() else "cpu"
    problem = cuda.gpu_problem() if device == "gpu" else None
    if problem is not None:
        return _error(f"--device gpu: no usable GPU here: {problem}")
    # Every argument is checked before anything is measured: a mistake must not
    # surface after an hour of benchmarking.
    try:
        sizes = parse_sizes(args.sizes, device)
        optimizers = parse_optimizers(args.optimizers)
        tests = _load_tests_arg(args.tests)
        _check_out_dir(args.out)
    except ValueError as e:
        return _error(str(e))
    ctx = GpuContext() if device == "gpu" else CpuContext()
    try:
        check_memory(ctx, sizes, optimizers, peers=not args.no_peers)
    except ValueError as e:
        return _error(str(e))
    load_before = _load_average()
    repeats = args.repeats or (30 if device == "gpu" else 7)
    rounds = args.rounds or (1 if device == "gpu" else 3)
    if rounds < 1:
        print("error: --rounds must be >= 1", file=sys.stderr)
        return 2
    plan = build_plan(ctx, sizes, optimizers, peers=not args.no_peers)
    progress = ProgressBar(enabled=not args.quiet)
    measured = []
    total = len(plan) * rounds
    for r in range(rounds):
        for done, (label, measure) in enumerate(plan):
            round_label = f"{label} (round {r + 1}/{rounds})" if rounds > 1 else label
            progress.update("bench", r * len(plan) + done, total, round_label)
            measured.append(measure(ctx, warmup=args.warmup, repeats=repeats))
    progress.clear()
    rows = merge_rounds(measured)
    record = make_record(ctx, rows, tests=tests)
    if ctx.device == "cpu":
        record["machine"] = cpu_machine(ctx, load_before, _load_average())
    paths = write_record(record, Path(args.out))
    print(markdown_table(record))
    print("\nwrote " + ", ".join(str(p) for p in paths))
    return 0


# ------------------------------------------------------------------ arguments
# Sizes are given as log2 of the element count. Above 2^MAX_LOG2_SIZE no machine has
# the memory; below it, check_memory() compares the estimate with what is free. The
# 200-tensor layout needs at least 200 elements.
MIN_LOG2_SIZE, MAX_LOG2_SIZE = 8, 36


def parse_sizes(text, device):
    """--sizes "16-28" (every other power from 16 to 28) or "20,24" -> element counts."""
    if text is None:
        return [2**k for k in (range(16, 29, 2) if device == "gpu" else range(16, 23, 2))]
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        if not lo.strip().isdigit() or (hi and not hi.strip().isdigit()):
            raise ValueError(f"--sizes takes log2 sizes like 16-28 or 20,24, got {text!r}")
        lo, hi = int(lo), int(hi or lo)
        if lo > hi:
            raise ValueError(f"--sizes: the range {part.strip()!r} runs backwards; "
                             f"write {hi}-{lo}")
        if lo < MIN_LOG2_SIZE:
            raise ValueError(f"--sizes are log2 element counts, at least {MIN_LOG2_SIZE} "
                             f"(the 200-tensor layout needs 200 elements); got {lo}")
        if hi > MAX_LOG2_SIZE:
            raise ValueError(f"--sizes are log2 element counts, at most {MAX_LOG2_SIZE} "
                             f"(2^{MAX_LOG2_SIZE} float32 = {_format_bytes(4 << MAX_LOG2_SIZE)} "
                             f"per buffer); got {hi}")
        out += [2**k for k in range(lo, hi + 1, 2 if hi - lo >= 4 else 1)]
    return sorted(set(out))


def parse_optimizers(text):
    """--optimizers "all" or "adam,sgd" -> names; unknown names are a ValueError."""
    from .optimizer import available

    # The benchmark measures fused steps: optimizers that only the NumPy executor runs
    # so far (README, "Which executor runs what") have no row.
    fused = [n for n in available() if not make_optimizer(n)._reference_only()]
    names = fused if text == "all" else [t.strip().lower() for t in text.split(",")]
    unknown = [n for n in names if n not in available()]
    if unknown or not names:
        raise ValueError(f"--optimizers: unknown optimizer(s) {unknown}; valid names: "
                         f"all, or a comma-separated list of {', '.join(fused)}")
    reference_only = [n for n in names if n not in fused]
    if reference_only:
        raise ValueError(f"--optimizers: {', '.join(reference_only)} run only on the NumPy "
                         f"executor so far (no fused kernel to measure); valid names: all, "
                         f"or a comma-separated list of {', '.join(fused)}")
    return names


def _count_arg(low):
    """An argparse type: an integer >= low, with a message argparse puts after the flag."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


def _load_tests_arg(path):
    try:
        return load_tests(path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--tests: cannot read {path}: {e}") from e


def _check_out_dir(path):
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out: {path} exists and is not a directory")


def _error(message):
    print(f"python -m fusedopt bench: error: {message}", file=sys.stderr)
    return 2


# --------------------------------------------------------------------- memory
# float32 words per element held at once beyond params, grads and the state slots:
# random initialisation (rand * 1e-2 makes a temporary) and the peers' unfused
# steps (torch foreach, XLA) keep a few full-size temporaries.
TEMPORARY_WORDS = 3


def estimate_peak_bytes(ctx, sizes, optimizers, peers):
    """A generous estimate of the most memory one measurement holds at once: its
    rotated buffer sets (params, grads, every slot, temporaries) at the largest size.
    Measurements free their buffers before the next one starts."""
    slots = max(len(make_optimizer(name).slot_names) for name in optimizers)
    if peers:
        slots = max(slots, 2)  # torch's and optax's Adam keep two slots
    bytes_per_element = 4 * (2 + slots + TEMPORARY_WORDS)
    return max(rotation(ctx, bytes_per_element * n) * bytes_per_element * n for n in sizes)


def check_memory(ctx, sizes, optimizers, peers):
    """ValueError, before anything is allocated, when the run cannot fit."""
    needed = estimate_peak_bytes(ctx, sizes, optimizers, peers)
    available = ctx.available_bytes()
    if available is not None and needed > available:
        largest = max(sizes).bit_length() - 1
        raise ValueError(
            f"--sizes: the largest point (2^{largest} float32 elements) needs about "
            f"{_format_bytes(needed)}, but only {_format_bytes(available)} of "
            f"{ctx.device.upper()} memory is available; use smaller --sizes")


def cpu_available_bytes():
    """Memory the kernel says can be allocated without swapping, or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def _format_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


# Words per element that a rule's second pass over the elements reads again: LAMB's
# trust ratio needs per-variable norms between its passes (kernels/lamb.cu), so pass 2
# reads p, m and v again (fp32: 24 + 16 = 40 bytes per element in all).
SECOND_PASS_WORDS = {"lamb": 3}
# Rules whose passes depend on a segment's shape: the words per element a segment of
# `shape` moves (the headers of kernels/<rule>.cu; counted by the emulator,
# tests/test_emulated_kernels.py). They are measured on the "matrices" layout.
# Adafactor: factored (rank >= 2) 11 (read p, g; write G; G twice for the row and
# column sums; read p, g; read p, g, write p, v), else 8 (p, g, v read and written,
# then p, g, v read, p written); its r and c are a row's or a column's worth.
# Muon: a 2-D segment 8 (read p, g, m; write m, d; read p, d; write p) plus the
# Newton-Schulz matrix products, which are compute, not traffic; others AdamW's 7.
SHAPED_WORDS = {
    "adafactor": lambda shape: 11 if len(shape) >= 2 else 8,
    "muon": lambda shape: 8 if len(shape) == 2 else 7,
}


def _shaped_option_words(opt):
    """Words per element Keras' options add to an applying call of a rule of
    SHAPED_WORDS (kernels/whole.cuh): EMA's average read and written; the accumulator
    read and restarted, Adafactor's written once more (the mean its later passes read)."""
    words = 2 if opt.use_ema else 0
    if opt.gradient_accumulation_steps:
        words += 3 if opt.rule == "adafactor" else 2
    return words


def step_bytes(name, itemsize, clip=False, shape=None, **extra):
    """Bytes a fused step must move per element (of a segment of `shape`, for the rules
    of SHAPED_WORDS; None: a 1-D one): read p and g, write p, read and write every
    state slot (EMA's average and the gradient accumulator included: an applying call
    reads and zeroes it; and what a second pass reads again); global clipping reads g
    once more."""
    opt = make_optimizer(name, **extra)
    clip_words = 1 if clip else 0
    if opt.rule in SHAPED_WORDS:
        words = SHAPED_WORDS[opt.rule](shape or (0,)) + _shaped_option_words(opt)
        return itemsize * (words + clip_words)
    again = SECOND_PASS_WORDS.get(opt.rule, 0)
    return itemsize * (3 + 2 * len(opt.slot_names) + again + clip_words)


def layout_step_bytes(name, label, shapes, clip=False):
    """Bytes a step moves over a layout: precision_step_bytes per element, or for the
    rules of SHAPED_WORDS each segment's own (float32)."""
    if make_optimizer(name).rule not in SHAPED_WORDS:
        return precision_step_bytes(name, label, clip) * sum(math.prod(s) for s in shapes)
    return sum(step_bytes(name, 4, clip, s) * math.prod(s) for s in shapes)


def option_bytes(name, option, itemsize):
    """Bytes per element of one timed point of OPTION_ROWS[option] (all its calls).
    With gradient accumulation N-1 calls only add: they read g and the accumulator and
    write the accumulator (3 words), and with EMA also read p and read and write the
    average (6 words; p is written only when the average overwrites it); the N-th is
    a full step with every slot. A LossScaleOptimizer's step checks the gradients for
    inf/NaN before the update (skip_nonfinite's pass), reading g once more, as a norm
    clip does."""
    kwargs, calls = OPTION_ROWS[option]
    light = 6 if kwargs.get("use_ema") else 3
    check = option in OPTION_WRAPPERS
    return (calls - 1) * light * itemsize + step_bytes(name, itemsize, clip=check, **kwargs)


def precision_step_bytes(name, label, clip=False):
    """precision_step_bytes for a PRECISIONS point ("float32": step_bytes): the params
    read and written in their dtype, or with a master copy only written (the float32
    master is read and written instead); g read (twice with clipping); each rule state
    slot read and written in the state dtype (fusedopt.precision.bytes_per_element).
    E.g. Adam, bfloat16 params and grads with a float32 master and state:
    2 + 2*4 + 2 + 2*2*4 = 28; all bfloat16 without a master: 14."""
    if label == "float32":
        return step_bytes(name, 4, clip)
    param, grad, options = PRECISIONS[label]
    opt = make_optimizer(name, **options)
    resolved = opt._precision_for(param, grad)
    slots = len(opt.slot_names) - (1 if opt.master_weights else 0)
    extra = precision.itemsize(grad) if clip else 0
    return precision.bytes_per_element(resolved, slots) + extra


def bench_layout(name):
    """The layout an optimizer's rows are measured on: "matrices" for the rules whose
    step depends on the segments' shapes (Adafactor's factored statistics, Muon's
    Newton-Schulz), else one flat buffer. `name` may be an option row's ("adam+ema"
    is measured on Adam's layout)."""
    base = name.split("+")[0]
    return "matrices" if make_optimizer(base).rule in SHAPED_WORDS else "flat"


def matrix_shapes(n):
    """Matrices adding up to n elements, as a model's weights: a square one of about
    n/2, a wide (1:4) one of n/4, a tall (4:1) one of n/8 and a very wide (1:16) one of
    n/16, and a vector (a bias) holding the rest."""
    shapes = []
    for fraction, aspect in ((2, 1), (4, 4), (8, 0.25), (16, 16)):
        area = n // fraction
        rows = max(1, math.isqrt(int(area / aspect)))
        if area // rows:
            shapes.append((rows, area // rows))
    rest = n - sum(math.prod(s) for s in shapes)
    return shapes + ([(rest,)] if rest else [])


def make_optimizer(name, **extra):
    opt = get(name)
    return type(opt)(**{**CONFIGS.get(name, {}), **extra})


def model_like_shapes(n, count=200, seed=0):
    """`count` tensors of mixed sizes (log-uniform) adding up to n >= count elements."""
    rng = np.random.default_rng(seed)
    weights = np.exp(rng.uniform(0, np.log(4096), count))
    # One element each, the rest shared by weight: the floors leave a remainder >= 0
    # for the largest tensor, so no size can go negative (it did for n = 2^10).
    sizes = 1 + np.floor(weights / weights.sum() * (n - count)).astype(np.int64)
    sizes[np.argmax(sizes)] += n - sizes.sum()
    return [(int(s),) for s in sizes]


# ------------------------------------------------------------------- contexts
class CpuContext:
    """NumPy buffers, host clock."""

    device = "cpu"
    xp = np

    def __init__(self):
        self.name = cpu_name()
        self.l2_bytes = 32 << 20  # generous: rotation is cheap insurance on the CPU
        self.threads = host.default_num_threads()

    def rand(self, n, seed):
        return np.random.default_rng(seed).standard_normal(n, dtype=np.float32)

    def available_bytes(self):
        return cpu_available_bytes()

    def time(self, step, sets, warmup, repeats):
        # Let the thread pools of what ran before (torch's OpenMP threads spin after
        # their last task) go to sleep, so they do not take the cores from this one.
        time.sleep(0.05)
        for i in range(warmup):
            step(i % sets)
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            step(r % sets)
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def sync(self):
        pass

    def free(self):
        pass


class GpuContext:
    """CuPy buffers on the current GPU, CUDA events."""

    device = "gpu"

    def __init__(self):
        cp = self.cp = self.xp = cuda._cupy()
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        self.name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        self.l2_bytes = cp.cuda.Device().attributes["L2CacheSize"]
        self.clock_khz = props["clockRate"]
        self._spin = cp.RawKernel(
            'extern "C" __global__ void spin(long long cycles) {'
            "  long long t0 = clock64(); while (clock64() - t0 < cycles) {} }", "spin")

    def rand(self, n, seed):
        return self.cp.random.default_rng(seed).standard_normal(n, dtype=np.float32)

    def available_bytes(self):
        free, _total = self.cp.cuda.runtime.memGetInfo()
        return free + self.cp.get_default_memory_pool().free_bytes()

    def spin(self, microseconds):
        """Keep the GPU busy so the host queues the timed work before it starts."""
        cycles = int(microseconds * self.clock_khz / 1e3)
        self._spin((1,), (1,), (np.int64(cycles),))

    def time(self, step, sets, warmup, repeats, events=None):
        cp = self.cp
        host = 0.0
        for i in range(warmup):
            t0 = time.perf_counter()
            step(i % sets)
            host = max(host, time.perf_counter() - t0)
        self.sync()
        make_event = events or cp.cuda.Event
        start, end = make_event(), make_event()
        times = []
        for r in range(repeats):
            # Longer than it takes the host to queue a step (measured in the warm-up).
            self.spin(100 + 2e6 * host)
            start.record()
            step(r % sets)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) if events else cp.cuda.get_elapsed_time(start, end))
        return statistics.median(times)

    def sync(self):
        self.cp.cuda.runtime.deviceSynchronize()

    def free(self):
        self.sync()
        self.cp.get_default_memory_pool().free_all_blocks()


def rotation(ctx, bytes_per_set):
    """How many buffer sets to cycle through so the working set exceeds 2x L2."""
    return int(min(64, max(1, math.ceil(2 * ctx.l2_bytes / max(1, bytes_per_set)))))


# ----------------------------------------------------------------------- plan
def build_plan(ctx, sizes, optimizers, peers):
    """[(label, measure(ctx, warmup, repeats) -> rows)] in a memory-friendly order."""
    plan = []
    for n in sizes:
        plan.append((f"copy n=2^{n.bit_length() - 1}", _bind(measure_copy, n)))
        for name in optimizers:
            layout = bench_layout(name)
            plan.append((f"fusedopt {name} n=2^{n.bit_length() - 1}",
                         _bind(measure_fusedopt, name, n, layout, None)))
            if ctx.device == "cpu":
                plan.append((f"fusedopt-numpy {name} n=2^{n.bit_length() - 1}",
                             _bind(measure_fusedopt, name, n, layout, None, executor="numpy")))
        if "adam" in optimizers:
            for option in OPTION_ROWS:
                plan.append((f"fusedopt adam+{option} n=2^{n.bit_length() - 1}",
                             _bind(measure_fusedopt_option, "adam", n, option)))
            plan.append((f"fusedopt adam 200-tensors n=2^{n.bit_length() - 1}",
                         _bind(measure_fusedopt, "adam", n, "200-tensors", None)))
            plan.append((f"fusedopt adam clip n=2^{n.bit_length() - 1}",
                         _bind(measure_fusedopt, "adam", n, "flat", "global")))
        for name in [o for o in optimizers if o in PRECISION_OPTIMIZERS]:
            for label in PRECISIONS:
                plan.append((f"fusedopt {name} {label} n=2^{n.bit_length() - 1}",
                             _bind(measure_fusedopt, name, n, "flat", None, precision=label)))
            if peers and name in TORCH_PEERS:
                plan.append((f"torch {name} bf16 n=2^{n.bit_length() - 1}",
                             _bind(measure_torch, name, n, "flat", dtype="bf16-state")))
        if not peers:
            continue
        if ctx.device == "gpu":  # the element-wise rules (reference.<rule> on CuPy arrays)
            for name in [o for o in optimizers if not make_optimizer(o).whole_variable]:
                plan.append((f"cupy-unfused {name} n=2^{n.bit_length() - 1}",
                             _bind(measure_cupy_unfused, name, n)))
        for name in [o for o in optimizers if o in TORCH_PEERS]:
            for layout in ("flat", "200-tensors"):
                plan.append((f"torch {name} {layout} n=2^{n.bit_length() - 1}",
                             _bind(measure_torch, name, n, layout)))
        if "adamw" in optimizers:
            plan.append((f"torch model fusedopt.torch vs fused n=2^{n.bit_length() - 1}",
                         _bind(measure_torch_model, n)))
        if "adam" in optimizers:
            plan.append((f"torch clip+fused n=2^{n.bit_length() - 1}",
                         _bind(measure_torch_clip, n)))
            plan.append((f"optax n=2^{n.bit_length() - 1}", _bind(measure_optax, n)))
    if "adam" in optimizers:
        for layout, (_, n) in SEGMENT_LAYOUTS.items():
            for clip in (None, "segment"):
                plan.append((f"fusedopt adam {layout}{' clipnorm' if clip else ''}",
                             _bind(measure_fusedopt, "adam", n, layout, clip)))
    plan.append(("host overhead", _bind(measure_host_overhead, peers)))
    return plan


def merge_rounds(measured):
    """One row per point: the median over the rounds of each round's median, with the
    rounds' values kept in `round_ms` (A and B are then timed in every round)."""
    points = {}
    for rows in measured:
        for r in rows:
            key = (r["optimizer"], r["impl"], r["n"], r["layout"], r["clip"], r["dtype"])
            points.setdefault(key, []).append(r)
    out = []
    for same in points.values():
        times = [r["median_ms"] for r in same if r["median_ms"] is not None]
        first = dict(same[0])
        if len(same) > 1 and times:
            first["round_ms"] = times
            first["median_ms"] = statistics.median(times)
            first["gbps"] = first["bytes"] / (first["median_ms"] * 1e6)
        out.append(first)
    return out


def _bind(fn, *args, **kwargs):
    return lambda ctx, warmup, repeats: fn(ctx, *args, warmup=warmup, repeats=repeats, **kwargs)


def row(optimizer, impl, n, layout, clip, median_ms, nbytes, dtype="float32", note=None):
    gbps = None if median_ms is None or median_ms <= 0 else nbytes / (median_ms * 1e6)
    out = {"optimizer": optimizer, "impl": impl, "n": int(n), "dtype": dtype,
           "layout": layout, "clip": clip, "median_ms": median_ms, "bytes": int(nbytes),
           "gbps": gbps}
    if note:
        out["note"] = note
    return out


def missing(optimizer, impl, n, layout, clip, why):
    return [row(optimizer, impl, n, layout, clip, None, 0, note=f"missing: {why}")]


# ---------------------------------------------------------------- measurements
def measure_copy(ctx, n, warmup, repeats):
    """The ceiling: a copy, bytes read + written. On the CPU, with every core (as the
    host executor and torch use): a copy, and an in-place scale x <- x*1, which reads
    and writes each byte once as a step does with its state (a copy's destination
    costs an extra read, or slower streaming stores); NumPy's single-threaded copy is
    recorded too. The ceiling is the faster of the two on every core."""
    nbytes = 2 * 4 * n  # read + write
    sets = rotation(ctx, nbytes)
    src = [ctx.rand(n, i) for i in range(sets)]
    dst = [ctx.xp.empty_like(s) for s in src]
    rows = []
    if ctx.device == "cpu":
        try:
            copy, scale = host.ceiling_functions()
        except host.HostBuildError as e:
            rows += missing(None, "copy", n, "flat", None, f"no host library: {e}"[:120])
        else:
            threads = f"{ctx.threads} threads"
            ms = ctx.time(lambda i: copy(dst[i].ctypes.data, src[i].ctypes.data, n,
                                         ctx.threads), sets, warmup, repeats)
            rows.append(row(None, "copy", n, "flat", None, ms, nbytes, note=threads))
            ms = ctx.time(lambda i: scale(src[i].ctypes.data, n, 1.0, ctx.threads), sets,
                          warmup, repeats)
            rows.append(row(None, "inplace", n, "flat", None, ms, nbytes, note=threads))
        ms = ctx.time(lambda i: np.copyto(dst[i], src[i]), sets, warmup, repeats)
        rows.append(row(None, "copy-1thread", n, "flat", None, ms, nbytes))
    else:
        ms = ctx.time(lambda i: ctx.xp.copyto(dst[i], src[i]), sets, warmup, repeats)
        rows.append(row(None, "copy", n, "flat", None, ms, nbytes))
    ctx.free()
    return rows


def layout_shapes(layout, n):
    if layout == "flat":
        return [(n,)]
    if layout == "matrices":
        return matrix_shapes(n)
    if layout in SEGMENT_LAYOUTS:
        return model_like_shapes(n, count=SEGMENT_LAYOUTS[layout][0], seed=2)
    return model_like_shapes(n)


CLIP_OPTIONS = {None: {}, "global": {"global_clipnorm": CLIP_NORM},
                "segment": {"clipnorm": CLIP_NORM}}


def _fusedopt_sets(ctx, name, n, layout, clip, executor="auto", label="float32", extra=None,
                   wrapper=None):
    import fusedopt
    from .flat import FlatBuffer

    shapes = layout_shapes(layout, n)
    # Per-segment clipping reads g once more too; its bytes are counted like global's.
    nbytes = layout_step_bytes(name, label, shapes, clip=bool(clip))
    param, grad, options = PRECISIONS.get(label, ("float32", "float32", {}))
    options = {**options, **(extra or {})}
    sets = rotation(ctx, nbytes)
    out = []
    for i in range(sets):
        params = FlatBuffer(ctx.rand(n, 2 * i).astype(precision.numpy_dtype(param)), shapes)
        grads = (ctx.rand(n, 2 * i + 1) * 1e-2).astype(precision.numpy_dtype(grad))
        opt = make_optimizer(name, executor=executor, **CLIP_OPTIONS[clip], **options)
        if wrapper is not None:
            opt = getattr(fusedopt, wrapper)(opt)
        opt.build(params)
        out.append((opt, params, grads))
    return out, nbytes


def measure_fusedopt(ctx, name, n, layout, clip, warmup, repeats, executor="auto",
                     precision="float32"):
    """fusedopt's step; on the CPU executor="numpy" times the NumPy reference;
    `precision` a PRECISIONS label (the rows' dtype)."""
    sets, nbytes = _fusedopt_sets(ctx, name, n, layout, clip, executor, precision)
    impl = "fusedopt-numpy" if executor == "numpy" else "fusedopt"
    note = None
    if ctx.device == "cpu" and executor == "auto" and sets[0][0].executor_name != "host":
        note = "NumPy fallback: the host library could not be built"

    def step(i):
        opt, params, grads = sets[i]
        opt.apply(grads, params)

    ms = ctx.time(step, len(sets), warmup, repeats)
    del sets
    ctx.free()
    return [row(name, impl, n, layout, clip, ms, nbytes, dtype=precision, note=note)]


def measure_fusedopt_option(ctx, name, n, option, warmup, repeats):
    """fusedopt's step with one of Keras' options (OPTION_ROWS), row "<name>+<option>";
    with gradient accumulation one timed point is a whole cycle of N calls."""
    kwargs, calls = OPTION_ROWS[option]
    sets, _ = _fusedopt_sets(ctx, name, n, "flat", None, extra=kwargs,
                             wrapper=OPTION_WRAPPERS.get(option))
    nbytes = option_bytes(name, option, 4) * n

    def step(i):
        opt, params, grads = sets[i]
        for _ in range(calls):
            opt.apply(grads, params)

    ms = ctx.time(step, len(sets), warmup, repeats)
    del sets
    ctx.free()
    note = f"{calls} calls (one accumulation cycle)" if calls > 1 else OPTION_WRAPPERS.get(option)
    return [row(f"{name}+{option}", "fusedopt", n, "flat", None, ms, nbytes, note=note)]


def measure_cupy_unfused(ctx, name, n, warmup, repeats):
    """The NumPy reference rule applied to CuPy arrays: one CuPy kernel per operation."""
    sets, nbytes = _fusedopt_sets(ctx, name, n, "flat", None)
    rule = getattr(reference, sets[0][0].rule)

    def step(i):
        opt, params, grads = sets[i]
        lr, scalars = opt._step_scalars(opt._iterations)
        c = tuple(np.float32(x) for x in scalars)
        rule(params.data, grads, *opt._slots, *c)
        opt._iterations += 1

    ms = ctx.time(step, len(sets), warmup, repeats)
    del sets
    ctx.free()
    return [row(name, "cupy-unfused", n, "flat", None, ms, nbytes)]


def _torch(ctx):
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if ctx.device == "gpu" and not torch.cuda.is_available():
        return None, "torch has no CUDA"
    return torch, None


def _torch_sets(ctx, torch, n, layout, sets, dtype=None):
    dev = "cuda" if ctx.device == "gpu" else "cpu"
    shapes = [(n,)] if layout == "flat" else model_like_shapes(n)
    dtype = dtype or torch.float32
    out = []
    for i in range(sets):
        gen = torch.Generator(device=dev).manual_seed(i)
        params = [torch.randn(s, device=dev, generator=gen).to(dtype).requires_grad_()
                  for s in shapes]
        for p in params:
            p.grad = (torch.randn(p.shape, device=dev, generator=gen) * 1e-2).to(dtype)
        out.append(params)
    return out


def _torch_time(ctx, torch, step, sets, warmup, repeats):
    if ctx.device == "gpu":
        return ctx.time(step, sets, warmup, repeats,
                        events=lambda: torch.cuda.Event(enable_timing=True))
    return ctx.time(step, sets, warmup, repeats)


def measure_torch(ctx, name, n, layout, warmup, repeats, dtype="float32"):
    """torch.optim's fused and foreach step on float32 tensors, or with dtype
    "bf16-state" on bfloat16 params and grads (torch keeps the state in the params'
    dtype: fusedopt's "bf16-state" point)."""
    torch, why = _torch(ctx)
    impls = ("torch-fused", "torch-foreach")
    if torch is None:
        return [dict(r, dtype=dtype) for impl in impls
                for r in missing(name, impl, n, layout, None, why)]
    nbytes = precision_step_bytes(name, dtype) * n
    kwargs = {"momentum": 0.9} if name == "sgd" else {}
    tensor_dtype = torch.bfloat16 if dtype == "bf16-state" else torch.float32
    rows = []
    for impl in impls:
        sets = _torch_sets(ctx, torch, n, layout, rotation(ctx, nbytes), tensor_dtype)
        flag = {"fused": True} if impl == "torch-fused" else {"foreach": True}
        try:
            opts = [getattr(torch.optim, TORCH_PEERS[name])(p, lr=1e-3, **kwargs, **flag)
                    for p in sets]
            ms = _torch_time(ctx, torch, lambda i: opts[i].step(), len(sets), warmup, repeats)
            rows.append(row(name, impl, n, layout, None, ms, nbytes, dtype=dtype))
        except (RuntimeError, TypeError, ValueError) as e:  # e.g. no fused kernel here
            rows += [dict(r, dtype=dtype) for r in
                     missing(name, impl, n, layout, None, str(e).splitlines()[0][:120])]
        del sets
        if ctx.device == "gpu":
            torch.cuda.empty_cache()
    ctx.free()
    return rows


def measure_torch_model(ctx, n, warmup, repeats):
    """A torch model's ~200 parameters (model_like_shapes) with gradients, stepped by
    fusedopt.torch.AdamW (the parameters flattened into one buffer; each timed step is
    the whole torch.optim.Optimizer.step(): its checks, the DLPack views and the one
    fused step) and by torch.optim.AdamW(fused=True) on an identical set: the same
    defaults (lr 1e-3, weight_decay 0.01), A and B timed one after the other."""
    impls = ("fusedopt-torch", "torch-fused")
    torch, why = _torch(ctx)
    if torch is None:
        return [r for impl in impls for r in missing("adamw", impl, n, "torch-model", None, why)]
    from . import torch as fusedopt_torch

    nbytes = step_bytes("adamw", 4) * n
    rows = []
    for impl in impls:
        sets = _torch_sets(ctx, torch, n, "200-tensors", rotation(ctx, nbytes))
        try:
            if impl == "fusedopt-torch":
                opts = [fusedopt_torch.AdamW(p, lr=1e-3) for p in sets]
            else:
                opts = [torch.optim.AdamW(p, lr=1e-3, fused=True) for p in sets]
            ms = _torch_time(ctx, torch, lambda i: opts[i].step(), len(sets), warmup, repeats)
            rows.append(row("adamw", impl, n, "torch-model", None, ms, nbytes,
                            note="200 tensors; the Python step() included"))
        except (RuntimeError, TypeError, ValueError) as e:
            rows += missing("adamw", impl, n, "torch-model", None, str(e).splitlines()[0][:120])
        del sets
        if ctx.device == "gpu":
            torch.cuda.empty_cache()
    ctx.free()
    return rows


def measure_torch_clip(ctx, n, warmup, repeats):
    torch, why = _torch(ctx)
    if torch is None:
        return missing("adam", "torch-clip+fused", n, "flat", "global", why)
    nbytes = step_bytes("adam", 4, clip=True) * n
    sets = _torch_sets(ctx, torch, n, "flat", rotation(ctx, nbytes))
    try:
        opts = [torch.optim.Adam(p, lr=1e-3, fused=True) for p in sets]
    except (RuntimeError, TypeError, ValueError) as e:
        return missing("adam", "torch-clip+fused", n, "flat", "global", str(e)[:120])

    def step(i):
        torch.nn.utils.clip_grad_norm_(sets[i], CLIP_NORM)
        opts[i].step()

    ms = _torch_time(ctx, torch, step, len(sets), warmup, repeats)
    del sets, opts
    if ctx.device == "gpu":
        torch.cuda.empty_cache()
    return [row("adam", "torch-clip+fused", n, "flat", "global", ms, nbytes)]


def measure_optax(ctx, n, warmup, repeats):
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        import jax
        import optax
    except ImportError:
        return (missing("adam", "optax", n, "flat", None, "jax/optax not installed")
                + missing("adam", "optax-clip", n, "flat", "global", "jax/optax not installed"))
    platform_name = "gpu" if ctx.device == "gpu" else "cpu"
    try:
        device = jax.devices(platform_name)[0]
    except RuntimeError:
        why = f"jax has no {platform_name} backend"
        return (missing("adam", "optax", n, "flat", None, why)
                + missing("adam", "optax-clip", n, "flat", "global", why))
    rows = []
    for impl, clip in (("optax", None), ("optax-clip", "global")):
        tx = optax.adam(1e-3, eps=1e-7)
        if clip:
            tx = optax.chain(optax.clip_by_global_norm(CLIP_NORM), tx)

        def update(params, grads, state, tx=tx):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        # Donating params and state lets XLA update them in place, as the others do.
        step_fn = jax.jit(update, donate_argnums=(0, 2))
        nbytes = step_bytes("adam", 4, clip=bool(clip)) * n
        sets = []
        for i in range(rotation(ctx, nbytes)):
            key = jax.random.PRNGKey(i)
            p = jax.device_put(jax.random.normal(key, (n,), dtype="float32"), device)
            g = jax.device_put(jax.random.normal(key, (n,), dtype="float32") * 1e-2, device)
            sets.append([p, g, tx.init(p)])

        def step(i):
            p, g, state = sets[i]
            p, state = step_fn(p, g, state)
            jax.block_until_ready(p)
            sets[i][0], sets[i][2] = p, state

        times = []
        if ctx.device == "cpu":
            time.sleep(0.05)  # as CpuContext.time: let other thread pools go to sleep
        for i in range(warmup):
            step(i % len(sets))
        for r in range(repeats):
            t0 = time.perf_counter()
            step(r % len(sets))
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append(row("adam", impl, n, "flat", clip, statistics.median(times), nbytes,
                        note="host clock around a blocking jitted call"))
        del sets
    return rows


def measure_host_overhead(ctx, peers, warmup, repeats, steps=200):
    """Microseconds per step for a small model (1M parameters in 100 tensors), steps
    issued back to back: host-bound, so this is the cost of the Python call."""
    from .flat import FlatBuffer

    n, count = 1 << 20, 100
    shapes = model_like_shapes(n, count=count, seed=1)
    nbytes = step_bytes("adam", 4) * n
    params = FlatBuffer(ctx.rand(n, 0), shapes)
    grads = ctx.rand(n, 1) * 1e-2
    opt = make_optimizer("adam")
    rows = [row("adam", "fusedopt", n, "small-model", None,
                _per_step_ms(ctx, lambda: opt.apply(grads, params), steps, warmup), nbytes)]
    if not peers:
        return rows
    torch, why = _torch(ctx)
    if torch is None:
        return rows + missing("adam", "torch-fused", n, "small-model", None, why)
    dev = "cuda" if ctx.device == "gpu" else "cpu"
    tparams = [torch.randn(s, device=dev, requires_grad=True) for s in shapes]
    for p in tparams:
        p.grad = torch.randn_like(p) * 1e-2
    try:
        topt = torch.optim.Adam(tparams, lr=1e-3, fused=True)
    except (RuntimeError, TypeError, ValueError) as e:
        return rows + missing("adam", "torch-fused", n, "small-model", None, str(e)[:120])
    sync = torch.cuda.synchronize if ctx.device == "gpu" else (lambda: None)
    rows.append(row("adam", "torch-fused", n, "small-model", None,
                    _per_step_ms(ctx, topt.step, steps, warmup, sync=sync), nbytes))
    from . import torch as fusedopt_torch

    fparams = [torch.randn(s, device=dev, requires_grad=True) for s in shapes]
    for p in fparams:
        p.grad = torch.randn_like(p) * 1e-2
    fopt = fusedopt_torch.Adam(fparams, lr=1e-3)
    rows.append(row("adam", "fusedopt-torch", n, "small-model", None,
                    _per_step_ms(ctx, fopt.step, steps, warmup, sync=sync), nbytes))
    return rows


def _per_step_ms(ctx, step, steps, warmup, sync=None):
    sync = sync or ctx.sync
    for _ in range(warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t0) * 1e3 / steps


# ---------------------------------------------------------------------- output
def make_record(ctx, rows, tests=None):
    copy = [r["gbps"] for r in rows if r["impl"] in CEILINGS and r["gbps"]]
    return {
        "device": ctx.name,
        "date": datetime.date.today().isoformat(),
        "versions": versions(ctx),
        "copy_gbps": max(copy) if copy else None,
        "tests": tests,
        "rows": rows,
    }


def _load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def cpu_machine(ctx, load_before, load_after):
    """What a CPU record's figures depend on besides the code: the threads the host
    executor and the copy ceiling used, the compiler that built the host library, and
    the machine's load average (1, 5, 15 min) before and after the run, since other
    processes share the cores."""
    try:
        compiler = host.find_compiler()[1]
    except host.HostBuildError as e:
        compiler = f"none: {e}"
    return {"threads": ctx.threads, "compiler": compiler,
            "load_average_before": load_before, "load_average_after": load_after}


def versions(ctx):
    from . import __version__

    out = {"fusedopt": __version__, "kernels": _kernels.sources_digest(),
           "python": platform.python_version(), "numpy": np.__version__}
    for name in ("cupy", "torch", "jax", "optax"):
        module = sys.modules.get(name)
        if module is not None:
            out[name] = getattr(module, "__version__", "?")
    if ctx.device == "gpu":
        rt = ctx.cp.cuda.runtime
        out["cuda_runtime"] = rt.runtimeGetVersion()
        out["cuda_driver"] = rt.driverGetVersion()
    return out


def load_tests(path):
    """Test counts to embed in the record, from pytest's --junitxml file or a JSON
    {passed, failed, skipped}."""
    if path is None:
        return None
    if str(path).endswith(".xml"):
        import xml.etree.ElementTree as ET

        root = ET.parse(path).getroot()
        suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
        total = {k: sum(int(s.get(k, 0)) for s in suites)
                 for k in ("tests", "failures", "errors", "skipped")}
        failed = total["failures"] + total["errors"]
        return {"passed": total["tests"] - failed - total["skipped"], "failed": failed,
                "skipped": total["skipped"]}
    with open(path) as f:
        counts = json.load(f)
    return {k: int(counts.get(k, 0)) for k in ("passed", "failed", "skipped")}


def slug(text):
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def write_record(record, out_dir):
    """Write the record as <date>-<device>.{json,md,png} in `out_dir`. A second run on
    the same day and device gets -2, -3, ...: a benchmark run is expensive and its
    record must never be lost to the next one (refusing instead would lose the run
    that just finished, or need an --overwrite that is easy to pass by habit)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = claim_stem(out_dir, f"{record['date']}-{slug(record['device'])}")
    paths = [stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")]
    paths[0].write_text(json.dumps(record, indent=1) + "\n")
    paths[1].write_text(markdown_table(record) + "\n")
    png = plot(record, stem.with_name(stem.name + ".png"))
    return paths + ([png] if png else [])


RECORD_SUFFIXES = (".json", ".md", ".png")


def claim_stem(out_dir, base):
    """The first of base, base-2, base-3, ... that no record uses. Its .json is
    created exclusively, so two runs finishing at once cannot pick the same one."""
    for k in itertools.count(1):
        stem = out_dir / (base if k == 1 else f"{base}-{k}")
        if any(stem.with_name(stem.name + s).exists() for s in RECORD_SUFFIXES[1:]):
            continue
        try:
            with open(stem.with_name(stem.name + ".json"), "x"):
                return stem
        except FileExistsError:
            continue


def markdown_table(record):
    """The measured rows as a table; peers that could not run are listed once
    below it, not once per size (they would bury the results)."""
    copy = record["copy_gbps"]
    machine = record.get("machine")
    lines = [f"## {record['device']} — {record['date']}", "",
             (f"Ceiling: {copy:.0f} GB/s (bytes read + written; on the CPU the faster of a "
              "copy and an in-place scale, on every core)." if copy else ""),
             (f"Host executor: {machine['threads']} threads, built by {machine['compiler']}; "
              f"load average {machine['load_average_before']} before the run, "
              f"{machine['load_average_after']} after." if machine else ""),
             "", "| optimizer | impl | layout | clip | n | median ms | GB/s | of copy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        if r["median_ms"] is None:
            continue
        share = f"{r['gbps'] / copy:.0%}" if copy and r["gbps"] else ""
        impl = r["impl"] if r.get("dtype", "float32") == "float32" else \
            f"{r['impl']} [{r['dtype']}]"
        lines.append(f"| {r['optimizer'] or ''} | {impl} | {r['layout']} | {r['clip'] or ''} "
                     f"| {r['n']} | {r['median_ms']:.4f} | {r['gbps']:.1f} | {share} |")
    missing = missing_peers(record["rows"])
    if missing:
        lines += ["", "Not measured:"]
        lines += [f"- {', '.join(impls)}: {why}" for why, impls in missing.items()]
    targets = target_table(record)
    return "\n".join(lines + ([""] + targets if targets else []))


# (what, fusedopt's point, the other point, the least speedup other/fusedopt); a point
# is (optimizer, impl, layout, clip); n is the same for both unless the layout fixes it.
TARGETS = (
    [(f"{name} vs torch fused", (name, "fusedopt", "flat", None),
      (name, "torch-fused", "flat", None), 1.0) for name in TORCH_PEERS]
    + [("adam + global clip vs torch clip_grad_norm_ + fused",
        ("adam", "fusedopt", "flat", "global"), ("adam", "torch-clip+fused", "flat", "global"),
        1.25),
       ("adam vs optax", ("adam", "fusedopt", "flat", None), ("adam", "optax", "flat", None), 1.0),
       ("torch model: fusedopt.torch AdamW vs torch AdamW fused",
        ("adamw", "fusedopt-torch", "torch-model", None),
        ("adamw", "torch-fused", "torch-model", None), 1.0),
       ("adam + global clip vs optax + clip_by_global_norm",
        ("adam", "fusedopt", "flat", "global"), ("adam", "optax-clip", "flat", "global"), 1.0),
       ("adam 200 tensors vs flat (within 10%)", ("adam", "fusedopt", "200-tensors", None),
        ("adam", "fusedopt", "flat", None), 1 / 1.1)]
    + [(f"{layout} clipnorm vs unclipped (within 1.3x)", ("adam", "fusedopt", layout, "segment"),
        ("adam", "fusedopt", layout, None), 1 / 1.3) for layout in SEGMENT_LAYOUTS]
    # Mixed precision: a point's fifth item is its dtype (PRECISIONS label).
    + [("adam bf16 state vs float32 state (float32 params)",
        ("adam", "fusedopt", "flat", None, "f32-bf16state"),
        ("adam", "fusedopt", "flat", None, "float32"), 1.3),
       ("adam all bf16 vs torch fused bf16", ("adam", "fusedopt", "flat", None, "bf16-state"),
        ("adam", "torch-fused", "flat", None, "bf16-state"), 1.0),
       ("sgd all bf16 vs torch fused bf16", ("sgd", "fusedopt", "flat", None, "bf16-state"),
        ("sgd", "torch-fused", "flat", None, "bf16-state"), 1.0)]
)


def target_table(record):
    """The speedups the issues set as targets, where both points were measured, and the
    fraction of the copy ceiling fusedopt reached at that size."""
    rows = {(r["optimizer"], r["impl"], r["layout"], r["clip"], r.get("dtype", "float32"),
             r["n"]): r for r in record["rows"] if r["median_ms"]}
    copy = {}
    for r in record["rows"]:
        if r["impl"] in CEILINGS and r["gbps"]:
            copy[r["n"]] = max(copy.get(r["n"], 0.0), r["gbps"])
    checks = [(what, _point(mine), _point(other), least)
              for what, mine, other, least in TARGETS] + [
        (f"{name} vs the NumPy reference", (name, "fusedopt", bench_layout(name), None, "float32"),
         (name, "fusedopt-numpy", bench_layout(name), None, "float32"), 3.0)
        for name in sorted({k[0] for k in rows if k[1] == "fusedopt-numpy"})]
    lines = []
    for what, mine, other, least in checks:
        for n in sorted({k[5] for k in rows if k[:5] == mine}):
            a, b = rows.get(mine + (n,)), rows.get(other + (n,))
            if a is None or b is None:
                continue
            ratio = b["median_ms"] / a["median_ms"]
            ceiling = f"{a['gbps'] / copy[n]:.0%}" if n in copy else ""
            lines.append(f"| {what} | {n} | {a['median_ms']:.3f} | {b['median_ms']:.3f} "
                         f"| {ratio:.2f}x | {least:.2f}x | {'yes' if ratio >= least else 'NO'} "
                         f"| {ceiling} |")
    if not lines:
        return []
    return ["### Targets", "",
            "| target | n | fusedopt ms | other ms | speedup | target | met | fusedopt of copy |",
            "|---|---|---|---|---|---|---|---|"] + lines


def _point(point):
    """A target's point with its dtype: float32 unless it names one."""
    return point if len(point) == 5 else point + ("float32",)


def missing_peers(rows):
    """{reason: [impl, ...]} for the rows that were not measured, each impl once."""
    out = {}
    for r in rows:
        if r["median_ms"] is None:
            why = r.get("note", "").removeprefix("missing: ") or "not measured"
            impls = out.setdefault(why, [])
            if r["impl"] not in impls:
                impls.append(r["impl"])
    return out


def plot(record, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in record["rows"] if r["gbps"] and r["layout"] != "small-model"]
    fig, (ax_adam, ax_all) = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    ceiling = {}
    for r in rows:
        if r["impl"] in CEILINGS:
            ceiling[r["n"]] = max(ceiling.get(r["n"], 0.0), r["gbps"])
    copy = sorted(ceiling.items())
    for ax in (ax_adam, ax_all):
        if copy:
            ax.plot(*zip(*copy), "k--", lw=2, label="copy ceiling")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("elements (float32)")
        ax.grid(True, which="both", alpha=0.3)
    adam = [r for r in rows if r["optimizer"] == "adam" and r["impl"] != "copy"]
    for key in sorted({(r["impl"], r["layout"], r["clip"] or "") for r in adam}):
        impl, layout, clip = key
        pts = sorted((r["n"], r["gbps"]) for r in adam
                     if (r["impl"], r["layout"], r["clip"] or "") == key)
        style = "-o" if layout == "flat" else ":s"
        label = f"{impl}{' + global clip' if clip and 'clip' not in impl else ''} ({layout})"
        ax_adam.plot(*zip(*pts), style, label=label, ms=4)
    for name in sorted({r["optimizer"] for r in rows if r["impl"] == "fusedopt"}):
        pts = sorted((r["n"], r["gbps"]) for r in rows if r["impl"] == "fusedopt"
                     and r["optimizer"] == name and r["layout"] == bench_layout(name)
                     and r["clip"] is None and r.get("dtype", "float32") == "float32")
        ax_all.plot(*zip(*pts), "-o", label=name, ms=4)
    ax_adam.set_title("Adam step: fusedopt and peers")
    ax_all.set_title("fusedopt: every optimizer (flat buffer; matrices for Adafactor, Muon)")
    ax_adam.set_ylabel("achieved GB/s (bytes a fused step must move)")
    ax_adam.legend(fontsize=7)
    ax_all.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{record['device']} — {record['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"
