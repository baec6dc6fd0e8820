r"""`DisCOTrainer`: TRL's `GRPOTrainer` with the DisCO loss, correct under TRL's batching.

How TRL batches (trl 1.16, read from its source): per process, the dataloader yields a *local
generation batch* of ``per_device_train_batch_size * steps_per_generation`` rows; the prompts
of the *global* generation batch (all processes, in process order) come in blocks of
``num_generations`` consecutive rows, and a block may straddle two processes. After
generation, each process shuffles its rows and cuts them into ``steps_per_generation``
micro-batches, reused ``num_iterations`` times; an optimizer step accumulates
``gradient_accumulation_steps`` micro-batches and DDP averages the gradients of the processes.
So a prompt's completions are spread across processes and micro-batches, and there are
``k * num_iterations`` optimizer steps per generation batch, with
``k = steps_per_generation / gradient_accumulation_steps``.

DisCO needs whole prompts (groups) for its objective, but its gradient is a weighted sum of
per-completion score gradients plus the penalty's slope times the KL's gradient (DESIGN.md
section 2, :mod:`discoloss.accumulation`):

.. math::

    \nabla\mathcal{L} = -\sum_i w_i \nabla s_i + \kappa\,\nabla\widehat{KL},\qquad
    w_i = \partial J / \partial s_i,\quad \kappa = P'(\widehat{KL})

**The mini-batch is the generation batch.** The objective and the KL constraint are those of
the global generation batch: every process's completions, whole prompts, grouped as TRL groups
them (group id ``global_row // num_generations``). Each of the k optimizer steps of a pass
applies k times its own completions' share of that batch's gradient: each completion is in one
step, so under TRL's random shuffle a step is an unbiased estimate of the batch's gradient,
and with TRL's default ``k = 1`` the step *is* the batch. Planning over an optimizer step's
own completions instead would cut prompts apart (TRL shuffles before it splits): a prompt
whose positives and negatives land in different steps gives no signal in either.

**Planning.** Each process computes per-completion statistics of its rows (score, KL sum,
token count; :func:`discoloss.accumulation.response_stats`), all processes all-gather them
with the rewards and group ids (5 float64 per completion, never a token tensor) and check
them, and every process runs :func:`discoloss.accumulation.plan_minibatch` on the whole
generation batch and keeps the weights of its own rows, which travel with the rows through
TRL's shuffle and split. (The adapter gathers itself rather than through ``plan_minibatch``'s
``process_group``: completions that no reward function could score take no part in the
objective but their tokens count in the KL.)

**Where the statistics come from** (``DisCOConfig.weights``):

``"current"`` (default)
    Before each optimizer step, statistics at the step's current parameters, from one no-grad
    forward pass over this process's local generation batch (all its micro-batches). Skipped
    at the first optimizer step of a generation batch: the parameters are still those that
    generated it, and its old log-probs (always computed by the trainer's own model at
    generation, :meth:`DisCOTrainer._sampling_log_probs` when TRL skips them) give the
    statistics for free. Each micro-batch backpropagates

    .. math::

        \ell_{mb} = P\,k\Big(-\sum_{i\in mb} w_i s_i
            + \kappa\,\frac{\sum_{i\in mb} k_i}{N_{gen}}\Big)

    with P the number of processes (DDP averages gradients), w and
    ``kappa = constraint_slope(KL_gen)`` from the plan at the current parameters, k_i a
    completion's KL sum and N_gen the generation batch's completion tokens. The gradient an
    optimizer step applies is exactly k times the gradient of ``disco_loss`` on the generation
    batch at the step's parameters, restricted to the step's completions; with ``k = 1``, the
    gradient of ``disco_loss`` on the generation batch, squared hinge included (no local
    approximation). The Lagrangian multiplier is updated with the generation batch's exact KL.
    Cost: one no-grad forward over k times the step's completions, in every optimizer step but
    the first of each generation batch.

``"sampling"``
    Statistics at the sampling policy only (the plan made at generation), no extra pass. The
    weights are exact for ``objective="disco_b"`` (they do not depend on the scores) and at the
    first optimizer step of each generation batch (theta = theta_old); afterwards they are a
    linearisation whose error the KL constraint bounds. The penalty's slope at the sampling
    policy would be that of KL = 0, so each micro-batch differentiates instead its token share
    of the penalty of its *own* KL (``micro_batch_loss(kl_coef=None)``):

    .. math::

        \ell_{mb} = P\Big(-k\sum_{i\in mb} w_i s_i
            + \frac{n_{mb}}{N}\,\frac{\beta}{2}\big[KL_{mb} - \delta\big]_+^2\Big)

    with n_mb and KL_mb the micro-batch's token count and token-mean KL and N the optimizer
    step's completion tokens (counted exactly after TRL's shuffle with one all-gather per
    generation batch). Summed over the step this is ``sum_mb (n_mb/N) pen(KL_mb) >= pen(KL)``
    (Jensen): an upper bound of the step's exact penalty, equal to it when the micro-batches'
    KLs are equal, and exactly 0 (with 0 gradient) at the first step of a generation batch.

``"micro_batch"``
    Refused by :class:`DisCOConfig`: TRL shuffles completions across micro-batches, so no
    micro-batch holds whole prompts.

Eval batches are neither split nor accumulated and are scored at the policy that sampled them:
the generation's plan is exact for them in either mode.

**Metrics** (TRL style, averaged over the logging window; every process computes the same
values from per-completion scalars gathered outside the gradient): ``disco/objective``,
``disco/kl``, ``disco/penalty``, ``disco/constraint_active``,
``disco/frac_groups_with_signal``, ``disco/frac_positive``, ``disco/mean_pos_score``,
``disco/mean_neg_score``, ``disco/effective_negatives``, ``disco/multiplier`` (Lagrangian),
``entropy`` (token mean over the step's completions), and ``kl`` (reference-model KL, only
with ``allow_reference_kl``). With ``weights="current"`` the DisCO values are the plan's: the
generation batch at the step's parameters, whose gradient the step applies. With
``weights="sampling"`` they are those of the step's own completions at the step's parameters
(the generation batch when k = 1), plus ``disco/penalty_local`` (what was differentiated next
to the exact ``disco/penalty``). TRL's own ``loss`` is the value of the surrogate above, not
the DisCO loss: read ``disco/objective`` and ``disco/penalty``.

Completions for which every reward function returned None get weight 0 and are left out of
the groups (their tokens still count in the KL constraint).

**A bad value on one process** (a non-finite log-prob, a non-finite reward, a completion
without completion token) stops the job on every process with the same ``ValueError``, never
one process raising while the others wait in a collective: the checks run on gathered values
that every process holds alike: the sampling statistics and the rewards right after the
generation batch's gather, the current-parameter statistics of ``weights="current"`` right
after the planning pass's gather (before the step's first backward), and the training
forward's statistics in the metrics gather at the end of each optimizer step, after DDP's
gradient all-reduce and before the optimizer step (so a non-finite gradient is never applied).
"""

from __future__ import annotations

import os
import textwrap
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from discoloss.accumulation import ResponseStats, micro_batch_loss, plan_minibatch, response_stats
from discoloss.constraints import LagrangeMultiplier, constraint_penalty, constraint_slope
from discoloss.loss import DiscoOutput

from .config import DisCOConfig

__all__ = ["DisCOTrainer"]

#: Optional model inputs that TRL carries in a batch and forwards to the model.
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)

#: Columns of the per-completion metric rows gathered once per optimizer step.
_ROW_COLUMNS = ("score", "kl_sum", "length", "reward", "group_id")


def _loss_mask(inputs: dict[str, Any]) -> Tensor:
    mask = inputs["completion_mask"]
    tool_mask = inputs.get("tool_mask")
    return mask if tool_mask is None else mask * tool_mask


def _raise_on_every_process(bad: Tensor, rows_per_process: int, message: str) -> None:
    """Raise ``message`` (formatted with the first bad row's place) if any of the gathered
    per-completion flags ``bad`` is set. Every process holds the same gathered tensors, so
    every process raises the same error (one host read), and no process is left waiting in a
    collective."""
    if not bool(bad.any()):
        return
    row = int(bad.nonzero()[0, 0])
    where = f"process {row // rows_per_process}, completion {row % rows_per_process}"
    raise ValueError("DisCOTrainer: " + message.format(where=where))


def _check_gathered_stats(
    values: Tensor, lengths: Tensor, rows_per_process: int, what: str
) -> None:
    """Non-finite values and empty completions among gathered per-completion scalars."""
    _raise_on_every_process(
        ~torch.isfinite(values), rows_per_process, what + " at a completion token of {where}"
    )
    _raise_on_every_process(
        lengths == 0,
        rows_per_process,
        "the completion at {where} has no completion token (completion_mask * tool_mask is "
        "all 0); DisCO scores are token means over a non-empty completion",
    )


class GenerationPlan(NamedTuple):
    """DisCO's plan of one generation batch (every process's completions) at the parameters its
    per-completion statistics were taken at.

    weights: (b,) dJ/ds of this process's completions, in the order the statistics were given.
    kl_coef: 0-d slope of the penalty at the generation batch's KL (``constraint_slope``).
    num_tokens: 0-d number of completion tokens of the generation batch, all processes.
    kl: 0-d token-mean KL of the generation batch (every completion, scorable or not).
    output: :class:`~discoloss.DiscoOutput` of the scorable completions (None when no
      completion could be scored), for the metrics.
    """

    weights: Tensor
    kl_coef: Tensor
    num_tokens: Tensor
    kl: Tensor
    output: DiscoOutput | None


#: File holding the KL multiplier of ``constraint="lagrangian"`` inside a checkpoint folder.
MULTIPLIER_FILE = "disco_multiplier.pt"


class DisCOTrainer(GRPOTrainer):
    """A ``GRPOTrainer`` whose loss is DisCO (arXiv 2505.12366).

    Switching a TRL script from GRPO is two renamed classes: ``GRPOConfig`` -> ``DisCOConfig``
    and ``GRPOTrainer`` -> ``DisCOTrainer``. Generation, rewards, batching, logging and
    checkpointing are TRL's; the loss, the per-completion weights and the metrics are
    discoloss's. See the module docstring for what is exact and what is approximated.

    Args: as ``GRPOTrainer``; ``args`` must be a :class:`DisCOConfig` (or None for defaults).
    """

    _tag_names = ["trl", "disco"]
    _name = "DisCO"
    _paper = {
        "title": "DisCO: Reinforcing Large Reasoning Models with Discriminative Constrained "
        "Optimization",
        "id": "2505.12366",
        "citation": textwrap.dedent("""\
            @article{li2025disco,
                title        = {{DisCO: Reinforcing Large Reasoning Models with
                                 Discriminative Constrained Optimization}},
                author       = {Gang Li and Ming Lin and Tomer Galanti and Zhengzhong Tu
                                and Tianbao Yang},
                year         = 2025,
                eprint       = {arXiv:2505.12366},
            }"""),
    }

    def __init__(
        self,
        model: Any,
        reward_funcs: Any = None,
        args: DisCOConfig | None = None,
        *rest: Any,
        **kwargs: Any,
    ) -> None:
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = DisCOConfig(f"{str(name).split('/')[-1] or 'model'}-DisCO")
        if not isinstance(args, DisCOConfig):
            raise TypeError(
                f"args must be a DisCOConfig, got {type(args).__name__}: build it with "
                "DisCOConfig(...) (a GRPOConfig plus the DisCO options)"
            )
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        self._disco_rewards_per_func: Tensor | None = None
        self._disco_rows: list[Tensor] = []
        self._disco_sums: list[Tensor] = []
        #: The plan the current optimizer step applies (``weights="current"``).
        self._disco_plan: GenerationPlan | None = None
        #: True from a generation until the first optimizer step on it has been planned: the
        #: parameters are still those that sampled it (and computed its old log-probs).
        self._disco_at_sampling_policy = False
        #: The KL multiplier of ``constraint="lagrangian"`` (None otherwise), updated after
        #: every optimizer step and saved in checkpoints through a stateful callback.
        self.disco_multiplier: LagrangeMultiplier | None = None
        if args.constraint == "lagrangian":
            self.disco_multiplier = LagrangeMultiplier(lr=args.lagrangian_lr)

    @property
    def _disco_args(self) -> DisCOConfig:
        """``self.args``, typed (``__init__`` accepts only a :class:`DisCOConfig`)."""
        assert isinstance(self.args, DisCOConfig)
        return self.args

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.disco_multiplier is not None and self.args.should_save:
            folder = os.path.join(
                self._get_output_dir(trial=trial),
                f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}",
            )
            torch.save(self.disco_multiplier.state_dict(), os.path.join(folder, MULTIPLIER_FILE))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        # Called by Trainer.train with the resolved checkpoint folder when resuming.
        super()._load_rng_state(checkpoint)
        if self.disco_multiplier is not None and checkpoint is not None:
            path = os.path.join(checkpoint, MULTIPLIER_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} is missing: the checkpoint was not written by a DisCOTrainer with "
                    'constraint="lagrangian", so the KL multiplier cannot be restored'
                )
            self.disco_multiplier.load_state_dict(torch.load(path, weights_only=True))

    def _stats_options(self) -> dict[str, Any]:
        args = self._disco_args
        return {
            "score": args.score,
            "kl_estimator": args.kl_estimator,
            "threshold": args.threshold,
            "clip_eps": args.clip_eps,
        }

    def _plan_options(self) -> dict[str, Any]:
        args = self._disco_args
        return {
            "score": args.score,
            "objective": args.objective,
            "tau": args.tau,
            "delta": args.disco_delta,
            "beta": args.disco_beta,
            "threshold": args.threshold,
            "normalize": args.normalize,
            "constraint": args.constraint,
            "multiplier": self.disco_multiplier,
            "cvar_alpha": args.cvar_alpha,
            "margin": args.margin,
        }

    # ------------------------------------------------------------------ generation batch

    def _calculate_rewards(self, inputs: Any, prompts: Any, completions: Any, ids: Any) -> Tensor:
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, ids)
        self._disco_rewards_per_func = rewards_per_func  # gathered over processes, process order
        return rewards_per_func

    def _forward_kwargs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return {key: inputs.get(key) for key in _FORWARD_KEYS}

    def _no_grad_log_probs(self, batch: dict[str, Any], batch_size: int) -> Tensor:
        """Token log-probs of a batch's completions under the current parameters, no grad."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
        ):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                input_ids,
                attention_mask,
                batch["completion_ids"].size(1),
                batch_size=batch_size,
                **self._forward_kwargs(batch),
            )
        return logps

    def _sampling_log_probs(self, output: dict[str, Any], batch_size: int) -> Tensor:
        """Token log-probs of a fresh generation batch (current = sampling parameters)."""
        return self._no_grad_log_probs(output, batch_size)

    def _current_log_probs(self, chunk: dict[str, Any]) -> Tensor:
        """Token log-probs of one buffered micro-batch at the current parameters (the planning
        pass of ``weights="current"``)."""
        return self._no_grad_log_probs(chunk, self.args.per_device_train_batch_size)

    def _plan_generation_batch(
        self, local: ResponseStats, rewards: Tensor, group_ids: Tensor, what: str
    ) -> GenerationPlan:
        """Gather every process's per-completion scalars (5 float64 each), check them, and plan
        the whole generation batch on every process (:func:`plan_minibatch` over the scorable
        completions). The checks run on gathered values that every process holds alike, so a
        bad value on one process raises the same error on every process. ``what`` names the
        log-probs in the non-finite message."""
        with torch.no_grad():
            n_local = rewards.shape[0]
            payload = torch.stack(
                [
                    local.scores.double(),
                    local.kl_sums.double(),
                    local.lengths.double(),
                    rewards.double(),
                    group_ids.double(),
                ],
                dim=1,
            )
            full = self.accelerator.gather(payload)  # (B, 5), process order
            _check_gathered_stats(full[:, 0] + full[:, 1], full[:, 2], n_local, what)
            all_rewards = full[:, 3]
            scorable = ~torch.isnan(all_rewards)
            _raise_on_every_process(
                scorable & ~torch.isfinite(all_rewards),
                n_local,
                "non-finite reward for the completion at {where} (the rewards of the reward "
                "functions, weighted and summed, must be finite; None marks a completion that "
                "cannot be scored)",
            )
            weights = torch.zeros_like(all_rewards)
            output = None
            rows = scorable.nonzero().squeeze(1)
            if rows.numel() > 0:
                plan = plan_minibatch(
                    ResponseStats(full[rows, 0], full[rows, 1], full[rows, 2]),
                    all_rewards[rows],
                    full[rows, 4].round().to(torch.int64),
                    **self._plan_options(),
                )
                weights[rows] = plan.weights.to(weights.dtype)
                output = plan.output
            num_tokens = full[:, 2].sum()
            kl = full[:, 1].sum() / num_tokens.clamp_min(1.0)
            args = self._disco_args
            kl_coef = constraint_slope(
                kl,
                constraint=args.constraint,
                delta=args.disco_delta,
                beta=args.disco_beta,
                multiplier=self.disco_multiplier,
            )
            start = self.accelerator.process_index * n_local
        return GenerationPlan(weights[start : start + n_local], kl_coef, num_tokens, kl, output)

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        output: dict[str, Any] = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        args = self._disco_args
        rewards_per_func, self._disco_rewards_per_func = self._disco_rewards_per_func, None
        if rewards_per_func is None:
            raise RuntimeError("DisCOTrainer: GRPOTrainer produced no gathered rewards")
        mask = _loss_mask(output)
        n_local = mask.shape[0]
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval

        old = output.get("old_per_token_logps")
        if old is None:  # TRL skips them when training is on-policy; DisCO's weights need them
            batch_size = (
                args.per_device_train_batch_size
                if mode == "train"
                else args.per_device_eval_batch_size
            )
            old = self._sampling_log_probs(output, batch_size)
            output["old_per_token_logps"] = old

        with torch.no_grad():
            device = mask.device
            rewards_per_func = rewards_per_func.to(device)
            if rewards_per_func.shape[0] != n_local * self.accelerator.num_processes:
                raise RuntimeError(
                    f"DisCOTrainer: {rewards_per_func.shape[0]} gathered rewards for "
                    f"{self.accelerator.num_processes} processes of {n_local} completions"
                )
            scorable = ~torch.isnan(rewards_per_func).all(dim=1)
            rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(1)
            rewards = torch.where(scorable, rewards, torch.nan).double()
            start = self.accelerator.process_index * n_local
            local_rows = torch.arange(start, start + n_local, device=device)
            # TRL's grouping: the prompts of the global generation batch, in process order,
            # come in blocks of num_generations rows.
            group_ids = local_rows // num_generations
            # The stats at the sampling policy (scores of the old log-probs, KL 0); checked
            # after the gather, on the gathered values: every process raises alike.
            local = response_stats(
                old,
                old,
                mask,
                **self._stats_options(),
                rewards=rewards[local_rows],
                validate=False,
            )
            plan = self._plan_generation_batch(
                local,
                rewards[local_rows],
                group_ids,
                "non-finite sampling log-prob (old_per_token_logps)",
            )
            output["disco_weights"] = plan.weights.to(old.dtype)
            output["disco_rewards"] = rewards[local_rows]
            output["disco_group_ids"] = group_ids
        if mode == "train":
            self._disco_plan = plan
            self._disco_at_sampling_policy = True
        return output

    def _plan_at_current_parameters(self, chunks: list[dict[str, Any]]) -> None:
        """``weights="current"``: replan the whole generation batch (every micro-batch of every
        process) from per-completion statistics at the current parameters, one no-grad forward
        pass over this process's buffered micro-batches, and give each micro-batch its new
        weights."""
        parts = []
        with torch.no_grad():
            for chunk in chunks:
                parts.append(
                    response_stats(
                        self._current_log_probs(chunk),
                        chunk["old_per_token_logps"],
                        _loss_mask(chunk),
                        **self._stats_options(),
                        rewards=chunk["disco_rewards"],
                        validate=False,  # checked on every process after the gather
                    )
                )
        plan = self._plan_generation_batch(
            ResponseStats.cat(parts),
            torch.cat([chunk["disco_rewards"] for chunk in chunks]),
            torch.cat([chunk["disco_group_ids"] for chunk in chunks]),
            "non-finite log-prob of the current policy in the planning pass of "
            "weights='current'",
        )
        offset = 0
        for chunk, part in zip(chunks, parts):
            rows = part.scores.shape[0]
            chunk["disco_weights"] = plan.weights[offset : offset + rows].to(part.scores.dtype)
            offset += rows
        self._disco_plan = plan

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        buffered = self._buffered_inputs
        inputs: dict[str, Any] = super()._prepare_inputs(generation_batch)
        if not self.model.training:
            return inputs
        if self._buffered_inputs is not buffered:  # a new generation batch
            self._count_step_tokens(self._buffered_inputs)
        args = self._disco_args
        # The first micro-batch of an optimizer step (generation, when due, has just happened:
        # steps_per_generation is a multiple of gradient_accumulation_steps).
        if args.weights == "current" and self._step % args.gradient_accumulation_steps == 0:
            if self._disco_at_sampling_policy:  # the generation's plan is the current one
                self._disco_at_sampling_policy = False
            else:
                assert self._buffered_inputs is not None  # filled by the generation above
                self._plan_at_current_parameters(self._buffered_inputs)
        return inputs

    def _count_step_tokens(self, chunks: list[dict[str, Any]]) -> None:
        """Exact number of completion tokens of each optimizer step, after TRL's shuffle/split.

        One all-gather per generation batch. Chunk c (micro-batch c of this process) belongs to
        optimizer step ``c // gradient_accumulation_steps`` of the pass.
        """
        ga = self.args.gradient_accumulation_steps
        local = torch.stack([_loss_mask(c).sum() for c in chunks]).to(torch.int64)
        per_chunk = self.accelerator.gather(local).view(-1, len(chunks)).sum(dim=0)
        per_step = per_chunk.view(-1, ga).sum(dim=1)
        for index, chunk in enumerate(chunks):
            chunk["disco_num_tokens"] = per_step[index // ga]

    # ------------------------------------------------------------------ loss

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Tensor:
        args = self._disco_args
        training = self.model.training
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = _loss_mask(inputs)
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **self._forward_kwargs(inputs),
        )
        old = inputs["old_per_token_logps"]
        if training:
            steps_per_pass = args.steps_per_generation // args.gradient_accumulation_steps
            num_tokens = inputs["disco_num_tokens"]
        else:  # an eval batch is neither split nor accumulated
            steps_per_pass = 1
            num_tokens = inputs["num_items_in_batch"]
        num_processes = self.accelerator.num_processes
        plan = self._disco_plan if training and args.weights == "current" else None
        if plan is not None:  # the generation batch's exact penalty slope, k times its share
            penalty_tokens, kl_coef = plan.num_tokens, plan.kl_coef * steps_per_pass
        else:  # the local approximation over the optimizer step's tokens
            penalty_tokens, kl_coef = num_tokens, None

        piece = micro_batch_loss(
            per_token_logps,
            old,
            mask,
            inputs["disco_weights"] * steps_per_pass,
            num_tokens=penalty_tokens,
            kl_coef=kl_coef,
            **self._stats_options(),
            delta=args.disco_delta,
            beta=args.disco_beta,
            constraint=args.constraint,
            multiplier=self.disco_multiplier,
            rewards=inputs["disco_rewards"],
            validate=False,  # checked on every process at the step's end (_flush_disco_metrics)
        )
        loss = piece.loss
        ref_kl_sum = torch.zeros((), device=per_token_logps.device)
        if self.beta != 0.0:  # reference-model KL, as GRPO adds it (allow_reference_kl=True)
            diff = inputs["ref_per_token_logps"] - per_token_logps
            per_token_kl = torch.exp(diff) - diff - 1
            if args.use_bias_correction_kl:
                per_token_kl = per_token_kl * torch.exp(per_token_logps - old)
            ref_kl_sum = torch.where(mask.bool(), per_token_kl, 0.0).sum()
            loss = loss + self.beta * ref_kl_sum / num_tokens.to(ref_kl_sum.dtype).clamp_min(1)
        # DDP averages the processes' gradients; the weights and N are global, hence the P.
        loss = num_processes * loss
        if self.aux_loss_enabled:
            steps = self.current_gradient_accumulation_steps if training else 1
            loss = loss + self.router_aux_loss_coef * aux_loss / steps

        self._record_metric_rows(
            piece.stats, mask, entropies, piece.penalty_term, ref_kl_sum, inputs
        )
        if not training:
            self._flush_disco_metrics("eval")
        return loss

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any) -> Tensor:
        loss: Tensor = super().training_step(model, inputs, num_items_in_batch)
        if self._step % self.current_gradient_accumulation_steps == 0:  # end of optimizer step
            args = self._disco_args
            plan = self._disco_plan if args.weights == "current" else None
            self._flush_disco_metrics("train", plan)
        return loss

    # ------------------------------------------------------------------ metrics

    def _record_metric_rows(
        self,
        st: ResponseStats,
        mask: Tensor,
        entropies: Tensor,
        penalty_term: Tensor,
        ref_kl_sum: Tensor,
        inputs: dict[str, Any],
    ) -> None:
        """Keep the micro-batch's per-completion scalars (computed by the loss itself) for the
        step's metrics."""
        with torch.no_grad():
            rows = torch.stack(
                [
                    st.scores.double(),
                    st.kl_sums.double(),
                    st.lengths.double(),
                    inputs["disco_rewards"].double(),
                    inputs["disco_group_ids"].double(),
                ],
                dim=1,
            )
            entropy_sum = torch.where(mask.bool(), entropies.detach(), 0.0).sum()
            sums = torch.stack(
                [entropy_sum.double(), penalty_term.detach().double(), ref_kl_sum.detach().double()]
            )
        self._disco_rows.append(rows)
        self._disco_sums.append(sums)

    def _flush_disco_metrics(self, mode: str, plan: GenerationPlan | None = None) -> None:
        """Gather the step's per-completion scalars, check them and log DisCO's metrics (one
        collective). With ``plan`` (``weights="current"``), the DisCO metrics are the plan's:
        the generation batch at the step's parameters, whose gradient the step applied."""
        if not self._disco_rows:
            return
        args = self._disco_args
        rows = torch.cat(self._disco_rows)
        sums = torch.stack(self._disco_sums).sum(dim=0)
        self._disco_rows, self._disco_sums = [], []
        n_rows, n_sums = rows.shape[0], sums.shape[0]
        # Processes hold the same number of rows per step (TRL's equal per-device batches).
        packed = torch.cat([rows.flatten(), sums])
        gathered = self.accelerator.gather(packed).view(self.accelerator.num_processes, -1)
        rows = gathered[:, : n_rows * len(_ROW_COLUMNS)].reshape(-1, len(_ROW_COLUMNS))
        sums = gathered[:, n_rows * len(_ROW_COLUMNS) :].sum(dim=0)
        assert sums.shape[0] == n_sums
        # Before the optimizer step (which would apply the non-finite gradient that DDP has
        # already averaged onto every process), and on gathered values: every process raises.
        _check_gathered_stats(
            rows[:, 0] + rows[:, 1],
            rows[:, 2],
            n_rows,
            "non-finite log-prob of the current policy in the "
            f"{'optimizer step' if mode == 'train' else 'evaluation batch'}",
        )
        num_tokens = rows[:, 2].sum().clamp_min(1.0)
        kl = rows[:, 1].sum() / num_tokens if plan is None else plan.kl
        penalty = constraint_penalty(
            kl,
            constraint=args.constraint,
            delta=args.disco_delta,
            beta=args.disco_beta,
            multiplier=self.disco_multiplier,
        )
        m = self._metrics[mode]
        m["disco/kl"].append(kl.item())
        m["disco/penalty"].append(penalty.item())
        if plan is None:  # the local approximation was differentiated
            m["disco/penalty_local"].append(sums[1].item())
        m["disco/constraint_active"].append(float(kl.item() > args.disco_delta))
        if self.disco_multiplier is not None:
            if mode == "train":  # dual ascent with the step's global KL (see the docstring)
                self.disco_multiplier.update(kl, delta=args.disco_delta)
            m["disco/multiplier"].append(float(self.disco_multiplier.value))
        m["entropy"].append((sums[0] / num_tokens).item())
        if self.beta != 0.0:
            m["kl"].append((sums[2] / num_tokens).item())
        if plan is not None:
            output = plan.output
        else:
            output = None
            scorable = ~torch.isnan(rows[:, 3])
            if bool(scorable.any()):
                r = rows[scorable]
                output = plan_minibatch(
                    ResponseStats(r[:, 0], r[:, 1], r[:, 2]),
                    r[:, 3],
                    r[:, 4].round().to(torch.int64),
                    **self._plan_options(),
                ).output
        if output is not None:
            out = output.metrics
            for key in (
                "objective",
                "frac_groups_with_signal",
                "frac_positive",
                "mean_pos_score",
                "mean_neg_score",
                "effective_negatives",
            ):
                m[f"disco/{key}"].append(out[key].item())
