"""Data-parallel training across processes and machines over MPI (mpi4py), imported only when asked for.

    mpiexec -n R python -m mpi4py -m cllm.tools.train_model DATA --distributed mpi

Each of the R ranks reads the same batch (batches are a pure function of seed and step) and runs its block of
S/R spheres on its own threads. The ranks' gradient sums are then gathered to every rank and added in the order
of the spheres' reduction tree (`spheres.ReductionTree`), never in whatever order the MPI library would reduce
in, so R ranks give the bits of one process running all S spheres. That needs R to be a power of two dividing
S. Cost: an allgather moves R x (parameter count) floats into every rank, where an allreduce would move about
2x; for models that fit a CPU that is milliseconds on one machine and the price of reproducibility across.

Every collective is non-blocking and waited for under the step's deadline, so a rank that dies or stalls makes
the others raise instead of waiting forever; the training tool then calls MPI_Abort, which ends every rank.
"""
from __future__ import annotations

import anyio
import numpy as np

from .errors import UsageError
from .spheres import ReductionTree, TreeSum

POLL_S = 0.0005  # how often a pending collective is checked; the event loop stays responsive meanwhile


class CollectiveTimeout(RuntimeError):
    """A collective call missed its deadline: another rank stopped taking part."""


class MPIGroup:
    """The ranks of MPI_COMM_WORLD, with the few collectives training needs."""

    def __init__(self):
        try:
            from mpi4py import MPI
        except ImportError:
            raise UsageError("--distributed mpi needs mpi4py and an MPI runtime: pip install -e '.[mpi]'") from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.tree = ReductionTree(self.size)
        self._gathered: np.ndarray | None = None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def owned_spheres(self, spheres: int) -> tuple[int, int]:
        """This rank's block of spheres. Refuses a split that would not give one process's bits."""
        if spheres % self.size or self.size & (self.size - 1):
            raise UsageError(f"{self.size} ranks cannot share {spheres} spheres bit-reproducibly: the rank count "
                             f"must be a power of two that divides --spheres")
        share = spheres // self.size
        return self.rank * share, (self.rank + 1) * share

    async def _wait(self, request, what: str, timeout: float | None) -> None:
        try:
            with anyio.fail_after(timeout):
                while not request.Test():
                    await anyio.sleep(POLL_S)
        except TimeoutError:
            raise CollectiveTimeout(f"rank {self.rank}: {what} missed its {timeout:.0f} s deadline; another rank "
                                    f"has stopped or stalled") from None

    async def broadcast(self, array: np.ndarray, what: str, timeout: float | None = None) -> None:
        """array (contiguous) := rank 0's array."""
        await self._wait(self.comm.Ibcast(array, root=0), f"broadcast of {what}", timeout)

    async def tree_sum(self, local: np.ndarray, what: str, timeout: float | None = None) -> np.ndarray:
        """Every rank's `local` (1-D float32 or float64), added in reduction-tree order; written into local."""
        if self._gathered is None or self._gathered.shape != (self.size, local.size) \
                or self._gathered.dtype != local.dtype:
            self._gathered = np.empty((self.size, local.size), local.dtype)
        gathered = self._gathered
        await self._wait(self.comm.Iallgather(local, gathered), f"allgather of {what}", timeout)
        total = TreeSum(self.tree, lambda a, b: np.add(a, b, out=a))
        for r in range(self.size):
            total.push(r, r + 1, gathered[r])
        np.copyto(local, total.result())
        return local

    async def wait_for_all(self, what: str, timeout: float | None = None) -> None:
        """Returns once every rank has got here (a barrier under a deadline)."""
        await self._wait(self.comm.Ibarrier(), what, timeout)

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, status: int) -> None:
        """Ends every rank at once (a failed rank must not leave the others waiting)."""
        self.comm.Abort(status)
