"""How data-parallel training combines values across processes; one process by default.

The engine never imports torch.distributed. A data-parallel caller passes an object
with `sum(t) -> t summed over processes`, `root` (True on exactly one process) and
`world` (process count) -- csrtool.distributed.Dist is one. `LOCAL` is the
one-process object: sums are identities, so the single-process path is the same code.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Comm(Protocol):
    root: bool
    world: int

    def sum(self, t: torch.Tensor) -> torch.Tensor: ...


class _Local:
    root = True
    world = 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return t


LOCAL: Comm = _Local()


def bcast(comm: Comm, t: torch.Tensor) -> torch.Tensor:
    """The root's t on every process (non-roots pass a tensor of the same shape; its values are ignored)."""
    return comm.sum(t if comm.root else torch.zeros_like(t))


def count(comm: Comm, n: int) -> int:
    """n summed over processes."""
    return int(comm.sum(torch.tensor(n, dtype=torch.long)))
