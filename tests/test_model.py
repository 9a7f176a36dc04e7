"""The model's forward pass and BPTT against the float64 reference, finite
differences and (where installed) PyTorch."""
import contextlib

import numpy as np
import pytest

import reference as ref
from charrnn import CharrnnError, Model, parallel

V, H, E, B, T = 7, 5, 3, 2, 4
# "lstm-ln": the LSTM with layer_norm (reference.cell_step); "-m": multiplicative
# (reference.forward_inputs)
CELLS = [("lstm", "tanh"), ("lstm-ln", "tanh"), ("gru", "tanh"), ("rnn", "tanh"), ("rnn", "relu"),
         ("lstm-m", "tanh"), ("lstm-ln-m", "tanh"), ("gru-m", "tanh"), ("rnn-m", "tanh")]
CONFIGS = [(c, nl, L, e) for c, nl in CELLS for L in (1, 2) for e in (None, E)]
IDS = [f"{c}-{nl}-L{L}-{'emb' if e else 'onehot'}" for c, nl, L, e in CONFIGS]


def make_model(cell, nl, layers, embed, dtype=np.float64, dropout=0.0, seed=1):
    name = cell.removesuffix("-m")
    m = Model(V, cell=name.removesuffix("-ln"), hidden=H, layers=layers, embed=embed,
              dropout=dropout, seed=seed, nonlinearity=nl, dtype=dtype,
              layer_norm=name.endswith("-ln"), multiplicative=cell.endswith("-m"))
    rng = np.random.default_rng(seed)
    for k in range(layers):  # gains and biases away from their 1 and 0, so that tests see them
        norm = m.weights.get(f"rnn.layer_norm_l{k}")
        if norm is not None:
            norm[0], norm[1] = rng.uniform(0.5, 1.5, norm.shape[1]), rng.uniform(-0.5, 0.5, norm.shape[1])
    return m


def windows(seed=0):
    """Two consecutive windows (x, y) of a random character stream."""
    stream = np.random.default_rng(seed).integers(0, V, size=(B, 2 * T + 1))
    return [(stream[:, k * T:(k + 1) * T], stream[:, k * T + 1:(k + 1) * T + 1]) for k in (0, 1)]


def rel_err(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


def as64(params):
    return {k: v.astype(np.float64) for k, v in params.items()}


@pytest.mark.parametrize("cell,nl,layers,embed", CONFIGS, ids=IDS)
def test_forward_matches_reference_over_two_windows(cell, nl, layers, embed):
    m = make_model(cell, nl, layers, embed, dtype=np.float32)
    params = as64(m.state_dict())
    state = ref_state = None
    for x, _ in windows():
        logits, state = m.forward(x, state)
        want, ref_state = ref.forward(params, x, cell, layers, nl, ref_state)
        assert rel_err(logits, want) < 1e-5
    for got, want in zip(state, ref_state):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("cell,nl,layers,embed", CONFIGS, ids=IDS)
def test_loss_matches_reference_over_two_windows(cell, nl, layers, embed):
    m = make_model(cell, nl, layers, embed, dtype=np.float32)
    params = as64(m.state_dict())
    state = ref_state = None
    for x, y in windows():
        loss, _, state = m.loss_and_grads(x, y, state)
        want, ref_state = ref.loss(params, x, y, cell, layers, nl, ref_state)
        assert loss == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("cell,nl,layers,embed", CONFIGS, ids=IDS)
def test_gradients_match_finite_differences(cell, nl, layers, embed):
    m = make_model(cell, nl, layers, embed)
    params = m.state_dict()
    (x1, y1), (x2, y2) = windows()
    _, _, state = m.loss_and_grads(x1, y1)
    _, grads, _ = m.loss_and_grads(x2, y2, state)
    # truncated BPTT: the incoming state is a constant of the second window
    _, ref_state = ref.forward(params, x1, cell, layers, nl)
    fd = ref.finite_difference_grads(
        lambda p: ref.loss(p, x2, y2, cell, layers, nl, ref_state)[0], params)
    for name in params:
        assert rel_err(grads[name], fd[name]) < 1e-6, name


def _next_dropout_masks(m, T, B):
    """The masks the model's next training pass draws (Model.rng_state says
    how): one [T, B, H] per layer below the top."""
    return ref.next_noise(m, T, B)[0][:m.config["layers"] - 1]


@pytest.mark.parametrize("cell", ["lstm", "lstm-ln", "gru", "rnn"])
def test_dropout_uses_the_same_mask_forward_and_backward(cell):
    m = make_model(cell, "tanh", 3, None, dropout=0.4)
    params = m.state_dict()
    (x, y), _ = windows()
    masks = _next_dropout_masks(m, T, B)
    loss, grads, _ = m.loss_and_grads(x, y)
    assert any((mk == 0).any() for mk in masks)
    want, _ = ref.loss(params, x, y, cell, 3, masks=masks)
    assert loss == pytest.approx(want, rel=1e-12)
    fd = ref.finite_difference_grads(lambda p: ref.loss(p, x, y, cell, 3, masks=masks)[0], params)
    for name in params:
        assert rel_err(grads[name], fd[name]) < 1e-6, name


def test_dropout_is_off_in_forward_and_loss():
    (x, y), _ = windows()
    plain = make_model("lstm", "tanh", 2, None)
    dropped = make_model("lstm", "tanh", 2, None, dropout=0.5)
    assert np.array_equal(plain.forward(x)[0], dropped.forward(x)[0])
    assert plain.loss(x, y)[0] == dropped.loss(x, y)[0]


def test_dropout_masks_scale_kept_units_by_inverse_keep_rate():
    m = make_model("gru", "tanh", 2, None, dropout=0.25)
    x, y = windows()[0]
    masks = _next_dropout_masks(m, T, B)
    loss, _, _ = m.loss_and_grads(x, y)
    assert set(np.unique(masks[0])) == {0.0, np.float64(1 / 0.75)}
    # the model applied exactly these masks
    assert loss == pytest.approx(ref.loss(m.state_dict(), x, y, "gru", 2, masks=masks)[0], rel=1e-12)



@pytest.fixture
def threads():
    """Set the thread count (which sets the number of training shards) for
    the test, and put it back."""
    with contextlib.ExitStack() as stack:
        yield lambda n: stack.enter_context(parallel.thread_limit(n))


@pytest.mark.parametrize("cell", ["lstm", "lstm-ln", "gru", "rnn"])
def test_batch_shards_give_the_one_shard_losses_gradients_and_states(cell, threads):
    stream = np.random.default_rng(3).integers(0, V, size=(9, 2 * T + 1))
    x1, y1, x2, y2 = stream[:, :T], stream[:, 1:T + 1], stream[:, T:2 * T], stream[:, T + 1:]
    results = []
    for n in (1, 2):
        threads(n)
        m = make_model(cell, "tanh", 3, E, dropout=0.3)  # float64: only the sum order differs
        loss1, _, state = m.loss_and_grads(x1, y1)
        loss2, grads, state = m.loss_and_grads(x2, y2, state)
        val, _ = m.loss(x2, y2, state)
        results.append((loss1, loss2, val, {k: g.copy() for k, g in grads.items()}, state))
    assert parallel.shard_cuts(9) == [0, 4, 9]  # two shards of 4 and 5 streams ran
    (a1, a2, av, ag, ast), (b1, b2, bv, bg, bst) = results
    assert (a1, a2, av) == pytest.approx((b1, b2, bv), rel=1e-13)
    for name in ag:
        assert rel_err(bg[name], ag[name]) < 1e-12, name
    for sa, sb in zip(ast, bst):
        np.testing.assert_allclose(sb, sa, rtol=1e-12)


def test_state_from_another_batch_size_is_an_error():
    m = make_model("lstm", "tanh", 2, None)
    (x, y), _ = windows()
    _, state = m.forward(x)
    with pytest.raises(CharrnnError, match="different batch size"):
        m.forward(np.zeros((B + 1, T), dtype=np.int32), state)


def test_state_of_the_wrong_kind_is_an_error():
    m = make_model("lstm", "tanh", 2, None)
    with pytest.raises(CharrnnError, match="tuple of 2"):
        m.forward(np.zeros((B, T), dtype=np.int32), (np.zeros((2, B, H)),))


def test_ids_outside_the_vocabulary_are_an_error():
    m = make_model("rnn", "tanh", 1, None)
    with pytest.raises(CharrnnError, match="outside"):
        m.forward(np.full((B, T), V))


def test_state_dict_has_pytorch_names_and_shapes():
    m = Model(V, cell="gru", hidden=H, layers=2, embed=E)
    shapes = {k: v.shape for k, v in m.state_dict().items()}
    assert shapes == {
        "encoder.weight": (V, E),
        "rnn.weight_ih_l0": (3 * H, E), "rnn.weight_hh_l0": (3 * H, H),
        "rnn.bias_ih_l0": (3 * H,), "rnn.bias_hh_l0": (3 * H,),
        "rnn.weight_ih_l1": (3 * H, H), "rnn.weight_hh_l1": (3 * H, H),
        "rnn.bias_ih_l1": (3 * H,), "rnn.bias_hh_l1": (3 * H,),
        "decoder.weight": (V, H), "decoder.bias": (V,),
    }


def test_one_hot_input_weight_is_gates_by_vocab():
    m = Model(V, cell="lstm", hidden=H, layers=1)
    assert m.state_dict()["rnn.weight_ih_l0"].shape == (4 * H, V)
    assert "encoder.weight" not in m.state_dict()


def test_state_dict_round_trips():
    a, b = Model(V, hidden=H, seed=1), Model(V, hidden=H, seed=2)
    b.load_state_dict(a.state_dict())
    assert all(np.array_equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_load_state_dict_rejects_a_wrong_name():
    m = Model(V, hidden=H)
    d = m.state_dict()
    d["rnn.weight_xx_l0"] = d.pop("rnn.weight_ih_l0")
    with pytest.raises(CharrnnError, match="missing rnn.weight_ih_l0; unexpected rnn.weight_xx_l0"):
        m.load_state_dict(d)


def test_load_state_dict_rejects_a_wrong_shape():
    m = Model(V, hidden=H)
    d = m.state_dict()
    d["decoder.bias"] = np.zeros(V + 1)
    with pytest.raises(CharrnnError, match="decoder.bias has shape"):
        m.load_state_dict(d)


def test_initialisation_is_pytorchs_uniform_and_seeded():
    m = Model(V, hidden=16, layers=2, embed=4, seed=3)
    bound = 1 / np.sqrt(16)
    for name, w in m.state_dict().items():
        if name != "encoder.weight":
            assert np.abs(w).max() <= bound
    assert np.array_equal(m.params, Model(V, hidden=16, layers=2, embed=4, seed=3).params)
    assert not np.array_equal(m.params, Model(V, hidden=16, layers=2, embed=4, seed=4).params)


@pytest.mark.parametrize("kwargs,match", [
    (dict(cell="transformer"), "cell must be"),
    (dict(hidden=0), "hidden must be"),
    (dict(layers=0), "layers must be"),
    (dict(dropout=1.0), "dropout must be"),
    (dict(cell="lstm", nonlinearity="relu"), "not available"),
    (dict(hidden=3, layer_norm=True), "layer_norm needs hidden >= 4"),
])
def test_impossible_configurations_are_clear_errors(kwargs, match):
    with pytest.raises(CharrnnError, match=match):
        Model(V, **kwargs)


def test_losses_are_reproducible_for_a_seed():
    def run():
        m = make_model("lstm", "tanh", 2, None, dtype=np.float32, dropout=0.3, seed=7)
        state, out = None, []
        for x, y in windows():
            loss, _, state = m.loss_and_grads(x, y, state)
            out.append(loss)
        return out
    assert run() == run()


# ------------------------------------------------------------------ PyTorch

# torch.nn has no LN-LSTM and no multiplicative cells
TORCH_NN = [(i, c) for i, c in zip(IDS, CONFIGS) if c[0] in ("lstm", "gru", "rnn")]
LN_CONFIGS = [(L, e, mult) for L in (1, 2) for e in (None, E) for mult in (False, True)]


@pytest.mark.parametrize("cell,nl,layers,embed", [c for _, c in TORCH_NN], ids=[i for i, _ in TORCH_NN])
def test_loss_and_gradients_match_torch(cell, nl, layers, embed):
    torch = pytest.importorskip("torch")
    m = make_model(cell, nl, layers, embed, dtype=np.float32)
    params = m.state_dict()
    rnn_cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell]
    kw = {"nonlinearity": nl} if cell == "rnn" else {}
    rnn = rnn_cls(embed or V, H, layers, batch_first=True, **kw)
    decoder = torch.nn.Linear(H, V)
    encoder = torch.nn.Embedding(V, embed) if embed else None
    with torch.no_grad():
        for name, w in params.items():
            mod, attr = name.split(".")
            getattr({"rnn": rnn, "decoder": decoder, "encoder": encoder}[mod], attr).copy_(
                torch.from_numpy(w))
    modules = {"rnn": rnn, "decoder": decoder, "encoder": encoder}

    def torch_loss(x, y, state):
        xt = torch.from_numpy(np.asarray(x, dtype=np.int64))
        inp = encoder(xt) if embed else torch.nn.functional.one_hot(xt, V).float()
        out, state = rnn(inp, state)
        logits = decoder(out)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, V),
                                                 torch.from_numpy(np.asarray(y, np.int64)).reshape(-1)), state

    state = tstate = None
    for x, y in windows():
        loss, grads, state = m.loss_and_grads(x, y, state)
        for mod in modules.values():
            if mod is not None:
                mod.zero_grad()
        tloss, tstate = torch_loss(x, y, tstate)
        tloss.backward()
        tstate = tuple(s.detach() for s in tstate) if isinstance(tstate, tuple) else tstate.detach()
        assert loss == pytest.approx(tloss.item(), rel=1e-5)
        for name in params:
            mod, attr = name.split(".")
            tg = getattr(modules[mod], attr).grad.numpy()
            assert rel_err(grads[name], tg) < 1e-4, name


@pytest.mark.parametrize("layers,embed,mult", LN_CONFIGS)
def test_layer_norm_lstm_loss_and_gradients_match_torch_autograd(layers, embed, mult):
    # torch.nn has no LN-LSTM: the cell written in torch ops (F.layer_norm), differentiated by
    # autograd; ``mult``: the multiplicative LN-LSTM, m = (W_mx x + b_mx) * (W_mh h) for h in W_hh h
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    m = make_model("lstm-ln-m" if mult else "lstm-ln", "tanh", layers, embed, dtype=np.float32)
    w = {k: torch.from_numpy(v).requires_grad_() for k, v in m.state_dict().items()}

    def ln(a, norm, blk):
        return F.layer_norm(a, (H,), norm[0, blk], norm[1, blk])

    def torch_loss(x, y, state):
        xt = torch.from_numpy(np.asarray(x, dtype=np.int64))
        inp = w["encoder.weight"][xt] if embed else F.one_hot(xt, V).float()
        hs, cs = [], []
        for k in range(layers):
            h, c = (torch.zeros(B, H), torch.zeros(B, H)) if state is None else (state[0][k], state[1][k])
            norm, outs = w[f"rnn.layer_norm_l{k}"], []
            for t in range(T):
                x = inp[:, t] @ w[f"rnn.weight_ih_l{k}"].T + w[f"rnn.bias_ih_l{k}"]
                r = x[:, 4 * H:] * (h @ w[f"rnn.weight_mh_l{k}"].T) if mult else h
                a = x[:, :4 * H] + r @ w[f"rnn.weight_hh_l{k}"].T + w[f"rnn.bias_hh_l{k}"]
                i, f, g, o = (ln(a[:, q * H:(q + 1) * H], norm, slice(q * H, (q + 1) * H))
                              for q in range(4))
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(ln(c, norm, slice(4 * H, 5 * H)))
                outs.append(h)
            inp = torch.stack(outs, 1)
            hs.append(h.detach())
            cs.append(c.detach())
        logits = inp @ w["decoder.weight"].T + w["decoder.bias"]
        loss = F.cross_entropy(logits.reshape(-1, V), torch.from_numpy(np.asarray(y, np.int64)).reshape(-1))
        return loss, (hs, cs)

    state = tstate = None
    for x, y in windows():
        loss, grads, state = m.loss_and_grads(x, y, state)
        for t in w.values():
            t.grad = None
        tloss, tstate = torch_loss(x, y, tstate)
        tloss.backward()
        assert loss == pytest.approx(tloss.item(), rel=1e-5)
        for name, t in w.items():
            assert rel_err(grads[name], t.grad.numpy()) < 1e-4, name


@pytest.mark.parametrize("cell,beta2,optimizer,weight_decay", [
    ("lstm", 0.999, "adam", 0.0), ("gru", 0.999, "adam", 0.0), ("lstm", 0.99, "adam", 0.0),
    ("lstm", 0.999, "adam", 0.1), ("lstm", 0.999, "adamw", 0.1)])
def test_ten_clipped_adam_steps_match_torch(cell, beta2, optimizer, weight_decay):
    torch = pytest.importorskip("torch")
    from charrnn.optim import Optimizer
    m = make_model(cell, "tanh", 2, None, dtype=np.float32)
    rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](V, H, 2, batch_first=True)
    decoder = torch.nn.Linear(H, V)
    modules = {"rnn": rnn, "decoder": decoder}
    with torch.no_grad():
        for name, w in m.state_dict().items():
            mod, attr = name.split(".")
            getattr(modules[mod], attr).copy_(torch.from_numpy(w))
    params = list(rnn.parameters()) + list(decoder.parameters())
    topt = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer](
        params, lr=0.05, betas=(0.9, beta2), weight_decay=weight_decay)
    opt = Optimizer(optimizer, m.params, m.grads, weight_decay=weight_decay, beta2=beta2)
    rng = np.random.default_rng(1)
    state = tstate = None
    for _ in range(10):
        stream = rng.integers(0, V, size=(B, T + 1))
        x, y = stream[:, :-1], stream[:, 1:]
        loss, _, state = m.loss_and_grads(x, y, state)
        opt.step(0.05, clip=0.5)
        topt.zero_grad()
        xt = torch.nn.functional.one_hot(torch.from_numpy(x), V).float()
        out, tstate = rnn(xt, tstate)
        tloss = torch.nn.functional.cross_entropy(decoder(out).reshape(-1, V),
                                                  torch.from_numpy(y).reshape(-1))
        tloss.backward()
        tstate = tuple(s.detach() for s in tstate) if isinstance(tstate, tuple) else tstate.detach()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        topt.step()
        assert loss == pytest.approx(tloss.item(), rel=1e-4)
    for name, w in m.state_dict().items():
        mod, attr = name.split(".")
        assert rel_err(w, getattr(modules[mod], attr).detach().numpy()) < 1e-4, name


def test_a_model_too_large_for_memory_is_a_clear_error():
    with pytest.raises(CharrnnError, match="GiB"):
        Model(V, hidden=60_000, layers=8)
