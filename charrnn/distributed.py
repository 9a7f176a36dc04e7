"""Data-parallel training over MPI: the ranks of ``mpiexec -n N charrnn
train ...``, one level above the threads of ``parallel``.

Each rank owns the contiguous streams of the global batch that its shard
would hold in one process (``parallel.shard_cuts(B, N)``) and carries their
hidden state; every rank draws the dropout masks of the whole batch, so its
slice holds the masks one process would use; the gradients are summed over
the ranks with one Allreduce per step over the flat gradient buffer (a fixed
algorithm for a given N: reruns are bit-identical), and every rank takes the
same optimizer step. Rank 0 alone prints and writes the run directory.

Without ``mpiexec`` nothing here imports mpi4py: ``world()`` is a world of
one process whose collectives do nothing.
"""
import os
import zlib

import numpy as np

from .errors import CharrnnError

# what the launchers set: MPICH's Hydra (PMI), Open MPI, Slurm's srun
_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS")


def launched_rank():
    """This process's rank among those the MPI launcher started (0 without one)."""
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return 0


def launched_size():
    """How many processes the MPI launcher started (1 without one)."""
    for name in _SIZE_VARIABLES:
        try:
            return max(1, int(os.environ[name]))
        except (KeyError, ValueError):
            continue
    return 1


class World:
    """The ranks of one training: ``rank``, ``size`` and the collectives
    training needs. A world of one process (no MPI) does no communication."""

    def __init__(self, comm=None):
        self.comm = comm
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        # a communicator of its own for ending (finish), so that it never
        # meets a collective that other ranks are waiting in
        self._ending = comm.Dup() if comm is not None else None

    def finish(self, code, wait=10.0):
        """This rank is ending with ``code`` (an error): if every rank ends
        with it (an error all of them met), they all simply exit; if the
        others are still training, waiting for this one in a collective,
        end the whole job (MPI_Abort) rather than leave them hanging."""
        if self.comm is None:
            return
        import time
        request, t0 = self._ending.Ibarrier(), time.monotonic()
        while not request.Test():
            if time.monotonic() - t0 > wait:
                self.comm.Abort(code)
            time.sleep(0.01)

    def sum_into(self, buf):
        """buf = the sum of every rank's buf (in place), one collective."""
        if self.comm is not None:
            from mpi4py import MPI
            self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        return buf

    def sum(self, *values):
        """The sums over the ranks of a few float64 numbers, one collective."""
        return tuple(self.sum_into(np.array(values, np.float64)))

    def gather_streams(self, arrays):
        """Rank 0: the ranks' [L, b, H] arrays joined along the streams in
        rank order (None elsewhere)."""
        if self.comm is None:
            return arrays
        parts = self.comm.gather(arrays, root=0)
        if self.rank != 0:
            return None
        return tuple(np.concatenate(p, axis=1) for p in zip(*parts))

    def agree(self, problem):
        """Every rank passes its problem (a message, or None); if any has
        one, every rank raises it (the lowest rank's), so that all stop
        together with the same one-line error rather than wait for each
        other."""
        problems = [problem] if self.comm is None else self.comm.allgather(problem)
        for rank, p in enumerate(problems):
            if p is not None:
                raise CharrnnError(p if self.size == 1 else f"rank {rank}: {p}")

    def same_everywhere(self, what, value):
        """A one-line error on every rank unless ``value`` (bytes) is the
        same on all ranks."""
        digest = zlib.crc32(value)
        digests = [digest] if self.comm is None else self.comm.allgather(digest)
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        if odd:
            raise CharrnnError(f"ranks {', '.join(map(str, odd))} see different {what} from rank 0")

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank."""
        return value if self.comm is None else self.comm.bcast(value, root=0)


SINGLE = World()
_world = []  # this process's World once made


def world():
    """This process's world: MPI's when ``mpiexec`` started several, else a
    world of one. Under mpiexec without mpi4py: a one-line error naming the
    extra."""
    if launched_size() <= 1:
        return SINGLE
    if not _world:
        try:
            from mpi4py import MPI
        except ImportError:
            raise CharrnnError('training under mpiexec needs mpi4py: pip install "charrnn[mpi]"') from None
        _world.append(World(MPI.COMM_WORLD))
    return _world[0]


def finish(code):
    """Called as the process ends with an error: see World.finish (nothing
    to do without MPI, or before any rank met another)."""
    if _world:
        _world[0].finish(code)
