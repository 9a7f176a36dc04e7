"""``--hidden``, ``--layers`` and ``--dropout`` auto: the model for a corpus
and a budget.

Two limits decide the size, and the smaller wins:

- the data: at most ``PARAMS_PER_CHAR`` parameters per character of the
  training split (char-rnn's rule of thumb says one; with dropout, measured
  on a 112k-character corpus, a 2x256 model of 7.8 per character beat
  2x128 and 2x64: README, "The best model in the time you have");
- the compute: the characters the budget will show the model (steps x B x T,
  or the measured throughput x the minutes) should be at least
  ``CHARS_PER_PARAM`` per parameter; a bigger model would stop before it had
  learnt what its size could hold.

The layers are 2, or 3 once 2 layers would be wider than ``WIDE``. Dropout
follows the passes over the data the budget allows (``dropout_for``): none
for a single pass, rising to ``MAX_DROPOUT`` for many. From
``HEAVY_PASSES`` passes on, the weight drop on W_hh and the dropout on the
top layer's output join it (measured on Tiny Shakespeare: they paid at 15
passes and cost at 5, and a 2x320 model without them overfitted at 8).
Below ``SPLIT_PASSES`` the rate is split: the weight drop takes
``SPLIT_WEIGHT_DROP`` of it and the two dropouts ``SPLIT_DROPOUT`` (Tiny
Shakespeare at 11-20 passes: less weight drop and more dropout did better
in seven measurements of nine; a small corpus at 50 passes did worse with it, so
from there on all three take the rate).
"""
import dataclasses
import math
import time

import numpy as np

from .layout import model_config, param_shapes

CHARS_PER_PARAM = 9     # the compute limit: 2x288 for Tiny Shakespeare in 10 minutes on 2 cores
PARAMS_PER_CHAR = 8.0   # the data limit
WIDE = 512              # wider than this with 2 layers: 3 layers instead
MIN_HIDDEN, MAX_HIDDEN, STEP = 32, 2048, 32
MAX_DROPOUT = 0.5
HEAVY_PASSES = 8        # from here on, weight drop and output dropout too
SPLIT_PASSES = 32       # below this, the rate split between them ...
SPLIT_WEIGHT_DROP, SPLIT_DROPOUT = 0.4, 1.3  # ... as these shares of it
PROBE_HIDDEN = (128, 384)  # the sizes whose throughput is measured


@dataclasses.dataclass(frozen=True)
class Choice:
    hidden: int
    layers: int
    dropout: float
    weight_drop: float
    output_dropout: float
    why: str  # one line: what the choice came from


def parameters(vocab_size, cell, hidden, layers, embed=0, nonlinearity="tanh", layer_norm=False,
               multiplicative=False):
    """The parameter count of a model."""
    config = model_config(vocab_size, cell, hidden, layers, embed or None, nonlinearity=nonlinearity,
                          layer_norm=layer_norm, multiplicative=multiplicative)
    return sum(int(np.prod(s)) for s in param_shapes(config).values())


def dropout_for(epochs):
    """Dropout for a budget of ``epochs`` passes over the training split:
    0 for at most one pass (nothing is seen twice), then rising with the
    logarithm of the passes: 0.25 at 16, ``MAX_DROPOUT`` from 256."""
    if epochs <= 1:
        return 0.0
    return round(min(MAX_DROPOUT, 0.0625 * math.log2(epochs)), 2)


def regularisers_for(epochs):
    """(dropout, weight drop, output dropout) for a budget of ``epochs``
    passes over the training split: ``dropout_for``'s rate on the layers'
    outputs; from ``HEAVY_PASSES`` on, on W_hh and the top layer's output
    too, split below ``SPLIT_PASSES`` (module docstring)."""
    rate = dropout_for(epochs)
    if epochs < HEAVY_PASSES:
        return rate, 0.0, 0.0
    if epochs >= SPLIT_PASSES:
        return rate, rate, rate
    dropout = round(min(MAX_DROPOUT, SPLIT_DROPOUT * rate), 2)
    return dropout, round(SPLIT_WEIGHT_DROP * rate, 2), dropout


def choose(vocab_size, cell, train_chars, chars_per_second, seconds=None, budget_chars=None,
           embed=0, nonlinearity="tanh", hidden=None, layers=None, dropout=None, weight_drop=None,
           output_dropout=None, layer_norm=False, multiplicative=False):
    """The model for ``train_chars`` characters of training data and a
    budget of ``budget_chars`` characters (a step or epoch budget) and/or
    ``seconds`` (a time budget), at ``chars_per_second(parameters)``
    training characters per second (only called for a time budget).
    ``hidden``, ``layers``, ``dropout``, ``weight_drop``, ``output_dropout``:
    given values, kept as they are."""
    def shape(h):
        return h, layers or (2 if h <= WIDE else 3)

    def n_params(h):
        return parameters(vocab_size, cell, *shape(h), embed, nonlinearity, layer_norm, multiplicative)

    def shown(h):  # characters the budget shows a model of this size
        by_time = chars_per_second(n_params(h)) * seconds if seconds else math.inf
        return min(by_time, budget_chars or math.inf)

    why = []
    if hidden is None:
        data_limit = PARAMS_PER_CHAR * train_chars
        h = MIN_HIDDEN
        for cand in range(MIN_HIDDEN, MAX_HIDDEN + 1, STEP):
            n = n_params(cand)
            if n > data_limit or shown(cand) < CHARS_PER_PARAM * n:
                break
            h = cand
        n = n_params(h)
        limit = "data" if n_params(min(h + STEP, MAX_HIDDEN)) > data_limit else "compute"
        why.append(f"{n:,} parameters for {train_chars:,} training characters and "
                   f"{_short(shown(h))} characters in the budget ({limit} limit)")
    else:
        h = hidden
    passes = shown(h) / max(1, train_chars) if None in (dropout, weight_drop, output_dropout) else 0
    rates = regularisers_for(passes)
    if dropout is None:
        dropout = rates[0]
    if weight_drop is None:
        weight_drop = rates[1]
    if output_dropout is None:
        output_dropout = rates[2]
    if passes:
        why.append(f"dropout {dropout:g}, weight drop {weight_drop:g}, output dropout "
                   f"{output_dropout:g} for {passes:.1f} passes over the data")
    return Choice(*shape(h), dropout, weight_drop, output_dropout, "; ".join(why))


def _short(n):
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def measured_throughput(make_model, batch, seq_len, windows=3):
    """``chars_per_second(parameters)`` for ``choose``: training characters
    per second, from timing ``windows`` training passes of a 2-layer model
    at each of ``PROBE_HIDDEN`` (after one untimed), with the cost per
    character a + b * parameters in between and beyond.
    ``make_model(hidden, layers)`` builds a model of that size."""
    points = []
    for h in PROBE_HIDDEN:
        model = make_model(h, 2)
        x = np.random.default_rng(0).integers(0, model.config["vocab_size"], (batch, seq_len + 1))
        model.window(x[:, :-1], x[:, 1:], train=True)
        start = time.perf_counter()
        for _ in range(windows):
            model.window(x[:, :-1], x[:, 1:], train=True)
        points.append((model.num_params, (time.perf_counter() - start) / (windows * batch * seq_len)))
    (n0, s0), (n1, s1) = points
    slope = max(0.0, (s1 - s0) / (n1 - n0))
    intercept = max(s0 - slope * n0, 1e-12)
    return lambda n: 1.0 / (intercept + slope * n)
