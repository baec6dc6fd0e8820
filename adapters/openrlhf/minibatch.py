r"""Planned DisCO weights per mini-batch in OpenRLHF's actor update (``--algo.disco.weights
current`` or ``sampling``): micro-batches of any size, exact DisCO per optimizer step.

DisCO's gradient is a per-response weighted sum (DESIGN.md section 2,
:mod:`discoloss.accumulation`): once the weights ``w`` and the penalty's slope ``kappa`` of a
whole mini-batch are known, every micro-batch, whatever part of a question it holds,
backpropagates its own terms. Here a mini-batch is one optimizer step of OpenRLHF's actor:
``train.batch_size`` samples over all data-parallel ranks, ``gas`` micro-batches per rank.

**Per optimizer step**, at its first micro-batch (on every rank at once):

1. per-response stats of this rank's micro-batches of the step (:func:`window_stats`): scores,
   KL sums and token counts, from the old log-probs alone (``sampling``, and with ``current``
   the first step of a PPO step, where theta is still theta_old: OpenRLHF's actor computed the
   old log-probs itself, right before ``ppo_train``) or from one no-grad forward per micro-batch
   at the current parameters (``current``, later steps); responses without a response token
   (padding) are left out;
2. :func:`discoloss.accumulation.plan_minibatch` over the data-parallel group: 5 numbers per
   response are gathered, every rank plans the whole mini-batch and keeps its rows' weights; the
   penalty coefficient, the mini-batch's token count N and the logging values are global;
3. every micro-batch then backpropagates ``gas * dp * micro_batch_loss(...)`` with its rows'
   weights (DeepSpeed divides by ``gas`` and averages over the ``dp`` ranks), see
   :mod:`.loss`.

With ``current`` the update's gradient is the gradient of :func:`discoloss.disco_loss` on the
whole mini-batch at the step's parameters, squared hinge included (its coefficient is
``beta * [KL - delta]_+`` with the mini-batch's KL at those parameters). With ``sampling`` the
weights are those of the sampling policy: exact for ``disco_b`` (whose weights do not depend on
the scores) and on the first step of a PPO step, an approximation afterwards; its penalty is
the per-micro-batch local form (``micro_batch_loss(kl_coef=None)``) for the squared hinge and the
hinge, and exact for the constraints linear in the KL.

**Which responses form a mini-batch.** OpenRLHF shuffles samples; a mini-batch of random
samples would hold a few responses of many questions, and questions without both a positive and
a negative in the mini-batch give no signal. So the replay buffer is served question by
question instead (:func:`question_order`): every rank orders its samples by a random order of
the question ids that all ranks share (seeded, no communication), then cuts that order into
optimizer steps of ``gas * micro`` samples (or hands it to OpenRLHF's dynamic batching, which
cuts it into steps of ``train.batch_size / dp`` samples and those into length-balanced
micro-batches). A mini-batch thus holds whole questions whenever each rank's share of the rollout
and of a step are whole questions, and otherwise splits only the questions at its edges.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from discoloss.adapters.openrlhf.settings import DiscoSettings
from torch import Tensor

from discoloss.accumulation import ResponseStats, plan_minibatch, response_stats
from discoloss.constraints import LagrangeMultiplier

__all__ = [
    "GROUP_KEY",
    "MicroBatchPlan",
    "PlannedDynamicReplay",
    "PlannedReplay",
    "Window",
    "collate_micro_batch",
    "item_group",
    "mix_seed",
    "plan_window",
    "question_order",
    "window_stats",
]

#: Key of ``experience.info`` carrying each sample's question id from the experience maker to
#: the actor.
GROUP_KEY = "disco_group_id"
#: Attribute set on a collated micro-batch ``Experience``: a dict moved by ``to_device``.
BATCH_ATTR = "disco"

#: Constraints whose penalty is linear in the KL: their slope does not depend on the KL, so
#: the plan's coefficient is exact whatever parameters the stats were taken at.
_LINEAR = ("kl_penalty", "lagrangian", "none")

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): the same on every rank and Python run."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h


def question_order(group_of: Sequence[int], seed: int) -> list[int]:
    """Sample indices, question by question, the questions in a random order given by ``seed``.

    group_of[i] is the question id of sample i. The order of the questions depends only on the
    seed and the ids, so every rank that holds part of a question places it at the same rank in
    the shared order; a question's samples keep their order.
    """
    return sorted(range(len(group_of)), key=lambda i: (mix_seed(seed, group_of[i]), group_of[i], i))


def collate_micro_batch(buffer: Any, items: list[Any]) -> Any:
    """OpenRLHF's collation of ``items`` (single-sample experiences) into one micro-batch, with
    the question ids moved from ``info`` to ``experience.disco["group_ids"]`` ((b,) int64) and
    the rows that hold response tokens (``disco["rows"]``: None when all do)."""
    experience = buffer.collate_fn([items] if buffer.dynamic_batch else items)
    ids = experience.info.pop(GROUP_KEY)
    group_ids = ids if isinstance(ids, Tensor) else torch.stack([torch.as_tensor(i) for i in ids])
    nonempty = experience.action_mask.reshape(experience.action_mask.shape[0], -1).any(-1)
    rows = None if bool(nonempty.all()) else nonempty.nonzero().squeeze(1)  # CPU: no device sync
    setattr(experience, BATCH_ATTR, {"group_ids": group_ids.reshape(-1).long(), "rows": rows})
    return experience


def item_group(item: Any) -> int:
    """The question id of a replay-buffer sample."""
    try:
        value = item.info[GROUP_KEY]
    except (KeyError, TypeError):
        raise RuntimeError(
            "discoloss: a replay-buffer sample has no question id (experience.info"
            f"[{GROUP_KEY!r}]); the experiences were not made with the DisCO estimator in this "
            "process tree (is the worker setup hook installed in the trainer actor?)"
        ) from None
    return int(value)


class MicroBatchPlan(NamedTuple):
    """What the loss needs for one micro-batch of a planned mini-batch.

    weights: (b,) the plan's weights of this micro-batch's rows (0 for rows without a response
      token), on the loss device.
    kl_coef: 0-d penalty slope of the mini-batch, or None for the local form (``sampling`` with
      the squared hinge or the hinge).
    num_tokens: 0-d N, response tokens of the mini-batch over all ranks.
    metrics: detached 0-d logging values of the mini-batch (the plan's ``output.metrics``, at
      the parameters the stats were taken at).
    current: whether the stats were taken at the current parameters (``current``, or the first
      optimizer step of a PPO step).
    last: whether this is the last micro-batch of its optimizer step on this rank.
    """

    weights: Tensor
    kl_coef: Tensor | None
    num_tokens: Tensor
    metrics: dict[str, Tensor]
    current: bool
    last: bool


@dataclass(eq=False)
class Window:
    """This rank's micro-batches of one optimizer step, and their plan once computed.

    micro_batches: collated ``Experience`` objects, each with ``disco = {"group_ids", "rows",
    "window", "position"}``. theta_old: True for the first optimizer step of a ``ppo_train``
    call, whose parameters are those that computed the old log-probs.
    """

    micro_batches: list[Any]
    theta_old: bool
    plans: list[MicroBatchPlan] | None = field(default=None)

    def __post_init__(self) -> None:
        for k, experience in enumerate(self.micro_batches):
            getattr(experience, BATCH_ATTR).update(window=self, position=k)


class PlannedReplay(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """The replay buffer seen by ``ppo_train`` as optimizer steps (non-dynamic batching).

    OpenRLHF's ``DataLoader(buffer, shuffle=True)`` draws an independent random order on every
    rank, but a question whose samples sit on two ranks must be in the same optimizer step on
    both. So an element of this view is a slot for one optimizer step: the DataLoader only paces
    the iteration (its length is the number of steps), and the k-th slot served in an epoch runs
    the k-th window of :meth:`epoch_windows`, the same k on every rank. Each epoch draws a new
    question order. Other attributes are those of the wrapped buffer.
    """

    sample_batch_size = 1

    def __init__(self, buffer: Any, *, micro_batch_size: int, accumulated_gradient: int,
                 seed: int) -> None:
        self.buffer = buffer
        self.micro_batch_size = int(micro_batch_size)
        self.accumulated_gradient = max(int(accumulated_gradient), 1)
        self.seed = int(seed)
        self.groups = [item_group(item) for item in buffer.items]
        self.epoch = 0
        num_micro = len(self.groups) // self.micro_batch_size  # OpenRLHF's drop_last
        self.num_windows = -(-num_micro // self.accumulated_gradient)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, idx: int) -> int:
        return idx

    def collate_fn(self, batch: list[int]) -> int:
        return batch[0]

    def epoch_windows(self) -> Iterator[Window]:
        """The next epoch's optimizer steps: this rank's samples in :func:`question_order`, cut
        into micro-batches of ``micro_batch_size`` (a trailing remainder is dropped, as
        OpenRLHF's DataLoader does) and windows of ``accumulated_gradient`` micro-batches. Each
        window is collated when it is reached."""
        order = question_order(self.groups, mix_seed(self.seed, self.epoch))
        first = self.epoch == 0
        self.epoch += 1
        micro, gas = self.micro_batch_size, self.accumulated_gradient
        chunks = [order[j:j + micro] for j in range(0, len(order) - micro + 1, micro)]
        items = self.buffer.items
        for w in range(0, len(chunks), gas):
            batches = [collate_micro_batch(self.buffer, [items[i] for i in chunk])
                       for chunk in chunks[w:w + gas]]
            yield Window(batches, theta_old=first and w == 0)

    def __getattr__(self, name: str) -> Any:
        if name == "buffer":
            raise AttributeError(name)
        return getattr(self.buffer, name)


class PlannedDynamicReplay(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """The replay buffer seen by ``ppo_train`` with ``--train.dynamic_batch_enable``.

    :meth:`setup_dynamic_batch` (which OpenRLHF's ``ppo_train`` calls first) orders the buffer's
    samples question by question and then runs OpenRLHF's own ``setup_dynamic_batch``: its
    optimizer steps (consecutive ``train.batch_size / dp`` samples) hold whole questions where
    the ranks' shares allow, and its token-balanced micro-batches split them freely. OpenRLHF
    serves micro-batches in order (no shuffle with dynamic batching); the first micro-batch of
    an optimizer step collates the whole step (:class:`Window`). The buffer's order is restored
    by :meth:`close`.
    """

    sample_batch_size = 1

    def __init__(self, buffer: Any, *, seed: int) -> None:
        self.buffer = buffer
        self.seed = int(seed)
        self.windows: list[list[int]] = []
        self.window_of: list[tuple[int, int]] = []
        self._current: tuple[int, Window] | None = None
        self._served = 0
        self._original_items: list[Any] | None = None

    def setup_dynamic_batch(self, strategy: Any) -> None:
        items = self.buffer.items
        order = question_order([item_group(item) for item in items], mix_seed(self.seed, 0))
        self._original_items = items
        self.buffer.items = [items[i] for i in order]
        self.buffer.setup_dynamic_batch(strategy)
        self.windows, window = [], []
        for idx, step in enumerate(self.buffer.dynamic_optimizer_step):
            window.append(idx)
            if step:
                self.windows.append(window)
                window = []
        if window:
            self.windows.append(window)
        self.window_of = [(w, k) for w, ids in enumerate(self.windows) for k in range(len(ids))]

    def close(self) -> None:
        if self._original_items is not None:
            self.buffer.items = self._original_items
            self._original_items = None

    def __len__(self) -> int:
        return len(self.window_of)

    def __getitem__(self, idx: int) -> int:
        return idx

    def collate_fn(self, batch: list[int]) -> Any:
        (idx,) = batch
        w, k = self.window_of[idx]
        if k == 0:
            items = self.buffer.items
            batches = [collate_micro_batch(self.buffer, [items[i] for i in
                                                         self.buffer.dynamic_indices[m]])
                       for m in self.windows[w]]
            self._current = (w, Window(batches, theta_old=self._served == 0))
            self._served += 1
        if self._current is None or self._current[0] != w:
            raise RuntimeError("discoloss: dynamic-batch micro-batches were not served in order")
        return self._current[1].micro_batches[k]

    def __getattr__(self, name: str) -> Any:
        if name == "buffer":
            raise AttributeError(name)
        return getattr(self.buffer, name)


def _select(rows: Tensor | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    if rows is None:
        return tensors
    return tuple(t[rows.to(t.device)] for t in tensors)


def _stats_options(settings: DiscoSettings) -> dict[str, Any]:
    return dict(score=settings.score, kl_estimator=settings.kl_estimator,
                threshold=settings.threshold, clip_eps=settings.clip_eps)


def window_stats(window: Window, settings: DiscoSettings, *, device: torch.device,
                 forward: Callable[[Any], Tensor] | None
                 ) -> tuple[ResponseStats, Tensor, Tensor, Callable[[], Exception]]:
    """Per-response stats of this rank's responses in ``window`` (rows with a response token).

    ``forward(experience)`` returns the micro-batch's log-probs at the current parameters (no
    grad); None takes the old log-probs (stats at the sampling policy, no forward pass).
    Returns the concatenated stats, rewards and question ids (on ``device``), and a function
    that builds the core's precise error for the first non-finite value (to call only if the
    stats hold one: it recomputes that micro-batch's stats with validation). No host sync.
    """
    parts: list[ResponseStats] = []
    rewards: list[Tensor] = []
    ids: list[Tensor] = []
    inputs: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    options = _stats_options(settings)
    for experience in window.micro_batches:
        batch = getattr(experience, BATCH_ATTR)
        old = experience.action_log_probs.to(device)
        mask = experience.action_mask.to(device)
        reward = experience.rewards.reshape(-1).to(device)
        group_ids = batch["group_ids"].to(device)
        with torch.no_grad():
            log_probs = old if forward is None else forward(experience)
        log_probs, old, mask, reward, group_ids = _select(batch["rows"], log_probs, old, mask,
                                                          reward, group_ids)
        parts.append(response_stats(log_probs, old, mask, rewards=reward, validate=False,
                                    **options))
        rewards.append(reward)
        ids.append(group_ids)
        inputs.append((log_probs, old, mask, reward))

    def explain() -> Exception:
        for (log_probs, old, mask, reward), part in zip(inputs, parts):
            if bool((part.scores.isfinite() & part.kl_sums.isfinite()).all()):
                continue
            if forward is None:  # the stats' log-probs are the old ones: name those
                log_probs = torch.zeros_like(old)
            try:
                response_stats(log_probs, old, mask, rewards=reward, validate=True, **options)
            except (ValueError, TypeError) as error:
                return error
        return ValueError("per-response DisCO stats: non-finite value")

    stats = ResponseStats.cat(parts) if parts else ResponseStats(
        *(torch.zeros(0, device=device) for _ in ResponseStats._fields))
    cat_rewards = torch.cat(rewards) if rewards else torch.zeros(0, device=device)
    cat_ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=device)
    return stats, cat_rewards, cat_ids, explain


def plan_window(window: Window, settings: DiscoSettings, *, device: torch.device,
                forward: Callable[[Any], Tensor] | None,
                multiplier: LagrangeMultiplier | None,
                stop_together: Callable[[Tensor, Callable[[], Exception]], None],
                process_group: Any = None) -> None:
    """Plan ``window``'s mini-batch (over ``process_group``) and store every micro-batch's
    :class:`MicroBatchPlan` in ``window.plans``. Collective when ``process_group`` is given:
    every rank must call it for the same optimizer step.

    ``forward`` as in :func:`window_stats` (None: sampling policy). ``stop_together(bad,
    explain)`` receives a 0-d flag of non-finite stats on this rank and raises the same error
    on every rank if any rank's flag is set (``explain()`` builds this rank's error).
    """
    start = time.perf_counter()
    stats, rewards, group_ids, explain = window_stats(window, settings, device=device,
                                                      forward=forward)
    bad = ~(stats.scores.isfinite().all() & stats.kl_sums.isfinite().all())
    stop_together(bad, explain)
    plan = plan_minibatch(
        stats, rewards, group_ids,
        score=settings.score, objective=settings.objective, tau=settings.tau,
        delta=settings.delta, beta=settings.beta, threshold=settings.threshold,
        normalize=settings.normalize, constraint=settings.constraint, multiplier=multiplier,
        cvar_alpha=settings.cvar_alpha, margin=settings.margin, lam=settings.lam,
        max_length=settings.max_length,  # drpo: the length preference from the stats' lengths
        validate=True, process_group=process_group,
    )
    current = forward is not None or window.theta_old
    kl_coef = plan.kl_coef if current or settings.constraint in _LINEAR else None
    metrics = {k: v.detach() for k, v in plan.output.metrics.items()}
    metrics["plan_seconds"] = torch.tensor(time.perf_counter() - start, device=device)
    plans = []
    offset = 0
    last = len(window.micro_batches) - 1
    for k, experience in enumerate(window.micro_batches):
        batch = getattr(experience, BATCH_ATTR)
        b = int(experience.action_mask.shape[0])
        rows = batch["rows"]
        count = b if rows is None else int(rows.numel())
        local = plan.weights[offset:offset + count]
        offset += count
        if rows is None:
            weights = local
        else:
            weights = torch.zeros(b, dtype=local.dtype, device=local.device)
            weights[rows.to(local.device)] = local
        plans.append(MicroBatchPlan(weights, kl_coef, plan.num_tokens, metrics, current,
                                    k == last))
    window.plans = plans
