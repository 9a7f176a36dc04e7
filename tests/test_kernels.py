"""Kernel-level facts that the model tests do not show directly."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

import reference as ref
from charrnn.kernels import cpu as K


@njit
def _apply_tanh(out, x):
    for i in range(x.shape[0]):
        out[i] = K.tanh(x[i])


def test_float32_tanh_is_within_float32_rounding_of_tanh():
    x = np.linspace(-12, 12, 200_001).astype(np.float32)
    out = np.empty_like(x)
    _apply_tanh(out, x)
    assert np.max(np.abs(out.astype(np.float64) - np.tanh(x.astype(np.float64)))) < 5e-7
    assert np.all(np.abs(out) <= 1.0)


def test_float32_tanh_is_odd():
    x = np.linspace(0, 10, 10_001).astype(np.float32)
    pos, neg = np.empty_like(x), np.empty_like(x)
    _apply_tanh(pos, x)
    _apply_tanh(neg, -x)
    assert np.array_equal(pos, -neg)


def test_float64_tanh_is_libm_tanh():
    x = np.linspace(-5, 5, 1001)
    out = np.empty_like(x)
    _apply_tanh(out, x)
    assert np.allclose(out, np.tanh(x), rtol=1e-15, atol=0)


def test_softmax_cross_entropy_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4]], dtype=np.float32)
    d = np.empty_like(logits)
    total = K.softmax_cross_entropy(d, logits, np.array([1], dtype=np.int32), 1.0)
    assert total == 1e4
    assert np.allclose(d, [[1.0, -1.0, 0.0]])


def test_the_mask_reference_is_splitmix64():
    # the generator's published first outputs for seed 0
    assert [hex(z) for z in ref.splitmix64(0, 3)] == [
        "0xe220a8397b1dcdaf", "0x6e789e6aa1b965f4", "0x6c45d188009454f"]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2 ** 64 - 1), st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 3000),
       st.sampled_from([np.float32, np.float64]))
def test_a_mask_keeps_exactly_the_entries_whose_draw_clears_p_for_any_key_rate_and_size(key, p, n,
                                                                                         dtype):
    mask = np.full(n, np.nan, dtype)
    K.bernoulli_mask(mask, np.uint64(key), p, 2.5)
    kept = ref.splitmix64(key, n) >> np.uint64(32) >= np.uint64(p * 2**32)
    assert np.array_equal(mask, np.where(kept, 2.5, 0.0).astype(dtype))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.25, 0.5, 0.9])
def test_a_mask_keeps_one_minus_p_of_its_entries(p):
    mask = np.empty((50, 32, 384), np.float32)
    K.bernoulli_mask(mask, np.uint64(12345), p, 1.0)
    n = mask.size
    assert abs(mask.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / n) + 1e-12


def test_a_mask_is_the_same_in_any_shape():
    flat, cube = np.empty(6000, np.float32), np.empty((10, 20, 30), np.float32)
    K.bernoulli_mask(flat, np.uint64(7), 0.3, 1.0)
    K.bernoulli_mask(cube, np.uint64(7), 0.3, 1.0)
    assert np.array_equal(flat, cube.reshape(-1))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, np.nan])
def test_a_mask_refuses_a_rate_outside_zero_to_one(p):
    with pytest.raises(ValueError, match="p must lie in"):
        K.bernoulli_mask(np.empty(4, np.float32), np.uint64(0), p, 1.0)


@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_transposes_operands_in_place(trans_a, trans_b, dtype):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 3) if trans_a else (3, 5)).astype(dtype)
    b = rng.standard_normal((4, 5) if trans_b else (5, 4)).astype(dtype)
    out = np.full((3, 4), np.nan, dtype=dtype)
    _matmul(out, a, b, trans_a, trans_b)
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b)
    assert np.allclose(out, want, rtol=1e-5, atol=1e-6)


@njit
def _matmul(out, a, b, trans_a, trans_b):
    K.matmul(out, a, b, trans_a, trans_b)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 25, K.FEW_ROWS, K.FEW_ROWS + 1])
@pytest.mark.parametrize("cols", [1030, 7, 4, 3, 2, 1])
def test_few_rows_product_agrees_with_float64(rows, cols):
    # up to FEW_ROWS rows a @ w.T runs in charrnn's own kernel (tiles of 5x2,
    # leftover pairs, a last odd row clamped into a pair, one row alone;
    # blocks of w), beyond in the BLAS
    rng = np.random.default_rng(rows)
    a = rng.standard_normal((rows, 300)).astype(np.float32)
    w = rng.standard_normal((cols, 300)).astype(np.float32)
    out = np.full((rows, cols), np.nan, dtype=np.float32)
    _matmul(out, a, w, False, True)
    want = a.astype(np.float64) @ w.T.astype(np.float64)
    assert np.max(np.abs(out - want)) < 1e-5 * np.max(np.abs(want))


@settings(max_examples=300, deadline=None)
@given(st.integers(1, K.FEW_ROWS + 3), st.integers(1, 60), st.integers(1, 70), st.integers(0, 2 ** 16))
def test_a_few_rows_times_the_weights_equals_float64_for_any_rows_columns_and_depth(rows, cols, depth,
                                                                                   seed):
    # the few-rows kernel's cuts (5-row tiles, leftover pairs, a clamped odd
    # row, blocks of w) and the hand-over to the BLAS past FEW_ROWS
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, depth)).astype(np.float32)
    w = rng.standard_normal((cols, depth)).astype(np.float32)
    out = np.full((rows, cols), np.nan, dtype=np.float32)
    _matmul(out, a, w, False, True)
    want = a.astype(np.float64) @ w.T.astype(np.float64)
    assert np.max(np.abs(out - want)) <= 1e-5 * max(1.0, np.max(np.abs(want)))


def test_the_blas_in_use_is_named():
    assert K.BLAS in ("mkl", "openblas")


@njit
def _packed_step_product(out, a, w):
    K.step_product(out, a, w, K.packed_weights(w, a.shape[0]))


@njit
def _packed_size(w, rows):
    return K.packed_weights(w, rows).shape[0]


def test_the_recurrent_weights_are_packed_exactly_where_mkl_runs_the_float32_products():
    w = np.ones((8, 4), np.float32)
    assert (_packed_size(w, 3) > 0) == (K.BLAS == "mkl")
    assert _packed_size(w.astype(np.float64), 3) == 0  # the gradient tests' float64: matmul


_NOT_MKL = "the BLAS is OpenBLAS here (MKL not installed: pip install '.[mkl]'; or CHARRNN_BLAS=openblas)"


@pytest.mark.skipif(K.BLAS != "mkl", reason=_NOT_MKL + ": nothing is packed")
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 2 * K.FEW_ROWS), st.integers(1, 90), st.integers(1, 90), st.integers(0, 2 ** 16))
def test_a_packed_step_product_equals_float64_for_any_rows_columns_and_depth(rows, cols, depth, seed):
    # MKL's packed operand, from a buffer whose start is moved to a 64-byte
    # boundary: every size and every place the allocator puts it
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, depth)).astype(np.float32)
    w = rng.standard_normal((cols, depth)).astype(np.float32)
    out = np.full((rows, cols), np.nan, dtype=np.float32)
    _packed_step_product(out, a, w)
    want = a.astype(np.float64) @ w.T.astype(np.float64)
    assert np.max(np.abs(out - want)) <= 1e-5 * max(1.0, np.max(np.abs(want)))


@pytest.mark.skipif(K.BLAS != "mkl", reason=_NOT_MKL + ": nothing is packed")
def test_a_packed_step_product_is_the_same_wherever_its_operands_lie():
    # the same losses for the same seed, run after run, whatever addresses
    # the allocator hands out: every 4-byte offset within a cache line
    rng = np.random.default_rng(0)
    M, D, N = 16, 352, 1408
    a0, w0 = rng.standard_normal((M, D)).astype(np.float32), rng.standard_normal((N, D)).astype(np.float32)

    def placed(x, offset):
        block = np.zeros(x.size + 16, np.float32)
        y = block[offset:offset + x.size].reshape(x.shape)
        y[...] = x
        return y
    results = []
    for offset in range(16):
        out = placed(np.zeros((M, N), np.float32), (3 * offset) % 16)
        _packed_step_product(out, placed(a0, offset), placed(w0, (7 * offset) % 16))
        results.append(out)
    assert all(np.array_equal(results[0], r) for r in results[1:])


@njit
def _step_product_with(out, a, w, packed):
    K.step_product(out, a, w, packed)


@pytest.mark.skipif(K.BLAS != "mkl", reason=_NOT_MKL + ": nothing is packed")
def test_a_step_product_refuses_weights_packed_for_another_shape():
    a, out = np.ones((4, 8), np.float32), np.zeros((4, 6), np.float32)
    wrong = _packed(np.ones((200, 40), np.float32), 4)
    with pytest.raises(ValueError, match="another shape"):
        _step_product_with(out, a, np.ones((6, 8), np.float32), wrong)


@njit
def _packed(w, rows):
    return K.packed_weights(w, rows)


_RECURRENT_AGAINST_FLOAT64 = textwrap.dedent("""
    import numpy as np
    from charrnn.kernels import cpu
    from charrnn.kernels.cells import LN_LSTM, LSTM, saved_width
    T, B, H = 7, 6, 12
    def window(cell, dt):
        rng = np.random.default_rng(cell)
        f = lambda *s: (rng.standard_normal(s) * 0.5).astype(dt)
        S = saved_width("lstm", H, cell == LN_LSTM)
        xp, w, b, dh_out = f(T, B, 4 * H), f(4 * H, H), f(4 * H), f(T, B, H)
        norm = np.ones((2, 5 * H) if cell == LN_LSTM else (2, 1), dt)
        one, z = np.ones((1, 1, 1), dt), np.zeros((T, 1, 1), dt)
        hs, cs, gates = np.zeros((T + 1, B, H), dt), np.zeros((T + 1, B, H), dt), np.zeros((T, B, 4 * H), dt)
        saved = np.zeros((T, B, S), dt)
        cpu.recurrent_forward(cell, xp, w, b, norm, one, (np.zeros((1, 1), dt), z, z), hs, cs, gates,
                              saved, np.zeros((B, 4 * H), dt))
        dxp, dw, db = np.zeros_like(xp), np.zeros_like(w), np.zeros_like(b)
        mult = (np.zeros((1, 1), dt), z, z, z, np.zeros((1, 1), dt), np.zeros((1, 1), dt))
        cpu.recurrent_backward(cell, dh_out, np.ascontiguousarray(w.T), norm, one, mult, xp, hs, cs,
                               gates, saved, dxp, dxp, np.zeros((B, H), dt), np.zeros((B, H), dt), dw,
                               db, np.zeros_like(norm))
        return hs, dxp, dw
    for cell in (LSTM, LN_LSTM):
        for got, want in zip(window(cell, np.float32), window(cell, np.float64)):
            assert np.max(np.abs(got - want)) < 1e-5 * max(1.0, np.max(np.abs(want))), cell
    print(cpu.BLAS)
""")


@pytest.mark.parametrize("blas", ["openblas", "auto"])
def test_the_recurrent_kernels_agree_with_float64_whichever_blas_runs_them(blas):
    # in a fresh process, since the BLAS is bound at import: OpenBLAS (the
    # few-rows kernel runs the step products) even where MKL is installed,
    # and MKL's packed products where it is
    if blas == "auto" and K.BLAS != "mkl":
        pytest.skip(_NOT_MKL)
    r = subprocess.run([sys.executable, "-c", _RECURRENT_AGAINST_FLOAT64], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "CHARRNN_BLAS": blas})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["openblas" if blas == "openblas" else "mkl"]
