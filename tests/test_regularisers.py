"""The regularisers (output dropout, weight drop, embedding dropout, locked
dropout, zoneout) and the weights' moving average, proven like the cells: against
the float64 reference with the same masks, finite differences, PyTorch with
the same weights and masks, and in training (same seed, exact resume)."""
import numpy as np
import pytest

import reference as ref
from charrnn import Model, generate
from charrnn.errors import CharrnnError
from charrnn.kernels import cpu as K
from charrnn.optim import Optimizer

V, H, E, B, T = 7, 5, 3, 2, 4
REGULARISERS = {
    "output": dict(output_dropout=0.3),
    "weight-drop": dict(weight_drop=0.4),
    "embed-dropout-onehot": dict(embed_dropout=0.3),
    "embed-dropout-embedding": dict(embed_dropout=0.3, embed=E),
    "locked": dict(dropout=0.3, output_dropout=0.3, locked_dropout=True),
    "all": dict(dropout=0.2, output_dropout=0.2, weight_drop=0.3, embed_dropout=0.2,
                locked_dropout=True, embed=E),
    "all-multiplicative": dict(dropout=0.2, output_dropout=0.2, weight_drop=0.3, embed_dropout=0.2,
                               multiplicative=True),
}
LSTM_ONLY = {  # zoneout holds the LSTM's cell
    "zoneout": dict(zoneout=0.4),
    "zoneout-layer-norm": dict(zoneout=0.4, layer_norm=True),
    "all-lstm": dict(REGULARISERS["all"], zoneout=0.3, layer_norm=True),
    "all-lstm-multiplicative": dict(REGULARISERS["all"], zoneout=0.3, layer_norm=True,
                                    multiplicative=True),
}
CASES = [(cell, name) for cell in ("lstm", "gru", "rnn") for name in REGULARISERS] + \
        [("lstm", name) for name in LSTM_ONLY]


def options(name):
    return {**REGULARISERS, **LSTM_ONLY}[name]


def ref_cell(cell, opts):
    """reference.forward's name for the cell with these options."""
    return ("lstm-ln" if opts.get("layer_norm") else cell) + ("-m" if opts.get("multiplicative") else "")


def make_model(cell="lstm", layers=2, dtype=np.float64, seed=1, **regularisers):
    return Model(V, cell=cell, hidden=H, layers=layers, seed=seed, dtype=dtype, **regularisers)


def window(seed=0, batch=B):
    stream = np.random.default_rng(seed).integers(0, V, size=(batch, T + 1))
    return stream[:, :-1], stream[:, 1:]


def rel_err(a, b):
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12)


@pytest.mark.parametrize("cell,name", CASES)
def test_training_pass_equals_the_reference_with_the_same_masks(cell, name):
    m = make_model(cell, **options(name))
    x, y = window()
    outputs, weights, updates = ref.next_noise(m, T, B)
    loss, _, state = m.loss_and_grads(x, y)
    want, want_state = ref.loss(ref.dropped(m.state_dict(), weights), x, y, ref_cell(cell, options(name)),
                                2, masks=outputs, updates=updates)
    assert loss == pytest.approx(want, rel=1e-12)
    for got, w in zip(state, want_state):
        np.testing.assert_allclose(got, w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cell,name", CASES)
def test_gradients_through_the_masks_match_finite_differences(cell, name):
    m = make_model(cell, **options(name))
    params = m.state_dict()
    x, y = window()
    outputs, weights, updates = ref.next_noise(m, T, B)
    _, grads, _ = m.loss_and_grads(x, y)
    fd = ref.finite_difference_grads(
        lambda p: ref.loss(ref.dropped(p, weights), x, y, ref_cell(cell, options(name)), 2,
                           masks=outputs, updates=updates)[0], params)
    for k in params:
        assert rel_err(grads[k], fd[k]) < 1e-6, k


def test_some_masks_drop_and_others_keep():
    m = make_model(seed=2, **REGULARISERS["all"])  # a seed whose 7-row embedding mask drops one
    outputs, weights, _ = ref.next_noise(m, T, B)
    for mask in [o for o in outputs if o is not None] + list(weights.values()):
        assert (mask == 0).any() and (mask > 1).any()


def test_zoneout_holds_some_cells_and_updates_others():
    m = make_model(zoneout=0.5)
    _, _, updates = ref.next_noise(m, T, B)
    for u in updates:
        assert set(np.unique(u)) == {0.0, 1.0}


def test_a_held_cell_keeps_its_value_exactly():
    m = make_model(zoneout=0.5, dtype=np.float32, layers=1)
    x, _ = window()
    state = tuple(np.random.default_rng(1).standard_normal((1, B, H)).astype(np.float32) for _ in range(2))
    _, _, updates = ref.next_noise(m, 1, B)
    _, _, after = m.loss_and_grads(x[:, :1], x[:, :1], state)
    held = updates[0][0] == 0
    assert held.any() and np.array_equal(after[1][0][held], state[1][0][held])


def test_inference_takes_zoneouts_expected_share_of_each_new_cell():
    m = make_model(zoneout=0.4)
    x, y = window()
    want, want_state = ref.loss(m.state_dict(), x, y, "lstm", 2, updates=0.6)
    loss, state = m.loss(x, y)
    assert loss == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(state[1], want_state[1], rtol=1e-12, atol=1e-14)


def test_sampling_steps_like_the_forward_pass_with_zoneout():
    m = make_model(zoneout=0.4, dtype=np.float32)
    ids = window()[0][:1]
    streams = generate.streams_for(m, 1)
    for t in range(T):
        streams.step(ids[:, t].astype(np.int32))
    logits, state = m.forward(ids)
    np.testing.assert_allclose(streams.logits, logits[:, -1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(streams.cs, state[1], rtol=1e-5, atol=1e-6)


def test_zoneout_is_for_the_lstm():
    with pytest.raises(CharrnnError, match="zoneout"):
        make_model("gru", zoneout=0.2)


def test_locked_masks_are_the_same_at_every_step_of_a_window():
    m = make_model(dropout=0.5, locked_dropout=True)
    outputs, _, _ = ref.next_noise(m, T, B)
    x, y = window()
    loss, _, _ = m.loss_and_grads(x, y)
    assert all(np.array_equal(outputs[0][t], outputs[0][0]) for t in range(T))
    assert loss == pytest.approx(ref.loss(m.state_dict(), x, y, "lstm", 2, masks=outputs)[0], rel=1e-12)


@pytest.mark.parametrize("name", REGULARISERS)
def test_inference_uses_the_weights_undropped(name):
    opts = REGULARISERS[name]
    structure = {k: opts[k] for k in ("embed", "multiplicative") if k in opts}  # not regularisers
    plain, regularised = make_model(**structure), make_model(**opts)
    x, y = window()
    assert np.array_equal(plain.forward(x)[0], regularised.forward(x)[0])
    assert plain.loss(x, y)[0] == regularised.loss(x, y)[0]


@pytest.mark.parametrize("name", REGULARISERS)
def test_a_training_pass_leaves_the_weights_undropped(name):
    m = make_model(**REGULARISERS[name])
    before = m.state_dict()
    m.loss_and_grads(*window())
    after = m.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_ranks_parts_of_a_batch_draw_the_whole_batchs_masks():
    """Under MPI each rank runs part of the batch: the parts' summed losses
    and gradients are the whole batch's, masks on weights included."""
    opts = LSTM_ONLY["all-lstm"]
    x, y = window(batch=6)
    whole = make_model(**opts)
    total, _ = whole.window(x, y, train=True)
    grads = whole.grads.copy()
    parts_total, parts_grads = 0.0, np.zeros_like(grads)
    for first, last in ((0, 2), (2, 6)):
        part = make_model(**opts)
        t, _ = part.window(x[first:last], y[first:last], train=True, part=(first, 6))
        parts_total += t
        parts_grads += part.grads
    assert parts_total == pytest.approx(total, rel=1e-12)
    np.testing.assert_allclose(parts_grads, grads, rtol=1e-10, atol=1e-14)


def test_losses_with_every_regulariser_are_reproducible_for_a_seed():
    def run():
        m = make_model(dtype=np.float32, seed=7, **LSTM_ONLY["all-lstm"])
        return [m.loss_and_grads(*window(seed))[0] for seed in range(3)]
    assert run() == run()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_loss_and_gradients_match_torch_with_the_same_masks(cell):
    torch = pytest.importorskip("torch")
    from torch.func import functional_call
    m = make_model(cell, dtype=np.float32, **REGULARISERS["all"])
    params = m.state_dict()
    x, y = window()
    outputs, weights, _ = ref.next_noise(m, T, B)
    loss, grads, _ = m.loss_and_grads(x, y)

    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    masks = {k: torch.from_numpy(np.ascontiguousarray(v, np.float32)) for k, v in weights.items()}
    used = {k: leaves[k] * masks[k] if k in masks else leaves[k] for k in leaves}
    layers = [{"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[cell](E if k == 0 else H, H, 1, batch_first=True)
              for k in range(2)]
    h = torch.nn.functional.embedding(torch.from_numpy(x.astype(np.int64)), used["encoder.weight"])
    for k, layer in enumerate(layers):
        h, _ = functional_call(layer, {f"{w}_l0": used[f"rnn.{w}_l{k}"]
                                       for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}, (h,))
        h = h * torch.from_numpy(np.ascontiguousarray(outputs[k].transpose(1, 0, 2), np.float32))
    logits = h @ used["decoder.weight"].T + used["decoder.bias"]
    tloss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.from_numpy(y.astype(np.int64)).reshape(-1))
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-5)
    for k in params:
        assert rel_err(grads[k], leaves[k].grad.numpy()) < 1e-4, k


@pytest.mark.parametrize("layer_norm", [False, True], ids=["lstm", "lstm_ln"])
def test_zoneout_loss_and_gradients_match_torch_autograd(layer_norm):
    # torch.nn has no zoneout: the cell written in torch ops, with the model's draws
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    m = make_model(dtype=np.float32, zoneout=0.4, dropout=0.2, layer_norm=layer_norm)
    x, y = window()
    outputs, _, updates = ref.next_noise(m, T, B)
    loss, grads, _ = m.loss_and_grads(x, y)
    w = {k: torch.from_numpy(v).requires_grad_() for k, v in m.state_dict().items()}

    def ln(a, k, q):  # block q of layer k's layer norm, or nothing without one
        if not layer_norm:
            return a
        blk = slice(q * H, (q + 1) * H)
        return F.layer_norm(a, (H,), w[f"rnn.layer_norm_l{k}"][0, blk], w[f"rnn.layer_norm_l{k}"][1, blk])
    inp = F.one_hot(torch.from_numpy(x.astype(np.int64)), V).float()
    for k in range(2):
        h, c, outs = torch.zeros(B, H), torch.zeros(B, H), []
        for t in range(T):
            a = inp[:, t] @ w[f"rnn.weight_ih_l{k}"].T + w[f"rnn.bias_ih_l{k}"] \
                + h @ w[f"rnn.weight_hh_l{k}"].T + w[f"rnn.bias_hh_l{k}"]
            i, f, g, o = (ln(a[:, q * H:(q + 1) * H], k, q) for q in range(4))
            u = torch.from_numpy(updates[k][t].astype(np.float32))
            c = u * (torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)) + (1 - u) * c
            h = torch.sigmoid(o) * torch.tanh(ln(c, k, 4))
            outs.append(h)
        mask = outputs[k] if outputs[k] is not None else np.ones((T, B, H))
        inp = torch.stack(outs, 1) * torch.from_numpy(np.ascontiguousarray(mask.transpose(1, 0, 2), np.float32))
    logits = inp @ w["decoder.weight"].T + w["decoder.bias"]
    tloss = F.cross_entropy(logits.reshape(-1, V), torch.from_numpy(y.astype(np.int64)).reshape(-1))
    tloss.backward()
    assert loss == pytest.approx(tloss.item(), rel=1e-5)
    for k, t in w.items():
        assert rel_err(grads[k], t.grad.numpy()) < 1e-4, k


# ------------------------------------------------------- the weights' average

def test_average_update_kernel_is_the_moving_average():
    rng = np.random.default_rng(0)
    avg, p = rng.standard_normal(1000).astype(np.float32), rng.standard_normal(1000).astype(np.float32)
    want = 0.9 * avg.astype(np.float64) + 0.1 * p
    K.average_update(avg, p, 0.9)
    np.testing.assert_allclose(avg, want, rtol=1e-6, atol=1e-6)


def test_the_average_follows_each_update_with_a_warmed_up_decay():
    m = make_model(dtype=np.float32)
    opt = Optimizer.for_model(m, "sgd", average=0.99)
    avg = m.params.astype(np.float64)
    for t in range(1, 30):
        m.loss_and_grads(*window(t))
        opt.step(0.1)
        d = min(0.99, (1 + t) / (10 + t))
        avg = d * avg + (1 - d) * m.params
    np.testing.assert_allclose(opt.state_dict()["average"], avg, rtol=1e-5, atol=1e-6)


def test_averaged_weights_are_in_the_model_for_the_block_only():
    m = make_model(dtype=np.float32)
    opt = Optimizer.for_model(m, "adam", average=0.9)
    for t in range(5):
        m.loss_and_grads(*window(t))
        opt.step(0.05)
    weights, average = m.params.copy(), opt.state_dict()["average"]
    assert not np.array_equal(weights, average)
    with opt.averaged_weights():
        assert np.array_equal(m.params, average)
    assert np.array_equal(m.params, weights)


def test_without_an_average_the_block_keeps_the_weights():
    m = make_model(dtype=np.float32)
    opt = Optimizer.for_model(m, "adam")
    with opt.averaged_weights():
        assert "average" not in opt.state_dict()
        weights = m.params.copy()
    assert np.array_equal(m.params, weights)
