"""charrnn: Numba-accelerated character-level RNN/GRU/LSTM language models.

Public API: ``train``, ``load``, ``Model``, ``Vocab``, ``CharrnnError``.

>>> import charrnn                                        # doctest: +SKIP
>>> model = charrnn.train("input.txt", steps=2000)        # doctest: +SKIP
>>> model = charrnn.load("run")                           # doctest: +SKIP
>>> print(model.sample(200, temperature=0.8, prime="ROMEO:"))  # doctest: +SKIP
"""
from . import checkpoint
from .data import Vocab
from .errors import CharrnnError
from .model import Model
from .train import train

__version__ = "0.1.0"
__all__ = ["Vocab", "Model", "CharrnnError", "train", "load", "__version__"]


def load(path):
    """The model of a checkpoint file, or of a run directory's best checkpoint,
    with ``model.vocab`` set."""
    return Model.from_checkpoint(checkpoint.load(path, prefer="best"))
