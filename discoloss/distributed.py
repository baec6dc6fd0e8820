"""Cross-rank DisCO: form groups across data-parallel ranks from per-response scalars.

A question's responses may land on different ranks. DisCO only needs five numbers per response
to form its groups (score, KL sum, token count, reward, group id), so each rank contributes a
(B_r, 5) float64 payload and every rank computes the same global loss. Token-level tensors are
never communicated: traffic is O(sum_r B_r), not O(B * T * world) as in the published code.

Collectives per forward call, in this order, on ``process_group``:

1. ``all_gather`` of the local response count (one int64 per rank);
2. ``all_gather`` of the payload, padded to the largest count ((max_count, 5) float64 per rank).

None in backward. Reading the counts is one host sync. Every rank must call the loss the same
number of times (as for any collective); a rank with no responses cannot call it (the loss
rejects empty batches), so engines must give every rank at least one response per call.

Gradient convention: every rank holds the same global loss L. The backward of the gather
returns, for the local responses, ``world_size * dL/d(local payload)``, so that after the
usual gradient averaging of DDP / FSDP (mean over ranks) the parameters receive exactly
``dL/dtheta`` of the single-process computation on the concatenated batch. If your engine sums
gradients across ranks instead of averaging them, divide the loss by the world size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["gather_response_stats"]

#: Columns of the per-response payload.
PAYLOAD_COLUMNS = ("score", "kl_sum", "length", "reward", "group_id")


class _GatherRows(torch.autograd.Function):
    """all_gather of a (n_local, k) tensor with ragged n across ranks; autograd without comms."""

    @staticmethod
    def forward(
        ctx: Any, payload: Tensor, group: Any, counts: list[int], rank: int
    ) -> Tensor:
        world = len(counts)
        max_count = max(counts)
        padded = payload.new_zeros((max_count, payload.shape[1]))
        padded[: payload.shape[0]] = payload
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        ctx.offset = sum(counts[:rank])
        ctx.n = payload.shape[0]
        ctx.world = world
        return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        local = grad[ctx.offset : ctx.offset + ctx.n]
        return local * ctx.world, None, None, None


def gather_counts(n: int, device: torch.device, group: Any) -> list[int]:
    world = dist.get_world_size(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    counts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(counts, mine, group=group)
    return [int(c) for c in torch.cat(counts).tolist()]  # the one host sync


def gather_response_stats(
    scores: Tensor,
    kl_sums: Tensor,
    lengths: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    group: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Concatenate per-response scalars of every rank, in rank order.

    Scores and KL sums keep their autograd connection to the local inputs (see the module
    docstring for the gradient scale). Group ids travel bit-exactly (int64 reinterpreted as
    float64), so any int64 id is preserved. Returned float tensors are float64.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first or pass process_group=None"
        )
    f = torch.float64
    payload = torch.stack(
        [
            scores.to(f),
            kl_sums.to(f),
            lengths.to(f),
            rewards.to(f),
            group_ids.to(torch.int64).view(f),
        ],
        dim=1,
    )
    counts = gather_counts(payload.shape[0], payload.device, group)
    rank = dist.get_rank(group)
    full: Tensor = _GatherRows.apply(payload, group, counts, rank)  # type: ignore[no-untyped-call]
    ids = full[:, 4].detach().contiguous().view(torch.int64)
    return full[:, 0], full[:, 1], full[:, 2], full[:, 3], ids
