"""Checks of charrnn.kernels.cuda against charrnn.kernels.cpu, for
tests/test_cuda_kernels.py, which runs this script in a subprocess:

    NUMBA_ENABLE_CUDASIM=1 python tests/cuda_kernel_checks.py sim [--shard i/n] [names...]
    python tests/cuda_kernel_checks.py ptx

``sim`` runs every CUDA kernel on numba-cuda's simulator next to its CPU twin
on the same random inputs (tiny shapes: the simulator runs each GPU thread as
a Python thread). ``ptx`` compiles every kernel for a real GPU (sm_80) without
one, which type-checks what the simulator does not; it needs NVVM, e.g. from
``numba-cuda[cu13]``.

Prints one JSON object per line. The first is ``{"check": "usable", ...}``:
whether numba-cuda (not the deprecated numba.cuda built into numba) can run
here at all. Then one line per check, with either the measurements or the
traceback of the failure, so that one broken kernel does not hide the rest.
"""
import argparse
import json
import os
import time
import traceback
import zlib

import numpy as np

H, B, T, V, E = 8, 2, 4, 7, 3
CELLS = {"lstm": (0, 4), "gru": (1, 3), "rnn_tanh": (2, 1), "rnn_relu": (3, 1)}  # id, gates


def emit(**record):
    print(json.dumps(record), flush=True)


def probe_sim():
    """None if numba-cuda's simulator runs a kernel, else why not."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        return "NUMBA_ENABLE_CUDASIM=1 is not set"
    try:
        from numba import cuda
        if getattr(cuda, "implementation", "Built-in") != "NVIDIA":
            return "numba-cuda is not installed (numba.cuda is numba's built-in target)"

        @cuda.jit
        def one(a):
            a[0] = 1.0

        a = cuda.to_device(np.zeros(1, np.float32))
        one[1, 1](a)
        if a.copy_to_host()[0] != 1.0:
            return "the simulator ran a kernel but got a wrong result"
    except Exception as exc:  # any failure means: not usable here
        return f"{type(exc).__name__}: {exc}"
    return None


def rel(got, want):
    """max |got - want| / max |want|  (the absolute error if want is all 0)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


# ------------------------------------------------------------------ sim checks

def sim_checks():
    from numba import cuda

    from charrnn.kernels import cpu
    from charrnn.kernels import cuda as gpu

    rng = None  # reseeded for every check: its inputs do not depend on which others run
    dev = cuda.to_device

    def randn(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def random_ids(n):
        return rng.integers(0, V, n).astype(np.int32)

    def host(d):
        return d.copy_to_host()

    checks = {}

    def register(name, fn):
        def run():
            nonlocal rng
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            return fn()
        checks[name] = run

    def check(fn):
        register(fn.__name__, fn)
        return fn

    # ---- GEMM: no CPU twin (np.dot inside the CPU kernels), so float64 NumPy
    # Shapes straddle the 16x16 tiles: partial tiles in M, N and K.
    def gemm_case(trans_a, trans_b):
        M, K, N = 5, 19, 18
        a = randn(K, M) if trans_a else randn(M, K)
        b = randn(N, K) if trans_b else randn(K, N)
        want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b)
        c = dev(np.zeros((M, N), np.float32))
        gpu.gemm(c, dev(a), dev(b), trans_a=trans_a, trans_b=trans_b)
        return {"c": rel(host(c), want)}

    for ta in (False, True):
        for tb in (False, True):
            name = f"gemm_{'t' if ta else 'n'}{'t' if tb else 'n'}"
            register(name, lambda ta=ta, tb=tb: gemm_case(ta, tb))

    @check
    def gemm_beta():
        a, b, c0 = randn(3, 20), randn(20, 17), randn(3, 17)
        c = dev(c0)
        gpu.gemm(c, dev(a), dev(b), beta=0.5)
        return {"c": rel(host(c), a.astype(np.float64) @ b + 0.5 * c0)}

    @check
    def gemm_beta0_ignores_c():
        a, b = randn(3, 4), randn(4, 5)
        c = dev(np.full((3, 5), np.nan, np.float32))
        gpu.gemm(c, dev(a), dev(b))
        return {"c": rel(host(c), a.astype(np.float64) @ b)}

    # ---- input side
    @check
    def embedding_forward():
        table, bias, ids = randn(V, E), randn(E), random_ids(T * B)
        want = np.zeros((T * B, E), np.float32)
        cpu.embedding_forward(want, table, ids, bias)
        out = dev(np.zeros_like(want))
        gpu.embedding_forward(out, dev(table), dev(ids), dev(bias))
        return {"out": rel(host(out), want)}

    @check
    def embedding_backward():
        dout, ids = randn(T * B, E), random_ids(T * B)
        dtable, dbias = np.zeros((V, E), np.float32), np.zeros(E, np.float32)
        cpu.embedding_backward(dtable, dbias, dout, ids)
        d_dtable = dev(np.full((V, E), np.nan, np.float32))  # overwritten, not added to
        d_dbias = dev(np.full(E, np.nan, np.float32))
        gpu.embedding_backward(d_dtable, d_dbias, dev(dout), dev(ids))
        return {"dtable": rel(host(d_dtable), dtable), "dbias": rel(host(d_dbias), dbias)}

    @check
    def linear_forward():
        x, w, b = randn(T * B, E), randn(H, E), randn(H)
        want = np.zeros((T * B, H), np.float32)
        cpu.linear_forward(want, x, w, b)
        out = dev(np.zeros_like(want))
        gpu.linear_forward(out, dev(x), dev(w), dev(b))
        return {"out": rel(host(out), want)}

    @check
    def linear_backward():
        dout, x, w = randn(T * B, H), randn(T * B, E), randn(H, E)
        dx, dw, db = np.zeros_like(x), np.zeros_like(w), np.zeros(H, np.float32)
        cpu.linear_backward(dx, dw, db, dout, x, w)
        g = [dev(np.full_like(a, np.nan)) for a in (dx, dw, db)]
        gpu.linear_backward(*g, dev(dout), dev(x), dev(w))
        return {"dx": rel(host(g[0]), dx), "dw": rel(host(g[1]), dw), "db": rel(host(g[2]), db)}

    @check
    def column_sum():
        a = randn(T * B, 2 * H)
        want = np.zeros(2 * H, np.float32)
        cpu.column_sum(want, a)
        out = dev(np.full_like(want, np.nan))
        gpu.column_sum(out, dev(a))
        return {"out": rel(host(out), want)}

    @check
    def apply_dropout():
        x = randn(T, B, H)
        mask = ((rng.random((T, B, H)) >= 0.3) / 0.7).astype(np.float32)
        want = np.zeros_like(x)
        cpu.apply_dropout(want, x, mask)
        out = dev(np.zeros_like(x))
        gpu.apply_dropout(out, dev(x), dev(mask))
        return {"out": rel(host(out), want)}

    # ---- recurrent layers: the CPU forward's saved state feeds both backwards
    def layer(name):
        cell, G = CELLS[name]
        GH = G * H
        st = {
            "xp": randn(T, B, GH, scale=0.8), "w_hh": randn(GH, H, scale=0.4),
            "b_hh": randn(GH, scale=0.2), "hs": np.zeros((T + 1, B, H), np.float32),
            "cs": np.zeros((T + 1, B, H) if name == "lstm" else (1, 1, 1), np.float32),
            "gates": np.zeros((T, B, GH), np.float32),
            "hn": np.zeros((T, B, H) if name == "gru" else (1, 1, 1), np.float32),
            "gh": np.zeros((B, GH), np.float32),
        }
        st["hs"][0] = randn(B, H, scale=0.5)
        if name == "lstm":
            st["cs"][0] = randn(B, H, scale=0.5)
        return cell, st

    FWD = ("xp", "w_hh", "b_hh", "hs", "cs", "gates", "hn", "gh")

    def forward_case(name):
        cell, st = layer(name)
        d = {k: dev(v) for k, v in st.items()}
        cpu.recurrent_forward(cell, *(st[k] for k in FWD))
        gpu.recurrent_forward(cell, *(d[k] for k in FWD))
        got = {"hs": rel(host(d["hs"])[1:], st["hs"][1:])}
        if name == "lstm":
            got["cs"] = rel(host(d["cs"])[1:], st["cs"][1:])
        if name in ("lstm", "gru"):
            got["gates"] = rel(host(d["gates"]), st["gates"])
        if name == "gru":
            got["hn"] = rel(host(d["hn"]), st["hn"])
        return got

    def backward_case(name):
        cell, st = layer(name)
        cpu.recurrent_forward(cell, *(st[k] for k in FWD))
        GH = st["xp"].shape[2]
        dh_out = randn(T, B, H)
        out = {"dxp": np.zeros((T, B, GH), np.float32), "dw_hh": np.zeros((GH, H), np.float32),
               "db_hh": np.zeros(GH, np.float32)}
        out["dgh"] = np.zeros((T, B, GH), np.float32) if name == "gru" else out["dxp"]
        scratch = [np.zeros((B, H), np.float32) for _ in range(2)]
        st["w_hh_t"] = np.ascontiguousarray(st["w_hh"].T)
        saved = [st[k] for k in ("w_hh_t", "hs", "cs", "gates", "hn")]
        cpu.recurrent_backward(cell, dh_out, *saved, out["dxp"], out["dgh"], *scratch,
                               out["dw_hh"], out["db_hh"])
        d = {k: dev(np.full_like(v, np.nan)) for k, v in out.items()}
        if name != "gru":
            d["dgh"] = d["dxp"]  # LSTM/RNN: the same array, as the caller passes it
        gpu.recurrent_backward(cell, dev(dh_out), *map(dev, saved), d["dxp"], d["dgh"],
                               *(dev(np.full_like(s, np.nan)) for s in scratch),
                               d["dw_hh"], d["db_hh"])
        names = ("dxp", "dgh", "dw_hh", "db_hh") if name == "gru" else ("dxp", "dw_hh", "db_hh")
        return {k: rel(host(d[k]), out[k]) for k in names}

    for name in CELLS:
        register(f"recurrent_forward_{name}", lambda name=name: forward_case(name))
        register(f"recurrent_backward_{name}", lambda name=name: backward_case(name))

    # ---- output
    @check
    def softmax_cross_entropy():
        logits, targets = randn(T * B, V, scale=2.0), random_ids(T * B)
        want = np.zeros_like(logits)
        loss = cpu.softmax_cross_entropy(want, logits, targets, 1.0 / (T * B))
        d = dev(np.zeros_like(logits))
        got = gpu.softmax_cross_entropy(d, dev(logits), dev(targets), 1.0 / (T * B))
        return {"dlogits": rel(host(d), want), "loss": rel(got, loss),
                "loss_is_float": isinstance(got, float)}

    # ---- optimizers: three steps, fresh gradients each step
    N = 50

    def optimizer_case(update, n_state, *hyper):
        p = randn(N)
        state = [np.zeros(N, np.float32) for _ in range(n_state)]
        d_p, d_state = dev(p), [dev(s) for s in state]
        for step in range(1, 4):
            g = randn(N)
            extra = (step, 0.7) if update == "adam_update" else (0.7,)
            getattr(cpu, update)(p, g, *state, *hyper, *extra)
            getattr(gpu, update)(d_p, dev(g), *d_state, *hyper, *extra)
        got = {"p": rel(host(d_p), p)}
        for k, (ds, s) in enumerate(zip(d_state, state)):
            got[f"state{k}"] = rel(host(ds), s)
        return got

    optimizers = {
        "adam": ("adam_update", 2, 1e-2, 0.9, 0.999, 1e-8, 0.01, False),
        "adamw": ("adam_update", 2, 1e-2, 0.9, 0.999, 1e-8, 0.01, True),
        "rmsprop": ("rmsprop_update", 2, 1e-2, 0.99, 1e-8, 0.01, 0.0),
        "rmsprop_momentum": ("rmsprop_update", 2, 1e-2, 0.99, 1e-8, 0.0, 0.9),
        "adagrad": ("adagrad_update", 1, 1e-1, 1e-10, 0.01),
        "sgd": ("sgd_update", 1, 1e-1, 0.0, 0.01),
        "sgd_momentum": ("sgd_update", 1, 1e-1, 0.9, 0.0),
    }
    for name, args in optimizers.items():
        register(f"optimizer_{name}", lambda args=args: optimizer_case(*args))

    @check
    def squared_norm():
        g = randn(300)  # three blocks of 128, the last partial
        got = gpu.squared_norm(dev(g))
        return {"norm": rel(got, cpu.squared_norm(g)), "is_float": isinstance(got, float)}

    # ---- sampling: the same ids as cpu.pick_token, stream by stream
    S = 24

    def pick_case(temperature, top_k, top_p):
        logits = randn(S, V, scale=2.0)
        uniforms = rng.random(S)
        probs = np.zeros(V, np.float32)
        want = [int(cpu.pick_token(logits[s], probs, temperature, top_k, top_p, uniforms[s]))
                for s in range(S)]
        ids_out = dev(np.full(S, -1, np.int32))
        gpu.pick_tokens(ids_out, dev(logits), temperature, top_k, top_p, dev(uniforms))
        return {"cpu": want, "cuda": host(ids_out).tolist()}

    picks = {"argmax": (0.0, 0, 1.0), "temperature_1": (1.0, 0, 1.0),
             "top_k": (0.8, 3, 1.0), "top_p": (1.0, 0, 0.7), "top_k_and_top_p": (1.3, 4, 0.8),
             "top_k_beyond_vocabulary": (1.0, V + 5, 1.0),
             "cold_top_p": (0.05, 0, 0.9)}  # most probabilities underflow to 0: ties
    for name, args in picks.items():
        register(f"pick_tokens_{name}", lambda args=args: pick_case(*args))

    return checks


# ------------------------------------------------------------------ ptx check

def ptx_check():
    """Compile every kernel of charrnn.kernels.cuda for sm_80 with the argument
    types the host functions pass: real type inference, no GPU needed."""
    from numba import boolean, cuda
    from numba import float32 as f4
    from numba import float64 as f8
    from numba import int32 as i4
    from numba import int64 as i8

    import numba.cuda.dispatcher as dispatcher
    from types import SimpleNamespace

    # Device functions compile for "the current device", which needs a driver;
    # point them at the same target as the kernels instead.
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=(8, 0))

    from charrnn.kernels import cuda as gpu

    a1, a2, a3, ids = f4[::1], f4[:, ::1], f4[:, :, ::1], i4[::1]
    signatures = {
        "_gemm_kernel": (a2, a2, a2, boolean, boolean, f4),
        "_embedding_forward_kernel": (a2, a2, ids, a1),
        "_embedding_scatter_kernel": (a2, a2, ids),
        "_add_bias_kernel": (a2, a1),
        "_column_sum_kernel": (a1, a2),
        "_multiply_kernel": (a1, a1, a1),
        "_fill_kernel": (a1, f4),
        "_transpose_kernel": (a2, a2),
        "_cell_forward_kernel": (i8, i8, a3, a2, a1, a3, a3, a3, a3),
        "_cell_backward_kernel": (i8, i8, a3, a2, a3, a3, a3, a3, a2, a3, a3),
        "_softmax_cross_entropy_kernel": (a2, f8[::1], a2, ids, f8),
        "_squared_norm_kernel": (f8[::1], a1),
        "_adam_kernel": (a1, a1, a1, a1) + (f4,) * 8,
        "_rmsprop_kernel": (a1, a1, a1, a1) + (f4,) * 6,
        "_adagrad_kernel": (a1, a1, a1) + (f4,) * 4,
        "_sgd_kernel": (a1, a1, a1) + (f4,) * 4,
        "_pick_tokens_kernel": (ids, a2, f8, i8, f8, f8[::1]),
    }
    kernels = sorted(k for k in vars(gpu) if k.endswith("_kernel"))
    compiled, float64_kernels = [], []
    for name in kernels:
        if name in signatures:
            ptx, _ = cuda.compile_ptx(getattr(gpu, name).py_func, signatures[name], cc=(8, 0))
            compiled.append(name)
            if ".f64" in ptx:
                float64_kernels.append(name)
    return {"kernels": kernels, "compiled": compiled, "float64": float64_kernels}


def probe_ptx():
    try:
        from numba import cuda
        if getattr(cuda, "implementation", "Built-in") != "NVIDIA":
            return "numba-cuda is not installed"
        from numba import float32

        def k(a):
            a[0] = 1.0

        cuda.compile_ptx(k, (float32[::1],), cc=(8, 0))
    except Exception as exc:  # no NVVM, typically
        return f"{type(exc).__name__}: {exc}"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["sim", "ptx"])
    parser.add_argument("names", nargs="*", help="run only these checks")
    parser.add_argument("--shard", default="0/1", help="i/n: run every n-th check from the i-th")
    args = parser.parse_intermixed_args()
    why = probe_sim() if args.mode == "sim" else probe_ptx()
    emit(check="usable", ok=why is None, reason=why)
    if why is not None:
        return
    checks = sim_checks() if args.mode == "sim" else {"ptx": ptx_check}
    shard, shards = map(int, args.shard.split("/"))
    for k, (name, fn) in enumerate(checks.items()):
        if k % shards != shard or (args.names and name not in args.names):
            continue
        t0 = time.perf_counter()
        try:
            emit(check=name, result=fn(), seconds=round(time.perf_counter() - t0, 3))
        except Exception:
            emit(check=name, error=traceback.format_exc())


if __name__ == "__main__":
    main()
