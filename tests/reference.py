"""The specification: slow, obviously correct float64 NumPy char-LMs.

Written from the equations, one time step and one layer at a time, sharing
no code with charrnn's kernels. Weights use PyTorch's names and layouts.
"""
import numpy as np

GATES = {"lstm": 4, "lstm-ln": 4, "gru": 3, "rnn": 1}


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def layer_norm(a, gain, bias, eps=1e-5):
    """Each row of a normalised to mean 0 and variance 1 (+ eps), scaled, shifted."""
    mean = a.mean(axis=-1, keepdims=True)
    var = ((a - mean) ** 2).mean(axis=-1, keepdims=True)
    return (a - mean) / np.sqrt(var + eps) * gain + bias


def cell_step(cell, nonlinearity, x, h, c, w_ih, w_hh, b_ih, b_hh, norm=None, update=1.0,
              w_mh=None):
    """One step of one layer for a batch: x [B,in], h, c [B,H] -> (h, c).
    "lstm-ln": the LSTM with each gate block's pre-activation and the cell
    layer-normalised; norm [2, 5H]: gains and biases, blocks i, f, g, o, c.
    ``update`` (LSTMs): zoneout's share of the new cell value the cell
    takes, [B,H] or one number: c = update*c_new + (1-update)*c_prev.
    ``w_mh`` [H,H] (multiplicative): the last H rows of w_ih and b_ih make
    m = (W_mx x + b_mx) * (W_mh h), which W_hh reads instead of h."""
    H = h.shape[1]
    gi = x @ w_ih.T + b_ih
    if w_mh is None:
        gh = h @ w_hh.T + b_hh
    else:
        gi, mx = gi[:, :-H], gi[:, -H:]
        gh = (mx * (h @ w_mh.T)) @ w_hh.T + b_hh
    if cell == "lstm-ln":
        a = gi + gh
        blocks = [layer_norm(a[:, q * H:(q + 1) * H], norm[0, q * H:(q + 1) * H],
                             norm[1, q * H:(q + 1) * H]) for q in range(4)]
        i, f, g, o = sigmoid(blocks[0]), sigmoid(blocks[1]), np.tanh(blocks[2]), sigmoid(blocks[3])
        c = update * (f * c + i * g) + (1 - update) * c
        return o * np.tanh(layer_norm(c, norm[0, 4 * H:], norm[1, 4 * H:])), c
    if cell == "lstm":
        a = gi + gh
        i = sigmoid(a[:, :H])
        f = sigmoid(a[:, H:2 * H])
        g = np.tanh(a[:, 2 * H:3 * H])
        o = sigmoid(a[:, 3 * H:])
        c = update * (f * c + i * g) + (1 - update) * c
        return o * np.tanh(c), c
    if cell == "gru":
        r = sigmoid(gi[:, :H] + gh[:, :H])
        z = sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
        n = np.tanh(gi[:, 2 * H:] + r * gh[:, 2 * H:])
        return (1 - z) * n + z * h, c
    a = gi + gh
    return (np.tanh(a) if nonlinearity == "tanh" else np.maximum(a, 0)), c


def forward(params, x, cell, layers, nonlinearity="tanh", state=None, masks=None, updates=None):
    """Logits [B,T,V] of ids x [B,T] and the final state (h [L,B,H], c [L,B,H]).

    ``masks[k]`` [T,B,H] multiplies layer k's output before layer k+1
    reads it, or, for the top layer, before the decoder (inverted dropout,
    already scaled); None (the list or an entry) means no dropout there.
    ``updates``: zoneout (LSTMs), one number for every layer, step and unit
    (1 - the rate at inference), or a list of [T,B,H] draws per layer
    (cell_step's ``update``); None: 1.
    """
    B, T = x.shape
    V = params["decoder.weight"].shape[0]
    if "encoder.weight" in params:
        inputs = [params["encoder.weight"][x[:, t]] for t in range(T)]
    else:
        inputs = [np.eye(V)[x[:, t]] for t in range(T)]
    return forward_inputs(params, inputs, cell, layers, nonlinearity, state, masks, updates)


def forward_inputs(params, inputs, cell, layers, nonlinearity="tanh", state=None, masks=None,
                   updates=None):
    """``forward`` from the first layer's input vectors: inputs[t] [B, in]
    (embedding rows, or one-hot rows). A cell named with "-m" ("lstm-m",
    "lstm-ln-m", ...) is multiplicative: ``params`` hold its W_mh
    (cell_step's ``w_mh``)."""
    cell = cell.removesuffix("-m")
    B, T = inputs[0].shape[0], len(inputs)
    H = params["decoder.weight"].shape[1]
    h0 = np.zeros((layers, B, H)) if state is None else state[0]
    c0 = np.zeros((layers, B, H)) if state is None or len(state) < 2 else state[1]
    hs, cs = [], []
    for k in range(layers):
        h, c = h0[k], c0[k]
        outputs = []
        for t in range(T):
            h, c = cell_step(cell, nonlinearity, inputs[t], h, c,
                             params[f"rnn.weight_ih_l{k}"], params[f"rnn.weight_hh_l{k}"],
                             params[f"rnn.bias_ih_l{k}"], params[f"rnn.bias_hh_l{k}"],
                             params.get(f"rnn.layer_norm_l{k}"),
                             1.0 if updates is None else updates if np.isscalar(updates)
                             else updates[k][t], params.get(f"rnn.weight_mh_l{k}"))
            outputs.append(h)
        hs.append(h)
        cs.append(c)
        if masks is not None and k < len(masks) and masks[k] is not None:
            outputs = [o * masks[k][t] for t, o in enumerate(outputs)]
        inputs = outputs
    logits = np.stack([o @ params["decoder.weight"].T + params["decoder.bias"]
                       for o in inputs], axis=1)
    state = (np.stack(hs), np.stack(cs)) if cell.startswith("lstm") else (np.stack(hs),)
    return logits, state


def cross_entropy(logits, y):
    """Mean negative log-likelihood of targets y [B,T] under logits [B,T,V]."""
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(logp, y[..., None], axis=-1).mean()


def loss(params, x, y, cell, layers, nonlinearity="tanh", state=None, masks=None, updates=None):
    logits, state = forward(params, x, cell, layers, nonlinearity, state, masks, updates)
    return cross_entropy(logits, y), state


def finite_difference_grads(f, params, eps=1e-5):
    """Central differences of the scalar f(params) for every entry of every array
    (eps 1e-5: truncation error ~eps^2 ~1e-10, which the layer norm's curvature
    makes count at 1e-4; round-off ~1e-16/eps, still far below)."""
    grads = {}
    for name, w in params.items():
        g = np.zeros_like(w)
        flat, gflat = w.reshape(-1), g.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + eps
            up = f(params)
            flat[i] = old - eps
            down = f(params)
            flat[i] = old
            gflat[i] = (up - down) / (2 * eps)
        grads[name] = g
    return grads


def splitmix64(seed, n):
    """The first ``n`` outputs of SplitMix64 seeded with ``seed``, in numpy's
    wrapping uint64 arithmetic."""
    z = np.uint64(seed) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def next_noise(m, T, B):
    """What charrnn model ``m``'s next training pass over B streams of T
    steps draws, in the order ``Model.rng_state`` documents: the masks on
    the layers' outputs [T,B,H] (None where off; for ``forward``'s
    ``masks``), the masks on weights, by parameter name (``dropped``), and
    zoneout's draws per layer [T,B,H] (``forward``'s ``updates``; None
    when off)."""
    rng = np.random.default_rng()
    rng.bit_generator.state = m.rng_state
    c = m.config
    L, H, V = c["layers"], c["hidden"], c["vocab_size"]
    steps = 1 if c["locked_dropout"] else T

    def mask(shape, p, value=None):
        key = rng.integers(2**64, dtype=np.uint64)
        kept = splitmix64(key, int(np.prod(shape))) >> np.uint64(32) >= np.uint64(p * 2**32)
        return kept.reshape(shape) * (1.0 / (1.0 - p) if value is None else value)
    outputs = [None] * L
    if c["dropout"]:
        for k in range(L - 1):
            outputs[k] = np.broadcast_to(mask((steps, B, H), c["dropout"]), (T, B, H))
    if c["output_dropout"]:
        outputs[L - 1] = np.broadcast_to(mask((steps, B, H), c["output_dropout"]), (T, B, H))
    weights = {}
    if c["weight_drop"]:
        for k in range(L):
            name = f"rnn.weight_hh_l{k}"
            weights[name] = mask(m.shapes[name], c["weight_drop"])
    if c["embed_dropout"]:
        rows = mask((V, 1), c["embed_dropout"])
        weights["encoder.weight" if c["embed"] else "rnn.weight_ih_l0"] = rows if c["embed"] else rows.T
    updates = [mask((T, B, H), c["zoneout"], 1.0) for _ in range(L)] if c["zoneout"] else None
    return outputs, weights, updates


def dropped(params, weight_masks):
    """The parameters with the weights' masks applied."""
    return {k: v * weight_masks[k] if k in weight_masks else v for k, v in params.items()}
