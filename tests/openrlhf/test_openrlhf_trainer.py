"""OpenRLHF's real ActorPPOTrainer (__init__, ppo_train, training_step) with DisCO on CPU.

The model is a tiny random Llama loaded from disk by OpenRLHF's Actor; experiences come from
OpenRLHF's RemoteExperienceMaker. The strategy is a stand-in with DeepSpeed's semantics (the
loss of every backward divided by the accumulation steps, an optimizer step every
``accumulated_gradient`` calls, gradients averaged over ranks at the boundary). The gradient of
one update is compared with ``disco_loss`` on the same mini-batch, computed independently.
"""

from __future__ import annotations

import copy
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from orlhf_testkit import N, load_actor, make_args, make_experiences, rollout_samples

from discoloss import disco_loss, kl_divergence, squared_hinge_penalty
from discoloss.adapters.openrlhf.loss import DiscoPolicyLoss
from discoloss.adapters.openrlhf.patch import BATCH_ATTR


class DeepSpeedLikeStrategy:
    """What ActorPPOTrainer calls on OpenRLHF's DeepspeedStrategy, with DeepSpeed's semantics:
    ``engine.backward`` divides the loss by the accumulation steps, ``engine.step`` only steps at
    the accumulation boundary, where gradients are averaged over the data-parallel ranks."""

    def __init__(self, args: Any, accumulated_gradient: int) -> None:
        self.args = args
        self.accumulated_gradient = accumulated_gradient
        self.ring_attn_group = None
        self.calls = 0
        self.step_grads: list[list[torch.Tensor]] = []

    def backward(self, loss: torch.Tensor, model: Any, optimizer: Any) -> None:
        (loss / self.accumulated_gradient).backward()

    def optimizer_step(self, optimizer: Any, model: Any, scheduler: Any, name: str = "") -> None:
        self.calls += 1
        if self.calls % self.accumulated_gradient:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            for p in params:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        self.step_grads.append([p.grad.detach().clone() for p in params])
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    def get_grad_norm(self, model: Any) -> float:
        return 0.0

    def all_reduce(self, data: Any, op: str = "mean") -> Any:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            return data
        if isinstance(data, dict):
            return {k: self.all_reduce(v, op) for k, v in data.items()}
        t = torch.as_tensor(data, dtype=torch.float64).clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t /= dist.get_world_size()
        return t.item() if not isinstance(data, torch.Tensor) else t

    def is_rank_0(self) -> bool:
        dist = torch.distributed
        return not dist.is_initialized() or dist.get_rank() == 0

    def print(self, *msg: Any) -> None:
        pass


def build_trainer(args: Any, actor: Any, *, micro: int, gas: int, monkeypatch: Any,
                  lr: float = 1e-2) -> tuple[Any, DeepSpeedLikeStrategy]:
    from openrlhf.trainer.ray import ppo_actor

    strategy = DeepSpeedLikeStrategy(args, gas)
    optim = torch.optim.SGD(actor.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda _: 1.0)
    monkeypatch.setattr(ppo_actor, "torch_dist_barrier_and_cuda_sync", lambda: None)
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "current_device", lambda: 0)  # replay buffer's target device name
        trainer = ppo_actor.ActorPPOTrainer(
            strategy, actor, ema_model=None, actor_optim=optim, actor_scheduler=sched,
            micro_train_batch_size=micro, tokenizer=None, dataloader_pin_memory=False,
        )
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")  # ppo_train's device
    return trainer, strategy


def record_micro_batches(monkeypatch: Any) -> list[dict[str, Any]]:
    """Spy on the (patched) training_step: what each micro-batch held."""
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

    seen: list[dict[str, Any]] = []
    step = ActorPPOTrainer.training_step

    def spy(self: Any, experience: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append({
            "sequences": experience.sequences.clone(),
            "attention_mask": experience.attention_mask.clone(),
            "action_mask": experience.action_mask.clone(),
            "old": experience.action_log_probs.clone(),
            "rewards": experience.rewards.clone(),
            "group_ids": (getattr(experience, BATCH_ATTR)["group_ids"].clone()
                          if hasattr(experience, BATCH_ATTR) else None),
        })
        return step(self, experience, *args, **kwargs)

    monkeypatch.setattr(ActorPPOTrainer, "training_step", spy)
    return seen


def pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tensors])


def reference_gradient(actor0: Any, micro: list[dict[str, Any]], settings: dict[str, Any],
                       *, local_penalty: bool) -> list[torch.Tensor]:
    """Gradient of DisCO on the mini-batch made of ``micro``, at the parameters ``actor0``:
    ``disco_loss`` on the concatenated mini-batch; with ``local_penalty`` its penalty replaced by
    the token-weighted mean of the micro-batch penalties (the adapter's stated rule)."""
    actor0.zero_grad()
    log_probs = [actor0(m["sequences"], m["action_mask"], attention_mask=m["attention_mask"])
                 for m in micro]
    out = disco_loss(
        pad_cat(log_probs), pad_cat([m["old"] for m in micro]),
        pad_cat([m["action_mask"] for m in micro]).bool(),
        torch.cat([m["rewards"] for m in micro]), torch.cat([m["group_ids"] for m in micro]),
        **settings,
    )
    if not local_penalty:
        loss = out.loss
    else:
        tokens = [m["action_mask"].sum() for m in micro]
        total = sum(tokens)
        penalty = sum(
            t / total * squared_hinge_penalty(
                kl_divergence(lp, m["old"], m["action_mask"].bool(),
                              estimator=settings.get("kl_estimator", "k1")),
                delta=settings["delta"], beta=settings["beta"])
            for t, lp, m in zip(tokens, log_probs, micro)
        )
        loss = -out.objective + penalty
    loss.backward()
    return [p.grad.detach().clone() for p in actor0.parameters() if p.requires_grad]


def shifted(experiences: list[Any], seed: int, shift: float) -> list[Any]:
    """Move the old log-probs away from the current ones so that KL(pi_old || pi_theta) > delta
    and differs between micro-batches."""
    g = torch.Generator().manual_seed(seed)
    for exp in experiences:
        noise = shift * (1 + torch.rand(exp.action_log_probs.shape, generator=g))
        exp.action_log_probs = exp.action_log_probs + noise * exp.action_mask
    return experiences


CASES = {
    # gas == 1: the adapter's loss is exactly disco_loss on the mini-batch, penalty included
    "gas1-disco-logL": dict(gas=1, settings=dict(score="log_likelihood", objective="disco",
                                                 tau=10.0, delta=1e-4, beta=50.0), exact=True),
    # gas == 2, no penalty: the objective is exact under accumulation
    "gas2-discob-Lratio-valid": dict(gas=2, settings=dict(
        score="likelihood_ratio", objective="disco_b", tau=None, delta=1e-4, beta=0.0,
        normalize="valid"), exact=True),
    # gas == 2, active penalty: token-weighted mean of the micro-batch penalties
    "gas2-disco-k3-penalty": dict(gas=2, settings=dict(
        score="log_likelihood", objective="disco", tau=2.0, delta=1e-4, beta=50.0,
        kl_estimator="k3"), exact=False),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_one_update_equals_disco_loss(case, tiny_model_path, standin_ray, monkeypatch):
    spec = CASES[case]
    gas = spec["gas"]
    settings = {"normalize": "all", "kl_estimator": "k1", **spec["settings"]}
    num_prompts = 4
    samples = num_prompts * N
    micro = samples // gas
    args = make_args(**{
        "train.batch_size": samples, "train.micro_batch_size": micro,
        "rollout.batch_size": num_prompts, "rollout.micro_batch_size": 3,
        **{f"algo.disco.{k}": v for k, v in settings.items()},
    })
    rewards = [1.0, 0.0, 1.0, 0.0,   1.0, 1.0, 1.0, 0.0,   0.0, 0.0, 0.0, 0.0,   0.0, 1.0, 0.0, 0.0]
    actor = load_actor(tiny_model_path)
    experiences = shifted(make_experiences(args, actor, rollout_samples(num_prompts, N, seed=1,
                                                                        rewards=rewards)),
                          seed=2, shift=0.02)
    actor0 = copy.deepcopy(actor)
    trainer, strategy = build_trainer(args, actor, micro=micro, gas=gas, monkeypatch=monkeypatch)
    assert isinstance(trainer.actor_loss_fn, DiscoPolicyLoss)
    for exp in experiences:
        trainer.replay_buffer.append(exp)
    seen = record_micro_batches(monkeypatch)

    status = trainer.ppo_train(0.0)

    # micro-batches of whole questions, every question exactly once
    assert len(seen) == gas and len(strategy.step_grads) == 1
    counts = Counter()
    for m in seen:
        per_micro = Counter(m["group_ids"].tolist())
        assert set(per_micro.values()) == {N}, per_micro
        assert len(m["group_ids"]) == micro
        counts.update(per_micro.keys())
    assert sorted(counts) == list(range(num_prompts)) and set(counts.values()) == {1}

    # the parameters moved
    moved = [not torch.equal(p, p0) for p, p0 in zip(actor.parameters(), actor0.parameters())]
    assert all(moved)

    # the gradient of the update equals DisCO on the same data
    got = strategy.step_grads[0]
    want = reference_gradient(actor0, seen, settings, local_penalty=not spec["exact"])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=1e-7)
    assert max(float(w.abs().max()) for w in want) > 1e-4  # not a vacuous comparison

    # DisCO metrics reach OpenRLHF's logs
    assert "disco/objective" in status and "disco/kl" in status and "policy_loss" in status


def test_accumulated_penalty_is_the_stated_rule_not_the_exact_one(tiny_model_path, standin_ray,
                                                                   monkeypatch):
    """With gas > 1 and an active constraint the applied penalty is the token-weighted mean of
    the micro-batch penalties, and it differs from the exact mini-batch penalty: the claim in
    the adapter's docs is precise, and this test would notice a change of rule."""
    settings = dict(score="log_likelihood", objective="disco", tau=10.0, delta=1e-4, beta=50.0,
                    normalize="all", kl_estimator="k1")
    args = make_args(**{"train.batch_size": 16, "train.micro_batch_size": 8,
                        **{f"algo.disco.{k}": v for k, v in settings.items()}})
    actor = load_actor(tiny_model_path)
    experiences = make_experiences(args, actor, rollout_samples(4, N, seed=3))
    # very different KLs per question, so micro-batch KLs differ
    for exp in experiences:
        scale = torch.tensor([0.001 if i // N % 2 else 0.2 for i in exp.index]).unsqueeze(1)
        exp.action_log_probs = exp.action_log_probs + scale * exp.action_mask
    actor0 = copy.deepcopy(actor)
    trainer, strategy = build_trainer(args, actor, micro=8, gas=2, monkeypatch=monkeypatch)
    for exp in experiences:
        trainer.replay_buffer.append(exp)
    seen = record_micro_batches(monkeypatch)
    trainer.ppo_train(0.0)

    got = strategy.step_grads[0]
    stated = reference_gradient(copy.deepcopy(actor0), seen, settings, local_penalty=True)
    exact = reference_gradient(copy.deepcopy(actor0), seen, settings, local_penalty=False)
    for g, w in zip(got, stated):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=1e-7)
    diff = max(float((g - e).abs().max()) for g, e in zip(got, exact))
    assert diff > 1e-3

    # and its value is an upper bound of the exact penalty (Jensen)
    with torch.no_grad():
        lps = [actor0(m["sequences"], m["action_mask"], attention_mask=m["attention_mask"])
               for m in seen]
        kls = [kl_divergence(lp, m["old"], m["action_mask"].bool()) for lp, m in zip(lps, seen)]
        tokens = [m["action_mask"].sum() for m in seen]
        total = sum(tokens)
        local = sum(t / total * squared_hinge_penalty(k, delta=1e-4, beta=50.0)
                    for t, k in zip(tokens, kls))
        kl_mb = sum(t / total * k for t, k in zip(tokens, kls))
        assert float(local) > float(squared_hinge_penalty(kl_mb, delta=1e-4, beta=50.0))


def test_non_disco_trainer_is_untouched(tiny_model_path, standin_ray, monkeypatch):
    """With another estimator the patched trainer runs OpenRLHF's own loss and batching."""
    from openrlhf.models import PolicyLoss

    args = make_args(**{"algo.advantage.estimator": "group_norm", "train.batch_size": 16,
                        "train.micro_batch_size": 3})
    actor = load_actor(tiny_model_path)
    experiences = make_experiences(args, actor, rollout_samples(4, N, seed=4))
    trainer, strategy = build_trainer(args, actor, micro=3, gas=1, monkeypatch=monkeypatch)
    assert type(trainer.actor_loss_fn) is PolicyLoss
    for exp in experiences:
        trainer.replay_buffer.append(exp)
    seen = record_micro_batches(monkeypatch)
    status = trainer.ppo_train(0.0)
    # OpenRLHF's sample-level micro-batches (16 samples, 3 per micro-batch, drop_last)
    assert [len(m["rewards"]) for m in seen] == [3] * 5
    assert all(m["group_ids"] is None for m in seen)
    assert len(strategy.step_grads) == 5
    assert "policy_loss" in status and not any(k.startswith("disco/") for k in status)


def test_split_question_on_a_rank_fails_loudly(tiny_model_path, standin_ray, monkeypatch):
    args = make_args(**{"train.batch_size": 16, "train.micro_batch_size": 8})
    actor = load_actor(tiny_model_path)
    experiences = make_experiences(args, actor, rollout_samples(4, N, seed=5))
    trainer, _ = build_trainer(args, actor, micro=8, gas=1, monkeypatch=monkeypatch)
    for exp in experiences:
        trainer.replay_buffer.append(exp)
    del trainer.replay_buffer.items[0]  # one response of question 0 is on another rank
    with pytest.raises(RuntimeError, match="split across ranks"):
        trainer.ppo_train(0.0)
