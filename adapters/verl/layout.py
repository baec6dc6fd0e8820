"""Layout rules: every question must reach the DisCO loss whole.

The objective of a question needs the scores of all of its responses at the current policy,
and verl back-propagates each micro-batch at once, so each of the ``rollout.n`` responses of a
question must sit in the same micro-batch (hence the same DP rank and mini-batch). What verl
0.9.1 does to the order of a batch, and what the adapter does about it:

* ``PPOTrainer._balance_batch`` (v1 trainer, always on) reorders responses across DP ranks by
  length, ignoring questions: replaced, for DisCO runs only, by :func:`group_balanced_order`.
* ``trainer.balance_batch`` (legacy v0 trainer): same problem, refused (set it to false).
* dispatch to DP ranks: contiguous equal chunks, whole questions after the balancing above.
* ``actor.shuffle``: shuffles each rank's responses before forming mini-batches: refused.
* mini-batches per rank: contiguous slices of ppo_mini_batch_size * n / dp responses: needs
  ``ppo_mini_batch_size % dp == 0`` (and train_batch_size a multiple of it).
* fixed micro-batches: contiguous chunks of ``ppo_micro_batch_size_per_gpu``: needs a multiple
  of ``rollout.n``.
* dynamic micro-batches (``use_dynamic_bsz``) re-partition by token count: kept whole with
  verl's ``force_group_size = rollout.n`` (v1); refused on the legacy trainer.
* synthetic padding samples (``upsample_batch_to_divisible_size``, after failed or filtered
  rollouts): refused at run time, they would not form questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._options import (
    NAME,
    POLICY_LOSS_PATH,
    DiscoConfigError,
    DiscoLayoutError,
    VerlDiscoOptions,
    check_for_verl,
    options_from_mapping,
)

__all__ = ["DiscoLayoutError", "check_config", "group_balanced_order", "uses_disco"]


def _sel(config: Any, path: str, default: Any = None) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.select(config, path, default=default)


def uses_disco(config: Any) -> bool:
    """True if either the advantage estimator or the policy loss is ``disco``."""
    return (
        _sel(config, "algorithm.adv_estimator") == NAME
        or _sel(config, f"{POLICY_LOSS_PATH}.loss_mode") == NAME
    )


def _actor_dp_size(config: Any) -> int | None:
    """Best-effort data-parallel size of the actor from the config (None if unknown)."""
    n_gpus = _sel(config, "trainer.n_gpus_per_node", 0) * _sel(config, "trainer.nnodes", 0)
    if n_gpus <= 0:
        return None
    strategy = _sel(config, "actor_rollout_ref.actor.strategy", "fsdp")
    if strategy in ("fsdp", "fsdp2"):
        sp = _sel(config, "actor_rollout_ref.actor.ulysses_sequence_parallel_size", 1) or 1
        sp = max(
            sp,
            _sel(config, "actor_rollout_ref.actor.fsdp_config.ulysses_sequence_parallel_size", 1)
            or 1,
        )
        return n_gpus // sp if n_gpus % sp == 0 else None
    if strategy == "megatron":
        m = "actor_rollout_ref.actor.megatron."
        mp = 1
        for key in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "context_parallel_size",
        ):
            mp *= _sel(config, m + key, 1) or 1
        return n_gpus // mp if n_gpus % mp == 0 else None
    return None


def check_config(config: Any) -> VerlDiscoOptions | None:
    """Validate a whole verl config (DictConfig) for DisCO; None if DisCO is not selected.

    Run in the driver by the adapter's ``validate_config`` hook, before Ray starts any worker.
    Raises :class:`DiscoConfigError` naming the setting to change.
    """
    if not uses_disco(config):
        return None
    est = _sel(config, "algorithm.adv_estimator")
    mode = _sel(config, f"{POLICY_LOSS_PATH}.loss_mode")
    if est != NAME:
        raise DiscoConfigError(
            f"{POLICY_LOSS_PATH}.loss_mode=disco needs algorithm.adv_estimator=disco (got "
            f"{est!r}): the DisCO loss reads each response's label and question from the codes "
            "that only the disco estimator writes into the advantages"
        )
    if mode != NAME:
        raise DiscoConfigError(
            f"algorithm.adv_estimator=disco writes label/question codes, not advantages: set "
            f"{POLICY_LOSS_PATH}.loss_mode=disco (got {mode!r})"
        )
    options = check_for_verl(options_from_mapping(_sel(config, POLICY_LOSS_PATH, {})))

    actor = "actor_rollout_ref.actor."
    n = _sel(config, "actor_rollout_ref.rollout.n", 1)
    if n < 2:
        raise DiscoConfigError(
            f"actor_rollout_ref.rollout.n={n}: DisCO contrasts the correct and wrong responses of "
            "each question, it needs at least 2 responses per question (the paper uses 8)"
        )
    if _sel(config, "algorithm.use_kl_in_reward", False):
        raise DiscoConfigError(
            "algorithm.use_kl_in_reward=true would move rewards across the positive/negative "
            "threshold; DisCO has its own KL constraint (policy_loss.delta/beta): set it to false"
        )
    if _sel(config, "critic.enable", None) is True:
        raise DiscoConfigError(
            "critic.enable=true: DisCO uses no value function (its advantages are label codes); "
            "set critic.enable=false"
        )
    if _sel(config, "algorithm.rollout_correction.rollout_is", None) is not None:
        raise DiscoConfigError(
            "algorithm.rollout_correction.rollout_is: DisCO has no importance-weight correction; "
            "set it to null"
        )
    if _sel(config, actor + "shuffle", False):
        raise DiscoConfigError(
            f"{actor}shuffle=true would split questions across mini-batches: set it to false"
        )

    mini = _sel(config, actor + "ppo_mini_batch_size")
    train = _sel(config, "data.train_batch_size")
    if isinstance(mini, int) and isinstance(train, int) and train % mini:
        raise DiscoConfigError(
            f"data.train_batch_size={train} is not a multiple of "
            f"{actor}ppo_mini_batch_size={mini}: "
            "the last mini-batch would need synthetic padding samples that do not form questions"
        )
    dp = _actor_dp_size(config)
    if dp and isinstance(mini, int) and mini % dp:
        raise DiscoConfigError(
            f"{actor}ppo_mini_batch_size={mini} (questions) is not a multiple of the actor's "
            f"data-parallel size {dp}: each rank must receive whole questions of every "
            "mini-batch; change ppo_mini_batch_size or the number of GPUs"
        )

    dynamic = bool(_sel(config, actor + "use_dynamic_bsz", False))
    v1 = bool(_sel(config, "trainer.use_v1", True))
    if not dynamic:
        micro = _sel(config, actor + "ppo_micro_batch_size_per_gpu")
        if isinstance(micro, int) and micro % n:
            raise DiscoConfigError(
                f"{actor}ppo_micro_batch_size_per_gpu={micro} is not a multiple of "
                f"actor_rollout_ref.rollout.n={n}: micro-batches would split questions; use a "
                f"multiple of {n} (or use_dynamic_bsz=true, which keeps questions whole)"
            )
        if isinstance(micro, int) and dp and isinstance(mini, int) and (mini * n // dp) % micro:
            raise DiscoConfigError(
                f"{actor}ppo_micro_batch_size_per_gpu={micro} does not divide the per-GPU "
                f"mini-batch of {mini * n // dp} responses (ppo_mini_batch_size * rollout.n / dp)"
            )
    if not v1:
        if _sel(config, "trainer.balance_batch", True):
            raise DiscoConfigError(
                "trainer.balance_batch=true reorders responses across DP ranks by length and "
                "splits questions in the legacy trainer (trainer.use_v1=false): set "
                "trainer.balance_batch=false, or use the default v1 trainer, where the adapter "
                "balances whole questions"
            )
        if dynamic:
            raise DiscoConfigError(
                f"{actor}use_dynamic_bsz=true splits questions in the legacy trainer "
                "(trainer.use_v1=false): set it to false, or use the default v1 trainer"
            )
    return options


def group_balanced_order(
    uids: Sequence[Any],
    seq_lens: Sequence[int],
    *,
    dp_size: int,
    questions_per_mini_batch: int,
    group_size: int,
) -> tuple[list[int], list[list[int]]]:
    """Question-aware replacement of verl's sequence balancing across DP ranks.

    The responses of each question (same uid) stay together. The questions are cut, in order
    of first appearance, into mini-batches of ``questions_per_mini_batch``; inside each
    mini-batch the questions are spread over the ``dp_size`` ranks, the same number per rank,
    balancing the attention workload with verl's own Karmarkar-Karp partitioner. Rank r's chunk
    is its share of mini-batch 0, then of mini-batch 1, ... so that verl's contiguous dispatch
    and per-rank mini-batch slicing hand every rank whole questions of the right mini-batch.

    Returns:
      (order, partitions): the new order of the responses (indices into the input) and, per
      rank, the response indices it receives (for verl's balance metrics).
    """
    import torch
    from verl.utils.seqlen_balancing import calculate_workload, get_seqlen_balanced_partitions

    if len(uids) != len(seq_lens):
        raise ValueError(f"uids and seq_lens differ in length: {len(uids)} != {len(seq_lens)}")
    members: dict[Any, list[int]] = {}
    for i, uid in enumerate(uids):
        members.setdefault(uid, []).append(i)
    groups = list(members.values())
    for uid, idx in members.items():
        if len(idx) != group_size:
            raise DiscoLayoutError(
                f"question {uid!r} has {len(idx)} responses in this batch, rollout.n is "
                f"{group_size}: DisCO can only lay out whole questions of rollout.n responses "
                "(failed, filtered or multi-output rollouts break this)"
            )
    q = questions_per_mini_batch
    if q % dp_size:
        raise DiscoLayoutError(
            f"actor_rollout_ref.actor.ppo_mini_batch_size={q} is not a multiple of the actor's "
            f"data-parallel size {dp_size}"
        )
    if len(groups) % q:
        raise DiscoLayoutError(
            f"the batch holds {len(groups)} questions, not a multiple of "
            f"actor_rollout_ref.actor.ppo_mini_batch_size={q}"
        )
    work = calculate_workload(torch.tensor(list(seq_lens), dtype=torch.int64)).tolist()
    per_rank: list[list[int]] = [[] for _ in range(dp_size)]
    for start in range(0, len(groups), q):
        block = groups[start : start + q]
        if dp_size == 1:
            parts = [list(range(len(block)))]
        else:
            loads = [sum(work[i] for i in g) for g in block]
            parts = get_seqlen_balanced_partitions(loads, k_partitions=dp_size, equal_size=True)
        for r, part in enumerate(parts):
            for gi in part:
                per_rank[r].extend(block[gi])
    order = [i for rank in per_rank for i in rank]
    return order, per_rank
