r"""The DisCO policy loss as OpenRLHF's actor sees it: one micro-batch at a time.

OpenRLHF's ``ActorPPOTrainer.training_step`` calls ``self.actor_loss_fn(log_probs, old_log_probs,
advantages, action_mask=..., rollout_log_probs=..., dp_size=..., batch_num_tokens=...,
global_batch_size=...)`` once per micro-batch and hands the result to DeepSpeed, which divides
every backward loss by its accumulation steps ``gas`` (1 with ``--train.dynamic_batch_enable``,
where OpenRLHF steps the optimizer itself at the end of each optimizer-step window) and averages
gradients over the ``dp`` data-parallel ranks. An optimizer step (mini-batch) ``W`` thus applies
the gradient of

    L_W = 1/(gas * dp) * sum_{m in W, all ranks} loss_m .

**Planned weights** (``--algo.disco.weights current`` or ``sampling``, :mod:`.minibatch`). The
mini-batch's plan gives each response its weight w_i, the penalty's slope kappa and the
mini-batch's token count N (all ranks); each micro-batch returns

    loss_m = gas * dp * ( -sum_{i in m} w_i s_i + kappa * sum_{i in m} k_i / N )

(``discoloss.accumulation.micro_batch_loss``; k_i the response's summed token KL), so the step
applies exactly sum_i (-w_i grad s_i) + kappa grad KL_W: the gradient of
``disco_loss`` on the whole mini-batch at the parameters the stats were taken at, whatever part
of a question each micro-batch holds. Without an exact slope (``sampling`` with the squared hinge
or the hinge, after the first step) the penalty term is the local form: the micro-batch's token
share times the penalty of its own token-mean KL (below).

**Whole questions per micro-batch** (``--algo.disco.weights micro_batch``). Every micro-batch
holds whole questions (see :mod:`.patch`). With G_W the mini-batch's questions (all of them, or
those with a positive and a negative, per ``normalize``) and T_W its response tokens, both summed
over all ranks, each micro-batch m returns

    loss_m = gas * dp * disco_loss(..., num_groups=G_W, num_tokens=T_W)
           = gas * dp * ( -(1/G_W) sum_{q in m} J_q + (t_m / T_W) * P(KL_m) )

(t_m tokens and KL_m the token-mean KL of micro-batch m, P the penalty of
``--algo.disco.constraint``, by default the squared hinge P(x) = beta/2 [x - delta]_+^2), so the
optimizer step applies exactly

    L_W = -(1/G_W) sum_{q in W} J_q + sum_m (t_m / T_W) * P(KL_m) .

The objective term is exactly the mini-batch objective for every ``objective`` and ``score``
(each J_q only needs its own question's responses, all in one micro-batch; ``clipped_ratio``
takes each response's label from its reward).

**The local penalty.** With KL_W = sum_m (t_m/T_W) KL_m the mini-batch KL, sum_m (t_m/T_W)
P(KL_m) equals P(KL_W) whenever P is linear: ``kl_penalty`` (beta * KL) and ``none``, value and
gradient. The squared hinge and the hinge are convex and non-decreasing, so
``sum_m (t_m/T_W) P(KL_m) >= P(KL_W)`` (Jensen), with equality when ``gas * dp == 1``, when every
micro-batch KL is <= delta (notably the first mini-batch of a step, where theta = theta_old and
KL = 0), when all micro-batch KLs are equal, or (hinge) when all are on the same side of delta.
The squared hinge's gradient is then ``sum_m (t_m/T_W) * beta * [KL_m - delta]_+ * grad KL_m``:
each micro-batch is pulled back in proportion to its own constraint violation.

``lagrangian`` is linear in the KL too: P(KL) = lambda * (KL - delta) with lambda a constant
during the optimizer step, so sum_m (t_m/T_W) * lambda * (KL_m - delta) = lambda * (KL_W - delta)
exactly, in every mode. The loss holds one :class:`~discoloss.constraints.LagrangeMultiplier` per
actor process (step size ``--algo.disco.lagrangian_lr``) and adds up the micro-batches' KL shares
t_m/T_W * KL_m of the current optimizer step on the device (:meth:`DiscoPolicyLoss.take_step_kl`);
after the step, :mod:`.patch` sums them over the DP ranks (KL_W) and calls
``multiplier.update(KL_W, delta=delta)`` once, identically on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from discoloss.adapters.openrlhf.minibatch import MicroBatchPlan
from discoloss.adapters.openrlhf.settings import DiscoSettings
from torch import Tensor, nn

from discoloss import disco_loss
from discoloss.accumulation import micro_batch_loss
from discoloss.constraints import LagrangeMultiplier, constraint_penalty

__all__ = [
    "DiscoMicroBatch",
    "DiscoPolicyLoss",
    "agree_on_failure",
    "policy_loss_outputs",
    "stop_together",
]


@dataclass(frozen=True)
class DiscoMicroBatch:
    """What the loss needs beyond OpenRLHF's arguments, for one micro-batch.

    group_ids: (B,) int64 question id of each response.
    rewards: (B,) reward of each response (positive iff > threshold).
    scale: gas * dp, undoing DeepSpeed's 1/gas loss scaling and its gradient mean over ranks.
    info: the micro-batch's ``experience.info``; DisCO metrics are written into it.
    dp_group, dp_size: the data-parallel group (None: the default one) and its size; with
      ``dp_size > 1`` the ranks agree after the loss's checks (:func:`agree_on_failure`).
    plan: planned weights (``--algo.disco.weights current`` / ``sampling``), or None for whole
      questions per micro-batch (``micro_batch``), which then need ``num_groups``/``num_tokens``.
    rows: with a plan, the indices of the responses that hold a response token (None: all); the
      others carry no weight and are left out of the loss.
    num_groups: G_W, questions of the optimizer step over all ranks (the objective normaliser);
      a 0-d tensor on the loss device or an int (``micro_batch`` only).
    num_tokens: T_W, response tokens of the optimizer step over all ranks (likewise).
    """

    group_ids: Tensor
    rewards: Tensor
    scale: float
    info: dict[str, Any]
    dp_group: Any = None
    dp_size: int = 1
    plan: MicroBatchPlan | None = None
    rows: Tensor | None = None
    num_groups: int | Tensor | None = None
    num_tokens: int | Tensor | None = None


def policy_loss_outputs(loss_fn: nn.Module) -> tuple[bool, ...]:
    """Call OpenRLHF's configured ``PolicyLoss`` once on a tiny input and return, per item of the
    tuple it returns, whether that item is a tensor (True) or None.

    The tuple grew from 4 items (0.11.0: loss, clip_ratio, ppo_kl, vllm_kl) to 5 (0.11.2: ...,
    is_filter_ratio); ``training_step`` unpacks exactly that many, so the DisCO loss returns the
    same shape.
    """
    zeros = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with torch.no_grad():
        out = loss_fn(zeros, zeros.clone(), zeros.clone(), action_mask=mask,
                      rollout_log_probs=zeros.clone())
    if not isinstance(out, tuple) or len(out) < 3:
        raise RuntimeError(
            "discoloss: OpenRLHF's PolicyLoss returned "
            f"{type(out).__name__}{'' if not isinstance(out, tuple) else f' of {len(out)} items'}; "
            "expected a tuple (loss, clip_ratio, ppo_kl, ...). This OpenRLHF version is not "
            "supported."
        )
    return tuple(o is not None for o in out)


def _exchange(failure: Exception | None, *, group: Any, where: str) -> None:
    """Called on every rank once some rank failed: all raise the same RuntimeError."""
    dist = torch.distributed
    rank = dist.get_rank(group=group)
    messages: list[Any] = [None] * dist.get_world_size(group=group)
    dist.all_gather_object(messages, None if failure is None else str(failure), group=group)
    bad = [f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None]
    raise RuntimeError(
        f"discoloss: the DisCO loss failed its checks on data-parallel {'; '.join(bad)}. Every "
        f"rank stops at this {where} (this is rank {rank})"
    ) from failure


def agree_on_failure(failure: Exception | None, *, group: Any, device: torch.device) -> None:
    """Make every data-parallel rank stop at the same micro-batch when one rank's loss failed
    its checks (a non-finite log-prob, old log-prob or reward, an empty response, ...).

    A rank that raised alone would leave the others waiting in the next collective (OpenRLHF's
    metric all-reduce or DeepSpeed's gradient all-reduce) until the process group's timeout.
    Here every rank all-reduces one flag (one 1-element all-reduce and one host read per
    micro-batch, before the backward); if any rank failed, the ranks exchange the messages and
    all raise the same ``RuntimeError``, the failing rank chaining its own error.
    """
    flag = torch.tensor([0.0 if failure is None else 1.0], device=device)
    torch.distributed.all_reduce(flag, group=group)
    if float(flag.item()):
        _exchange(failure, group=group, where="micro-batch, before its backward")


def stop_together(bad: Tensor, explain: Callable[[], Exception], *, group: Any,
                  dp_size: int) -> None:
    """:func:`agree_on_failure` for a failure known as a 0-d device flag (no host sync until
    here): one all-reduce of the flag and one host read; if any rank's flag is set, the ranks
    that hold one build their error with ``explain()`` and every rank raises the same error.
    With ``dp_size == 1``: raise ``explain()`` if ``bad``."""
    if dp_size <= 1:
        if bool(bad):
            raise explain()
        return
    flag = bad.reshape(1).to(torch.float32)
    torch.distributed.all_reduce(flag, group=group)
    if float(flag.item()):
        _exchange(explain() if bool(bad) else None, group=group,
                  where="optimizer step, before its first backward")


class DiscoPolicyLoss(nn.Module):
    """Drop-in replacement for OpenRLHF's ``PolicyLoss`` computing the scaled DisCO loss.

    The trainer binds a :class:`DiscoMicroBatch` before each micro-batch (:meth:`bind`): with a
    plan, the micro-batch's surrogate under the mini-batch's weights; without, DisCO on the
    micro-batch's whole questions (see the module docstring). The ``advantages`` OpenRLHF passes
    are ignored (DisCO builds its signal from the rewards and question ids). Returns a tuple
    shaped like the wrapped ``PolicyLoss``'s:
    ``(loss, clip_ratio=0, ppo_kl=KL_m, <None or 0 for the rest>)``.

    With ``constraint="lagrangian"`` it owns :attr:`multiplier` (a
    :class:`~discoloss.constraints.LagrangeMultiplier` with ``lr=settings.lagrangian_lr``; the
    loss uses its current value) and accumulates the step's KL shares for :meth:`take_step_kl`.
    """

    def __init__(self, settings: DiscoSettings, outputs: tuple[bool, ...]) -> None:
        super().__init__()
        self.settings = settings
        self.outputs = outputs
        self._batch: DiscoMicroBatch | None = None
        self.multiplier: LagrangeMultiplier | None = (
            LagrangeMultiplier(lr=settings.lagrangian_lr)
            if settings.constraint == "lagrangian" else None
        )
        self._step_kl: Tensor | None = None

    def bind(self, batch: DiscoMicroBatch) -> None:
        self._batch = batch

    def unbind(self) -> None:
        self._batch = None

    def take_step_kl(self) -> Tensor | None:
        """This rank's share of the optimizer step's KL, sum_m (t_m / T_W) * KL_m over the
        micro-batches computed since the last call (0-d tensor on the loss device, detached), and
        reset; None if no micro-batch ran."""
        kl, self._step_kl = self._step_kl, None
        return kl

    def forward(
        self,
        log_probs: Tensor,
        old_log_probs: Tensor,
        advantages: Tensor | None = None,
        action_mask: Tensor | None = None,
        rollout_log_probs: Tensor | None = None,
        dp_size: int = 1,
        batch_num_tokens: Any = None,
        global_batch_size: Any = None,
    ) -> tuple[Tensor | None, ...]:
        batch = self._batch
        if batch is None:
            raise RuntimeError(
                "discoloss: the DisCO loss was called without question ids and rewards; "
                "ActorPPOTrainer.training_step must run through the discoloss adapter"
            )
        if action_mask is None:
            raise ValueError("action_mask: required by the DisCO loss")
        if batch.plan is None:
            loss, kl, metrics = self._whole_questions(batch, log_probs, old_log_probs, action_mask)
        else:
            loss, kl, metrics = self._planned(batch, batch.plan, log_probs, old_log_probs,
                                              action_mask)
        for key, value in metrics.items():
            batch.info[f"disco/{key}"] = value
        if self.multiplier is not None:
            self._step_kl = kl if self._step_kl is None else self._step_kl + kl
            batch.info["disco/lagrange_multiplier"] = self.multiplier.value.to(
                device=kl.device, dtype=torch.float32)
        extras = [torch.zeros_like(kl) if is_tensor else None for is_tensor in self.outputs[3:]]
        return (loss, torch.zeros_like(kl), kl, *extras)

    def _checked(self, batch: DiscoMicroBatch, device: torch.device, compute: Callable[[], Any]
                 ) -> Any:
        """Run ``compute`` (the core's checks of this rank's inputs inside); with several
        ranks, every rank stops at this micro-batch if one failed."""
        failure: Exception | None = None
        out = None
        try:
            out = compute()
        except (ValueError, TypeError) as error:
            failure = error
        if batch.dp_size > 1:
            agree_on_failure(failure, group=batch.dp_group, device=device)
        elif failure is not None:
            raise failure
        return out

    def _whole_questions(self, batch: DiscoMicroBatch, log_probs: Tensor, old_log_probs: Tensor,
                         action_mask: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``--algo.disco.weights micro_batch``: DisCO on this micro-batch's whole questions,
        normalised by the optimizer step's G_W and T_W. Returns (loss, KL share, metrics)."""
        out = self._checked(batch, log_probs.device, lambda: disco_loss(
            log_probs,
            old_log_probs,
            action_mask,
            batch.rewards,
            batch.group_ids,
            num_groups=batch.num_groups,
            num_tokens=batch.num_tokens,
            multiplier=self.multiplier,
            **self.settings.loss_kwargs(),
        ))
        return batch.scale * out.loss, out.kl.detach(), dict(out.metrics)

    def _planned(self, batch: DiscoMicroBatch, plan: MicroBatchPlan, log_probs: Tensor,
                 old_log_probs: Tensor, action_mask: Tensor
                 ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Planned weights: the micro-batch's surrogate ``-sum w_i s_i + kappa * sum k_i / N``
        (``micro_batch_loss``) on the rows with a response token. Returns (loss, KL share,
        metrics): the plan's mini-batch metrics; where the plan's stats were not taken at the
        current parameters (``sampling`` after the first step), ``kl``, ``penalty``,
        ``constraint_active`` and ``loss`` are this micro-batch's own, whose token-weighted
        means over the step (as OpenRLHF averages 0-d metrics) are the step's KL and the
        penalty it applied."""
        s = self.settings
        rewards = batch.rewards.reshape(-1)
        weights = plan.weights
        rows = batch.rows
        if rows is not None:
            rows = rows.to(log_probs.device)
            log_probs, old_log_probs, action_mask, rewards, weights = (
                t[rows] for t in (log_probs, old_log_probs, action_mask, rewards, weights))
        metrics = dict(plan.metrics)
        if log_probs.shape[0] == 0:  # only responses without a response token
            zero = (log_probs * 0.0).sum()
            return batch.scale * zero, zero.detach(), metrics
        piece = self._checked(batch, log_probs.device, lambda: micro_batch_loss(
            log_probs,
            old_log_probs,
            action_mask,
            weights,
            num_tokens=plan.num_tokens,
            kl_coef=plan.kl_coef,
            score=s.score,
            kl_estimator=s.kl_estimator,
            delta=s.delta,
            beta=s.beta,
            constraint=s.constraint,
            multiplier=self.multiplier,
            rewards=rewards,
            threshold=s.threshold,
            clip_eps=s.clip_eps,
        ))
        if not plan.current:
            stats = piece.stats
            own_kl = stats.kl_sums.sum() / stats.lengths.sum().clamp_min(1.0)
            penalty = constraint_penalty(own_kl, constraint=s.constraint, delta=s.delta,
                                         beta=s.beta, multiplier=self.multiplier)
            metrics.update(kl=own_kl, penalty=penalty.detach(),
                           constraint_active=(own_kl > s.delta).to(own_kl.dtype),
                           loss=(penalty - metrics["objective"].to(penalty.dtype)).detach())
        return batch.scale * piece.loss, piece.kl.detach(), metrics
