"""Where the adapter attaches to verl 0.9.1 without forking it (all idempotent, and all inert
unless a run selects ``disco``):

1. ``verl.utils.config.validate_config`` (called by ``main_ppo`` in the driver before Ray
   starts) is wrapped: for DisCO runs it selects :class:`DiscoPolicyLossConfig` as the
   ``policy_loss`` target and runs :func:`~discoloss.adapters.verl.layout.check_config`.
2. ``verl.trainer.ppo.v1.trainer_base.PPOTrainer`` (the default v1 trainer; patched when that
   module is imported, so ``import verl`` stays light) gets a DisCO ``_balance_batch``
   (``weights=current/sampling``: each mini-batch made of whole questions, its responses
   balanced over the DP ranks by workload, :func:`~discoloss.adapters.verl.layout.
   mini_batch_balanced_order`; ``weights=micro_batch``: whole questions per rank,
   :func:`~discoloss.adapters.verl.layout.group_balanced_order`), and its ``_update_actor``
   tells the workers whether the old log-probs were computed by the actor at theta_old (not
   in rollout-correction bypass mode) and, for ``weights=micro_batch`` with
   ``use_dynamic_bsz``, passes ``force_group_size=rollout.n``.
3. ``verl.workers.engine_workers.TrainingWorker`` (the actor's training worker, in every Ray
   worker; patched when that module is imported). ``weights=current/sampling``:
   ``train_batch`` (one optimizer step) first plans the mini-batch on every rank
   (:mod:`discoloss.adapters.verl.planning`: the current parameters' stats from the engine's
   own forward pass where needed, gathered over the DP group) and hands each row's weight to
   the loss, then runs verl's ``train_batch``, then adds the mini-batch's metrics to its
   output; ``train_mini_batch`` marks the first mini-batch of a step. For DisCO runs with
   ``validate=true``, ``train_batch`` and ``infer_batch`` collect the loss's checks and raise
   on every rank at once after the pass (``discoloss.adapters.verl.faults``); for
   ``constraint=lagrangian`` runs, ``train_batch`` is followed by the multiplier's update with
   the step's global KL, ``infer_batch`` (forward only) leaves the step's KL untouched, and
   ``save_checkpoint`` / ``load_checkpoint`` also write / read its state
   (:mod:`discoloss.adapters.verl.lagrangian`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import sys
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from . import faults, lagrangian, planning
from ._options import (
    NAME,
    POLICY_LOSS_PATH,
    DiscoLayoutError,
    VerlDiscoOptions,
    options_from_mapping,
)
from .layout import (
    check_config,
    group_balanced_order,
    mini_batch_balanced_order,
    uses_disco,
)

V1_TRAINER = "verl.trainer.ppo.v1.trainer_base"
ENGINE_WORKERS = "verl.workers.engine_workers"
MARK = "__discoloss__"
#: Key of the actor update's data: True when the old log-probs were computed by the actor at
#: theta_old (the stats of the first mini-batch of a step are then free).
OLD_AT_THETA_OLD = "disco_old_log_probs_at_theta_old"


def _mark(fn: Callable[..., Any]) -> Callable[..., Any]:
    setattr(fn, MARK, True)
    return fn


def select_disco_target(config: Any) -> None:
    """Point ``policy_loss._target_`` at :class:`DiscoPolicyLossConfig` for DisCO runs, so that
    the DisCO options (given with ``+`` on the command line) pass verl's dataclass check."""
    from omegaconf import OmegaConf, open_dict

    from .config import TARGET

    node = OmegaConf.select(config, POLICY_LOSS_PATH, default=None)
    if node is None or node.get("loss_mode") != NAME:
        return
    if node.get("_target_") in (None, "verl.workers.config.PolicyLossConfig"):
        with open_dict(node):
            node["_target_"] = TARGET


def install_validate_config_hook() -> None:
    import verl.utils.config as vc

    original = vc.validate_config
    if getattr(original, MARK, False):
        return

    @functools.wraps(original)
    def validate_config(config: Any, *args: Any, **kwargs: Any) -> Any:
        if uses_disco(config):
            select_disco_target(config)
            check_config(config)
        return original(config, *args, **kwargs)

    vc.validate_config = _mark(validate_config)
    for name in ("verl.trainer.main_ppo", "__main__"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "validate_config", None) is original:
            mod.validate_config = validate_config


def run_options(config: Any) -> VerlDiscoOptions:
    """The DisCO options of a whole verl config (driver side)."""
    from omegaconf import OmegaConf

    return options_from_mapping(OmegaConf.select(config, POLICY_LOSS_PATH, default=None))


def _actor_dp_size(trainer: Any) -> int:
    wg = trainer.actor_rollout_wg
    if "actor" not in wg._dispatch_info:
        wg._dispatch_info["actor"] = wg._query_dispatch_info("actor")
    return int(max(wg._dispatch_info["actor"]) + 1)


def balance_mini_batches(
    trainer: Any, batch: Any, metrics: dict[str, Any], logging_prefix: str
) -> Any:
    """DisCO replacement of ``PPOTrainer._balance_batch`` (v1) for ``weights=current/sampling``:
    verl's own padding to the required batch multiple (synthetic samples, which the plan gives
    weight 0), then each mini-batch made of whole questions, its responses spread over the DP
    ranks balancing the workload (:func:`mini_batch_balanced_order`)."""
    from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size
    from verl.utils.seqlen_balancing import log_seqlen_unbalance

    dp_size = _actor_dp_size(trainer)
    multiple = trainer._get_required_batch_multiple(dp_size)
    batch = upsample_batch_to_divisible_size(batch, multiple, trainer.tokenizer.eos_token_id)
    cfg = trainer.config.actor_rollout_ref
    uids = [key.rsplit("_", 2)[0] for key in batch.keys]
    seq_lens = [int(tag["seq_len"]) for tag in batch.tags]
    order, partitions = mini_batch_balanced_order(
        uids,
        seq_lens,
        dp_size=dp_size,
        mini_batch_size=int(cfg.actor.ppo_mini_batch_size) * int(cfg.rollout.n),
    )
    batch.reorder(order)
    metrics.update(
        log_seqlen_unbalance(seqlen_list=seq_lens, partitions=partitions, prefix=logging_prefix)
    )
    return batch


def balance_whole_questions(
    trainer: Any, batch: Any, metrics: dict[str, Any], logging_prefix: str
) -> Any:
    """DisCO replacement of ``PPOTrainer._balance_batch`` (v1) for ``weights=micro_batch``:
    whole questions per rank and mini-batch, balanced by workload
    (:func:`group_balanced_order`)."""
    from verl.utils.seqlen_balancing import log_seqlen_unbalance

    dp_size = _actor_dp_size(trainer)
    multiple = trainer._get_required_batch_multiple(dp_size)
    if len(batch) % multiple:
        raise DiscoLayoutError(
            f"the training batch has {len(batch)} responses, not a multiple of {multiple} "
            "(lcm of the DP size and ppo_mini_batch_size * rollout.n). verl would add synthetic "
            "padding samples, which do not form questions; DisCO needs every question complete "
            "(check for failed or filtered rollouts)"
        )
    cfg = trainer.config.actor_rollout_ref
    uids = [key.rsplit("_", 2)[0] for key in batch.keys]
    seq_lens = [int(tag["seq_len"]) for tag in batch.tags]
    order, partitions = group_balanced_order(
        uids,
        seq_lens,
        dp_size=dp_size,
        questions_per_mini_batch=int(cfg.actor.ppo_mini_batch_size),
        group_size=int(cfg.rollout.n),
    )
    batch.reorder(order)
    metrics.update(
        log_seqlen_unbalance(seqlen_list=seq_lens, partitions=partitions, prefix=logging_prefix)
    )
    return batch


def patch_v1_trainer(module: ModuleType) -> None:
    cls = module.PPOTrainer
    balance = cls._balance_batch
    if getattr(balance, MARK, False):
        return
    update = cls._update_actor

    @functools.wraps(balance)
    def _balance_batch(
        self: Any,
        batch: Any,
        metrics: dict[str, Any],
        logging_prefix: str = "global_seqlen",
        keep_minibatch: bool = False,
    ) -> Any:
        if not uses_disco(self.config):
            return balance(
                self, batch, metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch
            )
        if run_options(self.config).planned:
            return balance_mini_batches(self, batch, metrics, logging_prefix)
        return balance_whole_questions(self, batch, metrics, logging_prefix)

    @functools.wraps(update)
    def _update_actor(self: Any, batch: Any, metrics: dict[str, Any]) -> Any:
        if not uses_disco(self.config):
            return update(self, batch, metrics)
        cfg = self.config.actor_rollout_ref
        if run_options(self.config).planned:
            # The old log-probs are the actor's at theta_old unless the rollout's are used
            # instead (rollout-correction bypass mode, _compute_old_log_prob).
            correction = self.config.algorithm.get("rollout_correction", None)
            bypass = bool(correction and correction.get("bypass_mode", False))
            batch.extra_info[OLD_AT_THETA_OLD] = not bypass
        elif cfg.actor.use_dynamic_bsz:
            # verl's dynamic micro-batching then moves groups of rollout.n consecutive
            # responses (one question, by the balancing above) as a unit.
            batch.extra_info["force_group_size"] = int(cfg.rollout.n)
        return update(self, batch, metrics)

    cls._balance_batch = _mark(_balance_batch)
    cls._update_actor = _mark(_update_actor)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch(module)`` right after ``name`` is first imported."""

    def __init__(self, name: str, patch: Callable[[ModuleType], None]) -> None:
        self.name = name
        self.patch = patch

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        patch = self.patch

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: ModuleType) -> None:
                loader.exec_module(module)  # type: ignore[union-attr]
                patch(module)

        spec.loader = _Loader()
        return spec


def _patch_when_imported(name: str, patch: Callable[[ModuleType], None]) -> None:
    module = sys.modules.get(name)
    if module is not None:
        patch(module)
        return
    if not any(isinstance(f, _PatchAfterImport) and f.name == name for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport(name, patch))


def install_v1_trainer_hook() -> None:
    _patch_when_imported(V1_TRAINER, patch_v1_trainer)


def disco_options(worker: Any) -> VerlDiscoOptions | None:
    """The DisCO options of a training worker whose loss is DisCO (its ``loss_fn`` is
    ``partial(ppo_loss, config=ActorConfig)``); None for any other worker (critic, other
    losses)."""
    from .loss import options_of

    config = getattr(getattr(worker, "loss_fn", None), "keywords", {}).get("config")
    node = getattr(config, "policy_loss", None)
    if node is None or getattr(node, "loss_mode", None) != NAME:
        return None
    return options_of(config)


def lagrangian_options(worker: Any) -> VerlDiscoOptions | None:
    """The DisCO options of a training worker whose loss is DisCO with
    ``constraint=lagrangian``; None for any other worker."""
    options = disco_options(worker)
    if options is None or options.disco.constraint != "lagrangian":
        return None
    return options


@contextlib.contextmanager
def checked_on_every_rank(worker: Any) -> Iterator[None]:
    """Run one pass of ``worker`` with the DisCO loss's checks deferred, then check them on
    every rank at once (``discoloss.adapters.verl.faults``); a no-op for non-DisCO workers
    and ``validate=false``."""
    options = disco_options(worker)
    if options is None or not options.validate:
        yield
        return
    from verl.utils.device import get_device_name

    with faults.deferring() as collected:
        yield
    faults.check_pass(collected, device=get_device_name())


def finish_lagrangian_step(worker: Any, kl: Any = None) -> None:
    """After one optimizer step of ``worker`` (a ``TrainingWorker``): the multiplier's update
    with the step's global KL (``kl``, known to every rank, or the loss's shares all-reduced
    over the worker's data-parallel group)."""
    options = lagrangian_options(worker)
    if options is None:
        return
    from verl.utils.device import get_device_name

    lagrangian.finish_step(
        delta=options.disco.delta,
        group=worker.engine.get_data_parallel_group(),
        device=get_device_name(),
        kl=kl,
    )


class _StepState:
    """Per-process: is the next mini-batch the first of a step with the old log-probs computed
    by the actor at theta_old (its current-parameter stats are then the old log-probs')?"""

    first_at_theta_old = False


_STEP = _StepState()


def _largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def current_log_probs(worker: Any, data: Any) -> Any:
    """(R, T) log-probs of the mini-batch ``data`` at the worker's current parameters: verl's
    own forward pass (``engine.infer_batch``, no grad, eval mode, as for the old log-probs),
    micro-batched like ``compute_log_prob`` (``rollout.log_prob_*`` settings), padded like the
    loss's inputs."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    cfg = worker.engine_config
    rows = len(data)
    micro = cfg.infer_micro_batch_size_per_gpu or cfg.micro_batch_size_per_gpu or rows
    td = data.copy()  # shallow: verl's forward writes its batch info into the copy
    tu.assign_non_tensor(
        td,
        use_remove_padding=worker.model_config.get("use_remove_padding", False),
        use_dynamic_bsz=cfg.use_dynamic_bsz,
        max_token_len_per_gpu=cfg.infer_max_token_len_per_gpu or cfg.max_token_len_per_gpu,
        # verl's fixed micro-batching needs a divisor of the rows
        micro_batch_size_per_gpu=_largest_divisor(rows, int(micro)),
        use_fused_kernels=cfg.use_fused_kernels,
        calculate_entropy=False,
    )
    with worker.engine.eval_mode(disable_auto_offload=True):
        output = worker.engine.infer_batch(td, loss_function=None)
    return no_padding_2_padding(output["model_output"]["log_probs"], data)


def plan_for_worker(worker: Any, data: Any, options: VerlDiscoOptions) -> planning.Plan:
    """Plan one mini-batch of a training worker (every rank of its DP group)."""
    from verl.utils.device import get_device_id

    start = time.perf_counter()
    first, _STEP.first_at_theta_old = _STEP.first_at_theta_old, False
    config = worker.loss_fn.keywords["config"]
    log_probs = None
    if options.weights == "current" and not first:
        log_probs = current_log_probs(worker, data)
    multiplier = None
    if options.disco.constraint == "lagrangian":
        multiplier = lagrangian.multiplier(lr=options.lagrangian_lr)
    plan = planning.plan_mini_batch(
        data,
        options,
        group_size=int(config.rollout_n),
        log_probs=log_probs,
        group=worker.engine.get_data_parallel_group(),
        multiplier=multiplier,
        device=get_device_id(),
    )
    plan.seconds = time.perf_counter() - start  # the stats forward included
    return plan


def _add_metrics(output: Any, metrics: dict[str, float]) -> None:
    """Add the mini-batch's DisCO metrics to ``train_batch``'s output (verl then averages them
    over the step's mini-batches, like its own ``loss`` and ``grad_norm``)."""
    if output is None:  # a rank that returns no output (model-parallel non-source rank)
        return
    from verl.utils import tensordict_utils as tu

    logged = dict(tu.get(output, "metrics"))
    logged.update({f"actor/disco/{k}": v for k, v in metrics.items()})
    tu.assign_non_tensor(output, metrics=logged)


def patch_engine_workers(module: ModuleType) -> None:
    cls = module.TrainingWorker
    train = cls.train_batch
    if getattr(train, MARK, False):
        return
    infer, save, load = cls.infer_batch, cls.save_checkpoint, cls.load_checkpoint
    train_mini = cls.train_mini_batch

    @functools.wraps(train_mini)
    def train_mini_batch(self: Any, data: Any) -> Any:
        from verl.utils import tensordict_utils as tu

        first = bool(tu.pop(data, key=OLD_AT_THETA_OLD, default=False))
        _STEP.first_at_theta_old = first and disco_options(self) is not None
        try:
            return train_mini(self, data)
        finally:
            _STEP.first_at_theta_old = False

    @functools.wraps(train)
    def train_batch(self: Any, data: Any) -> Any:
        options = disco_options(self)
        if options is None or not options.planned:
            with checked_on_every_rank(self):
                output = train(self, data)
            finish_lagrangian_step(self)
            return output
        plan = plan_for_worker(self, data, options)
        planning.install(data, plan)
        with planning.running(plan), checked_on_every_rank(self):
            output = train(self, data)
        metrics = planning.finish(plan, group=self.engine.get_data_parallel_group())
        finish_lagrangian_step(self, kl=metrics["kl"])
        _add_metrics(output, metrics)
        return output

    @functools.wraps(save)
    def save_checkpoint(self: Any, local_path: str, *args: Any, **kwargs: Any) -> Any:
        result = save(self, local_path, *args, **kwargs)
        if lagrangian_options(self) is not None:
            lagrangian.save_state(local_path)
        return result

    @functools.wraps(load)
    def load_checkpoint(self: Any, local_path: str, *args: Any, **kwargs: Any) -> Any:
        options = lagrangian_options(self)
        if options is not None:  # before verl's load, which may delete the local copy
            lagrangian.load_state(local_path, lr=options.lagrangian_lr)
        return load(self, local_path, *args, **kwargs)

    @functools.wraps(infer)
    def infer_batch(self: Any, data: Any) -> Any:
        # A forward-only pass that computes the loss (compute_loss=True) is no optimizer step:
        # the KL shares it records are dropped.
        pending = lagrangian.state().pending
        try:
            with checked_on_every_rank(self):
                return infer(self, data)
        finally:
            lagrangian.state().pending = pending

    cls.train_batch = _mark(train_batch)
    cls.train_mini_batch = _mark(train_mini_batch)
    cls.infer_batch = _mark(infer_batch)
    cls.save_checkpoint = _mark(save_checkpoint)
    cls.load_checkpoint = _mark(load_checkpoint)


def install_engine_workers_hook() -> None:
    _patch_when_imported(ENGINE_WORKERS, patch_engine_workers)
