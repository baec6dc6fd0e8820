r"""How DisCO's labels and groups travel through verl's ``advantages`` tensor.

verl hands a policy loss nothing but ``old_log_prob, log_prob, advantages, response_mask``: no
uid, no reward. The DisCO advantage estimator therefore writes one float32 *code* per response
and broadcasts it to every response-mask position of that response::

    code_i = sign_i * (2 * (g_i + 1) + irregular_{g_i})

    sign_i      = +1 if reward_i > threshold (positive) else -1
    g_i         = dense index of the response's question in the training batch, 0 <= g < G
    irregular_g = 1 if the question does not have exactly ``rollout.n`` responses, else 0

and ``code = 0`` for a response without response tokens (verl's synthetic padding samples),
which the loss ignores. The loss reads the code back from each row's first response-mask
position. Why this survives verl's data path exactly:

* all values are integers of magnitude < 2**24, exactly representable in float32 (verl keeps
  advantages in float32 end to end); G may reach 2**23 - 1 questions per training batch;
* every response token carries the whole code, so the padding-free nested layout (only the
  response positions survive) and 1-token responses lose nothing;
* the uid strings are only hashed in the driver, any strings work;
* a question's responses carry the same code, so the loss recovers groups inside any micro-batch
  regardless of order, and by counting them it sees whether a question with ``rollout.n``
  responses arrived whole (``irregular = 0``), which catches a layout that split it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

#: Largest representable code magnitude (exact float32 integers).
MAX_CODE = 2**24 - 1
#: Most questions one training batch may hold.
MAX_GROUPS = (MAX_CODE - 1) // 2 - 1


def encode_codes(
    rewards: Tensor,
    has_tokens: Tensor,
    uids: Sequence[Any],
    *,
    threshold: float,
    group_size: int | None,
) -> Tensor:
    """Per-response codes (B,) float32, see the module docstring.

    Args:
      rewards: (B,) sequence rewards (e.g. ``token_level_rewards.sum(-1)``).
      has_tokens: (B,) bool, the response has at least one response token.
      uids: B hashable question ids (verl's ``uid`` strings); any values.
      threshold: positive iff reward > threshold.
      group_size: the expected number of responses per question (``rollout.n``); questions with
        another count are flagged irregular. None flags questions whose count differs from the
        most common count.
    """
    b = rewards.shape[0]
    if len(uids) != b:
        raise ValueError(f"index: expected {b} uids (one per response), got {len(uids)}")
    has = has_tokens.detach().cpu().tolist()
    dense: dict[Any, int] = {}
    group = [0] * b
    counts: list[int] = []
    for i, uid in enumerate(uids):
        if not has[i]:
            continue
        g = dense.get(uid)
        if g is None:
            g = dense[uid] = len(counts)
            counts.append(0)
        counts[g] += 1
        group[i] = g + 1
    if len(counts) > MAX_GROUPS:
        raise ValueError(
            f"index: {len(counts)} questions in one training batch; the float32 advantage code "
            f"holds at most {MAX_GROUPS}. Use a smaller data.train_batch_size."
        )
    expected = group_size
    if expected is None and counts:
        expected = max(set(counts), key=counts.count)
    irregular = [0] + [int(c != expected) for c in counts]
    g_t = torch.tensor(group, dtype=torch.int64)
    irr_t = torch.tensor(irregular, dtype=torch.int64)[g_t]
    magnitude = torch.where(g_t > 0, 2 * g_t + irr_t, 0).to(torch.float32)
    positive = rewards.detach().cpu().to(torch.float64) > threshold
    return torch.where(positive, magnitude, -magnitude).to(rewards.device)


def broadcast_codes(codes: Tensor, response_mask: Tensor) -> Tensor:
    """(B,) codes -> (B, T) float32 advantages: the code at every response-mask position, 0
    elsewhere."""
    return torch.where(response_mask.bool(), codes.to(torch.float32)[:, None], 0.0)


class Decoded(NamedTuple):
    """What the loss reads back from one micro-batch's advantages.

    code: (B,) the raw code of each row (0 for rows without response tokens).
    positive: (B,) bool label.  group: (B,) int64, g + 1, 0 for ignored rows.
    irregular: (B,) bool, the row's question was flagged irregular by the estimator.
    lengths: (B,) int64 number of response tokens.
    consistent: 0-d bool, every response token of every row carries its row's code and every
      row with response tokens carries a well-formed code (the advantages are DisCO codes).
    """

    code: Tensor
    positive: Tensor
    group: Tensor
    irregular: Tensor
    lengths: Tensor
    consistent: Tensor


def decode_codes(advantages: Tensor, response_mask: Tensor, *, check: bool) -> Decoded:
    """Read the per-row code at each row's first response-mask position (no host sync).

    ``check`` also computes ``consistent`` (one extra pass over (B, T)); otherwise it is True.
    """
    mask = response_mask.bool()
    lengths = mask.sum(-1)
    first = mask.to(torch.uint8).argmax(-1, keepdim=True)
    code = advantages.gather(-1, first).squeeze(-1).to(torch.float32)
    code = torch.where(lengths > 0, code, 0.0)
    magnitude = code.abs()
    mag_int = magnitude.round().to(torch.int64)
    group = mag_int // 2
    irregular = (mag_int % 2) == 1
    positive = code > 0
    if check:
        same = torch.where(mask, advantages.to(torch.float32) == code[:, None], True).all()
        well_formed = torch.where(
            lengths > 0,
            (magnitude == magnitude.round()) & (magnitude >= 2) & (magnitude <= MAX_CODE),
            True,
        ).all()
        consistent = same & well_formed
    else:
        consistent = torch.ones((), dtype=torch.bool, device=code.device)
    return Decoded(code, positive, group, irregular, lengths, consistent)
