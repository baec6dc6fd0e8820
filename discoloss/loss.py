"""The DisCO loss: discriminative objective with a squared-hinge KL constraint."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from discoloss._checks import check_number, check_option, raise_if_failed
from discoloss._types import (
    DEFAULT_TAU,
    KL_ESTIMATORS,
    SCORES,
    KLEstimator,
    Normalize,
    Objective,
    Score,
)
from discoloss.kl import kl_row_sums, squared_hinge_penalty
from discoloss.objectives import (
    DiscriminativeTerms,
    check_objective_options,
    check_response_inputs,
    dense_group_ids,
    discriminative_terms,
    reward_checks,
)
from discoloss.scores import TokenSums, check_token_inputs, scores_from_sums, token_sums

__all__ = ["DiscoOutput", "disco_loss"]


class DiscoOutput(NamedTuple):
    """Result of :func:`disco_loss`.

    loss: 0-d, ``-objective + penalty``; minimise it. Its value is the true objective value, not
      a surrogate.
    objective: 0-d J, the discriminative objective (maximised).
    kl: 0-d token-mean KL estimate over all response tokens of the batch.
    penalty: 0-d ``beta/2 * max(kl - delta, 0)^2``.
    metrics: detached 0-d tensors for logging (see :func:`disco_loss`).
    """

    loss: Tensor
    objective: Tensor
    kl: Tensor
    penalty: Tensor
    metrics: dict[str, Tensor]


def resolve_tau(tau: float | None, score: str) -> float:
    if tau is None:
        return DEFAULT_TAU[score]
    return check_number("tau", tau, positive=True)


def loss_metrics(
    scores: Tensor,
    positive: Tensor,
    sums: TokenSums,
    terms: DiscriminativeTerms,
    objective: Tensor,
    kl: Tensor,
    penalty: Tensor,
    loss: Tensor,
    delta: float,
) -> dict[str, Tensor]:
    """Detached logging metrics; no host sync."""
    s = scores.detach()
    f = s.dtype
    pos = positive.to(f)
    n_pos = pos.sum()
    n_neg = (1.0 - pos).sum()
    num_groups = terms.num_groups.to(f)
    return {
        "loss": loss.detach(),
        "objective": objective.detach(),
        "kl": kl.detach(),
        "penalty": penalty.detach(),
        "constraint_active": (kl.detach() > delta).to(f),
        "num_groups": num_groups,
        "groups_with_signal": terms.num_valid.to(f),
        "frac_groups_with_signal": terms.num_valid.to(f) / num_groups.clamp_min(1.0),
        "frac_positive": pos.mean(),
        "mean_pos_score": torch.where(positive, s, 0.0).sum() / n_pos.clamp_min(1.0),
        "mean_neg_score": torch.where(positive, 0.0, s).sum() / n_neg.clamp_min(1.0),
        "effective_negatives": terms.effective_negatives,
        "mean_response_length": sums.lengths.mean(),
    }


def disco_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    score: Score = "log_likelihood",
    objective: Objective = "disco",
    tau: float | None = None,
    delta: float = 1e-4,
    beta: float = 1e3,
    kl_estimator: KLEstimator = "k1",
    threshold: float = 0.5,
    normalize: Normalize = "all",
    validate: bool = True,
) -> DiscoOutput:
    r"""DisCO loss (Li et al., "DisCO: Reinforcing Large Reasoning Models with Discriminative
    Constrained Optimization", arXiv 2505.12366).

    .. math::

        \mathcal{L} = -J(\theta) + \frac{\beta}{2}\,
            \big[\widehat{KL}(\pi_{old}\,\|\,\pi_\theta) - \delta\big]_+^2

    with J the discriminative objective of :func:`discriminative_objective` over the sequence
    scores of :func:`sequence_scores`, and the KL the token mean of :func:`kl_divergence`.

    Args:
      log_probs: (B, T) token log-probs under the current policy. The only input that receives
        gradient. Any floating dtype; half precision is reduced in float32.
      old_log_probs: (B, T) token log-probs under the sampling policy (detached inside).
      mask: (B, T) bool or 0/1, True at response tokens. Padding may hold any value.
      rewards: (B,) rewards; positive iff reward > ``threshold``.
      group_ids: (B,) integer tensor, the question (prompt) of each response; any order, any
        values, any group sizes.
      score: ``"log_likelihood"`` or ``"likelihood_ratio"``.
      objective: ``"disco"`` (KL-DRO log-mean-exp over negatives) or ``"disco_b"`` (mean).
      tau: DRO temperature, > 0; None gives 10 for log_likelihood and 1 for likelihood_ratio.
      delta: KL constraint radius, >= 0.
      beta: penalty strength, >= 0.
      kl_estimator: ``"k1"`` (log pi_old - log pi_theta) or ``"k3"``.
      threshold: reward threshold of the positive label.
      normalize: ``"all"`` (divide by all distinct groups, as published) or ``"valid"`` (by
        groups with both a positive and a negative).
      validate: check values (non-finite inputs, empty responses, mask values) with one host
        sync. With ``validate=False`` the loss issues no host sync at all.

    Returns:
      :class:`DiscoOutput`. ``metrics`` holds detached 0-d float tensors: ``loss``,
      ``objective``, ``kl``, ``penalty``, ``constraint_active`` (1.0 if kl > delta),
      ``num_groups``, ``groups_with_signal``, ``frac_groups_with_signal``, ``frac_positive``
      (share of positive responses), ``mean_pos_score``, ``mean_neg_score``,
      ``effective_negatives`` (mean over groups with signal of 1/sum q_j^2 for the normalised
      weights q on a group's negatives: |N_q| for DisCO-b, fewer when DRO focuses on hard
      negatives) and ``mean_response_length``.

    Raises:
      ValueError / TypeError naming the argument for bad shapes, dtypes, devices, options and
      (when ``validate``) values.
    """
    check_option("score", score, SCORES)
    check_option("kl_estimator", kl_estimator, KL_ESTIMATORS)
    tau_f = resolve_tau(tau, score)
    tau_f, threshold_f = check_objective_options(objective, tau_f, threshold, normalize)
    delta_f = check_number("delta", delta, non_negative=True)
    beta_f = check_number("beta", beta, non_negative=True)
    log_probs, old_log_probs, mask = check_token_inputs(log_probs, old_log_probs, mask)
    check_response_inputs(rewards, group_ids, ("log_probs", log_probs))

    need_ratio = score == "likelihood_ratio" or kl_estimator == "k3"
    sums, checks = token_sums(
        log_probs, old_log_probs, mask, need_ratio=need_ratio, validate=validate
    )
    if validate:
        checks += reward_checks(rewards)
    raise_if_failed(checks)

    scores = scores_from_sums(sums, score)
    positive = rewards > threshold_f
    terms = discriminative_terms(
        scores,
        positive,
        dense_group_ids(group_ids),
        objective=objective,
        tau=tau_f,
        normalize=normalize,
    )
    kl = kl_row_sums(sums, kl_estimator).sum() / sums.lengths.sum().clamp_min(1.0)
    penalty = squared_hinge_penalty(kl, delta=delta_f, beta=beta_f)
    loss = -terms.objective + penalty
    metrics = loss_metrics(
        scores, positive, sums, terms, terms.objective, kl, penalty, loss, delta_f
    )
    return DiscoOutput(loss, terms.objective, kl, penalty, metrics)
