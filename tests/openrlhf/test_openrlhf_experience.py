"""OpenRLHF's real RemoteExperienceMaker with ``disco`` produces what the loss needs."""

from __future__ import annotations

import pytest
import torch
from discoloss.adapters.openrlhf.patch import GROUP_KEY
from orlhf_testkit import N, load_actor, make_args, make_experiences, rollout_samples


def test_experience_maker_carries_question_ids_and_rewards(tiny_model_path, standin_ray):
    args = make_args(**{"rollout.micro_batch_size": 3})  # experiences straddle questions
    actor = load_actor(tiny_model_path)
    rewards = [float(i % 3 == 0) for i in range(4 * N)]
    samples = rollout_samples(4, N, rewards=rewards)
    experiences = make_experiences(args, actor, samples)

    assert sum(len(e.index) for e in experiences) == 4 * N
    for exp in experiences:
        ids = exp.info[GROUP_KEY]
        assert ids.dtype == torch.long
        assert ids.tolist() == [i // N for i in exp.index]
        assert exp.rewards.dtype == torch.float32
        assert exp.rewards.tolist() == [rewards[i] for i in exp.index]
        # old log-probs from the actor; DisCO needs neither advantages nor returns
        assert exp.action_log_probs.shape == exp.action_mask.shape
        assert exp.advantages is None and exp.returns is None and exp.kl is None
        assert exp.info["return"].tolist() == exp.rewards.tolist()
        std = torch.tensor(rewards).view(-1, N).std(-1)
        assert torch.allclose(exp.info["group_reward_std"], std[ids])


def test_question_ids_survive_the_replay_buffer(tiny_model_path, standin_ray, monkeypatch):
    """The replay buffer splits experiences per sample and drops ``index``; the ids must
    survive in ``info`` and come back as one tensor per collated micro-batch."""
    from discoloss.adapters.openrlhf.patch import BATCH_ATTR, GroupedMicroBatches
    from openrlhf.trainer.ppo_utils import NaiveReplayBuffer

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    args = make_args(**{"rollout.micro_batch_size": 3})
    experiences = make_experiences(args, load_actor(tiny_model_path), rollout_samples(4, N))
    buffer = NaiveReplayBuffer(8, cpu_offload=True)
    for exp in experiences:
        buffer.append(exp)
    assert all(item.index is None for item in buffer.items)  # OpenRLHF drops it

    view = GroupedMicroBatches(buffer, micro_batch_size=2 * N, n_samples_per_prompt=N)
    assert len(view) == 2
    seen = []
    for i in range(len(view)):
        batch = view.collate_fn([view[i]])
        ids = getattr(batch, BATCH_ATTR)["group_ids"]
        assert GROUP_KEY not in batch.info  # not logged as a metric
        assert sorted(torch.bincount(ids).tolist()) in ([0, 0, N, N], [N, N], [0, N, N])
        assert batch.rewards.shape == ids.shape
        seen += ids.unique().tolist()
    assert sorted(seen) == [0, 1, 2, 3]


def test_length_penalties_apply_before_labels(tiny_model_path, standin_ray):
    """OpenRLHF's stop-properly penalty (reward override for truncated samples) reaches the
    rewards that DisCO labels."""
    args = make_args(**{"reward.stop_properly_penalty_coef": -0.5})
    samples = rollout_samples(4, N, rewards=[1.0] * (4 * N))
    samples[0].truncated = torch.tensor([True])
    experiences = make_experiences(args, load_actor(tiny_model_path), samples)
    by_index = {i: r for exp in experiences for i, r in zip(exp.index, exp.rewards.tolist())}
    assert by_index[0] == -0.5
    assert all(by_index[i] == 1.0 for i in range(1, 4 * N))


def test_partial_question_is_rejected(tiny_model_path, standin_ray):
    args = make_args()
    samples = rollout_samples(4, N)[:-1]
    with pytest.raises(ValueError, match="n_samples_per_prompt"):
        make_experiences(args, load_actor(tiny_model_path), samples)


def test_other_estimators_untouched(tiny_model_path, standin_ray):
    args = make_args(**{"algo.advantage.estimator": "group_norm"})
    experiences = make_experiences(args, load_actor(tiny_model_path), rollout_samples(4, N))
    for exp in experiences:
        assert GROUP_KEY not in exp.info
        assert exp.advantages is not None and exp.advantages.shape == exp.action_mask.shape
