"""A model's configuration and parameter layout (names, shapes, order in
the flat buffer), shared by the model and the checkpoint reader, which
checks a file against the model it declares before reading it."""
import os

import numpy as np

from .errors import CharrnnError
from .kernels.cells import CELL_IDS, CELLS, MIN_NORMALISED_UNITS, NORMALISED, gates


def _check_size(name, value, lo, hi=None):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < lo \
            or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise CharrnnError(f"{name} must be an integer {rng}, not {value!r}")


def _check_rate(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < 1.0:
        raise CharrnnError(f"{name} must be in [0, 1), not {value!r}")
    return float(value)


def model_config(vocab_size, cell="lstm", hidden=256, layers=2, embed=None, dropout=0.0,
                 nonlinearity="tanh", output_dropout=0.0, weight_drop=0.0, embed_dropout=0.0,
                 locked_dropout=False, layer_norm=False, zoneout=0.0, multiplicative=False):
    """The validated configuration of a model (``Model``'s arguments), as
    ``Model.config`` and checkpoints hold it; a bad value is a CharrnnError."""
    if cell not in CELLS:
        raise CharrnnError(f"cell must be one of {', '.join(CELLS)}, not {cell!r}")
    if (cell, nonlinearity) not in CELL_IDS:
        raise CharrnnError(f"nonlinearity {nonlinearity!r} is not available for cell {cell!r}")
    _check_size("vocab_size", vocab_size, 1, 0x110000)  # at most every Unicode code point
    _check_size("hidden", hidden, 1, 1 << 16)
    _check_size("layers", layers, 1, 64)
    embed = 0 if embed is None else embed
    _check_size("embed", embed, 0, 1 << 16)
    rates = {name: _check_rate(name, value) for name, value in (
        ("dropout", dropout), ("output_dropout", output_dropout), ("weight_drop", weight_drop),
        ("embed_dropout", embed_dropout), ("zoneout", zoneout))}
    if not isinstance(locked_dropout, bool):
        raise CharrnnError(f"locked_dropout must be true or false, not {locked_dropout!r}")
    if not isinstance(layer_norm, bool):
        raise CharrnnError(f"layer_norm must be true or false, not {layer_norm!r}")
    if layer_norm and cell not in NORMALISED:
        raise CharrnnError(f"layer_norm is available for the {', '.join(NORMALISED)} cell, not {cell!r}")
    if layer_norm and hidden < MIN_NORMALISED_UNITS:
        raise CharrnnError(f"layer_norm needs hidden >= {MIN_NORMALISED_UNITS} (over one unit a layer "
                           f"norm is its bias alone, over two a step), not {hidden}")
    if not isinstance(multiplicative, bool):
        raise CharrnnError(f"multiplicative must be true or false, not {multiplicative!r}")
    if rates["zoneout"] and cell != "lstm":
        raise CharrnnError(f"zoneout holds an LSTM's cell state: it is for the lstm cell, not {cell!r}")
    return dict(vocab_size=int(vocab_size), cell=cell, hidden=int(hidden), layers=int(layers),
                embed=int(embed) or None, nonlinearity=nonlinearity, **rates,
                locked_dropout=locked_dropout, layer_norm=layer_norm, multiplicative=multiplicative)


def param_shapes(config):
    """Every parameter's PyTorch name and shape, in the order of the flat
    buffer, for a ``model_config``."""
    c = config
    V, H, L, E = c["vocab_size"], c["hidden"], c["layers"], c["embed"]
    GH = gates(c["cell"], c["nonlinearity"]) * H
    # multiplicative: W_ih and b_ih carry one more block of H rows, W_mx x + b_mx
    MH = H if c["multiplicative"] else 0
    shapes = {}
    if E:
        shapes["encoder.weight"] = (V, E)
    for k in range(L):
        inp = (E or V) if k == 0 else H
        shapes[f"rnn.weight_ih_l{k}"] = (GH + MH, inp)
        shapes[f"rnn.weight_hh_l{k}"] = (GH, H)
        if MH:
            shapes[f"rnn.weight_mh_l{k}"] = (H, H)
        shapes[f"rnn.bias_ih_l{k}"] = (GH + MH,)
        shapes[f"rnn.bias_hh_l{k}"] = (GH,)
        if c["layer_norm"]:  # gains [0] and biases [1] of the gate blocks, then of the cell
            shapes[f"rnn.layer_norm_l{k}"] = (2, GH + H)
    shapes["decoder.weight"] = (V, H)
    shapes["decoder.bias"] = (V,)
    return shapes


def check_memory(nbytes, what):
    """A CharrnnError when ``nbytes`` cannot fit in this machine's memory."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not every system says
        return
    if nbytes > memory:
        raise CharrnnError(f"{what} needs about {nbytes / 2**30:.1f} GiB, more than this "
                           f"machine's {memory / 2**30:.1f} GiB")


def named_views(shapes, flat):
    """name -> a view of the flat buffer ``flat`` with that parameter's shape."""
    views, off = {}, 0
    for name, shape in shapes.items():
        size = int(np.prod(shape))
        views[name] = flat[off:off + size].reshape(shape)
        off += size
    return views
