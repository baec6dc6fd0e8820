r"""GRPO-family baseline losses, with the same input conventions as :func:`discoloss.disco_loss`.

These are the losses a user would otherwise train with, written from their papers so that a
comparison with DisCO is fair: same inputs (token log-probs, old log-probs, response mask,
per-response rewards, group ids), ragged groups in any order, sync-free group statistics (scatter
ops over buffers of size B), one host sync for value checks when ``validate=True`` and none when
``validate=False``. Gradients flow into ``log_probs`` only.

All three share the clipped importance-ratio surrogate of PPO, per token t of response i with
ratio :math:`\rho_{it} = \pi_\theta(o_{it}\mid\cdot) / \pi_{old}(o_{it}\mid\cdot)`:

.. math::

    \ell_{it} = -\min\big(\rho_{it} A_i,\ \mathrm{clip}(\rho_{it}, 1-\epsilon_{low},
        1+\epsilon_{high})\, A_i\big)
      = -A_i\, g_{it},\qquad
    g_{it} = \begin{cases} \min(\rho_{it}, 1+\epsilon_{high}) & A_i \ge 0\\
                           \max(\rho_{it}, 1-\epsilon_{low}) & A_i < 0 \end{cases}

(the per-token scores s+ / s- of DESIGN.md section 1) and differ in the advantage and in how the
token terms are aggregated:

========  =====================================  ==========================================
loss      advantage A_i                          aggregation of the token terms
========  =====================================  ==========================================
GRPO      (r_i - mean_g) / (std_g + eps)         mean over responses of token means
Dr. GRPO  r_i - mean_g                           token sum / (B * max_tokens)
DAPO      (r_i - mean_g) / (std_g + eps)         token mean over all tokens of the batch
========  =====================================  ==========================================

References:

* GRPO: Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
  Models", arXiv 2402.03300 (eq. 3 and 4). The KL-to-reference term of the paper is omitted
  (beta = 0: DisCO's published runs use no reference model, and DAPO and Dr. GRPO drop it too).
* Dr. GRPO: Liu et al., "Understanding R1-Zero-Like Training: A Critical Perspective",
  arXiv 2503.20783 (section 3.2): no std division, no ``1/|o_i|``, a constant normaliser instead.
* DAPO: Yu et al., "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
  arXiv 2503.14476 (eq. 8-12): clip-higher (0.2 / 0.28), token-level loss, dynamic sampling
  (:func:`dynamic_sampling_filter`). Its advantage is GRPO's, std included (eq. 9; verl's DAPO
  recipe runs ``algorithm.adv_estimator=grpo``); ``scale="none"`` gives the unscaled variant.

Conventions (verl 0.9 / TRL):

* std: Bessel-corrected (``torch.std``), as both verl and TRL compute it;
  ``std_unbiased=False`` gives the population std.
* eps: 1e-6, verl's ``compute_grpo_outcome_advantage``; TRL's ``GRPOTrainer`` adds 1e-4
  (pass ``eps=1e-4``).
* groups whose rewards are all equal get advantage exactly 0 (not ``0 / eps`` noise). A group
  of one response gets 0 too; verl instead uses mean 0 and std 1 for it (advantage
  ``r / (1 + eps)``), TRL requires at least two responses per group.
* no dual clip by default (the papers have none); ``dual_clip=3.0`` reproduces verl's default
  ``clip_ratio_c`` (for A < 0 the token term is bounded by ``-dual_clip * A``).
* the ratio is not clamped: verl clamps ``log_probs - old_log_probs`` to [-20, 20] before exp.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from discoloss._checks import (
    Check,
    ValueCheck,
    check_batch,
    check_device,
    check_in_dtype_range,
    check_number,
    check_option,
    check_tensor,
    computation_dtype,
    dtype_name,
    float64_hint,
    raise_if_failed,
    scale_range,
)
from discoloss.objectives import (
    GroupIndex,
    check_response_inputs,
    dense_group_ids,
    positive_labels,
    reward_checks,
)
from discoloss.scores import as_bool_mask, check_token_inputs, token_sums

__all__ = [
    "AdvantageScale",
    "BaselineOutput",
    "dapo_loss",
    "dr_grpo_loss",
    "dynamic_sampling_filter",
    "group_advantages",
    "grpo_loss",
]

#: How :func:`group_advantages` scales the centred rewards. ``"std"`` divides them by the
#: group's std (GRPO, DAPO), ``"none"`` leaves them unscaled (Dr. GRPO).
AdvantageScale = Literal["std", "none"]
_SCALES: tuple[str, ...] = ("std", "none")
_Aggregation = Literal["seq_mean_token_mean", "seq_mean_token_sum_norm", "token_mean"]


class BaselineOutput(NamedTuple):
    """Result of a baseline loss.

    loss: 0-d, minimise it.
    advantages: (B,) per-response advantages the loss used (detached).
    metrics: detached 0-d float tensors for logging: ``loss``, ``kl`` (k1 token mean of
      ``old_log_probs - log_probs`` over all response tokens), ``clip_fraction`` (share of
      response tokens whose term is clipped, i.e. gets no gradient; tokens of zero-advantage
      responses never count), ``clip_fraction_low`` (A < 0 and rho < 1 - eps_low),
      ``clip_fraction_high`` (A > 0 and rho > 1 + eps_high), ``num_groups``,
      ``groups_with_signal`` (groups whose rewards are not all equal),
      ``frac_groups_with_signal``, ``frac_zero_advantage`` (share of responses with A = 0),
      ``mean_response_length``.
    """

    loss: Tensor
    advantages: Tensor
    metrics: dict[str, Tensor]


class _GroupStats(NamedTuple):
    advantages: Tensor  # (B,)
    groups: GroupIndex
    constant: Tensor  # (B,) per dense group: all rewards equal (unused slots: True)


def _reward_dtype(rewards: Tensor) -> torch.dtype:
    return torch.float64 if rewards.dtype == torch.float64 else torch.float32


def _group_stats(
    rewards: Tensor, group_ids: Tensor, *, scale: str, std_unbiased: bool, eps: float
) -> _GroupStats:
    """Advantages from validated inputs; scatter ops only, no host sync."""
    f = _reward_dtype(rewards)
    r = rewards.detach().to(f)
    index = dense_group_ids(group_ids)
    d = index.dense
    b = r.shape[0]
    zeros = torch.zeros(b, dtype=f, device=r.device)
    n = zeros.index_add(0, d, torch.ones_like(r))
    mean = zeros.index_add(0, d, r) / n.clamp_min(1.0)
    centred = r - mean[d]
    rmax = torch.full_like(zeros, -math.inf).scatter_reduce(0, d, r, "amax", include_self=True)
    rmin = torch.full_like(zeros, math.inf).scatter_reduce(0, d, r, "amin", include_self=True)
    constant = rmax <= rmin  # unused slots: -inf <= inf, True
    if scale == "std":
        var = zeros.index_add(0, d, centred * centred)
        var = var / (n - 1.0 if std_unbiased else n).clamp_min(1.0)
        centred = centred / (var.sqrt()[d] + eps)
    adv = torch.where(constant[d], torch.zeros((), dtype=f, device=r.device), centred)
    return _GroupStats(adv, index, constant)


def _check_scale_options(scale: str, std_unbiased: bool, eps: float) -> float:
    check_option("scale", scale, _SCALES)
    if not isinstance(std_unbiased, bool):
        raise TypeError(f"std_unbiased must be a bool, got {type(std_unbiased).__name__}")
    return check_number("eps", eps, non_negative=True)


def _check_group_inputs(rewards: Tensor, group_ids: Tensor) -> None:
    check_tensor("rewards", rewards, ndim=1, kind="real")
    check_tensor("group_ids", group_ids, ndim=1, kind="int")
    check_batch(("rewards", "group_ids"), (rewards, group_ids))
    check_device(("rewards", "group_ids"), (rewards, group_ids))


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    scale: AdvantageScale = "std",
    std_unbiased: bool = True,
    eps: float = 1e-6,
    validate: bool = True,
) -> Tensor:
    r"""Group-relative advantages of GRPO and its variants (no gradient).

    .. math::

        A_i = \frac{r_i - \bar r_g}{\sigma_g + \epsilon}\ \ (\texttt{scale="std"}),\qquad
        A_i = r_i - \bar r_g\ \ (\texttt{scale="none"}),\qquad
        \sigma_g = \sqrt{\tfrac{1}{n_g - 1}\textstyle\sum_{j\in g}(r_j - \bar r_g)^2}

    for response i of group g with n_g responses (``std_unbiased=False``: 1/n_g instead of
    1/(n_g - 1)). Responses of a group whose rewards are all equal (a single response included)
    get exactly 0. Rewards are used as given, not thresholded.

    Args:
      rewards: (B,) real rewards.
      group_ids: (B,) integer tensor, the question of each response; any order, any values, any
        group sizes.
      scale: ``"std"`` (GRPO, DAPO) or ``"none"`` (Dr. GRPO).
      std_unbiased: Bessel-corrected std (verl and TRL); False for the population std.
      eps: added to the std, >= 0; 1e-6 as verl, TRL uses 1e-4.
      validate: check that rewards are finite (one host sync).

    Returns:
      (B,) tensor, float32 (float64 for float64 rewards).
    """
    eps = _check_scale_options(scale, std_unbiased, eps)
    _check_group_inputs(rewards, group_ids)
    if validate:
        raise_if_failed(reward_checks(rewards))
    return _group_stats(
        rewards, group_ids, scale=scale, std_unbiased=std_unbiased, eps=eps
    ).advantages


def dynamic_sampling_filter(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    threshold: float = 0.5,
    validate: bool = True,
) -> Tensor:
    r"""DAPO's dynamic sampling (arXiv 2503.14476, eq. 11): keep only informative groups.

    A response is kept iff its group holds at least one positive (reward > ``threshold``) and
    one negative, i.e. :math:`0 < |\{i \in g: r_i > \text{threshold}\}| < n_g`: groups that are
    all correct or all wrong give every GRPO-family loss zero advantage. DAPO resamples until
    the batch is full of kept groups; this helper only computes the mask (no host sync).

    verl's ``filter_groups`` compares the std of a metric (e.g. ``acc``) with 0 and also keeps
    groups of a single response; here a single response is never kept (it has no contrast).

    Args:
      rewards: (B,) real rewards.
      group_ids: (B,) integer group ids (any order, any values, ragged groups).
      threshold: reward threshold of the positive label.
      validate: check that rewards are finite (one host sync).

    Returns:
      (B,) bool tensor, True for responses to keep.
    """
    threshold = check_number("threshold", threshold)
    _check_group_inputs(rewards, group_ids)
    if validate:
        raise_if_failed(reward_checks(rewards))
    index = dense_group_ids(group_ids)
    positive = positive_labels(rewards, threshold).to(torch.int64)
    zeros = torch.zeros(rewards.shape[0], dtype=torch.int64, device=rewards.device)
    n_pos = zeros.index_add(0, index.dense, positive)
    n_all = zeros.index_add(0, index.dense, torch.ones_like(positive))
    keep = (n_pos > 0) & (n_pos < n_all)
    return keep[index.dense]


def _clipped_policy_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    scale: str,
    std_unbiased: bool,
    eps: float,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    aggregation: _Aggregation,
    max_tokens: float | None,
    validate: bool,
) -> BaselineOutput:
    """Shared body of the three losses (options already validated)."""
    log_probs, old_log_probs, mask = check_token_inputs(log_probs, old_log_probs, mask)
    check_response_inputs(rewards, group_ids, ("log_probs", log_probs))
    sums, checks = token_sums(log_probs, old_log_probs, mask, need_ratio=False, validate=validate)
    if validate:
        checks += reward_checks(rewards)

    stats = _group_stats(rewards, group_ids, scale=scale, std_unbiased=std_unbiased, eps=eps)
    bmask = as_bool_mask(mask)
    acc = sums.lengths.dtype  # float32, float64 for float64 log-probs
    adv = stats.advantages.to(acc)
    b = log_probs.shape[0]

    # g_it = clamp(rho_it, lo_i, hi_i) with (lo, hi) = (0, 1 + eps_high) for A >= 0 and
    # (1 - eps_low, dual_clip or inf) for A < 0: the clipped surrogate is -A_i * g_it.
    non_negative = adv >= 0
    # Bounds built in acc itself (where() on two Python numbers would round them to float32);
    # a bound beyond acc's largest number never binds: no bound (and no overflow here).
    largest = torch.finfo(acc).max
    hi_neg = math.inf if dual_clip is None or dual_clip > largest else dual_clip
    hi_pos = math.inf if 1.0 + clip_high > largest else 1.0 + clip_high
    lo = torch.where(non_negative, 0.0, torch.full_like(adv, 1.0 - clip_low)).unsqueeze(-1)
    hi = torch.where(non_negative, torch.full_like(adv, hi_pos), hi_neg).unsqueeze(-1)
    zero = torch.zeros((), dtype=acc, device=log_probs.device)
    log_ratio = torch.where(bmask, log_probs.to(acc) - old_log_probs.detach().to(acc), zero)
    # clamp(rho, lo, hi) = exp(clamp(log rho, log lo, log hi)): a clipped token's ratio is never
    # formed, so it cannot overflow (and its zero gradient is not 0 * inf = nan in exp's
    # backward). Only an unclipped ratio (A < 0 without dual_clip) can overflow: a value check.
    g = torch.where(bmask, torch.exp(torch.clamp(log_ratio, lo.log(), hi.log())), zero)
    row = g.sum(-1)  # (B,) per-response sum of the token terms

    lengths = sums.lengths
    if aggregation == "seq_mean_token_mean":
        coef = 1.0 / (lengths.clamp_min(1.0) * b)
    elif aggregation == "seq_mean_token_sum_norm":
        assert max_tokens is not None
        coef = torch.full_like(lengths, 1.0 / (b * max_tokens))
    else:
        coef = (1.0 / lengths.sum().clamp_min(1.0)).expand(b)
    loss = -(adv * coef * row).sum()
    if validate:
        # the unclipped ratio of a response with A < 0 (no dual_clip), and the loss itself
        checks.append(ValueCheck("ratio", ~row.detach().isfinite()))
        checks.append(_finite_loss_check(loss, acc))
    raise_if_failed(checks)

    with torch.no_grad():
        lr = log_ratio.detach()  # the clip fractions, compared in log space as clipped above
        n_tok = lengths.sum().clamp_min(1.0)
        pos = (adv > 0).unsqueeze(-1) & bmask
        neg = (adv < 0).unsqueeze(-1) & bmask
        high = (pos & (lr > math.log1p(clip_high))).sum(dtype=acc) / n_tok
        low = (neg & (lr < math.log1p(-clip_low))).sum(dtype=acc) / n_tok
        dual = (
            (neg & (lr > math.log(dual_clip))).sum(dtype=acc) / n_tok
            if dual_clip is not None
            else zero
        )
        num_groups = stats.groups.num_groups.to(acc)
        signal = (~stats.constant).sum().to(acc)
        metrics = {
            "loss": loss.detach(),
            "kl": (sums.old_log_prob - sums.log_prob.detach()).sum() / n_tok,
            "clip_fraction": high + low + dual,
            "clip_fraction_low": low,
            "clip_fraction_high": high,
            "num_groups": num_groups,
            "groups_with_signal": signal,
            "frac_groups_with_signal": signal / num_groups.clamp_min(1.0),
            "frac_zero_advantage": (adv == 0).to(acc).mean(),
            "mean_response_length": lengths.mean(),
        }
    return BaselineOutput(loss, stats.advantages, metrics)


def _finite_loss_check(loss: Tensor, dtype: torch.dtype) -> Check:
    return (
        loss.detach().isfinite(),
        lambda: (
            f"loss: not finite in {dtype_name(dtype)}: the rewards or log_probs are too "
            f"large for it{float64_hint(dtype)}"
        ),
    )


def _check_clip(name: str, value: float, *, below_one: bool) -> float:
    v = check_number(name, value, non_negative=True)
    if below_one and v >= 1.0:
        raise ValueError(f"{name} must be < 1 (the ratio is clipped at 1 - {name}), got {value!r}")
    return v


def _check_dual_clip(dual_clip: float | None) -> float | None:
    if dual_clip is None:
        return None
    v = check_number("dual_clip", dual_clip)
    if not v > 1.0:
        raise ValueError(f"dual_clip must be > 1 (or None), got {dual_clip!r}")
    return v


def grpo_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    clip_eps: float = 0.2,
    std_unbiased: bool = True,
    eps: float = 1e-6,
    dual_clip: float | None = None,
    validate: bool = True,
) -> BaselineOutput:
    r"""GRPO's clipped surrogate loss (Shao et al., arXiv 2402.03300, eq. 3), without the
    KL-to-reference term.

    .. math::

        \mathcal{L} = -\frac{1}{B}\sum_{i=1}^{B}\frac{1}{|o_i|}\sum_{t=1}^{|o_i|}
            \min\big(\rho_{it} A_i,\ \mathrm{clip}(\rho_{it}, 1-\epsilon, 1+\epsilon) A_i\big),
        \qquad A_i = \frac{r_i - \bar r_g}{\sigma_g + \mathrm{eps}}

    (verl's ``loss_agg_mode="seq-mean-token-mean"``, TRL's ``loss_type="grpo"``.) With binary
    rewards a question of accuracy p gets weight :math:`\sqrt{p(1-p)}` (DESIGN.md section 1).

    Args:
      log_probs: (B, T) token log-probs under the current policy (the only input with gradient).
      old_log_probs: (B, T) token log-probs under the sampling policy.
      mask: (B, T) bool or 0/1, True at response tokens; padding may hold any value.
      rewards: (B,) rewards, used as given.
      group_ids: (B,) integer group ids (any order, any values, ragged groups).
      clip_eps: clip range epsilon, in [0, 1).
      std_unbiased, eps: std convention of :func:`group_advantages`.
      dual_clip: None (paper) or a bound > 1 (verl's ``clip_ratio_c``, default 3 there).
      validate: value checks with one host sync; ``False`` issues no host sync.

    Returns:
      :class:`BaselineOutput`.
    """
    clip = _check_clip("clip_eps", clip_eps, below_one=True)
    eps = _check_scale_options("std", std_unbiased, eps)
    return _clipped_policy_loss(
        log_probs, old_log_probs, mask, rewards, group_ids,
        scale="std", std_unbiased=std_unbiased, eps=eps, clip_low=clip, clip_high=clip,
        dual_clip=_check_dual_clip(dual_clip), aggregation="seq_mean_token_mean",
        max_tokens=None, validate=validate,
    )  # fmt: skip


def dr_grpo_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    clip_eps: float = 0.2,
    max_tokens: float | None = None,
    dual_clip: float | None = None,
    validate: bool = True,
) -> BaselineOutput:
    r"""Dr. GRPO (Liu et al., arXiv 2503.20783): GRPO without the std and length biases.

    .. math::

        \mathcal{L} = -\frac{1}{B\,L_{max}}\sum_{i=1}^{B}\sum_{t=1}^{|o_i|}
            \min\big(\rho_{it} A_i,\ \mathrm{clip}(\rho_{it}, 1-\epsilon, 1+\epsilon) A_i\big),
        \qquad A_i = r_i - \bar r_g

    with :math:`L_{max}` = ``max_tokens``, a constant (the generation budget; default
    ``log_probs.shape[1]``, as verl's ``seq-mean-token-sum-norm`` without
    ``loss_scale_factor``). Pass the generation budget explicitly so that the normaliser does
    not change with the padding of a batch. Question weight: :math:`p(1-p)`.

    Args: as :func:`grpo_loss`; ``max_tokens`` > 0.
    """
    clip = _check_clip("clip_eps", clip_eps, below_one=True)
    check_tensor("log_probs", log_probs, ndim=2, kind="float")
    if max_tokens is None:
        max_tokens_f = float(log_probs.shape[1])
    else:
        max_tokens_f = check_number("max_tokens", max_tokens, positive=True)
        acc = computation_dtype(log_probs.dtype)
        low, high = scale_range(acc)
        check_in_dtype_range(
            "max_tokens", max_tokens_f, acc, low, high, "the loss divides by max_tokens"
        )
    return _clipped_policy_loss(
        log_probs, old_log_probs, mask, rewards, group_ids,
        scale="none", std_unbiased=True, eps=0.0, clip_low=clip, clip_high=clip,
        dual_clip=_check_dual_clip(dual_clip), aggregation="seq_mean_token_sum_norm",
        max_tokens=max_tokens_f, validate=validate,
    )  # fmt: skip


def dapo_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    scale: AdvantageScale = "std",
    std_unbiased: bool = True,
    eps: float = 1e-6,
    dual_clip: float | None = None,
    validate: bool = True,
) -> BaselineOutput:
    r"""DAPO's policy loss (Yu et al., arXiv 2503.14476, eq. 8): clip-higher, token-level mean.

    .. math::

        \mathcal{L} = -\frac{1}{\sum_i |o_i|}\sum_{i=1}^{B}\sum_{t=1}^{|o_i|}
            \min\big(\rho_{it} A_i,\ \mathrm{clip}(\rho_{it}, 1-\epsilon_{low},
            1+\epsilon_{high}) A_i\big),\qquad
        A_i = \frac{r_i - \bar r_g}{\sigma_g + \mathrm{eps}}

    (verl's ``loss_agg_mode="token-mean"``, TRL's ``loss_type="dapo"``.) The advantage is GRPO's
    (DAPO eq. 9, and verl's DAPO recipe uses the GRPO estimator); ``scale="none"`` drops the std
    (then the question weight is Dr. GRPO's p(1-p) instead of sqrt(p(1-p))). Each response
    counts in proportion to its length. Dynamic sampling is a separate step:
    :func:`dynamic_sampling_filter`; overlong reward shaping belongs to the reward.

    Args: as :func:`grpo_loss`; ``clip_eps_low`` in [0, 1), ``clip_eps_high`` >= 0; ``scale``,
      ``std_unbiased`` and ``eps`` as :func:`group_advantages`.
    """
    low = _check_clip("clip_eps_low", clip_eps_low, below_one=True)
    high = _check_clip("clip_eps_high", clip_eps_high, below_one=False)
    eps = _check_scale_options(scale, std_unbiased, eps)
    return _clipped_policy_loss(
        log_probs, old_log_probs, mask, rewards, group_ids,
        scale=scale, std_unbiased=std_unbiased, eps=eps, clip_low=low, clip_high=high,
        dual_clip=_check_dual_clip(dual_clip), aggregation="token_mean",
        max_tokens=None, validate=validate,
    )  # fmt: skip
