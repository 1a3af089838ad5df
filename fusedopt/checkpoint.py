"""Checkpoints: an optimizer and its parameters in one file, written atomically.

    fusedopt.save("run.safetensors", opt, params)
    opt, params = fusedopt.load("run.safetensors", device="gpu")

The file holds the parameter buffer, every state slot, the layout, the optimizer's
config, its iteration and skip counters, the per-segment attributes (lr multipliers,
weight decay on/off) and segment names when set, and a SHA-256 of every array. It is
written to a temporary file in the same directory, flushed to disk and renamed over
the target, so a crash mid-save leaves the previous checkpoint intact. Loading
checks everything before building or changing anything: a truncated, corrupt or
mismatched file is refused with a ValueError.

Two containers hold the same content. safetensors (the default: any name not ending
in .npz) stores bfloat16 and float16 natively, executes nothing on load and is read
by torch, JAX and NumPy; the tensors are "params" and "slot.<name>", the rest is JSON
under the metadata key "fusedopt". `.npz` (a name ending in .npz) is the original
format, still written for such names and always read: `load` tells the two apart by
their first bytes, not by the name.
"""

import errno
import hashlib
import json
import os
import secrets
import warnings

import numpy as np

from . import _safetensors, cuda, schedules
from .flat import FlatBuffer, Layout
from .optimizer import FusedOptimizer, _lookup

FORMAT = "fusedopt-checkpoint"
VERSION = 1  # of the metadata, the same in both containers
METADATA_KEY = "fusedopt"  # safetensors' __metadata__ key holding the JSON
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # an .npz is a zip file
# What np.savez stores as itself; anything else (ml_dtypes' bfloat16) would come back
# as raw bytes.
NPZ_DTYPES = ("float64", "float32", "float16")


def save(path, optimizer, params):
    """Write `optimizer` (its config and state) and `params` to `path` atomically, as
    safetensors, or as .npz when `path` ends in .npz."""
    if not isinstance(optimizer, FusedOptimizer):
        raise TypeError(f"`optimizer` must be a FusedOptimizer, got {type(optimizer).__name__}")
    if not isinstance(params, FlatBuffer):
        raise TypeError(f"`params` must be a FlatBuffer, got {type(params).__name__}")
    path = os.fspath(path)
    _check_folder_exists(path)
    config = optimizer.get_config()
    # A wrapper (LossScaleOptimizer) keeps the learning rate in its inner optimizer's config.
    lr = config["learning_rate"] if "learning_rate" in config else \
        config["inner_optimizer"]["config"]["learning_rate"]
    if callable(lr):
        raise ValueError("a callable `learning_rate` cannot be saved; use a number or a "
                         "fusedopt.schedules schedule")
    _check_loadable(optimizer, config)
    optimizer.build(params)  # refuses params of another layout or device
    state = optimizer.state_dict()
    arrays = {"params": cuda.to_device(params.data, "cpu")}
    arrays.update({f"slot.{k}": cuda.to_device(v, "cpu") for k, v in state["slots"].items()})
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "optimizer": state["optimizer"],
        "config": config,
        "iterations": state["iterations"],
        "skipped_steps": state.get("skipped_steps", 0),
        "last_step_skipped": state.get("last_step_skipped", False),
        "layout": state["layout"],
        "sha256": {k: _digest(v) for k, v in arrays.items()},
    }
    if "segment_attributes" in state:  # per-segment lr multipliers and weight decay
        meta["segment_attributes"] = state["segment_attributes"]
    if params.names is not None:
        meta["names"] = list(params.names)
    _write_atomically(path, _container_writer(path, arrays, meta))


def _check_folder_exists(path):
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, f"cannot save a checkpoint: folder {folder!r} "
                                "does not exist", path)


def _check_loadable(optimizer, config):
    """`load` rebuilds the optimizer from its config; a config it would refuse is
    refused here instead, before anything is written."""
    config = dict(config)
    if isinstance(config.get("learning_rate"), dict):  # a wrapper's is in its inner config
        config["learning_rate"] = schedules.deserialize(config["learning_rate"])
    try:
        with warnings.catch_warnings():  # Keras 2 spellings warned once already
            warnings.simplefilter("ignore", DeprecationWarning)
            type(optimizer)(**config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"this optimizer's configuration cannot be loaded back, so it is "
                         f"not saved: {e}") from e


def load(path, device="cpu", optimizer=None, params=None):
    """Read a checkpoint; return (optimizer, params) on `device` ("cpu", "gpu", "gpu:N").

    By default a new optimizer is built from the saved config and a new FlatBuffer
    holds the parameters. Pass `optimizer` and/or `params` to restore into existing
    objects instead: the file must then match them (same optimizer and slots, same
    layout and dtype), and they are changed only once everything has been checked.
    """
    if params is None:
        cuda.require_gpu(device)
        device = cuda.normalize_device(device)
    else:
        device = params.device
    meta, arrays = _read(os.fspath(path))
    layout = Layout.from_dict(meta["layout"])
    if optimizer is None:
        config = dict(meta["config"])
        if isinstance(config.get("learning_rate"), dict):
            config["learning_rate"] = schedules.deserialize(config["learning_rate"])
        optimizer = _lookup(meta["optimizer"])(**config)
    state = {
        "optimizer": meta["optimizer"],
        "iterations": meta["iterations"],
        "layout": meta["layout"],
        "slots": {k[len("slot."):]: v for k, v in arrays.items() if k.startswith("slot.")},
        "skipped_steps": meta["skipped_steps"],
        "last_step_skipped": meta["last_step_skipped"],
    }
    if "segment_attributes" in meta:
        state["segment_attributes"] = meta["segment_attributes"]
    _check_target(path, optimizer, params, layout, device, state)
    if params is None:
        params = FlatBuffer(cuda.to_device(arrays["params"], device), list(layout.shapes),
                            meta.get("names"))
    else:
        with cuda.on_device(params.device):
            params.data[...] = cuda.to_device(arrays["params"], params.device)
    optimizer.load_state_dict(state)
    optimizer.build(params)
    return optimizer, params


def _check_target(path, optimizer, params, layout, device, state):
    """Every reason to refuse, checked before the optimizer or params change."""
    if not isinstance(optimizer, FusedOptimizer):
        raise TypeError(f"`optimizer` must be a FusedOptimizer, got {type(optimizer).__name__}")
    if type(optimizer).__name__.lower() != state["optimizer"]:
        raise ValueError(f"checkpoint {path!r} holds optimizer {state['optimizer']!r}, "
                         f"not {type(optimizer).__name__.lower()!r}")
    if params is not None:
        if not isinstance(params, FlatBuffer):
            raise TypeError(f"`params` must be a FlatBuffer, got {type(params).__name__}")
        if params.layout != layout:
            raise ValueError(f"checkpoint {path!r} does not match `params`: "
                             + params.layout.describe_difference(layout))
    if optimizer.built and (optimizer._layout != layout or optimizer._device != device):
        raise ValueError(f"checkpoint {path!r} does not match the layout or device this "
                         "optimizer was built for")
    optimizer._parse_state(state)  # other slots, sizes or dtypes


def _digest(array):
    return hashlib.sha256(np.ascontiguousarray(array).view(np.uint8)).hexdigest()


def is_npz_path(path):
    """Whether `save` writes the .npz container for `path` (else safetensors)."""
    return os.fspath(path).lower().endswith(".npz")


def _container_writer(path, arrays, meta):
    """A function writing `arrays` and `meta` to a binary file in the container that
    `path` names, after checking the container can hold them."""
    if not is_npz_path(path):
        metadata = {METADATA_KEY: json.dumps(meta)}
        return lambda f: _safetensors.write(f, arrays, metadata)
    odd = sorted(k for k, v in arrays.items() if v.dtype.name not in NPZ_DTYPES)
    if odd:
        raise ValueError(f".npz cannot store {', '.join(odd)} "
                         f"({arrays[odd[0]].dtype}); save to a .safetensors path")
    npz = dict(arrays, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    return lambda f: np.savez(f, **npz)


def _write_atomically(path, write):
    """Call `write(f)` on a new file that then replaces `path` in one rename."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        tmp, fd = _create_temporary(directory)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            # The temporary file is ours, not the user's: report the path they gave.
            raise type(e)(e.errno, f"cannot save a checkpoint: {e.strerror}", path) from e
        raise
    _fsync_directory(directory)


def _create_temporary(directory):
    """(path, fd) of a new file beside the target. Created with mode 0o666 less the
    umask, as open() would create the target itself (tempfile.mkstemp's 0o600 would
    leave every checkpoint readable by its owner only)."""
    while True:
        tmp = os.path.join(directory, f".fusedopt-{secrets.token_hex(8)}.tmp")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def _fsync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename still happened
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path):
    """(metadata, {name: array}) after checking format, completeness and checksums."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        meta, arrays = _read_npz(path) if magic in ZIP_MAGIC else _read_safetensors(path)
    except (FileNotFoundError, PermissionError, IsADirectoryError, ImportError):
        raise  # not the file's fault (ImportError: bfloat16 arrays need ml_dtypes)
    except _NotACheckpoint as e:
        raise ValueError(f"{path!r} is not a fusedopt checkpoint ({e})") from None
    except Exception as e:  # zipfile, zlib, numpy, header errors: all mean a damaged file
        raise ValueError(f"checkpoint {path!r} is truncated or corrupt: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path!r} is not a fusedopt checkpoint")
    if meta.get("version") != VERSION:
        raise ValueError(f"checkpoint {path!r} has format version {meta.get('version')!r}; "
                         f"this fusedopt reads version {VERSION}")
    expected = meta.get("sha256", {})
    if set(expected) != set(arrays):
        raise ValueError(f"checkpoint {path!r} is incomplete: arrays {sorted(arrays)}, "
                         f"expected {sorted(expected)}")
    for name, array in arrays.items():
        if _digest(array) != expected[name]:
            raise ValueError(f"checkpoint {path!r} is corrupt: {name!r} fails its checksum")
    layout = Layout.from_dict(meta["layout"])
    params = arrays["params"]
    if params.ndim != 1 or params.size != layout.size or params.dtype.name != layout.dtype:
        raise ValueError(f"checkpoint {path!r}: params do not match the saved layout")
    return meta, arrays


class _NotACheckpoint(Exception):
    """A well-formed file of the container's kind without fusedopt's metadata."""


def _read_npz(path):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    if "meta" not in arrays:
        raise _NotACheckpoint("no metadata")
    return _parse_meta(arrays.pop("meta").tobytes()), arrays


def _read_safetensors(path):
    arrays, metadata = _safetensors.read(path)
    if METADATA_KEY not in metadata:
        raise _NotACheckpoint("no metadata")
    return _parse_meta(metadata[METADATA_KEY].encode()), arrays


def _parse_meta(raw):
    try:
        return json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"corrupt metadata: {e}") from e
