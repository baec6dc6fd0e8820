"""The DisCO loss: discriminative objective with a squared-hinge KL constraint."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from discoloss._checks import (
    Check,
    ValueCheck,
    check_at_least,
    check_count,
    describe,
    dtype_name,
    float64_hint,
    raise_if_failed,
)
from discoloss._types import Constraint, KLEstimator, Normalize, Objective, Score
from discoloss.constraints import LagrangeMultiplier, constraint_penalty
from discoloss.kl import kl_row_sums
from discoloss.objectives import (
    DiscriminativeTerms,
    check_preferences,
    check_response_inputs,
    dense_group_ids,
    discriminative_terms,
    objective_checks,
    positive_labels,
    positive_preferences,
    preference_checks,
    reward_checks,
)
from discoloss.options import DiscoOptions
from discoloss.scores import (
    TokenSums,
    check_token_inputs,
    clipped_ratio_scores,
    scores_from_sums,
    token_sums,
)

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

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


def loss_metrics(
    scores: Tensor,
    positive: Tensor,
    lengths: Tensor,
    terms: DiscriminativeTerms,
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
        "objective": terms.objective.detach(),
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
        "effective_positives": terms.effective_positives,
        "mean_response_length": lengths.detach().to(f).mean(),
    }


def loss_from_stats(
    scores: Tensor,
    kl_sums: Tensor,
    lengths: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    options: DiscoOptions,
    multiplier: LagrangeMultiplier | None = None,
    num_groups: Tensor | None = None,
    num_tokens: Tensor | None = None,
    preferences: Tensor | None = None,
) -> tuple[DiscoOutput, DiscriminativeTerms]:
    """DisCO from per-response scalars (scores, KL sums, token counts): shared by the local,
    the cross-rank and the micro-batch paths. ``preferences``: DRPO's, when given explicitly
    (else the default length preference is formed from ``lengths``).

    With ``num_tokens`` (tokens of a larger batch this one is a piece of), ``kl`` is this
    piece's additive share sum_i kl_sums_i / num_tokens and the penalty is the piece's token
    share times the penalty of its own token-mean KL (see :func:`disco_loss`).
    """
    o = options
    positive = positive_labels(rewards, o.threshold)
    terms = discriminative_terms(
        scores,
        positive,
        dense_group_ids(group_ids),
        objective=o.objective,
        tau=o.tau_value,
        normalize=o.normalize,
        num_groups=num_groups,
        cvar_alpha=o.cvar_alpha,
        margin=o.margin,
        preferences=positive_preferences(o, preferences, lengths),
        lam=o.lam,
    )

    def penalty_of(kl: Tensor) -> Tensor:
        return constraint_penalty(
            kl, constraint=o.constraint, delta=o.delta, beta=o.beta, multiplier=multiplier
        )

    local_tokens = lengths.sum().clamp_min(1.0)
    kl_total = kl_sums.sum()
    local_kl = kl_total / local_tokens
    if num_tokens is None:
        kl = local_kl
        penalty = penalty_of(kl)
    else:
        total = num_tokens.to(kl_total.dtype).clamp_min(1.0)
        kl = kl_total / total
        penalty = (local_tokens / total) * penalty_of(local_kl)
    loss = -terms.objective + penalty
    metrics = loss_metrics(scores, positive, lengths, terms, kl, penalty, loss, o.delta)
    return DiscoOutput(loss, terms.objective, kl, penalty, metrics), terms


def response_scores(
    sums: TokenSums,
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    rewards: Tensor | None,
    options: DiscoOptions,
) -> Tensor:
    """(B,) scores of the selected kind; the clipped ratio needs the labels."""
    if options.score != "clipped_ratio":
        return scores_from_sums(sums, options.score)
    if rewards is None:
        raise ValueError("score='clipped_ratio' needs rewards (the clip side depends on the label)")
    return clipped_ratio_scores(
        log_probs,
        old_log_probs,
        mask,
        positive_labels(rewards, options.threshold),
        clip_eps=options.clip_eps,
    )


def score_checks(
    scores: Tensor, kl_sums: Tensor, options: DiscoOptions
) -> list[Check | ValueCheck]:
    """Value checks of the per-response stats beyond the token sums' own: the clipped ratio
    forms exp(log_probs - old_log_probs) on its unclipped side, which can overflow; a KL sum
    is a difference of two finite sums, which can overflow too."""
    checks: list[Check | ValueCheck] = []
    if options.score == "clipped_ratio":
        checks.append(ValueCheck("ratio", ~scores.detach().isfinite()))
    checks.append(ValueCheck("kl_sums", ~kl_sums.detach().isfinite()))
    return checks


def output_checks(output: DiscoOutput, options: DiscoOptions) -> list[Check | ValueCheck]:
    """Value checks of a loss's results (under ``validate``): finite inputs and options in
    their ranges can still overflow the computation dtype together (a KL beyond its range, a
    penalty beta/2 * excess^2 beyond it)."""
    kind = dtype_name(output.kl.dtype)
    kl, penalty = output.kl.detach(), output.penalty.detach()
    return [
        (
            kl.isfinite(),
            lambda: (
                f"kl: not finite in {kind}: log_probs and old_log_probs are too far apart "
                f"for {kind}{float64_hint(output.kl.dtype)}"
            ),
        ),
        (
            penalty.isfinite(),
            lambda: (
                f"penalty: not finite in {kind} (kl={describe(kl)}): "
                f"constraint={options.constraint!r} with beta={options.beta!r}, "
                f"delta={options.delta!r} overflows {kind}; use a smaller beta"
                f"{float64_hint(output.kl.dtype)}"
            ),
        ),
    ]


class LocalStats(NamedTuple):
    """What the loss needs from this process's token tensors, and its value checks."""

    scores: Tensor
    kl_sums: Tensor
    lengths: Tensor
    checks: list[Check | ValueCheck]
    device: torch.device


def resolve_options(
    settings: dict[str, Any], multiplier: LagrangeMultiplier | None
) -> DiscoOptions:
    options = DiscoOptions(**settings)
    if options.constraint == "lagrangian" and multiplier is None:
        raise ValueError('constraint="lagrangian" needs multiplier=LagrangeMultiplier(...)')
    if multiplier is not None and not isinstance(multiplier, LagrangeMultiplier):
        raise TypeError(f"multiplier must be a LagrangeMultiplier, got {type(multiplier).__name__}")
    return options


def local_stats(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    options: DiscoOptions,
    validate: bool,
    allow_empty: bool,
    preferences: Tensor | None = None,
) -> LocalStats:
    """Metadata checks (raise), the token pass, and the value checks (returned, not run)."""
    log_probs, old_log_probs, mask = check_token_inputs(
        log_probs, old_log_probs, mask, allow_empty=allow_empty
    )
    check_response_inputs(rewards, group_ids, ("log_probs", log_probs), allow_empty=allow_empty)
    check_preferences(preferences, options, ("log_probs", log_probs), allow_empty=allow_empty)
    sums, checks = token_sums(
        log_probs, old_log_probs, mask, need_ratio=options.needs_ratio, validate=validate
    )
    if validate:
        checks += reward_checks(rewards) + preference_checks(preferences)
    scores = response_scores(sums, log_probs, old_log_probs, mask, rewards, options)
    kl_sums = kl_row_sums(sums, options.kl_estimator)
    if validate:
        checks += score_checks(scores, kl_sums, options)
    return LocalStats(scores, kl_sums, sums.lengths, checks, log_probs.device)


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
    constraint: Constraint = "squared_hinge",
    multiplier: LagrangeMultiplier | None = None,
    cvar_alpha: float = 0.5,
    margin: float = 1.0,
    clip_eps: float = 0.2,
    lam: float = 0.1,
    max_length: int | None = None,
    preferences: Tensor | None = None,
    validate: bool = True,
    num_groups: int | Tensor | None = None,
    num_tokens: int | Tensor | None = None,
    process_group: ProcessGroup | None = None,
) -> DiscoOutput:
    r"""DisCO loss (Li et al., "DisCO: Reinforcing Large Reasoning Models with Discriminative
    Constrained Optimization", arXiv 2505.12366).

    .. math::

        \mathcal{L} = -J(\theta) + \frac{\beta}{2}\,
            \big[\widehat{KL}(\pi_{old}\,\|\,\pi_\theta) - \delta\big]_+^2

    with J the discriminative objective of :func:`discriminative_objective` over the sequence
    scores of :func:`sequence_scores`, and the KL the token mean of :func:`kl_divergence`.
    The defaults are DisCO as published; the other options are its ablations
    (:mod:`discoloss.constraints`, and the table of ablation variants in the documentation)
    and DRPO (Li, Chen, Lin, Yang, "DRPO: Efficient Reasoning via Decoupled Reward Policy
    Optimization", arXiv 2510.04474), ``objective="drpo"``, which averages each question's
    positives under an optimized positive distribution, proportional to the sampling policy
    times :math:`e^{\mathrm{pref}/\lambda}`; with samples of the sampling policy its
    estimate is a softmax over the sampled positives, and the question's objective is

    .. math::

        J_q = \sum_{i\in P_q} v_i\, s_i
            - \tau \log\frac{1}{|N_q|}\sum_{j\in N_q} e^{s_j/\tau},\qquad
        v_i = \frac{e^{\mathrm{pref}_i/\lambda}}{\sum_{k\in P_q} e^{\mathrm{pref}_k/\lambda}},
        \qquad \mathrm{pref}_i = 1 - \frac{|o_i|}{\mathrm{max\_length}}

    The weights v depend on the responses' lengths (or given preferences) only, never on
    theta: the length signal is normalised among a question's correct answers and never
    pushes one of them down; the negatives' term is DisCO's.

    Args:
      log_probs: (B, T) token log-probs under the current policy. The only input that receives
        gradient. Any floating dtype; half precision is reduced in float32.
      old_log_probs: (B, T) token log-probs under the sampling policy (detached inside).
      mask: (B, T) bool or 0/1, True at response tokens. Padding may hold any value.
      rewards: (B,) rewards; positive iff reward > ``threshold``.
      group_ids: (B,) integer tensor, the question (prompt) of each response; any order, any
        values, any group sizes.
      score: ``"log_likelihood"``, ``"likelihood_ratio"``, or ``"clipped_ratio"`` (GRPO's
        clipped surrogate, for the clipping-vs-constraint ablation; uses ``clip_eps``).
      objective: ``"disco"`` (KL-DRO log-mean-exp over negatives), ``"disco_b"`` (mean),
        ``"drpo"`` (DRPO, Li et al., arXiv 2510.04474: DisCO whose positives are averaged
        with the weights ``v = softmax_{P_q}(pref / lam)`` of a preference, by default the
        length reward ``1 - |o_i| / max_length``; see below), ``"cvar"`` (mean of the
        hardest ``cvar_alpha`` fraction of negatives),
        ``"disco_2way"`` (DRO over negatives and, soft-min, over positives),
        ``"auc_sq_hinge"`` / ``"auc_logistic"`` (pairwise AUC surrogates over a question's
        positive-negative pairs; ``margin`` / ``tau``; O(B^2) memory).
      tau: DRO temperature, > 0; None gives 10 for log_likelihood and 1 otherwise.
      delta: KL constraint radius, >= 0.
      beta: penalty strength, >= 0.
      kl_estimator: ``"k1"`` (log pi_old - log pi_theta) or ``"k3"``.
      threshold: reward threshold of the positive label.
      normalize: ``"all"`` (divide by all distinct groups, as published) or ``"valid"`` (by
        groups with both a positive and a negative).
      constraint: ``"squared_hinge"`` (DisCO), ``"hinge"``, ``"kl_penalty"`` (beta * KL),
        ``"lagrangian"`` (needs ``multiplier``) or ``"none"``; see
        :mod:`discoloss.constraints`.
      multiplier: a :class:`discoloss.constraints.LagrangeMultiplier` for ``"lagrangian"``.
      cvar_alpha: fraction of hardest negatives for ``"cvar"``, in (0, 1]; 1 is DisCO-b.
      margin: margin of ``"auc_sq_hinge"``, >= 0.
      clip_eps: clip range of ``"clipped_ratio"``, in (0, 1).
      lam: DRPO's temperature lambda, > 0 (0.1 in the paper's scripts). The positives'
        weights are ``softmax(pref / lam)`` over each question's positives: lam -> inf gives
        DisCO, lam -> 0 all weight on the preferred positive(s).
      max_length: DRPO's length scale in tokens (the engine's maximum response length), for
        the default preference ``1 - |o_i| / max_length`` (``|o_i|`` = the response's token count
        in ``mask``). Only ``max_length * lam`` matters: a response that is that many tokens
        shorter gets e times the weight. Required by ``"drpo"`` unless ``preferences`` is given.
      preferences: (B,) real tensor, DRPO's per-response preference in place of the length
        reward (any values: only differences between a question's positives matter; no
        gradient). Only with ``objective="drpo"``.
      validate: check values (non-finite inputs, empty responses, mask values, the values of
        tensor counts and counts smaller than this batch holds, results that overflow the
        computation dtype) with one host sync. With ``validate=False`` the loss issues no host
        sync at all (local mode). See the documentation's page on errors and validation.
      num_groups: for a batch that is a piece of a larger one whose groups are whole in each
        piece (e.g. a micro-batch of whole groups): the normaliser G of the larger batch, so
        that the pieces' objectives add up to its objective. Overrides ``normalize``. An int
        or a one-element tensor (int or float dtype) holding a whole number >= 1, at least this
        batch's number of groups (of groups with signal for ``normalize="valid"``); the values
        of tensors and the comparison with the batch are checked under ``validate``.
      num_tokens: likewise, the number of response tokens of the larger batch (at least this
        batch's). ``kl`` is then this piece's additive share ``sum(kl_i) / num_tokens`` and
        ``penalty`` its token share ``n_piece / num_tokens`` times the penalty of the piece's
        own token-mean KL: exact when the pieces' KLs are equal (and always for the linear
        constraints), an upper bound (Jensen) otherwise. For the exact penalty of a mini-batch
        split into micro-batches use :mod:`discoloss.accumulation`.
      process_group: a ``torch.distributed`` group. When given, groups are formed across all
        its ranks (a question's responses may sit on different ranks, ranks may hold different
        numbers of responses and sequence lengths, and a rank may hold none: ``(0, T)``
        inputs). Only per-response scalars are exchanged, never token tensors: exactly two
        ``all_gather`` calls per forward (a fixed-size header per rank with its response
        count, the outcome of its checks and its resolved options; then a (max_count, 5)
        float64 payload of score, KL sum, token count, reward and group id, and DRPO's
        preference as a sixth column when ``preferences`` is given), none in
        backward, and one host sync to read the headers. Loss, objective, kl, penalty and
        metrics are global and identical on every rank; the gradient of each rank's local
        log-probs is scaled by the world size so that the usual DDP/FSDP gradient averaging
        yields exactly the single-process gradient of the concatenated batch. Every rank must
        make the same calls (as with any collective). Errors are collective: a check that
        fails on one rank (shapes, dtypes, devices, option values, values with ``validate``)
        or options that differ across ranks raise the same exception on every rank, naming
        the failing rank, before the payload gather (see ``discoloss.distributed``). Off
        by default.

    Returns:
      :class:`DiscoOutput`. ``metrics`` holds detached 0-d float tensors: ``loss``,
      ``objective``, ``kl``, ``penalty``, ``constraint_active`` (1.0 if kl > delta),
      ``num_groups``, ``groups_with_signal``, ``frac_groups_with_signal``, ``frac_positive``
      (share of positive responses), ``mean_pos_score``, ``mean_neg_score``,
      ``effective_negatives`` (mean over groups with signal of 1/sum q_j^2 for the normalised
      weights q on a group's negatives: ``|N_q|`` for DisCO-b, fewer when DRO focuses on hard
      negatives), ``effective_positives`` (the same on the positives: ``|P_q|`` except for
      DRPO and the two-way and pairwise variants) and ``mean_response_length``.

    Raises:
      ValueError: (or TypeError) naming the argument, for bad shapes, dtypes, devices, options
        and (when ``validate``) values; with ``process_group``, on every rank, naming the
        failing rank.
      RuntimeError: ``process_group`` is given and torch.distributed is not initialised.
    """
    settings = dict(
        score=score,
        objective=objective,
        tau=tau,
        delta=delta,
        beta=beta,
        kl_estimator=kl_estimator,
        threshold=threshold,
        normalize=normalize,
        constraint=constraint,
        cvar_alpha=cvar_alpha,
        margin=margin,
        clip_eps=clip_eps,
        lam=lam,
        max_length=max_length,
    )
    if process_group is None:
        options = resolve_options(settings, multiplier)
        stats = local_stats(
            log_probs, old_log_probs, mask, rewards, group_ids, options, validate, False,
            preferences,
        )  # fmt: skip
        options.check_dtype(stats.scores.dtype)
        checks = stats.checks
        groups_t = tokens_t = None
        if num_groups is not None:
            groups_t, more = check_count("num_groups", num_groups, stats.device)
            checks += more if validate else []
        if num_tokens is not None:
            tokens_t, more = check_count("num_tokens", num_tokens, stats.device)
            checks += more if validate else []
        output, terms = loss_from_stats(
            stats.scores,
            stats.kl_sums,
            stats.lengths,
            rewards,
            group_ids,
            options=options,
            multiplier=multiplier,
            num_groups=groups_t,
            num_tokens=tokens_t,
            preferences=preferences,
        )
        if validate:
            # Counts of a larger batch hold at least what this piece holds (its groups with
            # signal for normalize="valid"); and the results must fit the computation dtype.
            if groups_t is not None:
                present = terms.num_groups if options.normalize == "all" else terms.num_valid
                what = "groups" if options.normalize == "all" else "groups with signal"
                checks.append(check_at_least("num_groups", groups_t, present, what))
            if tokens_t is not None:
                present_tokens = stats.lengths.sum()
                checks.append(check_at_least("num_tokens", tokens_t, present_tokens, "tokens"))
            checks += objective_checks(terms, options, stats.scores.dtype)
            checks += output_checks(output, options)
        raise_if_failed(checks)
        return output
    else:
        from discoloss import distributed

        distributed.require_initialised()
        # No check may raise on one rank only: a rank's failure travels in the header gather,
        # and every rank raises the same error (see discoloss.distributed).
        failure: Exception | None = None
        options_or_none: DiscoOptions | None = None
        stats_or_none: LocalStats | None = None
        try:
            options_or_none = resolve_options(settings, multiplier)
            if num_groups is not None or num_tokens is not None:
                raise ValueError(
                    "num_groups/num_tokens cannot be combined with process_group: the "
                    "cross-rank mode already normalises by the global counts"
                )
            stats_or_none = local_stats(
                log_probs, old_log_probs, mask, rewards, group_ids, options_or_none, validate, True,
                preferences,
            )  # fmt: skip
            options_or_none.check_dtype(torch.float64)  # the gathered scalars are float64
        except (ValueError, TypeError) as exc:
            failure = exc
        header = distributed.build_header(
            count=0 if stats_or_none is None else int(stats_or_none.scores.shape[0]),
            failure=failure,
            options=options_or_none,
            validate=validate,
            multiplier=multiplier,
            checks=() if stats_or_none is None else stats_or_none.checks,
            device=distributed.comm_device(process_group, log_probs),
            preferences=preferences is not None,
        )
        counts = distributed.decide_across_ranks(header, failure, process_group)
        assert options_or_none is not None and stats_or_none is not None  # else raised above
        options, stats = options_or_none, stats_or_none
        scores, kl_sums, lengths, rewards, group_ids, preferences = (
            distributed.gather_response_stats(
                stats.scores, stats.kl_sums, stats.lengths, rewards, group_ids, process_group,
                counts, preferences=preferences,
            )
        )  # fmt: skip
    output, _ = loss_from_stats(
        scores,
        kl_sums,
        lengths,
        rewards,
        group_ids,
        options=options,
        multiplier=multiplier,
        preferences=preferences,
    )
    return output
