"""FlatBuffer: one contiguous 1-D buffer, views that alias it, its segment table,
copies, validation, indexing, devices, and apply() on a raw 1-D array."""

import math
import types

import numpy as np
import pytest

import fusedopt
from conftest import LAYOUTS, random_params
from fusedopt import FlatBuffer, Layout

DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]

SHAPE_SETS = {
    **LAYOUTS,
    "scalar": [()],
    "empty-segment": [(0,)],
    "one": [(1,)],
    "zero-size-2d": [(0, 3), (3, 0), (2,)],
    "many": [(i % 5 + 1, (i * 7) % 3 + 1) for i in range(60)],
    "odd-sizes": [(3,), (5, 7), (11,), (1, 1, 13)],
    "big-odd": [(70001,), (3,)],  # more than one CHUNK (1 << 16)
}


def expected_offsets(shapes):
    out = [0]
    for s in shapes:
        out.append(out[-1] + math.prod(s))
    return tuple(out)


@pytest.fixture(params=list(SHAPE_SETS), ids=list(SHAPE_SETS))
def shapes(request):
    return SHAPE_SETS[request.param]


# --------------------------------------------------------------- from_arrays
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_from_arrays_copies_into_one_buffer(shapes, dtype):
    arrays = random_params(shapes, dtype, seed=3)
    flat = FlatBuffer.from_arrays(arrays)
    assert flat.data.ndim == 1 and flat.data.flags.c_contiguous
    assert flat.dtype == np.dtype(dtype) and flat.data.dtype == np.dtype(dtype)
    assert flat.size == sum(a.size for a in arrays) == flat.data.size
    assert flat.nbytes == flat.data.nbytes
    assert len(flat) == len(arrays)
    assert flat.shapes == tuple(tuple(a.shape) for a in arrays)
    assert flat.offsets == expected_offsets(flat.shapes)
    assert flat.sizes == tuple(a.size for a in arrays)
    assert flat.layout == Layout(flat.shapes, np.dtype(dtype).name)
    assert flat.device == "cpu" and flat.xp is np
    for view, a in zip(flat.views(), arrays):
        assert view.shape == a.shape and view.dtype == a.dtype
        np.testing.assert_array_equal(view, a)
    # the buffer is the concatenation, in order
    np.testing.assert_array_equal(flat.data, np.concatenate([a.ravel() for a in arrays]))
    # a copy: changing the inputs leaves the buffer alone
    before = flat.data.copy()
    for a in arrays:
        a[...] = 123.0
    np.testing.assert_array_equal(flat.data, before)


def test_views_alias_the_buffer_both_ways(shapes):
    flat = FlatBuffer.from_arrays(random_params(shapes, np.float64, seed=4))
    views = flat.views()
    for i, v in enumerate(views):
        assert v.size == 0 or np.shares_memory(v, flat.data)
        v[...] = i + 1.5  # write through the view
    for i, (a, b) in enumerate(zip(flat.offsets[:-1], flat.offsets[1:])):
        np.testing.assert_array_equal(flat.data[a:b], i + 1.5)
    flat.data[:] = -2.0  # write through the buffer
    for v in views:
        np.testing.assert_array_equal(v, -2.0)


def test_scalar_view_aliases():
    flat = FlatBuffer.from_arrays([np.float64(3.0), np.array([1.0, 2.0])])
    s = flat[0]
    assert s.shape == () and float(s) == 3.0
    s[()] = 7.0
    assert flat.data[0] == 7.0
    flat.data[0] = 9.0
    assert float(flat.views()[0]) == 9.0


def test_views_see_optimizer_updates():
    flat = FlatBuffer.from_arrays([np.ones((2, 3)), np.ones(4)])
    w, b = flat.views()
    grads = flat.full_like(1.0)
    fusedopt.SGD(learning_rate=0.25).apply(grads, flat)
    np.testing.assert_array_equal(w, np.full((2, 3), 0.75))
    np.testing.assert_array_equal(b, np.full(4, 0.75))


def test_empty_list():
    flat = FlatBuffer.from_arrays([])
    assert len(flat) == 0 and flat.size == 0 and flat.views() == []
    assert flat.offsets == (0,) and flat.sizes == () and flat.shapes == ()
    assert flat.dtype == np.float32
    opt = fusedopt.Adam()
    opt.apply(flat.zeros_like(), flat)  # Keras: no variables, no update, no increment
    assert opt.iterations == 0


def test_zero_size_segments_keep_offsets():
    flat = FlatBuffer.from_arrays([np.zeros(0), np.ones(2), np.zeros((0, 4)), np.full(1, 5.0)])
    assert flat.offsets == (0, 0, 2, 2, 3)
    assert [v.shape for v in flat.views()] == [(0,), (2,), (0, 4), (1,)]
    assert flat[3][0] == 5.0


@pytest.mark.parametrize("src,dst", [
    (np.int64, np.float32), (np.int32, np.float64), (bool, np.float32),
    (np.float64, np.float32), (np.float32, np.float64), (np.uint8, np.float64),
], ids=["int64->f32", "int32->f64", "bool->f32", "f64->f32", "f32->f64", "uint8->f64"])
def test_from_arrays_dtype_conversion(src, dst):
    arrays = [np.arange(6).reshape(2, 3).astype(src), np.array([1, 0, 1]).astype(src)]
    flat = FlatBuffer.from_arrays(arrays, dtype=dst)
    assert flat.dtype == np.dtype(dst)
    for v, a in zip(flat.views(), arrays):
        np.testing.assert_array_equal(v, a.astype(dst))


def test_from_arrays_mixed_dtypes_with_target():
    flat = FlatBuffer.from_arrays([np.ones(2, np.float32), np.full(3, 0.1)], dtype="float32")
    assert flat.dtype == np.float32
    assert flat[1][0] == np.float32(0.1)


def test_from_arrays_accepts_non_contiguous_inputs_and_scalars():
    a = np.arange(12.0).reshape(3, 4).T  # Fortran-ordered
    flat = FlatBuffer.from_arrays([a, np.float64(2.5), a[:, ::2]])
    np.testing.assert_array_equal(flat[0], a)
    assert flat[1].shape == () and flat[1] == 2.5
    np.testing.assert_array_equal(flat[2], a[:, ::2])


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], [1.0], [np.zeros(2), "x"], [None]],
                         ids=["nested-list", "python-float", "str", "None"])
def test_from_arrays_refuses_non_arrays(bad):
    with pytest.raises(TypeError, match="arrays"):
        FlatBuffer.from_arrays(bad)


@pytest.mark.parametrize("array", [np.ones((3, 2), "float32"), np.ones(4), np.float64(1.0)],
                         ids=["2-D", "1-D", "numpy-scalar"])
def test_from_arrays_refuses_one_array_instead_of_a_list(array):
    """Iterating an array gives its rows: a (3, 2) array would become 3 segments."""
    with pytest.raises(TypeError, match=r"`arrays` must be a list of arrays.*\[array\]"):
        FlatBuffer.from_arrays(array)


def test_from_arrays_refuses_mixed_devices():
    class FakeGpuArray:  # enough of a CuPy array to be seen on gpu:0, no CuPy needed
        __module__ = "cupy._core.core"
        device = types.SimpleNamespace(id=0)
        dtype, shape = np.dtype(np.float64), (3,)

    with pytest.raises(ValueError, match="devices"):
        FlatBuffer.from_arrays([np.zeros(3), FakeGpuArray()])


@pytest.mark.parametrize("dtype", ["not-a-dtype", object(), 3.5], ids=["str", "object", "float"])
def test_not_a_dtype(dtype):
    with pytest.raises(TypeError, match="dtype"):
        FlatBuffer.zeros([(3,)], dtype)
    with pytest.raises(TypeError, match="dtype"):
        FlatBuffer.from_arrays([np.zeros(3)], dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_zeros_and_full(dtype):
    z = FlatBuffer.zeros([(2, 2), (3,)], dtype)
    assert z.dtype == np.dtype(dtype) and z.size == 7 and not z.data.any()
    f = FlatBuffer.full([(2,), ()], 1.5, dtype)
    np.testing.assert_array_equal(f.data, np.full(3, 1.5, dtype))
    with pytest.raises(ValueError, match="dtype"):
        FlatBuffer.zeros([(2,)], np.int32)


# ----------------------------------------------------------------- copying
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_zeros_like_full_like_copy_are_independent(shapes, dtype):
    flat = FlatBuffer.from_arrays(random_params(shapes, dtype, seed=5))
    original = flat.data.copy()
    z, f, c = flat.zeros_like(), flat.full_like(2.5), flat.copy()
    for other, expected in [(z, np.zeros_like(original)), (f, np.full_like(original, 2.5)),
                            (c, original)]:
        assert other.layout == flat.layout and other.offsets == flat.offsets
        assert other.device == flat.device
        assert other.data.size == 0 or not np.shares_memory(other.data, flat.data)
        np.testing.assert_array_equal(other.data, expected)
    for other in (z, f, c):
        other.data[:] = 42.0
        for v in other.views():
            v[...] = 43.0
    np.testing.assert_array_equal(flat.data, original)
    flat.data[:] = -1.0
    np.testing.assert_array_equal(c.data, np.full_like(original, 43.0))


# -------------------------------------------------------- FlatBuffer(data, shapes)
def test_constructor_aliases_data():
    data = np.arange(7.0)
    flat = FlatBuffer(data, [(2, 3), 1])  # an int is a 1-D shape
    assert flat.data is data
    assert flat.shapes == ((2, 3), (1,))
    flat[0][1, 2] = 100.0
    assert data[5] == 100.0


@pytest.mark.parametrize("data,shapes,err,match", [
    (np.zeros((2, 3)), [(6,)], ValueError, "1-D"),
    (np.zeros(()), [()], ValueError, "1-D"),
    (np.zeros(10)[::2], [(5,)], ValueError, "contiguous"),
    (np.zeros(6), [(5,)], ValueError, "shapes"),
    (np.zeros(6), [(7,)], ValueError, "shapes"),
    (np.zeros(6), [(2, 3), (1,)], ValueError, "shapes"),
    (np.zeros(6), [(-1, -6)], ValueError, "shapes"),
    (np.zeros(6), [(6.0,)], ValueError, "shapes"),
    (np.zeros(6), [(True, 6)], ValueError, "shapes"),
    (np.zeros(6), 6, TypeError, "shapes"),
    (np.zeros(6), [None], TypeError, "shapes"),
    ([0.0] * 6, [(6,)], TypeError, "data"),
    (np.zeros(6, np.int8), [(6,)], ValueError, "bfloat16 or float16"),
    (np.zeros(6, np.int64), [(6,)], ValueError, "bfloat16 or float16"),
    (np.zeros(6, np.complex128), [(6,)], ValueError, "bfloat16 or float16"),
], ids=["2d", "0d", "strided", "too-few", "too-many", "sum-mismatch", "negative-dims",
        "float-dim", "bool-dim", "shapes-int", "shape-None", "list-data", "int8", "int64",
        "complex"])
def test_constructor_validation(data, shapes, err, match):
    with pytest.raises(err, match=match):
        FlatBuffer(data, shapes)


def test_constructor_accepts_numpy_int_dims_and_generators():
    flat = FlatBuffer(np.zeros(6), (s for s in [(np.int64(2), np.int32(3))]))
    assert flat.shapes == ((2, 3),) and type(flat.shapes[0][0]) is int


# ---------------------------------------------------------------- indexing
def test_indexing():
    arrays = [np.full((2,), 1.0), np.full((3, 1), 2.0), np.full((), 3.0)]
    flat = FlatBuffer.from_arrays(arrays)
    assert flat[0].shape == (2,) and flat[1].shape == (3, 1) and flat[2].shape == ()
    assert flat[-1].shape == () and float(flat[-1]) == 3.0
    np.testing.assert_array_equal(flat[-3], arrays[0])
    np.testing.assert_array_equal(flat[np.int64(1)], arrays[1])
    assert [v.shape for v in flat] == [(2,), (3, 1), ()]  # iteration
    flat[-2][2, 0] = 9.0
    assert flat.data[4] == 9.0
    for bad in (3, -4, 100):
        with pytest.raises(IndexError):
            flat[bad]
    for bad in (slice(0, 1), 1.0, True, "0", None):
        with pytest.raises(TypeError):
            flat[bad]


def test_repr_names_segments_size_dtype_device():
    r = repr(FlatBuffer.from_arrays([np.zeros(3), np.zeros((2, 2))]))
    assert "2 segments" in r and "7 elements" in r and "float64" in r and "cpu" in r


# ------------------------------------------------------------------ layout
def test_layout():
    flat = FlatBuffer.from_arrays([np.zeros((2, 3)), np.zeros(4)])
    layout = flat.layout
    assert layout.shapes == ((2, 3), (4,)) and layout.dtype == "float64" and layout.size == 10
    assert Layout.from_dict(layout.to_dict()) == layout
    assert layout.to_dict() == {"shapes": [[2, 3], [4]], "dtype": "float64"}
    assert layout == Layout([[2, 3], [4]], np.dtype("float64"))
    other = FlatBuffer.from_arrays([np.zeros((3, 2)), np.zeros(4)]).layout
    assert layout != other  # same size, other shapes
    assert "segment 0" in layout.describe_difference(other)
    assert "dtype" in layout.describe_difference(Layout(layout.shapes, "float32"))
    assert "size" in layout.describe_difference(Layout([(2, 3)], "float64"))
    assert "segments" in layout.describe_difference(Layout([(2, 3), (4,), (0,)], "float64"))
    assert layout.describe_difference(layout) == "layouts are equal"
    assert flat.zeros_like().layout == layout
    assert FlatBuffer.from_arrays([np.zeros((2, 3)), np.zeros(4)], dtype=np.float32).layout \
        != layout


# ----------------------------------------------------------------- devices
@pytest.mark.parametrize("name", ["cpu", "CPU", " cpu "])
def test_to_cpu_is_the_same_object(name):
    flat = FlatBuffer.from_arrays([np.ones(3)])
    assert flat.to(name) is flat


@pytest.mark.parametrize("bad,err", [("tpu", ValueError), ("cpu:0", ValueError),
                                     ("gpu:x", ValueError), (0, TypeError), (None, TypeError)],
                         ids=["tpu", "cpu:0", "gpu:x", "int", "None"])
def test_to_bad_device(bad, err):
    with pytest.raises(err, match="device"):
        FlatBuffer.from_arrays([np.ones(3)]).to(bad)


def test_zeros_on_bad_device():
    with pytest.raises(ValueError, match="device"):
        FlatBuffer.zeros([(3,)], device="tpu")


# --------------------------------------------------- apply on a raw 1-D array
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cls_name,kwargs", [
    ("SGD", {"learning_rate": 0.1, "momentum": 0.9}), ("Adam", {"clipnorm": 0.5}),
    ("Ftrl", {"l1_regularization_strength": 0.01}),
], ids=["sgd-momentum", "adam-clipnorm", "ftrl"])
def test_apply_on_raw_array_equals_single_segment_flatbuffer(cls_name, kwargs, dtype):
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=37).astype(dtype)
    gs = [rng.normal(size=37).astype(dtype) for _ in range(4)]
    raw, flat = p0.copy(), FlatBuffer.from_arrays([p0])
    opt_raw = getattr(fusedopt, cls_name)(**kwargs)
    opt_flat = getattr(fusedopt, cls_name)(**kwargs)
    for g in gs:
        opt_raw.apply(g.copy(), raw)          # raw params, raw grads: updated in place
        opt_flat.apply(FlatBuffer.from_arrays([g]), flat)
    assert np.array_equal(raw, flat.data)
    assert not np.array_equal(raw, p0)
    assert opt_raw.iterations == 4
    for name, buf in opt_raw.slots().items():
        assert np.array_equal(buf, opt_flat.slots()[name])


def test_apply_raw_grads_on_flatbuffer_params():
    flat = FlatBuffer.from_arrays([np.ones((2, 2)), np.ones(3)])
    fusedopt.SGD(learning_rate=0.5).apply(np.full(7, 2.0), flat)
    np.testing.assert_array_equal(flat.data, np.zeros(7))


def test_raw_params_layout_is_one_segment():
    opt = fusedopt.Adam()
    params = np.ones(5)
    opt.apply(np.ones(5), params)
    assert opt.state_dict()["layout"] == {"shapes": [[5]], "dtype": "float64"}
    # the same memory viewed as two segments is another layout
    with pytest.raises(ValueError, match="params"):
        opt.apply(np.ones(5), FlatBuffer(params, [(2,), (3,)]))
