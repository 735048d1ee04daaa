"""Scale-out with ``torch.distributed`` under ``torchrun``: every statistic is a sum, so one all-reduce suffices.

Each process accumulates its share of the rows; after a vote that all succeeded, one in-place
float64 all-reduce gives every process the global statistics; each solves its share of the
layers and rank 0 gathers and writes.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from njtc_solve.core.errors import NJTCError

__all__ = ["Communicator"]


class Communicator:
    """A ``torch.distributed`` process group as the fit uses it.

    Parameters
    ----------
    device : str
        ``"cpu"`` uses gloo, ``"cuda"`` uses nccl (each process on ``LOCAL_RANK``'s GPU).
    timeout_s : float
        How long a collective waits for a peer before the run fails.
    """

    def __init__(self, device="cpu", timeout_s: float | None = None):
        cuda = torch.device(device).type == "cuda"
        timeout_s = timeout_s or float(os.environ.get("NJTC_DIST_TIMEOUT", 600))
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
        if cuda:  # NCCL binds each process to its current device: set it before the group exists
            if not torch.cuda.is_available() or self.device.index >= torch.cuda.device_count():
                raise NJTCError(f"`device` cuda: process {os.environ.get('RANK', 0)} has no GPU {self.device}")
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            kwargs = {"device_id": self.device} if cuda else {}
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s),
                                    **kwargs)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.voted = False

    @classmethod
    def from_environment(cls, device="cpu"):
        """A communicator when launched by torchrun with several processes, else ``None``."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return cls(device)
        return None

    def _collective(self, fn, *args):
        """``fn(*args)``, a failed peer as one NJTCError line."""
        try:
            return fn(*args)
        except (RuntimeError, dist.DistError) as err:
            raise NJTCError(f"process {self.rank}: a peer process failed or left the run ({type(err).__name__}); "
                            "no output written") from err

    def all_reduce(self, acc) -> None:
        """Sum every process's accumulator (row counts included) in one in-place float64 all-reduce."""
        self._collective(dist.all_reduce, acc.packed())
        acc.unpacked()

    def gather_to_root(self, item):
        """Every process's ``item`` (picklable, on the CPU) as a list on rank 0; ``None`` elsewhere."""
        out = [None] * self.world_size if self.rank == 0 else None
        self._collective(dist.gather_object, item, out, 0)
        return out

    def minimum(self, value: int) -> int:
        """The least of every process's integer ``value`` (a collective that every process calls)."""
        tensor = torch.tensor([int(value)], dtype=torch.int64, device=self.device)
        self._collective(dist.all_reduce, tensor, dist.ReduceOp.MIN)
        return int(tensor.item())

    def vote(self, ok: bool) -> bool:
        """Whether every process reports success (a collective each calls once; a dead peer fails it)."""
        self.voted = True
        try:
            return self.minimum(1 if ok else 0) == 1
        except NJTCError:  # a peer failed or left
            return False

    def close(self) -> None:
        """Leave the process group."""
        if dist.is_initialized():
            dist.destroy_process_group()
