r"""Exact DisCO under gradient accumulation, when micro-batches split groups.

DisCO's objective needs every response of a question at once (its negatives' log-mean-exp,
its group counts), but its gradient is a per-response weighted sum (DESIGN.md section 2):

.. math::

    \nabla_\theta \mathcal{L} = -\sum_i w_i\,\nabla_\theta s_i
        + \kappa\,\frac{1}{N}\sum_i \nabla_\theta k_i,\qquad
    w_i = \frac{\partial J}{\partial s_i},\quad
    \kappa = \beta\,[\widehat{KL} - \delta]_+

with :math:`k_i` the per-response sum of the token KL estimate and N the mini-batch's number of
response tokens. Once ``w`` and ``kappa`` are known for the whole mini-batch, any micro-batch
contributes its own terms with no communication. The recipe:

1. Per micro-batch, compute the per-response scalars with :func:`response_stats` (no grad),
   and concatenate them (and the rewards and group ids) over the mini-batch.
2. :func:`plan_minibatch` turns them into the weights, the penalty coefficient and the
   logging values of the mini-batch (its ``output`` is what :func:`discoloss.disco_loss` would
   return on the whole mini-batch).
3. Per micro-batch, backpropagate :func:`micro_batch_loss` with its slice of the weights.

The accumulated gradient then equals the gradient of ``disco_loss`` on the whole mini-batch:

* **DisCO-b**: the weights do not depend on the scores. Exact with stats from any parameters,
  e.g. at the sampling policy: ``response_stats(old_log_probs, old_log_probs, mask)`` costs no
  forward pass.
* **DisCO** (log-mean-exp): the weights depend on the current scores. Exact when step 1 uses
  the current parameters (one extra no-grad forward over the mini-batch). Using the sampling
  policy's stats instead (free) is exact on the first mini-batch of a step, where
  theta = theta_old, and an approximation afterwards, bounded by the KL constraint.
* **DRPO**: as DisCO. Its positives' weights depend on the preferences (by default the
  lengths, which every stats pass has) and never on the scores.
* **Penalty**: exact when ``kl_coef`` comes from current-parameter stats. At the sampling
  policy the KL is 0, so the coefficient would be 0: without a current-parameter pass, use
  ``kl_coef=None``, the local approximation (each micro-batch's token share times the penalty
  of its own token-mean KL), an upper bound of the exact penalty by Jensen's inequality that
  equals it when micro-batches have equal KL.

**Data parallel.** When a mini-batch is spread over data-parallel ranks (a question's
responses may sit on several ranks), ``plan_minibatch(..., process_group=pg)`` gathers the
per-response scalars (5 numbers per response, 6 with DRPO's explicit preferences, never
token tensors), plans the whole mini-batch on every rank and returns this rank's weights;
every micro-batch of every rank then backpropagates its :func:`micro_batch_loss` as above
(scaled by the world size where the engine averages gradients over ranks). A bad value or a
malformed input on one rank raises the same error on every rank, in the planning call, before
any backward pass.

**A bad value on one rank, without the cross-rank plan.** :func:`response_stats` and
:func:`micro_batch_loss` are local: with ``validate=True`` a bad value (a non-finite log-prob,
an empty response) raises on the rank that holds it, and the other ranks would then wait in
their next collective (a gather, the gradient all-reduce): a hang under NCCL. In a
data-parallel loop compute the stats with ``validate=False`` and let the cross-rank plan check
them (it decides collectively), or check values that every rank holds alike (the TRL adapter
checks the per-response stats it gathers for its metrics before the optimizer step).
:func:`discoloss.disco_loss` with ``process_group`` is collective by itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from discoloss._checks import (
    Check,
    ValueCheck,
    check_at_least,
    check_batch,
    check_coefficient,
    check_count,
    check_device,
    check_tensor,
    computation_dtype,
    describe,
    first_index,
    raise_if_failed,
)
from discoloss._types import Constraint, KLEstimator, Normalize, Objective, Score
from discoloss.constraints import LagrangeMultiplier, constraint_penalty, constraint_slope
from discoloss.kl import kl_row_sums
from discoloss.loss import (
    DiscoOutput,
    loss_from_stats,
    output_checks,
    resolve_options,
    response_scores,
    score_checks,
)
from discoloss.objectives import (
    check_preferences,
    check_response_inputs,
    objective_checks,
    preference_checks,
    reward_checks,
)
from discoloss.options import DiscoOptions
from discoloss.scores import check_token_inputs, token_sums

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "MicroBatchLoss",
    "MiniBatchPlan",
    "ResponseStats",
    "micro_batch_loss",
    "plan_minibatch",
    "response_stats",
]


class ResponseStats(NamedTuple):
    """Per-response scalars, each (B,): all DisCO needs from the token tensors.

    scores: sequence scores s_i. kl_sums: sum over the response's tokens of the per-token KL
    estimate. lengths: number of response tokens. Concatenate them over micro-batches with
    :meth:`cat`.
    """

    scores: Tensor
    kl_sums: Tensor
    lengths: Tensor

    @staticmethod
    def cat(parts: list[ResponseStats]) -> ResponseStats:
        if not isinstance(parts, (list, tuple)):
            raise TypeError(f"parts must be a list of ResponseStats, got {type(parts).__name__}")
        if not parts:
            raise ValueError("parts is empty: give the stats of at least one micro-batch")
        names, tensors = [], []
        for k, part in enumerate(parts):
            if not isinstance(part, ResponseStats):
                raise TypeError(f"parts[{k}] must be a ResponseStats, got {type(part).__name__}")
            for name in ResponseStats._fields:
                names.append(f"parts[{k}].{name}")
                tensors.append(check_tensor(names[-1], getattr(part, name), ndim=1, kind="float"))
        check_device(names, tensors)
        return ResponseStats(
            *(torch.cat([getattr(p, f) for p in parts]) for f in ResponseStats._fields)
        )


class MiniBatchPlan(NamedTuple):
    """What every micro-batch of a mini-batch needs, computed once.

    weights: (B,) dJ/ds for the concatenated responses (detached).
    kl_coef: 0-d derivative of the penalty wrt the KL at the stats (beta * max(kl - delta, 0)
      for the squared hinge).
    num_tokens: 0-d number of response tokens in the mini-batch.
    output: :class:`~discoloss.DiscoOutput` of the mini-batch at the stats' parameters,
      detached (log its ``metrics``).
    """

    weights: Tensor
    kl_coef: Tensor
    num_tokens: Tensor
    output: DiscoOutput


class MicroBatchLoss(NamedTuple):
    """Surrogate of one micro-batch: backpropagate ``loss``.

    loss: ``-objective_term + penalty_term``. Only its gradient is meaningful: log the plan's
      ``output`` for values.
    objective_term: sum_i w_i s_i over the micro-batch.
    kl: this micro-batch's additive share of the mini-batch KL, sum_i k_i / N.
    penalty_term: ``kl_coef * kl`` (exact path) or the local approximation.
    stats: the micro-batch's :class:`ResponseStats` at the current parameters, detached (for
      logging without another pass over the token tensors).
    """

    loss: Tensor
    objective_term: Tensor
    kl: Tensor
    penalty_term: Tensor
    stats: ResponseStats


def _stats(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    rewards: Tensor | None,
    options: DiscoOptions,
    validate: bool,
) -> tuple[ResponseStats, list[Check | ValueCheck]]:
    """The stats and their value checks (empty without ``validate``), not yet run."""
    log_probs, old_log_probs, mask = check_token_inputs(log_probs, old_log_probs, mask)
    if rewards is not None:
        check_tensor("rewards", rewards, ndim=1, kind="real")
        check_batch(("log_probs", "rewards"), (log_probs, rewards))
        check_device(("log_probs", "rewards"), (log_probs, rewards))
    sums, checks = token_sums(
        log_probs, old_log_probs, mask, need_ratio=options.needs_ratio, validate=validate
    )
    if validate and rewards is not None:
        checks += reward_checks(rewards)
    scores = response_scores(sums, log_probs, old_log_probs, mask, rewards, options)
    kl_sums = kl_row_sums(sums, options.kl_estimator)
    if validate:
        checks += score_checks(scores, kl_sums, options)
    return ResponseStats(scores, kl_sums, sums.lengths), checks


def response_stats(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    *,
    score: Score = "log_likelihood",
    kl_estimator: KLEstimator = "k1",
    rewards: Tensor | None = None,
    threshold: float = 0.5,
    clip_eps: float = 0.2,
    validate: bool = True,
) -> ResponseStats:
    """Per-response scores, KL sums and token counts of a micro-batch.

    Call it under ``torch.no_grad()`` for planning. With ``log_probs = old_log_probs`` it gives
    the stats at the sampling policy without a forward pass.

    Args:
      log_probs, old_log_probs, mask: (B, T) as in :func:`discoloss.disco_loss`.
      score, kl_estimator, validate: as in :func:`discoloss.disco_loss`.
      rewards, threshold, clip_eps: only for ``score="clipped_ratio"``, whose clip side depends
        on the label.
    """
    options = DiscoOptions(
        score=score, kl_estimator=kl_estimator, threshold=threshold, clip_eps=clip_eps
    )
    stats, checks = _stats(log_probs, old_log_probs, mask, rewards, options, validate)
    raise_if_failed(checks)
    return stats


def stats_checks(stats: ResponseStats, rewards: Tensor) -> list[Check | ValueCheck]:
    """Value checks of a plan's inputs (run only with ``validate``): finite rewards, finite
    scores and KL sums, whole token counts >= 1."""
    lengths = stats.lengths
    return reward_checks(rewards) + [
        ValueCheck("stats.scores", ~stats.scores.isfinite()),
        ValueCheck("stats.kl_sums", ~stats.kl_sums.isfinite()),
        ValueCheck(
            "stats.lengths",
            ~(lengths >= 1) | (lengths != lengths.round()) | ~lengths.isfinite(),
        ),
    ]


def _check_plan_inputs(
    stats: ResponseStats,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    allow_empty: bool,
    options: DiscoOptions,
    preferences: Tensor | None,
) -> None:
    if not isinstance(stats, ResponseStats):
        raise TypeError(f"stats must be a ResponseStats, got {type(stats).__name__}")
    for name in ResponseStats._fields:
        check_tensor(f"stats.{name}", getattr(stats, name), ndim=1, kind="float")
    check_response_inputs(
        rewards, group_ids, ("stats.scores", stats.scores), allow_empty=allow_empty
    )
    names = ("stats.scores", "stats.kl_sums", "stats.lengths")
    check_batch(names, tuple(stats), allow_empty=allow_empty)
    check_device(names, tuple(stats))
    check_preferences(preferences, options, ("stats.scores", stats.scores), allow_empty=allow_empty)


def _plan(
    stats: ResponseStats,
    rewards: Tensor,
    group_ids: Tensor,
    options: DiscoOptions,
    multiplier: LagrangeMultiplier | None,
    validate: bool = False,
    preferences: Tensor | None = None,
) -> tuple[MiniBatchPlan, list[Check | ValueCheck]]:
    """The plan, and with ``validate`` the value checks of its results (not yet run)."""
    with torch.no_grad():
        f = computation_dtype(stats.scores.dtype)
        s = ResponseStats(*(t.detach().to(f) for t in stats))
        output, terms = loss_from_stats(
            s.scores,
            s.kl_sums,
            s.lengths,
            rewards,
            group_ids,
            options=options,
            multiplier=multiplier,
            preferences=preferences,
        )
        kl_coef = constraint_slope(
            output.kl,
            constraint=options.constraint,
            delta=options.delta,
            beta=options.beta,
            multiplier=multiplier,
        )
        num_tokens = s.lengths.sum()
    checks: list[Check | ValueCheck] = []
    if validate:
        checks = objective_checks(terms, options, f) + output_checks(output, options)
        checks.append(
            (
                kl_coef.isfinite(),
                lambda: (
                    f"kl_coef: not finite: constraint={options.constraint!r} with "
                    f"beta={options.beta!r} at kl={float(output.kl)!r} overflows; use a "
                    "smaller beta"
                ),
            )
        )
    return MiniBatchPlan(terms.weights, kl_coef, num_tokens, output), checks


def plan_minibatch(
    stats: ResponseStats,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    score: Score = "log_likelihood",
    objective: Objective = "disco",
    tau: float | None = None,
    delta: float = 1e-4,
    beta: float = 1e3,
    threshold: float = 0.5,
    normalize: Normalize = "all",
    constraint: Constraint = "squared_hinge",
    multiplier: LagrangeMultiplier | None = None,
    cvar_alpha: float = 0.5,
    margin: float = 1.0,
    lam: float = 0.1,
    max_length: int | None = None,
    preferences: Tensor | None = None,
    validate: bool = True,
    process_group: ProcessGroup | None = None,
) -> MiniBatchPlan:
    """Weights, penalty coefficient and logging values of a whole mini-batch.

    Args:
      stats: :class:`ResponseStats` of every response of the mini-batch (concatenated), or,
        with ``process_group``, of this rank's responses.
      rewards, group_ids: (B,) in the same order as ``stats``.
      score: only used to pick the default ``tau``.
      objective, tau, delta, beta, threshold, normalize: as in :func:`discoloss.disco_loss`.
      constraint, multiplier, cvar_alpha, margin: as in :func:`discoloss.disco_loss`.
      lam, max_length, preferences: DRPO's, as in :func:`discoloss.disco_loss`;
        ``preferences`` (B,) in the order of ``stats``. Without them the default length
        preference ``1 - |o_i| / max_length`` comes from ``stats.lengths``. The plan's
        weights carry DRPO's positive weights, so :func:`micro_batch_loss` needs nothing more.
      validate: check values (non-finite rewards, preferences, scores and KL sums; token
        counts that are not whole numbers >= 1; results that overflow the computation dtype)
        with one host sync. Half-precision stats are planned in float32.
      process_group: a ``torch.distributed`` group whose ranks hold the pieces of one
        mini-batch (a question's responses may sit on several ranks; a rank may hold none).
        Every rank gets the plan of the whole mini-batch: ``kl_coef``, ``num_tokens`` and
        ``output`` are global and identical on every rank, ``weights`` are this rank's rows
        (same order as ``stats``). Communication as in :func:`discoloss.disco_loss`'s
        cross-rank mode: two ``all_gather`` calls (a fixed-size header per rank, then 5
        float64 numbers per response), one host sync, and errors decided collectively: a
        check that fails on one rank (malformed inputs, options that differ across ranks,
        and with ``validate`` the value checks) raises the same exception on every rank,
        naming the failing rank. Every rank must make the same calls. Call it outside the
        backward pass, once per mini-batch.

    With ``process_group``, the weights of a rank's rows are those of the concatenated
    mini-batch of all ranks: backpropagating :func:`micro_batch_loss` on every rank and
    *summing* the gradients over ranks gives the mini-batch gradient; engines that average
    gradients over ``W`` data-parallel ranks must scale each micro-batch loss by ``W``.
    """
    settings = dict(
        score=score,
        objective=objective,
        tau=tau,
        delta=delta,
        beta=beta,
        threshold=threshold,
        normalize=normalize,
        constraint=constraint,
        cvar_alpha=cvar_alpha,
        margin=margin,
        lam=lam,
        max_length=max_length,
    )
    if process_group is None:
        options = resolve_options(settings, multiplier)
        _check_plan_inputs(
            stats, rewards, group_ids, allow_empty=False, options=options, preferences=preferences
        )
        options.check_dtype(computation_dtype(stats.scores.dtype))
        plan, result_checks = _plan(
            stats, rewards, group_ids, options, multiplier, validate, preferences
        )
        if validate:
            raise_if_failed(
                stats_checks(stats, rewards) + preference_checks(preferences) + result_checks
            )
        return plan

    from discoloss import distributed

    distributed.require_initialised()
    # No check may raise on one rank only: a failure travels in the header gather and every
    # rank raises the same error (see discoloss.distributed).
    failure: Exception | None = None
    options_or_none: DiscoOptions | None = None
    checks: list[Check | ValueCheck] = []
    try:
        options_or_none = resolve_options(settings, multiplier)
        _check_plan_inputs(
            stats, rewards, group_ids, allow_empty=True, options=options_or_none,
            preferences=preferences,
        )  # fmt: skip
        options_or_none.check_dtype(torch.float64)  # the gathered scalars are float64
        if validate:
            checks = stats_checks(stats, rewards) + preference_checks(preferences)
    except (ValueError, TypeError) as exc:
        failure = exc
    count = stats.scores.shape[0] if failure is None else 0
    like = stats.scores if isinstance(stats, ResponseStats) else None
    header = distributed.build_header(
        count=count,
        failure=failure,
        options=options_or_none,
        validate=validate,
        multiplier=multiplier,
        checks=checks,
        device=distributed.comm_device(process_group, like),
        preferences=preferences is not None,
    )
    counts = distributed.decide_across_ranks(header, failure, process_group, "plan_minibatch")
    assert options_or_none is not None  # else raised above, on every rank
    with torch.no_grad():
        scores, kl_sums, lengths, all_rewards, all_ids, all_prefs = (
            distributed.gather_response_stats(
                stats.scores.detach(),
                stats.kl_sums.detach(),
                stats.lengths.detach(),
                rewards,
                group_ids,
                process_group,
                counts,
                preferences=preferences,
            )
        )
    full, _ = _plan(
        ResponseStats(scores, kl_sums, lengths),
        all_rewards,
        all_ids,
        options_or_none,
        multiplier,
        preferences=all_prefs,
    )
    rank = dist.get_rank(process_group)
    offset = sum(counts[:rank])
    local = full.weights[offset : offset + counts[rank]].to(stats.scores.dtype)
    return full._replace(weights=local)


def micro_batch_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    weights: Tensor,
    *,
    num_tokens: int | Tensor,
    kl_coef: Tensor | float | None = None,
    score: Score = "log_likelihood",
    kl_estimator: KLEstimator = "k1",
    delta: float = 1e-4,
    beta: float = 1e3,
    constraint: Constraint = "squared_hinge",
    multiplier: LagrangeMultiplier | None = None,
    rewards: Tensor | None = None,
    threshold: float = 0.5,
    clip_eps: float = 0.2,
    validate: bool = True,
) -> MicroBatchLoss:
    r"""Per-micro-batch surrogate whose gradients add up to the mini-batch DisCO gradient.

    .. math::

        \ell_{mb} = -\sum_{i\in mb} w_i s_i + \kappa\,\frac{\sum_{i\in mb} k_i}{N}

    Args:
      log_probs, old_log_probs, mask: (b, T) tensors of this micro-batch.
      weights: (b,) this micro-batch's slice of :attr:`MiniBatchPlan.weights`.
      num_tokens: N, the mini-batch's number of response tokens (``plan.num_tokens``): an int
        or a one-element tensor, a whole number >= 1 and not below this micro-batch's tokens.
      kl_coef: kappa (``plan.kl_coef``, exact when the plan used current parameters; a number
        or a one-element float tensor, finite and >= 0), or None
        for the local approximation ``(n_mb / N) * P(kl_mb)`` with P the constraint's penalty
        and kl_mb the micro-batch's own token-mean KL (see the module docstring).
      score, kl_estimator: as in :func:`discoloss.disco_loss` (must match the plan's).
      delta, beta, constraint, multiplier: the constraint, used by the local approximation.
      rewards, threshold, clip_eps: only for ``score="clipped_ratio"``.
      validate: check values with one host sync: the token inputs' (as
        :func:`discoloss.disco_loss`), non-finite weights, the values of tensor ``num_tokens``
        and ``kl_coef``, a loss that overflows the computation dtype. Without it, metadata
        and Python numbers are still checked, and no host sync is issued.
    """
    options = DiscoOptions(
        score=score,
        kl_estimator=kl_estimator,
        delta=delta,
        beta=beta,
        constraint=constraint,
        threshold=threshold,
        clip_eps=clip_eps,
    )
    check_tensor("log_probs", log_probs, ndim=2, kind="float")
    check_tensor("weights", weights, ndim=1, kind="float")
    check_batch(("log_probs", "weights"), (log_probs, weights))
    check_device(("log_probs", "weights"), (log_probs, weights))
    total, count_checks = check_count("num_tokens", num_tokens, log_probs.device)
    coef, coef_checks = (
        (None, []) if kl_coef is None else check_coefficient("kl_coef", kl_coef, log_probs.device)
    )
    st, checks = _stats(log_probs, old_log_probs, mask, rewards, options, validate)
    f = st.scores.dtype
    if kl_coef is None:
        options.check_dtype(f)  # the local approximation evaluates the penalty
    total_f = total.to(f).clamp_min(1.0)
    objective_term = (weights.detach().to(f) * st.scores).sum()
    kl = st.kl_sums.sum() / total_f
    local_tokens = st.lengths.sum().clamp_min(1.0)
    if coef is None:
        local_kl = st.kl_sums.sum() / local_tokens
        penalty_term = (local_tokens / total_f) * constraint_penalty(
            local_kl,
            constraint=constraint,
            delta=options.delta,
            beta=options.beta,
            multiplier=multiplier,
        )
    else:
        penalty_term = (coef.to(f) if isinstance(coef, Tensor) else coef) * kl
    loss = -objective_term + penalty_term
    if validate:
        w = weights.detach()
        checks += [
            (
                w.isfinite().all(),
                lambda: f"weights: non-finite value at response {first_index(~w.isfinite())}",
            ),
            *count_checks,
            check_at_least("num_tokens", total, st.lengths.sum(), "tokens"),
            *coef_checks,
            (
                loss.detach().isfinite(),
                lambda: (
                    f"micro_batch_loss: the loss is not finite in {f} (objective term "
                    f"{describe(objective_term.detach())}, penalty term "
                    f"{describe(penalty_term.detach())}): weights, kl_coef or "
                    f"beta={options.beta!r} too large for {f}"
                ),
            ),
        ]
    raise_if_failed(checks)
    detached = ResponseStats(*(t.detach() for t in st))
    return MicroBatchLoss(loss, objective_term, kl, penalty_term, detached)
