"""Data-parallel training across processes and machines over MPI (mpi4py), imported only when asked for.

    mpiexec -n R python -m mpi4py -m cllm.tools.train_model DATA --distributed mpi

Each of the R ranks reads the same batch (batches are a pure function of seed and step) and runs its block of
S/R spheres on its own threads. The ranks' gradient sums are then gathered to every rank and added in the order
of the spheres' reduction tree (`spheres.ReductionTree`), never in whatever order the MPI library would reduce
in, so R ranks give the bits of one process running all S spheres. That needs R to be a power of two dividing
S. Cost: an allgather moves R x (parameter count) floats into every rank, where an allreduce would move about
2x; for models that fit a CPU that is milliseconds on one machine and the price of reproducibility across.

Before the first step the ranks prove they run the same computation: each digests what must be equal (the data,
the tokenizer, the settings, the step), the digests are gathered, and any difference is an error that names the
field and the ranks. Then rank 0's whole training state (parameters, AdamW moments and step count) is broadcast,
so a rank whose copy of the run folder is stale cannot drift in silence.

Every collective is non-blocking and waited for under the step's deadline, so a rank that dies or stalls makes
the others raise instead of waiting forever. A rank that fails ends the whole job with MPI_Abort (the tools do
this for any failure, cllm.tools._cli.run), so no rank is left waiting at a collective.
"""
from __future__ import annotations

import hashlib

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

    async def check_agreement(self, fields: dict[str, bytes], timeout: float | None = None) -> None:
        """Raises UsageError unless every rank holds the same value for each field (compared as sha256 digests),
        naming the first field that differs and the ranks that differ from rank 0."""
        digests = np.frombuffer(b"".join(hashlib.sha256(value).digest() for value in fields.values()), np.uint8)
        gathered = np.empty((self.size, digests.size), np.uint8)
        await self._wait(self.comm.Iallgather(digests, gathered), "the ranks' agreement check", timeout)
        for i, name in enumerate(fields):
            field = slice(32 * i, 32 * (i + 1))
            differ = [r for r in range(1, self.size) if not np.array_equal(gathered[r, field], gathered[0, field])]
            if differ:
                raise UsageError(f"rank{'s' if len(differ) > 1 else ''} {', '.join(map(str, differ))} disagree"
                                 f"{'' if len(differ) > 1 else 's'} with rank 0 about {name}: every rank needs the "
                                 f"same data, run folder and settings")

    async def share_training_state(self, optimizer, timeout: float | None = None) -> None:
        """Every rank takes rank 0's parameters, AdamW moments and step count."""
        for array, what in [(optimizer.model.params, "the parameters"), (optimizer.m, "AdamW's first moments"),
                            (optimizer.v, "AdamW's second moments")]:
            await self.broadcast(array, what, timeout)
        step_count = np.array([optimizer.step_count], np.int64)
        await self.broadcast(step_count, "AdamW's step count", timeout)
        optimizer.step_count = int(step_count[0])

    async def wait_for_all(self, what: str, timeout: float | None = None) -> None:
        """Returns once every rank has got here (a barrier under a deadline)."""
        await self._wait(self.comm.Ibarrier(), what, timeout)

    def barrier(self) -> None:
        self.comm.Barrier()
