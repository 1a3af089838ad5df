"""The checkpoint containers: safetensors (the default) is a well-formed file that torch,
JAX and the safetensors package read, with bfloat16/float16 stored natively; fusedopt's
own reader refuses every malformed header; .npz checkpoints written by the original code
(tests/data) still load bit for bit. Resume, atomicity and refusal of bad files are
tested for both containers in test_checkpoint.py."""

import importlib.util
import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import fusedopt
from fusedopt import _safetensors, checkpoint

DATA = Path(__file__).parent / "data"
BF16 = np.dtype(ml_dtypes.bfloat16)


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_npz_fixtures",
                                                  DATA / "make_npz_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FIXTURES = _fixture_module()


def trained(dtype=np.float64, steps=3):
    rng = np.random.default_rng(0)
    params = fusedopt.FlatBuffer.from_arrays(
        [rng.normal(size=s).astype(dtype) for s in [(6, 5), (7,), (), (0,)]])
    opt = fusedopt.Adam(learning_rate=0.01, amsgrad=True, clipnorm=1.0)
    for _ in range(steps):
        opt.apply(rng.normal(size=params.size).astype(dtype), params)
    return opt, params


def header_of(path):
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n])


# ------------------------------------------------------------- which container


@pytest.mark.parametrize("name, container", [
    ("run.safetensors", "safetensors"), ("run.ckpt", "safetensors"), ("run", "safetensors"),
    ("run.npz", "npz"), ("RUN.NPZ", "npz"),
])
def test_the_name_chooses_the_container_and_load_sniffs_it(tmp_path, name, container):
    opt, params = trained()
    fusedopt.save(tmp_path / name, opt, params)
    is_zip = (tmp_path / name).read_bytes()[:4] == b"PK\x03\x04"
    assert is_zip == (container == "npz")
    if container == "safetensors":
        header = header_of(tmp_path / name)
        assert set(header) == {"__metadata__", "params", "slot.momentum", "slot.velocity",
                               "slot.velocity_hat"}
        assert header["params"]["dtype"] == "F64" and header["params"]["shape"] == [38]
    renamed = tmp_path / "renamed.bin"  # load looks at the bytes, not the name
    os.replace(tmp_path / name, renamed)
    loaded, loaded_params = fusedopt.load(renamed)
    np.testing.assert_array_equal(loaded_params.data, params.data)
    assert loaded.iterations == 3


@pytest.mark.parametrize("ext", ["safetensors", "npz"])
def test_saved_files_get_the_usual_permissions(tmp_path, ext):
    """As open() would create them (0o666 less the umask), not mkstemp's 0o600."""
    fusedopt.save(tmp_path / f"c.{ext}", *trained())
    with open(tmp_path / "plain", "wb"):
        pass
    assert (os.stat(tmp_path / f"c.{ext}").st_mode & 0o777) == \
        (os.stat(tmp_path / "plain").st_mode & 0o777)


# ----------------------------------------------------------- other readers


def test_the_safetensors_package_reads_a_checkpoint_with_its_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    opt, params = trained(np.float32)
    fusedopt.save(tmp_path / "c.safetensors", opt, params)
    tensors = load_file(tmp_path / "c.safetensors")
    assert tensors["params"].dtype == np.float32
    np.testing.assert_array_equal(tensors["params"], params.data)
    for name, slot in opt.slots().items():
        np.testing.assert_array_equal(tensors[f"slot.{name}"], slot)
    with safe_open(tmp_path / "c.safetensors", framework="np") as f:
        meta = json.loads(f.metadata()["fusedopt"])
    assert meta["config"] == opt.get_config() and meta["iterations"] == 3
    assert meta["layout"] == params.layout.to_dict()


def test_torch_reads_a_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    opt, params = trained(np.float64)
    fusedopt.save(tmp_path / "c.safetensors", opt, params)
    tensors = load_file(tmp_path / "c.safetensors")
    assert tensors["params"].dtype == torch.float64
    np.testing.assert_array_equal(tensors["params"].numpy(), params.data)
    np.testing.assert_array_equal(tensors["slot.velocity_hat"].numpy(),
                                  opt.slots()["velocity_hat"])


def test_jax_reads_a_checkpoint(tmp_path):
    pytest.importorskip("jax")
    from safetensors.flax import load_file

    opt, params = trained(np.float32)
    fusedopt.save(tmp_path / "c.safetensors", opt, params)
    tensors = load_file(tmp_path / "c.safetensors")
    np.testing.assert_array_equal(np.asarray(tensors["params"]), params.data)


# ----------------------------------------------------------- the container


def all_dtypes():
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(3, 5)) * 100).astype(np.float32)
    x[0, :3] = [np.inf, -0.0, np.nan]
    return {"f64": x.astype(np.float64), "f32": x, "f16": x.astype(np.float16),
            "bf16": x.astype(BF16), "scalar": np.array(7.5, np.float32),
            "empty": np.zeros((0, 4), BF16), "strided": x.astype(BF16)[:, ::2],
            "a3": x[1, :3].astype(BF16)}  # 6 bytes: would misalign what follows it


def assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(np.ascontiguousarray(a).view(np.uint8),
                                  np.ascontiguousarray(b).view(np.uint8))


def write_container(path, tensors, metadata):
    with open(path, "wb") as f:
        _safetensors.write(f, tensors, metadata)


def test_container_round_trip_keeps_every_dtype_bit_for_bit(tmp_path):
    tensors = all_dtypes()
    write_container(tmp_path / "t.safetensors", tensors, {"note": "héllo"})
    back, metadata = _safetensors.read(tmp_path / "t.safetensors")
    assert metadata == {"note": "héllo"} and set(back) == set(tensors)
    for name, array in tensors.items():
        assert_same_bits(back[name], array)
        assert back[name].flags.writeable
    header = header_of(tmp_path / "t.safetensors")
    assert header["bf16"]["dtype"] == "BF16" and header["f16"]["dtype"] == "F16"
    entries = [v for k, v in header.items() if k != "__metadata__"]
    itemsize = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
    # The header is padded to 8 bytes and the widest tensors come first, so each
    # tensor starts aligned to its element size (readers may map the file).
    assert all(e["data_offsets"][0] % itemsize[e["dtype"]] == 0 for e in entries)
    offsets = sorted(e["data_offsets"] for e in entries)
    size = (tmp_path / "t.safetensors").stat().st_size
    (n,) = struct.unpack("<Q", (tmp_path / "t.safetensors").read_bytes()[:8])
    assert n % 8 == 0 and offsets[-1][1] == size - 8 - n


def test_torch_reads_our_bfloat16_and_we_read_torchs(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    tensors = all_dtypes()
    write_container(tmp_path / "ours.safetensors", tensors, {})
    theirs = load_file(tmp_path / "ours.safetensors")
    assert theirs["bf16"].dtype == torch.bfloat16
    np.testing.assert_array_equal(theirs["bf16"].view(torch.int16).numpy().view(np.uint16),
                                  tensors["bf16"].view(np.uint16))
    np.testing.assert_array_equal(theirs["f16"].numpy().view(np.uint16),
                                  tensors["f16"].view(np.uint16))
    save_file({k: v.contiguous() for k, v in theirs.items()}, tmp_path / "theirs.safetensors",
              metadata={"from": "torch"})
    back, metadata = _safetensors.read(tmp_path / "theirs.safetensors")
    assert metadata == {"from": "torch"}
    for name, array in tensors.items():
        assert_same_bits(back[name], array)


def test_we_read_the_safetensors_packages_files(tmp_path):
    from safetensors.numpy import save_file

    tensors = {k: v for k, v in all_dtypes().items() if v.dtype != BF16}
    save_file({k: np.array(v, order="C") for k, v in tensors.items()},
              tmp_path / "p.safetensors", metadata={"a": "b"})
    back, metadata = _safetensors.read(tmp_path / "p.safetensors")
    assert metadata == {"a": "b"}
    for name, array in tensors.items():
        assert_same_bits(back[name], array)


def container_bytes(header, data=b"", pad=True):
    text = json.dumps(header).encode() if not isinstance(header, bytes) else header
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
MALFORMED = {
    "good-control": None,
    "not-an-object": container_bytes([1, 2]),
    "not-json": container_bytes(b'{"a": '),
    "not-utf8": container_bytes(b'{"\xff": 1}'),
    "unknown-dtype": container_bytes({"a": dict(GOOD["a"], dtype="I64")}, b"\0" * 8),
    "bool-shape": container_bytes({"a": dict(GOOD["a"], shape=[True, 2])}, b"\0" * 8),
    "negative-shape": container_bytes({"a": dict(GOOD["a"], shape=[-2])}, b"\0" * 8),
    "bytes-vs-shape": container_bytes({"a": dict(GOOD["a"], shape=[3])}, b"\0" * 8),
    "reversed-offsets": container_bytes({"a": dict(GOOD["a"], data_offsets=[8, 0])}, b"\0" * 8),
    "extra-key": container_bytes({"a": dict(GOOD["a"], order="F")}, b"\0" * 8),
    "hole": container_bytes({"a": dict(GOOD["a"], data_offsets=[4, 12])}, b"\0" * 12),
    "overlap": container_bytes({**GOOD, "b": GOOD["a"]}, b"\0" * 8),
    "duplicate-key": container_bytes(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": '
                                     b'[0, 8]}, "a": {"dtype": "F32", "shape": [2], '
                                     b'"data_offsets": [0, 8]}}', b"\0" * 8),
    "metadata-not-strings": container_bytes({**GOOD, "__metadata__": {"n": 1}}, b"\0" * 8),
    "short-data": container_bytes(GOOD, b"\0" * 7),
    "trailing-data": container_bytes(GOOD, b"\0" * 9),
    "header-past-end": struct.pack("<Q", 1000) + b"{}",
    "huge-header-length": struct.pack("<Q", 2 ** 63) + b"{}" * 10,
    "seven-bytes": b"\0" * 7,
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_containers_are_refused(tmp_path, case):
    raw = MALFORMED[case] if case != "good-control" else container_bytes(GOOD, b"\0" * 8)
    (tmp_path / "x").write_bytes(raw)
    if case == "good-control":  # the cases differ from a valid file in one thing each
        tensors, _ = _safetensors.read(tmp_path / "x")
        np.testing.assert_array_equal(tensors["a"], np.zeros(2, np.float32))
        return
    with pytest.raises(_safetensors.FormatError):
        _safetensors.read(tmp_path / "x")


@pytest.mark.parametrize("tensors, metadata, error", [
    ({"a": np.zeros(2, np.int64)}, {}, ValueError),
    ({"a": np.zeros(2, ">f4")}, {}, ValueError),
    ({"__metadata__": np.zeros(2)}, {}, ValueError),
    ({"a": [1.0]}, {}, TypeError),
    ({"a": np.zeros(2)}, {"n": 1}, TypeError),
])
def test_the_writer_refuses_what_it_cannot_store(tmp_path, tensors, metadata, error):
    with open(tmp_path / "x", "wb") as f, pytest.raises(error):
        _safetensors.write(f, tensors, metadata)
    assert (tmp_path / "x").read_bytes() == b""  # refused before writing anything


def test_npz_refuses_bfloat16_rather_than_storing_raw_bytes():
    with pytest.raises(ValueError, match=r"\.npz cannot store slot\.m.*\.safetensors"):
        checkpoint._container_writer("x.npz", {"params": np.zeros(3, np.float32),
                                               "slot.m": np.zeros(3, BF16)}, {})
    checkpoint._container_writer("x.safetensors", {"slot.m": np.zeros(3, BF16)}, {})


# --------------------------------------------- checkpoints of the original code


@pytest.mark.parametrize("name", list(FIXTURES.RUNS))
def test_old_npz_checkpoints_load_bit_for_bit(tmp_path, name):
    path = DATA / name
    opt, params = fusedopt.load(path)
    with np.load(path, allow_pickle=False) as raw:  # what the file holds, read directly
        assert_same_bits(params.data, raw["params"])
        for slot, value in opt.slots().items():
            assert_same_bits(value, raw[f"slot.{slot}"])
    # ...and it is the state the recorded run reaches, replayed today.
    replay_opt, replay_params = FIXTURES.replay(FIXTURES.RUNS[name])
    assert_same_bits(params.data, replay_params.data)
    for slot, value in replay_opt.slots().items():
        assert_same_bits(opt.slots()[slot], value)
    assert opt.get_config() == replay_opt.get_config()
    expected = {"v1-adam-f64.npz": (3, 0, False), "v1-nadam-f32.npz": (3, 1, False)}[name]
    assert (opt.iterations, opt.skipped_steps, opt.last_step_skipped) == expected
    # Re-saved as safetensors, the same state comes back.
    fusedopt.save(tmp_path / "new.safetensors", opt, params)
    again, again_params = fusedopt.load(tmp_path / "new.safetensors")
    assert_same_bits(again_params.data, params.data)
    assert again.get_config() == opt.get_config() and again.iterations == opt.iterations


def test_import_fusedopt_stays_light(tmp_path):
    """The safetensors container is fusedopt's own code: importing fusedopt (and saving)
    pulls in neither the safetensors package nor ml_dtypes."""
    import subprocess
    import sys

    code = ("import sys, numpy as np, fusedopt\n"
            "p = fusedopt.FlatBuffer.from_arrays([np.ones(3)])\n"
            "fusedopt.save('c.safetensors', fusedopt.Adam(), p)\n"
            "fusedopt.load('c.safetensors')\n"
            "heavy = {'safetensors', 'ml_dtypes', 'torch', 'jax'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    env = dict(os.environ, PYTHONPATH=str(Path(fusedopt.__file__).parent.parent))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
