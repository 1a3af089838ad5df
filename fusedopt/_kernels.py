"""Everything about the GPU path that needs no GPU: kernel sources, compile options,
argument structs and the tile table. fusedopt.cuda launches what this module builds;
the CI compile check and the host build of the rules use the same sources.
"""

import hashlib
import math
import os
import re
import tempfile
from importlib import resources
from pathlib import Path

import numpy as np

TILES_PER_SM = 8       # load balance: at least this many tiles per SM when n allows
MIN_TILE = 2048        # elements; tiles are powers of two between these bounds,
MAX_TILE = 16384       # small enough to give every SM work, large enough to amortise
# The flags every kernel is built with, in production and in the CI compile check
# (both go through compile_cubin below). Each one keeps the GPU rounding like the
# NumPy reference; the step is memory bound, so none of them costs time that matters.
NVRTC_OPTIONS = (
    "--std=c++17",
    # No fused multiply-add contraction (e.g. RMSprop's v - a*a cancels).
    "--fmad=false",
    # Keep subnormals: v of a rarely-updated embedding row lives there. This is why
    # the kernels are not compiled by CuPy, which appends -ftz=true to every build.
    "--ftz=false",
    # IEEE division and square root (NVRTC's defaults, stated so nobody drops them).
    "--prec-div=true",
    "--prec-sqrt=true",
)
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
# Storage types (kernels/storage.cuh) by dtype name.
STORAGE_CTYPES = {"float64": "double", "float32": "float", "bfloat16": "fo_bf16",
                  "float16": "fo_f16"}

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)
_DEFINE = re.compile(r"^\s*#\s*define\s+(FO_\w+)\s+(\d+)\s*(?://.*)?$", re.M)
_PRAGMA_ONCE = re.compile(r"^\s*#\s*pragma\s+once\s*$", re.M)


def kernel_dir():
    """The directory holding the .cuh/.cu sources: fusedopt/kernels when installed,
    else kernels/ beside the package (running from a source checkout)."""
    try:
        return resources.files("fusedopt.kernels")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "kernels"


def read_source(name):
    return (kernel_dir() / name).read_text(encoding="utf-8")


def expand_includes(text, seen=None):
    """Inline local #include "x" directives, each file once, so a translation unit is a
    single string: what NVRTC compiles is exactly what CuPy's cache is keyed on."""
    seen = set() if seen is None else seen

    def inline(match):
        name = match.group(1)
        if name in seen:
            return ""
        seen.add(name)
        # Each file is inlined once, so its include guard is redundant (and nvcc
        # warns about "#pragma once in main file").
        body = _PRAGMA_ONCE.sub("", read_source(name))
        return f"// ---- {name}\n" + expand_includes(body, seen)

    return _INCLUDE.sub(inline, text)


def header_constants():
    """The integer #defines (FO_*) of the headers every kernel includes: the one source
    of truth for the block size, the structs' array bounds and the schedule kinds."""
    return {m.group(1): int(m.group(2))
            for name in ("common.cuh", "step.cuh") for m in _DEFINE.finditer(read_source(name))}


CONSTANTS = header_constants()
BLOCK = CONSTANTS["FO_BLOCK"]              # threads per block of every kernel
MAX_SCALARS = CONSTANTS["FO_MAX_SCALARS"]  # StepScalars.c / StepValues.c
MAX_HYPER = CONSTANTS["FO_MAX_HYPER"]      # Hyper.rule
MAX_PIECES = CONSTANTS["FO_MAX_PIECES"]    # LearningRate.values


def storage_key(param, grad=None, state=None):
    """(param, grad, state) dtype names of one kernel build; grad and state default to
    the param dtype. Which combinations the optimizers accept is fusedopt.precision's
    business; this only names storage types the kernels can be built for."""
    names = []
    for argument, value in (("param", param), ("grad", grad), ("state", state)):
        value = param if value is None else value
        name = value if isinstance(value, str) else np.dtype(value).name
        if name not in STORAGE_CTYPES:
            raise ValueError(f"no kernel storage type for {argument} dtype {name!r}")
        names.append(name)
    if "float64" in names and set(names) != {"float64"}:
        raise ValueError(f"float64 buffers compute in float64 and mix with nothing: {names}")
    return tuple(names)


def as_storage(storage):
    """A storage key from a key or a single dtype (standing for all three)."""
    if isinstance(storage, tuple):
        return storage_key(*storage)
    from .precision import resolve_dtype

    return storage_key(resolve_dtype(storage, "storage"))


def key_label(key):
    """A storage key's short name: the dtype when all three agree, else p:g:s."""
    return key[0] if len(set(key)) == 1 else ":".join(key)


def storage_prelude(key):
    """The #defines of a storage key: the math type and the three storage types."""
    math = "double" if key[0] == "float64" else "float"
    return (f"#define FUSEDOPT_T {math}\n"
            f"#define FUSEDOPT_P {STORAGE_CTYPES[key[0]]}\n"
            f"#define FUSEDOPT_G {STORAGE_CTYPES[key[1]]}\n"
            f"#define FUSEDOPT_S {STORAGE_CTYPES[key[2]]}\n")


def own_kernels(rule):
    """Whether `rule` reads whole variables and has kernels of its own, kernels/<rule>.cu
    (several launches a step: LAMB's trust ratio needs per-variable sums between two
    passes), rather than the one fused pass of fused.cu."""
    return (kernel_dir() / f"{rule}.cu").is_file()


# The storage keys a rule with kernels of its own is built for when its kernels take
# one type (FUSEDOPT_T): uniform float32 and float64 (fusedopt.optimizer sends every
# other combination to the NumPy executor).
OWN_KERNEL_KEYS = (("float64",) * 3, ("float32",) * 3)


def own_kernel_keys(rule):
    """The storage keys the kernels of `rule` (a rule with kernels of its own) are built
    for: every accepted combination (COMBINATIONS) when its kernels/<rule>.cu takes the
    storage types FUSEDOPT_P, FUSEDOPT_G and FUSEDOPT_S (lamb.cu), else OWN_KERNEL_KEYS.
    Read from the source, as rule_names does, so no second table names the rules."""
    source = read_source(f"{rule}.cu")
    if all(f"FUSEDOPT_{x}" in source for x in "PGS"):
        return COMBINATIONS
    return OWN_KERNEL_KEYS


def rule_source(rule, dtype, grad=None, state=None):
    """The translation unit exporting `fusedopt_<rule>` for one storage combination:
    params of `dtype`, grads of `grad` and state of `state` (both default to `dtype`),
    or, for a rule with kernels of its own (the keys of `own_kernel_keys`), the
    kernels of kernels/<rule>.cu (`rule_kernels`)."""
    key = storage_key(dtype, grad, state)
    if own_kernels(rule):
        if key not in own_kernel_keys(rule):
            raise ValueError(f"{rule} has kernels for the storage keys "
                             f"{[key_label(k) for k in own_kernel_keys(rule)]}, "
                             f"not {key_label(key)}")
        return expand_includes(storage_prelude(key)
                               + f'#include "{rule}.cuh"\n#include "{rule}.cu"\n')
    prelude = (
        f"#define FUSEDOPT_RULE {rule}\n"
        + storage_prelude(key)
        + f'#include "{rule}.cuh"\n'
        '#include "fused.cu"\n'
    )
    return expand_includes(prelude)


_GLOBAL = re.compile(r'^extern "C" __global__ void __launch_bounds__\(\w+\)\s+(\w+)\(', re.M)


def rule_kernels(rule):
    """The kernels of `rule`'s translation unit: fusedopt_<rule>, or those its own
    kernels/<rule>.cu defines, in source order."""
    if own_kernels(rule):
        return _GLOBAL.findall(read_source(f"{rule}.cu"))
    return [f"fusedopt_{rule}"]


def reduce_source(dtype, state=None):
    """The translation unit exporting the reduction kernels for grads of `dtype` and
    state of `state` (default `dtype`): fusedopt_sumsq reads gradient accumulation's
    slot, stored in the state dtype."""
    key = storage_key(dtype, dtype, state)
    return expand_includes(storage_prelude(key) + '#include "reduce.cu"\n')


def reduce_key(storage):
    """The (grad, state) pair a storage key's reductions are built for."""
    return storage[1], storage[2]


_RULE_STRUCT = r"^\s*struct\s+{}\s*\{{"


def rule_names():
    """Every rule in kernels/: a <rule>.cuh that defines `struct <rule>` (principle 5:
    the name is the file, the struct and the kernel). Read from the sources, not from
    the optimizer classes, so kernel assembly never imports the layers above it."""
    names = []
    for entry in kernel_dir().iterdir():
        stem = entry.name[:-len(".cuh")]
        if entry.name.endswith(".cuh") and re.search(
                _RULE_STRUCT.format(re.escape(stem)), entry.read_text(encoding="utf-8"), re.M):
            names.append(stem)
    return sorted(names)


# Every storage combination the optimizers accept (fusedopt.precision: GRAD_DTYPES and
# STATE_DTYPES), as (param, grad, state). Master weights and stochastic rounding are
# run-time switches of the same kernel.
COMBINATIONS = (
    ("float64", "float64", "float64"),
    ("float32", "float32", "float32"), ("float32", "bfloat16", "float32"),
    ("float32", "float16", "float32"), ("float32", "float32", "bfloat16"),
    ("float32", "bfloat16", "bfloat16"), ("float32", "float16", "bfloat16"),
    ("bfloat16", "bfloat16", "float32"), ("bfloat16", "float32", "float32"),
    ("bfloat16", "bfloat16", "bfloat16"), ("bfloat16", "float32", "bfloat16"),
    ("float16", "float16", "float32"), ("float16", "float32", "float32"),
    ("float16", "float16", "bfloat16"), ("float16", "float32", "bfloat16"),
)
# The rule built for every combination in the compile check (the others: float64,
# float32 and one bfloat16 combination, which all share the same load/store code).
CROSS_PRODUCT_RULE = "adam"
# The keys a rule with kernels of its own for every combination is compiled for in the
# check besides those: each 16-bit storage type in each role at least once.
OWN_KERNEL_CHECK_KEYS = (("float16", "float32", "bfloat16"),
                         ("float32", "float16", "bfloat16"))


def translation_units(full=False):
    """(label, source, kernel names) for the kernel modules the library compiles: every
    rule for float64, float32 and bfloat16 params, grads with float32 state; every
    combination for CROSS_PRODUCT_RULE (every rule with `full`); a rule with kernels of
    its own, with its `rule_kernels`, for its `own_kernel_keys` (those that take every
    combination: for the same three and OWN_KERNEL_CHECK_KEYS, all with `full`); the
    reductions for each accepted pair of gradient and state dtypes."""
    units = []
    reduction = ["fusedopt_sumsq", "fusedopt_clip_factors", "fusedopt_skip_check",
                 "fusedopt_write_hyper", "fusedopt_write_state"]
    for key in COMBINATIONS:
        everywhere = key in (("float64",) * 3, ("float32",) * 3,
                             ("bfloat16", "bfloat16", "float32"))
        for rule in rule_names():
            if own_kernels(rule):
                keys = own_kernel_keys(rule)
                if key in keys and (full or keys is OWN_KERNEL_KEYS or everywhere
                                    or key in OWN_KERNEL_CHECK_KEYS):
                    units.append((f"{rule}/{key_label(key)}", rule_source(rule, *key),
                                  rule_kernels(rule)))
                continue
            if full or everywhere or rule == CROSS_PRODUCT_RULE:
                units.append((f"{rule}/{key_label(key)}", rule_source(rule, *key),
                              [f"fusedopt_{rule}"]))
    for grad, state in sorted({reduce_key(key) for key in COMBINATIONS}):
        label = grad if grad == state else f"{grad}:{state}"
        units.append((f"reduce/{label}", reduce_source(grad, state), reduction))
    return units


def sources_digest():
    """A hash of every kernel source file (for records and cache keys)."""
    h = hashlib.sha256()
    for entry in sorted(kernel_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".cu", ".cuh", ".cpp")):
            h.update(entry.name.encode() + entry.read_bytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ compilation
class CompileError(RuntimeError):
    """NVRTC refused a kernel source; the message holds its log."""


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise RuntimeError(
            "compiling fusedopt's kernels needs NVRTC from NVIDIA's cuda-bindings: "
            "pip install 'fusedopt[cuda12]' or 'fusedopt[cuda13]'") from e
    return nvrtc


def _check(nvrtc, result, what):
    err = result[0] if isinstance(result, tuple) else result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise CompileError(f"NVRTC {what} failed: {err}")
    return result[1] if isinstance(result, tuple) and len(result) > 1 else None


def _nvrtc_output(nvrtc, program, get_size, get):
    """The bytes NVRTC reports, exactly: a cubin is an ELF image whose last bytes may
    be zeros, so only text outputs (the log, the PTX) are stripped of their NUL.

    NVRTC writes into the buffer, so it must be a bytearray: an immutable bytes
    object of one byte (an empty log) is CPython's shared b" ", and writing its NUL
    there turned every later b" " * k in the process into zeros (checkpoint headers
    came out padded with NUL)."""
    size = _check(nvrtc, get_size(program), get.__name__)
    buffer = bytearray(size)
    _check(nvrtc, get(program, buffer), get.__name__)
    return bytes(buffer)


def compile_cubin(source, arch, name="fusedopt.cu"):
    """Compile one translation unit with NVRTC and NVRTC_OPTIONS for `arch` ("sm_90").

    Returns (cubin bytes, PTX text, compiler log). This is the only way fusedopt
    compiles a kernel: CupyBackend loads the cubin, the CI check inspects the PTX.
    """
    nvrtc = _nvrtc()
    program = _check(nvrtc, nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []),
                     "nvrtcCreateProgram")
    try:
        options = [o.encode() for o in NVRTC_OPTIONS] + [f"--gpu-architecture={arch}".encode()]
        (result,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
        log = _nvrtc_output(nvrtc, program, nvrtc.nvrtcGetProgramLogSize,
                            nvrtc.nvrtcGetProgramLog).rstrip(b"\x00").decode(errors="replace").strip()
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise CompileError(f"{name} does not compile for {arch}:\n{log}")
        cubin = _nvrtc_output(nvrtc, program, nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN)
        ptx = _nvrtc_output(nvrtc, program, nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX)
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    return cubin, ptx.rstrip(b"\x00").decode(errors="replace"), log


def nvrtc_version():
    """(major, minor) of the NVRTC library in use."""
    nvrtc = _nvrtc()
    err, major, minor = nvrtc.nvrtcVersion()
    _check(nvrtc, err, "nvrtcVersion")
    return major, minor


def cache_dir():
    """Where compiled kernels are kept between processes: $FUSEDOPT_CACHE_DIR, else
    $XDG_CACHE_HOME/fusedopt, else ~/.cache/fusedopt."""
    explicit = os.environ.get("FUSEDOPT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fusedopt"


def cached_cubin(source, arch, name="fusedopt.cu"):
    """The path of the cubin for `source` on `arch`, compiled once per machine.

    Keyed on the source, the options, the architecture and the NVRTC version, so a
    changed kernel or compiler never loads a stale binary. Written atomically:
    concurrent processes may both compile, never read half a file.
    """
    key = hashlib.sha256("\0".join(
        [source, *NVRTC_OPTIONS, arch, repr(nvrtc_version())]).encode()).hexdigest()[:32]
    path = cache_dir() / "cubin" / f"{key}.cubin"
    if not path.is_file():
        cubin, _, _ = compile_cubin(source, arch, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(cubin)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    return path


# --------------------------------------------------------------- argument structs
# numpy mirrors of the structs in kernels/common.cuh and kernels/step.cuh (field for
# field; tests/test_host_rules.py checks sizes and offsets against the C++ compiler's).
LEARNING_RATE = np.dtype([
    ("kind", np.int64), ("flag", np.int64), ("pieces", np.int64), ("initial", np.float64),
    ("arg", np.float64, (4,)), ("decay", np.float64),
    ("boundaries", np.float64, (MAX_PIECES - 1,)), ("values", np.float64, (MAX_PIECES,)),
])
HYPER = np.dtype([
    ("unscale", np.float64), ("clipvalue", np.float64), ("weight_decay", np.float64),
    ("coupled_weight_decay", np.float64), ("clipnorm", np.float64), ("rule", np.float64, (MAX_HYPER,)), ("lr", LEARNING_RATE),
    ("stochastic_rounding", np.int64), ("seed", np.uint64),
    ("accumulation", np.int64), ("use_ema", np.int64), ("ema_momentum", np.float64),
    ("ema_overwrite_frequency", np.int64), ("dynamic_growth_steps", np.int64),
])
STEP_STATE = np.dtype([
    ("iterations", np.int64), ("skipped_steps", np.int64), ("last_step_skipped", np.int64),
    ("skip", np.int64), ("blocks_done", np.uint64), ("product", np.float64),
    ("loss_scale", np.float64), ("scale_counter", np.int64),
])
STEP_VALUES = np.dtype([
    ("lr", np.float64), ("c", np.float64, (MAX_SCALARS,)), ("product", np.float64),
])

# Keras' schedule names -> the LearningRate kind, the config key of its flag and the
# config keys of arg[] (kernels/step.cuh). Names are the registry: this module never
# imports fusedopt.schedules.
_SCHEDULES = {
    "ExponentialDecay": ("FO_LR_EXPONENTIAL", "staircase", ("decay_steps", "decay_rate")),
    "InverseTimeDecay": ("FO_LR_INVERSE_TIME", "staircase", ("decay_steps", "decay_rate")),
    "PolynomialDecay": ("FO_LR_POLYNOMIAL", "cycle",
                        ("decay_steps", "end_learning_rate", "power")),
    "CosineDecay": ("FO_LR_COSINE", "warmup_target",
                    ("decay_steps", "alpha", "warmup_target", "warmup_steps")),
    "CosineDecayRestarts": ("FO_LR_COSINE_RESTARTS", None,
                            ("first_decay_steps", "t_mul", "m_mul", "alpha")),
    "PiecewiseConstantDecay": ("FO_LR_PIECEWISE", None, ()),
}


def pack_learning_rate(spec, decay=0.0):
    """The LearningRate record for `spec`: a number (the rate), or (schedule class name,
    its get_config()). None when the block cannot hold it (an unknown schedule, or more
    than MAX_PIECES piecewise values): the host must then evaluate the rate each step."""
    out = np.zeros((), LEARNING_RATE)
    out["decay"] = decay
    if not isinstance(spec, tuple):
        out["kind"], out["initial"] = CONSTANTS["FO_LR_CONSTANT"], spec
        return out
    name, config = spec
    if name not in _SCHEDULES:
        return None
    kind, flag, args = _SCHEDULES[name]
    out["kind"] = CONSTANTS[kind]
    if name == "PiecewiseConstantDecay":
        values = config["values"]
        if len(values) > MAX_PIECES:
            return None
        out["pieces"] = len(values)
        out["boundaries"][: len(values) - 1] = config["boundaries"]
        out["values"][: len(values)] = values
        return out
    out["initial"] = config["initial_learning_rate"]
    out["flag"] = flag is not None and config[flag] not in (None, False)
    out["arg"][: len(args)] = [config[a] or 0.0 for a in args]
    return out


def pack_hyper(learning_rate, rule, loss_scale_factor=None, clipvalue=None,
               weight_decay=None, clipnorm=None, coupled_weight_decay=None,
               stochastic_rounding=False, seed=0, gradient_accumulation_steps=None,
               use_ema=False, ema_momentum=0.99, ema_overwrite_frequency=None,
               dynamic_growth_steps=None):
    """The Hyper block: `learning_rate` from pack_learning_rate, `rule` the rule's
    hyperparameters (its class's _hyperparameters, in order), the pipeline's options
    with their Keras spellings (None: off); dynamic_growth_steps: a LossScaleOptimizer's
    (the scale itself is step state)."""
    if len(rule) > MAX_HYPER:
        raise ValueError(f"a rule may have at most {MAX_HYPER} hyperparameters, got {len(rule)}")
    out = np.zeros((), HYPER)
    out["unscale"] = 1.0 / loss_scale_factor if loss_scale_factor else 1.0
    out["clipvalue"] = clipvalue or 0.0
    out["weight_decay"] = -1.0 if weight_decay is None else weight_decay
    out["coupled_weight_decay"] = coupled_weight_decay or 0.0
    out["clipnorm"] = clipnorm or 0.0
    out["rule"][: len(rule)] = rule
    out["lr"] = learning_rate
    out["stochastic_rounding"] = int(bool(stochastic_rounding))
    out["seed"] = seed
    out["accumulation"] = gradient_accumulation_steps or 1
    out["use_ema"] = int(bool(use_ema))
    out["ema_momentum"] = ema_momentum
    out["ema_overwrite_frequency"] = ema_overwrite_frequency or 0
    out["dynamic_growth_steps"] = dynamic_growth_steps or 0
    return out


def optimizer_hyper(opt, host_learning_rate=0.0):
    """(Hyper block, host_evaluated) for a FusedOptimizer: what an executor writes when a
    hyperparameter changes. host_evaluated: the block cannot compute the rate (a
    callable, a schedule it does not know), so the executor writes
    `host_learning_rate` (the rate before Keras 2's decay, which the block applies)
    before each step."""
    spec = opt._learning_rate_spec()
    lr = None if spec is None else pack_learning_rate(spec, opt._decay)
    host_evaluated = lr is None
    if host_evaluated:
        lr = pack_learning_rate(float(host_learning_rate), opt._decay)
    hyper = pack_hyper(lr, opt._device_hyperparameters(), opt.loss_scale_factor,
                       opt.clipvalue, opt.weight_decay, opt.clipnorm or opt.global_clipnorm,
                       opt.coupled_weight_decay, opt.stochastic_rounding, opt.seed,
                       opt.gradient_accumulation_steps, opt.use_ema, opt.ema_momentum,
                       opt.ema_overwrite_frequency, opt._dynamic_growth_steps)
    unscale = opt._unscale()  # 1/loss_scale_factor, negated with maximize
    hyper["unscale"] = 1.0 if unscale is None else unscale
    return hyper, host_evaluated


def pack_step_state(iterations, skipped_steps=0, last_step_skipped=False, product=1.0,
                    loss_scale=(0.0, 0)):
    """`iterations`: the calls applied (Keras' `_iterations`); `loss_scale`: a
    LossScaleOptimizer's (dynamic scale, finite steps since it changed)."""
    out = np.zeros((), STEP_STATE)
    out["iterations"], out["skipped_steps"] = iterations, skipped_steps
    out["last_step_skipped"], out["product"] = int(last_step_skipped), product
    out["loss_scale"], out["scale_counter"] = loss_scale
    return out


# The host build's tests also run the element math with Python's own scalars.
def prologue_dtype(dtype):
    """numpy mirror of Prologue<T> in common.cuh."""
    return np.dtype([("unscale", dtype), ("clipvalue", dtype), ("weight_decay", dtype),
                     ("coupled_weight_decay", dtype)])


def step_scalars_dtype(dtype):
    """numpy mirror of StepScalars<T> in common.cuh."""
    return np.dtype([("lr", dtype), ("c", dtype, (MAX_SCALARS,))])


def pack_prologue(dtype, loss_scale_factor, clipvalue, weight_decay, coupled_weight_decay=None,
                  maximize=False):
    out = np.zeros(1, prologue_dtype(dtype))
    out["unscale"] = (-1.0 if maximize else 1.0) / (loss_scale_factor or 1.0)
    out["clipvalue"] = clipvalue or 0.0
    out["weight_decay"] = -1.0 if weight_decay is None else weight_decay
    out["coupled_weight_decay"] = coupled_weight_decay or 0.0
    return out


def pack_step_scalars(dtype, lr, scalars):
    if len(scalars) > MAX_SCALARS:
        raise ValueError(f"a rule may use at most {MAX_SCALARS} scalars, got {len(scalars)}")
    out = np.zeros(1, step_scalars_dtype(dtype))
    out["lr"] = lr
    out["c"][0, : len(scalars)] = scalars
    return out


# ------------------------------------------------------------------- tile table
class TileTable:
    """How a step's work is split: tile k covers elements [start[k], start[k+1]).

    With `per_segment` every tile lies inside one segment, `segment[k]` says which, and
    segment s owns tiles [segment_tiles[s], segment_tiles[s+1]) (none if empty). The
    tile length depends only on the buffer size and the SM count, so a given layout
    on a given GPU always sums in the same order: reductions are deterministic.
    """

    def __init__(self, offsets, per_segment, sm_count):
        n = offsets[-1]
        self.tile = tile_length(n, sm_count)
        bounds = offsets if per_segment else (0, n)
        starts, segments, segment_tiles = [], [], [0]
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            count = -(-(b - a) // self.tile)
            starts.append(np.arange(count, dtype=np.int64) * self.tile + a)
            segments.append(np.full(count, s, dtype=np.int32))
            segment_tiles.append(segment_tiles[-1] + count)
        self.start = np.concatenate(starts + [np.array([n], dtype=np.int64)])
        self.segment = np.concatenate(segments) if segments else np.zeros(0, np.int32)
        self.segment_tiles = np.array(segment_tiles, dtype=np.int64)
        self.count = len(self.start) - 1

    def grid(self, sm_count, blocks_per_sm):
        """Blocks to launch: one per tile, at most what is resident on every SM at once
        (`blocks_per_sm`: the kernel's occupancy), and never 0 (CUDA refuses it)."""
        return max(1, min(self.count, sm_count * blocks_per_sm))


def tile_length(n, sm_count):
    per_block = math.ceil(n / max(1, sm_count * TILES_PER_SM))
    return int(min(MAX_TILE, max(MIN_TILE, 1 << max(0, per_block - 1).bit_length())))
