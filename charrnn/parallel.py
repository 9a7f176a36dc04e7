"""Threads, in one place: how many there are, the BLAS pools, the pool of
worker threads, how a training batch is cut into shards and how sampling
splits hidden units into ranks.

- ``thread_limit(n)`` sets the thread count (``--threads``) and the BLAS
  pools together for a block; ``threads()`` reads it. Nothing else decides
  how many threads run.
- ``shard_cuts(B)``: a training pass runs one shard of streams per thread,
  each on its own thread with a one-thread BLAS (``run_shards``). Per-step
  GEMMs of a few dozen rows split badly across BLAS threads; whole shards
  split almost perfectly.
- ``sampling_ranks(H)`` / ``rank_cuts``: one sampling stream is split by
  hidden units over ranks that meet at spin barriers (``run_ranks``), so
  they must all run at once, with a core each.
- ``cache_aligned``: buffers that different threads write never share a
  cache line.
"""
import concurrent.futures
import contextlib
import os
import threading

import numpy as np

from .kernels import cpu as K

RANK_UNITS = 16  # the fewest hidden units worth a sampling thread (measured: README, Benchmarks)

_threads = 0            # the thread count set by thread_limit; 0: every usable CPU
_blas_pools = None      # threadpoolctl's handle on every BLAS library loaded
_executor = None        # (workers, ThreadPoolExecutor): the worker threads, started on first use
_executor_lock = threading.Lock()
_ranks_lock = threading.Lock()  # spinning ranks need the workers to themselves


def usable_cpus():
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def threads():
    """The number of threads a pass may use: ``thread_limit``'s, else every usable CPU."""
    return _threads or usable_cpus()


@contextlib.contextmanager
def thread_limit(n):
    """Use ``n`` threads in this block (0: leave the count as it is): the
    training shards, the sampling ranks and both BLAS pools (NumPy's and
    SciPy's) together."""
    global _threads
    if not n:
        yield
        return
    from threadpoolctl import threadpool_limits
    old = _threads
    _threads = int(n)
    try:
        with threadpool_limits(limits=int(n)):
            yield
    finally:
        _threads = old


def one_thread_blas():
    """Every BLAS pool at one thread, for the duration (a shard is a thread)."""
    global _blas_pools
    if _blas_pools is None:  # found once: enumerating the libraries is slow
        from threadpoolctl import ThreadpoolController
        _blas_pools = ThreadpoolController().select(user_api="blas")
    return _blas_pools.limit(limits=1)


def _pool(workers):
    """The worker threads (at least ``workers`` of them), each with a
    one-thread BLAS of its own (MKL keeps its count per thread)."""
    global _executor
    with _executor_lock:
        if _executor is None or _executor[0] < workers:
            if _executor is not None:  # more threads asked for: replace the pool
                _executor[1].shutdown(wait=False)
            _executor = workers, concurrent.futures.ThreadPoolExecutor(
                workers, "charrnn-worker", initializer=K.one_blas_thread_here)
        return _executor[1]


def shard_cuts(B, n=None):
    """Stream boundaries of a batch of ``B`` streams cut into ``n`` shards
    (default: one per thread), down to one stream each. A shard of one
    stream still pays for its thread (README, Benchmarks)."""
    n = max(1, min(threads() if n is None else n, B))
    return [B * s // n for s in range(n + 1)]


def run_shards(fn, jobs):
    """[fn(*job) for job in jobs]: the first job on this thread, the others
    on the worker threads, every one with a one-thread BLAS."""
    if len(jobs) == 1:
        return [fn(*jobs[0])]
    with one_thread_blas():
        futures = [_pool(len(jobs) - 1).submit(fn, *job) for job in jobs[1:]]
        first = fn(*jobs[0])
        return [first] + [f.result() for f in futures]


def sampling_ranks(H):
    """How many threads share one sampling step of ``H`` hidden units: one
    per thread, no more than the usable CPUs (a spinning rank must have a
    core), and at least RANK_UNITS units each."""
    return max(1, min(threads(), usable_cpus(), H // RANK_UNITS))


def rank_cuts(H, ranks, itemsize):
    """Hidden-unit boundaries of ``ranks`` ranks: whole cache lines of
    units each where there are enough, so that no two ranks write one line."""
    step = K.CACHE_LINE // itemsize
    step = step if H // ranks >= step else 1
    return [H * r // ranks // step * step for r in range(ranks)] + [H]


def run_ranks(fn, ranks, release):
    """fn(rank) for every rank at once: rank 0 on this thread, the others
    on the worker threads, each with a one-thread BLAS. The ranks wait for
    each other at barriers, so all must run together: one caller at a time,
    and whatever fails (Ctrl-C included) calls ``release()``, which lets the
    waiting ranks return, and waits for them before raising."""
    if ranks == 1:
        return fn(0)

    def guarded(rank):
        try:
            fn(rank)
        except BaseException:
            release()  # the other ranks wait at a barrier for this one
            raise
    futures = []
    with _ranks_lock, one_thread_blas():
        try:
            pool = _pool(ranks - 1)
            for r in range(1, ranks):
                futures.append(pool.submit(guarded, r))
            guarded(0)
        except BaseException:
            release()
            concurrent.futures.wait(futures)
            raise
        for f in futures:
            f.result()


def cache_aligned(**arrays):
    """Zeroed arrays ``name=(shape, dtype)`` carved from one block, each on
    cache lines of its own, the block padded by a line at each end: what one
    thread writes shares no cache line with another thread's data (sharing
    made two sampling threads slower than one)."""
    line = K.CACHE_LINE
    nbytes = [int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in arrays.values()]
    lines = [-(-n // line) * line for n in nbytes]  # rounded up to whole lines
    block = np.zeros(sum(lines) + 3 * line, np.uint8)
    at = line + (-block.ctypes.data) % line  # the first line boundary after a line of padding
    out = {}
    for (name, (shape, dt)), n, size in zip(arrays.items(), nbytes, lines):
        out[name] = block[at:at + n].view(dt).reshape(shape)
        at += size
    return out
