"""fusedopt.precision's Python side: dtype names, the accepted combinations and their
errors, the bytes-per-element model, and load/store on typed arrays (the bit-level
twins are tested against the header and ml_dtypes in test_storage.py)."""

import itertools

import ml_dtypes
import numpy as np
import pytest

from fusedopt import precision as P

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("given, name", [
    ("bfloat16", "bfloat16"), ("BFloat16", "bfloat16"), (BF16, "bfloat16"),
    (ml_dtypes.bfloat16, "bfloat16"), ("float16", "float16"), (np.float16, "float16"),
    ("half", "float16"), ("float32", "float32"), (np.dtype("float32"), "float32"),
    ("float64", "float64"), (float, "float64"), (np.float64, "float64"),
])
def test_resolve_dtype_gives_canonical_names(given, name):
    assert P.resolve_dtype(given) == name


@pytest.mark.parametrize("given, error", [
    ("int32", ValueError), ("bf16", ValueError), ("float8_e4m3fn", ValueError),
    (np.int8, ValueError), (np.complex64, ValueError), (None, TypeError), (32, TypeError),
    (True, TypeError), (object(), TypeError), (1.5, TypeError),
])
def test_resolve_dtype_refuses_the_rest_naming_the_argument(given, error):
    with pytest.raises(error, match="`grad_dtype`"):
        P.resolve_dtype(given, "grad_dtype")


def test_numpy_dtype_and_math_dtype():
    assert P.numpy_dtype("bfloat16") == BF16
    assert P.numpy_dtype("float16") == np.float16
    assert [P.math_dtype(d) for d in P.DTYPES] == ["float64", "float32", "float32", "float32"]


# What the library accepts, written out by hand: (param, grad, state, master, stochastic).
ACCEPTED = {
    ("float64", "float64", "float64", False, False),
    *{("float32", g, s, False, False)
      for g in ("float32", "bfloat16", "float16") for s in ("float32", "bfloat16")},
    *{(p, g, s, m, False) for p in ("bfloat16", "float16") for g in (p, "float32")
      for s in ("float32", "bfloat16") for m in (False, True)},
    *{("bfloat16", g, s, False, True) for g in ("bfloat16", "float32")
      for s in ("float32", "bfloat16")},
}


def test_the_accepted_combinations_are_exactly_the_table():
    accepted = set()
    for combo in itertools.product(P.DTYPES, P.DTYPES, P.DTYPES, (False, True), (False, True)):
        try:
            got = P.resolve_precision(*combo)
        except ValueError:
            continue
        assert (got.param, got.grad, got.state, got.master_weights,
                got.stochastic_rounding) == combo
        accepted.add(combo)
    assert accepted == ACCEPTED


def test_defaults():
    assert P.resolve_precision("float64") == P.Precision("float64", "float64", "float64")
    p = P.resolve_precision("bfloat16", master_weights=True)
    assert (p.grad, p.state, p.math, p.master) == ("bfloat16", "float32", "float32", "float32")
    assert P.resolve_precision("float32").master is None


@pytest.mark.parametrize("kwargs, error, match", [
    ({"param_dtype": "float32", "grad_dtype": "float64"}, ValueError, "`grad_dtype` float64"),
    ({"param_dtype": "bfloat16", "grad_dtype": "float16"}, ValueError, "`grad_dtype` float16"),
    ({"param_dtype": "float64", "grad_dtype": "float32"}, ValueError, "float64 grads only"),
    ({"param_dtype": "bfloat16", "state_dtype": "float16"}, ValueError, "g\\*\\*2 leaves"),
    ({"param_dtype": "float64", "state_dtype": "bfloat16"}, ValueError, "`state_dtype`"),
    ({"param_dtype": "float32", "master_weights": True}, ValueError, "`master_weights=True`"),
    ({"param_dtype": "float16", "stochastic_rounding": True}, ValueError, "bfloat16 params only"),
    ({"param_dtype": "bfloat16", "stochastic_rounding": True, "master_weights": True},
     ValueError, "choose one"),
    ({"param_dtype": "bfloat16", "master_weights": 1}, TypeError, "`master_weights`"),
    ({"param_dtype": "int8"}, ValueError, "`param_dtype`"),
    ({"param_dtype": "float32", "state_dtype": 4}, TypeError, "`state_dtype`"),
])
def test_refused_combinations_say_why(kwargs, error, match):
    with pytest.raises(error, match=match):
        P.resolve_precision(**kwargs)


def test_bytes_per_element_matches_the_performance_model():
    f32 = P.resolve_precision("float32")
    assert [P.bytes_per_element(f32, s) for s in (0, 1, 2, 3)] == [12, 20, 28, 36]
    # Issue 13's examples: Adam (2 slots) with bf16 params and grads...
    master = P.resolve_precision("bfloat16", master_weights=True)
    assert P.bytes_per_element(master, 2) == 2 + 8 + 8 + 8 + 2  # ...an fp32 master and states
    lean = P.resolve_precision("bfloat16", state_dtype="bfloat16")
    assert P.bytes_per_element(lean, 2) == 14                    # ...everything in bf16
    assert P.bytes_per_element(P.resolve_precision("float64"), 2) == 56
    with pytest.raises(ValueError, match="`slots`"):
        P.bytes_per_element(f32, -1)
    with pytest.raises(TypeError, match="`slots`"):
        P.bytes_per_element(f32, 2.0)
    with pytest.raises(TypeError, match="`precision`"):
        P.bytes_per_element("float32", 2)


# ----------------------------------------------------------- typed arrays


def test_load_gives_the_math_type_exactly():
    x = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    for dtype in (BF16, np.float16):
        stored = x.astype(dtype)
        loaded = P.load(stored)
        assert loaded.dtype == np.float32 and loaded.shape == (3, 5)
        np.testing.assert_array_equal(loaded, stored.astype(np.float32))
    for dtype in (np.float32, np.float64):
        stored = x.astype(dtype)
        loaded = P.load(stored)
        assert loaded.dtype == dtype and loaded is not stored
        np.testing.assert_array_equal(loaded, stored)


def test_store_nearest_writes_in_place_like_a_cast():
    x = (np.random.default_rng(1).normal(size=(4, 6)) * 1000).astype(np.float32)
    for dtype in (BF16, np.float16, np.float32):
        dst = np.zeros((4, 6), dtype)
        P.store_nearest(dst, x)
        np.testing.assert_array_equal(dst.view(np.uint8), x.astype(dtype).view(np.uint8))
    dst = np.zeros(3)
    P.store_nearest(dst, np.array([1.0, 2.0, 3.0]))
    assert dst.tolist() == [1.0, 2.0, 3.0]


def test_store_stochastic_uses_flat_indices_from_start():
    x = np.random.default_rng(2).normal(size=(8, 9)).astype(np.float32)
    dst = np.zeros((8, 9), BF16)
    P.store_stochastic(dst, x, seed=3, step=4, start=100)
    want = P.stochastic_round_to_bf16(x.reshape(-1), 3, 4, np.arange(100, 172))
    np.testing.assert_array_equal(dst.view(np.uint16).reshape(-1), want)
    # A chunked write (what a reference executor does) gives the same bits.
    chunks = np.zeros(72, BF16)
    for start in range(0, 72, 20):
        P.store_stochastic(chunks[start:start + 20], x.reshape(-1)[start:start + 20], 3, 4,
                           start=100 + start)
    np.testing.assert_array_equal(chunks.view(np.uint16), want)


@pytest.mark.parametrize("call, error, match", [
    (lambda: P.store_nearest(np.zeros(3, BF16), np.zeros(3)), TypeError, "`x` must be float32"),
    (lambda: P.store_nearest(np.zeros(3), np.zeros(3, np.float32)), TypeError, "float64"),
    (lambda: P.store_nearest(np.zeros(3, BF16), np.zeros(4, np.float32)), ValueError, "shape"),
    (lambda: P.store_nearest(np.zeros(3, np.int32), np.zeros(3)), TypeError, "`dst`"),
    (lambda: P.store_nearest([0.0], np.zeros(1)), TypeError, "`dst`"),
    (lambda: P.store_stochastic(np.zeros(3, np.float16), np.zeros(3, np.float32), 1, 1),
     TypeError, "bfloat16"),
    (lambda: P.store_stochastic(np.zeros(3, BF16), np.zeros(3, np.float32), -1, 1),
     ValueError, "`seed`"),
    (lambda: P.store_stochastic(np.zeros(3, BF16), np.zeros(3, np.float32), 1, 1.0),
     TypeError, "`step`"),
    (lambda: P.store_stochastic(np.zeros(3, BF16), np.zeros(3, np.float32), 1, 1, 2 ** 64 - 2),
     ValueError, "`start`"),
    (lambda: P.stochastic_round_to_bf16(np.zeros(3), 1, 1, 0), TypeError, "`x`"),
    (lambda: P.stochastic_round_to_bf16(np.zeros(3, np.float32), 1, 1, [-1, 0, 1]),
     ValueError, "`index`"),
    (lambda: P.stochastic_round_to_bf16(np.zeros(3, np.float32), 1, 1, [0.5, 0, 1]),
     TypeError, "`index`"),
    (lambda: P.stochastic_round_to_bf16(np.zeros(3, np.float32), 1, 1, [0, 1]),
     ValueError, "`index`"),
    (lambda: P.bf16_bits_to_float32(np.zeros(3, np.int16)), TypeError, "uint16"),
    (lambda: P.load(np.zeros(3, np.int64)), TypeError, "`array`"),
])
def test_bad_inputs_are_refused_before_writing(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_refused_store_leaves_dst_unchanged():
    dst = np.arange(4, dtype=np.float32).astype(BF16)
    before = dst.copy()
    with pytest.raises(ValueError):
        P.store_stochastic(dst, np.zeros(4, np.float32), 1, 2, start=2 ** 64 - 2)
    np.testing.assert_array_equal(dst.view(np.uint16), before.view(np.uint16))
