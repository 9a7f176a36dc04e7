"""Runs the tests of charrnn.kernels.cuda on numba-cuda's simulator, no GPU needed.

The simulator is switched on by NUMBA_ENABLE_CUDASIM=1, read once, when numba
is first imported. tests/conftest.py does not import numba and pytest collects
tests/cuda before tests/test_*.py, so setting it here, at import, comes first
in ``python -m pytest`` and in ``python -m pytest tests/cuda``. The variable
stays set for the session; it changes numba.cuda only (the CPU kernels, and
every model on device="cpu", are unaffected), and outside the tests here the
simulator reports no GPU (``numba.cuda.is_available()`` is False), so that
the rest of the suite sees this machine as it is without one (e.g. the
one-line error of ``--device cuda``).

When the simulator is not usable (numba-cuda not installed, or numba imported
before this file, e.g. by a plugin) every test here that needs it is skipped
with the reason. A test module that runs without the simulator (test_ptx.py)
sets ``USES_SIMULATOR = False``.
"""
import os
import sys
import threading
import zlib
from pathlib import Path

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

HERE = Path(__file__).resolve().parent
_why_not = []  # the probe's answer, computed once
_running_here = [False]  # whether a test of tests/cuda is running


def _fence_the_simulator(cuda):
    """Make ``cuda.is_available()`` False outside the tests here."""
    is_available = cuda.is_available
    cuda.is_available = lambda: _running_here[0] and is_available()


def _make_shared_arrays_atomic():
    """The simulator keeps one array per ``cuda.shared.array`` call site and
    block, made by the first thread to get there; but it checks and stores
    without a lock (numba-cuda 0.30, simulator/kernelapi.py FakeCUDAShared),
    so two threads of a block can both find none and make one each, and then
    one of them fills a tile nobody else reads: the block computes with
    uninitialised memory (seen here: a GEMM off by 1e26, a clipping norm
    that made the CUDA model test fail about once in five runs). Here the
    same lookup runs under a lock, keyed as the simulator keys it (the
    caller's file and line), with the dynamic (size 0) case left to it."""
    from numba.core import types
    from numba.cuda.simulator import kernelapi
    from numba.np import numpy_support
    simulators_array, lock = kernelapi.FakeCUDAShared.array, threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:
            return simulators_array(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        site = caller.f_code.co_filename, caller.f_lineno
        with lock:
            if site not in self._allocations:
                self._allocations[site] = np.empty(shape, dtype)
            return self._allocations[site]
    kernelapi.FakeCUDAShared.array = array


def _simulator_problem():
    """None when numba-cuda's simulator runs charrnn's CUDA kernels, else why not."""
    from numba.core import config
    if not config.ENABLE_CUDASIM:
        return ("numba was imported before the CUDA simulator could be enabled; "
                "run python -m pytest tests/cuda on its own")
    try:
        from numba import cuda
    except ImportError as e:
        return f"numba-cuda is not installed: pip install numba-cuda ({e})"
    _fence_the_simulator(cuda)
    _make_shared_arrays_atomic()
    if getattr(cuda, "implementation", "Built-in") != "NVIDIA":
        return ("numba-cuda is not installed (numba.cuda is numba's deprecated built-in "
                "target): pip install numba-cuda")
    try:
        @cuda.jit
        def one(a):
            a[0] = 1.0

        a = cuda.to_device(np.zeros(1, np.float32))
        one[1, 1](a)
        if a.copy_to_host()[0] != 1.0:
            return "numba-cuda's simulator ran a trivial kernel but got a wrong result"
    except Exception as e:  # any failure means: not usable here
        return f"numba-cuda's simulator cannot run a trivial kernel: {type(e).__name__}: {e}"
    from charrnn import CharrnnError
    from charrnn.kernels import backend
    _running_here[0] = True
    try:
        backend("cuda")
    except CharrnnError as e:
        return str(e)
    finally:
        _running_here[0] = False
    return None


def pytest_collection_modifyitems(config, items):
    # called with the whole session's items (before -k and the like deselect
    # any): only tests/cuda's are ours
    ours = [item for item in items if HERE in item.path.parents
            and getattr(getattr(item, "module", None), "USES_SIMULATOR", True)]
    if not ours:
        return
    if not _why_not:
        _why_not.append(_simulator_problem())
    if _why_not[0] is not None:
        skip = pytest.mark.skip(reason=f"CUDA simulator not usable: {_why_not[0]}")
        for item in ours:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def simulator():
    """While a test here runs the simulator counts as a GPU, and Python
    switches threads every 0.1 ms: the simulator runs every GPU thread of a
    block as a Python thread while the main thread polls them in a busy loop,
    so each handoff of the GIL waits out the switch interval (5 ms by
    default); this runs the tests here about three times faster."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    _running_here[0] = True
    yield
    _running_here[0] = False
    sys.setswitchinterval(before)


@pytest.fixture
def gpu(simulator):
    """charrnn.kernels.cuda, on the simulator."""
    from charrnn.kernels import backend
    return backend("cuda")


@pytest.fixture
def dev():
    """A host array's copy on the (simulated) device."""
    from numba import cuda
    return lambda a: cuda.to_device(np.ascontiguousarray(a))


@pytest.fixture
def rng(request):
    """Random inputs seeded by the test's name: they do not depend on which
    other tests run."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))
