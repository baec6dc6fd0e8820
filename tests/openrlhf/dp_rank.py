"""One data-parallel rank of test_openrlhf_dp.py (run as a script: ``python dp_rank.py RANK
WORLD INIT_FILE MODEL_PATH OUT_DIR [CONSTRAINT]``).

Every rank makes the same rollout with OpenRLHF's experience maker, takes the chunk OpenRLHF's
own ``RayActorGroup.async_run_method_batch`` deals to it, and runs the real
``ActorPPOTrainer.ppo_train`` with a DeepSpeed-like strategy that averages gradients over the
ranks (gloo). It saves its micro-batches and the gradient of the update (with
``CONSTRAINT=lagrangian``: the multiplier's value before and after the update too).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from orlhf_testkit import (
    N,
    build_trainer,
    load_actor,
    make_args,
    make_experiences,
    record_micro_batches,
    rollout_samples,
    shifted,
)

from discoloss.adapters.openrlhf import install

SETTINGS = dict(score="log_likelihood", objective="disco", tau=5.0, delta=1e-4, beta=50.0,
                normalize="valid", kl_estimator="k1")
#: ``constraint=lagrangian``: the multiplier's value before the update and its step size.
LAGRANGIAN = dict(constraint="lagrangian", lagrangian_lr=10.0)
LAMBDA0 = 2.0
NUM_PROMPTS = 4
REWARDS = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]


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


def main() -> None:
    rank, world, init_file, model_path, out_dir = sys.argv[1:6]
    rank, world = int(rank), int(world)
    options = {**SETTINGS, **(LAGRANGIAN if sys.argv[6:] == ["lagrangian"] else {})}
    install()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    from openrlhf.trainer.ppo_utils import experience_maker

    samples = NUM_PROMPTS * N
    micro = samples // world  # gas = 1 per rank
    args = make_args(**{
        "train.batch_size": samples, "train.micro_batch_size": micro,
        "rollout.batch_size": NUM_PROMPTS, "rollout.micro_batch_size": 2,
        "actor.num_gpus_per_node": world,
        **{f"algo.disco.{k}": v for k, v in options.items()},
    })
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(experience_maker, "ray", SimpleNamespace(get=lambda x: x, put=lambda x: x))
    actor = load_actor(model_path)
    experiences = shifted(make_experiences(args, actor, rollout_samples(
        NUM_PROMPTS, N, seed=7, rewards=REWARDS)), seed=8, shift=0.02)
    trainer, strategy = build_trainer(args, actor, micro=micro, gas=1, monkeypatch=monkeypatch)
    for exp in dealt_chunk(experiences, rank, world):
        trainer.replay_buffer.append(exp)
    multiplier = trainer.actor_loss_fn.multiplier
    if multiplier is not None:
        multiplier.value = torch.tensor(LAMBDA0, dtype=torch.float64)
    seen = record_micro_batches(monkeypatch)
    trainer.ppo_train(0.0)
    torch.save({"seen": seen, "grads": strategy.step_grads,
                "multiplier": None if multiplier is None else multiplier.state_dict()},
               f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
