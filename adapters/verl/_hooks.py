"""Where the adapter attaches to verl 0.9.1 without forking it (all idempotent, and all inert
unless a run selects ``disco``):

1. ``verl.utils.config.validate_config`` (called by ``main_ppo`` in the driver before Ray
   starts) is wrapped: for DisCO runs it selects :class:`DiscoPolicyLossConfig` as the
   ``policy_loss`` target and runs :func:`~discoloss.adapters.verl.layout.check_config`.
2. ``verl.trainer.ppo.v1.trainer_base.PPOTrainer`` (the default v1 trainer; patched when that
   module is imported, so ``import verl`` stays light) gets a question-aware ``_balance_batch``
   and, with ``use_dynamic_bsz``, passes ``force_group_size=rollout.n`` to the actor update.
3. ``verl.workers.engine_workers.TrainingWorker`` (the actor's training worker, in every Ray
   worker; patched when that module is imported): for DisCO runs with ``validate=true``,
   ``train_batch`` and ``infer_batch`` collect the loss's checks and raise on every rank at
   once after the pass (``discoloss.adapters.verl.faults``); for ``constraint=lagrangian`` runs,
   ``train_batch`` (one optimizer step) is followed by the multiplier's update with the step's
   global KL, ``infer_batch`` (forward only) leaves the step's KL untouched, and
   ``save_checkpoint`` / ``load_checkpoint`` also write / read its state
   (:mod:`discoloss.adapters.verl.lagrangian`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from . import faults, lagrangian
from ._options import NAME, POLICY_LOSS_PATH, DiscoLayoutError, VerlDiscoOptions
from .layout import check_config, group_balanced_order, uses_disco

V1_TRAINER = "verl.trainer.ppo.v1.trainer_base"
ENGINE_WORKERS = "verl.workers.engine_workers"
MARK = "__discoloss__"


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


def balance_whole_questions(trainer: Any, batch: Any, metrics: dict, logging_prefix: str) -> Any:
    """DisCO replacement of ``PPOTrainer._balance_batch`` (v1): whole questions per rank and
    mini-batch, balanced by workload (:func:`group_balanced_order`)."""
    from verl.utils.seqlen_balancing import log_seqlen_unbalance

    wg = trainer.actor_rollout_wg
    if "actor" not in wg._dispatch_info:
        wg._dispatch_info["actor"] = wg._query_dispatch_info("actor")
    dp_size = max(wg._dispatch_info["actor"]) + 1
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
        metrics: dict,
        logging_prefix: str = "global_seqlen",
        keep_minibatch: bool = False,
    ) -> Any:
        if not uses_disco(self.config):
            return balance(
                self, batch, metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch
            )
        return balance_whole_questions(self, batch, metrics, logging_prefix)

    @functools.wraps(update)
    def _update_actor(self: Any, batch: Any, metrics: dict) -> Any:
        cfg = self.config.actor_rollout_ref
        if uses_disco(self.config) and cfg.actor.use_dynamic_bsz:
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
    every rank at once (``discoloss.adapters.verl.faults``); a no-op for non-DisCO workers and ``validate=false``."""
    options = disco_options(worker)
    if options is None or not options.validate:
        yield
        return
    from verl.utils.device import get_device_name

    with faults.deferring() as collected:
        yield
    faults.check_pass(collected, device=get_device_name())


def finish_lagrangian_step(worker: Any) -> None:
    """After one optimizer step of ``worker`` (a ``TrainingWorker``): the multiplier's update
    with the step's global KL, the shares all-reduced over the worker's data-parallel group."""
    options = lagrangian_options(worker)
    if options is None:
        return
    from verl.utils.device import get_device_name

    lagrangian.finish_step(
        delta=options.disco.delta,
        group=worker.engine.get_data_parallel_group(),
        device=get_device_name(),
    )


def patch_engine_workers(module: ModuleType) -> None:
    cls = module.TrainingWorker
    train = cls.train_batch
    if getattr(train, MARK, False):
        return
    infer, save, load = cls.infer_batch, cls.save_checkpoint, cls.load_checkpoint

    @functools.wraps(train)
    def train_batch(self: Any, data: Any) -> Any:
        with checked_on_every_rank(self):
            output = train(self, data)
        finish_lagrangian_step(self)
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
    cls.infer_batch = _mark(infer_batch)
    cls.save_checkpoint = _mark(save_checkpoint)
    cls.load_checkpoint = _mark(load_checkpoint)


def install_engine_workers_hook() -> None:
    _patch_when_imported(ENGINE_WORKERS, patch_engine_workers)
