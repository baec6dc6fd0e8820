"""Discriminative objectives of DisCO and their per-response weights.

Per question q with positives P_q (reward > threshold) and negatives N_q (arXiv 2505.12366,
eq. 8 and 10)::

    DisCO-b:  J_q = mean_{i in P_q} s_i - mean_{j in N_q} s_j
    DisCO:    J_q = mean_{i in P_q} s_i - tau * log( mean_{j in N_q} exp(s_j / tau) )
    DRPO:     J_q = sum_{i in P_q} v_i s_i - tau * log( mean_{j in N_q} exp(s_j / tau) ),
              v_i = softmax_{k in P_q}(pref_k / lam)_i                   (arXiv 2510.04474)

J = sum_q J_q / G, where G counts all distinct questions of the batch (``normalize="all"``, as
the published code does) or only those with both a positive and a negative (``"valid"``).
Questions without a positive or without a negative contribute 0.

The gradient is a per-response weighted sum of score gradients (DESIGN.md section 2),
grad J = sum_i w_i grad s_i, with::

    w_i = 1 / (|P_q| G)                               i in P_q
    w_i = v_i / G                                     i in P_q, DRPO
    w_j = -1 / (|N_q| G)                              j in N_q, DisCO-b
    w_j = -softmax_{k in N_q}(s_k / tau)_j / G        j in N_q, DisCO and DRPO

DRPO's v depend on the preferences alone (never on the scores): they carry no gradient.

All group operations are index/scatter ops over buffers of size B: ragged groups in any order,
no Python loop, no sort-and-view, no host sync.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from discoloss._checks import (
    Check,
    ValueCheck,
    check_batch,
    check_device,
    check_tensor,
    dtype_name,
    first_index,
    float64_hint,
    raise_if_failed,
)
from discoloss._types import Normalize, Objective
from discoloss.options import DiscoOptions

__all__ = ["discriminative_objective", "discriminative_weights"]


class GroupIndex(NamedTuple):
    """Dense group ids.

    dense: (B,) int64 in [0, num_groups); equal group ids map to equal dense ids.
    num_groups: 0-d int64 tensor, the number of distinct group ids (never a Python int, so
      computing it needs no host sync).
    """

    dense: Tensor
    num_groups: Tensor


def dense_group_ids(group_ids: Tensor) -> GroupIndex:
    """Map arbitrary integer group ids to dense ids without a host sync.

    Sort the ids, flag where the sorted id changes, cumsum the flags, scatter back.
    """
    sorted_ids, order = torch.sort(group_ids)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[1:] = sorted_ids[1:] != sorted_ids[:-1]
    dense_sorted = torch.cumsum(new, 0) - 1
    dense = torch.empty_like(dense_sorted).scatter_(0, order, dense_sorted)
    return GroupIndex(dense, new.sum())


class DiscriminativeTerms(NamedTuple):
    """Everything computed from the scores' group structure.

    objective: 0-d J (differentiable wrt the scores).
    weights: (B,) dJ/ds, detached.
    per_group: (B,) J_q for dense group q (0 for unused slots and groups without signal).
    n_pos, n_neg: (B,) per-group counts of positives / negatives.
    valid: (B,) per-group flag: has both a positive and a negative.
    num_groups, num_valid: 0-d counts; denom: 0-d normaliser G (float).
    effective_negatives: 0-d, mean over groups with signal of 1 / sum_j q_j^2, where q are the
      normalised weights on the group's negatives (|N_q| for DisCO-b).
    effective_positives: 0-d, the same for the normalised weights on the group's positives
      (|P_q| for DisCO, fewer when DRPO's preferences concentrate the weight).
    """

    objective: Tensor
    weights: Tensor
    per_group: Tensor
    n_pos: Tensor
    n_neg: Tensor
    valid: Tensor
    num_groups: Tensor
    num_valid: Tensor
    denom: Tensor
    effective_negatives: Tensor
    effective_positives: Tensor


class GroupAggregate(NamedTuple):
    """One side's term of a question: term (B,) per dense group, differentiable; q (B,) per
    response, the detached weight d term / d s_i, summing to 1 over the group's members."""

    term: Tensor
    q: Tensor


def group_mean(scores: Tensor, member: Tensor, dense: Tensor, count: Tensor) -> GroupAggregate:
    zeros = torch.zeros_like(count)
    inv = 1.0 / count.clamp_min(1.0)
    term = zeros.index_add(0, dense, torch.where(member, scores, 0.0)) * inv
    return GroupAggregate(term, torch.where(member, inv[dense], 0.0))


def group_softmax_mean(
    scores: Tensor,
    member: Tensor,
    dense: Tensor,
    count: Tensor,
    preferences: Tensor,
    lam: float,
) -> GroupAggregate:
    """sum_{i in group, member} v_i s_i with v = softmax(pref / lam) over the group's members:
    a weighted mean whose weights carry no gradient; q = v.

    The logits are formed as (pref_i - max pref) / lam, in float64 (float32 on MPS), whatever
    the scores' dtype: shifting before dividing cancels in v and keeps every logit <= 0, so
    no lam > 0 and no finite preferences overflow (a lam too small for float32, or float64
    preferences beyond it, would give inf - inf), and differences of preferences far below
    the scores' precision still count (v depends on pref_i - pref_k only)."""
    wide = wide_dtype(preferences.device)
    p = preferences.detach().to(wide)
    count_w = count.to(wide)
    pmax = torch.full_like(count_w, -math.inf).scatter_reduce(
        0, dense, torch.where(member, p, -math.inf), "amax", include_self=True
    )
    pmax = torch.where(count_w > 0, pmax, 0.0)
    e = torch.exp(torch.where(member, (p - pmax[dense]) / lam, -math.inf))
    total = torch.zeros_like(count_w).index_add(0, dense, e)
    v = (e / torch.where(count_w > 0, total, 1.0)[dense]).to(scores.dtype)
    term = torch.zeros_like(count).index_add(0, dense, v * scores)
    return GroupAggregate(term, v)


def group_log_mean_exp(
    scores: Tensor, member: Tensor, dense: Tensor, count: Tensor, tau: float
) -> GroupAggregate:
    """tau * log mean_{j in group, member} exp(s_j / tau), stable; q = softmax(s / tau)."""
    # Shift by the per-group max. The shift cancels exactly in the value and the gradient, so
    # it is detached.
    smax = torch.full_like(count, -math.inf).scatter_reduce(
        0, dense, torch.where(member, scores.detach(), -math.inf), "amax", include_self=True
    )
    smax = torch.where(count > 0, smax, 0.0)
    # exp of -inf (non-members) is 0 with zero gradient; no inf * 0 in the backward pass.
    z = torch.where(member, (scores - smax[dense]) / tau, -math.inf)
    e = torch.exp(z)
    total = torch.zeros_like(count).index_add(0, dense, e)
    safe = torch.where(count > 0, total, 1.0)
    # tau * log(mean e) as tau * log1p(mean(e - 1)): with a huge tau every e rounds to 1 and
    # log(mean e) to 0, while expm1 keeps z itself, so the value still tends to the mean.
    em1 = torch.zeros_like(count).index_add(0, dense, torch.where(member, torch.expm1(z), 0.0))
    term = smax + tau * torch.log1p(em1 / count.clamp_min(1.0))
    return GroupAggregate(term, (e / safe[dense]).detach())


def group_cvar(
    scores: Tensor, member: Tensor, dense: Tensor, count: Tensor, alpha: float
) -> GroupAggregate:
    """Conditional value at risk of the members' scores at level alpha: the mean of the
    highest alpha-fraction (fractional member included with a partial weight). Sync-free:
    within-group descending ranks come from three stable sorts."""
    b = scores.shape[0]
    s = scores.detach()
    order = torch.argsort(s, descending=True, stable=True)
    order = order[torch.argsort((~member[order]).to(torch.int8), stable=True)]
    order = order[torch.argsort(dense[order], stable=True)]
    sizes = torch.zeros_like(dense).index_add(0, dense, torch.ones_like(dense))
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty_like(dense)
    rank[order] = torch.arange(b, device=dense.device) - starts[dense[order]]
    k = alpha * count[dense]
    weight = torch.clamp(k - rank.to(s.dtype), 0.0, 1.0) / k.clamp_min(torch.finfo(s.dtype).tiny)
    q = torch.where(member, weight, 0.0)
    term = torch.zeros_like(count).index_add(0, dense, q * scores)
    return GroupAggregate(term, q)


PAIRWISE = ("auc_sq_hinge", "auc_logistic")


def pairwise_group_objective(
    scores: Tensor,
    positive: Tensor,
    dense: Tensor,
    n_pos: Tensor,
    n_neg: Tensor,
    *,
    objective: str,
    tau: float,
    margin: float,
) -> Tensor:
    """(B,) per group: minus the mean pairwise surrogate loss over the group's (positive,
    negative) pairs. Uses a (B, B) pair matrix: O(B^2) memory."""
    pair = (dense[:, None] == dense[None, :]) & positive[:, None] & ~positive[None, :]
    diff = scores[:, None] - scores[None, :]
    if objective == "auc_sq_hinge":
        loss = torch.clamp(margin - diff, min=0.0) ** 2
    else:
        # tau * softplus(-diff / tau), with softplus's own temperature: its linear branch
        # takes over where -diff / tau would overflow (tiny tau), instead of inf * tau. It
        # starts where exp(-x) is below the dtype's precision (e^-20 / e^-40), so it is exact.
        threshold = 40.0 if scores.dtype == torch.float64 else 20.0
        loss = torch.nn.functional.softplus(-diff, beta=1.0 / tau, threshold=threshold)
    per_pos = torch.where(pair, loss, 0.0).sum(1)
    total = torch.zeros_like(n_pos).index_add(0, dense, per_pos)
    return -total / (n_pos * n_neg).clamp_min(1.0)


def discriminative_terms(
    scores: Tensor,
    positive: Tensor,
    index: GroupIndex,
    *,
    objective: str,
    tau: float,
    normalize: str,
    num_groups: Tensor | None = None,
    cvar_alpha: float = 0.5,
    margin: float = 1.0,
    preferences: Tensor | None = None,
    lam: float = 0.1,
) -> DiscriminativeTerms:
    """Core of the objective; inputs already validated.

    ``num_groups`` overrides the normaliser G with a count from a larger batch, so that pieces
    of a batch (each holding whole groups) add up to the batch objective. ``preferences``
    (B,): DRPO's per-response preference (required by ``objective="drpo"``, see
    :func:`positive_preferences`).
    """
    f = scores.dtype
    dense = index.dense
    negative = ~positive
    zeros = torch.zeros(scores.shape[0], dtype=f, device=scores.device)
    n_pos = zeros.index_add(0, dense, positive.to(f))
    n_neg = zeros.index_add(0, dense, negative.to(f))
    valid = (n_pos > 0) & (n_neg > 0)
    num_valid = valid.sum()
    if num_groups is not None:
        count = num_groups
    elif normalize == "valid":
        count = num_valid
    else:
        count = index.num_groups
    denom = count.to(f).clamp_min(1.0)

    if objective in PAIRWISE:
        # No closed form worth keeping: the weights come from autograd on a (B,) leaf.
        def per_group_of(s: Tensor) -> Tensor:
            g = pairwise_group_objective(
                s, positive, dense, n_pos, n_neg, objective=objective, tau=tau, margin=margin
            )
            return torch.where(valid, g, 0.0)

        # The (B, B) pair work runs once: the weights are taken from the objective's own graph
        # (kept for the caller's backward), or from a detached leaf when the scores carry no
        # graph (e.g. planning under no_grad).
        if scores.requires_grad and torch.is_grad_enabled():
            per_group = per_group_of(scores)
            (w,) = torch.autograd.grad(per_group.sum(), scores, retain_graph=True)
        else:
            with torch.enable_grad():
                leaf = scores.detach().requires_grad_()
                on_leaf = per_group_of(leaf)
                (w,) = torch.autograd.grad(on_leaf.sum(), leaf)
            per_group = on_leaf.detach()
        weights = (w / denom).detach()
        q = torch.where(negative, -w, 0.0)
        q = q / torch.zeros_like(n_neg).index_add(0, dense, q)[dense].clamp_min(torch.finfo(f).tiny)
        q_pos = torch.where(positive, w, 0.0)
        q_pos = q_pos / torch.zeros_like(n_pos).index_add(0, dense, q_pos)[dense].clamp_min(
            torch.finfo(f).tiny
        )
    else:
        if objective == "disco_2way":
            # soft-min over positives: -tau * log mean exp(-s / tau)
            agg = group_log_mean_exp(-scores, positive, dense, n_pos, tau)
            pos = GroupAggregate(-agg.term, agg.q)
        elif objective == "drpo":
            if preferences is None:
                raise ValueError(NEEDS_PREFERENCES)
            pos = group_softmax_mean(scores, positive, dense, n_pos, preferences, lam)
        else:
            pos = group_mean(scores, positive, dense, n_pos)
        if objective == "disco_b":
            neg = group_mean(scores, negative, dense, n_neg)
        elif objective == "cvar":
            neg = group_cvar(scores, negative, dense, n_neg, cvar_alpha)
        else:
            neg = group_log_mean_exp(scores, negative, dense, n_neg, tau)
        per_group = torch.where(valid, pos.term - neg.term, 0.0)
        w = torch.where(positive, pos.q, -neg.q)
        weights = (torch.where(valid[dense], w, 0.0) / denom).detach()
        q = neg.q
        q_pos = pos.q

    obj = per_group.sum() / denom

    def effective(qs: Tensor) -> Tensor:
        sq = zeros.index_add(0, dense, qs * qs)
        ess = torch.where(valid, 1.0 / sq.clamp_min(torch.finfo(f).tiny), 0.0).sum()
        return (ess / num_valid.clamp_min(1).to(f)).detach()

    effective_negatives = effective(q)
    return DiscriminativeTerms(
        objective=obj,
        weights=weights,
        per_group=per_group,
        n_pos=n_pos,
        n_neg=n_neg,
        valid=valid,
        num_groups=index.num_groups,
        num_valid=num_valid,
        denom=denom,
        effective_negatives=effective_negatives,
        effective_positives=effective(q_pos),
    )


def check_response_inputs(
    rewards: Tensor, group_ids: Tensor, batch: tuple[str, Tensor], *, allow_empty: bool = False
) -> None:
    """Metadata checks of rewards and group ids against a (B, ...) tensor named ``batch[0]``."""
    check_tensor("rewards", rewards, ndim=1, kind="real")
    check_tensor("group_ids", group_ids, ndim=1, kind="int")
    names = (batch[0], "rewards", "group_ids")
    tensors = (batch[1], rewards, group_ids)
    check_batch(names, tensors, allow_empty=allow_empty)
    check_device(names, tensors)


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64, or float32 on MPS (which has no float64): for (B,) per-response values whose
    precision must not depend on the inputs' dtype (labels, DRPO's logits)."""
    return torch.float32 if device.type == "mps" else torch.float64


def positive_labels(rewards: Tensor, threshold: float) -> Tensor:
    """(B,) bool: reward > threshold, compared in float64 (the threshold's own precision): a
    threshold rounded to a half-precision or float32 reward dtype could flip labels next to it
    (float16 rewards of 1.0 are not above 0.99999 in float16)."""
    return rewards.detach().to(wide_dtype(rewards.device)) > threshold


def reward_checks(rewards: Tensor) -> list[Check | ValueCheck]:
    if not rewards.dtype.is_floating_point:
        return []
    return [ValueCheck("rewards", ~rewards.isfinite())]


NEEDS_PREFERENCES = (
    "objective='drpo' needs preferences (B,), or max_length for the default length "
    "preference 1 - |o_i| / max_length (the engine's maximum response length in tokens)"
)


def check_preferences(
    preferences: Tensor | None,
    options: DiscoOptions,
    batch: tuple[str, Tensor],
    *,
    allow_empty: bool = False,
    default_available: bool = True,
) -> None:
    """Metadata checks of DRPO's preference argument against a (B, ...) tensor ``batch[1]``:
    a (B,) real tensor for ``objective="drpo"`` (or None when the default length preference
    can be formed: ``max_length`` given and ``default_available``), None otherwise."""
    if preferences is None:
        if options.objective == "drpo" and (options.max_length is None or not default_available):
            raise ValueError(NEEDS_PREFERENCES)
        return
    if options.objective != "drpo":
        raise ValueError(
            f"preferences apply to objective='drpo' only; got objective={options.objective!r}"
        )
    check_tensor("preferences", preferences, ndim=1, kind="real")
    names = (batch[0], "preferences")
    check_batch(names, (batch[1], preferences), allow_empty=allow_empty)
    check_device(names, (batch[1], preferences))


def preference_checks(preferences: Tensor | None) -> list[Check | ValueCheck]:
    if preferences is None or not preferences.dtype.is_floating_point:
        return []
    return [ValueCheck("preferences", ~preferences.isfinite())]


def positive_preferences(
    options: DiscoOptions, preferences: Tensor | None, lengths: Tensor
) -> Tensor | None:
    """DRPO's per-response preference: ``preferences`` when given, else the length reward of
    arXiv 2510.04474, 1 - lengths / max_length; None for the other objectives."""
    if options.objective != "drpo":
        return None
    if preferences is not None:
        return preferences
    if options.max_length is None:
        raise ValueError(NEEDS_PREFERENCES)
    # in float64: two lengths a token apart differ by 1 / max_length, which a small lam
    # turns into a factor of the weights
    return 1.0 - lengths.to(wide_dtype(lengths.device)) / options.max_length


def _prepare(
    scores: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    validate: bool,
    preferences: Tensor | None,
    **options: Any,
) -> DiscriminativeTerms:
    o = DiscoOptions(**options)
    check_tensor("scores", scores, ndim=1, kind="float")
    check_response_inputs(rewards, group_ids, ("scores", scores))
    # scores carry no lengths: DRPO needs its preferences here
    check_preferences(preferences, o, ("scores", scores), default_available=False)
    s = scores if scores.dtype == torch.float64 else scores.float()
    o.check_dtype(s.dtype)
    terms = discriminative_terms(
        s,
        positive_labels(rewards, o.threshold),
        dense_group_ids(group_ids),
        objective=o.objective,
        tau=o.tau_value,
        normalize=o.normalize,
        cvar_alpha=o.cvar_alpha,
        margin=o.margin,
        preferences=preferences,
        lam=o.lam,
    )
    if validate:
        checks = reward_checks(rewards) + preference_checks(preferences)
        sd = scores.detach()
        checks.append(
            (
                sd.isfinite().all(),
                lambda: f"scores: non-finite value at response {first_index(~sd.isfinite())}",
            )
        )
        checks += objective_checks(terms, o, s.dtype)
        raise_if_failed(checks)
    return terms


def objective_checks(
    terms: DiscriminativeTerms, options: DiscoOptions, dtype: torch.dtype
) -> list[Check | ValueCheck]:
    """Value checks of the objective's results (under ``validate``): finite inputs and options
    in their ranges can still overflow ``dtype`` together (scores far apart, a large margin)."""
    kind = dtype_name(dtype)
    why = (
        f"the scores are too far apart for {kind} with objective={options.objective!r}, "
        f"tau={options.tau_value!r}, margin={options.margin!r}{float64_hint(dtype)}"
    )
    return [
        (terms.objective.detach().isfinite(), lambda: f"objective: not finite in {kind}: {why}"),
        (terms.weights.isfinite().all(), lambda: f"weights: not finite in {kind}: {why}"),
    ]


def discriminative_objective(
    scores: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    objective: Objective = "disco",
    tau: float = 10.0,
    threshold: float = 0.5,
    normalize: Normalize = "all",
    cvar_alpha: float = 0.5,
    margin: float = 1.0,
    lam: float = 0.1,
    preferences: Tensor | None = None,
    validate: bool = True,
) -> Tensor:
    r"""DisCO's discriminative objective J (to be maximised), arXiv 2505.12366 eq. 8 / 10.

    .. math::

        J = \frac{1}{G}\sum_q \Big[\frac{1}{|P_q|}\sum_{i\in P_q} s_i
            - \tau \log\frac{1}{|N_q|}\sum_{j\in N_q} e^{s_j/\tau}\Big]
        \quad(\text{DisCO}),\qquad
        J = \frac{1}{G}\sum_q \Big[\overline{s}_{P_q} - \overline{s}_{N_q}\Big]
        \quad(\text{DisCO-b})

    and DRPO (arXiv 2510.04474) replaces the positives' mean of DisCO by
    :math:`\sum_{i\in P_q} v_i s_i`, :math:`v = \mathrm{softmax}_{P_q}(\mathrm{pref}/\lambda)`.

    The log-mean-exp is computed exactly and stably (shifted by the per-group max), so the
    returned value is the objective itself.

    Args:
      scores: (B,) sequence scores (e.g. from :func:`sequence_scores`), differentiable.
      rewards: (B,) rewards; a response is positive iff reward > ``threshold``.
      group_ids: (B,) integer tensor: the question each response answers. Any order, any
        values, any group sizes.
      objective: ``"disco"`` (log-mean-exp over negatives), ``"disco_b"`` (mean), ``"drpo"``
        (DisCO with preference-weighted positives), or one of the ablation variants
        ``"cvar"``, ``"disco_2way"``, ``"auc_sq_hinge"``, ``"auc_logistic"`` (see
        :func:`discoloss.disco_loss`).
      tau: temperature of the log-mean-exp, > 0 (unused by ``"disco_b"``).
      threshold: reward threshold of the positive label.
      normalize: ``"all"`` divides by the number of distinct groups, ``"valid"`` by the number
        of groups with at least one positive and one negative.
      cvar_alpha: fraction of hardest negatives of ``"cvar"``, in (0, 1].
      margin: margin of ``"auc_sq_hinge"``.
      lam: DRPO's temperature lambda of the positives' softmax, > 0.
      preferences: (B,) DRPO's per-response preferences (required by ``"drpo"`` here, e.g.
        ``1 - lengths / max_length``; only the positives' values matter). No gradient.
      validate: check values (one host sync).

    Returns:
      0-d tensor J, float32 (float64 for float64 scores).
    """
    return _prepare(
        scores,
        rewards,
        group_ids,
        validate,
        preferences,
        objective=objective,
        tau=tau,
        threshold=threshold,
        normalize=normalize,
        cvar_alpha=cvar_alpha,
        margin=margin,
        lam=lam,
    ).objective


def discriminative_weights(
    scores: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    objective: Objective = "disco",
    tau: float = 10.0,
    threshold: float = 0.5,
    normalize: Normalize = "all",
    cvar_alpha: float = 0.5,
    margin: float = 1.0,
    lam: float = 0.1,
    preferences: Tensor | None = None,
    validate: bool = True,
) -> Tensor:
    r"""Per-response discriminative weights :math:`w = \partial J / \partial s` (no gradient).

    .. math::

        w_i = \frac{1}{|P_q|\,G}\ \Big(i\in P_q;\ \text{DRPO}:\ \frac{v_i}{G}\Big),\qquad
        w_j = -\frac{1}{G}\,\frac{e^{s_j/\tau}}{\sum_{k\in N_q} e^{s_k/\tau}}\ (j\in N_q,
        \text{DisCO}),\qquad w_j = -\frac{1}{|N_q|\,G}\ (\text{DisCO-b})

    and 0 for responses of questions without signal. Per question with signal the positive
    weights sum to +1/G and the negative ones to -1/G (DRPO too): no difficulty bias. Given w,
    any subset of the responses contributes ``(w * s).sum()`` to the gradient of J, which is
    how DisCO is split across micro-batches (see :mod:`discoloss.accumulation`).

    Same arguments as :func:`discriminative_objective`. Returns a (B,) detached tensor.
    """
    return _prepare(
        scores,
        rewards,
        group_ids,
        validate,
        preferences,
        objective=objective,
        tau=tau,
        threshold=threshold,
        normalize=normalize,
        cvar_alpha=cvar_alpha,
        margin=margin,
        lam=lam,
    ).weights
