"""The pieces of ``--algo.disco.weights current|sampling`` without a model: the question order
shared by the ranks, the replay-buffer views that cut it into optimizer steps, the option."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from discoloss.adapters.openrlhf.loss import stop_together
from discoloss.adapters.openrlhf.minibatch import (
    BATCH_ATTR,
    GROUP_KEY,
    PlannedDynamicReplay,
    PlannedReplay,
    question_order,
)
from discoloss.adapters.openrlhf.settings import DEFAULT_WEIGHTS, WEIGHTS, settings_from_args
from orlhf_testkit import N, rollout_samples


def _questions(order: list[int], group_of: list[int]) -> list[int]:
    seen: list[int] = []
    for i in order:
        if not seen or seen[-1] != group_of[i]:
            seen.append(group_of[i])
    return seen


def test_question_order_keeps_questions_together_and_is_shared_by_the_ranks():
    group_of = [q for q in range(12) for _ in range(N)]
    order = question_order(group_of, seed=3)
    assert sorted(order) == list(range(len(group_of)))
    questions = _questions(order, group_of)
    assert sorted(questions) == list(range(12))  # each question in one contiguous run
    assert questions != sorted(questions)  # shuffled
    assert order == question_order(group_of, seed=3)  # deterministic
    assert _questions(question_order(group_of, seed=4), group_of) != questions
    # two ranks holding parts of the questions (question 5 on both) order them alike
    rank0 = [q for q in range(6) for _ in range(N)] + [5, 5]
    rank1 = [5, 5] + [q for q in range(6, 12) for _ in range(N)]
    for part in (rank0, rank1):
        mine = _questions(question_order(part, seed=3), part)
        assert mine == [q for q in questions if q in set(part)]


class _Buffer:
    """What the views read from OpenRLHF's NaiveReplayBuffer (its collation is OpenRLHF's)."""

    def __init__(self, items: list, *, dynamic: bool = False) -> None:
        from openrlhf.trainer.ppo_utils.replay_buffer import NaiveReplayBuffer

        self._real = NaiveReplayBuffer.__new__(NaiveReplayBuffer)
        self._real.packing_samples = False
        self._real.dynamic_batch = dynamic
        self.items = items
        self.dynamic_batch = dynamic
        self.dynamic_indices: list[list[int]] = []
        self.dynamic_optimizer_step: list[int] = []
        self.setup_order: list[int] | None = None

    def collate_fn(self, batch):
        return self._real.collate_fn(batch)

    def setup_dynamic_batch(self, strategy) -> None:
        """Like OpenRLHF's: consecutive steps of 6 samples, micro-batches of 4 then 2."""
        self.setup_order = [int(item.info[GROUP_KEY]) for item in self.items]
        self.dynamic_indices, self.dynamic_optimizer_step = [], []
        for start in range(0, len(self.items) - 5, 6):
            self.dynamic_indices += [list(range(start, start + 4)),
                                     list(range(start + 4, start + 6))]
            self.dynamic_optimizer_step += [0, 1]


def _items(num_prompts: int, *, empty: tuple[int, ...] = ()) -> list:
    from openrlhf.trainer.ppo_utils.experience import split_experience_batch

    items = []
    for i, sample in enumerate(rollout_samples(num_prompts, N, seed=2)):
        (item,) = split_experience_batch(sample)
        item.info[GROUP_KEY] = torch.tensor(i // N)
        if i in empty:
            item.action_mask = torch.zeros_like(item.action_mask)
        items.append(item)
    return items


def test_planned_replay_cuts_the_question_order_into_optimizer_steps():
    buffer = _Buffer(_items(6))
    view = PlannedReplay(buffer, micro_batch_size=2, accumulated_gradient=4, seed=1)
    assert len(view) == 3 and view.sample_batch_size == 1
    epochs = []
    for epoch in range(2):
        windows = list(view.epoch_windows())
        assert len(windows) == 3
        assert [w.theta_old for w in windows] == [epoch == 0, False, False]
        ids = []
        for w in windows:
            assert [len(getattr(m, BATCH_ATTR)["group_ids"]) for m in w.micro_batches] == [2] * 4
            step = Counter(int(g) for m in w.micro_batches for g in getattr(m, BATCH_ATTR)[
                "group_ids"])
            assert set(step.values()) == {N}  # 8 samples per step: two whole questions
            for k, m in enumerate(w.micro_batches):
                batch = getattr(m, BATCH_ATTR)
                assert batch["window"] is w and batch["position"] == k and batch["rows"] is None
                assert GROUP_KEY not in m.info
            ids += [int(g) for m in w.micro_batches for g in getattr(m, BATCH_ATTR)["group_ids"]]
        assert sorted(ids) == sorted(q for q in range(6) for _ in range(N))
        epochs.append(ids)
    assert epochs[0] != epochs[1]  # each epoch draws another question order
    # the DataLoader only paces: its elements are interchangeable slots
    assert [view.collate_fn([view[i]]) for i in range(len(view))] == [0, 1, 2]


def test_planned_replay_drops_a_trailing_remainder_like_openrlhf():
    view = PlannedReplay(_Buffer(_items(5)), micro_batch_size=3, accumulated_gradient=2, seed=0)
    windows = list(view.epoch_windows())
    sizes = [[len(getattr(m, BATCH_ATTR)["group_ids"]) for m in w.micro_batches]
             for w in windows]
    assert sizes == [[3, 3], [3, 3], [3, 3]] and len(view) == 3  # 20 samples: 18 trained


def test_responses_without_a_response_token_are_marked():
    view = PlannedReplay(_Buffer(_items(2, empty=(1, 6))), micro_batch_size=8,
                         accumulated_gradient=1, seed=0)
    (window,) = list(view.epoch_windows())
    (micro,) = window.micro_batches
    batch = getattr(micro, BATCH_ATTR)
    empty = (~micro.action_mask.any(-1)).nonzero().squeeze(1).tolist()
    assert len(empty) == 2 and batch["rows"].tolist() == [i for i in range(8) if i not in empty]


def test_planned_dynamic_replay_orders_questions_before_openrlhf_cuts_steps():
    buffer = _Buffer(list(reversed(_items(3))), dynamic=True)
    original = buffer.items
    view = PlannedDynamicReplay(buffer, seed=5)
    view.setup_dynamic_batch(strategy=None)
    runs = _questions(list(range(len(buffer.setup_order))), buffer.setup_order)
    assert sorted(runs) == [0, 1, 2]  # whole questions, in the shared order
    assert len(view) == 4 and view.windows == [[0, 1], [2, 3]]
    served = [view.collate_fn([view[i]]) for i in range(len(view))]
    windows = [getattr(m, BATCH_ATTR)["window"] for m in served]
    assert windows[0] is windows[1] and windows[2] is windows[3] and windows[0] is not windows[2]
    assert [w.theta_old for w in windows[::2]] == [True, False]
    assert [len(m.rewards) for m in served] == [4, 2, 4, 2]
    with pytest.raises(RuntimeError, match="in order"):
        view.collate_fn([1])  # the second micro-batch of a step that is not the current one
    view.close()
    assert buffer.items is original


def test_stop_together_on_one_rank_raises_the_explained_error():
    stop_together(torch.tensor(False), lambda: ValueError("never built"), group=None, dp_size=1)
    with pytest.raises(ValueError, match="explained"):
        stop_together(torch.tensor(True), lambda: ValueError("explained"), group=None,
                      dp_size=1)


def test_weights_option():
    assert DEFAULT_WEIGHTS == "current" and WEIGHTS == ("current", "sampling", "micro_batch")
    args = SimpleNamespace(algo=SimpleNamespace(disco=SimpleNamespace()))
    assert settings_from_args(args).weights == "current"
    for value in WEIGHTS:
        args.algo.disco.weights = value
        assert settings_from_args(args).planned == (value != "micro_batch")
    args.algo.disco.weights = "exact"
    with pytest.raises(ValueError, match=r"^--algo.disco.weights='exact' is not a valid option"):
        settings_from_args(args)
