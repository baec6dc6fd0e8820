"""Install DisCO into OpenRLHF's classes, in whatever process imports them.

OpenRLHF has no plugin mechanism, so the adapter wraps a few methods. Every wrapper checks
``args.algo.advantage.estimator == "disco"`` at call time and otherwise calls the original
unchanged, so installing it is harmless for other runs.

* ``RemoteExperienceMaker.compute_advantages_and_returns`` (driver-side trainer actor): for
  ``disco``, applies OpenRLHF's length penalties to the rewards, stores each sample's question
  id (``index // n_samples_per_prompt``) in ``experience.info["disco_group_id"]`` (the only field
  that survives the replay buffer's per-sample split; ``index`` is dropped there), and leaves
  advantages/returns empty.
* ``ActorPPOTrainer.__init__``: replaces ``actor_loss_fn`` by :class:`DiscoPolicyLoss` shaped like
  the installed ``PolicyLoss``'s output tuple (detected by calling it once).
* ``ActorPPOTrainer.ppo_train``: serves the replay buffer through a view for the duration of the
  call. With ``--algo.disco.weights current`` or ``sampling`` (planned weights,
  :mod:`.minibatch`): question by question in an order shared by the ranks, cut into
  optimizer steps of any micro-batch size (:class:`~.minibatch.PlannedReplay`), or handed to
  OpenRLHF's dynamic batching in that order (:class:`~.minibatch.PlannedDynamicReplay`). With
  ``micro_batch``: micro-batches of whole questions (:class:`GroupedMicroBatches`).
* ``ppo_actor.iter_grad_accum_global_norm`` (OpenRLHF's optimizer-step windows, non-dynamic
  batching): planned weights: runs the view's windows, the same on every rank, through
  OpenRLHF's function; ``micro_batch``: adds the DisCO normalisers of each window (questions and
  tokens over all DP ranks: one all-reduce of three numbers per optimizer step, outside the loss).
* ``ActorPPOTrainer.training_step``: planned weights: at the first micro-batch of an optimizer
  step, plans the step's mini-batch (stats, one ``plan_minibatch`` over the DP group; see
  :mod:`.minibatch`); then binds the micro-batch's question ids, rewards, weights or normalisers
  and scale to the loss, runs OpenRLHF's own step (backward, optimizer, entropy/KL terms,
  metrics), and after the last micro-batch of an optimizer step updates the Lagrange multiplier.

The extension points are private OpenRLHF code (there is no public one): the methods above, the
replay buffer's ``items``/``collate_fn``/``setup_dynamic_batch`` and the actor's forward.

With ``--algo.disco.constraint lagrangian`` the loss owns a
:class:`~discoloss.constraints.LagrangeMultiplier` (one per actor process). After each
optimizer step the training-step wrapper sums the step's KL shares over the DP ranks (one
all-reduce of one number per optimizer step, outside the loss) and updates the multiplier once,
identically on every rank. Its state is saved next to the actor's DeepSpeed checkpoint, in the
tag's folder (``<ckpt.path>/_actor/<tag>/discoloss_lagrange_rank<r>.pt``, written by a wrapper of
the trainer's ``strategy.save_ckpt`` for the actor's model), and restored when the trainer is
built with ``--ckpt.load_enable`` from the tag DeepSpeed resumes from (the ``latest`` file).

Patching happens when the module is imported (a post-import hook), so that processes which
never import the trainer (e.g. vLLM engines) are not made to import DeepSpeed.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.abc
import importlib.machinery
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any

import torch
from discoloss.adapters.openrlhf.loss import (
    DiscoMicroBatch,
    DiscoPolicyLoss,
    policy_loss_outputs,
    stop_together,
)
from discoloss.adapters.openrlhf.minibatch import (
    BATCH_ATTR,
    GROUP_KEY,
    PlannedDynamicReplay,
    PlannedReplay,
    Window,
    collate_micro_batch,
    item_group,
    mix_seed,
    plan_window,
)
from discoloss.adapters.openrlhf.settings import ESTIMATOR, DiscoSettings, settings_from_args

from discoloss.constraints import LagrangeMultiplier

__all__ = [
    "GROUP_KEY",
    "GroupedMicroBatches",
    "install",
    "installed_modules",
    "is_disco",
]

EXPERIENCE_MAKER = "openrlhf.trainer.ppo_utils.experience_maker"
PPO_ACTOR = "openrlhf.trainer.ray.ppo_actor"

_MARK = "__discoloss_original__"

#: File of the Lagrange multiplier's state in a checkpoint tag's folder (one per rank).
MULTIPLIER_FILE = "discoloss_lagrange_rank{rank}.pt"

#: The replay-buffer view of the patched ``ppo_train`` running in this context (read by the
#: window wrapper).
_ACTIVE_VIEW: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "discoloss_active_view", default=None)
_lock = threading.RLock()
_patched: set[str] = set()


def is_disco(args: Any) -> bool:
    algo = getattr(args, "algo", None)
    advantage = getattr(algo, "advantage", None)
    return bool(getattr(advantage, "estimator", None) == ESTIMATOR)


def _wrap(owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = getattr(owner, name, None)
    if original is None:
        raise RuntimeError(
            f"discoloss: {getattr(owner, '__name__', owner)}.{name} not found in the installed "
            "OpenRLHF; the DisCO adapter supports openrlhf 0.11.x"
        )
    if getattr(original, _MARK, None) is not None:
        return
    wrapper = make(original)
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, _MARK, original)
    setattr(owner, name, wrapper)


# --------------------------------------------------------------------------------------------
# Experience maker (runs in the PPOTrainer Ray actor)
# --------------------------------------------------------------------------------------------


def disco_experiences(experiences: list[Any], args: Any, apply_length_penalties: Callable[..., Any]
                      ) -> list[Any]:
    """The ``disco`` branch of ``compute_advantages_and_returns``.

    Rewards are promoted to float32 and pass through OpenRLHF's length penalties, as for every
    other estimator. Sample ``i`` of the rollout (``experience.index``) belongs to question
    ``i // n``: the samples generator appends a prompt's n responses consecutively.
    """
    n = int(args.rollout.n_samples_per_prompt)
    for exp in experiences:
        exp.rewards = exp.rewards.to(torch.promote_types(exp.rewards.dtype, torch.float32))
    apply_length_penalties(experiences, args)

    index = [int(i) for exp in experiences for i in exp.index]
    total = len(index)
    if sorted(index) != list(range(total)):
        raise RuntimeError("discoloss: experience.index is not a permutation of the rollout; "
                           "cannot recover question ids")
    if total % n:
        raise ValueError(f"--rollout.n_samples_per_prompt: the rollout has {total} samples, not a "
                         f"multiple of n={n}; DisCO needs every question's n responses")
    rewards = torch.empty(total, dtype=torch.float32)
    rewards[torch.tensor(index)] = torch.cat(
        [exp.rewards.float().reshape(-1) for exp in experiences])
    group_std = rewards.view(-1, n).std(-1)
    for exp in experiences:
        ids = torch.tensor([int(i) for i in exp.index], dtype=torch.long) // n
        exp.info[GROUP_KEY] = ids
        exp.info["group_reward_std"] = group_std[ids]
        exp.info["return"] = exp.rewards.reshape(-1).clone()
        exp.advantages = None
        exp.returns = None
        exp.kl = None
    return experiences


def _patch_experience_maker(module: ModuleType) -> None:
    cls = module.RemoteExperienceMaker
    penalties = getattr(module, "apply_length_penalties", None)
    if penalties is None:
        raise RuntimeError("discoloss: openrlhf experience_maker.apply_length_penalties not found; "
                           "the DisCO adapter supports openrlhf 0.11.x")

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        def compute_advantages_and_returns(self: Any, experiences: Any, *args: Any, **kwargs: Any
                                           ) -> Any:
            if not is_disco(self.strategy.args):
                return original(self, experiences, *args, **kwargs)
            return disco_experiences(experiences, self.strategy.args, module.apply_length_penalties)

        return compute_advantages_and_returns

    _wrap(cls, "compute_advantages_and_returns", make)


# --------------------------------------------------------------------------------------------
# Actor (runs in every PolicyModelActor Ray actor)
# --------------------------------------------------------------------------------------------


class GroupedMicroBatches(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """The replay buffer seen as a list of micro-batches of whole questions
    (``--algo.disco.weights micro_batch``).

    ``ppo_train`` builds ``DataLoader(buffer, batch_size=buffer.sample_batch_size,
    shuffle=..., collate_fn=buffer.collate_fn)``; with this view ``sample_batch_size`` is 1 and
    an element is a whole micro-batch, so shuffling permutes micro-batches, never splits them.
    Questions are shuffled as units (``torch.randperm``, OpenRLHF's seeded default generator)
    when the view is built. Other attributes are those of the wrapped buffer.
    """

    sample_batch_size = 1

    def __init__(self, buffer: Any, *, micro_batch_size: int, n_samples_per_prompt: int) -> None:
        self.buffer = buffer
        self.micro_batches = group_micro_batches(
            [item_group(item) for item in buffer.items],
            micro_batch_size=micro_batch_size,
            n_samples_per_prompt=n_samples_per_prompt,
        )

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __getitem__(self, idx: int) -> list[Any]:
        return [self.buffer.items[i] for i in self.micro_batches[idx]]

    def collate_fn(self, batch: list[list[Any]]) -> Any:
        (items,) = batch
        return collate_micro_batch(self.buffer, items)

    def __getattr__(self, name: str) -> Any:
        if name == "buffer":
            raise AttributeError(name)
        return getattr(self.buffer, name)


def group_micro_batches(group_of: list[int], *, micro_batch_size: int, n_samples_per_prompt: int
                        ) -> list[list[int]]:
    """Pack sample indices into micro-batches of whole questions, questions in random order.

    group_of[i] is the question id of sample i. Every question must hold exactly
    ``n_samples_per_prompt`` samples on this rank, and ``micro_batch_size`` must be a multiple of
    it; the number of samples must fill whole micro-batches.
    """
    n = n_samples_per_prompt
    if micro_batch_size % n:
        raise ValueError(f"--train.micro_batch_size={micro_batch_size} must be a multiple of "
                         f"--rollout.n_samples_per_prompt={n}")
    members: dict[int, list[int]] = {}
    for i, g in enumerate(group_of):
        members.setdefault(g, []).append(i)
    for g, idx in members.items():
        if len(idx) != n:
            raise RuntimeError(
                f"discoloss: question {g} has {len(idx)} of its n={n} responses on this actor "
                "rank; its responses were split across ranks, which --algo.disco.weights "
                "micro_batch cannot train on (current and sampling can). This happens with a "
                "partial last rollout batch (make the number of prompts a multiple of "
                "--rollout.batch_size) or a layout that does not deal whole questions to the ranks"
            )
    if len(group_of) % micro_batch_size:
        raise RuntimeError(
            f"discoloss: {len(group_of)} samples on this rank do not fill micro-batches of "
            f"--train.micro_batch_size={micro_batch_size}"
        )
    groups = list(members.values())
    order = torch.randperm(len(groups)).tolist()
    per_micro = micro_batch_size // n
    return [
        [i for k in order[j:j + per_micro] for i in groups[k]]
        for j in range(0, len(order), per_micro)
    ]


def _dp_group_and_size(strategy: Any) -> tuple[Any, int]:
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    mesh = getattr(strategy, "ds_device_mesh", None)
    group = mesh["dp"].get_group() if mesh is not None else None
    return group, dist.get_world_size(group=group)


def _window_counts(experience: Any, mask: torch.Tensor, settings: DiscoSettings
                   ) -> tuple[float, float, float]:
    """(questions, questions with a positive and a negative, response tokens) of a micro-batch."""
    ids = getattr(experience, BATCH_ATTR)["group_ids"]
    positive = experience.rewards.reshape(-1) > settings.threshold
    _, dense = torch.unique(ids, return_inverse=True)
    num = int(dense.max()) + 1 if dense.numel() else 0
    pos = torch.zeros(num, dtype=torch.long).index_add_(0, dense.cpu(), positive.long().cpu())
    cnt = torch.bincount(dense.cpu(), minlength=num)
    valid = int(((pos > 0) & (pos < cnt)).sum())
    return float(num), float(valid), float(mask.sum())


def _device() -> torch.device:
    return (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
            else torch.device("cpu"))


def _ds_accumulation(trainer: Any) -> int:
    """DeepSpeed's gradient accumulation steps, the divisor of every backward loss: OpenRLHF's
    ``accumulated_gradient``, or 1 with dynamic batching (OpenRLHF then configures DeepSpeed with
    one micro-batch per step and steps the optimizer itself at each window's end)."""
    if trainer.args.train.dynamic_batch_enable:
        return 1
    return max(int(trainer.strategy.accumulated_gradient), 1)


def disco_windows(original: Callable[..., Iterator[Any]], data_iter: Iterable[Any], strategy: Any,
                  accumulated_gradient: int, mask_fn: Callable[[Any], torch.Tensor]
                  ) -> Iterator[Any]:
    """OpenRLHF's optimizer-step windows (non-dynamic batching), for DisCO.

    Planned weights (the running ``ppo_train`` serves a :class:`~.minibatch.PlannedReplay`):
    ``data_iter`` yields one slot per optimizer step; the k-th slot runs the k-th window of the
    view's epoch (the same on every rank), whose micro-batches go through OpenRLHF's function
    (its normalisers of the entropy and KL-loss terms). The plan itself is made by the
    training-step wrapper at the window's first micro-batch.

    Whole questions per micro-batch (``micro_batch``): groups ``data_iter`` into windows of
    ``gas`` micro-batches exactly as ``iter_grad_accum_global_norm`` does (DeepSpeed's
    accumulation boundaries), sums the window's questions and tokens over the DP ranks and gives
    every micro-batch the window's normalisers G_W, T_W and the scale gas * dp (see
    :mod:`discoloss.adapters.openrlhf.loss`); then yields what OpenRLHF's function yields.
    """
    view = _ACTIVE_VIEW.get()
    gas = max(int(accumulated_gradient), 1)
    if isinstance(view, PlannedReplay):
        for _slot, step in zip(data_iter, view.epoch_windows()):
            yield from original(iter(step.micro_batches), strategy, gas, mask_fn)
        return

    settings = settings_from_args(strategy.args)
    group, dp = _dp_group_and_size(strategy)

    def emit(window: list[Any]) -> Iterator[Any]:
        counts = [_window_counts(exp, mask_fn(exp), settings) for exp in window]
        totals = torch.tensor([sum(c[i] for c in counts) for i in range(3)], dtype=torch.float64,
                              device=_device())
        if group is not None or dp > 1:
            torch.distributed.all_reduce(totals, group=group)
        # 0-d tensors on the loss device: nothing is read back to the host
        num_groups = totals[0 if settings.normalize == "all" else 1].clamp_min(1.0)
        num_tokens = totals[2].clamp_min(1.0)
        for k, exp in enumerate(window):
            batch = getattr(exp, BATCH_ATTR)
            batch["num_groups"] = num_groups
            batch["num_tokens"] = num_tokens
            batch["scale"] = float(gas * dp)
            batch["last"] = k == len(window) - 1
        yield from original(iter(window), strategy, gas, mask_fn)

    window: list[Any] = []
    for item in data_iter:
        window.append(item)
        if len(window) == gas:
            yield from emit(window)
            window = []
    if window:
        yield from emit(window)


def update_multiplier(multiplier: LagrangeMultiplier, local_kl: torch.Tensor | None, *,
                      delta: float, group: Any, dp: int, device: torch.device) -> torch.Tensor:
    r"""One dual-ascent step with the optimizer step's global KL:

    .. math:: KL_W = \sum_{ranks} \sum_{m \in W} (t_m / T_W) KL_m, \qquad
              \lambda \leftarrow \max(0, \lambda + \eta (KL_W - \delta)).

    ``local_kl`` is this rank's share (0-d, from :meth:`DiscoPolicyLoss.take_step_kl`; None counts
    as 0). One all-reduce of one float64 when distributed; no host sync. Returns KL_W.
    """
    kl = (torch.zeros((), dtype=torch.float64, device=device) if local_kl is None
          else local_kl.detach().to(device=device, dtype=torch.float64).reshape(()).clone())
    if group is not None or dp > 1:
        torch.distributed.all_reduce(kl, group=group)
    multiplier.update(kl, delta=delta, validate=False)  # a non-finite KL_W leaves lambda as is
    return kl


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _ckpt_dir(args: Any) -> str | None:
    ckpt = getattr(args, "ckpt", None)
    path = getattr(ckpt, "path", None)
    return None if path is None else os.path.join(path, "_actor")


def save_multiplier(multiplier: LagrangeMultiplier, save_dir: str, tag: str | None) -> str:
    """Write the multiplier's state into the checkpoint tag's folder (``tag=None``: the one named
    by DeepSpeed's ``latest`` file); return the file's path."""
    if tag is None:
        with open(os.path.join(save_dir, "latest")) as f:
            tag = f.read().strip()
    folder = os.path.join(save_dir, str(tag))
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, MULTIPLIER_FILE.format(rank=_rank()))
    torch.save(multiplier.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load_multiplier(multiplier: LagrangeMultiplier, load_dir: str) -> str | None:
    """Restore the multiplier from the checkpoint DeepSpeed resumes from (``load_dir/latest``);
    return the file read, or None (with a warning if a checkpoint exists but has no multiplier)."""
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        tag = f.read().strip()
    path = os.path.join(load_dir, tag, MULTIPLIER_FILE.format(rank=_rank()))
    if not os.path.isfile(path):
        warnings.warn(f"discoloss: the checkpoint {os.path.join(load_dir, tag)} has no Lagrange "
                      f"multiplier ({os.path.basename(path)}); it starts again from 0",
                      RuntimeWarning, stacklevel=2)
        return None
    multiplier.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return path


def _attach_checkpointing(trainer: Any, loss_fn: DiscoPolicyLoss) -> None:
    """Save the multiplier with the actor's checkpoints (wrapping this trainer's
    ``strategy.save_ckpt``, the call ``PolicyModelActor.save_checkpoint`` makes) and restore it
    now if OpenRLHF resumes (``--ckpt.load_enable``; the trainer is built right after the actor's
    DeepSpeed checkpoint is loaded)."""
    multiplier = loss_fn.multiplier
    if multiplier is None:
        return
    strategy, args = trainer.strategy, trainer.args
    ckpt = getattr(args, "ckpt", None)
    load_dir = _ckpt_dir(args)
    if load_dir is not None and getattr(ckpt, "load_enable", False) and os.path.isdir(load_dir):
        load_multiplier(multiplier, load_dir)
    save_ckpt = getattr(strategy, "save_ckpt", None)
    if save_ckpt is None or getattr(save_ckpt, _MARK, None) is not None:
        return

    @functools.wraps(save_ckpt)
    def save_ckpt_with_multiplier(model: Any, save_dir: str, tag: str | None = None,
                                  *rest: Any, **kwargs: Any) -> Any:
        out = save_ckpt(model, save_dir, tag, *rest, **kwargs)
        if model is getattr(trainer.actor, "model", None):
            save_multiplier(multiplier, save_dir, tag)
        return out

    setattr(save_ckpt_with_multiplier, _MARK, save_ckpt)
    strategy.save_ckpt = save_ckpt_with_multiplier


def replay_view(trainer: Any, buffer: Any) -> Any:
    """The view of the replay buffer that the patched ``ppo_train`` serves (see the module
    docstring); the question order of planned views is seeded by ``--train.seed`` and the number
    of ``ppo_train`` calls so far, the same on every rank."""
    args = trainer.args
    settings = settings_from_args(args)
    if not settings.planned:
        return GroupedMicroBatches(
            buffer,
            micro_batch_size=int(trainer.micro_train_batch_size),
            n_samples_per_prompt=int(args.rollout.n_samples_per_prompt),
        )
    calls = getattr(trainer, "_discoloss_ppo_calls", 0)
    trainer._discoloss_ppo_calls = calls + 1
    seed = mix_seed(int(getattr(getattr(args, "train", None), "seed", 0) or 0), calls)
    if args.train.dynamic_batch_enable:
        return PlannedDynamicReplay(buffer, seed=seed)
    return PlannedReplay(buffer, micro_batch_size=int(trainer.micro_train_batch_size),
                         accumulated_gradient=int(trainer.strategy.accumulated_gradient),
                         seed=seed)


def current_log_probs(trainer: Any, experience: Any, device: torch.device) -> torch.Tensor:
    """The micro-batch's action log-probs at the current parameters, as OpenRLHF's actor
    computes the old log-probs (``PolicyModelActor.forward``: eval mode, no grad) with the
    inputs of ``training_step``'s forward."""
    actor = trainer.actor
    mm_inputs: dict[str, Any] = {}
    if getattr(experience, "mm_train_inputs", None) and getattr(actor, "is_vlm", False):
        from openrlhf.utils.vlm_utils import merge_mm_train_inputs

        mm_inputs = merge_mm_train_inputs(experience.mm_train_inputs, device)
    was_training = actor.training
    actor.eval()
    try:
        with torch.no_grad():
            log_probs: torch.Tensor = actor(
                experience.sequences.to(device),
                experience.action_mask.to(device),
                attention_mask=experience.attention_mask.to(device),
                ring_attn_group=trainer.strategy.ring_attn_group,
                **mm_inputs,
            )
    finally:
        actor.train(was_training)
    return log_probs


def plan_step(trainer: Any, window: Window, *, dp_group: Any, dp_size: int) -> None:
    """Plan the optimizer step ``window`` belongs to (collective over the DP group): stats at
    the current parameters with ``--algo.disco.weights current`` (free on the first step of a
    ``ppo_train`` call, where the old log-probs are the actor's own at these parameters), at the
    sampling policy with ``sampling``; then :func:`~.minibatch.plan_window`."""
    loss_fn: DiscoPolicyLoss = trainer.actor_loss_fn
    settings = loss_fn.settings
    device = _device()
    use_old = settings.weights == "sampling" or window.theta_old

    def forward(experience: Any) -> torch.Tensor:
        return current_log_probs(trainer, experience, device)

    def agree(bad: torch.Tensor, explain: Callable[[], Exception]) -> None:
        stop_together(bad, explain, group=dp_group, dp_size=dp_size)

    group = None
    if dp_size > 1:
        group = dp_group if dp_group is not None else torch.distributed.group.WORLD
    plan_window(window, settings, device=device, forward=None if use_old else forward,
                multiplier=loss_fn.multiplier, stop_together=agree, process_group=group)


def _patch_ppo_actor(module: ModuleType) -> None:
    cls = module.ActorPPOTrainer

    def make_init(original: Callable[..., Any]) -> Callable[..., Any]:
        def __init__(self: Any, strategy: Any, *args: Any, **kwargs: Any) -> None:
            original(self, strategy, *args, **kwargs)
            if is_disco(self.args):
                self.actor_loss_fn = DiscoPolicyLoss(
                    settings_from_args(self.args), policy_loss_outputs(self.actor_loss_fn))
                _attach_checkpointing(self, self.actor_loss_fn)

        return __init__

    def make_ppo_train(original: Callable[..., Any]) -> Callable[..., Any]:
        def ppo_train(self: Any, *args: Any, **kwargs: Any) -> Any:
            if not is_disco(self.args):
                return original(self, *args, **kwargs)
            buffer = self.replay_buffer
            view = replay_view(self, buffer)
            self.replay_buffer = view
            if isinstance(self.actor_loss_fn, DiscoPolicyLoss):
                self.actor_loss_fn.take_step_kl()  # nothing left over from an interrupted step
            token = _ACTIVE_VIEW.set(view)
            try:
                return original(self, *args, **kwargs)
            finally:
                _ACTIVE_VIEW.reset(token)
                self.replay_buffer = buffer
                if isinstance(view, PlannedDynamicReplay):
                    view.close()

        return ppo_train

    def make_training_step(original: Callable[..., Any]) -> Callable[..., Any]:
        def training_step(self: Any, experience: Any, *args: Any, **kwargs: Any) -> Any:
            if not is_disco(self.args):
                return original(self, experience, *args, **kwargs)
            loss_fn = self.actor_loss_fn
            if not isinstance(loss_fn, DiscoPolicyLoss):
                raise RuntimeError("discoloss: actor_loss_fn is not the DisCO loss; the trainer "
                                   "was constructed before the adapter was installed")
            batch: dict[str, Any] = getattr(experience, BATCH_ATTR, None) or {}
            planned = "window" in batch
            if not (planned or "scale" in batch):
                raise RuntimeError(
                    "discoloss: this micro-batch was not formed by the DisCO adapter "
                    "(no question ids / scales); ActorPPOTrainer.ppo_train must be the patched one"
                )
            dp_group, dp_size = _dp_group_and_size(self.strategy)
            if planned:
                window: Window = batch["window"]
                if window.plans is None:  # the optimizer step's first micro-batch: plan it
                    plan_step(self, window, dp_group=dp_group, dp_size=dp_size)
                assert window.plans is not None
                plan = window.plans[batch["position"]]
                bound = DiscoMicroBatch(
                    group_ids=batch["group_ids"], rewards=experience.rewards,
                    scale=float(_ds_accumulation(self) * dp_size), info=experience.info,
                    dp_group=dp_group, dp_size=dp_size, plan=plan, rows=batch["rows"])
                last = plan.last
            else:
                bound = DiscoMicroBatch(
                    group_ids=batch["group_ids"], rewards=experience.rewards,
                    scale=batch["scale"], info=experience.info, dp_group=dp_group,
                    dp_size=dp_size, num_groups=batch["num_groups"],
                    num_tokens=batch["num_tokens"])
                last = bool(batch.get("last", False))
            loss_fn.bind(bound)
            try:
                status = original(self, experience, *args, **kwargs)
            finally:
                loss_fn.unbind()
            if last and loss_fn.multiplier is not None:  # the optimizer step is done
                update_multiplier(loss_fn.multiplier, loss_fn.take_step_kl(),
                                  delta=loss_fn.settings.delta, group=dp_group, dp=dp_size,
                                  device=_device())
            return status

        return training_step

    def make_windows(original: Callable[..., Any]) -> Callable[..., Any]:
        def iter_grad_accum_global_norm(data_iter: Any, strategy: Any, accumulated_gradient: Any,
                                        mask_fn: Any) -> Any:
            if not is_disco(strategy.args):
                return original(data_iter, strategy, accumulated_gradient, mask_fn)
            return disco_windows(original, data_iter, strategy, accumulated_gradient, mask_fn)

        return iter_grad_accum_global_norm

    _wrap(cls, "__init__", make_init)
    _wrap(cls, "ppo_train", make_ppo_train)
    _wrap(cls, "training_step", make_training_step)
    _wrap(module, "iter_grad_accum_global_norm", make_windows)


_PATCHERS: dict[str, Callable[[ModuleType], None]] = {
    EXPERIENCE_MAKER: _patch_experience_maker,
    PPO_ACTOR: _patch_ppo_actor,
}


def _apply(name: str, module: ModuleType) -> None:
    with _lock:
        if name in _patched:
            return
        _PATCHERS[name](module)
        _patched.add(name)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, inner: Any, name: str) -> None:
        self._inner = inner
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _apply(self._name, module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Patches the target modules right after they are executed by the normal import."""

    def find_spec(self, fullname: str, path: Any, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _PATCHERS or fullname in _patched:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _PostImportFinder):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader, fullname)
        return spec  # type: ignore[no-any-return]


def install() -> None:
    """Install the DisCO adapter in this process (idempotent).

    Modules already imported are patched now; the others when they are first imported.
    """
    with _lock:
        if not any(isinstance(f, _PostImportFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, _PostImportFinder())
        for name in _PATCHERS:
            module = sys.modules.get(name)
            if module is not None:
                _apply(name, module)


def installed_modules() -> frozenset[str]:
    """Names of the OpenRLHF modules patched in this process so far."""
    return frozenset(_patched)
