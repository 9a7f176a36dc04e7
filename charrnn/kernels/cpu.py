"""CPU kernels: pure Numba functions on preallocated arrays.

Every array is time-major, ``[T, B, ...]``, so one time step is a contiguous
``[B, ...]`` block and a whole window reshapes to ``[T*B, ...]`` for GEMMs.
Gate blocks follow PyTorch: LSTM ``(i, f, g, o)``, GRU ``(r, z, n)``.

All matrix products run inside Numba (SciPy's BLAS) so that one BLAS thread
pool is in play. Kernels are generic over float32 / float64: the library runs
float32, the gradient tests run the training kernels in float64.

Nothing here imports the rest of charrnn but the cell table (cells.py):
Numba's cache does not notice edits to helpers in other modules, so a kernel
and its helpers live together.
"""
import ctypes
import ctypes.util
import glob
import os
import sys

import llvmlite.binding as llvm
import numpy as np
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic, overload

from .cells import GATES, GRU, LN_EPS, LN_LSTM, LSTM, RNN_RELU, RNN_TANH  # noqa: F401  (the cell ids)

# fastmath without nnan/ninf: those would delete the isfinite checks on losses.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# nogil: training shards run the kernels from several threads at once.
_JIT = dict(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
# Overloads compile inside their callers, whose cached code holds them; a
# cache of their own would be placed when first called, outside the cache
# directory that kernels/__init__.py chooses at import.
_INLINED = {k: v for k, v in _JIT.items() if k != "cache"}
# Kernels compiled without fastmath: the layer norm's and the time loops that
# call the cells. With fastmath, the LN-LSTM's gradients from a cold kernel
# cache differed from a warm cache's (by 1e-8, so the losses of two runs of
# one seed drifted apart): how LLVM orders and fuses that arithmetic depended
# on whether it was compiled into its caller there and then or loaded from
# the cache. Without fastmath no order changes; eight partial sums (_dot),
# which the compiler may run as one vector but never reorders, keep the sums
# over units fast. The time loops do no arithmetic of their own.
_EXACT = dict(cache=True, nogil=True, error_model="numpy")

_ONE = np.float32(1.0)
_HALF = np.float32(0.5)


def tanh(x):
    """tanh: exact in float64; in float32 a rational minimax form that LLVM
    can vectorise (Numba has no SVML, so np.tanh would be a scalar libm call).
    Max abs error ~3e-7, i.e. float32 round-off (tested)."""
    return np.tanh(x)


@overload(tanh, jit_options=_INLINED)
def _tanh_impl(x):
    if isinstance(x, types.Float) and x.bitwidth == 32:
        return _tanh_f32
    return lambda x: np.tanh(x)


# Eigen's float tanh: odd 13/6 rational fit on [-7.9, 7.9], where float32 tanh saturates.
_CLAMP = np.float32(7.90531110763549805)
_A1, _A3, _A5, _A7 = (np.float32(4.89352455891786e-03), np.float32(6.37261928875436e-04),
                      np.float32(1.48572235717979e-05), np.float32(5.12229709037114e-08))
_A9, _A11, _A13 = (np.float32(-8.60467152213735e-11), np.float32(2.00018790482477e-13),
                   np.float32(-2.76076847742355e-16))
_B0, _B2, _B4, _B6 = (np.float32(4.89352518554385e-03), np.float32(2.26843463243900e-03),
                      np.float32(1.18534705686654e-04), np.float32(1.19825839466702e-06))


def _tanh_f32(x):
    x = max(-_CLAMP, min(_CLAMP, x))
    x2 = x * x
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    return x * p / q


@njit(**_JIT)
def _sigmoid(x):
    # through tanh, so that it vectorises too
    return _HALF * tanh(_HALF * x) + _HALF


# --------------------------------------------------------------------- BLAS
# float32 GEMMs call the C symbol ``charrnn_sgemm`` (cblas_sgemm's signature),
# bound at import to MKL's cblas_sgemm when ``charrnn[mkl]`` is installed, else
# to a shim over np.dot (SciPy's OpenBLAS). The compiled kernels are the same
# either way, so Numba's cache stays valid when the BLAS changes.

_ROW_MAJOR, _NO_TRANS, _TRANS = np.int32(101), np.int32(111), np.int32(112)
_i32, _f32, _u64 = types.int32, types.float32, types.uint64
_sgemm = types.ExternalFunction("charrnn_sgemm", types.void(
    _i32, _i32, _i32, _i32, _i32, _i32, _f32, _u64, _i32, _u64, _i32, _f32, _u64, _i32))
_fp = types.CPointer(types.float32)


@cfunc(types.void(_i32, _i32, _i32, _i32, _i32, _i32, _f32, _fp, _i32, _fp, _i32, _f32, _fp, _i32),
       cache=True)
def _sgemm_numpy(layout, trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc):
    """cblas_sgemm for what matmul asks: row-major, dense, alpha 1, beta 0."""
    c = carray(C, (M, N))
    if trans_a == _TRANS:
        a = carray(A, (K, M))
        if trans_b == _TRANS:
            np.dot(a.T, carray(B, (N, K)).T, c)
        else:
            np.dot(a.T, carray(B, (K, N)), c)
    else:
        a = carray(A, (M, K))
        if trans_b == _TRANS:
            np.dot(a, carray(B, (N, K)).T, c)
        else:
            np.dot(a, carray(B, (K, N)), c)


def _mkl_library(symbols):
    """libmkl_rt from the environment (PyPI's ``mkl``), if it has every one
    of ``symbols`` (an MKL older than 2017 lacks the packed GEMM), unless
    CHARRNN_BLAS=openblas."""
    if os.environ.get("CHARRNN_BLAS", "auto") == "openblas":
        return None
    found = sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    path = found[0] if found else ctypes.util.find_library("mkl_rt")
    if not path:
        return None
    try:
        library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return None
    return library if all(hasattr(library, name) for name in symbols) else None


# MKL's packed GEMM: the recurrent weights packed once per window (into MKL's
# own layout), then the window's T per-step products read the packed copy.
# At 16 rows (a two-thread shard of B=32) it ran 1.6-1.9x the few-rows
# kernel's rate on a 2.0 GHz Xeon (README, "Benchmarks"). Without MKL the
# symbols are bound to stand-ins: a packed size of 0, so nothing is packed
# and matmul runs the per-step products.
_PACK_B, _PACKED = np.int32(162), np.int32(151)  # CblasBMatrix, CblasPacked
_PACK_HEAD = 16  # floats ahead of MKL's packed data (64 bytes): the product's rows, N and K
_sgemm_pack_size = types.ExternalFunction("charrnn_sgemm_pack_get_size",
                                          types.uint64(_i32, _i32, _i32, _i32))
_sgemm_pack = types.ExternalFunction("charrnn_sgemm_pack", types.void(
    _i32, _i32, _i32, _i32, _i32, _i32, _f32, _u64, _i32, _u64))
_sgemm_compute = types.ExternalFunction("charrnn_sgemm_compute", types.void(
    _i32, _i32, _i32, _i32, _i32, _i32, _u64, _i32, _u64, _i32, _f32, _u64, _i32))


@cfunc(types.uint64(_i32, _i32, _i32, _i32), cache=True)
def _no_pack_size(identifier, M, N, K):
    return 0


@cfunc(types.void(_i32, _i32, _i32, _i32, _i32, _i32, _f32, _u64, _i32, _u64), cache=True)
def _no_pack(layout, identifier, trans, M, N, K, alpha, src, ld, dest):
    pass  # never called: nothing is packed without MKL


@cfunc(types.void(_i32, _i32, _i32, _i32, _i32, _i32, _u64, _i32, _u64, _i32, _f32, _u64, _i32),
       cache=True)
def _no_compute(layout, trans_a, trans_b, M, N, K, A, lda, B, ldb, beta, C, ldc):
    pass  # never called: nothing is packed without MKL


_BOUND = {"charrnn_sgemm": ("cblas_sgemm", _sgemm_numpy),
          "charrnn_sgemm_pack_get_size": ("cblas_sgemm_pack_get_size", _no_pack_size),
          "charrnn_sgemm_pack": ("cblas_sgemm_pack", _no_pack),
          "charrnn_sgemm_compute": ("cblas_sgemm_compute", _no_compute)}
_MKL = _mkl_library([name for name, _ in _BOUND.values()] + ["MKL_Set_Num_Threads_Local"])
for _symbol, (_mkl_name, _stand_in) in _BOUND.items():
    llvm.add_symbol(_symbol, ctypes.cast(getattr(_MKL, _mkl_name), ctypes.c_void_p).value
                    if _MKL is not None else _stand_in.address)
BLAS = "mkl" if _MKL is not None else "openblas"  # which library the float32 GEMMs use


def one_blas_thread_here():
    """Single-threaded GEMMs for the calling thread, which runs a training
    shard. OpenBLAS's count is global (threadpoolctl sets it); MKL's is kept
    per thread, so a new thread must set its own."""
    if _MKL is not None:
        _MKL.MKL_Set_Num_Threads_Local(1)


FEW_ROWS = 32  # up to here _few_rows_times_weights beats MKL and OpenBLAS (measured)


_W_BLOCK = 20  # rows of w per block (a multiple of both tile widths, 2 and 5)


@njit(inline="always", **_JIT)
def _dots_5x2(out, x, y, i, j):
    """out[i+r, j+c] = x[i+r] . y[j+c] for r < 5, c < 2: ten dot products
    sharing their loads (7 vector loads per 10 FMAs, 10 accumulators in
    registers). An index past the end is clamped to the last row: that
    product is recomputed and written twice with the same value."""
    I, J = x.shape[0] - 1, y.shape[0] - 1
    i0, i1, i2, i3, i4 = min(i, I), min(i + 1, I), min(i + 2, I), min(i + 3, I), min(i + 4, I)
    j0, j1 = min(j, J), min(j + 1, J)
    x0, x1, x2, x3, x4, y0, y1 = x[i0], x[i1], x[i2], x[i3], x[i4], y[j0], y[j1]
    s00 = s01 = s10 = s11 = s20 = s21 = s30 = s31 = s40 = s41 = out.dtype.type(0)
    for k in range(x.shape[1]):
        s00 += x0[k] * y0[k]
        s01 += x0[k] * y1[k]
        s10 += x1[k] * y0[k]
        s11 += x1[k] * y1[k]
        s20 += x2[k] * y0[k]
        s21 += x2[k] * y1[k]
        s30 += x3[k] * y0[k]
        s31 += x3[k] * y1[k]
        s40 += x4[k] * y0[k]
        s41 += x4[k] * y1[k]
    out[i0, j0], out[i0, j1], out[i1, j0], out[i1, j1] = s00, s01, s10, s11
    out[i2, j0], out[i2, j1], out[i3, j0], out[i3, j1] = s20, s21, s30, s31
    out[i4, j0], out[i4, j1] = s40, s41


@njit(inline="always", **_JIT)
def _one_row_times_weights(out, a, w):
    """out = a @ w.T for one row of ``a`` (sampling one stream): four dot
    products per pass over it (+20% over one at a time)."""
    a0, N, J = a[0], out.shape[1], out.shape[1] - 1
    for n in range(0, N, 4):
        j0, j1, j2, j3 = n, min(n + 1, J), min(n + 2, J), min(n + 3, J)
        w0, w1, w2, w3 = w[j0], w[j1], w[j2], w[j3]
        s0 = s1 = s2 = s3 = out.dtype.type(0)
        for k in range(a.shape[1]):
            s0 += a0[k] * w0[k]
            s1 += a0[k] * w1[k]
            s2 += a0[k] * w2[k]
            s3 += a0[k] * w3[k]
        out[0, j0], out[0, j1], out[0, j2], out[0, j3] = s0, s1, s2, s3


@njit(**_JIT)
def _few_rows_times_weights(out, a, w):
    """out = a @ w.T for a few rows of ``a`` ([M,K], w [N,K]): the per-step
    products of a training shard and of sampling. A BLAS packs ``w`` on every
    call, which at so few rows costs about as much as the product; here tiles
    of 5 rows of ``a`` x 2 rows of ``w`` run near the core's FMA peak. Blocks
    of ``w`` are read from L3 once for all M rows. The M % 5 leftover rows go
    in pairs through the same tile with the roles swapped (5 rows of ``w`` x
    2 rows of ``a``, written through out.T); an odd last one is clamped into
    its pair, computed twice at the tile's rate (a row of its own ran at a
    quarter of it: M=16, a two-thread shard of B=32, went from 39 to 47
    GFLOP/s). One core, GFLOP/s at M=4 / M=25 (N=2048, K=512): MKL 13 / 24,
    OpenBLAS 12 / 13, this 31 / 30-35, about MKL's rate on large GEMMs."""
    M, N = out.shape
    if M == 1:
        _one_row_times_weights(out, a, w)
        return
    M5 = M - M % 5
    for n0 in range(0, N, _W_BLOCK):
        n1 = min(n0 + _W_BLOCK, N)
        for m in range(0, M5, 5):
            for n in range(n0, n1, 2):
                _dots_5x2(out, a, w, m, n)
        for m in range(M5, M, 2):
            for n in range(n0, n1, 5):
                _dots_5x2(out.T, w, a, n, m)


@njit(inline="always", **_JIT)
def _check_product(out, a, b, trans_a, trans_b):
    """Refuse operands whose shapes do not make out = op(a) @ op(b), rather
    than read one as another shape."""
    M, K = (a.shape[1], a.shape[0]) if trans_a else (a.shape[0], a.shape[1])
    Kb, N = (b.shape[1], b.shape[0]) if trans_b else (b.shape[0], b.shape[1])
    if K != Kb or out.shape[0] != M or out.shape[1] != N:
        raise ValueError("matmul: the shapes of out, a and b do not make out = op(a) @ op(b)")


def matmul(out, a, b, trans_a, trans_b):
    """out = op(a) @ op(b), op transposing where its flag is set; every array
    C-contiguous (a transposed operand is read in place, never copied)."""


@overload(matmul, jit_options=_INLINED)
def _matmul_impl(out, a, b, trans_a, trans_b):
    if out.dtype == types.float32:
        def sgemm(out, a, b, trans_a, trans_b):
            M, N = out.shape
            K = a.shape[0] if trans_a else a.shape[1]
            _check_product(out, a, b, trans_a, trans_b)
            if M <= FEW_ROWS and trans_b and not trans_a:
                _few_rows_times_weights(out, a, b)
                return
            _sgemm(_ROW_MAJOR, _TRANS if trans_a else _NO_TRANS, _TRANS if trans_b else _NO_TRANS,
                   np.int32(M), np.int32(N), np.int32(K), np.float32(1.0),
                   a.ctypes.data, np.int32(a.shape[1]), b.ctypes.data, np.int32(b.shape[1]),
                   np.float32(0.0), out.ctypes.data, np.int32(N))
        return sgemm

    def dgemm(out, a, b, trans_a, trans_b):  # float64 (gradient checks): NumPy's dot
        _check_product(out, a, b, trans_a, trans_b)
        if trans_a and trans_b:
            np.dot(a.T, b.T, out)
        elif trans_a:
            np.dot(a.T, b, out)
        elif trans_b:
            np.dot(a, b.T, out)
        else:
            np.dot(a, b, out)
    return dgemm


def packed_weights(w, rows):
    """``w`` [N,K] packed for the products out = a @ w.T of ``rows`` rows
    that a window repeats at every step (MKL's packed B operand); an empty
    array where nothing is packed (no MKL, or float64): then
    step_product runs matmul."""


@overload(packed_weights, jit_options=_INLINED)
def _packed_weights_impl(w, rows):
    if w.dtype != types.float32:
        return lambda w, rows: np.empty(0, w.dtype)

    def pack(w, rows):
        N, K = w.shape
        size = _sgemm_pack_size(_PACK_B, np.int32(rows), np.int32(N), np.int32(K))
        if size == 0:
            return np.empty(0, np.float32)
        # MKL's packed layout is tied to its address: a 64-byte aligned
        # start, the same in every run (where the operands lie does not
        # change the products: tested); ahead of it the product's shape,
        # which the opaque layout does not tell
        n = _PACK_HEAD + size // 4 + 1
        buf = np.empty(n + 16, np.float32)
        start = ((64 - buf.ctypes.data % 64) % 64) // 4
        packed = buf[start:start + n]
        packed[0], packed[1], packed[2] = rows, N, K
        _sgemm_pack(_ROW_MAJOR, _PACK_B, _TRANS, np.int32(rows), np.int32(N), np.int32(K),
                    np.float32(1.0), w.ctypes.data, np.int32(K), packed[_PACK_HEAD:].ctypes.data)
        return packed
    return pack


@njit(inline="always", **_JIT)
def step_product(out, a, w, packed):
    """out = a @ w.T, one step's recurrent product: from ``packed``
    (packed_weights of w, for out's rows) when it holds w, else matmul."""
    if packed.shape[0] == 0:
        matmul(out, a, w, False, True)
        return
    _check_product(out, a, w, False, True)
    M, N = out.shape
    if packed[0] != M or packed[1] != N or packed[2] != a.shape[1]:
        raise ValueError("step_product: packed holds weights packed for another shape")
    _sgemm_compute(_ROW_MAJOR, _NO_TRANS, _PACKED, np.int32(M), np.int32(N), np.int32(a.shape[1]),
                   a.ctypes.data, np.int32(a.shape[1]), packed[_PACK_HEAD:].ctypes.data,
                   np.int32(a.shape[1]), np.float32(0.0), out.ctypes.data, np.int32(N))


# ------------------------------------------------------------- array moves
# The model allocates and moves arrays through these, so the same
# orchestration drives host arrays here and device arrays in cuda.py.

def zeros(shape, dtype=np.float32):
    """A new zeroed array."""
    return np.zeros(shape, dtype)


def put(dst, src):
    """dst[...] = src (src: a host array or a number)."""
    dst[...] = src


def get(a):
    """``a`` as a host array (here it already is one: no copy)."""
    return a


def transpose(out, a):
    """out = a.T (both C-contiguous)."""
    np.copyto(out, a.T)


# ---------------------------------------------------------------- input side

@njit(**_JIT)
def embedding_forward(out, table, ids, bias):
    """out[n] = table[ids[n]] + bias.   out [N,D], table [V,D], ids [N], bias [D]

    The embedding lookup, and also the one-hot input projection: with
    ``table = weight_ih_l0.T`` a one-hot GEMM is just this row gather.
    """
    for n in range(ids.shape[0]):
        row = table[ids[n]]
        o = out[n]
        for d in range(o.shape[0]):
            o[d] = row[d] + bias[d]


@njit(**_JIT)
def embedding_backward(dtable, dbias, dout, ids):
    """Scatter-add of embedding_forward's gradient (overwrites dtable, dbias)."""
    dtable[:] = 0
    dbias[:] = 0
    for n in range(ids.shape[0]):
        row = dtable[ids[n]]
        g = dout[n]
        for d in range(g.shape[0]):
            row[d] += g[d]
            dbias[d] += g[d]


@njit(**_JIT)
def linear_forward(out, x, w, b):
    """out = x @ w.T + b.   out [N,O], x [N,I], w [O,I] (PyTorch layout), b [O]"""
    matmul(out, x, w, False, True)
    for n in range(out.shape[0]):
        o = out[n]
        for k in range(o.shape[0]):
            o[k] += b[k]


@njit(**_JIT)
def linear_backward(dx, dw, db, dout, x, w):
    """Gradients of linear_forward, each overwritten: the weight gradient is
    one GEMM over all N = T*B rows of the window."""
    matmul(dx, dout, w, False, False)
    matmul(dw, dout, x, True, False)
    column_sum(db, dout)


@njit(**_JIT)
def column_sum(out, a):
    """out[k] = sum_n a[n, k]  (bias gradients)."""
    out[:] = 0
    for n in range(a.shape[0]):
        row = a[n]
        for k in range(out.shape[0]):
            out[k] += row[k]


@njit(**_JIT)
def apply_dropout(out, x, mask):
    """out = x * mask. Inverted dropout: mask holds 0 or 1/(1-p), so the same
    product is both the forward pass and its gradient."""
    xf = x.reshape(-1)
    mf = mask.reshape(-1)
    of = out.reshape(-1)
    for k in range(of.shape[0]):
        of[k] = xf[k] * mf[k]


# The regularisers' masks: counter-based draws. Entry i of a mask is decided
# by output i of SplitMix64 (Steele, Lea & Flood 2014) seeded with the
# mask's key, which needs no state from entry to entry: one pass, vectorised,
# and the same draws wherever a mask is cut (shards, MPI ranks).
_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@njit(**_JIT)
def bernoulli_mask(out, key, p, value):
    """out[i] = ``value`` with probability 1 - ``p``, else 0 (flat order),
    independently: kept where the high 32 bits of SplitMix64's output i
    for seed ``key`` (uint64) are at least floor(p * 2^32)."""
    if not 0.0 <= p < 1.0:
        raise ValueError("bernoulli_mask: p must lie in [0, 1)")
    threshold = np.uint64(p * 4294967296.0)
    kept = out.dtype.type(value)
    of = out.reshape(-1)
    for i in range(of.shape[0]):
        z = key + np.uint64(i + 1) * _GOLDEN_GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        z = z ^ (z >> np.uint64(31))
        of[i] = kept if (z >> np.uint64(32)) >= threshold else out.dtype.type(0)


# ------------------------------------------------------ cell equations (rows)
# One row = one batch element at one time step. xp: input projection
# (x W_ih^T + b_ih), gh: recurrent projection (h W_hh^T), both [G*H].

@njit(inline="always", **_JIT)
def _share(update, j):
    """The share of unit j's new cell value the cell takes: update [H], or
    [1] for one share for every unit (cpu.recurrent_forward's ``update``)."""
    return update[j] if update.shape[0] != 1 else update[0]


@njit(inline="always", **_JIT)
def _zoned(c_prev, new, u):
    """Zoneout (Krueger et al. 2017): the cell takes the share u of its new
    value, c = c_prev + u*(new - c_prev); exactly the new value for u = 1
    (no zoneout) and exactly the old one for u = 0 (held)."""
    return new if u == _ONE else c_prev + u * (new - c_prev)


@njit(**_JIT)
def lstm_cell_forward(xp, gh, b_hh, update, c_prev, gates, c, h):
    """i,f,o = sigmoid, g = tanh;  c = f*c_prev + i*g (zoned out: _zoned);
    h = o*tanh(c)"""
    H = c.shape[0]
    for j in range(H):
        i = _sigmoid(xp[j] + gh[j] + b_hh[j])
        f = _sigmoid(xp[H + j] + gh[H + j] + b_hh[H + j])
        g = tanh(xp[2 * H + j] + gh[2 * H + j] + b_hh[2 * H + j])
        o = _sigmoid(xp[3 * H + j] + gh[3 * H + j] + b_hh[3 * H + j])
        cj = _zoned(c_prev[j], f * c_prev[j] + i * g, _share(update, j))
        gates[j] = i
        gates[H + j] = f
        gates[2 * H + j] = g
        gates[3 * H + j] = o
        c[j] = cj
        h[j] = o * tanh(cj)


@njit(**_JIT)
def lstm_cell_backward(dh_out, dh_rec, gates, update, c_prev, c, dc, dxp):
    """dc carries dL/dc from step t+1 in and dL/dc_prev out."""
    H = c.shape[0]
    for j in range(H):
        dh = dh_out[j] + dh_rec[j]
        i = gates[j]
        f = gates[H + j]
        g = gates[2 * H + j]
        o = gates[3 * H + j]
        u = _share(update, j)
        tc = tanh(c[j])
        dcj = dc[j] + dh * o * (_ONE - tc * tc)
        dnew = dcj * u  # dL/d(f*c_prev + i*g)
        dxp[j] = dnew * g * i * (_ONE - i)
        dxp[H + j] = dnew * c_prev[j] * f * (_ONE - f)
        dxp[2 * H + j] = dnew * i * (_ONE - g * g)
        dxp[3 * H + j] = dh * tc * o * (_ONE - o)
        dc[j] = dcj * (_ONE - u) + dnew * f


@njit(**_EXACT)
def _dot(a, b):
    """sum_j a[j] * b[j] (b None: sum_j a[j]) in a fixed order."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = a.dtype.type(0)
    n, n8 = a.shape[0], a.shape[0] - a.shape[0] % 8
    for j in range(0, n8, 8):
        if b is None:
            s0, s1, s2, s3 = s0 + a[j], s1 + a[j + 1], s2 + a[j + 2], s3 + a[j + 3]
            s4, s5, s6, s7 = s4 + a[j + 4], s5 + a[j + 5], s6 + a[j + 6], s7 + a[j + 7]
        else:
            s0, s1, s2, s3 = (s0 + a[j] * b[j], s1 + a[j + 1] * b[j + 1],
                              s2 + a[j + 2] * b[j + 2], s3 + a[j + 3] * b[j + 3])
            s4, s5, s6, s7 = (s4 + a[j + 4] * b[j + 4], s5 + a[j + 5] * b[j + 5],
                              s6 + a[j + 6] * b[j + 6], s7 + a[j + 7] * b[j + 7])
    for j in range(n8, n):
        s0 += a[j] if b is None else a[j] * b[j]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(**_EXACT)
def layer_norm_forward(x, gain, bias, xhat):
    """xhat = (x - mean x) / sqrt(var x + eps), x = gain * xhat + bias (in
    place, over one block of units); returns the inverse deviation."""
    inv_n = x.dtype.type(1.0 / x.shape[0])  # in x's precision: float32 stays float32
    mean = _dot(x, None) * inv_n
    for j in range(x.shape[0]):
        xhat[j] = x[j] - mean
    rstd = _ONE / np.sqrt(_dot(xhat, xhat) * inv_n + x.dtype.type(LN_EPS))
    for j in range(x.shape[0]):
        xhat[j] *= rstd
        x[j] = gain[j] * xhat[j] + bias[j]
    return rstd


@njit(**_EXACT)
def layer_norm_backward(dy, gain, xhat, rstd, dgain, dbias):
    """From dy = dL/d(layer_norm_forward's output) to dL/dx, in place in
    dy; dgain, dbias accumulate."""
    inv_n = dy.dtype.type(1.0 / dy.shape[0])
    for j in range(dy.shape[0]):
        dgain[j] += dy[j] * xhat[j]
        dbias[j] += dy[j]
        dy[j] *= gain[j]  # now dL/dxhat
    m1, m2 = _dot(dy, None) * inv_n, _dot(dy, xhat) * inv_n
    for j in range(dy.shape[0]):
        dy[j] = rstd * (dy[j] - m1 - xhat[j] * m2)


@njit(**_EXACT)
def ln_lstm_cell_forward(xp, gh, b_hh, norm, update, c_prev, gates, saved, c, h):
    """The LSTM with layer normalisation (Ba, Kiros & Hinton 2016): each
    gate block's pre-activation a_q and the cell c normalised over the H
    units, then scaled and shifted (norm [2, 5H]: gains, biases; blocks i,
    f, g, o, then c):  i,f,o = sigmoid(LN(a)), g = tanh(LN(a_g));
    c = f*c_prev + i*g (zoned out: _zoned);  h = o*tanh(LN(c)).
    saved [5H+5]: the normalised a [4H] and c [H], their inverse deviations."""
    H = c.shape[0]
    a = gates  # the pre-activations, normalised in place, then the gates
    for j in range(4 * H):
        a[j] = xp[j] + gh[j] + b_hh[j]
    for q in range(4):
        blk = slice(q * H, (q + 1) * H)
        saved[5 * H + q] = layer_norm_forward(a[blk], norm[0, blk], norm[1, blk], saved[blk])
    for j in range(H):
        i = _sigmoid(a[j])
        f = _sigmoid(a[H + j])
        g = tanh(a[2 * H + j])
        a[j], a[H + j], a[2 * H + j] = i, f, g
        a[3 * H + j] = _sigmoid(a[3 * H + j])
        c[j] = _zoned(c_prev[j], f * c_prev[j] + i * g, _share(update, j))
        h[j] = c[j]
    cb = slice(4 * H, 5 * H)
    saved[5 * H + 4] = layer_norm_forward(h, norm[0, cb], norm[1, cb], saved[cb])
    for j in range(H):
        h[j] = a[3 * H + j] * tanh(h[j])


@njit(**_EXACT)
def ln_lstm_cell_backward(dh_out, dh_rec, norm, gates, saved, update, c_prev, dc, dxp, dnorm):
    """The gradient of ln_lstm_cell_forward; dc carries dL/dc from step
    t+1 in and dL/dc_prev out, dnorm accumulates."""
    H = c_prev.shape[0]
    gc, bc = norm[0, 4 * H:], norm[1, 4 * H:]
    dcn = dxp[2 * H:3 * H]  # scratch: dL/d(the normalised, scaled cell)
    for j in range(H):
        dh = dh_out[j] + dh_rec[j]
        o = gates[3 * H + j]
        tc = tanh(gc[j] * saved[4 * H + j] + bc[j])
        dxp[3 * H + j] = dh * tc * o * (_ONE - o)
        dcn[j] = dh * o * (_ONE - tc * tc)
    layer_norm_backward(dcn, gc, saved[4 * H:5 * H], saved[5 * H + 4],
                        dnorm[0, 4 * H:], dnorm[1, 4 * H:])
    for j in range(H):
        i = gates[j]
        f = gates[H + j]
        g = gates[2 * H + j]
        u = _share(update, j)
        dcj = dc[j] + dcn[j]
        dnew = dcj * u  # dL/d(f*c_prev + i*g)
        dxp[j] = dnew * g * i * (_ONE - i)
        dxp[H + j] = dnew * c_prev[j] * f * (_ONE - f)
        dxp[2 * H + j] = dnew * i * (_ONE - g * g)
        dc[j] = dcj * (_ONE - u) + dnew * f
    for q in range(4):
        blk = slice(q * H, (q + 1) * H)
        layer_norm_backward(dxp[blk], norm[0, blk], saved[blk], saved[5 * H + q],
                            dnorm[0, blk], dnorm[1, blk])


@njit(**_JIT)
def gru_cell_forward(xp, gh, b_hh, h_prev, gates, hn, h):
    """r,z = sigmoid;  n = tanh(x_n + r*(W_hn h + b_hn));  h = (1-z)*n + z*h_prev"""
    H = h.shape[0]
    for j in range(H):
        r = _sigmoid(xp[j] + gh[j] + b_hh[j])
        z = _sigmoid(xp[H + j] + gh[H + j] + b_hh[H + j])
        hnj = gh[2 * H + j] + b_hh[2 * H + j]
        n = tanh(xp[2 * H + j] + r * hnj)
        gates[j] = r
        gates[H + j] = z
        gates[2 * H + j] = n
        hn[j] = hnj
        h[j] = (_ONE - z) * n + z * h_prev[j]


@njit(**_JIT)
def gru_cell_backward(dh_out, dh_rec, gates, hn, h_prev, dh_z, dxp, dgh):
    """dh_z carries z*dh, the direct path to h_prev, from step t+1 in and out.
    Unlike the other cells the recurrent gradient dgh differs from dxp in the
    n block, because r multiplies W_hn h + b_hn."""
    H = h_prev.shape[0]
    for j in range(H):
        dh = dh_out[j] + dh_rec[j] + dh_z[j]
        r = gates[j]
        z = gates[H + j]
        n = gates[2 * H + j]
        dn = dh * (_ONE - z) * (_ONE - n * n)
        dr = dn * hn[j] * r * (_ONE - r)
        dz = dh * (h_prev[j] - n) * z * (_ONE - z)
        dxp[j] = dr
        dxp[H + j] = dz
        dxp[2 * H + j] = dn
        dgh[j] = dr
        dgh[H + j] = dz
        dgh[2 * H + j] = dn * r
        dh_z[j] = dh * z


@njit(**_JIT)
def rnn_cell_forward(xp, gh, b_hh, relu, h):
    """h = tanh(x W_ih^T + b_ih + h W_hh^T + b_hh)  (or relu)"""
    for j in range(h.shape[0]):
        a = xp[j] + gh[j] + b_hh[j]
        if relu:
            h[j] = a if a > 0 else 0
        else:
            h[j] = tanh(a)


@njit(**_JIT)
def rnn_cell_backward(dh_out, dh_rec, h, relu, dxp):
    for j in range(h.shape[0]):
        dh = dh_out[j] + dh_rec[j]
        if relu:
            dxp[j] = dh if h[j] > 0 else 0
        else:
            dxp[j] = dh * (_ONE - h[j] * h[j])


# ------------------------------------------------------- time loops (layers)

@njit(**_JIT)
def multiplicative_forward(m, xp, mh):
    """The multiplicative LSTM's intermediate state (Krause et al. 2016),
    m = (W_mx x + b_mx) * (W_mh h), which takes h's place in the recurrent
    product: xp [B, G*H + H] ends with the first factor, mh [B,H] is the
    second."""
    B, H = m.shape
    GH = xp.shape[1] - H
    for b in range(B):
        for j in range(H):
            m[b, j] = xp[b, GH + j] * mh[b, j]


@njit(**_JIT)
def multiplicative_backward(dm, xp, mh, dxp, dmh):
    """The gradient of multiplicative_forward from dm = dL/dm [B,H]: into
    the last H columns of dxp (W_mx x + b_mx) and into dmh (W_mh h)."""
    B, H = dm.shape
    GH = xp.shape[1] - H
    for b in range(B):
        for j in range(H):
            dxp[b, GH + j] = dm[b, j] * mh[b, j]
            dmh[b, j] = dm[b, j] * xp[b, GH + j]


@njit(inline="always", **_JIT)
def _is_multiplicative(xp, w_hh):
    """Whether a layer is multiplicative: its input projection xp [.., G*H + H]
    carries W_mx x + b_mx after the gates' G*H columns (w_hh [G*H, H])."""
    return xp.shape[-1] != w_hh.shape[0]


@njit(**_EXACT)
def recurrent_step(cell, xp, w_hh, b_hh, norm, update, mult, h_in, c_in, gates, saved, gh, h_out, c_out, j0,
                   packed):
    """One time step of one layer for B streams: one GEMM gh = h_in W_hh^T,
    then one fused pass over the gates, row by row.

    h_in, c_in [B,H]   the state in (c_in: LSTM only)
    xp [B,G*Hr(+H)], gates, gh [B,G*Hr]: the input projection, the saved gates
    saved [B,S]: what the cell keeps for backward (cells.saved_width)
    w_hh [G*Hr,H], b_hh [G*Hr]: the rows of hidden units j0:j0+Hr
    norm [2,5H]: LN-LSTM's gains and biases (others: a stand-in)
    update [B,H] or [1,1]: the LSTM's share of each new cell value (zoneout)
    mult = (w_mh [H,H], mh, m [B,H]): a multiplicative layer's (xp then has
        H more columns, W_mx x + b_mx): the recurrent product reads
        m = (W_mx x + b_mx) * (h_in W_mh^T) instead of h_in
        (multiplicative_forward); mh and m are written. Others: stand-ins.
    h_out, c_out [B,H] hidden units j0:j0+Hr written
    Training runs all units (j0 = 0, Hr = H); a sampling rank its share
    (the LN-LSTM and a multiplicative layer read all H units: they cannot
    be split).
    packed: packed_weights(w_hh, B), or empty (step_product)
    """
    G = GATES[cell]
    B, H, j1 = xp.shape[0], h_in.shape[1], j0 + w_hh.shape[0] // G
    multiplicative = _is_multiplicative(xp, w_hh)
    if cell == LN_LSTM and (j0 != 0 or j1 != H or norm.shape[1] != 5 * j1):
        raise ValueError("recurrent_step: the LN-LSTM runs all H units, with norm [2, 5H]")
    if update.shape != (1, 1) and update.shape != h_in.shape:
        raise ValueError("recurrent_step: update must be [B, H] or [1, 1]")
    w_mh, mh, m = mult
    if multiplicative and (j0 != 0 or j1 != H or xp.shape[1] != w_hh.shape[0] + H
                           or w_mh.shape != (H, H) or mh.shape != h_in.shape or m.shape != h_in.shape):
        raise ValueError("recurrent_step: a multiplicative layer runs all H units, with xp "
                         "[B, G*H + H], w_mh [H, H] and mh, m [B, H]")
    relu = cell == RNN_RELU
    if multiplicative:
        matmul(mh, h_in, w_mh, False, True)
        multiplicative_forward(m, xp, mh)
        step_product(gh, m, w_hh, packed)
    else:
        step_product(gh, h_in, w_hh, packed)
    for b in range(B):
        row = update[b if update.shape[0] > 1 else 0]
        u = row if row.shape[0] == 1 else row[j0:j1]  # one share, or the rank's units'
        if cell == LSTM:
            lstm_cell_forward(xp[b], gh[b], b_hh, u, c_in[b, j0:j1], gates[b],
                              c_out[b, j0:j1], h_out[b, j0:j1])
        elif cell == LN_LSTM:
            ln_lstm_cell_forward(xp[b], gh[b], b_hh, norm, u, c_in[b], gates[b], saved[b],
                                 c_out[b], h_out[b])
        elif cell == GRU:
            gru_cell_forward(xp[b], gh[b], b_hh, h_in[b, j0:j1], gates[b], saved[b],
                             h_out[b, j0:j1])
        else:
            rnn_cell_forward(xp[b], gh[b], b_hh, relu, h_out[b, j0:j1])


@njit(**_EXACT)
def recurrent_forward(cell, xp, w_hh, b_hh, norm, update, mult, hs, cs, gates, saved, gh):
    """Run one layer over a window.

    xp [T,B,G*H]  input projections of all steps (one GEMM, done before);
                  [T,B,G*H+H] for a multiplicative layer, W_mx x + b_mx last
    hs [T+1,B,H]  hidden states; hs[0] holds the incoming state
    cs [T+1,B,H]  LSTM cell states, cs[0] incoming ([T+1,1,1] for other cells)
    gates [T,B,G*H], saved [T,B,S] (cells.saved_width; [T,1,1] when 0):
                  kept for backward
    norm [2,5H]   LN-LSTM's gains and biases (others: a [2,1] stand-in)
    update [T,B,H] the LSTM's share of each step's new cell value, per
                  stream and unit: zoneout's 0 (the unit holds its cell) or
                  1 in training; [1,1,1] for one share everywhere (1 - the
                  zoneout rate at inference, 1 without zoneout)
    mult = (w_mh [H,H], mhs, ms [T,B,H]): a multiplicative layer's weights,
                  and its h W_mh^T and m of every step, kept for backward
                  (recurrent_step); others: ([1,1], [T,1,1], [T,1,1])
    gh [B,G*H]    scratch for the recurrent GEMM
    """
    T = xp.shape[0]
    if update.shape != (1, 1, 1) and update.shape != (T,) + hs.shape[1:]:
        raise ValueError("recurrent_forward: update must be [T, B, H] or [1, 1, 1]")
    w_mh, mhs, ms = mult
    if mhs.shape[0] != T or ms.shape[0] != T:
        raise ValueError("recurrent_forward: mhs and ms must have one entry per step")
    packed = packed_weights(w_hh, xp.shape[1])  # once for the window's T products
    for t in range(T):
        recurrent_step(cell, xp[t], w_hh, b_hh, norm, update[t if update.shape[0] > 1 else 0],
                       (w_mh, mhs[t], ms[t]), hs[t], cs[t], gates[t], saved[t], gh,
                       hs[t + 1], cs[t + 1], 0, packed)


@njit(**_EXACT)
def recurrent_backward(cell, dh_out, w_hh_t, norm, update, mult, xp, hs, cs, gates, saved,
                       dxp, dgh, dh_rec, carry, dw_hh, db_hh, dnorm):
    """Truncated BPTT through one layer over a window (update, xp, hs, cs,
    gates, saved: the forward pass's).

    dh_out [T,B,H]  gradient reaching the layer's outputs from above
    w_hh_t [H,G*H]  W_hh transposed: the recurrent product dgh @ W_hh runs
                    as dgh @ w_hh_t.T, the form matmul's few-rows kernel
                    takes (matmul alone decides which product runs)
    mult = (w_mh_t [H,H], mhs, ms [T,B,H], dmhs [T,B,H], dm [B,H], dw_mh
                    [H,H]): a multiplicative layer's W_mh transposed, the
                    forward pass's h W_mh^T and m, scratch, and dW_mh
                    (overwritten); others: stand-ins
    dxp [T,B,G*H(+H)] out: gradient of the input projections (feeds
                    linear_backward / embedding_backward for W_ih, b_ih)
    dgh [T,B,G*H]   out: gradient of the recurrent product; for the
                    cells but the GRU it is dxp itself, the caller passes
                    the same array and it is not written, except in a
                    multiplicative layer, where it is its own array
    dh_rec, carry [B,H] scratch; dw_hh, db_hh, dnorm (like norm) overwritten.
    No gradient flows into the incoming state (it is detached, as in
    char-rnn and torch-rnn).
    """
    T, B, H = dh_out.shape[0], dh_out.shape[1], dh_out.shape[2]
    G = dgh.shape[2]
    if w_hh_t.shape[0] != H or w_hh_t.shape[1] != G or dw_hh.shape[0] != G:
        raise ValueError("recurrent_backward: w_hh_t must be [H, G*H] and dw_hh [G*H, H]")
    if cell == LN_LSTM and (norm.shape[1] != 5 * H or dnorm.shape != norm.shape):
        raise ValueError("recurrent_backward: the LN-LSTM needs norm and dnorm [2, 5H]")
    if update.shape != (1, 1, 1) and update.shape != dh_out.shape:
        raise ValueError("recurrent_backward: update must be [T, B, H] or [1, 1, 1]")
    w_mh_t, mhs, ms, dmhs, dm, dw_mh = mult
    multiplicative = _is_multiplicative(dxp, dw_hh)
    if xp.shape != dxp.shape:
        raise ValueError("recurrent_backward: xp and dxp must have the same shape")
    if multiplicative and (dxp.shape[2] != G + H or w_mh_t.shape != (H, H) or dw_mh.shape != (H, H)
                           or mhs.shape != dh_out.shape or ms.shape != dh_out.shape
                           or dmhs.shape != dh_out.shape or dm.shape != (B, H)):
        raise ValueError("recurrent_backward: a multiplicative layer needs dxp [T, B, G*H + H], "
                         "w_mh_t and dw_mh [H, H], mhs, ms and dmhs [T, B, H] and dm [B, H]")
    relu = cell == RNN_RELU
    packed_t = packed_weights(w_hh_t, B)  # once for the window's T products
    carry[:] = 0
    dnorm[:] = 0
    dh_rec[:] = 0
    for t in range(T - 1, -1, -1):
        for b in range(B):
            u = update[t if update.shape[0] > 1 else 0, b if update.shape[1] > 1 else 0]
            # the gates' gradient: dxp's first G*H columns, dgh's in a multiplicative layer
            dgate = dgh[t, b] if multiplicative else dxp[t, b]
            if cell == LSTM:
                lstm_cell_backward(dh_out[t, b], dh_rec[b], gates[t, b], u, cs[t, b],
                                   cs[t + 1, b], carry[b], dgate)
            elif cell == LN_LSTM:
                ln_lstm_cell_backward(dh_out[t, b], dh_rec[b], norm, gates[t, b], saved[t, b],
                                      u, cs[t, b], carry[b], dgate, dnorm)
            elif cell == GRU:
                gru_cell_backward(dh_out[t, b], dh_rec[b], gates[t, b], saved[t, b],
                                  hs[t, b], carry[b], dxp[t, b], dgh[t, b])
            else:
                rnn_cell_backward(dh_out[t, b], dh_rec[b], hs[t + 1, b], relu, dgate)
        # through the recurrent product into step t-1's output
        if multiplicative:
            step_product(dm, dgh[t], w_hh_t, packed_t)
            multiplicative_backward(dm, xp[t], mhs[t], dxp[t], dmhs[t])
            if t > 0:
                matmul(dh_rec, dmhs[t], w_mh_t, False, True)
        elif t > 0:
            step_product(dh_rec, dgh[t], w_hh_t, packed_t)
    # Weight gradients as one GEMM each over the window: dW_hh = dgh^T h_prev
    # (m in a multiplicative layer), dW_mh = dmh^T h_prev.
    dg2 = dgh.reshape(T * B, G)
    h_prev = hs[:T].reshape(T * B, H)
    if multiplicative:
        if cell != GRU:
            dxp[:, :, :G] = dgh
        matmul(dw_hh, dg2, ms.reshape(T * B, H), True, False)
        matmul(dw_mh, dmhs.reshape(T * B, H), h_prev, True, False)
    else:
        matmul(dw_hh, dg2, h_prev, True, False)
    column_sum(db_hh, dg2)


# ------------------------------------------------------------------- output

@njit(**_JIT)
def softmax_cross_entropy(dlogits, logits, targets, scale):
    """Fused softmax + cross-entropy + gradient.

    Returns sum_n -log softmax(logits[n])[targets[n]] (accumulated in float64)
    and writes dlogits = scale * (softmax(logits) - onehot(targets)).
    """
    total = 0.0
    V = logits.shape[1]
    for n in range(logits.shape[0]):
        row = logits[n]
        d = dlogits[n]
        m = row[0]
        for v in range(1, V):
            m = max(m, row[v])
        s = 0.0
        for v in range(V):
            e = np.exp(row[v] - m)
            d[v] = e
            s += e
        total += np.log(s) + m - row[targets[n]]
        inv = scale / s
        for v in range(V):
            d[v] *= inv
        d[targets[n]] -= scale
    return total


# ---------------------------------------------------------------- optimizers
# One fused pass over the flat parameter buffer each. ``scale`` folds the
# global-norm gradient clip into the update; ``wd`` is L2 weight decay added
# to the gradient (PyTorch's ``weight_decay``), except in AdamW where it
# shrinks the weights directly (decoupled).

@njit(**_JIT)
def squared_norm(g):
    """sum g^2 in float64, serially: the same bits for any thread count."""
    s = 0.0
    for k in range(g.shape[0]):
        s += np.float64(g[k]) * g[k]
    return s


@njit(**_JIT)
def adam_update(p, g, m, v, lr, beta1, beta2, eps, wd, decoupled, step, scale):
    """Adam / AdamW (PyTorch's formulation, bias-corrected)."""
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    step_size = np.float32(lr / bc1)
    inv_sqrt_bc2 = np.float32(1.0 / np.sqrt(bc2))
    b1, b2, e = np.float32(beta1), np.float32(beta2), np.float32(eps)
    shrink = np.float32(1.0 - lr * wd) if decoupled else _ONE
    l2 = np.float32(0.0 if decoupled else wd)
    sc = np.float32(scale)
    for k in range(p.shape[0]):
        gk = g[k] * sc + l2 * p[k]
        m[k] = b1 * m[k] + (_ONE - b1) * gk
        v[k] = b2 * v[k] + (_ONE - b2) * gk * gk
        p[k] = p[k] * shrink - step_size * m[k] / (np.sqrt(v[k]) * inv_sqrt_bc2 + e)


@njit(**_JIT)
def rmsprop_update(p, g, v, buf, lr, alpha, eps, wd, momentum, scale):
    """RMSprop (PyTorch's: eps outside the root; optional momentum)."""
    a, e, mu, l2 = np.float32(alpha), np.float32(eps), np.float32(momentum), np.float32(wd)
    sc, lr32 = np.float32(scale), np.float32(lr)
    for k in range(p.shape[0]):
        gk = g[k] * sc + l2 * p[k]
        v[k] = a * v[k] + (_ONE - a) * gk * gk
        u = gk / (np.sqrt(v[k]) + e)
        if momentum > 0:
            buf[k] = mu * buf[k] + u
            u = buf[k]
        p[k] -= lr32 * u


@njit(**_JIT)
def adagrad_update(p, g, s, lr, eps, wd, scale):
    """Adagrad (PyTorch's, without learning-rate decay)."""
    e, l2, sc, lr32 = np.float32(eps), np.float32(wd), np.float32(scale), np.float32(lr)
    for k in range(p.shape[0]):
        gk = g[k] * sc + l2 * p[k]
        s[k] += gk * gk
        p[k] -= lr32 * gk / (np.sqrt(s[k]) + e)


@njit(**_JIT)
def average_update(avg, p, decay):
    """avg = decay * avg + (1 - decay) * p: the weights' exponential moving
    average, used for evaluation and sampling (Polyak averaging)."""
    d = np.float32(decay)
    for k in range(p.shape[0]):
        avg[k] = d * avg[k] + (_ONE - d) * p[k]


@njit(**_JIT)
def sgd_update(p, g, buf, lr, momentum, wd, scale):
    """SGD with optional (heavy-ball) momentum, PyTorch's convention."""
    mu, l2, sc, lr32 = np.float32(momentum), np.float32(wd), np.float32(scale), np.float32(lr)
    for k in range(p.shape[0]):
        gk = g[k] * sc + l2 * p[k]
        if momentum > 0:
            buf[k] = mu * buf[k] + gk
            gk = buf[k]
        p[k] -= lr32 * gk


# ---------------------------------------------------------------- generation
# Sampling one stream reads every weight once per character, so it runs at
# the speed one core reads them from its caches. Ranks (one thread each)
# split the work by hidden units: rank r owns units j0:j1 of every layer and
# holds their rows of W_ih, W_hh and the biases in its own flat buffer
# ``rparams`` (``roffsets[k]`` = start of w_ih, w_hh, b_ih, b_hh, norm of layer k;
# for one-hot input w_ih of layer 0 is stored transposed, [V, G*Hr], so the
# projection is a row gather). After each layer the ranks meet at a barrier,
# since the next layer and the next step read the whole hidden state. Every
# rank computes the logits and draws the same characters from the same
# uniforms, which spares a barrier per character.

def _is_flags(flags):
    return isinstance(flags, types.Array) and flags.dtype == types.int64 and flags.ndim == 1


@intrinsic
def _atomic_load(typingctx, flags, i):
    """flags[i] (int64) with acquire ordering: the spin loop reads memory."""
    if not _is_flags(flags):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        return builder.load_atomic(builder.gep(ary.data, [args[1]]), "acquire", 8)
    return types.int64(flags, i), codegen


@intrinsic
def _atomic_store(typingctx, flags, i, value):
    """flags[i] = value (int64) with release ordering: earlier writes first."""
    if not _is_flags(flags) or not isinstance(value, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        builder.store_atomic(v, builder.gep(ary.data, [args[1]]), "release", 8)
        return context.get_dummy_value()
    return types.void(flags, i, value), codegen


_sched_yield = types.ExternalFunction("sched_yield", types.int32())
CACHE_LINE = 64  # bytes: what one thread writes should not share one with another's data
_LINE = CACHE_LINE // 8  # int64 flag slots per cache line
_SPINS = 4096    # spins before yielding the core (another thread may need it)


def barrier_flags_size(n_ranks):
    """Length of the int64 ``flags`` array that ``barrier`` needs."""
    return _LINE * (n_ranks + 1)


def release_barriers(flags):
    """Abort: every rank waiting at a barrier on ``flags`` returns False."""
    flags[-_LINE] = 1


@njit(**_JIT)
def barrier(flags, rank, n_ranks, b):
    """Wait until every rank has arrived at barrier b (numbered from 1).
    flags [barrier_flags_size(n_ranks)] int64: rank r's last barrier at
    _LINE*r, and at _LINE*n_ranks an abort flag that releases everyone
    (release_barriers; False returned)."""
    if n_ranks == 1:
        return True
    _atomic_store(flags, _LINE * rank, np.int64(b))
    for q in range(n_ranks):
        spins = 0
        while _atomic_load(flags, _LINE * q) < b:
            if _atomic_load(flags, _LINE * n_ranks) != 0:
                return False
            spins += 1
            if spins == _SPINS:
                _sched_yield()
                spins = 0
    return True


@njit(**_EXACT)
def model_step(cell, net, dims, state, scratch, sync, ids, p, b):
    """Feed ids [S] (one character per stream) and write next-char logits [S,V]:
    this rank's share of one step, which passes barriers b+1 .. b+L.

    net = (rparams, roffsets, params, update): the rank's rows of the
        weights (see above; roffsets[k]: where layer k's w_ih, w_hh, b_ih,
        b_hh, norm and w_mh start), the model's flat buffer, read for the
        encoder and decoder, and the LSTM's share of each new cell value
        [1,1] (recurrent_step)
    dims = (enc_off, dec_off, V, E, j0): where the encoder (-1: one-hot
        input) and the decoder start in params, the vocabulary and embedding
        sizes, and the rank's first hidden unit
    state = (hs, cs), each [L,2,S,H] and shared by the ranks: per layer, [p]
        is the state in and [1-p] the state out
    scratch = (logits [S,V], xp [S,G*Hr(+H)], gates, gh [S,G*Hr], saved [S,max(1,Sw)],
               emb [S,E], zero_e [E], mh, m [S,H] or [1,1]: recurrent_step's)
    sync = (flags, rank, n_ranks): the barrier
    Returns False if another rank aborted.
    """
    rparams, roffsets, params, update = net
    enc_off, dec_off, V, E, j0 = dims
    hs, cs = state
    logits, xp, gates, gh, saved, emb, zero_e, mh, m = scratch
    flags, rank, n_ranks = sync
    L, H, XPr, GHr = hs.shape[0], hs.shape[3], xp.shape[1], gh.shape[1]
    MH = H if XPr != GHr else 1  # w_mh [H,H] or a [1,1] stand-in
    q = 1 - p
    for k in range(L):
        o = roffsets[k]
        inp = (E if enc_off >= 0 else V) if k == 0 else H
        w_ih = rparams[o[0]:o[0] + XPr * inp]
        w_hh = rparams[o[1]:o[1] + GHr * H].reshape(GHr, H)
        b_ih = rparams[o[2]:o[2] + XPr]
        b_hh = rparams[o[3]:o[3] + GHr]
        norm = rparams[o[4]:o[4] + (10 * H if cell == LN_LSTM else 2)].reshape(2, -1)
        w_mh = rparams[o[5]:o[5] + MH * MH].reshape(MH, MH)
        if k == 0 and enc_off < 0:
            embedding_forward(xp, w_ih.reshape(V, XPr), ids, b_ih)
        elif k == 0:
            embedding_forward(emb, params[enc_off:enc_off + V * E].reshape(V, E), ids, zero_e)
            linear_forward(xp, emb, w_ih.reshape(XPr, E), b_ih)
        else:
            linear_forward(xp, hs[k - 1, q], w_ih.reshape(XPr, H), b_ih)
        recurrent_step(cell, xp, w_hh, b_hh, norm, update, (w_mh, mh, m), hs[k, p], cs[k, p],
                       gates, saved, gh, hs[k, q], cs[k, q], j0, gh[0, :0])  # nothing packed
        if not barrier(flags, rank, n_ranks, b + k + 1):
            return False
    linear_forward(logits, hs[L - 1, q],
                   params[dec_off:dec_off + V * H].reshape(V, H),
                   params[dec_off + V * H:dec_off + V * H + V])
    return True


@njit(**_JIT)
def pick_token(logits, probs, temperature, top_k, top_p, u):
    """Draw one id from softmax(logits / temperature), restricted to the
    top_k most likely (0: all) and to the smallest set whose probability
    reaches top_p (1: all); u is a uniform [0,1) number. temperature 0
    means argmax."""
    V = logits.shape[0]
    best = 0
    for v in range(1, V):
        if logits[v] > logits[best]:
            best = v
    if temperature == 0:
        return best
    m = logits[best]
    inv_t = 1.0 / temperature
    for v in range(V):
        probs[v] = np.exp((logits[v] - m) * inv_t)
    if (0 < top_k < V) or top_p < 1.0:
        order = np.argsort(-probs, kind="mergesort")  # ties: lower id first, as on the GPU
        total = 0.0
        for v in range(V):
            total += probs[v]
        mass = 0.0
        for r in range(V):
            v = order[r]
            if (top_k > 0 and r >= top_k) or mass >= top_p * total:
                probs[v] = 0
            else:
                mass += probs[v]
    total = 0.0
    for v in range(V):
        total += probs[v]
    target = u * total
    acc = 0.0
    last = best
    for v in range(V):
        if probs[v] > 0:
            acc += probs[v]
            last = v
            if acc > target:
                return v
    return last


@njit(**_EXACT)
def generate(cell, net, dims, state, scratch, sync, rule, uniforms, ids, probs, out):
    """Sample out[n, s] for n < N: draw from logits (the distribution of the
    next character), then feed the drawn characters to get the next logits;
    this rank's share (rank 0 writes ``out``). The loop over characters runs
    here, not in Python. ``rule`` = (temperature, top_k, top_p) of
    pick_token; ``uniforms`` [N,S]; ids [S], probs [S,V] scratch; the other
    arguments as in model_step. The state ends in hs[:, N % 2], cs[:, N % 2]."""
    temperature, top_k, top_p = rule
    logits = scratch[0]
    rank = sync[1]
    L = state[0].shape[0]
    N, S = out.shape
    for n in range(N):
        for s in range(S):
            ids[s] = pick_token(logits[s], probs[s], temperature, top_k, top_p, uniforms[n, s])
            if rank == 0:
                out[n, s] = ids[s]
        if not model_step(cell, net, dims, state, scratch, sync, ids, n % 2, n * L):
            return
