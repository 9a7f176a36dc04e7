"""Dynamic evaluation (charrnn eval --dynamic): scoring while the model
keeps learning from the text it has read."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

import charrnn
from charrnn import Model, Vocab
from charrnn.cli import main
from charrnn.dynamic import dynamic_score
from charrnn.errors import CharrnnError
from charrnn.generate import score

TEXT = "to be or not to be, that is the question.\n" * 20


@pytest.fixture
def model():
    m = Model(len(Vocab(TEXT)), hidden=16, layers=2, seed=3, dropout=0.3, weight_drop=0.3, zoneout=0.3)
    m.vocab = Vocab(TEXT)
    return m


def test_without_learning_it_is_the_plain_score(model):
    plain = score(model, TEXT)
    frozen = dynamic_score(model, TEXT, lr=0.0, decay=0.0)
    assert frozen["nats"] == pytest.approx(plain["nats"], rel=1e-5)
    assert frozen["chars"] == plain["chars"] == len(TEXT) - 1


def test_learning_from_a_repetitive_text_lowers_its_loss(model):
    assert dynamic_score(model, TEXT, lr=0.5)["nats"] < score(model, TEXT)["nats"] - 0.1


def test_it_scores_each_window_before_learning_from_it(model):
    """The first window is scored by the trained weights, whatever the rate."""
    head = TEXT[:51]
    assert dynamic_score(model, head, lr=100.0)["nats"] == pytest.approx(score(model, head)["nats"], rel=1e-5)


def test_the_model_evaluated_is_left_as_it_was(model):
    before = model.state_dict()
    dynamic_score(model, TEXT, lr=0.5)
    assert all(np.array_equal(before[k], w) for k, w in model.state_dict().items())


def test_a_full_decay_returns_to_the_trained_weights_after_each_update(model):
    """decay 1 pulls all the way back: only the carried state differs from a plain score."""
    assert dynamic_score(model, TEXT, lr=0.5, decay=1.0)["nats"] == \
        pytest.approx(score(model, TEXT)["nats"], rel=1e-5)


@pytest.mark.parametrize("kwargs,match", [(dict(lr=-1.0), "learning rate"), (dict(decay=1.5), "decay"),
                                          (dict(window=0), "window")])
def test_impossible_settings_are_clear_errors(model, kwargs, match):
    with pytest.raises(CharrnnError, match=match):
        dynamic_score(model, TEXT, **kwargs)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A trained run directory and its corpus."""
    d = tmp_path_factory.mktemp("dynamic")
    corpus = d / "c.txt"
    corpus.write_text(TEXT)
    charrnn.train(corpus, out=d / "run", steps=5, hidden=16, batch=4, seq_len=8, eval_every=5,
                  quiet=True)
    return str(d / "run"), str(corpus)


def test_cli_eval_dynamic_reports_apart(run):
    r = CliRunner().invoke(main, ["eval", *run, "--dynamic", "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)
    assert row["dynamic"] is True and row["chars"] == len(TEXT) - 1
    assert "dynamic" not in CliRunner().invoke(main, ["eval", *run]).output
    text = CliRunner().invoke(main, ["eval", *run, "--dynamic"])
    assert text.output.rstrip().endswith("(dynamic evaluation)")


def test_cli_dynamic_options_need_dynamic(run):
    r = CliRunner().invoke(main, ["eval", *run, "--dynamic-lr", "0.1"])
    assert r.exit_code == 1 and "go with --dynamic" in r.output
