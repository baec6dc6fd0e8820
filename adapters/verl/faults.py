"""A bad value met by one rank stops every rank, never just one.

Inside verl's training worker a policy loss that raises on one data-parallel rank leaves the
other ranks waiting in the gradient reduction of their backward pass (or in the parameter
all-gather of their next forward): the job hangs until the collective times out. So, while a
verl worker runs a training or forward pass (``TrainingWorker.train_batch`` /
``infer_batch``, wrapped by :mod:`._hooks`), the DisCO loss with ``validate=true`` does not
raise. It records the outcome of its checks as tensors (no host sync in the loss) and makes
its own loss NaN when a check fails, so that the gradient of the step is non-finite on every
rank after the reduction and verl skips the optimizer step everywhere. After the pass, every
rank of the worker group all-reduces the per-rank fault counts (one small collective per
optimizer step, outside the loss) and, if any rank met a fault, every rank raises the same
:class:`DiscoLayoutError`, which names the rank(s) and the fault; the rank that met it adds
its details.

Outside a verl worker (the loss called directly, one process) nothing is deferred: the loss
raises at once, as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._options import DiscoLayoutError

__all__ = ["KINDS", "check_pass", "deferring", "is_deferring", "record"]

#: What the loss checks, in the order of its flags.
KINDS = (
    "advantages without DisCO codes",
    "a question split across micro-batches",
    "a non-finite log_prob/old_log_prob at a response token",
    "micro-batch rows that do not match the mini-batch's plan",
)


@dataclass
class _Pass:
    flags: list[Tensor] = field(default_factory=list)  # per micro-batch: (len(KINDS),) bool, ok
    details: list[Callable[[], str | None]] = field(default_factory=list)


_STACK: list[_Pass] = []


def is_deferring() -> bool:
    """True while a verl worker's pass collects the loss's checks (see module docstring)."""
    return bool(_STACK)


@contextlib.contextmanager
def deferring() -> Iterator[_Pass]:
    p = _Pass()
    _STACK.append(p)
    try:
        yield p
    finally:
        _STACK.pop()


def record(flags: Tensor, detail: Callable[[], str | None]) -> None:
    """Keep one micro-batch's check flags (True = ok) and a function that describes a failure
    (called only after the pass, when a fault is known)."""
    _STACK[-1].flags.append(flags.detach())
    _STACK[-1].details.append(detail)


def check_pass(p: _Pass, *, device: Any = None) -> None:
    """After a pass, on every rank: all-reduce the per-rank fault counts over the default
    process group (the worker group's ranks) and raise the same error everywhere if any rank
    met a fault. Every rank must call it (it holds one collective)."""
    dist = torch.distributed
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    rank = dist.get_rank() if distributed else 0
    if not distributed:
        device = "cpu"
    elif p.flags:
        device = p.flags[0].device  # the device the loss ran on, the backend's
    counts = torch.zeros(world, len(KINDS), dtype=torch.int64, device=device)
    if p.flags:
        bad = (~torch.stack([f.to(counts.device) for f in p.flags])).sum(0)
        counts[rank] = bad
    if distributed:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    if not bool(counts.any()):
        return
    per_rank = counts.cpu().tolist()
    found = []
    for r, row in enumerate(per_rank):
        kinds = [f"{k} ({c} micro-batch{'es' if c > 1 else ''})" for k, c in zip(KINDS, row) if c]
        if kinds:
            found.append(f"rank {r}: " + "; ".join(kinds))
    local = None
    if any(per_rank[rank]):
        for flags, detail in zip(p.flags, p.details):
            if not bool(flags.all()):
                local = detail()
                break
    message = (
        f"DisCO loss checks failed on {len(found)} of {world} rank(s) ({', '.join(found)}). "
        "The loss of the affected micro-batches was made NaN, so verl's non-finite gradient-norm "
        "check skipped this optimizer step on every rank; the job stops on every rank."
    )
    if local:
        message += f" This rank: {local}"
    raise DiscoLayoutError(message)
