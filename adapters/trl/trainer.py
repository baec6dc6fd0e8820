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
per-completion score gradients (DESIGN.md section 2, :mod:`discoloss.accumulation`):

.. math::

    \nabla\mathcal{L} = -\sum_i w_i \nabla s_i + \nabla\,\mathrm{penalty},\qquad
    w_i = \partial J / \partial s_i

**Where the weights come from.** Once per generation batch, right after TRL gathers the
rewards of every process: each process computes its completions' scores at the *sampling
policy* (the log-probs ``old_per_token_logps`` of the model that generated them; the trainer
computes them when TRL would skip them), all processes all-gather these per-completion scalars
(2 floats per completion), and every process runs :func:`discoloss.accumulation.plan_minibatch`
on the global generation batch, with group ids ``global_row // num_generations`` (TRL's own
grouping), and keeps the weights of its own rows. The weights then travel with the rows through
TRL's shuffle and split. For ``objective="disco_b"`` the weights do not depend on the scores:
exact at every step. For ``objective="disco"`` they are the gradient of DisCO at the sampling
policy: exact at the first optimizer step of each generation batch (theta = theta_old), and
afterwards a linearisation whose error the KL constraint bounds.

**Per optimizer step** (its micro-batches on all processes, N its number of completion
tokens, counted exactly after TRL's shuffle with one all-gather per generation batch), each
micro-batch backpropagates

.. math::

    \ell_{mb} = P\Big(-k\sum_{i\in mb} w_i s_i
        + \frac{n_{mb}}{N}\,\frac{\beta}{2}\big[KL_{mb} - \delta\big]_+^2\Big)

with P the number of processes (DDP averages gradients), n_mb and KL_mb the micro-batch's
token count and own token-mean KL (``micro_batch_loss(kl_coef=None)``). Objective part: the
k optimizer steps of one pass over a generation batch apply, together, exactly the gradient of
the generation batch's DisCO objective at the weights' parameters (each completion is in one
step; the factor k makes each step an unbiased estimate under TRL's random shuffle). With
``steps_per_generation == gradient_accumulation_steps`` (TRL's default) an optimizer step is
the whole generation batch, so the first step of a generation batch equals ``disco_loss`` on
its completions exactly.

**KL penalty (local approximation).** The exact penalty gradient of a step is
``beta [KL - delta]_+ grad KL`` with KL the token mean over the whole step, which is unknown
until every micro-batch has been forwarded (it would cost one extra no-grad forward pass per
step). Each micro-batch instead differentiates its token share of the penalty of its *own*
KL, as above. Summed over the step this is ``sum_mb (n_mb/N) pen(KL_mb) >= pen(KL)`` (Jensen):
an upper bound of the exact penalty, equal to it when the micro-batches' KLs are equal, and
exactly 0 (with 0 gradient) at the first step of a generation batch, where the policy is the
sampling policy. Both values are logged: ``disco/penalty`` (exact, at the step's end) and
``disco/penalty_local`` (what was differentiated).

**Metrics** (TRL style, averaged over the logging window; every process computes the same
values from per-completion scalars gathered once per optimizer step, outside the gradient):
``disco/objective`` (J of the step's completions at the parameters the step's gradient was
computed at; with the default batching that is the generation batch's DisCO objective),
``disco/kl``, ``disco/penalty``, ``disco/penalty_local``, ``disco/constraint_active``,
``disco/frac_groups_with_signal``, ``disco/frac_positive``, ``disco/mean_pos_score``,
``disco/mean_neg_score``, ``disco/effective_negatives``, ``entropy`` (token mean), and ``kl``
(reference-model KL, only with ``allow_reference_kl``). TRL's own ``loss`` is the value of the
surrogate above, not the DisCO loss: read ``disco/objective`` and ``disco/penalty``.

Completions for which every reward function returned None get weight 0 and are left out of
the groups (their tokens still count in the KL constraint).

**A bad value on one process** (a non-finite log-prob, a non-finite reward, a completion
without completion token) stops the job on every process with the same ``ValueError``, never
one process raising while the others wait in a collective: the checks run on gathered values
that every process holds alike: the sampling statistics and the rewards right after the
generation batch's gather, the current-policy statistics in the metrics gather at the end of
each optimizer step, after DDP's gradient all-reduce and before the optimizer step (so a
non-finite gradient is never applied).
"""

from __future__ import annotations

import os
import textwrap
from typing import Any

import torch
from torch import Tensor
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from discoloss.accumulation import ResponseStats, micro_batch_loss, plan_minibatch, response_stats
from discoloss.constraints import LagrangeMultiplier, constraint_penalty

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
        #: The KL multiplier of ``constraint="lagrangian"`` (None otherwise), updated after
        #: every optimizer step and saved in checkpoints through a stateful callback.
        self.disco_multiplier: LagrangeMultiplier | None = None
        if args.constraint == "lagrangian":
            self.disco_multiplier = LagrangeMultiplier(lr=args.lagrangian_lr)

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
        args: DisCOConfig = self.args
        return {
            "score": args.score,
            "kl_estimator": args.kl_estimator,
            "threshold": args.threshold,
            "clip_eps": args.clip_eps,
        }

    def _plan_options(self) -> dict[str, Any]:
        args: DisCOConfig = self.args
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

    def _sampling_log_probs(self, output: dict[str, Any], batch_size: int) -> Tensor:
        """Token log-probs of the completions under the current (= sampling) parameters."""
        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
        ):
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.model,
                input_ids,
                attention_mask,
                output["completion_ids"].size(1),
                batch_size=batch_size,
                **self._forward_kwargs(output),
            )
        return logps

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        output: dict[str, Any] = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        args: DisCOConfig = self.args
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
            scorable = ~torch.isnan(rewards_per_func).all(dim=1)
            rewards = (rewards_per_func * self.reward_weights.to(device).unsqueeze(0)).nansum(1)
            rewards = torch.where(scorable, rewards, torch.nan).double()
            start = self.accelerator.process_index * n_local
            local_rows = slice(start, start + n_local)
            # Checked after the gather, on the gathered values: every process raises alike.
            local = response_stats(
                old,
                old,
                mask,
                **self._stats_options(),
                rewards=rewards[local_rows],
                validate=False,
            )
            payload = torch.stack([local.scores.double(), local.lengths.double()], dim=1)
            full = self.accelerator.gather(payload)  # (B, 2), process order, like the rewards
            if rewards_per_func.shape[0] != full.shape[0]:
                raise RuntimeError(
                    f"DisCOTrainer: {rewards_per_func.shape[0]} gathered rewards for "
                    f"{full.shape[0]} gathered completions"
                )
            _check_gathered_stats(
                full[:, 0],
                full[:, 1],
                n_local,
                "non-finite sampling log-prob (old_per_token_logps)",
            )
            _raise_on_every_process(
                scorable & ~torch.isfinite(rewards),
                n_local,
                "non-finite reward for the completion at {where} (the rewards of the reward "
                "functions, weighted and summed, must be finite; None marks a completion that "
                "cannot be scored)",
            )
            group_ids = torch.arange(full.shape[0], device=device) // num_generations
            weights = torch.zeros(full.shape[0], dtype=torch.float64, device=device)
            rows = scorable.nonzero().squeeze(1)
            if rows.numel() > 0:
                plan = plan_minibatch(
                    ResponseStats(full[rows, 0], torch.zeros_like(full[rows, 0]), full[rows, 1]),
                    rewards[rows],
                    group_ids[rows],
                    **self._plan_options(),
                )
                weights[rows] = plan.weights.to(weights.dtype)
            output["disco_weights"] = weights[local_rows].to(old.dtype)
            output["disco_rewards"] = rewards[local_rows]
            output["disco_group_ids"] = group_ids[local_rows]
        return output

    def _prepare_inputs(self, generation_batch: Any) -> dict[str, Any]:
        buffered = self._buffered_inputs
        inputs: dict[str, Any] = super()._prepare_inputs(generation_batch)
        if self.model.training and self._buffered_inputs is not buffered:
            self._count_step_tokens(self._buffered_inputs)
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
        args: DisCOConfig = self.args
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

        piece = micro_batch_loss(
            per_token_logps,
            old,
            mask,
            inputs["disco_weights"] * steps_per_pass,
            num_tokens=num_tokens,
            kl_coef=None,
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
            self._flush_disco_metrics("train")
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

    def _flush_disco_metrics(self, mode: str) -> None:
        """Gather the step's per-completion scalars and log DisCO's metrics (one collective)."""
        if not self._disco_rows:
            return
        args: DisCOConfig = self.args
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
        kl = rows[:, 1].sum() / num_tokens
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
        m["disco/penalty_local"].append(sums[1].item())
        m["disco/constraint_active"].append(float(kl.item() > args.disco_delta))
        if self.disco_multiplier is not None:
            if mode == "train":  # dual ascent with the step's global KL
                self.disco_multiplier.update(kl, delta=args.disco_delta)
            m["disco/multiplier"].append(float(self.disco_multiplier.value))
        m["entropy"].append((sums[0] / num_tokens).item())
        if self.beta != 0.0:
            m["kl"].append((sums[2] / num_tokens).item())
        scorable = ~torch.isnan(rows[:, 3])
        if bool(scorable.any()):
            r = rows[scorable]
            plan = plan_minibatch(
                ResponseStats(r[:, 0], r[:, 1], r[:, 2]),
                r[:, 3],
                r[:, 4].round().to(torch.int64),
                **self._plan_options(),
            )
            out = plan.output.metrics
            for key in (
                "objective",
                "frac_groups_with_signal",
                "frac_positive",
                "mean_pos_score",
                "mean_neg_score",
                "effective_negatives",
            ):
                m[f"disco/{key}"].append(out[key].item())
