"""The cells every backend implements: the id a kernel takes for each
(cell, nonlinearity), and how many gate blocks G of H rows each has.

Compiled kernels hold these numbers as constants (Numba freezes globals), and
Numba's cache does not notice edits to another module: never renumber them.
"""
LSTM, GRU, RNN_TANH, RNN_RELU, LN_LSTM = 0, 1, 2, 3, 4
GATES = (4, 3, 1, 1, 4)  # gate blocks G, by cell id: LSTM (i, f, g, o), GRU (r, z, n), RNN
CELL_IDS = {("lstm", "tanh"): LSTM, ("gru", "tanh"): GRU,
            ("rnn", "tanh"): RNN_TANH, ("rnn", "relu"): RNN_RELU}
CELLS = ("lstm", "gru", "rnn")
NORMALISED = ("lstm",)  # the cells that take layer_norm
MIN_NORMALISED_UNITS = 4  # a layer norm over 1 unit is its bias alone, over 2 a step
LN_EPS = 1e-5  # added to the variance under the root, as torch.nn.LayerNorm


def cell_id(cell, nonlinearity="tanh", layer_norm=False):
    """The kernels' id of a cell by name (LN_LSTM: the LSTM with layer_norm)."""
    return LN_LSTM if layer_norm else CELL_IDS[cell, nonlinearity]


def gates(cell, nonlinearity="tanh"):
    """G for a cell by name."""
    return GATES[CELL_IDS[cell, nonlinearity]]


def saved_width(cell, H, layer_norm=False):
    """Per stream and step, what a cell saves for its backward pass beside
    the gates (0: nothing): GRU W_hn h + b_hn [H]; LN-LSTM the normalised
    pre-activations [4H], the normalised cell [H] and the five inverse
    deviations [5]."""
    if layer_norm:
        return 5 * H + 5
    return H if cell == "gru" else 0
