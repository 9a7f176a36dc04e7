"""The kernels: pure Numba functions on preallocated arrays, one module per
backend (``cpu``; ``cuda``, imported on demand by ``backend``).

A backend is a module that provides every name of ``CONTRACT`` with the
same parameters as ``cpu``'s (tested): array moves (``zeros``, ``put``,
``get``, ``transpose``) and the kernels the model and the optimizers call.
Sizes come from the arrays; cells are ``cells.py``'s ids. What a backend
adds beyond the contract (the CPU's sampling step and BLAS binding, the
GPU's batched draw) is used only by code that knows which backend it has.

Numba caches compiled kernels (``cache=True``) in charrnn's cache directory
(``charrnn.paths.cache_dir()/numba``), not beside the sources: files that
pip did not install would stay behind in site-packages after an uninstall
and turn ``charrnn`` there into a namespace package that shadows the next
install. ``NUMBA_CACHE_DIR``, when set, is respected.
"""
import contextlib
import inspect

from numba.core import config as _numba_config

from ..errors import CharrnnError
from ..paths import cache_dir


@contextlib.contextmanager
def _compiled_into_charrnn_cache():
    """Kernels decorated in this block cache their machine code under
    cache_dir()/numba (Numba picks a function's cache directory when it is
    decorated; other libraries' functions are left as they are)."""
    if _numba_config.CACHE_DIR:  # NUMBA_CACHE_DIR set by the user
        yield
        return
    _numba_config.CACHE_DIR = str(cache_dir() / "numba")
    try:
        yield
    finally:
        _numba_config.CACHE_DIR = ""


with _compiled_into_charrnn_cache():
    from . import cpu  # noqa: E402,F401

CONTRACT = (
    "zeros", "put", "get", "transpose",                        # array moves
    "embedding_forward", "embedding_backward",                 # input side
    "linear_forward", "linear_backward", "column_sum", "apply_dropout",
    "recurrent_forward", "recurrent_backward",                 # the cells over a window
    "softmax_cross_entropy",                                   # output
    "squared_norm", "adam_update", "rmsprop_update", "adagrad_update", "sgd_update",
    "average_update",
)


def signature(module, name):
    """The parameter names of a backend's function (of its Python source,
    for a compiled one)."""
    f = getattr(module, name)
    return list(inspect.signature(getattr(f, "py_func", f)).parameters)


def import_cuda():
    """The CUDA backend module (ImportError without numba-cuda)."""
    with _compiled_into_charrnn_cache():
        from . import cuda
    return cuda


def backend(device):
    """The kernel module for ``device``: "cpu", "cuda", or "auto" (the GPU
    when one is usable, else the CPU). A GPU asked for but not usable is a
    one-line CharrnnError."""
    if device == "cpu":
        return cpu
    if device not in ("cuda", "auto"):
        raise CharrnnError(f"device must be cpu, cuda or auto, not {device!r}")
    try:
        cuda = import_cuda()
        why = cuda.available()
    except ImportError as e:
        why = f"numba-cuda is not installed ({e}); pip install 'charrnn[cuda]'"
    if why is None:
        return cuda
    if device == "auto":
        return cpu
    raise CharrnnError(f"--device cuda: {why}")
