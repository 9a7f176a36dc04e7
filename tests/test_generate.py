"""Sampling, beam search, evaluation, the Python API and the sample/eval/info
commands."""
import json
import math
import threading

import numpy as np
import pytest
from click.testing import CliRunner

import charrnn
import reference as ref
from charrnn import CharrnnError, Model, Vocab, checkpoint
from charrnn.cli import main
from charrnn.kernels import cpu as K
from charrnn.parallel import cache_aligned, run_ranks, sampling_ranks
from charrnn.generate import (Streams, beam_search, score,
                              sample)

TEXT = "to be or not to be, that is the question.\n" * 20


@pytest.fixture(scope="module", params=["lstm", "gru", "rnn"])
def model(request):
    m = Model(len(Vocab(TEXT)), cell=request.param, hidden=12, layers=2, seed=3)
    m.vocab = Vocab(TEXT)
    return m


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    charrnn.train(_corpus(d), out=d / "run", steps=10, hidden=32, batch=4, seq_len=8,
                  eval_every=5, quiet=True)
    return d / "run"


def _corpus(d):
    (d / "c.txt").write_text(TEXT)
    return d / "c.txt"


def test_sample_starts_with_the_prime_and_has_the_length(model):
    out = model.sample(50, prime="to be", seed=1)
    assert out.startswith("to be") and len(out) == 55


def test_same_seed_gives_the_same_text(model):
    assert model.sample(80, seed=7) == model.sample(80, seed=7)
    assert model.sample(80, seed=7) != model.sample(80, seed=8)


def test_sampling_draws_from_the_models_distribution():
    # with a fixed state the empirical next-char frequencies match softmax(logits)
    v = Vocab("abc")
    m = Model(3, cell="rnn", hidden=4, layers=1, seed=0)
    m.vocab = v
    m.load_state_dict({**m.state_dict(), "rnn.weight_hh_l0": np.zeros((4, 4)),
                       "rnn.weight_ih_l0": np.zeros((4, 3))})
    first = np.array([v.encode(s[1])[0] for s in sample(m, 2, prime="a", num=4000, seed=0)])
    logits, _ = m.forward(np.zeros((1, 1), dtype=np.int32))
    p = np.exp(logits[0, 0] - logits[0, 0].max())
    p /= p.sum()
    freq = np.bincount(first, minlength=3) / first.size
    assert np.abs(freq - p).max() < 0.03


def test_temperature_zero_is_argmax_and_matches_the_reference(model):
    text = model.sample(20, temperature=0, prime="to")
    params = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    ids = list(model.vocab.encode("to"))
    for _ in range(20):
        logits, _ = ref.forward(params, np.array([ids]), model.config["cell"], 2)
        ids.append(int(np.argmax(logits[0, -1])))
    assert text == model.vocab.decode(ids)


def test_top_k_one_is_argmax(model):
    assert model.sample(30, top_k=1, seed=5, prime="t") == model.sample(30, temperature=0, prime="t")


def test_top_p_keeps_only_the_nucleus(model):
    tiny_p = model.sample(30, top_p=1e-6, seed=5, prime="t")
    assert tiny_p == model.sample(30, temperature=0, prime="t")


def test_batch_samples_are_independent_and_reproducible(model):
    a = sample(model, 40, num=5, seed=3)
    assert a == sample(model, 40, num=5, seed=3)
    assert len(set(a)) == 5


def _ranked_sample(model, ranks, S=3, n=60, prime=(1, 2, 3)):
    streams = Streams(model, S, ranks)
    streams.feed(np.asarray(prime, np.int32))
    u = np.random.default_rng(7).random((n, S))
    out = np.concatenate([streams.sample(n // 2, u[:n // 2], 0.9, None, None),
                          streams.sample(n - n // 2, u[n // 2:], 0.9, None, None)])
    return out, streams.hs.copy(), streams.cs.copy(), streams.logits.copy()


@pytest.mark.parametrize("layers,embed", [(1, None), (2, 5), (3, None)])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_sampling_split_over_threads_by_hidden_units_gives_the_one_thread_text(cell, layers, embed):
    m = Model(len(Vocab(TEXT)), cell=cell, hidden=12, layers=layers, embed=embed, seed=5)
    one = _ranked_sample(m, 1)
    for ranks in (2, 3):
        for a, b in zip(_ranked_sample(m, ranks), one):  # text, state and logits
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("failing", [0, 1])
def test_a_failing_sampling_rank_releases_the_ranks_waiting_for_it(failing):
    flags = np.zeros(K.barrier_flags_size(2), np.int64)

    def rank(r):
        if r == failing:
            raise RuntimeError(f"rank {r} failed")
        K.barrier(flags, r, 2, 1)  # waits for the failed rank until released

    raised = []

    def run():
        try:
            run_ranks(rank, 2, lambda: K.release_barriers(flags))
        except RuntimeError as e:
            raised.append(str(e))
    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive() and raised == [f"rank {failing} failed"]


def test_buffers_of_sampling_threads_share_no_cache_line():
    arrays = cache_aligned(a=((3,), np.float32), b=((2, 5), np.int64), c=((1,), np.int32))
    spans = sorted((x.ctypes.data, x.ctypes.data + x.nbytes) for x in arrays.values())
    assert all(start % 64 == 0 for start, _ in spans)
    assert all(end <= nxt for (_, end), (nxt, _) in zip(spans, spans[1:]))
    assert arrays["b"].shape == (2, 5) and arrays["b"].dtype == np.int64 and not arrays["b"].any()


def test_stop_string_ends_a_sample_where_it_appears(model):
    for s in sample(model, 300, num=4, seed=2, stop="e"):
        assert s.endswith("e") and s.count("e") == 1 or "e" not in s


def test_generate_streams_the_same_text_as_sample(model):
    assert "".join(model.generate(600, seed=4, prime="to")) == model.sample(600, seed=4, prime="to")


def test_beam_search_finds_a_continuation_at_least_as_likely_as_greedy(model):
    def logprob(text):
        ids = model.vocab.encode(text)
        logits, _ = model.forward(ids[None, :-1])
        z = logits[0].astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return logp[np.arange(len(ids) - 1), ids[1:]][len("to") - 1:].sum()
    greedy = model.sample(15, temperature=0, prime="to")
    beam = beam_search(model, 15, prime="to", width=6)
    assert beam.startswith("to") and len(beam) == 17
    assert logprob(beam) >= logprob(greedy) - 1e-4


def test_evaluate_is_the_mean_loss_with_the_state_carried(model):
    text = TEXT[:300]
    r = score(model, text, window=64)
    params = {k: v.astype(np.float64) for k, v in model.state_dict().items()}
    ids = model.vocab.encode(text)
    want, _ = ref.loss(params, ids[None, :-1], ids[None, 1:], model.config["cell"], 2)
    assert r["nats"] == pytest.approx(want, rel=1e-5)
    assert r["bpc"] == pytest.approx(want / math.log(2), rel=1e-5) and r["chars"] == 299


def test_evaluate_names_unknown_characters_or_skips_them(model):
    with pytest.raises(CharrnnError, match="'☃'"):
        score(model, "to be☃")
    assert score(model, "to be☃ or", skip_unknown=True)["skipped"] == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1), "temperature"), (dict(top_k=0), "top-k"), (dict(top_p=1.5), "top-p"),
    (dict(length=-1), "length"), (dict(prime="x☃"), "prime has .*'☃'"),
])
def test_bad_sampling_options_are_clear_errors(model, kwargs, match):
    kwargs = {"length": 5, **kwargs}
    with pytest.raises(CharrnnError, match=match):
        model.sample(**kwargs)


def test_bytes_models_write_valid_utf8(tmp_path):
    (tmp_path / "b.bin").write_bytes("héllo wörld ☃ ".encode() * 200 + b"\xff\xfe")
    m = charrnn.train(tmp_path / "b.bin", bytes=True, out=tmp_path / "run", steps=3, hidden=8,
                      batch=2, seq_len=8, eval_every=3, quiet=True)
    out = m.sample(300, seed=0)
    out.encode("utf-8")  # no lone surrogates: valid UTF-8
    assert isinstance(out, str)


# --------------------------------------------------------------- Python API

def test_load_and_save_round_trip(saved, tmp_path):
    m = charrnn.load(saved)
    m.save(tmp_path / "copy.ckpt")
    again = charrnn.load(tmp_path / "copy.ckpt")
    assert np.array_equal(m.params, again.params) and m.vocab == again.vocab
    assert m.sample(40, seed=1) == again.sample(40, seed=1)


def test_model_evaluate_gives_bits_per_char(saved):
    m = charrnn.load(saved)
    assert 0 < m.evaluate(TEXT[:200]) < math.log2(len(m.vocab)) + 1


def test_plain_lstm_checkpoint_weights_load_into_torch_by_name(tmp_path):
    torch = pytest.importorskip("torch")
    charrnn.train(_corpus(tmp_path), out=tmp_path / "run", steps=4, hidden=32, batch=4,
                  seq_len=8, layer_norm=False, quiet=True)
    saved = tmp_path / "run"
    m = charrnn.load(saved)
    c = m.config
    rnn = torch.nn.LSTM(c["vocab_size"], c["hidden"], c["layers"], batch_first=True)
    head = torch.nn.Linear(c["hidden"], c["vocab_size"])
    modules = {"rnn": rnn, "decoder": head}
    with np.load(saved / "best.ckpt", allow_pickle=False) as z:
        for key in z.files:
            if key.startswith("param/"):
                mod, name = key[len("param/"):].split(".")
                getattr(modules[mod], name).data.copy_(torch.from_numpy(z[key]))
    ids = m.vocab.encode(TEXT[:40])[None, :]
    x = torch.nn.functional.one_hot(torch.from_numpy(ids.astype(np.int64)), c["vocab_size"]).float()
    with torch.no_grad():
        want = head(rnn(x)[0]).numpy()
    assert np.abs(m.forward(ids)[0] - want).max() < 1e-4


# ---------------------------------------------------------------------- CLI

def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_sample_prints_prime_then_text(saved):
    r = cli("sample", saved, "--length", 30, "--prime", "to be", "--seed", 1)
    assert r.exit_code == 0 and r.output.startswith("to be") and len(r.output) == 36


def test_cli_sample_seed_repeats(saved):
    assert cli("sample", saved, "--seed", 3).output == cli("sample", saved, "--seed", 3).output


def test_cli_sample_text_is_the_same_on_one_thread_or_two(saved):
    # hidden 32: two threads split it (generate._RANK_UNITS)
    if sampling_ranks(32) < 2:
        pytest.skip("needs two CPUs")
    args = ["sample", str(saved), "--length", "80", "--seed", "3", "--threads"]
    one = CliRunner().invoke(main, args + ["1"])
    two = CliRunner().invoke(main, args + ["2"])
    assert one.exit_code == 0 and one.output == two.output


def test_cli_sample_num_separates_samples(saved):
    r = cli("sample", saved, "--num", 3, "--length", 20, "--seed", 1)
    assert r.exit_code == 0 and r.output.count("-" * 40) == 2


def test_cli_sample_beam(saved):
    r = cli("sample", saved, "--beam", 4, "--length", 20, "--prime", "to")
    assert r.exit_code == 0 and r.output.startswith("to")


def test_cli_eval_json(saved, tmp_path):
    (tmp_path / "t.txt").write_text(TEXT[:500])
    d = json.loads(cli("eval", saved, tmp_path / "t.txt", "--json").output)
    assert d["chars"] == 499 and d["bpc"] == pytest.approx(d["nats"] / math.log(2))


def test_cli_info_json(saved):
    d = json.loads(cli("info", saved, "--json").output)
    assert d["step"] == 10 and d["format_version"] == checkpoint.VERSION and d["cell"] == "lstm"
    assert d["vocab_size"] == len(Vocab(TEXT)) and d["parameters"] > 0


@pytest.mark.parametrize("args,match", [
    (["--temp", "-1"], "temperature"), (["--top-p", "0"], "top-p"), (["--top-k", "0"], "top-k"),
    (["--length", "-5"], "length"), (["--prime", "☃"], "'☃'"),
])
def test_cli_sample_bad_options_are_one_line(saved, args, match):
    r = cli("sample", saved, *args)
    assert r.exit_code == 1 and r.output.count("\n") == 1 and match in r.output


def test_cli_missing_or_corrupt_checkpoint_is_one_line(tmp_path):
    r = cli("info", tmp_path / "nope.ckpt")
    assert r.exit_code == 1 and "no such checkpoint" in r.output
    (tmp_path / "bad.ckpt").write_bytes(b"not a zip")
    r = cli("sample", tmp_path / "bad.ckpt")
    assert r.exit_code == 1 and "not a readable charrnn checkpoint" in r.output
