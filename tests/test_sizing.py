"""--hidden, --layers and --dropout auto (sizing.py): the rule, over its
whole range, and what training does with it."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charrnn import sizing
from charrnn.train import train

V = 65
RATE = 2e10  # chars_per_second(n) = RATE / n: a model that costs its size (2x256: ~23k chars/s)


def per_param(n):
    return RATE / n


def choose(train_chars, seconds=None, budget_chars=None, **given):
    return sizing.choose(V, "lstm", train_chars, per_param, seconds=seconds,
                         budget_chars=budget_chars, **given)


corpora = st.integers(10_000, 100_000_000)
budgets = st.floats(10, 10 * 3600)


@settings(max_examples=300, deadline=None)
@given(corpora, budgets)
def test_the_choice_is_within_both_limits_or_the_smallest(train_chars, seconds):
    c = choose(train_chars, seconds)
    n = sizing.parameters(V, "lstm", c.hidden, c.layers)
    shown = per_param(n) * seconds
    assert c.hidden == sizing.MIN_HIDDEN or (
        n <= sizing.PARAMS_PER_CHAR * train_chars and shown >= sizing.CHARS_PER_PARAM * n)
    assert sizing.MIN_HIDDEN <= c.hidden <= sizing.MAX_HIDDEN and c.hidden % sizing.STEP == 0
    assert c.layers == (2 if c.hidden <= sizing.WIDE else 3)


@settings(max_examples=300, deadline=None)
@given(corpora, budgets)
def test_the_next_size_up_would_break_a_limit(train_chars, seconds):
    c = choose(train_chars, seconds)
    if c.hidden < sizing.MAX_HIDDEN:
        h = c.hidden + sizing.STEP
        n = sizing.parameters(V, "lstm", h, 2 if h <= sizing.WIDE else 3)
        assert n > sizing.PARAMS_PER_CHAR * train_chars or per_param(n) * seconds < sizing.CHARS_PER_PARAM * n


@settings(max_examples=200, deadline=None)
@given(corpora, corpora, budgets)
def test_more_data_never_gives_a_smaller_model(a, b, seconds):
    small, big = sorted((a, b))
    assert choose(small, seconds).hidden <= choose(big, seconds).hidden


@settings(max_examples=200, deadline=None)
@given(corpora, budgets, budgets)
def test_a_longer_budget_never_gives_a_smaller_model(train_chars, a, b):
    short, long = sorted((a, b))
    assert choose(train_chars, short).hidden <= choose(train_chars, long).hidden


@settings(max_examples=200, deadline=None)
@given(st.floats(0, 1e6), st.floats(0, 1e6))
def test_dropout_rises_with_the_passes_over_the_data_from_none_for_one(a, b):
    few, many = sorted((a, b))
    assert 0 <= sizing.dropout_for(few) <= sizing.dropout_for(many) <= sizing.MAX_DROPOUT
    assert sizing.dropout_for(min(few, 1.0)) == 0


@settings(max_examples=300, deadline=None)
@given(corpora, budgets)
def test_auto_takes_the_regularisers_for_the_passes_its_model_gets(train_chars, seconds):
    c = choose(train_chars, seconds)
    passes = per_param(sizing.parameters(V, "lstm", c.hidden, c.layers)) * seconds / train_chars
    assert (c.dropout, c.weight_drop, c.output_dropout) == sizing.regularisers_for(passes)


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 1e6))
def test_weight_and_output_dropout_join_from_heavy_passes_split_below_split_passes(passes):
    dropout, weight_drop, output_dropout = sizing.regularisers_for(passes)
    rate = sizing.dropout_for(passes)
    assert 0 <= weight_drop <= dropout <= sizing.MAX_DROPOUT
    if passes < sizing.HEAVY_PASSES:
        assert (dropout, weight_drop, output_dropout) == (rate, 0, 0)
    elif passes < sizing.SPLIT_PASSES:
        assert weight_drop < rate < dropout == output_dropout
    else:
        assert dropout == weight_drop == rate


def test_the_split_passes_its_measured_point():
    assert sizing.regularisers_for(20) == (0.35, 0.11, 0.35)  # Tiny Shakespeare, 30 minutes
    assert sizing.regularisers_for(50) == (0.35, 0.35, 0.35)  # a 124 kB corpus, 3 minutes


def test_the_dropout_curve_passes_its_anchors():
    assert sizing.dropout_for(16) == 0.25 and sizing.dropout_for(256) == sizing.MAX_DROPOUT


def test_a_step_budget_needs_no_throughput():
    def unmeasured(n):
        raise AssertionError("a step budget is known in characters")
    c = sizing.choose(V, "lstm", 1_000_000, unmeasured, budget_chars=5_000 * 2_500)
    assert c.hidden > 0


def test_given_values_are_kept():
    c = choose(100_000, 600, hidden=700, layers=1, dropout=0.1, weight_drop=0.2, output_dropout=0.3)
    assert (c.hidden, c.layers, c.dropout, c.weight_drop, c.output_dropout) == (700, 1, 0.1, 0.2, 0.3)
    assert c.why == ""


def test_the_reason_names_the_limit_and_the_passes():
    small = choose(100_000, 3600)
    assert "data limit" in small.why and "passes over the data" in small.why
    big = choose(100_000_000, 60)
    assert "compute limit" in big.why and big.dropout == 0


def test_measured_throughput_falls_with_the_size():
    from charrnn import Model
    rate = sizing.measured_throughput(lambda h, l: Model(V, hidden=h, layers=l), 8, 16, windows=1)
    assert rate(10_000) > rate(10_000_000) > 0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = ["the", "king", "queen", "of", "and", "to", "my", "lord", "shall", "thou", "love"]
    path = tmp_path_factory.mktemp("corpus") / "tiny.txt"
    path.write_text(" ".join(words[i] for i in rng.integers(0, len(words), 3000)), encoding="utf-8")
    return path


def test_training_fills_in_auto_and_says_why(corpus, tmp_path, capsys):
    model = train(corpus, out=tmp_path, steps=6, batch=4, seq_len=8, eval_every=3)
    err = capsys.readouterr().err
    assert err.startswith("auto-size: 2x") and "passes over the data" in err
    saved = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert saved["step"] == 3
    c = sizing.choose(model.config["vocab_size"], "lstm", model_config_chars(corpus), None,
                      budget_chars=6 * 4 * 8)
    got = {k: model.config[k] for k in ("hidden", "layers", "dropout", "weight_drop", "output_dropout")}
    assert got == {k: getattr(c, k) for k in got}


def model_config_chars(corpus):
    from charrnn.data import split
    return split(np.zeros(len(corpus.read_text(encoding="utf-8")), np.int32), 0.05)[0].size


def test_an_explicit_size_skips_the_choice(corpus, tmp_path, capsys):
    model = train(corpus, out=tmp_path, steps=3, batch=4, seq_len=8, hidden=12, layers=1,
                  dropout=0.1, weight_drop=0.0, output_dropout=0.0, eval_every=3)
    assert "auto-size" not in capsys.readouterr().err
    assert (model.config["hidden"], model.config["layers"], model.config["dropout"]) == (12, 1, 0.1)


def test_a_resumed_run_keeps_the_size_it_chose(corpus, tmp_path):
    first = train(corpus, out=tmp_path, steps=3, batch=4, seq_len=8, eval_every=3, quiet=True)
    again = train(corpus, resume=tmp_path, steps=6, quiet=True)
    assert again.config == first.config
