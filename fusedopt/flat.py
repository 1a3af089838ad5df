"""FlatBuffer: every variable of a model in one contiguous 1-D buffer.

A FlatBuffer is the 1-D array `data` plus a segment table: segment i holds the
variable of shape `shapes[i]` at `data[offsets[i]:offsets[i + 1]]`. `views()` gives
arrays of the original shapes that alias `data`, so a forward/backward pass can read
and write them while the optimizer updates the whole buffer in one pass.

Buffers live on the CPU (NumPy) or a GPU (CuPy); the optimizer follows the buffer.
"""

import math
import numbers

import numpy as np

from . import cuda, precision

# Storage dtypes, by name (bfloat16's NumPy dtype is ml_dtypes', imported only when
# asked for: fusedopt.precision).
SUPPORTED_DTYPES = precision.DTYPES


class FlatBuffer:
    """One contiguous 1-D float buffer and the shapes of the variables it holds.

    Args:
        data: a contiguous 1-D NumPy or CuPy array of float64, float32, bfloat16
            (NumPy: ml_dtypes' bfloat16) or float16.
        shapes: the shape of each variable, in order; their sizes must add up to
            `data.size`.
        names: optional, a name per variable (strings), e.g. "dense/bias": what an
            optimizer's exclude_from_weight_decay(var_names=...) matches. Names are not
            part of the layout: buffers differing only in names are interchangeable.

    The buffer is used as is (not copied): the FlatBuffer aliases `data`.
    """

    def __init__(self, data, shapes, names=None):
        if not (isinstance(data, np.ndarray) or cuda.is_gpu_array(data)):
            raise TypeError(
                f"`data` must be a NumPy or CuPy array, got {type(data).__name__}"
            )
        if data.ndim != 1:
            raise ValueError(f"`data` must be 1-D, got shape {tuple(data.shape)}")
        if not data.flags.c_contiguous:
            raise ValueError("`data` must be contiguous")
        _check_dtype("data", data.dtype)
        shapes = _normalize_shapes(shapes)
        sizes = [math.prod(s) for s in shapes]
        if sum(sizes) != data.size:
            raise ValueError(
                f"`shapes` hold {sum(sizes)} elements but `data` has {data.size}"
            )
        self._names = _check_names(names, len(shapes))
        self._data = data
        self._shapes = shapes
        self._offsets = tuple(int(x) for x in np.concatenate(([0], np.cumsum(sizes, dtype=np.int64))))
        # Fixed for the buffer's life; compared on every optimizer step.
        self._layout = Layout(shapes, np.dtype(data.dtype).name)
        self._device = cuda.device_of(data)
        self._span = _span(data)

    # ------------------------------------------------------------------ creation
    @classmethod
    def from_arrays(cls, arrays, dtype=None, names=None):
        """Copy `arrays` (a list of NumPy arrays, or of CuPy arrays) into one new
        contiguous buffer, one segment per array.

        `dtype` defaults to the arrays' common dtype, which must be float64, float32,
        bfloat16 or float16; mixed dtypes are refused unless `dtype` says what to
        convert to (to a 16-bit dtype: rounded to nearest even).
        """
        if _is_array(arrays) or isinstance(arrays, np.generic):
            # Iterating an array yields its rows: a (3, 2) array would silently become
            # three segments of shape (2,).
            raise TypeError(
                f"`arrays` must be a list of arrays, got one {type(arrays).__name__} of "
                f"shape {tuple(arrays.shape)}; pass [array] for a single variable"
            )
        # NumPy scalars (what rng.normal(size=()) returns) are 0-d arrays here.
        arrays = [np.asarray(a) if isinstance(a, np.generic) else a for a in arrays]
        kinds = {cuda.device_of(a) if _is_array(a) else None for a in arrays}
        if None in kinds:
            bad = next(a for a in arrays if not _is_array(a))
            raise TypeError(
                f"`arrays` must hold NumPy or CuPy arrays, got {type(bad).__name__}"
            )
        if len(kinds) > 1:
            raise ValueError(f"`arrays` live on different devices: {sorted(kinds)}")
        dtypes = {np.dtype(a.dtype) for a in arrays}
        if dtype is None:
            if len(dtypes) > 1:
                raise ValueError(
                    f"`arrays` have mixed dtypes {sorted(str(d) for d in dtypes)}; "
                    "pass dtype= to convert them to one"
                )
            dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
            _check_dtype("arrays", dtype)
        else:
            dtype = _check_dtype("dtype", dtype)
            for d in dtypes:
                if d.kind not in "fiub" and d.name not in SUPPORTED_DTYPES:
                    raise ValueError(f"`arrays` hold dtype {d}, which cannot convert to {dtype}")
        device = kinds.pop() if kinds else "cpu"
        xp = cuda.module_for(device)
        shapes = [tuple(a.shape) for a in arrays]
        names = _check_names(names, len(shapes))
        flat = cls.zeros(shapes, dtype, device=device)
        with cuda.on_device(device):
            for view, a in zip(flat.views(), arrays):
                view[...] = xp.asarray(a, dtype=dtype)
        flat._names = names
        return flat

    @classmethod
    def zeros(cls, shapes, dtype=np.float32, device="cpu"):
        """A zero-filled buffer for variables of `shapes` on `device` ("cpu", "gpu" or "gpu:N")."""
        return cls.full(shapes, 0.0, dtype, device)

    @classmethod
    def full(cls, shapes, value, dtype=np.float32, device="cpu"):
        dtype = _check_dtype("dtype", dtype)
        shapes = _normalize_shapes(shapes)
        cuda.require_gpu(device)
        device = cuda.normalize_device(device)
        size = sum(math.prod(s) for s in shapes)
        with cuda.on_device(device):
            data = cuda.module_for(device).full(size, value, dtype=dtype)
        return cls(data, shapes)

    # ---------------------------------------------------------------- properties
    @property
    def data(self):
        """The 1-D buffer itself (updated in place by the optimizers)."""
        return self._data

    @property
    def shapes(self):
        return self._shapes

    @property
    def names(self):
        """The segments' names (a tuple of strings), or None."""
        return self._names

    @property
    def offsets(self):
        """Start of each segment in `data`, plus the total size at the end."""
        return self._offsets

    @property
    def sizes(self):
        return tuple(b - a for a, b in zip(self._offsets[:-1], self._offsets[1:]))

    @property
    def dtype(self):
        return np.dtype(self._data.dtype)

    @property
    def size(self):
        return int(self._data.size)

    @property
    def nbytes(self):
        return int(self._data.nbytes)

    @property
    def device(self):
        """"cpu" for NumPy buffers, "gpu:N" for CuPy buffers on device N."""
        return self._device

    @property
    def span(self):
        """(device, first byte, end byte) of `data`, for aliasing checks."""
        return self._span

    @property
    def xp(self):
        """The array module of `data`: numpy or cupy."""
        return cuda.module_for(self.device)

    @property
    def layout(self):
        """What must match between params, grads and optimizer state: shapes and dtype."""
        return self._layout

    # -------------------------------------------------------------------- access
    def views(self):
        """Arrays of the original shapes that alias `data`."""
        return [self[i] for i in range(len(self))]

    def __len__(self):
        return len(self._shapes)

    def __getitem__(self, i):
        if not isinstance(i, numbers.Integral) or isinstance(i, bool):
            raise TypeError(f"segment index must be an integer, got {type(i).__name__}")
        if not -len(self) <= i < len(self):
            raise IndexError(f"segment {i} out of range for {len(self)} segments")
        i = int(i) % len(self)
        a, b = self._offsets[i], self._offsets[i + 1]
        return self._data[a:b].reshape(self._shapes[i])

    def __iter__(self):
        return iter(self.views())

    def __repr__(self):
        return (
            f"FlatBuffer({len(self)} segments, {self.size} elements, "
            f"{self.dtype.name}, {self.device})"
        )

    # ------------------------------------------------------------------- copying
    def zeros_like(self):
        """A new zero buffer with the same layout and device (e.g. for gradients)."""
        return self.full_like(0.0)

    def full_like(self, value):
        with cuda.on_device(self.device):
            return FlatBuffer(self.xp.full(self.size, value, dtype=self.dtype), self._shapes,
                              self._names)

    def copy(self):
        with cuda.on_device(self.device):
            return FlatBuffer(self._data.copy(), self._shapes, self._names)

    def to(self, device):
        """A copy on `device` ("cpu", "gpu", "gpu:N"); the same object if already there."""
        if device != self.device:
            cuda.require_gpu(device)
        device = cuda.normalize_device(device)
        if device == self.device:
            return self
        return FlatBuffer(cuda.to_device(self._data, device), self._shapes, self._names)


class Layout(tuple):
    """(shapes, dtype name): equal layouts mean interchangeable buffers."""

    __slots__ = ()

    def __new__(cls, shapes, dtype):
        return super().__new__(cls, (tuple(tuple(s) for s in shapes), str(dtype)))

    @property
    def shapes(self):
        return self[0]

    @property
    def dtype(self):
        return self[1]

    @property
    def size(self):
        return sum(math.prod(s) for s in self.shapes)

    def describe_difference(self, other):
        """A sentence saying how `other` differs from this layout (for error messages)."""
        if self.dtype != other.dtype:
            return f"dtype {other.dtype} != {self.dtype}"
        if self.size != other.size:
            return f"size {other.size} != {self.size}"
        if len(self.shapes) != len(other.shapes):
            return f"{len(other.shapes)} segments != {len(self.shapes)}"
        for i, (a, b) in enumerate(zip(self.shapes, other.shapes)):
            if a != b:
                return f"segment {i} has shape {b} != {a}"
        return "layouts are equal"

    def to_dict(self):
        return {"shapes": [list(s) for s in self.shapes], "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d):
        return cls([tuple(int(x) for x in s) for s in d["shapes"]], d["dtype"])


def _span(a):
    if a.size == 0:
        return (None, 0, 0)  # an empty buffer overlaps nothing
    if cuda.is_gpu_array(a):
        return (cuda.device_of(a), a.data.ptr, a.data.ptr + a.nbytes)
    start = a.__array_interface__["data"][0]
    return ("cpu", start, start + a.nbytes)


def _is_array(a):
    return isinstance(a, np.ndarray) or cuda.is_gpu_array(a)


def _check_dtype(name, dtype):
    if isinstance(dtype, str) and dtype.strip().lower() == "bfloat16":
        return precision.numpy_dtype("bfloat16", name)
    try:
        dtype = np.dtype(dtype)
    except TypeError as e:
        raise TypeError(f"`{name}` is not a dtype: {dtype!r}") from e
    if dtype.name not in SUPPORTED_DTYPES:
        raise ValueError(f"`{name}` must be float64, float32, bfloat16 or float16, "
                         f"got {dtype}")
    return dtype


def _check_names(names, count):
    if names is None:
        return None
    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise TypeError(f"`names` must be a list of strings, one per variable, got "
                        f"{type(names).__name__}")
    names = tuple(names)
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise TypeError(f"`names[{i}]` must be a string, got {type(n).__name__}")
    if len(names) != count:
        raise ValueError(f"`names` has {len(names)} entries but there are {count} variables")
    return names


def _normalize_shapes(shapes):
    try:
        shapes = [tuple(s) if not isinstance(s, numbers.Integral) else (s,) for s in shapes]
    except TypeError as e:
        raise TypeError("`shapes` must be a sequence of shapes (tuples of ints)") from e
    for s in shapes:
        for d in s:
            if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0:
                raise ValueError(f"`shapes` holds an invalid shape {s}: sizes must be ints >= 0")
    return tuple(tuple(int(d) for d in s) for s in shapes)
