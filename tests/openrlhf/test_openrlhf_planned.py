"""``--algo.disco.weights current`` and ``sampling`` in OpenRLHF's real ActorPPOTrainer on CPU.

The model is a tiny random Llama loaded from disk by OpenRLHF's Actor (float32); experiences
come from OpenRLHF's RemoteExperienceMaker, so the old log-probs are the actor's own at the
parameters ``ppo_train`` starts from. The strategy is a stand-in with DeepSpeed's semantics.
Every optimizer step's applied gradient is compared with the gradient of ``disco_loss`` on
that step's whole mini-batch at the parameters it was taken at, computed independently.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
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
from discoloss.accumulation import ResponseStats, micro_batch_loss, plan_minibatch, response_stats
from discoloss.constraints import LagrangeMultiplier

NUM_PROMPTS = 6
REWARDS = [1.0, 0.0, 1.0, 0.0,  1.0, 1.0, 1.0, 0.0,  0.0, 0.0, 0.0, 0.0,
           0.0, 1.0, 0.0, 1.0,  1.0, 0.0, 0.0, 0.0,  0.0, 1.0, 1.0, 1.0]
SETTINGS = dict(score="log_likelihood", objective="disco", tau=0.5, delta=1e-4, beta=200.0,
                normalize="all", kl_estimator="k1")


def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    g = torch.cat([t.reshape(-1).double() for t in got])
    w = torch.cat([t.reshape(-1).double() for t in want])
    return float((g - w).norm() / w.norm())


def _steps(strategy, seen):
    """The micro-batches of each optimizer step, with its parameters and applied gradient."""
    start = 0
    for grads, params, end in zip(strategy.step_grads, strategy.step_params,
                                  strategy.step_backwards):
        yield seen[start:end], params, grads
        start = end


def _exact_step_kl(probe, micro, params, got) -> float:
    """Assert that the step's applied gradient ``got`` is disco_loss's on its whole mini-batch
    ``micro`` at the step's parameters (exact squared hinge); return the mini-batch's KL."""
    probe.load_state_dict(params)
    want = reference_gradient(probe, micro, SETTINGS, local_penalty=False)
    assert relative_error(got, want) <= 1e-5
    with torch.no_grad():
        lps = [probe(m["sequences"], m["action_mask"], attention_mask=m["attention_mask"])
               for m in micro]
    return float(kl_divergence(pad_cat(lps), pad_cat([m["old"] for m in micro]),
                               pad_cat([m["action_mask"] for m in micro]).bool()))


def _run(tiny_model_path, monkeypatch, *, weights, micro, batch, settings=SETTINGS, lr=0.5,
         samples=None):
    args = make_args(**{
        "train.batch_size": batch, "train.micro_batch_size": micro,
        "rollout.batch_size": NUM_PROMPTS, "rollout.micro_batch_size": 4,
        "algo.disco.weights": weights,
        **{f"algo.disco.{k}": v for k, v in settings.items()},
    })
    actor = load_actor(tiny_model_path)
    experiences = make_experiences(args, actor, samples or rollout_samples(
        NUM_PROMPTS, N, seed=11, rewards=REWARDS))
    total = NUM_PROMPTS * N
    trainer, strategy = build_trainer(args, actor, micro=micro, gas=batch // micro,
                                      monkeypatch=monkeypatch, lr=lr)
    for exp in experiences:
        trainer.replay_buffer.append(exp)
    assert len(trainer.replay_buffer.items) == total
    seen = record_micro_batches(monkeypatch)
    status = trainer.ppo_train(0.0)
    return trainer, strategy, seen, status


def test_current_every_step_is_disco_on_its_mini_batch(tiny_model_path, standin_ray,
                                                        monkeypatch):
    """Micro-batches of one response, three optimizer steps of 8 responses (two whole
    questions each): every applied gradient equals disco_loss's on the step's mini-batch at the
    step's parameters, the squared hinge active after the first step."""
    trainer, strategy, seen, status = _run(tiny_model_path, monkeypatch, weights="current",
                                           micro=1, batch=8)
    assert len(seen) == NUM_PROMPTS * N and len(strategy.step_grads) == 3
    assert all(len(m["group_ids"]) == 1 for m in seen)
    probe = load_actor(tiny_model_path)
    kls = []
    for micro, params, got in _steps(strategy, seen):
        assert len(micro) == 8
        # whole questions per mini-batch (the question order is shared, not the sample order)
        counts = Counter(int(g) for m in micro for g in m["group_ids"])
        assert set(counts.values()) == {N}, counts
        kls.append(_exact_step_kl(probe, micro, params, got))
    assert abs(kls[0]) < 1e-6  # theta = theta_old at the first step
    assert max(kls) > SETTINGS["delta"] * 10, kls  # the squared hinge is active
    assert status["disco/kl"] > SETTINGS["delta"]
    assert "disco/plan_seconds" in status


def _sampling_rule_gradient(probe, micro, settings):
    """What ``sampling`` applies: the weights of disco on the mini-batch at the sampling policy
    (the old log-probs), the penalty of each micro-batch's own KL times its token share."""
    probe.zero_grad()
    stats = [response_stats(m["old"], m["old"], m["action_mask"].bool()) for m in micro]
    rewards = torch.cat([m["rewards"] for m in micro])
    ids = torch.cat([m["group_ids"] for m in micro])
    plan = plan_minibatch(ResponseStats.cat(stats), rewards, ids, **{
        k: v for k, v in settings.items() if k != "kl_estimator"})
    offset = 0
    for m in micro:
        b = len(m["rewards"])
        lp = probe(m["sequences"], m["action_mask"], attention_mask=m["attention_mask"])
        piece = micro_batch_loss(lp, m["old"], m["action_mask"].bool(),
                                 plan.weights[offset:offset + b], num_tokens=plan.num_tokens,
                                 kl_coef=None, delta=settings["delta"], beta=settings["beta"])
        piece.loss.backward()
        offset += b
    return [p.grad.detach().clone() for p in probe.parameters() if p.requires_grad]


def test_sampling_is_exact_at_the_first_step_and_its_stated_rule_after(tiny_model_path,
                                                                       standin_ray, monkeypatch):
    trainer, strategy, seen, _ = _run(tiny_model_path, monkeypatch, weights="sampling", micro=3,
                                      batch=12)
    assert len(strategy.step_grads) == 2
    probe = load_actor(tiny_model_path)
    drift = []
    for micro, params, got in _steps(strategy, seen):
        probe.load_state_dict(params)
        exact = reference_gradient(probe, micro, SETTINGS, local_penalty=False)
        rule = _sampling_rule_gradient(probe, micro, SETTINGS)
        assert relative_error(got, rule) <= 1e-5
        drift.append(relative_error(got, exact))
    assert drift[0] <= 1e-5  # theta = theta_old: the sampling policy's weights are exact
    assert drift[1] > 1e-3, drift  # afterwards an approximation (here tau = 0.5, lr = 0.5)


def test_current_disco_b_and_sampling_agree_on_the_objective(tiny_model_path, standin_ray,
                                                             monkeypatch):
    """disco_b's weights do not depend on the scores: with the constraint off, ``sampling``
    applies exactly the gradient of ``current`` (and of disco_loss)."""
    settings = {**SETTINGS, "objective": "disco_b", "constraint": "none"}
    grads = {}
    for weights in ("current", "sampling"):
        _, strategy, seen, _ = _run(tiny_model_path, monkeypatch, weights=weights, micro=2,
                                    batch=8, settings=settings)
        grads[weights] = strategy.step_grads
        probe = load_actor(tiny_model_path)
        for micro, params, got in _steps(strategy, seen):
            probe.load_state_dict(params)
            want = reference_gradient(probe, micro, settings, local_penalty=False)
            assert relative_error(got, want) <= 1e-5
    for a, b in zip(grads["current"], grads["sampling"]):
        assert relative_error(a, b) <= 1e-5


def test_responses_without_response_tokens_carry_no_weight(tiny_model_path, standin_ray,
                                                           monkeypatch):
    """A sample whose response was cut away entirely (no action token) is left out of the plan
    and of the loss: the update equals disco_loss on the other responses."""
    samples = rollout_samples(NUM_PROMPTS, N, seed=11, rewards=REWARDS)
    for sample in samples[5:6] + samples[17:18]:  # a negative of question 1, one of question 4
        sample.action_mask = torch.zeros_like(sample.action_mask)
    trainer, strategy, seen, _ = _run(tiny_model_path, monkeypatch, weights="current", micro=2,
                                      batch=12, samples=samples)
    probe = load_actor(tiny_model_path)
    empty = 0
    for micro, params, got in _steps(strategy, seen):
        keep = []
        for m in micro:
            rows = m["action_mask"].any(-1)
            empty += int((~rows).sum())
            keep.append({k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in m.items()})
        probe.load_state_dict(params)
        want = reference_gradient(probe, [m for m in keep if len(m["rewards"])], SETTINGS,
                                  local_penalty=False)
        assert relative_error(got, want) <= 1e-5
    assert empty == 2


def test_two_epochs_reshuffle_questions_and_replan(tiny_model_path, standin_ray, monkeypatch):
    """With --train.max_epochs 2 the second epoch draws another question order; its first step
    is planned at the current parameters (not the old log-probs)."""
    args_epochs = {"train.max_epochs": 2}
    args = make_args(**{
        "train.batch_size": 8, "train.micro_batch_size": 2, "rollout.batch_size": NUM_PROMPTS,
        "rollout.micro_batch_size": 4, **args_epochs,
        **{f"algo.disco.{k}": v for k, v in SETTINGS.items()},
    })
    actor = load_actor(tiny_model_path)
    experiences = make_experiences(args, actor, rollout_samples(NUM_PROMPTS, N, seed=11,
                                                                rewards=REWARDS))
    trainer, strategy = build_trainer(args, actor, micro=2, gas=4, monkeypatch=monkeypatch)
    for exp in experiences:
        trainer.replay_buffer.append(exp)
    seen = record_micro_batches(monkeypatch)
    trainer.ppo_train(0.0)
    assert len(strategy.step_grads) == 6
    orders = [[int(g) for m in seen[e * 12:(e + 1) * 12] for g in m["group_ids"]]
              for e in range(2)]
    assert orders[0] != orders[1]
    probe = load_actor(tiny_model_path)
    for micro, params, got in _steps(strategy, seen):
        probe.load_state_dict(params)
        want = reference_gradient(probe, micro, SETTINGS, local_penalty=False)
        assert relative_error(got, want) <= 1e-5


def test_micro_batch_mode_keeps_whole_questions(tiny_model_path, standin_ray, monkeypatch):
    """``--algo.disco.weights micro_batch``: micro-batches of whole questions, as before."""
    _, strategy, seen, _ = _run(tiny_model_path, monkeypatch, weights="micro_batch", micro=4,
                                batch=8)
    for m in seen:
        assert set(Counter(m["group_ids"].tolist()).values()) == {N}
    assert len(strategy.step_grads) == 3
    with pytest.raises(Exception, match="micro_batch_size"):
        _run(tiny_model_path, monkeypatch, weights="micro_batch", micro=3, batch=12)


def test_lagrangian_multiplier_per_step_with_planned_weights(tiny_model_path, standin_ray,
                                                             monkeypatch):
    """constraint=lagrangian with ``current``: every step's gradient is disco_loss's with the
    multiplier's value of that step, and after each step the multiplier takes one dual-ascent
    step with the step's KL at the step's parameters."""
    lr_dual = 50.0
    settings = {**SETTINGS, "constraint": "lagrangian"}
    args_extra = {"algo.disco.lagrangian_lr": lr_dual}
    args = make_args(**{
        "train.batch_size": 8, "train.micro_batch_size": 1, "rollout.batch_size": NUM_PROMPTS,
        "rollout.micro_batch_size": 4, **args_extra,
        **{f"algo.disco.{k}": v for k, v in settings.items()},
    })
    actor = load_actor(tiny_model_path)
    experiences = make_experiences(args, actor, rollout_samples(NUM_PROMPTS, N, seed=11,
                                                                rewards=REWARDS))
    trainer, strategy = build_trainer(args, actor, micro=1, gas=8, monkeypatch=monkeypatch,
                                      lr=0.5)
    for exp in experiences:
        trainer.replay_buffer.append(exp)
    seen = record_micro_batches(monkeypatch)
    trainer.ppo_train(0.0)
    multiplier = trainer.actor_loss_fn.multiplier
    assert multiplier.steps == 3
    probe = load_actor(tiny_model_path)
    value, values = 0.0, []
    for micro, params, got in _steps(strategy, seen):
        probe.load_state_dict(params)
        step_settings = {**settings, "multiplier": LagrangeMultiplier(init=value)}
        want = reference_gradient(probe, micro, step_settings, local_penalty=False)
        assert relative_error(got, want) <= 1e-5
        with torch.no_grad():
            lps = [probe(m["sequences"], m["action_mask"], attention_mask=m["attention_mask"])
                   for m in micro]
        kl = float(kl_divergence(pad_cat(lps), pad_cat([m["old"] for m in micro]),
                                 pad_cat([m["action_mask"] for m in micro]).bool()))
        values.append(value)
        value = max(0.0, value + lr_dual * (kl - settings["delta"]))
    assert values[-1] > 0.0  # the multiplier's term was part of the last step's gradient
    assert float(multiplier.value) == pytest.approx(value, rel=1e-5)


@pytest.fixture
def one_rank_group(tmp_path):
    """A one-process gloo group: OpenRLHF's dynamic batching all-reduces over its DP group."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_dynamic_batch_every_step_is_disco_on_its_mini_batch(tiny_model_path, standin_ray,
                                                             monkeypatch, one_rank_group):
    """--train.dynamic_batch_enable: OpenRLHF's length-balanced rollout split, its balancing
    across ranks and its token-budget micro-batches (of varying sizes, splitting questions);
    every optimizer step still applies disco_loss's gradient on its mini-batch."""
    from openrlhf.trainer.ppo_utils import balance_experiences

    args = make_args(**{
        "train.batch_size": 8, "train.micro_batch_size": 1, "rollout.batch_size": NUM_PROMPTS,
        "train.dynamic_batch_enable": True, "ds.packing_samples": False,
        "train.max_tokens_per_gpu": 24, "rollout.max_tokens_per_gpu": 40,
        **{f"algo.disco.{k}": v for k, v in SETTINGS.items()},
    })
    actor = load_actor(tiny_model_path)
    experiences = balance_experiences(make_experiences(args, actor, rollout_samples(
        NUM_PROMPTS, N, seed=11, rewards=REWARDS)), args)
    trainer, strategy = build_trainer(args, actor, micro=1, gas=1, monkeypatch=monkeypatch,
                                      lr=0.5)
    for exp in experiences:
        trainer.replay_buffer.append(exp)
    seen = record_micro_batches(monkeypatch)
    trainer.ppo_train(0.0)
    assert len(strategy.step_grads) == 3
    sizes = [len(m["rewards"]) for m in seen]
    assert len(set(sizes)) > 1 and max(sizes) > 1, sizes  # token-budget micro-batches
    split = 0
    probe = load_actor(tiny_model_path)
    kls = []
    for micro, params, got in _steps(strategy, seen):
        counts = Counter(int(g) for m in micro for g in m["group_ids"])
        assert set(counts.values()) == {N}, counts  # whole questions per mini-batch
        firsts = {}
        for k, m in enumerate(micro):
            for g in m["group_ids"].tolist():
                firsts.setdefault(g, set()).add(k)
        split += sum(len(ks) > 1 for ks in firsts.values())
        kls.append(_exact_step_kl(probe, micro, params, got))
    assert split > 0  # questions split across micro-batches
    assert max(kls) > SETTINGS["delta"], kls
