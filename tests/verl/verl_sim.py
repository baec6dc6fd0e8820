"""Test harness: verl 0.9.1's actor-update data path, driven by verl's own functions.

Only the model and the collectives are simulated: a parameter per response token gives the
log-probs, and DP ranks run one after the other in this process; the gradient average that
FSDP performs is a division by dp_size. Everything else is verl's code: the estimator is called
as verl calls it, dispatch to ranks is contiguous chunking, mini-batches come from
``tensordict_utils.make_iterator``, micro-batches from ``engine.utils.prepare_micro_batches``,
the loss from ``workers.utils.losses.ppo_loss`` and metrics are aggregated with
``py_functional.append_to_dict`` and ``Metric.aggregate_dp`` as the engine worker does.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
import verl  # noqa: F401  (loads the discoloss plugin)
from discoloss.adapters.verl import group_balanced_order
from discoloss.adapters.verl.config import DiscoPolicyLossConfig
from omegaconf import OmegaConf
from tensordict import TensorDict
from verl.utils import tensordict_utils as tu
from verl.utils.metric import Metric
from verl.utils.py_functional import append_to_dict
from verl.workers.config import FSDPActorConfig
from verl.workers.engine.utils import prepare_micro_batches
from verl.workers.utils.losses import ppo_loss


@dataclass
class Batch:
    """A training batch as the trainer holds it after rollout (padded), one row per response."""

    uids: list[str]
    rewards: torch.Tensor  # (B,)
    prompt_lens: list[int]
    resp_lens: list[int]
    theta: torch.Tensor  # (B, T) parameters: log_prob = logsigmoid(theta) at response tokens
    old: torch.Tensor  # (B, T) old log-probs
    mask: torch.Tensor  # (B, T) bool
    advantages: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.uids)


def make_batch(
    group_sizes: list[int],
    *,
    seed: int,
    max_len: int = 7,
    one_token_share: float = 0.25,
    kl_scale: float = 0.05,
    shuffle: bool = True,
) -> Batch:
    """Questions with the given numbers of responses (random uid strings, random 0/1 rewards,
    lengths 1..max_len with a share of 1-token responses), rows in random order."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    rows: list[tuple[str, float]] = []
    for size in group_sizes:
        uid = f"{uuid.UUID(int=rng.getrandbits(128))}_q{rng.randint(0, 9)}"
        rewards = [float(rng.random() < 0.5) for _ in range(size)]
        if size >= 2 and rng.random() < 0.7:  # most questions have signal
            rewards[0], rewards[1] = 1.0, 0.0
        rows += [(uid, r) for r in rewards]
    if shuffle:
        rng.shuffle(rows)
    b = len(rows)
    resp_lens = [1 if rng.random() < one_token_share else rng.randint(2, max_len) for _ in range(b)]
    prompt_lens = [rng.randint(1, 4) for _ in range(b)]
    t = max(resp_lens)
    mask = torch.arange(t)[None, :] < torch.tensor(resp_lens)[:, None]
    theta = torch.randn(b, t, generator=g, dtype=torch.float64)
    old = torch.nn.functional.logsigmoid(
        theta + kl_scale * torch.randn(b, t, generator=g, dtype=torch.float64)
    )
    return Batch(
        uids=[u for u, _ in rows],
        rewards=torch.tensor([r for _, r in rows]),
        prompt_lens=prompt_lens,
        resp_lens=resp_lens,
        theta=theta,
        old=old.float(),
        mask=mask,
    )


def root_config(n: int, **policy_loss: Any) -> Any:
    """A minimal config tree, so that the estimator finds threshold and rollout.n as in verl."""
    return OmegaConf.create(
        {
            "algorithm": {"adv_estimator": "disco"},
            "actor_rollout_ref": {
                "rollout": {"n": n},
                "actor": {"policy_loss": {"loss_mode": "disco", **policy_loss}},
            },
        }
    )


def estimate(batch: Batch, n: int, **policy_loss: Any) -> None:
    """Run the registered disco estimator the way verl's compute_advantage calls it."""
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    cfg = root_config(n, **policy_loss)
    token_rewards = torch.zeros(batch.size, batch.mask.shape[1])
    last = torch.tensor(batch.resp_lens) - 1
    token_rewards[torch.arange(batch.size), last] = batch.rewards
    import numpy as np

    adv, _ = get_adv_estimator_fn("disco")(
        token_level_rewards=token_rewards,
        response_mask=batch.mask.float(),
        config=cfg.algorithm,
        index=np.array(batch.uids, dtype=object),
    )
    batch.advantages = adv


def actor_config(
    n: int, *, micro: int | None, dynamic: bool = False, **options: Any
) -> FSDPActorConfig:
    return FSDPActorConfig(
        strategy="fsdp",
        rollout_n=n,
        ppo_mini_batch_size=1,
        ppo_micro_batch_size_per_gpu=micro,
        use_dynamic_bsz=dynamic,
        policy_loss=DiscoPolicyLossConfig(**options),
    )


def _nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def to_tensordict(batch: Batch, order: list[int]) -> TensorDict:
    """Padding-free layout of verl's update path (only the response positions survive)."""
    assert batch.advantages is not None
    resp = [int(batch.resp_lens[i]) for i in order]
    prompts = [torch.ones(batch.prompt_lens[i], dtype=torch.int64) for i in order]
    responses = [torch.ones(r, dtype=torch.int64) for r in resp]
    td = TensorDict(
        {
            "prompts": _nested(prompts),
            "responses": _nested(responses),
            "input_ids": _nested([torch.cat([p, q]) for p, q in zip(prompts, responses)]),
            "response_mask": _nested([batch.mask[i, :r].long() for i, r in zip(order, resp)]),
            "old_log_probs": _nested([batch.old[i, :r] for i, r in zip(order, resp)]),
            "advantages": _nested([batch.advantages[i, :r] for i, r in zip(order, resp)]),
            "row": torch.tensor(order),
        },
        batch_size=[len(order)],
    )
    td["loss_mask"] = td["response_mask"]
    return td


def model_log_probs(theta: torch.Tensor, batch: Batch, micro: TensorDict) -> torch.Tensor:
    """Nested (prompt + response) log-probs as the model returns them; position p-1+t holds the
    log-prob of response token t (verl's left shift)."""
    out = []
    for i, p, r in zip(
        micro["row"].tolist(),
        micro["prompts"].offsets().diff().tolist(),
        micro["responses"].offsets().diff().tolist(),
    ):
        lp = torch.nn.functional.logsigmoid(theta[i, :r])
        out.append(torch.cat([lp.new_zeros(p - 1), lp, lp.new_zeros(1)]))
    return _nested(out)


@dataclass
class Step:
    grads: list[torch.Tensor]  # per global mini-batch, averaged over ranks
    metrics: list[dict[str, float]]  # per global mini-batch, aggregated as verl does
    members: list[list[int]]  # per global mini-batch, the rows it held


def run_update(
    batch: Batch,
    *,
    n: int,
    dp: int,
    questions_per_mini_batch: int,
    micro: int | None,
    dynamic: bool = False,
    max_token_len: int = 24,
    force_group_size: int | None = None,
    order: list[int] | None = None,
    after_mini_batch: Any = None,
    **options: Any,
) -> Step:
    """One actor update over the batch with ``weights=micro_batch`` (every micro-batch its own
    DisCO loss on whole questions): balance (the adapter's, unless ``order`` is given),
    dispatch, mini-batches, micro-batches, ppo_loss and backward, exactly as verl sequences them.
    """
    options.setdefault("weights", "micro_batch")
    if order is None:
        seq = [p + r for p, r in zip(batch.prompt_lens, batch.resp_lens)]
        order, _ = group_balanced_order(
            batch.uids,
            seq,
            dp_size=dp,
            questions_per_mini_batch=questions_per_mini_batch,
            group_size=n,
        )
    td = to_tensordict(batch, order)
    chunks = tu.chunk_tensordict(td, dp)  # contiguous, as verl dispatches to DP ranks
    mini_global = questions_per_mini_batch * n
    mini_per_gpu = mini_global // dp
    iters = [
        tu.make_iterator(
            c,
            mini_batch_size=mini_per_gpu,
            epochs=1,
            seed=42 + r,
            dataloader_kwargs={"shuffle": False},
        )
        for r, c in enumerate(chunks)
    ]
    config = actor_config(n, micro=micro, dynamic=dynamic, **options)
    theta = batch.theta.clone().requires_grad_(True)
    step = Step([], [], [])
    for _ in range(td.shape[0] // mini_global):
        minis = [next(it) for it in iters]
        tokens = sum(int(m["loss_mask"].values().sum()) for m in minis)
        rank_metrics = []
        members: list[int] = []
        for m in minis:
            tu.assign_non_tensor(
                m,
                dp_size=dp,
                batch_num_tokens=tokens,
                global_batch_size=mini_global,
                use_dynamic_bsz=dynamic,
                micro_batch_size_per_gpu=micro,
                max_token_len_per_gpu=max_token_len,
            )
            if force_group_size is not None:
                tu.assign_non_tensor(m, force_group_size=force_group_size)
            micro_batches, _ = prepare_micro_batches(m)
            agg: dict[str, Any] = {}
            for mb in micro_batches:
                out = {"log_probs": model_log_probs(theta, batch, mb)}
                loss, metrics = ppo_loss(config, out, mb)
                loss.backward()
                append_to_dict(agg, metrics)
                members += mb["row"].tolist()
            rank_metrics.append(agg)
        logged = {}
        for key in rank_metrics[0]:
            vals = [rm[key] for rm in rank_metrics]
            logged[key] = float(Metric.aggregate_dp(vals)) if isinstance(vals[0], Metric) else vals
        step.grads.append((theta.grad / dp).clone())
        theta.grad = None
        step.metrics.append(logged)
        step.members.append(members)
        if after_mini_batch is not None:  # after the optimizer step of this mini-batch
            after_mini_batch()
    return step


def add_padding(batch: Batch, count: int) -> None:
    """Append ``count`` rows like verl's synthetic padding samples: one response token that
    the response mask leaves out, reward 0, one shared uid."""
    t = batch.mask.shape[1]
    batch.uids += ["pad"] * count
    batch.rewards = torch.cat([batch.rewards, torch.zeros(count)])
    batch.prompt_lens += [4] * count
    batch.resp_lens += [1] * count
    batch.theta = torch.cat([batch.theta, torch.zeros(count, t, dtype=batch.theta.dtype)])
    batch.old = torch.cat([batch.old, torch.zeros(count, t, dtype=batch.old.dtype)])
    batch.mask = torch.cat([batch.mask, torch.zeros(count, t, dtype=torch.bool)])


def reference(batch: Batch, rows: list[int], **options: Any) -> tuple[torch.Tensor, Any]:
    """disco_loss on the whole mini-batch (rows; rows without response tokens left out), and
    its gradient wrt theta."""
    from discoloss import disco_loss

    theta = batch.theta.clone().requires_grad_(True)
    rows = [i for i in rows if bool(batch.mask[i].any())]
    idx = torch.tensor(sorted(rows))
    lp = torch.nn.functional.logsigmoid(theta[idx])
    dense = {u: i for i, u in enumerate(dict.fromkeys(batch.uids))}
    groups = torch.tensor([dense[batch.uids[i]] for i in idx.tolist()])
    out = disco_loss(
        lp.float(), batch.old[idx], batch.mask[idx], batch.rewards[idx], groups, **options
    )
    out.loss.backward()
    return theta.grad.clone(), out


def current_log_probs(theta: torch.Tensor, batch: Batch, mini: TensorDict) -> torch.Tensor:
    """(R, T) padded log-probs of a mini-batch's rows at theta (what the adapter's no-grad
    forward pass gives the plan)."""
    resp = mini["responses"].offsets().diff().tolist()
    width = max(resp) if resp else 0
    out = torch.zeros(len(resp), width, dtype=torch.float32)
    for k, (i, r) in enumerate(zip(mini["row"].tolist(), resp)):
        out[k, :r] = torch.nn.functional.logsigmoid(theta[i, :r].detach()).float()
    return out


def run_planned_update(
    batch: Batch,
    *,
    n: int,
    dp: int,
    mini_batch_size: int,
    micro: int | None,
    rank: int = 0,
    group: Any = None,
    dynamic: bool = False,
    max_token_len: int = 24,
    order: list[int] | None = None,
    shuffle: bool = False,
    dp_factor: int | None = None,
    multiplier: Any = None,
    epochs: int = 1,
    **options: Any,
) -> Step:
    """One actor update of ``weights=current/sampling`` on data-parallel rank ``rank`` of
    ``group`` (None: one process, dp=1), as verl and the adapter sequence it: the adapter's
    balancing (unless ``order``), contiguous dispatch, ``make_iterator`` mini-batches (shuffled
    per rank with ``shuffle``), per mini-batch the adapter's plan (stats at theta for
    ``current``, at the old log-probs for ``sampling``) and handoff, verl's
    ``prepare_micro_batches`` (fixed or dynamic), ``ppo_loss`` and backward, the plan's finish.
    Gradients are averaged over the ranks (FSDP's reduction); ``dp_factor`` overrides the
    ``dp_size`` verl reports to the loss (to show that a wrong factor is caught)."""
    import torch.distributed as dist
    from discoloss.adapters.verl import planning
    from discoloss.adapters.verl.layout import mini_batch_balanced_order
    from discoloss.adapters.verl.loss import options_of

    if order is None:
        seq = [p + r for p, r in zip(batch.prompt_lens, batch.resp_lens)]
        order, _ = mini_batch_balanced_order(
            batch.uids, seq, dp_size=dp, mini_batch_size=mini_batch_size
        )
    td = to_tensordict(batch, order)
    chunk = tu.chunk_tensordict(td, dp)[rank]
    it = tu.make_iterator(
        chunk,
        mini_batch_size=mini_batch_size // dp,
        epochs=epochs,
        seed=42 + rank,
        dataloader_kwargs={"shuffle": shuffle},
    )
    config = actor_config(n, micro=micro, dynamic=dynamic, **options)
    opts = options_of(config)
    theta = batch.theta.clone().requires_grad_(True)
    distributed = group is not None
    step = Step([], [], [])
    for mini in it:
        tokens = mini["loss_mask"].values().sum()
        if distributed:
            dist.all_reduce(tokens, group=group)
        tu.assign_non_tensor(
            mini,
            dp_size=dp_factor or dp,
            batch_num_tokens=int(tokens),
            global_batch_size=mini_batch_size,
            use_dynamic_bsz=dynamic,
            micro_batch_size_per_gpu=micro,
            max_token_len_per_gpu=max_token_len,
        )
        lp = current_log_probs(theta, batch, mini) if opts.weights == "current" else None
        plan = planning.plan_mini_batch(
            mini,
            opts,
            group_size=n,
            log_probs=lp,
            group=group if distributed else None,
            multiplier=multiplier,
        )
        planning.install(mini, plan)
        members: list[int] = []
        with planning.running(plan):
            micro_batches, _ = prepare_micro_batches(mini)  # (no count sync: no collective)
            for mb in micro_batches:
                out = {"log_probs": model_log_probs(theta, batch, mb)}
                loss, _ = ppo_loss(config, out, mb)
                loss.backward()
                members += mb["row"].tolist()
        metrics = planning.finish(plan, group=group if distributed else None)
        grad = theta.grad.clone()
        if distributed:
            dist.all_reduce(grad, group=group)
        step.grads.append(grad / dp)
        theta.grad = None
        step.metrics.append(metrics)
        step.members.append(members)
    return step
