"""The CUDA kernels (charrnn.kernels.cuda) compute what their CPU twins do.

Each test runs one kernel on numba-cuda's simulator (see conftest.py) next to
the CPU kernel of the same name on the same random inputs. Shapes are tiny:
the simulator runs every GPU thread as a Python thread. Outputs the CUDA
kernel must overwrite start as NaN. Errors are max |cuda - cpu| / max |cpu|.
"""
import numpy as np
import pytest

from charrnn.kernels import cpu

H, B, T, V, E = 8, 2, 4, 7, 3
# cell -> (kernel id, gate blocks G)
CELLS = {"lstm": (cpu.LSTM, 4), "lstm_ln": (cpu.LN_LSTM, 4), "gru": (cpu.GRU, 3),
         "rnn_tanh": (cpu.RNN_TANH, 1), "rnn_relu": (cpu.RNN_RELU, 1)}
TOL = 1e-5
# cpu.py compiles with fastmath 'reassoc', which lets LLVM regroup
# b2*v + (1-b2)*g*g: the CPU's moment buffers then stray ~2e-5 from exact
# float32 per step (CUDA's stay at ~1e-7), so optimizer state gets this.
STATE_TOL = 1e-4


def rel(got, want):
    """max |got - want| / max |want|  (the absolute error if want is all 0)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def assert_close(errors, tol=TOL):
    assert max(errors.values()) <= tol, errors


@pytest.fixture
def randn(rng):
    return lambda *shape, scale=1.0: (rng.standard_normal(shape) * scale).astype(np.float32)


@pytest.fixture
def random_ids(rng):
    return lambda n: rng.integers(0, V, n).astype(np.int32)


def nan_like(a):
    return np.full_like(a, np.nan)


# ---------------------------------------------------------------------- GEMM
# No CPU twin (np.dot inside the CPU kernels), so float64 NumPy.

@pytest.mark.parametrize("ops", ["nn", "nt", "tn", "tt"])
def test_gemm_matches_numpy_with_partial_tiles_for_every_transpose(gpu, dev, randn, ops):
    trans_a, trans_b = ops[0] == "t", ops[1] == "t"
    M, K, N = 5, 19, 18  # partial tiles in M, N and K
    a = randn(K, M) if trans_a else randn(M, K)
    b = randn(N, K) if trans_b else randn(K, N)
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b)
    c = dev(np.zeros((M, N), np.float32))
    gpu.gemm(c, dev(a), dev(b), trans_a=trans_a, trans_b=trans_b)
    assert_close({"c": rel(c.copy_to_host(), want)})


def test_gemm_adds_beta_times_c(gpu, dev, randn):
    a, b, c0 = randn(3, 20), randn(20, 17), randn(3, 17)
    c = dev(c0)
    gpu.gemm(c, dev(a), dev(b), beta=0.5)
    assert_close({"c": rel(c.copy_to_host(), a.astype(np.float64) @ b + 0.5 * c0)})


def test_gemm_with_beta_0_does_not_read_c(gpu, dev, randn):
    a, b = randn(3, 4), randn(4, 5)
    c = dev(np.full((3, 5), np.nan, np.float32))
    gpu.gemm(c, dev(a), dev(b))
    assert_close({"c": rel(c.copy_to_host(), a.astype(np.float64) @ b)})


# ---------------------------------------------------------------- input side

def test_embedding_forward_matches_cpu(gpu, dev, randn, random_ids):
    table, bias, ids = randn(V, E), randn(E), random_ids(T * B)
    want = np.zeros((T * B, E), np.float32)
    cpu.embedding_forward(want, table, ids, bias)
    out = dev(np.zeros_like(want))
    gpu.embedding_forward(out, dev(table), dev(ids), dev(bias))
    assert_close({"out": rel(out.copy_to_host(), want)})


def test_embedding_backward_overwrites_with_the_cpus_scatter_add(gpu, dev, randn, random_ids):
    dout, ids = randn(T * B, E), random_ids(T * B)
    dtable, dbias = np.zeros((V, E), np.float32), np.zeros(E, np.float32)
    cpu.embedding_backward(dtable, dbias, dout, ids)
    d_dtable, d_dbias = dev(nan_like(dtable)), dev(nan_like(dbias))
    gpu.embedding_backward(d_dtable, d_dbias, dev(dout), dev(ids))
    assert_close({"dtable": rel(d_dtable.copy_to_host(), dtable),
                  "dbias": rel(d_dbias.copy_to_host(), dbias)})


def test_linear_forward_matches_cpu(gpu, dev, randn):
    x, w, b = randn(T * B, E), randn(H, E), randn(H)
    want = np.zeros((T * B, H), np.float32)
    cpu.linear_forward(want, x, w, b)
    out = dev(np.zeros_like(want))
    gpu.linear_forward(out, dev(x), dev(w), dev(b))
    assert_close({"out": rel(out.copy_to_host(), want)})


def test_linear_backward_overwrites_with_the_cpus_gradients(gpu, dev, randn):
    dout, x, w = randn(T * B, H), randn(T * B, E), randn(H, E)
    dx, dw, db = np.zeros_like(x), np.zeros_like(w), np.zeros(H, np.float32)
    cpu.linear_backward(dx, dw, db, dout, x, w)
    g = [dev(nan_like(a)) for a in (dx, dw, db)]
    gpu.linear_backward(*g, dev(dout), dev(x), dev(w))
    assert_close({k: rel(d.copy_to_host(), want)
                  for k, d, want in zip(("dx", "dw", "db"), g, (dx, dw, db))})


def test_column_sum_matches_cpu(gpu, dev, randn):
    a = randn(T * B, 2 * H)
    want = np.zeros(2 * H, np.float32)
    cpu.column_sum(want, a)
    out = dev(nan_like(want))
    gpu.column_sum(out, dev(a))
    assert_close({"out": rel(out.copy_to_host(), want)})


def test_apply_dropout_matches_cpu(gpu, dev, rng, randn):
    x = randn(T, B, H)
    mask = ((rng.random((T, B, H)) >= 0.3) / 0.7).astype(np.float32)
    want = np.zeros_like(x)
    cpu.apply_dropout(want, x, mask)
    out = dev(np.zeros_like(x))
    gpu.apply_dropout(out, dev(x), dev(mask))
    assert_close({"out": rel(out.copy_to_host(), want)})


# ---------------------------------------------------------- recurrent layers
# The CPU forward's saved state feeds both backwards.

FORWARD_ARGS = ("xp", "w_hh", "b_hh", "norm", "update", "mult", "hs", "cs", "gates", "saved", "gh")
SAVED = {"gru": H, "lstm_ln": 5 * H + 5}  # cells.saved_width
# every cell without zoneout (one share, 1), the LSTMs with zoneout's draws,
# and every cell multiplicative
LAYERS = [(name, False, False) for name in CELLS] + [("lstm", True, False), ("lstm_ln", True, False)] \
    + [(name, False, True) for name in CELLS]
LAYER_IDS = [f"{n}{'-zoned' if z else ''}{'-mult' if m else ''}" for n, z, m in LAYERS]


def layer(name, randn, rng, zoned, mult):
    """A layer's inputs and the buffers recurrent_forward fills, as host
    arrays; ``zoned``: zoneout draws (0 or 1 per step, stream and unit);
    ``mult``: multiplicative (xp carries W_mx x, and W_mh)."""
    G = CELLS[name][1]
    GH = G * H
    lstm = name.startswith("lstm")
    st = {
        "xp": randn(T, B, GH + (H if mult else 0), scale=0.8), "w_hh": randn(GH, H, scale=0.4),
        "b_hh": randn(GH, scale=0.2), "hs": np.zeros((T + 1, B, H), np.float32),
        "norm": (np.stack([1 + randn(GH + H, scale=0.3), randn(GH + H, scale=0.3)])
                 if name == "lstm_ln" else np.zeros((2, 1), np.float32)),
        "cs": np.zeros((T + 1, B, H) if lstm else (1, 1, 1), np.float32),
        "gates": np.zeros((T, B, GH), np.float32),
        "saved": np.zeros((T, B, SAVED[name]) if name in SAVED else (T, 1, 1), np.float32),
        "gh": np.zeros((B, GH), np.float32),
        "update": ((rng.random((T, B, H)) >= 0.4).astype(np.float32) if zoned
                   else np.ones((1, 1, 1), np.float32)),
    }
    stand_in = (1, 1)
    st["w_mh"] = randn(H, H, scale=0.4) if mult else np.zeros(stand_in, np.float32)
    st["mhs"], st["ms"] = (np.zeros((T, B, H) if mult else (T, 1, 1), np.float32) for _ in range(2))
    st["mult"] = (st["w_mh"], st["mhs"], st["ms"])
    st["hs"][0] = randn(B, H, scale=0.5)
    if lstm:
        st["cs"][0] = randn(B, H, scale=0.5)
    return st


@pytest.mark.parametrize("name,zoned,mult", LAYERS, ids=LAYER_IDS)
def test_recurrent_forward_matches_cpu(gpu, dev, randn, rng, name, zoned, mult):
    cell = CELLS[name][0]
    st = layer(name, randn, rng, zoned, mult)
    d = {k: dev(v) for k, v in st.items() if k != "mult"}
    d["mult"] = (d["w_mh"], d["mhs"], d["ms"])
    cpu.recurrent_forward(cell, *(st[k] for k in FORWARD_ARGS))
    gpu.recurrent_forward(cell, *(d[k] for k in FORWARD_ARGS))
    errors = {"hs": rel(d["hs"].copy_to_host()[1:], st["hs"][1:])}
    if name.startswith("lstm"):
        errors["cs"] = rel(d["cs"].copy_to_host()[1:], st["cs"][1:])
    if name in ("lstm", "lstm_ln", "gru"):
        errors["gates"] = rel(d["gates"].copy_to_host(), st["gates"])
    if name in SAVED:
        errors["saved"] = rel(d["saved"].copy_to_host(), st["saved"])
    if mult:
        errors["ms"] = rel(d["ms"].copy_to_host(), st["ms"])
    assert_close(errors)


@pytest.mark.parametrize("name,zoned,mult", LAYERS, ids=LAYER_IDS)
def test_recurrent_backward_matches_cpu(gpu, dev, randn, rng, name, zoned, mult):
    cell = CELLS[name][0]
    st = layer(name, randn, rng, zoned, mult)
    cpu.recurrent_forward(cell, *(st[k] for k in FORWARD_ARGS))
    GH, XP = st["w_hh"].shape[0], st["xp"].shape[2]
    dh_out = randn(T, B, H)
    out = {"dxp": np.zeros((T, B, XP), np.float32), "dw_hh": np.zeros((GH, H), np.float32),
           "db_hh": np.zeros(GH, np.float32), "dnorm": np.zeros_like(st["norm"]),
           "dw_mh": np.zeros_like(st["w_mh"])}
    own_dgh = name == "gru" or mult  # else the caller passes dxp as dgh
    out["dgh"] = np.zeros((T, B, GH), np.float32) if own_dgh else out["dxp"]
    scratch = [np.zeros((B, H), np.float32) for _ in range(2)]  # dh_rec, carry
    mult_scratch = [np.zeros_like(st["mhs"]), np.zeros((B, H) if mult else (1, 1), np.float32)]
    st["w_hh_t"] = np.ascontiguousarray(st["w_hh"].T)
    w_mh_t = np.ascontiguousarray(st["w_mh"].T)
    saved = [st[k] for k in ("w_hh_t", "norm", "update")]
    forward = [st[k] for k in ("xp", "hs", "cs", "gates", "saved")]
    cpu.recurrent_backward(cell, dh_out, *saved, (w_mh_t, st["mhs"], st["ms"], *mult_scratch,
                                                  out["dw_mh"]),
                           *forward, out["dxp"], out["dgh"], *scratch,
                           out["dw_hh"], out["db_hh"], out["dnorm"])
    d = {k: dev(nan_like(v)) for k, v in out.items()}
    if not own_dgh:
        d["dgh"] = d["dxp"]  # the same array, as the caller passes it
    gpu.recurrent_backward(cell, dev(dh_out), *map(dev, saved),
                           (dev(w_mh_t), dev(st["mhs"]), dev(st["ms"]),
                            *(dev(nan_like(s)) for s in mult_scratch), d["dw_mh"]),
                           *map(dev, forward), d["dxp"], d["dgh"],
                           *(dev(nan_like(s)) for s in scratch), d["dw_hh"], d["db_hh"],
                           d["dnorm"])
    names = ("dxp", "dw_hh", "db_hh") + (("dgh",) if own_dgh else ()) \
        + (("dnorm",) if name == "lstm_ln" else ()) + (("dw_mh",) if mult else ())
    assert_close({k: rel(d[k].copy_to_host(), out[k]) for k in names})


# -------------------------------------------------------------------- output

def test_softmax_cross_entropy_matches_cpu(gpu, dev, randn, random_ids):
    logits, targets = randn(T * B, V, scale=2.0), random_ids(T * B)
    want = np.zeros_like(logits)
    loss = cpu.softmax_cross_entropy(want, logits, targets, 1.0 / (T * B))
    d = dev(np.zeros_like(logits))
    got = gpu.softmax_cross_entropy(d, dev(logits), dev(targets), 1.0 / (T * B))
    assert isinstance(got, float)
    assert_close({"dlogits": rel(d.copy_to_host(), want), "loss": rel(got, loss)})


# ---------------------------------------------------------------- optimizers
# Three steps, fresh gradients each step.

OPTIMIZERS = {  # update kernel, state buffers, hyperparameters
    "adam": ("adam_update", 2, 1e-2, 0.9, 0.999, 1e-8, 0.01, False),
    "adamw": ("adam_update", 2, 1e-2, 0.9, 0.999, 1e-8, 0.01, True),
    "rmsprop": ("rmsprop_update", 2, 1e-2, 0.99, 1e-8, 0.01, 0.0),
    "rmsprop_momentum": ("rmsprop_update", 2, 1e-2, 0.99, 1e-8, 0.0, 0.9),
    "adagrad": ("adagrad_update", 1, 1e-1, 1e-10, 0.01),
    "sgd": ("sgd_update", 1, 1e-1, 0.0, 0.01),
    "sgd_momentum": ("sgd_update", 1, 1e-1, 0.9, 0.0),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_three_optimizer_steps_match_cpu(gpu, dev, randn, name):
    update, n_state, *hyper = OPTIMIZERS[name]
    N = 50
    p = randn(N)
    state = [np.zeros(N, np.float32) for _ in range(n_state)]
    d_p, d_state = dev(p), [dev(s) for s in state]
    for step in range(1, 4):
        g = randn(N)
        extra = (step, 0.7) if update == "adam_update" else (0.7,)  # (step,) gradient scale
        getattr(cpu, update)(p, g, *state, *hyper, *extra)
        getattr(gpu, update)(d_p, dev(g), *d_state, *hyper, *extra)
    assert_close({"p": rel(d_p.copy_to_host(), p)})
    assert_close({f"state{k}": rel(ds.copy_to_host(), s)
                  for k, (ds, s) in enumerate(zip(d_state, state))}, STATE_TOL)


def test_average_update_matches_cpu(gpu, dev, randn):
    avg, p = randn(300), randn(300)
    want = avg.copy()
    cpu.average_update(want, p, 0.95)
    got = dev(avg)
    gpu.average_update(got, dev(p), 0.95)
    assert_close({"average": rel(got.copy_to_host(), want)})


def test_squared_norm_matches_cpu(gpu, dev, randn):
    g = randn(300)  # three blocks of 128, the last partial
    got = gpu.squared_norm(dev(g))
    assert isinstance(got, float)
    assert_close({"norm": rel(got, cpu.squared_norm(g))})


# ---------------------------------------------------------------- generation

PICKS = {  # temperature, top_k, top_p
    "argmax": (0.0, 0, 1.0), "temperature_1": (1.0, 0, 1.0), "top_k": (0.8, 3, 1.0),
    "top_p": (1.0, 0, 0.7), "top_k_and_top_p": (1.3, 4, 0.8),
    "top_k_beyond_vocabulary": (1.0, V + 5, 1.0),
    "cold_top_p": (0.05, 0, 0.9),  # most probabilities underflow to 0: ties
}


@pytest.mark.parametrize("case", PICKS)
def test_pick_tokens_picks_the_cpus_ids(gpu, dev, rng, randn, case):
    temperature, top_k, top_p = PICKS[case]
    S = 24  # streams
    logits = randn(S, V, scale=2.0)
    uniforms = rng.random(S)
    probs = np.zeros(V, np.float32)
    want = [int(cpu.pick_token(logits[s], probs, temperature, top_k, top_p, uniforms[s]))
            for s in range(S)]
    ids_out = dev(np.full(S, -1, np.int32))
    gpu.pick_tokens(ids_out, dev(logits), temperature, top_k, top_p, dev(uniforms))
    assert ids_out.copy_to_host().tolist() == want
