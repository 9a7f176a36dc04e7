"""charrnn: Numba-accelerated character-level RNN/GRU/LSTM language models.

Public API: ``Vocab``, ``Model``, ``CharrnnError``.
"""
from .data import Vocab
from .errors import CharrnnError
from .model import Model

__version__ = "0.1.0"
__all__ = ["Vocab", "Model", "CharrnnError", "__version__"]
