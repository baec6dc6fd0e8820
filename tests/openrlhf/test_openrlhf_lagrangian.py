"""``--algo.disco.constraint lagrangian`` in OpenRLHF's real ActorPPOTrainer on CPU, with
``--algo.disco.weights micro_batch`` (old log-probs shifted per question so that the
micro-batches' KLs differ; the planned modes are tested in test_openrlhf_planned.py and end to
end).

The loss uses the multiplier's current value (one update equals ``disco_loss(...,
constraint="lagrangian", multiplier=m)`` on the mini-batch, exactly, since lambda * (KL - delta)
is linear in the KL); after every optimizer step the multiplier takes one dual-ascent step with
that step's KL, lambda <- max(0, lambda + lr * (KL_W - delta)); and its state goes with the
actor's checkpoints.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from discoloss.adapters.openrlhf.loss import DiscoPolicyLoss
from discoloss.adapters.openrlhf.patch import MULTIPLIER_FILE
from orlhf_testkit import (
    N,
    build_trainer,
    load_actor,
    make_args,
    make_experiences,
    pad_cat,
    record_micro_batches,
    reference_gradient,
    rollout_samples,
)

from discoloss import kl_divergence
from discoloss.constraints import LagrangeMultiplier

SETTINGS = dict(score="log_likelihood", objective="disco", tau=10.0, delta=1e-4,
                normalize="all", kl_estimator="k1", constraint="lagrangian")
REWARDS = [1.0, 0.0, 1.0, 0.0,   1.0, 1.0, 1.0, 0.0,   0.0, 1.0, 0.0, 0.0,   0.0, 1.0, 0.0, 1.0]


def _trainer(tiny_model_path, monkeypatch, *, batch, micro, lr, ckpt=None, seed=1):
    num_prompts = 4
    args = make_args(**{
        "train.batch_size": batch, "train.micro_batch_size": micro,
        "rollout.batch_size": num_prompts, "rollout.micro_batch_size": 4,
        "algo.disco.lagrangian_lr": lr, "algo.disco.weights": "micro_batch",
        **({} if ckpt is None else {"ckpt.path": str(ckpt), "ckpt.load_enable": True}),
        **{f"algo.disco.{k}": v for k, v in SETTINGS.items()},
    })
    actor = load_actor(tiny_model_path)
    experiences = make_experiences(args, actor, rollout_samples(num_prompts, N, seed=seed,
                                                                rewards=REWARDS))
    # per-question KL levels, so that the micro-batch KLs differ
    g = torch.Generator().manual_seed(seed + 1)
    levels = [0.0, 0.01, 0.05, 0.2]
    for exp in experiences:
        level = torch.tensor([levels[int(i) // N] for i in exp.index]).unsqueeze(1)
        noise = level + 0.02 * torch.rand(exp.action_log_probs.shape, generator=g)
        exp.action_log_probs = exp.action_log_probs + noise * exp.action_mask
    actor0 = copy.deepcopy(actor)
    trainer, strategy = build_trainer(args, actor, micro=micro, gas=batch // micro,
                                      monkeypatch=monkeypatch)
    for exp in experiences:
        trainer.replay_buffer.append(exp)
    return trainer, strategy, actor0


def _window_kl(actor, micro):
    """Token-mean KL over the micro-batches of one optimizer step, at ``actor``'s parameters."""
    with torch.no_grad():
        lps = [actor(m["sequences"], m["action_mask"], attention_mask=m["attention_mask"])
               for m in micro]
    return float(kl_divergence(pad_cat(lps), pad_cat([m["old"] for m in micro]),
                               pad_cat([m["action_mask"] for m in micro]).bool()))


def test_one_update_equals_disco_loss_with_the_multiplier(tiny_model_path, standin_ray,
                                                          monkeypatch):
    trainer, strategy, actor0 = _trainer(tiny_model_path, monkeypatch, batch=16, micro=8, lr=10.0)
    loss_fn = trainer.actor_loss_fn
    assert isinstance(loss_fn, DiscoPolicyLoss) and loss_fn.multiplier.lr == 10.0
    lam0 = 3.0
    loss_fn.multiplier.value = torch.tensor(lam0, dtype=torch.float64)
    seen = record_micro_batches(monkeypatch)
    status = trainer.ppo_train(0.0)
    assert len(seen) == 2 and len(strategy.step_grads) == 1  # gas = 2, one optimizer step

    got = strategy.step_grads[0]
    settings = {**SETTINGS, "multiplier": LagrangeMultiplier(init=lam0)}
    want = reference_gradient(copy.deepcopy(actor0), seen, settings, local_penalty=False)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-7)
    # the multiplier's term is really there, and the micro-batch KLs differ
    off = reference_gradient(copy.deepcopy(actor0), seen, {**SETTINGS, "constraint": "none"},
                             local_penalty=False)
    assert max(float((w - o).abs().max()) for w, o in zip(want, off)) > 1e-4
    kls = [_window_kl(actor0, [m]) for m in seen]
    assert abs(kls[0] - kls[1]) > 1e-2, kls
    # the value used is logged; after the step: one dual-ascent step with the step's KL
    assert status["disco/lagrange_multiplier"] == pytest.approx(lam0)
    kl = _window_kl(actor0, seen)
    assert float(loss_fn.multiplier.value) == pytest.approx(max(0.0, lam0 + 10.0 * (kl - 1e-4)),
                                                            rel=1e-5)
    assert loss_fn.multiplier.steps == 1


def test_multiplier_follows_dual_ascent_over_two_steps(tiny_model_path, standin_ray,
                                                       monkeypatch):
    lr = 20.0
    trainer, strategy, _ = _trainer(tiny_model_path, monkeypatch, batch=8, micro=4, lr=lr)
    multiplier = trainer.actor_loss_fn.multiplier
    assert float(multiplier.value) == 0.0
    seen = record_micro_batches(monkeypatch)
    from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

    # the parameters each micro-batch's loss sees (those of its optimizer step)
    params: list[dict[str, torch.Tensor]] = []
    values: list[float] = []
    step = ActorPPOTrainer.training_step

    def spy(self, experience, *args, **kwargs):
        params.append(copy.deepcopy(self.actor.state_dict()))
        values.append(float(self.actor_loss_fn.multiplier.value))
        return step(self, experience, *args, **kwargs)

    monkeypatch.setattr(ActorPPOTrainer, "training_step", spy)
    trainer.ppo_train(0.0)
    assert len(seen) == 4 and len(strategy.step_grads) == 2  # two steps of two micro-batches

    want, kls = 0.0, []
    probe = load_actor(tiny_model_path)
    for s in range(2):
        window = seen[2 * s: 2 * s + 2]
        assert values[2 * s] == values[2 * s + 1] == pytest.approx(want)  # constant in a step
        probe.load_state_dict(params[2 * s])
        kls.append(_window_kl(probe, window))
        want = max(0.0, want + lr * (kls[-1] - 1e-4))
    assert kls[0] != pytest.approx(kls[1], rel=1e-3)  # steps see different KLs
    assert want > 0.0
    assert float(multiplier.value) == pytest.approx(want, rel=1e-5)
    assert multiplier.steps == 2


def test_checkpoint_round_trip(tiny_model_path, standin_ray, monkeypatch, tmp_path):
    trainer, strategy, _ = _trainer(tiny_model_path, monkeypatch, batch=16, micro=8, lr=10.0,
                                    ckpt=tmp_path)
    multiplier = trainer.actor_loss_fn.multiplier
    trainer.ppo_train(0.0)
    value = float(multiplier.value)
    assert value > 0.0
    save_dir = os.path.join(tmp_path, "_actor")
    # what PolicyModelActor.save_checkpoint calls; an other model (e.g. a critic) saves nothing
    strategy.save_ckpt(trainer.actor.model, save_dir, "global_step1", 3, 1000, {})
    strategy.save_ckpt(torch.nn.Linear(1, 1), os.path.join(tmp_path, "_critic"), "global_step1")
    path = os.path.join(save_dir, "global_step1", MULTIPLIER_FILE.format(rank=0))
    assert os.path.isfile(path)
    assert not os.path.exists(os.path.join(tmp_path, "_critic", "global_step1",
                                           MULTIPLIER_FILE.format(rank=0)))

    # a later checkpoint is the one resumed from
    multiplier.value = torch.tensor(2 * value, dtype=torch.float64)
    strategy.save_ckpt(trainer.actor.model, save_dir, "global_step2", 3, 1000, {})

    resumed, _, _ = _trainer(tiny_model_path, monkeypatch, batch=16, micro=8, lr=10.0,
                             ckpt=tmp_path)
    state = resumed.actor_loss_fn.multiplier.state_dict()
    assert float(state["value"]) == pytest.approx(2 * value)
    assert state["steps"] == 1 and state["lr"] == 10.0

    # a checkpoint without the multiplier's file: a warning, and lambda starts from 0
    os.remove(os.path.join(save_dir, "global_step2", MULTIPLIER_FILE.format(rank=0)))
    with pytest.warns(RuntimeWarning, match="no Lagrange multiplier"):
        fresh, _, _ = _trainer(tiny_model_path, monkeypatch, batch=16, micro=8, lr=10.0,
                               ckpt=tmp_path)
    assert float(fresh.actor_loss_fn.multiplier.value) == 0.0
