"""The safetensors container, read and written exactly, for fusedopt's checkpoints.

The format (Hugging Face's, read by torch, JAX and NumPy through the `safetensors`
package): an 8-byte little-endian unsigned header length N; N bytes of UTF-8 JSON
mapping each tensor's name to its "dtype" ("F64", "BF16", ...), "shape" and
"data_offsets" [begin, end) into the byte buffer that follows, plus an optional
"__metadata__" object of string values; then the tensors' raw little-endian bytes, C
order, with no holes. No pickle, nothing executable.

fusedopt writes it itself (a page of code) rather than through the package, whose NumPy
API has no BF16, the one dtype the format is here for; the package and torch read
these files in the tests. Reading checks every number of the header against the file
before reading any tensor, so a truncated or damaged file is an error, never a
misread.
"""

import json
import math
import os
import struct

import numpy as np

# Storage dtype name -> safetensors dtype code. bfloat16 arrays are ml_dtypes'.
CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
MAX_HEADER = 100 << 20  # the reference implementation's limit too
METADATA = "__metadata__"


class FormatError(ValueError):
    """The file is not a well-formed safetensors file (truncated, damaged or foreign)."""


def write(f, tensors, metadata):
    """Write `tensors` ({name: NumPy array}) and `metadata` ({str: str}) to the binary
    file `f`, widest dtype first so every tensor starts aligned to its element size."""
    _check_tensors(tensors)
    _check_metadata(metadata)
    order = sorted(tensors, key=lambda name: (-tensors[name].dtype.itemsize, name))
    header, offset = {METADATA: dict(metadata)}, 0
    for name in order:
        array = tensors[name]
        header[name] = {"dtype": CODES[array.dtype.name], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # JSON allows trailing spaces; the data stays aligned
    f.write(struct.pack("<Q", len(text)))
    f.write(text)
    for name in order:
        f.write(_raw_bytes(tensors[name]))


def read(path):
    """({name: writable NumPy array}, {str: str} metadata) from the file at `path`.
    FormatError (a ValueError) for anything that is not a whole, well-formed file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        header_size = _read_header_size(f, size)
        header = _parse_header(f.read(header_size))
        metadata = header.pop(METADATA, {})
        _check_metadata(metadata, FormatError)
        entries = _check_entries(header, size - 8 - header_size)
        tensors = {}
        for name, (dtype, shape, begin, end) in entries:
            array = np.empty(shape, _numpy_dtype(dtype))
            f.seek(8 + header_size + begin)
            if f.readinto(array.reshape(-1).view(np.uint8)) != end - begin:
                raise FormatError(f"tensor {name!r} is cut short")
            tensors[name] = array
    return tensors, metadata


def _check_tensors(tensors):
    if not isinstance(tensors, dict):
        raise TypeError(f"`tensors` must be a dict, got {type(tensors).__name__}")
    for name, array in tensors.items():
        if not isinstance(name, str) or name == METADATA:
            raise ValueError(f"tensor names must be strings other than {METADATA!r}: {name!r}")
        if not isinstance(array, np.ndarray):
            raise TypeError(f"tensor {name!r} must be a NumPy array, got {type(array).__name__}")
        if array.dtype.name not in CODES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}; safetensors "
                             f"checkpoints hold {', '.join(CODES)}")
        if array.dtype.byteorder == ">":
            raise ValueError(f"tensor {name!r} is big-endian; safetensors is little-endian")


def _check_metadata(metadata, error=TypeError):
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise error("safetensors metadata must map strings to strings")


def _raw_bytes(array):
    """The array's bytes in C order (a view when it is contiguous already)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def _read_header_size(f, size):
    if size < 8:
        raise FormatError(f"{size} bytes: too short for a header length")
    (header_size,) = struct.unpack("<Q", f.read(8))
    if header_size > size - 8 or header_size > MAX_HEADER:
        raise FormatError(f"header length {header_size} does not fit a file of {size} bytes")
    return header_size


def _no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise FormatError(f"duplicate keys in the header: {sorted(keys)}")
    return dict(pairs)


def _parse_header(raw):
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"unreadable header: {e}") from e
    if not isinstance(header, dict):
        raise FormatError("the header is not a JSON object")
    return header


def _is_count(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_entries(header, data_size):
    """[(name, (dtype code, shape, begin, end))] in file order, once every entry has a
    known dtype, a byte range matching its shape, and the ranges tile the data exactly."""
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"tensor {name!r}: expected dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in ITEMSIZE:
            raise FormatError(f"tensor {name!r} has dtype {dtype!r}; fusedopt reads "
                              f"{', '.join(ITEMSIZE)}")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise FormatError(f"tensor {name!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(_is_count(o) for o in offsets) and offsets[0] <= offsets[1]):
            raise FormatError(f"tensor {name!r} has data_offsets {offsets!r}")
        if offsets[1] - offsets[0] != math.prod(shape) * ITEMSIZE[dtype]:
            raise FormatError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes for shape "
                              f"{shape} of {dtype}")
        entries.append((name, (dtype, tuple(shape), offsets[0], offsets[1])))
    entries.sort(key=lambda e: (e[1][2], e[1][3]))
    position = 0
    for name, (_, _, begin, end) in entries:
        if begin != position:
            raise FormatError(f"tensor {name!r} starts at byte {begin}, not {position}: "
                              "overlapping or missing data")
        position = end
    if position != data_size:
        raise FormatError(f"the tensors cover {position} bytes of data, the file holds "
                          f"{data_size}: truncated or padded")
    return entries


def _numpy_dtype(code):
    if code != "BF16":
        return np.dtype({"F64": "<f8", "F32": "<f4", "F16": "<f2"}[code])
    from .precision import numpy_dtype

    return numpy_dtype("bfloat16")
