r"""The multiplier of ``constraint=lagrangian`` under verl: training state of each actor worker.

Every actor worker process holds one :class:`discoloss.constraints.LagrangeMultiplier`
(created on first use with ``lagrangian_lr``, initial value 0). Per optimizer step (one verl
mini-batch, ``TrainingWorker.train_batch``):

1. every micro-batch loss uses the multiplier's current value lambda, a constant:
   ``dp * (N_m/N) * lambda * (KL_m - delta)``, which adds up over micro-batches and ranks to
   lambda * (KL - delta) of the mini-batch, value and gradient (linear in KL; the factor dp
   undoes verl's averaging of the gradients over the data-parallel ranks);
2. ``weights=micro_batch``: each loss adds its detached KL share (N_m/N) KL_m to a per-process
   accumulator (a tensor add: no host sync, no collective in the loss path); after the
   optimizer step the adapter's wrapper of ``train_batch`` (:mod:`._hooks`) sums the
   accumulators over the data-parallel group (one all-reduce, outside the loss): that is the
   mini-batch's global KL = sum over ranks and micro-batches of the shares, identical on every
   rank. ``weights=current/sampling``: the mini-batch's KL comes from its plan
   (:func:`discoloss.adapters.verl.planning.finish`: the plan's KL at the current parameters,
   or the training pass's shares, already summed over the group), passed as ``kl``;
3. the multiplier takes ONE dual-ascent step
   lambda <- max(0, lambda + lagrangian_lr * (KL - delta)).
   A non-finite KL (verl then skips the optimizer step) leaves lambda unchanged.

The state is written next to verl's actor checkpoint (:data:`STATE_FILE` in the actor's
checkpoint folder, by the last global rank, which runs the loss under every verl engine; the
value is the same on every rank that runs it) and read back on every rank when verl resumes
from it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from discoloss.constraints import LagrangeMultiplier

__all__ = [
    "STATE_FILE",
    "LagrangianState",
    "finish_step",
    "load_state",
    "multiplier",
    "record_kl_share",
    "reset",
    "save_state",
    "state",
]

#: File holding the multiplier's state, in verl's actor checkpoint folder.
STATE_FILE = "discoloss_lagrangian.pt"

logger = logging.getLogger(__name__)


@dataclass
class LagrangianState:
    """Per-process state: the multiplier and the KL shares of the running optimizer step."""

    multiplier: LagrangeMultiplier | None = None
    pending: Tensor | None = None
    history: list[float] = field(default_factory=list)


_STATE = LagrangianState()


def state() -> LagrangianState:
    """This process's state (one actor worker per process in verl)."""
    return _STATE


def reset() -> None:
    """Forget the multiplier and the pending KL (a fresh worker)."""
    global _STATE
    _STATE = LagrangianState()


def multiplier(*, lr: float) -> LagrangeMultiplier:
    """This process's multiplier, created with ``lr`` on first use."""
    if _STATE.multiplier is None:
        _STATE.multiplier = LagrangeMultiplier(lr=lr)
    return _STATE.multiplier


def record_kl_share(kl_share: Tensor) -> None:
    """Add a micro-batch's detached KL share (N_m/N) KL_m to the running step (tensor op)."""
    kl = kl_share.detach().to(torch.float64)
    _STATE.pending = kl if _STATE.pending is None else _STATE.pending + kl.to(_STATE.pending)


def finish_step(
    *, delta: float, group: Any = None, device: Any = None, kl: float | Tensor | None = None
) -> Tensor | None:
    """After an optimizer step: the global KL of the step (``kl`` when the caller knows it on
    every rank, else the pending shares summed over ``group``, the data-parallel process group;
    None = no all-reduce, one process), one multiplier update with it, the accumulator
    cleared. Without ``kl`` every rank of ``group`` must call it (it holds the one collective).
    Returns the global KL (0-d float64), or None when this process has no multiplier yet (no
    DisCO loss ran)."""
    m = _STATE.multiplier
    pending, _STATE.pending = _STATE.pending, None
    if m is None:
        return None
    if kl is not None:
        return _update(m, torch.as_tensor(kl, dtype=torch.float64, device=device), delta)
    if pending is None:
        pending = torch.zeros((), dtype=torch.float64, device=device)
    total = pending.clone()
    dist = torch.distributed
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return _update(m, total, delta)


def _update(m: LagrangeMultiplier, kl: Tensor, delta: float) -> Tensor:
    """One dual-ascent step with the step's global KL; a non-finite KL leaves lambda as is
    (``validate=False``: no host sync and no error here; the step's non-finite loss is what
    verl's grad-norm guard and the adapter's fault checks act on)."""
    m.update(kl, delta=delta, validate=False)
    return kl


def _is_saving_rank() -> bool:
    """The last global rank: with FSDP every rank holds the same multiplier; with Megatron
    pipeline parallelism only the last stage computes the loss, and the last global rank is
    in it."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank() == dist.get_world_size() - 1


def save_state(local_path: str) -> str | None:
    """Write the multiplier's state to ``local_path/STATE_FILE`` (the last global rank only)."""
    m = _STATE.multiplier
    if m is None or not _is_saving_rank():
        return None
    os.makedirs(local_path, exist_ok=True)
    path = os.path.join(local_path, STATE_FILE)
    torch.save(m.state_dict(), path)
    return path


def load_state(local_path: str, *, lr: float) -> bool:
    """Read the multiplier's state from ``local_path/STATE_FILE`` if present (all ranks).
    Returns False (and keeps a fresh multiplier) when the checkpoint has none."""
    path = os.path.join(local_path, STATE_FILE)
    if not os.path.isfile(path):
        logger.warning(
            "%s: no DisCO multiplier state in this checkpoint; constraint=lagrangian starts "
            "from lambda=0",
            local_path,
        )
        return False
    saved = torch.load(path, map_location="cpu", weights_only=True)
    m = multiplier(lr=lr)
    m.load_state_dict(saved)
    m.lr = lr  # the run's setting wins over the saved step size
    _STATE.pending = None
    return True
