"""Everything about the GPU path that needs no GPU: kernel sources, compile options,
argument structs and the tile table. fusedopt.cuda launches what this module builds;
the CI compile check and the host build of the rules use the same sources.
"""

import hashlib
import math
import re
from importlib import resources
from pathlib import Path

import numpy as np

BLOCK = 256            # threads per block: FO_BLOCK / FO_REDUCE_BLOCK in the kernels
MAX_SCALARS = 10       # FO_MAX_SCALARS in common.cuh
BLOCKS_PER_SM = 8      # 8 x 256 threads fill an SM (2048 resident threads)
MIN_TILE = 2048        # elements; tiles are powers of two between these bounds,
MAX_TILE = 16384       # small enough to give every SM work, large enough to amortise
NVRTC_OPTIONS = (
    "--std=c++17",
    # No fused multiply-add contraction: the GPU then rounds like the NumPy reference
    # (e.g. RMSprop's v - a*a in a cancellation); the step is memory bound anyway.
    "--fmad=false",
)
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)
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


def rule_source(rule, dtype):
    """The translation unit exporting `fusedopt_<rule>` for one dtype."""
    prelude = (
        f"#define FUSEDOPT_RULE {rule}\n"
        f"#define FUSEDOPT_T {CTYPES[np.dtype(dtype)]}\n"
        f'#include "{rule}.cuh"\n'
        '#include "fused.cu"\n'
    )
    return expand_includes(prelude)


def reduce_source(dtype):
    """The translation unit exporting the reduction kernels for one dtype."""
    return expand_includes(f'#define FUSEDOPT_T {CTYPES[np.dtype(dtype)]}\n#include "reduce.cu"\n')


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


def translation_units():
    """(label, source, kernel names) for every kernel module the library compiles."""
    units = []
    for dtype in CTYPES:
        for rule in rule_names():
            units.append((f"{rule}/{dtype.name}", rule_source(rule, dtype), [f"fusedopt_{rule}"]))
        units.append((f"reduce/{dtype.name}", reduce_source(dtype),
                      ["fusedopt_sumsq", "fusedopt_clip_factors", "fusedopt_skip_check"]))
    return units


def sources_digest():
    """A hash of every kernel source file (for records and cache keys)."""
    h = hashlib.sha256()
    for entry in sorted(kernel_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".cu", ".cuh")):
            h.update(entry.name.encode() + entry.read_bytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------- argument structs
def prologue_dtype(dtype):
    """numpy mirror of Prologue<T> in common.cuh, passed to the kernel by value."""
    return np.dtype([("unscale", dtype), ("clipvalue", dtype), ("weight_decay", dtype)])


def step_scalars_dtype(dtype):
    """numpy mirror of StepScalars<T> in common.cuh."""
    return np.dtype([("lr", dtype), ("c", dtype, (MAX_SCALARS,))])


def pack_prologue(dtype, loss_scale_factor, clipvalue, weight_decay):
    out = np.zeros(1, prologue_dtype(dtype))
    out["unscale"] = 1.0 / loss_scale_factor if loss_scale_factor else 1.0
    out["clipvalue"] = clipvalue or 0.0
    out["weight_decay"] = -1.0 if weight_decay is None else weight_decay
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

    def grid(self, sm_count):
        """Blocks to launch: one per tile, at most what fills every SM."""
        return max(1, min(self.count, sm_count * BLOCKS_PER_SM))


def tile_length(n, sm_count):
    per_block = math.ceil(n / max(1, sm_count * BLOCKS_PER_SM))
    return int(min(MAX_TILE, max(MIN_TILE, 1 << max(0, per_block - 1).bit_length())))
