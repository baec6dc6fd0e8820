r"""The DisCO policy loss as verl calls it: once per micro-batch, inside ``ppo_loss``.

**weights=current / sampling** (:mod:`.planning`): inside the adapter's wrapper of verl's
``TrainingWorker.train_batch`` the mini-batch has been planned before its first micro-batch:
each row's ``advantages`` hold its position in the plan, and the loss returns
``dp * (-sum_i w_i s_i + kappa * (its KL share))`` with the rows' weights
(:func:`discoloss.adapters.verl.planning.micro_batch_loss`): any micro-batch layout is exact,
questions may be split across micro-batches and ranks. The mini-batch's metrics are computed
once by the wrapper; the loss returns only ``multiplier`` (``constraint=lagrangian``).
Without a plan (the loss called outside a training pass, e.g. directly) the loss works as
with ``weights=micro_batch``, below.

**weights=micro_batch** (whole questions per micro-batch). How verl 0.9 combines micro-batch
losses (``verl/workers/utils/losses.py::ppo_loss`` and the
engines' ``forward_backward_batch``): every micro-batch loss is back-propagated at once, the
gradients accumulate over a rank's micro-batches and are *averaged* over the ``dp_size``
data-parallel ranks (FSDP/DDP), and ``ppo_loss`` never rescales what the policy loss returns.
Before each call it fills ``config.global_batch_info`` with ``dp_size``, ``batch_num_tokens``
(response tokens of the whole mini-batch, all-reduced over DP) and ``global_batch_size``
(responses of the whole mini-batch, ``ppo_mini_batch_size * rollout.n``). So the loss of each
micro-batch m must be ``dp_size`` times its additive share of the mini-batch loss.

With G = global_batch_size / rollout.n questions and N = batch_num_tokens tokens in the
mini-batch, micro-batch m (questions Q_m, all whole; N_m tokens; KL_m its token-mean KL) returns

.. math::

    \ell_m = \mathrm{dp}\Big[-\frac{1}{G}\sum_{q\in Q_m} J_q
             + \frac{N_m}{N}\,\frac{\beta}{2}\,[KL_m - \delta]_+^2\Big]

Objective: the pieces add up exactly, value and gradient, to -J of :func:`discoloss.disco_loss`
on the mini-batch (its J_q needs only question q's responses, which are whole in m).

Penalty P(KL) (``constraint``, :mod:`discoloss.constraints`): no micro-batch can know the
mini-batch KL, so each applies the penalty to its *own* token-mean KL, weighted by its share of
tokens: sum_m (N_m/N) P(KL_m). For the constraints that are linear in the KL (``kl_penalty``:
beta KL; ``none``: 0) this is exactly P(KL) of the mini-batch, value and gradient, since
sum_m (N_m/N) KL_m = KL. For ``squared_hinge`` (default) and ``hinge`` it is the local
approximation: the value is >= P(KL) (Jensen) and the gradient is
sum_m P'(KL_m) grad(N_m KL_m) / N, i.e. each token's KL gradient is scaled by its micro-batch's
coefficient instead of the mini-batch's. Both equal the mini-batch penalty exactly when every
micro-batch's KL is <= delta (then all are 0, as on the first mini-batch of each step, where
pi_theta = pi_old) or when all micro-batches have the same KL. The KL itself
(``actor/disco/kl``) is exact. ``lagrangian`` (lambda (KL - delta), lambda a constant within an
optimizer step) is linear in the KL, hence exact too; its multiplier is per-process training
state updated once per optimizer step with the global KL outside the loss
(:mod:`discoloss.adapters.verl.lagrangian`); the loss only reads lambda and records its
detached KL share.

Objective variants (``objective``: disco, disco_b, cvar, disco_2way, auc_sq_hinge,
auc_logistic) each need only one question's responses, so they are exact like DisCO's. The
``clipped_ratio`` score needs each response's label: it is the sign of the response's code.

Metrics: verl averages a policy loss's metrics over all (rank, micro-batch) pairs of a
mini-batch (``AggregationType.MEAN``). Each additive metric is therefore reported as
``K * share`` with K = global_batch_size / rows = the number of such pairs, which makes the
logged value the mini-batch value exactly when every micro-batch has the same number of rows
(fixed ``ppo_micro_batch_size_per_gpu``); under dynamic batch sizes it is a row-weighted
estimate. ``actor/pg_loss`` (summed by verl) is the mini-batch loss in both cases.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import Tensor

from discoloss import disco_loss

from . import faults, lagrangian, planning
from ._options import (
    DiscoConfigError,
    DiscoLayoutError,
    VerlDiscoOptions,
    check_for_verl,
    options_from_mapping,
)
from .encoding import decode_codes

__all__ = ["DiscoLayoutError", "compute_policy_loss_disco", "options_of"]

METRIC_PREFIX = "actor/disco/"


def options_of(config: Any) -> VerlDiscoOptions:
    """The validated DisCO options of an ``ActorConfig`` (or of its ``policy_loss`` node)."""
    node = getattr(config, "policy_loss", None)
    if node is None and hasattr(config, "get"):
        node = config.get("policy_loss", None)
    return check_for_verl(options_from_mapping(node if node is not None else {}))


def _global_info(config: Any) -> tuple[int, int | None, int | None]:
    info = getattr(config, "global_batch_info", None) or {}
    dp = info.get("dp_size", 1) or 1
    return int(dp), info.get("batch_num_tokens"), info.get("global_batch_size")


def compute_policy_loss_disco(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """verl policy loss ``disco`` (register name); signature of verl's ``PolicyLossFn``.

    Args:
      old_log_prob, log_prob: (B, T) token log-probs (sampling / current policy).
      advantages: (B, T) float32 DisCO codes written by the ``disco`` advantage estimator
        (:mod:`discoloss.adapters.verl.encoding`).
      response_mask: (B, T) response tokens.
      loss_agg_mode: ignored; DisCO normalises by questions and tokens of the mini-batch (it
        still governs verl's own entropy and KL-loss terms).
      config: verl's ``ActorConfig`` (``policy_loss`` holds the DisCO options, ``rollout_n``,
        ``global_batch_info``).
      rollout_is_weights: must be None (DisCO has no importance-weight correction).

    Returns:
      ``(loss, metrics)``: the micro-batch loss l_m of the module docstring and detached 0-d
      metrics named ``actor/disco/*``.
    """
    if config is None:
        raise DiscoConfigError("the disco policy loss needs verl's actor config (config=None)")
    opts = options_of(config)
    if rollout_is_weights is not None:
        raise DiscoConfigError(
            "rollout_is_weights: DisCO has no importance-weight correction; disable "
            "algorithm.rollout_correction.rollout_is (bypass mode, where old_log_prob is the "
            "rollout log-prob, is fine)"
        )
    if advantages.dtype not in (torch.float32, torch.float64):
        raise DiscoConfigError(
            f"advantages: DisCO codes need float32 or float64 advantages, got {advantages.dtype}"
        )
    if not (log_prob.shape == old_log_prob.shape == advantages.shape == response_mask.shape):
        raise DiscoConfigError(
            "log_prob, old_log_prob, advantages, response_mask: shapes differ: "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}, "
            f"{tuple(response_mask.shape)}"
        )
    n = int(getattr(config, "rollout_n", 0) or 0)
    if n < 1:
        raise DiscoConfigError(f"actor_rollout_ref.actor.rollout_n: expected >= 1, got {n}")
    dp, num_tokens, global_bsz = _global_info(config)
    rows = log_prob.shape[0]
    mask = response_mask.bool()
    if rows == 0:
        zero = log_prob.sum() * 0.0
        return zero, {}

    plan = planning.active() if opts.planned else None
    if plan is not None:
        return _planned_loss(plan, opts, log_prob, old_log_prob, advantages, mask, dp)

    dec = decode_codes(advantages, mask, check=opts.validate)
    f = torch.float32
    n_loc = dec.lengths.sum().to(f)

    # Dense question ids of this micro-batch (0 collects the ignored rows) and their counts.
    coded = dec.group > 0
    g_ids = torch.where(coded, dec.group, 0)
    sorted_g, order = torch.sort(g_ids)
    new = torch.ones_like(sorted_g, dtype=torch.bool)
    new[1:] = sorted_g[1:] != sorted_g[:-1]
    dense = torch.empty_like(sorted_g).scatter_(0, order, torch.cumsum(new, 0) - 1)
    counts = torch.zeros(rows, dtype=torch.int64, device=dense.device).index_add_(
        0, dense, torch.ones_like(dense)
    )
    local_questions = (new.sum() - (~coded).any().to(torch.int64)).to(f)

    if global_bsz is None:  # no global batch info: this micro-batch is the whole batch
        questions: int | Tensor = local_questions.clamp_min(1.0).to(torch.int64)
        k_pairs = 1.0
    else:
        if global_bsz % n:
            raise DiscoConfigError(
                f"global_batch_size={global_bsz} is not a multiple of rollout_n={n}: the "
                "mini-batch would not hold whole questions"
            )
        questions = global_bsz // n
        k_pairs = global_bsz / rows
    tokens: int | Tensor = (
        n_loc.clamp_min(1.0).to(torch.int64) if num_tokens is None else max(int(num_tokens), 1)
    )

    # The ignored rows (id 0, no tokens, labelled negative) form a question without signal.
    # Labels come from the codes' sign (the estimator applied the user's threshold), so the
    # core sees 0/1 rewards with threshold 0.5; clipped_ratio picks its clip side from them.
    core = dataclasses.replace(opts.disco, threshold=0.5)
    multiplier = (
        lagrangian.multiplier(lr=opts.lagrangian_lr) if core.constraint == "lagrangian" else None
    )
    out = disco_loss(
        log_prob,
        old_log_prob,
        mask,
        (dec.positive & coded).to(f),
        g_ids,
        **core.as_dict(),
        validate=False,
        num_groups=questions,
        num_tokens=tokens,
        multiplier=multiplier,
    )
    loss = dp * out.loss
    if multiplier is not None:
        lagrangian.record_kl_share(out.kl)

    # Whole-question check: every response of a question flagged regular (rollout.n responses)
    # must be in this micro-batch.
    split_rows = coded & ~dec.irregular & (counts[dense] != n)
    n_split = split_rows.sum()

    if opts.validate:
        finite = torch.isfinite(out.loss.detach()) & torch.isfinite(out.kl.detach())
        flags = torch.stack([dec.consistent, n_split == 0, finite, torch.ones_like(finite)])
        if faults.is_deferring():
            # Inside a verl worker: no raise on this rank alone (the other ranks would wait in
            # the gradient reduction). A failed check makes this loss NaN, so that verl skips
            # the step on every rank, and the worker wrapper raises on every rank afterwards.
            faults.record(flags, lambda: _fault_message(flags, dec, split_rows, n, rows))
            loss = _poisoned(loss, log_prob, mask, bad=~flags.all())
        else:
            flags = flags.cpu()  # the one host sync (direct call, one process)
            if not bool(flags.all()):
                raise DiscoLayoutError(_fault_message(flags, dec, split_rows, n, rows))
    else:
        # Sync-free: a split question poisons this micro-batch's gradient with NaN, so verl's
        # non-finite grad-norm check skips the update instead of training on a broken group.
        loss = _poisoned(loss, log_prob, mask, bad=n_split > 0)

    with torch.no_grad():
        pos = dec.positive & coded
        n_pos_g = torch.zeros(rows, dtype=f, device=dense.device).index_add_(0, dense, pos.to(f))
        n_neg_g = torch.zeros(rows, dtype=f, device=dense.device).index_add_(
            0, dense, (coded & ~dec.positive).to(f)
        )
        with_signal = ((n_pos_g > 0) & (n_neg_g > 0)).sum().to(f)
        local_kl = out.kl.detach().to(f) * (tokens / n_loc.clamp_min(1.0))
        total = float(global_bsz) if global_bsz is not None else float(rows)
        metrics = {
            "objective": k_pairs * out.objective.detach(),
            "kl": k_pairs * out.kl.detach(),
            "penalty": k_pairs * out.penalty.detach(),
            "num_groups": k_pairs * local_questions,
            "groups_with_signal": k_pairs * with_signal,
            "frac_groups_with_signal": k_pairs * with_signal / questions,
            "frac_positive": k_pairs * pos.sum().to(f) / total,
            "constraint_active": (local_kl > core.delta).to(f),
            "split_responses": k_pairs * n_split.to(f),
        }
        if multiplier is not None:
            metrics["multiplier"] = multiplier.value.detach().to(device=out.kl.device, dtype=f)
    return loss, {METRIC_PREFIX + k: v.detach() for k, v in metrics.items()}


def _planned_loss(
    plan: planning.Plan,
    opts: VerlDiscoOptions,
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    mask: Tensor,
    dp: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The micro-batch's share of its mini-batch's planned loss (weights=current/sampling)."""
    loss, out, matches = planning.micro_batch_loss(
        plan, log_prob, old_log_prob, mask, advantages, dp_size=dp
    )
    if opts.validate:
        finite = torch.isfinite(out.loss.detach())
        ok = torch.ones_like(finite)
        flags = torch.stack([ok, ok, finite, matches.to(finite.device)])
        if faults.is_deferring():
            faults.record(flags, lambda: _fault_message(flags, None, None, 0, mask.shape[0]))
            loss = _poisoned(loss, log_prob, mask, bad=~flags.all())
        else:
            flags = flags.cpu()  # the one host sync (direct call, one process)
            if not bool(flags.all()):
                raise DiscoLayoutError(_fault_message(flags, None, None, 0, mask.shape[0]))
    else:
        loss = _poisoned(loss, log_prob, mask, bad=~matches.to(loss.device))
    metrics: dict[str, Tensor] = {}
    if plan.multiplier is not None:
        metrics["multiplier"] = plan.multiplier.value.detach().to(
            device=log_prob.device, dtype=torch.float32
        )
    return loss, {METRIC_PREFIX + k: v for k, v in metrics.items()}


def _poisoned(loss: Tensor, log_prob: Tensor, mask: Tensor, *, bad: Tensor) -> Tensor:
    """``loss`` unchanged, or NaN with a NaN gradient at every response token when ``bad``
    (0-d bool tensor, no host sync). Scaling the loss by NaN is not enough: where the loss does
    not depend on a token (a question without signal, a masked-out penalty) the NaN would be
    masked away in the backward pass and verl would apply a finite gradient."""
    coef = torch.where(bad, math.nan, 0.0).to(device=loss.device, dtype=loss.dtype)
    return loss + coef * torch.where(mask, log_prob, 0.0).sum().to(loss.dtype)


def _fault_message(
    flags: Tensor, dec: Any, split_rows: Tensor | None, n: int, rows: int
) -> str | None:
    consistent, whole, finite, matches = (bool(x) for x in flags.tolist())
    if not consistent:
        return (
            "advantages do not carry DisCO codes (each response's label and question, written "
            "by the disco advantage estimator): set algorithm.adv_estimator=disco together with "
            "actor_rollout_ref.actor.policy_loss.loss_mode=disco, and do not post-process the "
            "advantages"
        )
    if not whole:
        assert split_rows is not None
        first = int(split_rows.nonzero()[0, 0])
        count = int((dec.group == dec.group[first]).sum())
        return (
            f"a question reached the DisCO loss split: micro-batch row {first} belongs to a "
            f"question with {count} of its {n} (rollout.n) responses in this micro-batch of "
            f"{rows} rows. DisCO needs every question whole in one micro-batch. Keep "
            "actor.shuffle=false, ppo_micro_batch_size_per_gpu a multiple of rollout.n, and let "
            "the adapter balance the batch (see the verl guide, layout rules), or use "
            "actor_rollout_ref.actor.policy_loss.weights=current, which needs none of this"
        )
    if not finite:
        return "log_prob/old_log_prob: non-finite value at a response token of this micro-batch"
    if not matches:
        return (
            f"a row of this micro-batch of {rows} rows does not carry a position in the "
            "mini-batch's plan, or its number of response tokens differs from the plan's (the "
            "advantages were changed after the plan, or the plan belongs to another mini-batch)"
        )
    return None
