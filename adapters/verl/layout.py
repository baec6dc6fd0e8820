"""Layout rules: what DisCO needs from the way verl orders and splits a batch.

``weights=current`` and ``weights=sampling`` (:mod:`.planning`): one plan per mini-batch gives
every response its weight, so any micro-batch layout is exact: micro-batches of any size
(1 included), verl's token-based dynamic batching and padding-free packing, questions split
across micro-batches, data-parallel ranks and even mini-batches (``actor.shuffle``), verl's
synthetic padding samples (weight 0). What the adapter still does, for the objective rather
than for exactness: each mini-batch is made of whole questions whenever the batch allows it
(a question's negatives are only contrasted with its positives inside one mini-batch), with
its responses spread over the DP ranks balancing the workload
(:func:`mini_batch_balanced_order`, replacing verl's ``_balance_batch`` in the v1 trainer).
What still holds: ``ppo_mini_batch_size * rollout.n`` a multiple of the actor's DP size and
``ppo_micro_batch_size_per_gpu`` a divisor of the per-GPU mini-batch (verl's own rules,
checked at startup with a clear message); ``weights=current`` not with Megatron pipeline
parallelism (the stats forward's log-probs live on the last stage only).

``weights=micro_batch``: every question must reach the DisCO loss whole. The objective of a
question needs the scores of all of its responses at the current policy, and verl
back-propagates each micro-batch at once, so each of the ``rollout.n`` responses of a
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

__all__ = [
    "DiscoLayoutError",
    "check_config",
    "group_balanced_order",
    "mini_batch_balanced_order",
    "uses_disco",
]


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
    mini = _sel(config, actor + "ppo_mini_batch_size")
    dp = _actor_dp_size(config)
    dynamic = bool(_sel(config, actor + "use_dynamic_bsz", False))
    micro = _sel(config, actor + "ppo_micro_batch_size_per_gpu")
    if options.planned:
        return _check_planned(config, options, n=n, mini=mini, dp=dp, dynamic=dynamic, micro=micro)

    hint = f" (or set {POLICY_LOSS_PATH}.weights=current, which allows it)"
    if _sel(config, actor + "shuffle", False):
        raise DiscoConfigError(
            f"{actor}shuffle=true would split questions across mini-batches with "
            f"weights=micro_batch: set it to false{hint}"
        )

    train = _sel(config, "data.train_batch_size")
    if isinstance(mini, int) and isinstance(train, int) and train % mini:
        raise DiscoConfigError(
            f"data.train_batch_size={train} is not a multiple of "
            f"{actor}ppo_mini_batch_size={mini}: "
            "the last mini-batch would need synthetic padding samples that do not form questions"
        )
    if dp and isinstance(mini, int) and mini % dp:
        raise DiscoConfigError(
            f"{actor}ppo_mini_batch_size={mini} (questions) is not a multiple of the actor's "
            f"data-parallel size {dp}: each rank must receive whole questions of every "
            f"mini-batch with weights=micro_batch; change ppo_mini_batch_size or the number of "
            f"GPUs{hint}"
        )

    v1 = bool(_sel(config, "trainer.use_v1", True))
    if not dynamic:
        if isinstance(micro, int) and micro % n:
            raise DiscoConfigError(
                f"{actor}ppo_micro_batch_size_per_gpu={micro} is not a multiple of "
                f"actor_rollout_ref.rollout.n={n}: micro-batches would split questions with "
                f"weights=micro_batch; use a multiple of {n} (or use_dynamic_bsz=true, which "
                f"keeps questions whole){hint}"
            )
        _check_micro_divides(mini=mini, n=n, dp=dp, micro=micro)
    if not v1:
        if _sel(config, "trainer.balance_batch", True):
            raise DiscoConfigError(
                "trainer.balance_batch=true reorders responses across DP ranks by length and "
                "splits questions in the legacy trainer (trainer.use_v1=false): set "
                "trainer.balance_batch=false, or use the default v1 trainer, where the adapter "
                f"balances whole questions{hint}"
            )
        if dynamic:
            raise DiscoConfigError(
                f"{actor}use_dynamic_bsz=true splits questions in the legacy trainer "
                f"(trainer.use_v1=false): set it to false, or use the default v1 trainer{hint}"
            )
    return options


def _check_micro_divides(*, mini: Any, n: int, dp: int | None, micro: Any) -> None:
    """verl's own rule, checked at startup: fixed micro-batches divide the per-GPU mini-batch
    (verl would stop with an assertion inside the first actor update)."""
    if isinstance(micro, int) and dp and isinstance(mini, int) and (mini * n // dp) % micro:
        raise DiscoConfigError(
            f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro} does not divide the "
            f"per-GPU mini-batch of {mini * n // dp} responses "
            "(ppo_mini_batch_size * rollout.n / dp)"
        )


def _check_planned(
    config: Any,
    options: VerlDiscoOptions,
    *,
    n: int,
    mini: Any,
    dp: int | None,
    dynamic: bool,
    micro: Any,
) -> VerlDiscoOptions:
    """The rules that remain with ``weights=current/sampling``: verl's own (mini-batch and
    micro-batch sizes), and the stats forward's reach."""
    actor = "actor_rollout_ref.actor."
    if dp and isinstance(mini, int) and (mini * n) % dp:
        raise DiscoConfigError(
            f"{actor}ppo_mini_batch_size * actor_rollout_ref.rollout.n = {mini * n} responses "
            f"is not a multiple of the actor's data-parallel size {dp}: verl splits each "
            "mini-batch into equal parts per rank; change ppo_mini_batch_size or the number of "
            "GPUs"
        )
    if not dynamic:
        _check_micro_divides(mini=mini, n=n, dp=dp, micro=micro)
    strategy = _sel(config, actor + "strategy", "fsdp")
    pp = _sel(config, actor + "megatron.pipeline_model_parallel_size", 1) or 1
    if options.weights == "current" and strategy == "megatron" and pp > 1:
        raise DiscoConfigError(
            f"{POLICY_LOSS_PATH}.weights=current with Megatron pipeline parallelism "
            f"({actor}megatron.pipeline_model_parallel_size={pp}) is not supported: the "
            "current-parameter stats come from a forward pass whose log-probs only the last "
            "pipeline stage holds. Use weights=sampling or weights=micro_batch"
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


def mini_batch_balanced_order(
    uids: Sequence[Any],
    seq_lens: Sequence[int],
    *,
    dp_size: int,
    mini_batch_size: int,
) -> tuple[list[int], list[list[int]]]:
    """Balancing for ``weights=current/sampling``: whole questions per mini-batch, any split
    across ranks.

    The responses of each question (same uid) are put next to each other, questions in order
    of first appearance, and cut into consecutive mini-batches of ``mini_batch_size``
    responses (whole questions when every question has ``rollout.n`` responses; otherwise a
    question may straddle two mini-batches, which is exact, only the objective is then formed
    over the responses each mini-batch holds). Each mini-batch's responses are spread over
    the ``dp_size`` ranks in equal numbers balancing the attention workload with verl's own
    Karmarkar-Karp partitioner (responses, not questions: a finer balance than whole questions
    per rank). Rank r's chunk is its share of mini-batch 0, then of mini-batch 1, ... as verl's
    contiguous dispatch and per-rank mini-batch slicing expect.

    Returns:
      (order, partitions): the new order of the responses (indices into the input) and, per
      rank, the response indices it receives (for verl's balance metrics).
    """
    import torch
    from verl.utils.seqlen_balancing import calculate_workload, get_seqlen_balanced_partitions

    if len(uids) != len(seq_lens):
        raise ValueError(f"uids and seq_lens differ in length: {len(uids)} != {len(seq_lens)}")
    if mini_batch_size < 1 or mini_batch_size % dp_size:
        raise DiscoLayoutError(
            f"a mini-batch of {mini_batch_size} responses (ppo_mini_batch_size * rollout.n) "
            f"does not split into equal parts over the actor's {dp_size} data-parallel ranks"
        )
    if len(uids) % mini_batch_size:
        raise DiscoLayoutError(
            f"the batch holds {len(uids)} responses, not a multiple of the mini-batch size "
            f"{mini_batch_size} (verl pads the batch to it before balancing)"
        )
    members: dict[Any, list[int]] = {}
    for i, uid in enumerate(uids):
        members.setdefault(uid, []).append(i)
    flat = [i for idx in members.values() for i in idx]
    work = calculate_workload(torch.tensor(list(seq_lens), dtype=torch.int64)).tolist()
    per_rank: list[list[int]] = [[] for _ in range(dp_size)]
    for start in range(0, len(flat), mini_batch_size):
        block = flat[start : start + mini_batch_size]
        if dp_size == 1:
            parts = [list(range(len(block)))]
        else:
            parts = get_seqlen_balanced_partitions(
                [work[i] for i in block], k_partitions=dp_size, equal_size=True
            )
        for r, part in enumerate(parts):
            per_rank[r].extend(block[j] for j in sorted(part))
    order = [i for rank in per_rank for i in rank]
    return order, per_rank
