"""torch.distributed plumbing for jobs launched by `torchrun` (one module, nothing else imports torch.distributed).

    dist = Dist.from_env(device)     # reads RANK / WORLD_SIZE / LOCAL_RANK set by torchrun
    mine = dist.share(items)         # this rank's round-robin share of a list
    dist.settle(work)                # run work(); every rank learns whether any rank failed
    everything = dist.gather(obj)    # every rank's object, in rank order, on every rank
    total = dist.sum(tensor)         # all-reduce sum (data-parallel training)

Without torchrun (WORLD_SIZE unset or 1) `Dist.from_env` returns a one-process
Dist whose methods are identities, so pipeline code has a single path.

Failure: a rank whose work raises does not leave the others waiting. `settle`
catches the error, then all ranks exchange their status (an all-gather of error
messages); if any rank failed, every rank raises the same CsrError naming the rank
and its message, so nothing is written under the output name. A rank that dies
without reaching the exchange (killed, segfault) is caught by torchrun, which
stops the others, and by the process-group timeout (CSRTOOL_DIST_TIMEOUT seconds,
default 1800) on collectives.
"""

from __future__ import annotations

import atexit
import gc
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import torch

from csrtool.errors import CsrError

T = TypeVar("T")
TIMEOUT_ENV = "CSRTOOL_DIST_TIMEOUT"


def launched() -> bool:
    """True inside a torchrun job with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls, device: str | torch.device = "auto") -> "Dist":
        """Join the torchrun process group (gloo on CPU, nccl on CUDA) or return the one-process Dist.

        device 'auto'/'cuda' under torchrun becomes this rank's local GPU cuda:LOCAL_RANK."""
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if not launched():
            return cls(device=dev)
        import torch.distributed as td

        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
        if dev.type == "cuda":
            if dev.index is not None and torch.cuda.device_count() > 1:
                raise CsrError(f"--device {dev} names one GPU but torchrun started {world} processes: use --device cuda (each rank takes cuda:LOCAL_RANK)")
            dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
            torch.cuda.set_device(dev)
        if not td.is_initialized():
            timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
            td.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
            atexit.register(_leave)
        return cls(rank, world, local, dev)

    @property
    def root(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every world-th one starting at its rank (balances ordered costs)."""
        return list(items[self.rank :: self.world])

    def gather(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank (tensors travel pickled: move them to CPU first)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        got: list[Any] = [None] * self.world
        td.all_gather_object(got, obj)
        return got

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of t over all ranks (a new tensor; t is left alone)."""
        if self.world == 1:
            return t
        import torch.distributed as td

        out = t.to(self.device, copy=True)  # nccl reduces CUDA tensors only
        td.all_reduce(out, op=td.ReduceOp.SUM)
        return out.to(t.device)

    def close(self) -> None:
        """Leave together: a barrier, then the process group is torn down while every rank is still alive
        (left to interpreter exit, gloo's threads were sometimes destroyed mid-flight: SIGABRT on one rank)."""
        if self.world > 1:
            self.barrier()
            _leave()

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def settle(self, work: Callable[[], T], what: str = "work") -> T:
        """Run work() on this rank; raise CsrError on every rank if it failed on any rank."""
        if self.world == 1:
            return work()
        try:
            result, failure = work(), None
        except CsrError as exc:
            result, failure = None, str(exc)
        except Exception as exc:  # noqa: BLE001 -- reported to every rank as a CsrError below
            result, failure = None, f"{type(exc).__name__}: {exc}"
        failures = [(r, f) for r, f in enumerate(self.gather(failure)) if f is not None]
        if failures:
            r, f = failures[0]
            more = f" (and {len(failures) - 1} more rank(s))" if len(failures) > 1 else ""
            raise CsrError(f"{what} failed on rank {r} of {self.world}{more}: {f}")
        return result


def _leave() -> None:
    """Destroy the process group if it is still up (idempotent; also the atexit fallback)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()
        gc.collect()  # free gloo's finished work objects now, not in interpreter finalisation (SIGABRT there)
