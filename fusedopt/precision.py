"""Storage dtypes and rounding: which dtype combinations fusedopt accepts, and the NumPy
twins of kernels/storage.cuh's conversions, bit for bit.

Buffers may be stored as float64, float32, bfloat16 or float16; arithmetic is float32
for every type narrower than float64 (ARCHITECTURE.md, principle 8). A value is loaded
into the math type once (exactly) and stored back once, rounded to nearest even or,
for bfloat16, stochastically.

16-bit values travel here as their uint16 bit patterns, so none of this needs
ml_dtypes (NumPy's only carrier of bfloat16); `load` and the `store_*` functions take
typed arrays for the reference executor's convenience.

    p = precision.load(params)                 # float32 math copy of bfloat16 params
    ...                                        # the rule, in float32
    precision.store_stochastic(params, p, seed, step, start=offset)
"""

import dataclasses
import numbers

import numpy as np

# Widest first: the order in error messages.
DTYPES = ("float64", "float32", "bfloat16", "float16")

# What each param dtype accepts. Gradients may come from a lower-precision backward pass
# (autocast: bfloat16 or float16 grads for float32 params) or, for 16-bit params, be
# accumulated in float32. float64 is the precise mode and takes nothing narrower.
GRAD_DTYPES = {
    "float64": ("float64",),
    "float32": ("float32", "bfloat16", "float16"),
    "bfloat16": ("bfloat16", "float32"),
    "float16": ("float16", "float32"),
}
# float16 state is refused: Adam's v holds g^2, which leaves float16's range (6e-8 to
# 65504) for ordinary gradients; bfloat16 has float32's range.
STATE_DTYPES = {
    "float64": ("float64",),
    "float32": ("float32", "bfloat16"),
    "bfloat16": ("float32", "bfloat16"),
    "float16": ("float32", "bfloat16"),
}
SIXTEEN_BIT = ("bfloat16", "float16")

# ------------------------------------------------------------------ dtype names


def resolve_dtype(dtype, argument="dtype"):
    """The canonical name ("float64", "float32", "bfloat16", "float16") of `dtype`: a
    name, a NumPy/CuPy/ml_dtypes dtype or scalar type. "bfloat16" needs no ml_dtypes."""
    if isinstance(dtype, str) and dtype.strip().lower() == "bfloat16":
        return "bfloat16"
    if dtype is None or isinstance(dtype, (bool, numbers.Number)):
        raise TypeError(f"`{argument}` must be a dtype or a dtype name, got {dtype!r}")
    try:
        name = np.dtype(dtype).name
    except TypeError as e:
        if isinstance(dtype, str):
            raise ValueError(f"`{argument}` must be one of {', '.join(DTYPES)}; "
                             f"got {dtype!r}") from e
        raise TypeError(f"`{argument}` must be a dtype or a dtype name, "
                        f"got {type(dtype).__name__}") from e
    if name not in DTYPES:
        raise ValueError(f"`{argument}` must be one of {', '.join(DTYPES)}; got {name}")
    return name


def numpy_dtype(dtype, argument="dtype"):
    """The NumPy dtype of `dtype`. bfloat16 is ml_dtypes' (imported only here)."""
    name = resolve_dtype(dtype, argument)
    if name != "bfloat16":
        return np.dtype(name)
    try:
        import ml_dtypes
    except ImportError as e:
        raise ImportError("bfloat16 arrays in NumPy need ml_dtypes: "
                          "pip install 'fusedopt[bf16]'") from e
    return np.dtype(ml_dtypes.bfloat16)


def math_dtype(dtype, argument="dtype"):
    """The arithmetic dtype for a storage dtype: float64 for float64, else float32."""
    return "float64" if resolve_dtype(dtype, argument) == "float64" else "float32"


def itemsize(dtype, argument="dtype"):
    return {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}[
        resolve_dtype(dtype, argument)]


# --------------------------------------------------------- accepted combinations


@dataclasses.dataclass(frozen=True)
class Precision:
    """A checked combination of storage dtypes (build one with `resolve_precision`).

    `master` is the dtype of the master-weights slot, or None without one; `math` the
    dtype every rule computes in.
    """

    param: str
    grad: str
    state: str
    master_weights: bool = False
    stochastic_rounding: bool = False

    @property
    def math(self):
        return math_dtype(self.param)

    @property
    def master(self):
        return "float32" if self.master_weights else None


def resolve_precision(param_dtype, grad_dtype=None, state_dtype=None, master_weights=False,
                      stochastic_rounding=False):
    """Check one combination and return it as a `Precision`; a TypeError or ValueError
    naming the argument otherwise. grad_dtype defaults to param_dtype, state_dtype to
    float32 (float64 for float64 params)."""
    param = resolve_dtype(param_dtype, "param_dtype")
    grad = param if grad_dtype is None else resolve_dtype(grad_dtype, "grad_dtype")
    state = (math_dtype(param) if state_dtype is None
             else resolve_dtype(state_dtype, "state_dtype"))
    for name, value in (("master_weights", master_weights),
                        ("stochastic_rounding", stochastic_rounding)):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"`{name}` must be True or False, got {value!r}")
    if grad not in GRAD_DTYPES[param]:
        raise ValueError(
            f"`grad_dtype` {grad} is not accepted with {param} params; accepted: "
            f"{', '.join(GRAD_DTYPES[param])} (grads may be narrower than float32 params, "
            "or float32 for 16-bit params; float64 params take float64 grads only)")
    if state not in STATE_DTYPES[param]:
        why = (" (float16 cannot hold second moments: g**2 leaves its range; use bfloat16)"
               if state == "float16" else "")
        raise ValueError(f"`state_dtype` {state} is not accepted with {param} params; "
                         f"accepted: {', '.join(STATE_DTYPES[param])}{why}")
    if master_weights and param not in SIXTEEN_BIT:
        raise ValueError(f"`master_weights=True` keeps a float32 copy of 16-bit params; "
                         f"{param} params need none")
    if stochastic_rounding:
        if param != "bfloat16":
            raise ValueError("`stochastic_rounding=True` is implemented for bfloat16 "
                             f"params only, not {param}")
        if master_weights:
            raise ValueError("`stochastic_rounding=True` rounds the param write when there "
                             "is no master copy; with `master_weights=True` the float32 "
                             "master keeps the precision: choose one")
    return Precision(param, grad, state, bool(master_weights), bool(stochastic_rounding))


def bytes_per_element(precision, slots):
    """Bytes a fused step moves per element: grads read; params read and written, or
    with master weights only written (the master, read and written, is the source);
    each of `slots` state buffers read and written. The performance model's numerator."""
    if not isinstance(precision, Precision):
        raise TypeError(f"`precision` must be a Precision, got {type(precision).__name__}")
    if isinstance(slots, bool) or not isinstance(slots, numbers.Integral):
        raise TypeError(f"`slots` must be an integer, got {type(slots).__name__}")
    if slots < 0:
        raise ValueError(f"`slots` must be non-negative, got {slots}")
    p = itemsize(precision.param)
    params = p + 2 * itemsize(precision.master) if precision.master_weights else 2 * p
    return params + itemsize(precision.grad) + 2 * itemsize(precision.state) * int(slots)


# -------------------------------------------------- twins of kernels/storage.cuh

_U16, _U32, _U64 = np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.uint64)
_GOLDEN = 0x9E3779B97F4A7C15  # FO_GOLDEN
_MASK64 = (1 << 64) - 1


def _bits16(bits, argument):
    bits = np.asarray(bits)
    if bits.dtype != _U16:
        raise TypeError(f"`{argument}` must hold uint16 bit patterns, got {bits.dtype}")
    return bits


def _float32(x, argument):
    """x as a float32 array; anything else is refused (no silent double rounding)."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise TypeError(f"`{argument}` must be float32 (the math type of 16-bit storage), "
                        f"got {x.dtype}")
    return x


def bf16_bits_to_float32(bits):
    """fo_bf16_to_float: exact; bfloat16 is the top half of a float32."""
    return (_bits16(bits, "bits").astype(_U32) << 16).view(np.float32)


def f16_bits_to_float32(bits):
    """fo_f16_to_float: exact; NaN payloads shifted up as NumPy's own cast does."""
    h = _bits16(bits, "bits").astype(_U32)
    sign = (h & 0x8000) << 16
    exponent, mantissa = (h >> 10) & 0x1F, h & 0x3FF
    special = sign | 0x7F800000 | (mantissa << 13)
    normal = sign | ((exponent + 112) << 23) | (mantissa << 13)
    small = sign | (mantissa.astype(np.float32) * np.float32(2.0 ** -24)).view(_U32)
    out = np.where(exponent == 0x1F, special, np.where(exponent == 0, small, normal))
    return out.astype(_U32).view(np.float32)


def round_to_bf16_nearest(x):
    """fo_float_to_bf16_rn: float32 -> bfloat16 bits, nearest even; NaN -> quiet NaN."""
    u = _float32(x, "x").view(_U32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16  # NaNs may wrap; replaced below
    quiet = ((u >> 16) & 0x8000) | 0x7FC0
    return np.where(nan, quiet, rounded).astype(_U16)


def _round_shift(value, shift):
    """fo_round_shift: value >> shift, the dropped bits rounded to nearest even."""
    kept = value >> shift
    dropped = value & ((np.uint32(1) << shift) - np.uint32(1))
    half = np.uint32(1) << (shift - np.uint32(1))
    up = (dropped > half) | ((dropped == half) & ((kept & 1) == 1))
    return kept + up.astype(_U32)


def round_to_f16_nearest(x):
    """fo_float_to_f16_rn: float32 -> float16 bits, nearest even, as NumPy's cast."""
    u = _float32(x, "x").view(_U32)
    sign, a = (u >> 16) & 0x8000, u & 0x7FFFFFFF
    payload = (a >> 13) & 0x3FF
    nan = sign | 0x7C00 | np.where(payload == 0, np.uint32(1), payload)
    normal = sign | _round_shift(a - np.uint32(0x38000000), np.uint32(13))  # wraps: unused
    exponent = (a >> 23).astype(np.int64)
    shift = np.clip(126 - exponent, 1, 31).astype(_U32)  # out-of-range ones are unused
    subnormal = sign | _round_shift((a & 0x7FFFFF) | 0x800000, shift)
    out = np.select([a > 0x7F800000, a >= 0x477FF000, a >= 0x38800000, a < 0x32800000],
                    [nan, sign | 0x7C00, normal, sign], subnormal)
    return out.astype(_U16)


def _uint64(value, argument):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{argument}` must be an integer, got {type(value).__name__}")
    if not 0 <= int(value) <= _MASK64:
        raise ValueError(f"`{argument}` must be in [0, 2**64), got {value}")
    return int(value)


def _indices(index, shape=None, argument="index"):
    """Non-negative integers as uint64, broadcast to `shape` if given."""
    index = np.asarray(index)
    if index.dtype.kind not in "iu":
        raise TypeError(f"`{argument}` must hold integers below 2**64, got {index.dtype}")
    if index.dtype.kind == "i" and index.size and index.min() < 0:
        raise ValueError(f"`{argument}` must be non-negative")
    if shape is not None:
        try:
            index = np.broadcast_to(index, shape)
        except ValueError as e:
            raise ValueError(f"`{argument}` of shape {index.shape} does not broadcast to "
                             f"`x`'s shape {shape}") from e
    return index.astype(_U64)


def _mix64(z):
    """fo_mix64 on uint64 arrays (NumPy's array arithmetic wraps modulo 2**64)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def random_word(seed, step, group):
    """fo_random_word: 64 random bits (uint64) per group of four elements (index // 4),
    for one seed and step."""
    seed, step = _uint64(seed, "seed"), _uint64(step, "step")
    group = _indices(group, argument="group")
    flat = group.reshape(-1)
    key = _mix64(np.array([(seed + _GOLDEN) & _MASK64], dtype=_U64))
    h = _mix64(key + flat * np.uint64(_GOLDEN))
    h = _mix64(h ^ np.uint64((step * _GOLDEN) & _MASK64))
    return h.reshape(group.shape)


def dither(seed, step, index):
    """fo_dither: the 16 random bits (as uint32) that round element `index`: its
    quarter of its group's word, the lowest for index % 4 == 0."""
    index = _indices(index)
    word = random_word(seed, step, index >> np.uint64(2))
    shift = np.uint64(16) * (index & np.uint64(3))
    return ((word >> shift) & np.uint64(0xFFFF)).astype(_U32)


def stochastic_round_to_bf16(x, seed, step, index):
    """fo_float_to_bf16_sr with fo_dither(seed, step, index): float32 -> bfloat16 bits,
    away from zero with probability (|x| - |lower neighbour|) / gap, so E[result] = x.
    inf and NaN as to nearest. `index` (the elements' flat positions) broadcasts to
    x's shape."""
    x = _float32(x, "x")
    bits = dither(seed, step, _indices(index, x.shape))
    u = x.view(_U32)
    finite = (u & 0x7FFFFFFF) < 0x7F800000
    dithered = (u + np.where(finite, bits, np.uint32(0))) >> 16
    return np.where(finite, dithered, round_to_bf16_nearest(x)).astype(_U16)


# ----------------------------------------------- typed arrays (reference executor)


def _storage_name(array, argument):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"`{argument}` must be a NumPy array, got {type(array).__name__}")
    if array.dtype.name not in DTYPES:
        raise TypeError(f"`{argument}` must be stored as one of {', '.join(DTYPES)}, "
                        f"got {array.dtype}")
    return array.dtype.name


def load(array):
    """A new array of the math type holding `array`'s values exactly (fo_load)."""
    name = _storage_name(array, "array")
    if name == "bfloat16":
        return bf16_bits_to_float32(array.view(_U16))
    if name == "float16":
        return f16_bits_to_float32(array.view(_U16))
    return array.copy()


def _check_store(dst, x):
    name = _storage_name(dst, "dst")
    x = np.asarray(x)
    if x.dtype.name != math_dtype(name):
        raise TypeError(f"`x` must be {math_dtype(name)} (the math type of {name}), "
                        f"got {x.dtype}")
    if x.shape != dst.shape:
        raise ValueError(f"`x` has shape {x.shape}, `dst` {dst.shape}")
    if not dst.flags.writeable:
        raise ValueError("`dst` is read-only")
    return name, x


def store_nearest(dst, x):
    """Write the math values `x` into the storage array `dst`, rounded to nearest even
    (fo_store)."""
    name, x = _check_store(dst, x)
    if name == "bfloat16":
        dst.view(_U16)[...] = round_to_bf16_nearest(x)
    elif name == "float16":
        dst.view(_U16)[...] = round_to_f16_nearest(x)
    else:
        dst[...] = x


def store_stochastic(dst, x, seed, step, start=0):
    """Write `x` into the bfloat16 array `dst` rounded stochastically
    (fo_store_stochastic); element k of the C-ordered `dst` has flat index start + k."""
    name, x = _check_store(dst, x)
    if name != "bfloat16":
        raise TypeError(f"stochastic rounding stores into bfloat16, `dst` is {name}")
    start = _uint64(start, "start")
    if start + dst.size - 1 > _MASK64:
        raise ValueError("`start` + `dst.size` passes 2**64")
    index = np.arange(dst.size, dtype=_U64).reshape(dst.shape) + np.uint64(start)
    dst.view(_U16)[...] = stochastic_round_to_bf16(x, seed, step, index)
