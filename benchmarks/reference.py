"""Reference-style implementations of the published DisCO and DRPO losses, for benchmarks and
comparison tests only.

This is what a user would run instead of :func:`discoloss.disco_loss`: the computation pattern
of the authors' release (DESIGN.md section 6), written from that description. It is deliberately
*not* part of the package: it inherits the published code's limitations (equal group sizes,
rewards exactly 0 or 1, a surrogate loss value) and exists to be measured against.

Per call, on (B, T) token tensors with B = num_questions * group_size::

    ratio   = exp(logp - old)                                  (always computed)
    kl      = sum(m * (old - logp)) / sum(m)                   (k1, over all tokens)
    s_i     = sum_t m_it * x_it / sum_t m_it                   x = logp or ratio
    order   = argsort(uid);  S, R = s[order].view(Q, n), r[order].view(Q, n)
    P, N    = (R == 1), (R == 0);  keep questions with both
    DisCO:  z = S / tau, -inf at positives, minus the detached row max
            E = sum_N exp(z);  lme = E / (E.detach() + eps)     (value ~1, gradient of log E)
            J_q = mean_P (S - tau * lme)
    DisCO-b: J_q = mean_P S - mean_N S
    J       = sum_q J_q / Q                                     (all questions)
    loss    = -J + max(beta * (kl - delta), 0).detach() * kl

Relation to :func:`discoloss.disco_loss` (``normalize="all"``, k1, binary rewards in {0, 1},
equal group sizes): the gradients with respect to ``log_probs`` agree (up to the factor
E / (E + eps) with E >= 1, i.e. to ~eps), and so do the KL and, for DisCO-b, the objective. The
loss values differ in two places, both by design of the published code:

* DisCO: the DRO term tau * log(mean_{N_q} exp(s / tau)) is replaced by tau * E / E.detach(),
  whose value is ~tau, so
  J_ref = J + (1 / Q) * sum_{q valid} (tau * log(mean_{N_q} exp(s / tau)) - tau).
* the penalty value is max(beta (kl - delta), 0) * kl instead of beta / 2 * max(kl - delta, 0)^2.

DRPO (:func:`reference_drpo_loss`): the pattern of the DRPO authors' release (their
``compute_policy_loss_drpo``, log-likelihood score only), as DisCO above with the positives
weighted::

    L_i     = sum_t m_it / T                                    T = the padded width of m
    u_i     = exp((1 - L_i) / lam)                              (no shift)
    J_q     = sum_P u_i (S_i - tau * lme_q) / sum_P u_i

Relation to ``disco_loss(objective="drpo", max_length=T)`` (binary rewards in {0, 1}, equal
group sizes, k1, ``normalize="all"``): the gradients agree (to ~eps, as for DisCO), and the
objectives differ by the same DRO gap as DisCO's. Only when T, the width of the tensors, is the
engine's maximum response length is this the paper's length reward: with tensors padded to the
longest response of a batch (verl 0.9's micro-batches, TRL) the same responses get other
weights, and u overflows for lam < 1 / 88.7 in float32 (then inf / inf = nan).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

__all__ = ["ReferenceOutput", "reference_disco_loss", "reference_drpo_loss"]


class ReferenceOutput(NamedTuple):
    """loss: 0-d surrogate to minimise; objective: 0-d J_ref; kl: 0-d k1 token mean."""

    loss: Tensor
    objective: Tensor
    kl: Tensor


def _masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    if dim is None:
        return (x * mask).sum() / (mask.sum() + 1e-8)
    return (x * mask).sum(dim) / (mask.sum(dim) + 1e-8)


def reference_disco_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    group_size: int,
    score: Literal["log_likelihood", "likelihood_ratio"] = "log_likelihood",
    objective: Literal["disco", "disco_b"] = "disco",
    tau: float | None = None,
    delta: float = 1e-4,
    beta: float = 1e3,
    eps: float = 1e-8,
) -> ReferenceOutput:
    """The published DisCO loss, computed the way the authors' release computes it.

    Args:
      log_probs: (B, T) current-policy token log-probs (differentiable).
      old_log_probs: (B, T) sampling-policy token log-probs.
      mask: (B, T) response mask, in the log-probs' floating dtype (as the published code
        multiplies by it).
      rewards: (B,) rewards, exactly 1 (positive) or 0 (negative).
      group_ids: (B,) question ids; every question must have exactly ``group_size`` responses.
      group_size: responses per question (``n``), as in the published ``view(num_questions, n)``.
      score, objective, tau, delta, beta: as in :func:`discoloss.disco_loss` (tau None gives 10
        for log_likelihood and 1 for likelihood_ratio).
      eps: added to the detached sum in the ``E / E.detach()`` trick.
    """
    if tau is None:
        tau = 10.0 if score == "log_likelihood" else 1.0
    old_log_probs = old_log_probs.detach()
    negative_approx_kl = log_probs - old_log_probs
    ratio = torch.exp(negative_approx_kl)
    kl = _masked_mean(-negative_approx_kl, mask)

    token_scores = log_probs if score == "log_likelihood" else ratio
    seq_scores = _masked_mean(token_scores, mask, dim=-1)

    num_questions = log_probs.shape[0] // group_size
    order = torch.argsort(group_ids)
    s = seq_scores[order].view(num_questions, group_size)
    r = rewards[order].view(num_questions, group_size)
    pos = r == 1
    neg = r == 0
    keep = pos.any(dim=1) & neg.any(dim=1)
    s, pos, neg = s[keep], pos[keep], neg[keep]
    pos_f = pos.to(s.dtype)
    neg_f = neg.to(s.dtype)

    if objective == "disco":
        z = (s / tau).masked_fill(~neg, float("-inf"))
        z = z - z.max(dim=1, keepdim=True).values.detach()
        e = torch.exp(z) * neg_f
        total = e.sum(dim=1, keepdim=True)
        lme = total / (total.detach() + eps)
        per_response = s - tau * lme
        per_question = (per_response * pos_f).sum(dim=1) / pos_f.sum(dim=1)
    else:
        mean_pos = (s * pos_f).sum(dim=1) / pos_f.sum(dim=1)
        mean_neg = (s * neg_f).sum(dim=1) / neg_f.sum(dim=1)
        per_question = mean_pos - mean_neg
    objective_value = per_question.sum() / num_questions

    penalty = torch.clamp(beta * (kl - delta), min=0.0).detach() * kl
    loss = -objective_value + penalty
    return ReferenceOutput(loss, objective_value, kl)


def reference_drpo_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    group_size: int,
    lam: float = 0.1,
    tau: float = 10.0,
    delta: float = 1e-4,
    beta: float = 1e3,
    eps: float | None = None,
) -> ReferenceOutput:
    """The published DRPO loss, computed the way the authors' release computes it.

    Args:
      log_probs, old_log_probs, mask, rewards, group_ids, group_size, tau, delta, beta: as in
        :func:`reference_disco_loss` (log-likelihood score, k1 KL).
      lam: the temperature of the positives' weights exp((1 - |o| / T) / lam), with T the
        padded width ``mask.shape[-1]`` (the release's ``eos_mask.size(-1)``).
      eps: added to the detached sum of the log-mean-exp trick; None gives the dtype's
        machine epsilon, as the release does.
    """
    old_log_probs = old_log_probs.detach()
    negative_approx_kl = log_probs - old_log_probs
    kl = (-negative_approx_kl * mask).sum() / mask.sum()
    seq_scores = (log_probs * mask).sum(-1) / mask.sum(-1)
    length_ratio = mask.sum(-1) / mask.shape[-1]

    num_questions = log_probs.shape[0] // group_size
    order = torch.argsort(group_ids)
    s = seq_scores[order].view(num_questions, group_size)
    r = rewards[order].view(num_questions, group_size)
    ratio = length_ratio[order].view(num_questions, group_size)
    pos = r == 1
    neg = r == 0
    keep = pos.any(dim=1) & neg.any(dim=1)
    s, pos, neg, ratio = s[keep], pos[keep], neg[keep], ratio[keep]
    pos_f = pos.to(s.dtype)
    neg_f = neg.to(s.dtype)

    z = (s / tau).masked_fill(~neg, float("-inf"))
    z = z - z.max(dim=1, keepdim=True).values.detach()
    e = torch.exp(z) * neg_f
    total = e.sum(dim=1, keepdim=True)
    lme = total / (total.detach() + (torch.finfo(total.dtype).eps if eps is None else eps))
    u = torch.exp((1 - ratio) / lam)
    per_question = (u * (s - tau * lme) * pos_f).sum(dim=1) / (u * pos_f).sum(dim=1)
    objective_value = per_question.sum() / num_questions

    penalty = torch.clamp(beta * (kl - delta), min=0.0).detach() * kl
    loss = -objective_value + penalty
    return ReferenceOutput(loss, objective_value, kl)
