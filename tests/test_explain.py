"""Seeing inside: the numbers behind the explain page, the page itself and
the loss curves."""
import json
import math
import re

import numpy as np
import pytest
from click.testing import CliRunner

import charrnn
import reference as ref
from charrnn import CharrnnError, Model, Vocab
from charrnn import explain as E
from charrnn.cli import main
from charrnn.generate import score

TEXT = ('He said "to be, or not to be" (that is the question)\n'
        "and then [quietly] went home.\n") * 40


def model_for(text, cell="lstm", hidden=16, layers=2, embed=None, dtype=np.float32):
    vocab = Vocab(text)
    m = Model(len(vocab), cell=cell, hidden=hidden, layers=layers, embed=embed, seed=2, dtype=dtype)
    m.vocab = vocab
    return m


@pytest.fixture(scope="module", params=["lstm", "gru", "rnn"])
def explained(request):
    m = model_for(TEXT, cell=request.param)
    return m, m.explain(TEXT)


def test_surprisal_sums_to_the_total_that_eval_scores(explained):
    m, ex = explained
    r = score(m, TEXT)
    assert len(TEXT) > 2 * E.WINDOW  # several passes, the state carried
    assert math.isnan(ex.surprisal[0])
    assert np.nansum(ex.surprisal) * math.log(2) == pytest.approx(r["nats"] * r["chars"], rel=1e-6)
    assert ex.bpc == pytest.approx(r["bpc"], rel=1e-6)


def test_activations_are_the_states_model_forward_reaches(explained):
    m, ex = explained
    ids = m.vocab.encode(TEXT)
    for n in (0, 5, E.WINDOW - 1, E.WINDOW, len(ids) - 1):
        _, state = m.forward(ids[None, :n + 1])
        np.testing.assert_allclose(ex.h[n], state[0][:, 0], atol=2e-6)
        if ex.c is not None:
            np.testing.assert_allclose(ex.c[n], state[1][:, 0], atol=2e-6)


def test_top_guesses_are_the_most_likely_next_characters(explained):
    m, ex = explained
    ids = m.vocab.encode(TEXT)
    logits, _ = m.forward(ids[None, :30])
    p = np.exp(logits[0] - logits[0].max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for n in range(1, 30):
        assert ex.top_ids[n, 0] == np.argmax(p[n - 1])
        np.testing.assert_allclose(ex.top_probs[n], np.sort(p[n - 1])[::-1][:E.TOP_K], rtol=1e-4)


def test_gate_saturation_is_the_share_of_characters_beyond_0_1_and_0_9(explained):
    m, ex = explained
    if m.config["cell"] == "rnn":
        assert ex.gates is None and ex.saturation == {}
        return
    forget = 1 if m.config["cell"] == "lstm" else 0
    name = "forget" if m.config["cell"] == "lstm" else "reset"
    g = ex.gates[:, 1, forget]
    np.testing.assert_allclose(ex.saturation[1][name][:, 0], (g < 0.1).mean(0))
    np.testing.assert_allclose(ex.saturation[1][name][:, 1], (g > 0.9).mean(0))


def test_ranked_units_track_their_feature(explained):
    m, ex = explained
    f = E.text_features(ex.text)
    assert ex.units
    for u in ex.units[:5]:
        a = ex.h if u["kind"] == "h" else np.tanh(ex.c)
        r = np.corrcoef(a[:, u["layer"], u["unit"]], f[:, E.FEATURES.index(u["feature"])])[0, 1]
        assert r == pytest.approx(u["corr"], abs=2e-3)


@pytest.mark.parametrize("embed", [None, 3])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_input_gradients_match_finite_differences(cell, embed):
    m = model_for("abcdefg", cell=cell, hidden=5, embed=embed, dtype=np.float64)
    params = m.state_dict()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 7, (2, 6)), rng.integers(0, 7, (2, 6))
    w = rng.random((2, 6))
    got = m.input_gradients(x, y, w)
    table = params["encoder.weight"] if embed else np.eye(7)
    inputs = table[x]  # [B, T, D]

    def weighted_loss(inp):
        logits, _ = ref.forward_inputs(params, [inp[:, t] for t in range(6)], cell, 2)
        z = logits - logits.max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return -(w * np.take_along_axis(logp, y[..., None], -1)[..., 0]).sum()
    fd = np.zeros_like(inputs)
    for i in np.ndindex(inputs.shape):
        up, down = inputs.copy(), inputs.copy()
        up[i] += 1e-6
        down[i] -= 1e-6
        fd[i] = (weighted_loss(up) - weighted_loss(down)) / 2e-6
    np.testing.assert_allclose(got, fd, rtol=1e-5, atol=1e-8)


def test_gradient_reach_fades_with_distance(explained):
    m, ex = explained
    assert len(ex.reach) == 101 and ex.reach_positions == 64
    assert np.all(ex.reach > 0) and ex.reach[0] > 10 * ex.reach[-1]


def test_unknown_characters_are_named_and_can_be_skipped():
    m = model_for("abc")
    with pytest.raises(CharrnnError, match=r"'z'.*--skip-unknown"):
        m.explain("abcz")
    assert m.explain("abzc", skip_unknown=True).skipped == 1


def test_a_bytes_model_explains_raw_bytes():
    vocab = Vocab(TEXT.encode(), mode="bytes")
    m = Model(len(vocab), hidden=8, layers=1)
    m.vocab = vocab
    assert len(m.explain(TEXT[:100]).surprisal) == 100


# ------------------------------------------------------------------ the page

def _data(path):
    body = path.read_text(encoding="utf-8")
    raw = re.search(r'<script id="data" type="application/json">(.*?)</script>', body, re.S).group(1)
    return body, json.loads(raw)


def test_the_page_is_self_contained(tmp_path):
    m = model_for(TEXT)
    E.page(m, TEXT, tmp_path / "p.html", title="t")
    body, data = _data(tmp_path / "p.html")
    assert not re.search(r'(src|href)\s*=', body)  # nothing loaded from anywhere
    assert re.findall(r"https?://[^\"' ]+", body) == ["http://www.w3.org/2000/svg"]  # a name, not a fetch
    assert data["text"] == TEXT and data["chars"] == len(TEXT) and data["notes"] == []


def test_a_longer_text_is_cut_and_the_page_says_so(tmp_path):
    m = model_for(TEXT)
    E.page(m, TEXT, tmp_path / "p.html", max_chars=500)
    _, data = _data(tmp_path / "p.html")
    assert data["chars"] == 500 and f"first 500 of {len(TEXT):,} characters" in data["notes"][0]


def test_more_units_than_fit_are_cut_and_the_page_says_so(tmp_path, monkeypatch):
    m = model_for(TEXT, hidden=16)
    monkeypatch.setattr(E, "MAX_SERIES_CELLS", len(TEXT) * 2 * 2 * 5)  # 5 units of each layer and state
    E.page(m, TEXT, tmp_path / "p.html")
    _, data = _data(tmp_path / "p.html")
    assert data["units"] == 5 and "units 0-4 of 16" in data["notes"][0]
    assert all(u["unit"] < 5 for u in data["ranked"])


def test_the_page_for_20000_characters_of_a_2x256_lstm_stays_under_15_mb(tmp_path):
    text = (TEXT * 8)[:20_000]
    m = model_for(text, hidden=256)
    E.page(m, text, tmp_path / "p.html")
    assert (tmp_path / "p.html").stat().st_size <= 15e6


def test_cli_explain_writes_the_page_and_bad_input_is_one_line(tmp_path):
    m = model_for(TEXT)
    m.save(tmp_path / "m.ckpt")
    (tmp_path / "in.txt").write_text(TEXT[:300])
    run = lambda *a: CliRunner().invoke(main, ["explain", str(tmp_path / "m.ckpt"), *map(str, a)])  # noqa: E731
    r = run(tmp_path / "in.txt", "-o", tmp_path / "p.html")
    assert r.exit_code == 0 and (tmp_path / "p.html").exists(), r.output
    for args, message in [(("--text", "abc\u263a", "-o", tmp_path / "q.html"), "'\u263a'"),
                          (("--text", "", "-o", tmp_path / "q.html"), "empty"),
                          (("--text", "to be", "-o", tmp_path / "no" / "p.html"), "cannot write"),
                          ((), "give a FILE or --text")]:
        r = run(*args)
        assert r.exit_code == 1 and message in r.output and r.output.count("\n") == 1, r.output


# ------------------------------------------------------------------ curves

def test_plot_draws_several_runs_even_one_still_training(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "c.txt").write_text(TEXT)
    for name in ("a", "b"):
        charrnn.train(tmp_path / "c.txt", out=tmp_path / name, steps=10, hidden=8, batch=4, seq_len=8,
                      dropout=0.25, eval_every=5, quiet=True)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"step": 15, "val_lo')  # a line being written by a running training
    for out in ("curves.png", "curves.svg"):
        r = CliRunner().invoke(main, ["plot", str(tmp_path / "a"), str(tmp_path / "b"),
                                      "-o", str(tmp_path / out)])
        assert r.exit_code == 0, r.output
        assert (tmp_path / out).stat().st_size > 1000
    assert "lstm 2x8, dropout 0.25, lr 0.006" in E_label(tmp_path / "a")


def E_label(run):
    from charrnn.plot import run_label
    return run_label(run)


def test_train_plot_writes_curves_into_the_run(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "c.txt").write_text(TEXT)
    charrnn.train(tmp_path / "c.txt", out=tmp_path / "r", steps=10, hidden=8, batch=4, seq_len=8,
                  eval_every=5, quiet=True, plot=True)
    assert (tmp_path / "r" / "curves.png").stat().st_size > 1000


def test_plotting_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    (tmp_path / "r").mkdir()
    r = CliRunner().invoke(main, ["plot", str(tmp_path / "r"), "-o", str(tmp_path / "c.png")])
    assert r.exit_code == 1 and 'pip install "charrnn[plot]"' in r.output
