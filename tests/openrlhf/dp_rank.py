"""One data-parallel rank of test_openrlhf_dp.py (run as a script: ``python dp_rank.py RANK
WORLD INIT_FILE MODEL_PATH OUT_DIR [CASE [FAULT]]``).

Every rank makes the same rollout with OpenRLHF's experience maker (5 questions of 4
responses), takes the chunk OpenRLHF's own ``RayActorGroup.async_run_method_batch`` deals to it
(10 samples: question 2 is split between the ranks), and runs the real
``ActorPPOTrainer.ppo_train`` with a DeepSpeed-like strategy that averages gradients over the
ranks (gloo), two optimizer steps of 5 samples per rank. It saves its micro-batches and, per
optimizer step, the applied gradient and the parameters it was computed at (with
``constraint=lagrangian`` also the multiplier's state).

``CASE``: ``current`` (``--algo.disco.weights current``, micro-batches of one response, the
squared hinge) or ``dynamic-lagrangian`` (``current`` with OpenRLHF's dynamic batching, its
balancing of the rollout over the ranks, and ``constraint=lagrangian`` starting from
``LAMBDA0``).

``FAULT`` (``old_log_probs``, ``log_probs`` or ``reward``) puts a NaN into that input of one
response of the last rank only: at the first response token of its first response's old
log-probs, at the first response token of the first response of the update's log-probs (the
actor's forward in ``training_step``), or as its first response's reward. A rank whose
``ppo_train`` raises writes ``rank<r>.error`` and, like a Ray actor whose method failed, stays
alive without joining any collective until every rank has written one (exit 3) or 60 s have
passed (exit 4).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from discoloss.adapters.openrlhf import install
from orlhf_testkit import (
    N,
    build_trainer,
    load_actor,
    make_args,
    make_experiences,
    record_micro_batches,
    rollout_samples,
)

SETTINGS = dict(score="log_likelihood", objective="disco", tau=0.5, delta=1e-4, beta=200.0,
                normalize="valid", kl_estimator="k3")
#: ``constraint=lagrangian``: the multiplier's value before the first update and its step size.
LAGRANGIAN = dict(constraint="lagrangian", lagrangian_lr=50.0)
LAMBDA0 = 2.0
NUM_PROMPTS = 5
REWARDS = [1.0, 0.0, 1.0, 0.0,  1.0, 1.0, 1.0, 0.0,  0.0, 1.0, 0.0, 1.0,  0.0, 1.0, 1.0, 1.0,
           0.0, 0.0, 1.0, 0.0]
TRAIN_BATCH = 10  # two optimizer steps per rollout
LR = 0.5


def dealt_chunk(experiences: list, rank: int, world: int) -> list:
    """The experiences OpenRLHF's RayActorGroup.async_run_method_batch sends to ``rank``."""
    from openrlhf.trainer.ray import launcher

    calls = []

    class Handle:
        class execute_batch:  # noqa: N801  (mimics a Ray method handle)
            @staticmethod
            def remote(method_name, chunk, start, end):
                calls.append(chunk["experience"][start:end])

    group = launcher.RayActorGroup.__new__(launcher.RayActorGroup)
    group._actor_handlers = [Handle() for _ in range(world)]
    group.duplicate_actors = 1
    with pytest.MonkeyPatch.context() as m:
        m.setattr(launcher.ray, "put", lambda x: x)
        group.async_run_method_batch(method_name="append", experience=experiences)
    return calls[rank]


def inject(fault: str, trainer, monkeypatch) -> None:
    """A NaN in one input of this rank's first response, at its first response token."""
    first = trainer.replay_buffer.items[0]
    token = int(first.action_mask.reshape(-1).nonzero()[0])  # its first response token
    if fault == "old_log_probs":
        first.action_log_probs.view(-1)[token] = float("nan")
    elif fault == "reward":
        first.rewards.view(-1)[0] = float("nan")
    elif fault == "log_probs":
        forward = type(trainer.actor).forward

        def nan_forward(self, sequences, action_mask=None, *args, **kwargs):
            out = forward(self, sequences, action_mask, *args, **kwargs)
            if not self.training:  # the experience maker's and the plan's forward
                return out
            log_probs = (out[0] if isinstance(out, tuple) else out).clone()
            log_probs[0, int(action_mask[0].nonzero()[0])] = float("nan")
            return (log_probs, *out[1:]) if isinstance(out, tuple) else log_probs

        monkeypatch.setattr(type(trainer.actor), "forward", nan_forward)
    else:
        raise ValueError(f"unknown fault {fault!r}")


def stay_like_a_failed_ray_actor(error: Exception, rank: int, world: int, out_dir: str) -> None:
    import time
    from pathlib import Path

    Path(out_dir, f"rank{rank}.error").write_text(f"{type(error).__name__}: {error}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(Path(out_dir, f"rank{r}.error").exists() for r in range(world)):
            sys.exit(3)
        time.sleep(0.2)
    sys.exit(4)


def case_settings(case: str) -> dict:
    return {**SETTINGS, **(LAGRANGIAN if case.endswith("lagrangian") else {})}


def main() -> None:
    rank, world, init_file, model_path, out_dir = sys.argv[1:6]
    rank, world = int(rank), int(world)
    case = sys.argv[6] if len(sys.argv) > 6 else "current"
    fault = sys.argv[7] if len(sys.argv) > 7 else None
    dynamic = case.startswith("dynamic")
    install()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    from openrlhf.trainer.ppo_utils import balance_experiences, experience_maker

    args = make_args(**{
        "train.batch_size": TRAIN_BATCH, "train.micro_batch_size": 1,
        "rollout.batch_size": NUM_PROMPTS, "rollout.micro_batch_size": 2,
        "actor.num_gpus_per_node": world, "algo.disco.weights": "current",
        **({"train.dynamic_batch_enable": True, "train.max_tokens_per_gpu": 24,
            "rollout.max_tokens_per_gpu": 40} if dynamic else {}),
        **{f"algo.disco.{k}": v for k, v in case_settings(case).items()},
    })
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(experience_maker, "ray", SimpleNamespace(get=lambda x: x, put=lambda x: x))
    actor = load_actor(model_path)
    experiences = make_experiences(args, actor, rollout_samples(
        NUM_PROMPTS, N, seed=7, rewards=REWARDS))
    if dynamic:  # what PPOTrainer.train_step does before dealing with dynamic batching
        experiences = balance_experiences(experiences, args)
    gas = 1 if dynamic else TRAIN_BATCH // world
    trainer, strategy = build_trainer(args, actor, micro=1, gas=gas, monkeypatch=monkeypatch,
                                      lr=LR)
    for exp in dealt_chunk(experiences, rank, world):
        trainer.replay_buffer.append(exp)
    multiplier = trainer.actor_loss_fn.multiplier
    if multiplier is not None:
        multiplier.value = torch.tensor(LAMBDA0, dtype=torch.float64)
    seen = record_micro_batches(monkeypatch)
    if fault and rank == world - 1:
        inject(fault, trainer, monkeypatch)
    try:
        trainer.ppo_train(0.0)
    except Exception as error:  # noqa: BLE001  (reported to the test)
        stay_like_a_failed_ray_actor(error, rank, world, out_dir)
    torch.save({"seen": seen, "grads": strategy.step_grads, "params": strategy.step_params,
                "backwards": strategy.step_backwards,
                "multiplier": None if multiplier is None else multiplier.state_dict()},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
