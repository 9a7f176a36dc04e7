"""The cells every backend implements: the id a kernel takes for each
(cell, nonlinearity), and how many gate blocks G of H rows each has.

Compiled kernels hold these numbers as constants (Numba freezes globals), and
Numba's cache does not notice edits to another module: never renumber them.
"""
LSTM, GRU, RNN_TANH, RNN_RELU = 0, 1, 2, 3
GATES = (4, 3, 1, 1)  # gate blocks G, by cell id: LSTM (i, f, g, o), GRU (r, z, n), RNN
CELL_IDS = {("lstm", "tanh"): LSTM, ("gru", "tanh"): GRU,
            ("rnn", "tanh"): RNN_TANH, ("rnn", "relu"): RNN_RELU}
CELLS = ("lstm", "gru", "rnn")


def gates(cell, nonlinearity="tanh"):
    """G for a cell by name."""
    return GATES[CELL_IDS[cell, nonlinearity]]
