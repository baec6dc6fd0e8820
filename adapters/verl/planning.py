r"""One plan per mini-batch: DisCO's exact gradient at any micro-batch layout
(``policy_loss.weights=current`` or ``sampling``).

DisCO's gradient is a per-response weighted sum (DESIGN section 2, :mod:`discoloss.accumulation`):
once the weights w_i and the penalty's slope kappa of a whole mini-batch are known, any
micro-batch, on any rank, backpropagates ``-sum_i w_i s_i + kappa * (its KL share)`` and the
pieces add up to the gradient of :func:`discoloss.disco_loss` on the mini-batch. What happens
per optimizer step (one verl mini-batch, ``TrainingWorker.train_batch``, wrapped by
:mod:`._hooks`), on every data-parallel rank:

1. **rows** (:func:`plan_mini_batch`): this rank's rows of the mini-batch, decoded from the
   estimator's codes (label and question of each response, :mod:`.encoding`). Rows without
   response tokens (verl's synthetic padding samples) get weight 0 and stay out of the plan.
2. **stats**: per response, its score, KL sum and token count
   (:func:`discoloss.accumulation.response_stats`), from the log-probs given: the current
   parameters' (``current``: the engine's own forward pass over the mini-batch, no grad), or
   the old log-probs (``sampling``, and ``current`` on the first mini-batch of a step when the
   actor computed them at theta_old, where they are the current ones).
3. **plan**: :func:`discoloss.accumulation.plan_minibatch` over the engine's data-parallel
   group: 5 numbers per response gathered (a question may span ranks), the whole mini-batch
   planned on every rank: this rank's weights, kappa, the mini-batch's token count N and its
   DisCO output. One more all-gather (R + 1 int64 per rank, R = this rank's rows) shares the
   question ids for the whole-question metric and the outcome of this module's own checks.
   Every error is collective: the same exception on every rank, before any backward pass.
4. **handoff** (:func:`install`): the mini-batch's ``advantages`` become each row's position in
   the plan (``row + 1``, float32-exact, at every response token), so that each row finds its
   weight whatever verl does to the rows next (micro-batches of any size, token-based dynamic
   batches, padding-free packing); :func:`running` keeps the plan in this process while verl
   runs the mini-batch.
5. **loss** (:func:`micro_batch_loss`, called by the ``disco`` policy loss): ``dp * ``
   :func:`discoloss.accumulation.micro_batch_loss` (verl averages gradients over the ``dp``
   data-parallel ranks) with the rows' weights; the detached KL and penalty shares and the rows
   used are accumulated in the plan (tensor ops: no host sync, no collective in the loss).
6. **finish** (:func:`finish`): one all-reduce of the KL share, the penalty share and the
   count of rows not used exactly once; the mini-batch's metrics.

Exactness: with ``current`` the gradient equals :func:`discoloss.disco_loss`'s on the mini-batch
at the current parameters, squared hinge included (kappa from the mini-batch's KL). With
``sampling`` the weights come from the sampling policy's scores: exact for ``disco_b`` (whose
weights do not depend on the scores) and on the first mini-batch of a step, an approximation
afterwards; the KL at the sampling policy is 0, so constraints that are not linear in the KL
(``squared_hinge``, ``hinge``) are applied per micro-batch to its own KL (the local
approximation of :func:`discoloss.accumulation.micro_batch_loss`), the linear ones
(``kl_penalty``, ``lagrangian``, ``none``) exactly.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import Tensor

from discoloss._types import Constraint, KLEstimator, Normalize, Objective, Score
from discoloss.accumulation import (
    MicroBatchLoss,
    plan_minibatch,
    response_stats,
)
from discoloss.accumulation import micro_batch_loss as core_micro_batch_loss
from discoloss.constraints import LagrangeMultiplier, constraint_penalty
from discoloss.loss import DiscoOutput

from ._options import DiscoLayoutError, VerlDiscoOptions
from .encoding import decode_codes

__all__ = [
    "LINEAR_CONSTRAINTS",
    "Plan",
    "active",
    "finish",
    "install",
    "micro_batch_loss",
    "plan_mini_batch",
    "running",
]

#: Constraints whose penalty is linear in the KL: exact per micro-batch with stats from any
#: parameters (the slope does not depend on the KL).
LINEAR_CONSTRAINTS = ("kl_penalty", "lagrangian", "none")


@dataclass
class Plan:
    """The plan of the mini-batch this rank is running, and what its micro-batches add up.

    weights: (R,) float64, dJ/ds of each of this rank's rows (0 for rows without tokens).
    positive: (R,) bool label of each row (for ``score=clipped_ratio``).
    lengths: (R,) int64 response tokens of each row (checked against what the loss sees).
    kl_coef: 0-d slope of the penalty (exact path), or None: the local approximation per
      micro-batch (``sampling`` with a constraint that is not linear in the KL).
    num_tokens: 0-d number of response tokens of the whole mini-batch (all ranks).
    output: :class:`discoloss.DiscoOutput` of the whole mini-batch at the stats' parameters.
    whole: share of the mini-batch's responses whose question has all of its ``rollout.n``
      responses in this mini-batch (host float).
    dp_size: data-parallel ranks of the plan (the gradient factor of the loss).
    options: the run's options. multiplier: the Lagrange multiplier, if any.
    kl_share, penalty_share: 0-d float64 sums of the micro-batch losses' detached KL share and
      penalty term. used: (R,) int64, how often each row reached the loss.
    seconds: wall time of the planning (stats forward included).
    """

    weights: Tensor
    positive: Tensor
    lengths: Tensor
    kl_coef: Tensor | None
    num_tokens: Tensor
    output: DiscoOutput
    whole: float
    dp_size: int
    options: VerlDiscoOptions
    multiplier: LagrangeMultiplier | None
    kl_share: Tensor
    penalty_share: Tensor
    used: Tensor
    seconds: float = 0.0


_ACTIVE: list[Plan] = []


def active() -> Plan | None:
    """The plan of the mini-batch that this process is running (None outside of one)."""
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def running(plan: Plan) -> Iterator[Plan]:
    """Make ``plan`` the one the DisCO loss uses while verl runs its mini-batch."""
    _ACTIVE.append(plan)
    try:
        yield plan
    finally:
        _ACTIVE.pop()


def _distributed(group: Any) -> bool:
    return group is not None and dist.is_available() and dist.is_initialized()


def _padded(data: Any, name: str, device: Any) -> Tensor:
    value = data[name]
    if getattr(value, "is_nested", False):
        value = value.to_padded_tensor(0.0)
    return cast(Tensor, value.to(device))


def plan_mini_batch(
    data: Any,
    options: VerlDiscoOptions,
    *,
    group_size: int,
    log_probs: Tensor | None = None,
    group: Any = None,
    multiplier: LagrangeMultiplier | None = None,
    device: Any = None,
) -> Plan:
    """The plan of one mini-batch (steps 1-3 of the module docstring), on every rank of
    ``group``.

    Args:
      data: this rank's rows of the mini-batch (verl's ``TensorDict``: ``advantages`` with the
        estimator's codes, ``old_log_probs``, ``response_mask``; nested or padded).
      options: the run's options (``weights`` must be ``current`` or ``sampling``).
      group_size: ``rollout.n``, for the whole-question metric.
      log_probs: (R, T) log-probs at the current parameters, aligned with the padded
        ``response_mask``; None: the old log-probs (the sampling policy's stats).
      group: the engine's data-parallel process group (None: one process).
      multiplier: the Lagrange multiplier of ``constraint=lagrangian``.
      device: where the plan lives (the device the loss runs on; default: the data's).

    Every rank of ``group`` must call it (it holds three collectives); an error is raised on
    every rank alike.
    """
    start = time.perf_counter()
    distributed = _distributed(group)
    mask = _padded(data, "response_mask", device).bool()
    device = mask.device
    codes = _padded(data, "advantages", device)
    old = _padded(data, "old_log_probs", device)
    rows = mask.shape[0]
    dec = decode_codes(codes, mask, check=options.validate)
    current = old if log_probs is None else log_probs.to(device)
    if current.shape != mask.shape:
        raise DiscoLayoutError(
            f"log_probs: shape {tuple(current.shape)} differs from the mini-batch's response "
            f"mask {tuple(mask.shape)}"
        )

    # Collective 1: this rank's question ids (0 = row without tokens) and its check.
    # (the code's magnitude: 2 * (question + 1) + irregular, 0 for rows without tokens)
    magnitude = 2 * dec.group.to(torch.int64) + dec.irregular.to(torch.int64)
    local = torch.cat([torch.where(dec.group > 0, magnitude, 0), (~dec.consistent)[None].long()])
    if distributed:
        world = dist.get_world_size(group)
        # verl gives every rank the same number of rows per mini-batch
        table = torch.empty(world * (rows + 1), dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(table, local, group=group)
        table = table.view(world, rows + 1)
    else:
        world, table = 1, local[None]
    bad = table[:, -1].cpu().tolist()
    if any(bad):
        ranks = ", ".join(str(r) for r, b in enumerate(bad) if b)
        raise DiscoLayoutError(
            f"DisCO mini-batch plan: advantages without DisCO codes on rank(s) {ranks} (each "
            "response's label and question, written by the disco advantage estimator): set "
            "algorithm.adv_estimator=disco together with "
            "actor_rollout_ref.actor.policy_loss.loss_mode=disco, and do not post-process the "
            "advantages"
        )
    whole = _whole_share(table[:, :-1], group_size)

    keep = (dec.lengths > 0).nonzero().squeeze(-1)
    o = options.disco
    positive = dec.positive & (dec.group > 0)
    rewards = positive[keep].to(torch.float32)
    with torch.no_grad():
        stats = response_stats(
            current[keep],
            old[keep],
            mask[keep],
            score=cast(Score, o.score),
            kl_estimator=cast(KLEstimator, o.kl_estimator),
            rewards=rewards,
            threshold=0.5,
            clip_eps=o.clip_eps,
            validate=False,  # the plan checks the stats, collectively
        )
    # Collectives 2-3 (the core's cross-rank plan). Labels come from the codes' sign (the
    # estimator applied the user's threshold): 0/1 rewards with threshold 0.5.
    try:
        planned = plan_minibatch(
            stats,
            rewards,
            dec.group[keep],
            score=cast(Score, o.score),
            objective=cast(Objective, o.objective),
            tau=o.tau,
            delta=o.delta,
            beta=o.beta,
            threshold=0.5,
            normalize=cast(Normalize, o.normalize),
            constraint=cast(Constraint, o.constraint),
            multiplier=multiplier,
            cvar_alpha=o.cvar_alpha,
            margin=o.margin,
            validate=options.validate,
            process_group=group if distributed else None,
        )
    except (ValueError, TypeError) as error:
        raise DiscoLayoutError(f"DisCO mini-batch plan: {error}") from error
    weights = torch.zeros(rows, dtype=torch.float64, device=device)
    weights[keep] = planned.weights.to(torch.float64)
    exact_slope = options.weights == "current" or o.constraint in LINEAR_CONSTRAINTS
    zero = torch.zeros((), dtype=torch.float64, device=device)
    return Plan(
        weights=weights,
        positive=positive,
        lengths=dec.lengths,
        kl_coef=planned.kl_coef if exact_slope else None,
        num_tokens=planned.num_tokens,
        output=planned.output,
        whole=whole,
        dp_size=world,
        options=options,
        multiplier=multiplier,
        kl_share=zero.clone(),
        penalty_share=zero.clone(),
        used=torch.zeros(rows, dtype=torch.int64, device=device),
        seconds=time.perf_counter() - start,
    )


def _whole_share(magnitudes: Tensor, group_size: int) -> float:
    """Share of the responses (code magnitude > 0) whose question has its ``group_size``
    responses here and is regular (the estimator flags a question without exactly
    ``rollout.n`` responses in the batch with an odd magnitude, see :mod:`.encoding`)."""
    mags = magnitudes.flatten().cpu()
    mags = mags[mags > 0]
    if mags.numel() == 0:
        return 1.0
    _, inverse, counts = torch.unique(mags, return_inverse=True, return_counts=True)
    whole = (counts[inverse] == group_size) & (mags % 2 == 0)
    return float(whole.to(torch.float64).mean())


def install(data: Any, plan: Plan) -> None:
    """Replace the mini-batch's ``advantages`` by each row's position in the plan, ``row + 1``
    at every response position of the row (same layout as before: nested or padded)."""
    adv = data["advantages"]
    code = torch.arange(1, plan.weights.shape[0] + 1, dtype=torch.float32)
    if getattr(adv, "is_nested", False):
        offsets = adv.offsets()
        lengths = offsets.diff()
        values = torch.repeat_interleave(code.to(offsets.device), lengths)
        # a new tensor, not an in-place write: the rows' codes are read again by the next
        # epoch (ppo_epochs > 1) from the same storage
        new = torch.nested.nested_tensor_from_jagged(
            values.to(device=adv.device, dtype=torch.float32),
            offsets=offsets,
            min_seqlen=int(lengths.min()) if lengths.numel() else 0,
            max_seqlen=int(lengths.max()) if lengths.numel() else 0,
        )
    else:
        mask = data["response_mask"].bool()
        new = torch.where(mask, code.to(adv.device)[:, None], 0.0)
    data["advantages"] = new


def rows_of(
    plan: Plan, advantages: Tensor, mask: Tensor, *, check: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each micro-batch row's position in the plan (read at its first response token, -1 for
    rows without tokens), its weight and label, and a 0-d bool: every row carries a
    well-formed position whose token count matches the plan (and, with ``check``, the same
    value at every response token). No host sync."""
    lengths = mask.sum(-1)
    first = mask.to(torch.uint8).argmax(-1, keepdim=True)
    value = advantages.gather(-1, first).squeeze(-1).to(torch.float32)
    has = lengths > 0
    value = torch.where(has, value, 0.0)
    rows = plan.weights.shape[0]
    index = value.round().to(torch.int64) - 1
    well_formed = (value == value.round()) & (index >= 0) & (index < rows)
    safe = torch.where(has & well_formed, index, 0).to(plan.weights.device)
    matches = torch.where(has, well_formed & (plan.lengths[safe] == lengths.to(safe.device)), True)
    ok = matches.all()
    if check:
        same = torch.where(mask, advantages.to(torch.float32) == value[:, None], True).all()
        ok = ok & same.to(ok.device)
    take = has.to(safe.device) & matches
    weights = torch.where(take, plan.weights[safe], 0.0)
    positive = plan.positive[safe] & take
    index = torch.where(take, safe, -1)
    return index, weights, positive, ok


def micro_batch_loss(
    plan: Plan,
    log_prob: Tensor,
    old_log_prob: Tensor,
    mask: Tensor,
    advantages: Tensor,
    *,
    dp_size: int,
) -> tuple[Tensor, MicroBatchLoss, Tensor]:
    """One micro-batch's loss under the plan: ``dp_size * (-sum_i w_i s_i + kappa * KL share)``
    (or the local approximation of the penalty, ``plan.kl_coef is None``), its parts, and a
    0-d bool that its rows match the plan (no host sync). Adds the detached KL and penalty
    shares and the rows used to the plan."""
    o = plan.options.disco
    index, weights, positive, ok = rows_of(plan, advantages, mask, check=plan.options.validate)
    device = log_prob.device
    out = core_micro_batch_loss(
        log_prob,
        old_log_prob,
        mask,
        weights.to(device=device, dtype=torch.float32),
        num_tokens=plan.num_tokens.to(device),
        kl_coef=None if plan.kl_coef is None else plan.kl_coef.to(device),
        score=cast(Score, o.score),
        kl_estimator=cast(KLEstimator, o.kl_estimator),
        delta=o.delta,
        beta=o.beta,
        constraint=cast(Constraint, o.constraint),
        multiplier=plan.multiplier,
        rewards=positive.to(device=device, dtype=torch.float32),
        threshold=0.5,
        clip_eps=o.clip_eps,
        validate=False,
    )
    with torch.no_grad():
        plan.kl_share += out.kl.detach().to(plan.kl_share)
        plan.penalty_share += out.penalty_term.detach().to(plan.penalty_share)
        valid = index >= 0
        plan.used.index_add_(
            0, torch.where(valid, index, 0).to(plan.used.device), valid.to(plan.used)
        )
    return dp_size * out.loss, out, ok


def finish(plan: Plan, *, group: Any = None) -> dict[str, float]:
    """After the mini-batch's pass, on every rank of ``group``: one all-reduce of the KL and
    penalty shares and of the rows not used exactly once; the mini-batch's metrics (global,
    the same on every rank). Raises :class:`DiscoLayoutError` on every rank when a row was
    lost or repeated (``validate``).

    ``kl`` is the mini-batch's token-mean KL that the constraint used: the plan's (at the
    current parameters) with ``weights=current``, the training pass's with ``sampling``;
    ``penalty`` the constraint's penalty at it; ``penalty_applied`` (``sampling`` with a
    constraint that is not linear in the KL) the sum of the per-micro-batch penalties."""
    rows_with_tokens = plan.lengths > 0
    misused = (rows_with_tokens & (plan.used != 1)).sum().to(torch.float64)
    vector = torch.stack([plan.kl_share, plan.penalty_share, misused])
    if _distributed(group):
        dist.all_reduce(vector, op=dist.ReduceOp.SUM, group=group)
    measured_kl, applied_penalty, lost = vector.cpu().tolist()
    if plan.options.validate and lost:
        raise DiscoLayoutError(
            f"DisCO mini-batch plan: {int(lost)} response(s) of the mini-batch did not reach the "
            "loss exactly once (verl's micro-batching lost or repeated rows), so the gradient "
            "is not the mini-batch's"
        )
    o = plan.options.disco
    # The KL the constraint used: the plan's (current parameters) with weights=current; with
    # sampling the plan's is 0 (stats at the sampling policy): the training pass's instead.
    kl = float(plan.output.kl) if plan.options.weights == "current" else measured_kl
    penalty = constraint_penalty(
        torch.tensor(kl, dtype=torch.float64),
        constraint=o.constraint,
        delta=o.delta,
        beta=o.beta,
        multiplier=plan.multiplier,
    )
    m = plan.output.metrics
    metrics = {
        "objective": float(plan.output.objective),
        "kl": kl,
        "penalty": float(penalty),
        "constraint_active": float(kl > o.delta),
        "num_groups": float(m["num_groups"]),
        "groups_with_signal": float(m["groups_with_signal"]),
        "frac_groups_with_signal": float(m["frac_groups_with_signal"]),
        "frac_positive": float(m["frac_positive"]),
        "whole_questions": plan.whole,
        "plan_seconds": plan.seconds,
    }
    if plan.kl_coef is None:  # the penalty applied: the local approximation's sum
        metrics["penalty_applied"] = applied_penalty
    return metrics
