"""CUDA kernels: the ``numba.cuda`` twins of :mod:`charrnn.kernels.cpu`.

Every public function here takes the same arguments, in the same order and
with the same layouts, as the CPU kernel of the same name: time-major
``[T, B, ...]`` arrays, PyTorch gate order (LSTM ``(i, f, g, o)``, GRU
``(r, z, n)``) and weight layouts. The arrays are numba device arrays,
float32 only (the float64 gradient checks stay on the CPU), with int32 ids;
the functions run on the host and launch kernels.

What differs from the CPU side, and why:

- Matrix products are :func:`gemm`, a shared-memory tiled kernel: there is no
  ``np.dot`` inside ``cuda.jit`` code.
- The loop over time stays in Python: per step one GEMM launch and one fused
  gate kernel with a thread per ``(b, j)`` (per stream ``b`` for the LN-LSTM,
  whose normalisations sum over the units).
- Math is exact (``math.tanh``, ``math.exp``, no fastmath): the CPU's
  rational tanh exists only because Numba cannot vectorise libm on the CPU.
- Every sum has a fixed order (one thread walks it, or a fixed tree), never
  atomics, so results are the same bits on every run.

This is the only module that imports ``numba.cuda`` (the ``numba-cuda``
package). With ``NUMBA_ENABLE_CUDASIM=1`` set before numba is imported the
same code runs on the CPU simulator, which is how the tests check it.
"""
import math

import numpy as np
from numba import config, cuda, float32, float64

from .cells import GRU, LN_EPS, LN_LSTM, LSTM, RNN_RELU, RNN_TANH  # noqa: F401  (the cell ids)

# GEMM tiles are TILE x TILE, one thread per output element. The simulator
# runs every GPU thread as a Python thread, so there the tiles are small.
TILE = 4 if config.ENABLE_CUDASIM else 16
TPB = 128  # threads per block of the one-dimensional kernels
_PADDED = TILE + 1  # shared tiles get a spare column: column writes then avoid bank conflicts

_ZERO = np.float32(0.0)
_HALF = np.float32(0.5)
_ONE = np.float32(1.0)


def _launch(n):
    """(blocks, threads) for n independent threads; a small job gets a small
    block rather than a block of idle threads."""
    threads = max(1, min(TPB, n))
    return max(1, -(-n // threads)), threads


# ---------------------------------------------------------------------- GEMM

@cuda.jit(device=True)
def _stage(tile, m, trans, r0, c0):
    """tile = op(m)[r0:r0+TILE, c0:c0+TILE], zero past the edges.

    Either way consecutive threads (threadIdx.x) read consecutive elements of
    m, so global loads coalesce; for op = transpose they fill a column of the
    tile instead of a row.
    """
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    if trans:
        i, j, ti, tj = c0 + ty, r0 + tx, tx, ty  # op(m)[r, c] = m[c, r]
    else:
        i, j, ti, tj = r0 + ty, c0 + tx, ty, tx
    if i < m.shape[0] and j < m.shape[1]:
        tile[ti, tj] = m[i, j]
    else:
        tile[ti, tj] = _ZERO


@cuda.jit
def _gemm_kernel(c, a, b, trans_a, trans_b, beta):
    # c [M,N] = op(a) [M,K] @ op(b) [K,N] + beta * c; one thread per c[row, col]
    sa = cuda.shared.array((TILE, _PADDED), float32)  # shapes must be global constants
    sb = cuda.shared.array((TILE, _PADDED), float32)
    ty, tx = cuda.threadIdx.y, cuda.threadIdx.x
    r0, c0 = cuda.blockIdx.y * TILE, cuda.blockIdx.x * TILE
    K = a.shape[0] if trans_a else a.shape[1]
    acc = _ZERO
    for k0 in range(0, K, TILE):
        _stage(sa, a, trans_a, r0, k0)
        _stage(sb, b, trans_b, k0, c0)
        cuda.syncthreads()
        for kk in range(TILE):  # the zero padding makes a partial last tile exact
            acc += sa[ty, kk] * sb[kk, tx]
        cuda.syncthreads()  # before the next tile overwrites this one
    row, col = r0 + ty, c0 + tx
    if row < c.shape[0] and col < c.shape[1]:
        if beta != 0:  # beta = 0 must not read c: it may hold NaN garbage
            acc += beta * c[row, col]
        c[row, col] = acc


def gemm(c, a, b, trans_a=False, trans_b=False, beta=0.0):
    """c = op(a) @ op(b) + beta * c, op = transpose where asked.

    c [M,N], op(a) [M,K], op(b) [K,N]; 2-D float32 device arrays, C-contiguous
    or views of them. Each output element sums over k in order, so the result
    does not depend on the launch.
    """
    M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
    Kb, N = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if K != Kb or c.shape != (M, N):
        raise ValueError(f"gemm: op(a) {M}x{K} @ op(b) {Kb}x{N} cannot fill c {c.shape}")
    grid = (max(1, -(-N // TILE)), max(1, -(-M // TILE)))  # x along columns, as threadIdx.x
    _gemm_kernel[grid, (TILE, TILE)](c, a, b, bool(trans_a), bool(trans_b),
                                     np.float32(beta))


# ---------------------------------------------------------------- input side

@cuda.jit
def _embedding_forward_kernel(out, table, ids, bias):
    # one thread per out[n, d]
    k = cuda.grid(1)
    D = out.shape[1]
    if k < out.shape[0] * D:
        n, d = k // D, k % D
        out[n, d] = table[ids[n], d] + bias[d]


def embedding_forward(out, table, ids, bias):
    """out[n] = table[ids[n]] + bias.   out [N,D], table [V,D], ids [N], bias [D]"""
    _embedding_forward_kernel[_launch(out.size)](out, table, ids, bias)


@cuda.jit
def _embedding_scatter_kernel(dtable, dout, ids):
    # One thread per dtable[v, d], walking n in order: a deterministic
    # scatter-add (atomics would add in whatever order threads arrive).
    k = cuda.grid(1)
    D = dtable.shape[1]
    if k < dtable.shape[0] * D:
        v, d = k // D, k % D
        s = _ZERO
        for n in range(ids.shape[0]):
            if ids[n] == v:
                s += dout[n, d]
        dtable[v, d] = s


def embedding_backward(dtable, dbias, dout, ids):
    """Scatter-add of embedding_forward's gradient (overwrites dtable, dbias)."""
    _embedding_scatter_kernel[_launch(dtable.size)](dtable, dout, ids)
    column_sum(dbias, dout)


@cuda.jit
def _add_bias_kernel(out, b):
    # out[n, k] += b[k]
    i = cuda.grid(1)
    O = out.shape[1]
    if i < out.shape[0] * O:
        out[i // O, i % O] += b[i % O]


def linear_forward(out, x, w, b):
    """out = x @ w.T + b.   out [N,O], x [N,I], w [O,I] (PyTorch layout), b [O]"""
    gemm(out, x, w, trans_b=True)
    _add_bias_kernel[_launch(out.size)](out, b)


def linear_backward(dx, dw, db, dout, x, w):
    """Gradients of linear_forward, each overwritten: the weight gradient is
    one GEMM over all N = T*B rows of the window."""
    gemm(dx, dout, w)
    gemm(dw, dout, x, trans_a=True)
    column_sum(db, dout)


@cuda.jit
def _column_sum_kernel(out, a):
    # one thread per column, summing rows in order like the CPU kernel
    k = cuda.grid(1)
    if k < out.shape[0]:
        s = _ZERO
        for n in range(a.shape[0]):
            s += a[n, k]
        out[k] = s


def column_sum(out, a):
    """out[k] = sum_n a[n, k]  (bias gradients)."""
    _column_sum_kernel[_launch(out.shape[0])](out, a)


@cuda.jit
def _multiply_kernel(out, x, y):
    k = cuda.grid(1)
    if k < out.shape[0]:
        out[k] = x[k] * y[k]


def apply_dropout(out, x, mask):
    """out = x * mask. Inverted dropout: mask holds 0 or 1/(1-p), so the same
    product is both the forward pass and its gradient."""
    n = out.size
    _multiply_kernel[_launch(n)](out.reshape(n), x.reshape(n), mask.reshape(n))


@cuda.jit
def _fill_kernel(a, value):
    k = cuda.grid(1)
    if k < a.shape[0]:
        a[k] = value


def _zero(a):
    _fill_kernel[_launch(a.size)](a.reshape(a.size), _ZERO)


# --------------------------------------------------------------- array moves
# The same four names as in cpu.py: the model allocates and moves arrays
# through them, so one orchestration drives both backends.

def zeros(shape, dtype=np.float32):
    return cuda.to_device(np.zeros(shape, dtype))


def put(dst, src):
    """dst[...] = src, from a host array or a number."""
    dst.copy_to_device(np.ascontiguousarray(np.broadcast_to(np.asarray(src, dst.dtype), dst.shape)))


def get(a):
    """A host copy of device array ``a``."""
    return a.copy_to_host()


@cuda.jit
def _transpose_kernel(out, a):
    i, j = cuda.grid(2)
    if i < out.shape[0] and j < out.shape[1]:
        out[i, j] = a[j, i]


def transpose(out, a):
    """out = a.T."""
    grid = (-(-out.shape[0] // TILE), -(-out.shape[1] // TILE))
    _transpose_kernel[grid, (TILE, TILE)](out, a)


def available():
    """None when a CUDA device (or the simulator) can run kernels, else why not."""
    try:
        if not cuda.is_available():
            return "no CUDA GPU or driver was found"
        cuda.to_device(np.zeros(1, np.float32)).copy_to_host()
    except Exception as e:  # a broken driver or toolkit: say so, do not crash
        return f"CUDA is not usable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


# ------------------------------------------------------------ cell equations

@cuda.jit(device=True)
def _sigmoid(x):
    # through tanh, as on the CPU: the same formula, and exp cannot overflow
    return _HALF * math.tanh(_HALF * x) + _HALF


@cuda.jit(device=True)
def _preact(xp, gh, b_hh, t, b, k):
    # pre-activation of gate column k: input projection + h W_hh^T + b_hh
    return xp[t, b, k] + gh[b, k] + b_hh[k]


@cuda.jit(device=True)
def _share(update, t, b, j):
    """cpu._share: update [T,B,H], or [1,1,1] for one share everywhere."""
    return update[min(t, update.shape[0] - 1), min(b, update.shape[1] - 1),
                  min(j, update.shape[2] - 1)]


@cuda.jit(device=True)
def _zoned(c_prev, new, u):
    """cpu._zoned: the share u of the new cell value (zoneout)."""
    return new if u == _ONE else c_prev + u * (new - c_prev)


@cuda.jit
def _cell_forward_kernel(cell, t, xp, gh, b_hh, update, hs, cs, gates, saved):
    """Step t of every cell equation, one thread per (b, j); the rows of
    cpu.lstm_cell_forward / gru_cell_forward / rnn_cell_forward."""
    k = cuda.grid(1)
    H = hs.shape[2]
    if k >= hs.shape[1] * H:
        return
    b, j = k // H, k % H
    if cell == LSTM:  # c = f*c_prev + i*g;  h = o*tanh(c)
        i = _sigmoid(_preact(xp, gh, b_hh, t, b, j))
        f = _sigmoid(_preact(xp, gh, b_hh, t, b, H + j))
        g = math.tanh(_preact(xp, gh, b_hh, t, b, 2 * H + j))
        o = _sigmoid(_preact(xp, gh, b_hh, t, b, 3 * H + j))
        c = _zoned(cs[t, b, j], f * cs[t, b, j] + i * g, _share(update, t, b, j))
        gates[t, b, j] = i
        gates[t, b, H + j] = f
        gates[t, b, 2 * H + j] = g
        gates[t, b, 3 * H + j] = o
        cs[t + 1, b, j] = c
        hs[t + 1, b, j] = o * math.tanh(c)
    elif cell == GRU:  # n = tanh(x_n + r*(W_hn h + b_hn));  h = (1-z)*n + z*h_prev
        r = _sigmoid(_preact(xp, gh, b_hh, t, b, j))
        z = _sigmoid(_preact(xp, gh, b_hh, t, b, H + j))
        hnj = gh[b, 2 * H + j] + b_hh[2 * H + j]
        n = math.tanh(xp[t, b, 2 * H + j] + r * hnj)
        gates[t, b, j] = r
        gates[t, b, H + j] = z
        gates[t, b, 2 * H + j] = n
        saved[t, b, j] = hnj
        hs[t + 1, b, j] = (_ONE - z) * n + z * hs[t, b, j]
    else:  # h = tanh(a) or relu(a)
        a = _preact(xp, gh, b_hh, t, b, j)
        if cell == RNN_RELU:
            hs[t + 1, b, j] = a if a > _ZERO else _ZERO
        else:
            hs[t + 1, b, j] = math.tanh(a)


@cuda.jit
def _cell_backward_kernel(cell, t, dh_out, dh_rec, gates, update, hs, cs, saved, carry, dxp, dgh):
    """Step t of the cell gradients, one thread per (b, j); carry[b, j] is
    dL/dc (LSTM) or z*dh (GRU) passed from step t+1 to step t, and only this
    thread touches it."""
    k = cuda.grid(1)
    H = hs.shape[2]
    if k >= hs.shape[1] * H:
        return
    b, j = k // H, k % H
    dh = dh_out[t, b, j] + dh_rec[b, j]
    if cell == LSTM:
        i = gates[t, b, j]
        f = gates[t, b, H + j]
        g = gates[t, b, 2 * H + j]
        o = gates[t, b, 3 * H + j]
        u = _share(update, t, b, j)
        tc = math.tanh(cs[t + 1, b, j])
        dc = carry[b, j] + dh * o * (_ONE - tc * tc)
        dnew = dc * u
        dxp[t, b, j] = dnew * g * i * (_ONE - i)
        dxp[t, b, H + j] = dnew * cs[t, b, j] * f * (_ONE - f)
        dxp[t, b, 2 * H + j] = dnew * i * (_ONE - g * g)
        dxp[t, b, 3 * H + j] = dh * tc * o * (_ONE - o)
        carry[b, j] = dc * (_ONE - u) + dnew * f
    elif cell == GRU:
        # dgh differs from dxp in the n block: r multiplies W_hn h + b_hn
        dh = dh + carry[b, j]
        r = gates[t, b, j]
        z = gates[t, b, H + j]
        n = gates[t, b, 2 * H + j]
        dn = dh * (_ONE - z) * (_ONE - n * n)
        dr = dn * saved[t, b, j] * r * (_ONE - r)
        dz = dh * (hs[t, b, j] - n) * z * (_ONE - z)
        dxp[t, b, j] = dr
        dxp[t, b, H + j] = dz
        dxp[t, b, 2 * H + j] = dn
        dgh[t, b, j] = dr
        dgh[t, b, H + j] = dz
        dgh[t, b, 2 * H + j] = dn * r
        carry[b, j] = dh * z
    elif cell == RNN_RELU:
        dxp[t, b, j] = dh if hs[t + 1, b, j] > _ZERO else _ZERO
    else:
        h = hs[t + 1, b, j]
        dxp[t, b, j] = dh * (_ONE - h * h)


@cuda.jit(device=True)
def _layer_norm_forward(x, gain, bias, xhat):
    """cpu.layer_norm_forward on one block of one row (1-D views)."""
    n = x.shape[0]
    inv_n = _ONE / float32(n)  # float32 throughout: an int count would promote to float64
    s = _ZERO
    for j in range(n):
        s += x[j]
    mean = s * inv_n
    v = _ZERO
    for j in range(n):
        d = x[j] - mean
        v += d * d
    rstd = _ONE / math.sqrt(v * inv_n + float32(LN_EPS))
    for j in range(n):
        xhat[j] = (x[j] - mean) * rstd
        x[j] = gain[j] * xhat[j] + bias[j]
    return rstd


@cuda.jit(device=True)
def _layer_norm_backward(dy, gain, xhat, rstd, dgain, dbias):
    """cpu.layer_norm_backward on one block of one row (1-D views)."""
    n = dy.shape[0]
    inv_n = _ONE / float32(n)
    s1 = _ZERO
    s2 = _ZERO
    for j in range(n):
        dgain[j] += dy[j] * xhat[j]
        dbias[j] += dy[j]
        dx = dy[j] * gain[j]
        s1 += dx
        s2 += dx * xhat[j]
    m1 = s1 * inv_n
    m2 = s2 * inv_n
    for j in range(n):
        dy[j] = rstd * (dy[j] * gain[j] - m1 - xhat[j] * m2)


@cuda.jit
def _ln_lstm_forward_kernel(t, xp, gh, b_hh, norm, update, hs, cs, gates, saved):
    """Step t of cpu.ln_lstm_cell_forward, one thread per stream b (each
    normalisation sums over the units: one thread walks the sum)."""
    b = cuda.grid(1)
    H = hs.shape[2]
    if b >= hs.shape[1]:
        return
    a, sv, h = gates[t, b], saved[t, b], hs[t + 1, b]
    for j in range(4 * H):
        a[j] = xp[t, b, j] + gh[b, j] + b_hh[j]
    for q in range(4):
        lo, hi = q * H, (q + 1) * H
        sv[5 * H + q] = _layer_norm_forward(a[lo:hi], norm[0, lo:hi], norm[1, lo:hi], sv[lo:hi])
    for j in range(H):
        i = _sigmoid(a[j])
        f = _sigmoid(a[H + j])
        g = math.tanh(a[2 * H + j])
        a[j] = i
        a[H + j] = f
        a[2 * H + j] = g
        a[3 * H + j] = _sigmoid(a[3 * H + j])
        c = _zoned(cs[t, b, j], f * cs[t, b, j] + i * g, _share(update, t, b, j))
        cs[t + 1, b, j] = c
        h[j] = c
    sv[5 * H + 4] = _layer_norm_forward(h, norm[0, 4 * H:], norm[1, 4 * H:], sv[4 * H:5 * H])
    for j in range(H):
        h[j] = a[3 * H + j] * math.tanh(h[j])


@cuda.jit
def _ln_lstm_backward_kernel(t, dh_out, dh_rec, norm, gates, saved, update, cs, carry, dxp,
                             dnorm_rows):
    """Step t of cpu.ln_lstm_cell_backward, one thread per stream b; the
    gains' and biases' gradients accumulate in the stream's own row of
    dnorm_rows [B, 2, 5H] (summed over the streams afterwards)."""
    b = cuda.grid(1)
    H = cs.shape[2]
    if b >= cs.shape[1]:
        return
    gt, sv, d, dn = gates[t, b], saved[t, b], dxp[t, b], dnorm_rows[b]
    dcn = d[2 * H:3 * H]  # scratch: dL/d(the normalised, scaled cell)
    for j in range(H):
        dh = dh_out[t, b, j] + dh_rec[b, j]
        o = gt[3 * H + j]
        tc = math.tanh(norm[0, 4 * H + j] * sv[4 * H + j] + norm[1, 4 * H + j])
        d[3 * H + j] = dh * tc * o * (_ONE - o)
        dcn[j] = dh * o * (_ONE - tc * tc)
    _layer_norm_backward(dcn, norm[0, 4 * H:], sv[4 * H:5 * H], sv[5 * H + 4],
                         dn[0, 4 * H:], dn[1, 4 * H:])
    for j in range(H):
        i = gt[j]
        f = gt[H + j]
        g = gt[2 * H + j]
        u = _share(update, t, b, j)
        dc = carry[b, j] + dcn[j]
        dnew = dc * u
        d[j] = dnew * g * i * (_ONE - i)
        d[H + j] = dnew * cs[t, b, j] * f * (_ONE - f)
        d[2 * H + j] = dnew * i * (_ONE - g * g)
        carry[b, j] = dc * (_ONE - u) + dnew * f
    for q in range(4):
        lo, hi = q * H, (q + 1) * H
        _layer_norm_backward(d[lo:hi], norm[0, lo:hi], sv[lo:hi], sv[5 * H + q],
                             dn[0, lo:hi], dn[1, lo:hi])


# ------------------------------------------------------- time loops (layers)

def _check_update(update, T, B, H):
    if update.shape != (1, 1, 1) and update.shape != (T, B, H):
        raise ValueError(f"update must be [T, B, H] or [1, 1, 1], not {update.shape}")


@cuda.jit
def _multiplicative_forward_kernel(t, m, xp, mh):
    """cpu.multiplicative_forward for step t: m = xp's last H columns * mh."""
    k = cuda.grid(1)
    B, H = m.shape[1], m.shape[2]
    if k < B * H:
        b, j = k // H, k % H
        m[t, b, j] = xp[t, b, xp.shape[2] - H + j] * mh[t, b, j]


@cuda.jit
def _multiplicative_backward_kernel(t, dm, xp, mh, dxp, dmh):
    """cpu.multiplicative_backward for step t."""
    k = cuda.grid(1)
    B, H = dm.shape
    if k < B * H:
        b, j = k // H, k % H
        GH = xp.shape[2] - H
        dxp[t, b, GH + j] = dm[b, j] * mh[t, b, j]
        dmh[t, b, j] = dm[b, j] * xp[t, b, GH + j]


@cuda.jit
def _copy_gates_kernel(dxp, dgh):
    """dxp[..., :G] = dgh (G = dgh's columns): a multiplicative layer's gate gradients."""
    k = cuda.grid(1)
    T, B, G = dgh.shape
    if k < T * B * G:
        t, r = k // (B * G), k % (B * G)
        dxp[t, r // G, r % G] = dgh[t, r // G, r % G]


def _multiplicative(xp, G, H):
    """Whether xp [T,B,G+H] carries a multiplicative layer's W_mx x (the CPU kernels' rule)."""
    if xp.shape[2] not in (G, G + H):
        raise ValueError(f"xp has {xp.shape[2]} columns: the gates' {G}, or {G + H} with W_mx x")
    return xp.shape[2] != G


def recurrent_forward(cell, xp, w_hh, b_hh, norm, update, mult, hs, cs, gates, saved, gh):
    """Run one layer over a window (see cpu.recurrent_forward for the arrays).

    Per step: one GEMM gh = h W_hh^T (m W_hh^T after m = (W_mx x + b_mx) *
    (h W_mh^T) in a multiplicative layer), then one fused launch over the
    gates. cs, saved and norm are only touched by the cells that use them.
    """
    T, B, H = xp.shape[0], xp.shape[1], hs.shape[2]
    if cell == LN_LSTM and norm.shape != (2, 5 * H):
        raise ValueError(f"recurrent_forward: the LN-LSTM needs norm [2, {5 * H}], not {norm.shape}")
    _check_update(update, T, B, H)
    w_mh, mhs, ms = mult
    multiplicative = _multiplicative(xp, w_hh.shape[0], H)
    if multiplicative and (w_mh.shape != (H, H) or mhs.shape != (T, B, H) or ms.shape != (T, B, H)):
        raise ValueError("recurrent_forward: a multiplicative layer needs w_mh [H, H] and mhs, ms [T, B, H]")
    for t in range(T):
        if multiplicative:
            gemm(mhs[t], hs[t], w_mh, trans_b=True)
            _multiplicative_forward_kernel[_launch(B * H)](t, ms, xp, mhs)
            gemm(gh, ms[t], w_hh, trans_b=True)
        else:
            gemm(gh, hs[t], w_hh, trans_b=True)
        if cell == LN_LSTM:
            _ln_lstm_forward_kernel[_launch(B)](t, xp, gh, b_hh, norm, update, hs, cs, gates, saved)
        else:
            _cell_forward_kernel[_launch(B * H)](cell, t, xp, gh, b_hh, update, hs, cs, gates, saved)


def recurrent_backward(cell, dh_out, w_hh_t, norm, update, mult, xp, hs, cs, gates, saved,
                       dxp, dgh, dh_rec, carry, dw_hh, db_hh, dnorm):
    """Truncated BPTT through one layer over a window (see
    cpu.recurrent_backward): for the cells but the GRU the caller passes dxp
    as dgh, but in a multiplicative layer. w_hh_t [H,G*H] is W_hh
    transposed; mult = (w_mh_t, mhs, ms, dmhs, dm, dw_mh) as there;
    dh_rec, carry [B,H] scratch; dw_hh, db_hh, dnorm overwritten."""
    T, B, H = dh_out.shape[0], dh_out.shape[1], hs.shape[2]
    G = dgh.shape[2]
    if w_hh_t.shape != (H, G) or dw_hh.shape != (G, H):
        raise ValueError(f"recurrent_backward: w_hh_t {w_hh_t.shape} must be {(H, G)} "
                         f"and dw_hh {dw_hh.shape} {(G, H)}")
    if cell == LN_LSTM and (norm.shape != (2, 5 * H) or dnorm.shape != norm.shape):
        raise ValueError(f"recurrent_backward: the LN-LSTM needs norm and dnorm [2, {5 * H}]")
    _check_update(update, T, B, H)
    w_mh_t, mhs, ms, dmhs, dm, dw_mh = mult
    multiplicative = _multiplicative(dxp, G, H)
    if xp.shape != dxp.shape:
        raise ValueError("recurrent_backward: xp and dxp must have the same shape")
    if multiplicative and (w_mh_t.shape != (H, H) or dw_mh.shape != (H, H)
                           or not mhs.shape == ms.shape == dmhs.shape == (T, B, H) or dm.shape != (B, H)):
        raise ValueError("recurrent_backward: a multiplicative layer needs w_mh_t and dw_mh [H, H], "
                         "mhs, ms and dmhs [T, B, H] and dm [B, H]")
    # the gates' gradient: into dxp, or into dgh in a multiplicative layer (copied to dxp after)
    dgate = dgh if multiplicative and cell != GRU else dxp
    dnorm_rows = zeros((B,) + norm.shape) if cell == LN_LSTM else None
    _zero(carry)
    _zero(dh_rec)
    for t in range(T - 1, -1, -1):
        if cell == LN_LSTM:
            _ln_lstm_backward_kernel[_launch(B)](t, dh_out, dh_rec, norm, gates, saved, update,
                                                 cs, carry, dgate, dnorm_rows)
        else:
            _cell_backward_kernel[_launch(B * H)](cell, t, dh_out, dh_rec, gates, update, hs, cs,
                                                  saved, carry, dgate, dgh)
        # through the recurrent product into step t-1's output
        if multiplicative:
            gemm(dm, dgh[t], w_hh_t, trans_b=True)
            _multiplicative_backward_kernel[_launch(B * H)](t, dm, xp, mhs, dxp, dmhs)
            if t > 0:
                gemm(dh_rec, dmhs[t], w_mh_t, trans_b=True)
        elif t > 0:
            gemm(dh_rec, dgh[t], w_hh_t, trans_b=True)
    if cell == LN_LSTM:  # the streams' rows summed in a fixed order
        column_sum(dnorm.reshape(-1), dnorm_rows.reshape(B, -1))
    else:
        _zero(dnorm)
    # Weight gradients as one GEMM each over the window: dW_hh = dgh^T h_prev
    # (m in a multiplicative layer), dW_mh = dmh^T h_prev.
    dg2 = dgh.reshape(T * B, G)
    h_prev = hs[:T].reshape(T * B, H)
    if multiplicative:
        if cell != GRU:
            _copy_gates_kernel[_launch(T * B * G)](dxp, dgh)
        gemm(dw_hh, dg2, ms.reshape(T * B, H), trans_a=True)
        gemm(dw_mh, dmhs.reshape(T * B, H), h_prev, trans_a=True)
    else:
        gemm(dw_hh, dg2, h_prev, trans_a=True)
    column_sum(db_hh, dg2)


# ------------------------------------------------------------------- output

@cuda.jit
def _softmax_cross_entropy_kernel(dlogits, losses, logits, targets, scale):
    # one thread per row; float64 sums, float32 exponentials, as on the CPU
    n = cuda.grid(1)
    if n >= logits.shape[0]:
        return
    V = logits.shape[1]
    m = logits[n, 0]
    for v in range(1, V):
        m = max(m, logits[n, v])
    s = 0.0
    for v in range(V):
        e = math.exp(logits[n, v] - m)
        dlogits[n, v] = e
        s += e
    target = targets[n]
    losses[n] = math.log(s) + m - logits[n, target]
    inv = scale / s
    for v in range(V):
        dlogits[n, v] *= inv
    dlogits[n, target] -= scale


def softmax_cross_entropy(dlogits, logits, targets, scale):
    """Fused softmax + cross-entropy + gradient.

    Returns sum_n -log softmax(logits[n])[targets[n]] as a Python float (the
    per-row losses, float64, are summed on the host, exactly rounded) and writes
    dlogits = scale * (softmax(logits) - onehot(targets)).
    """
    N = logits.shape[0]
    losses = cuda.device_array(N, dtype=np.float64)
    _softmax_cross_entropy_kernel[_launch(N)](dlogits, losses, logits, targets,
                                             float(scale))
    return math.fsum(losses.copy_to_host())


# ---------------------------------------------------------------- optimizers
# One fused pass over the flat parameter buffer each, with the scalars worked
# out on the host exactly as cpu.py does (float64, then rounded to float32).

@cuda.jit
def _squared_norm_kernel(partials, g):
    # Each block sums the squares of its TPB elements in a fixed tree order.
    buf = cuda.shared.array(TPB, float64)
    k = cuda.grid(1)
    tid = cuda.threadIdx.x
    x = float64(g[k]) if k < g.shape[0] else 0.0
    buf[tid] = x * x
    cuda.syncthreads()
    stride = TPB // 2
    while stride > 0:
        if tid < stride:
            buf[tid] += buf[tid + stride]
        cuda.syncthreads()
        stride //= 2
    if tid == 0:
        partials[cuda.blockIdx.x] = buf[0]


def squared_norm(g):
    """sum g^2 in float64: a fixed-order tree reduction per block of TPB
    elements, then the block sums added on the host, exactly rounded. The same
    bits every run."""
    blocks = max(1, -(-g.shape[0] // TPB))
    partials = cuda.device_array(blocks, dtype=np.float64)
    _squared_norm_kernel[blocks, TPB](partials, g)
    return math.fsum(partials.copy_to_host())


@cuda.jit
def _adam_kernel(p, g, m, v, step_size, inv_sqrt_bc2, b1, b2, e, shrink, l2, sc):
    k = cuda.grid(1)
    if k < p.shape[0]:
        gk = g[k] * sc + l2 * p[k]
        m[k] = b1 * m[k] + (_ONE - b1) * gk
        v[k] = b2 * v[k] + (_ONE - b2) * gk * gk
        p[k] = p[k] * shrink - step_size * m[k] / (math.sqrt(v[k]) * inv_sqrt_bc2 + e)


def adam_update(p, g, m, v, lr, beta1, beta2, eps, wd, decoupled, step, scale):
    """Adam / AdamW (PyTorch's formulation, bias-corrected)."""
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    f32 = np.float32
    _adam_kernel[_launch(p.shape[0])](
        p, g, m, v, f32(lr / bc1), f32(1.0 / math.sqrt(bc2)), f32(beta1), f32(beta2),
        f32(eps), f32(1.0 - lr * wd) if decoupled else _ONE,
        f32(0.0 if decoupled else wd), f32(scale))


@cuda.jit
def _rmsprop_kernel(p, g, v, buf, lr, a, e, l2, mu, sc):
    k = cuda.grid(1)
    if k < p.shape[0]:
        gk = g[k] * sc + l2 * p[k]
        v[k] = a * v[k] + (_ONE - a) * gk * gk
        u = gk / (math.sqrt(v[k]) + e)
        if mu > _ZERO:
            buf[k] = mu * buf[k] + u
            u = buf[k]
        p[k] -= lr * u


def rmsprop_update(p, g, v, buf, lr, alpha, eps, wd, momentum, scale):
    """RMSprop (PyTorch's: eps outside the root; optional momentum)."""
    f32 = np.float32
    _rmsprop_kernel[_launch(p.shape[0])](p, g, v, buf, f32(lr), f32(alpha), f32(eps),
                                         f32(wd), f32(momentum), f32(scale))


@cuda.jit
def _adagrad_kernel(p, g, s, lr, e, l2, sc):
    k = cuda.grid(1)
    if k < p.shape[0]:
        gk = g[k] * sc + l2 * p[k]
        s[k] += gk * gk
        p[k] -= lr * gk / (math.sqrt(s[k]) + e)


def adagrad_update(p, g, s, lr, eps, wd, scale):
    """Adagrad (PyTorch's, without learning-rate decay)."""
    f32 = np.float32
    _adagrad_kernel[_launch(p.shape[0])](p, g, s, f32(lr), f32(eps), f32(wd), f32(scale))


@cuda.jit
def _sgd_kernel(p, g, buf, lr, mu, l2, sc):
    k = cuda.grid(1)
    if k < p.shape[0]:
        gk = g[k] * sc + l2 * p[k]
        if mu > _ZERO:
            buf[k] = mu * buf[k] + gk
            gk = buf[k]
        p[k] -= lr * gk


def sgd_update(p, g, buf, lr, momentum, wd, scale):
    """SGD with optional (heavy-ball) momentum, PyTorch's convention."""
    f32 = np.float32
    _sgd_kernel[_launch(p.shape[0])](p, g, buf, f32(lr), f32(momentum), f32(wd), f32(scale))


@cuda.jit
def _average_kernel(avg, p, d):
    k = cuda.grid(1)
    if k < p.shape[0]:
        avg[k] = d * avg[k] + (float32(1.0) - d) * p[k]


def average_update(avg, p, decay):
    """avg = decay * avg + (1 - decay) * p: the weights' exponential moving
    average, used for evaluation and sampling (Polyak averaging)."""
    _average_kernel[_launch(p.shape[0])](avg, p, np.float32(decay))


# ---------------------------------------------------------------- generation

@cuda.jit(device=True)
def _prob(logits, s, v, m, inv_t):
    # unnormalised probability of v, rounded to float32 as cpu.pick_token's
    # probs buffer holds it; recomputed where needed instead of stored
    return float32(math.exp((logits[s, v] - m) * inv_t))


@cuda.jit(device=True)
def _before(pa, a, pb, b):
    # the order top-k / top-p walk: more probable first, ties by lower id
    return pa > pb or (pa == pb and a < b)


@cuda.jit
def _pick_tokens_kernel(ids_out, logits, temperature, top_k, top_p, uniforms):
    """One thread per stream; the rule of cpu.pick_token.

    Top-k / top-p keep a prefix of the tokens sorted by probability: the walk
    stops at the first token it drops. So instead of a sorted copy, the thread
    finds the prefix's last token (cut) by selection, summing the kept mass in
    sorted order as the CPU does, and then keeps exactly the tokens that come
    no later than the cut.
    """
    s = cuda.grid(1)
    if s >= logits.shape[0]:
        return
    V = logits.shape[1]
    best = 0
    for v in range(1, V):
        if logits[s, v] > logits[s, best]:
            best = v
    if temperature == 0:
        ids_out[s] = best
        return
    m = logits[s, best]
    inv_t = 1.0 / temperature
    cut_p, cut = float32(-1.0), V  # comes after every token: keep all
    if (0 < top_k < V) or top_p < 1.0:
        total = 0.0
        for v in range(V):
            total += _prob(logits, s, v, m, inv_t)
        cut_p, cut = float32(math.inf), -1  # comes before every token: keep none yet
        mass = 0.0
        for r in range(V):
            if (top_k > 0 and r >= top_k) or mass >= top_p * total:
                break
            nxt_p, nxt = float32(-1.0), V  # the first token after the cut
            for v in range(V):
                pv = _prob(logits, s, v, m, inv_t)
                if _before(cut_p, cut, pv, v) and _before(pv, v, nxt_p, nxt):
                    nxt_p, nxt = pv, v
            mass += nxt_p
            cut_p, cut = nxt_p, nxt
    # draw: scan the kept tokens in vocabulary order until the mass passes u * total
    total = 0.0
    for v in range(V):
        pv = _prob(logits, s, v, m, inv_t)
        if not _before(cut_p, cut, pv, v):
            total += pv
    target = uniforms[s] * total
    acc = 0.0
    pick = best
    for v in range(V):
        pv = _prob(logits, s, v, m, inv_t)
        if pv > _ZERO and not _before(cut_p, cut, pv, v):
            acc += pv
            pick = v
            if acc > target:
                break
    ids_out[s] = pick


def pick_tokens(ids_out, logits, temperature, top_k, top_p, uniforms):
    """ids_out[s] = cpu.pick_token(logits[s], ..., uniforms[s]) for every stream s.

    Draws from softmax(logits / temperature) restricted to the top_k most
    likely (0: all) and to the smallest set whose probability reaches top_p
    (1: all); temperature 0 means argmax. ids_out [S] int32, logits [S,V],
    uniforms [S] in [0, 1). Probabilities that tie exactly at the top-k /
    top-p boundary are kept lower id first (the CPU's argsort leaves that
    order unspecified).
    """
    S = logits.shape[0]
    _pick_tokens_kernel[_launch(S)](ids_out, logits, float(temperature), int(top_k),
                                    float(top_p), uniforms)
