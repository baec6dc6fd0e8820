"""Layout rules: settings that would split questions are handled or refused; the loss itself
detects a split question at run time."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from discoloss.adapters.verl import DiscoLayoutError, group_balanced_order
from omegaconf import OmegaConf
from verl_sim import estimate, make_batch, run_update


def verl_original_order(batch: Any, dp: int) -> list[int]:
    """What verl 0.9.1's v1 ``_balance_batch`` does: balance responses, ignoring questions."""
    from verl.utils.seqlen_balancing import calculate_workload, get_seqlen_balanced_partitions

    seq = torch.tensor([p + r for p, r in zip(batch.prompt_lens, batch.resp_lens)])
    parts = get_seqlen_balanced_partitions(
        calculate_workload(seq).tolist(), k_partitions=dp, equal_size=True
    )
    return [i for part in parts for i in part]


def test_balancer_whole_questions_and_balanced() -> None:
    n, dp, q = 8, 4, 8
    batch = make_batch([n] * 32, seed=2, max_len=40)
    seq = [p + r for p, r in zip(batch.prompt_lens, batch.resp_lens)]
    order, parts = group_balanced_order(
        batch.uids, seq, dp_size=dp, questions_per_mini_batch=q, group_size=n
    )
    assert sorted(order) == list(range(batch.size))
    per_rank = batch.size // dp
    assert [len(p) for p in parts] == [per_rank] * dp
    mini = q * n // dp
    for r in range(dp):
        chunk = order[r * per_rank : (r + 1) * per_rank]
        for k in range(0, per_rank, n):  # every run of n rows is one whole question
            assert len({batch.uids[i] for i in chunk[k : k + n]}) == 1
        for k in range(per_rank // mini):  # mini-batch k holds the k-th block of questions
            uids = {batch.uids[i] for i in chunk[k * mini : (k + 1) * mini]}
            first = list(dict.fromkeys(batch.uids))
            assert uids <= set(first[k * q : (k + 1) * q])
    loads = [sum(seq[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(seq) * n  # balanced up to one question


def test_verl_balancing_would_split_and_the_loss_detects_it() -> None:
    n, dp = 4, 2
    batch = make_batch([n] * 8, seed=4)
    estimate(batch, n)
    order = verl_original_order(batch, dp)
    with pytest.raises(DiscoLayoutError, match="split"):
        run_update(batch, n=n, dp=dp, questions_per_mini_batch=4, micro=4, order=order, delta=1.0)


def test_sync_free_split_detection_poisons_the_gradient() -> None:
    n, dp = 4, 2
    batch = make_batch([n] * 8, seed=4)
    estimate(batch, n)
    order = verl_original_order(batch, dp)
    step = run_update(
        batch,
        n=n,
        dp=dp,
        questions_per_mini_batch=4,
        micro=4,
        order=order,
        delta=1.0,
        validate=False,
    )
    assert any(torch.isnan(g).any() for g in step.grads)
    assert any(m["actor/disco/split_responses"] > 0 for m in step.metrics)
    assert any(math.isnan(m["actor/pg_loss"]) for m in step.metrics)


def test_micro_batch_not_multiple_of_n_is_detected() -> None:
    n = 4
    batch = make_batch([n] * 8, seed=6)
    estimate(batch, n)
    with pytest.raises(DiscoLayoutError, match="split"):
        run_update(batch, n=n, dp=1, questions_per_mini_batch=4, micro=2, delta=1.0)


def test_dynamic_batch_size_without_force_group_size_is_detected() -> None:
    n = 4
    batch = make_batch([n] * 12, seed=7, max_len=9)
    estimate(batch, n)
    with pytest.raises(DiscoLayoutError, match="split"):
        run_update(
            batch,
            n=n,
            dp=2,
            questions_per_mini_batch=6,
            micro=None,
            dynamic=True,
            max_token_len=40,
            delta=1.0,
        )


def test_shuffled_mini_batches_are_detected() -> None:
    """actor.shuffle=true (refused at startup) would split questions: the loss catches it."""
    n = 4
    batch = make_batch([n] * 8, seed=8)
    estimate(batch, n)
    order = list(range(batch.size))
    order = [
        order[i] for i in torch.randperm(batch.size, generator=torch.Generator().manual_seed(0))
    ]
    with pytest.raises(DiscoLayoutError, match="split"):
        run_update(batch, n=n, dp=1, questions_per_mini_batch=4, micro=8, order=order, delta=1.0)


def test_wrong_estimator_is_detected() -> None:
    n = 4
    batch = make_batch([n] * 4, seed=1)
    estimate(batch, n)
    batch.advantages = batch.advantages * 0.37  # e.g. GRPO-like real-valued advantages
    with pytest.raises(DiscoLayoutError, match="do not carry DisCO codes"):
        run_update(batch, n=n, dp=1, questions_per_mini_batch=4, micro=4, delta=1.0)


@pytest.mark.parametrize(
    ("sizes", "q", "dp", "message"),
    [
        ([4, 4, 3, 5], 2, 1, "has [35] responses"),
        ([4] * 6, 4, 1, "6 questions, not a multiple"),
        ([4] * 8, 4, 3, "not a multiple of the actor's data-parallel size 3"),
    ],
)
def test_balancer_refusals(sizes: list[int], q: int, dp: int, message: str) -> None:
    batch = make_batch(sizes, seed=0)
    with pytest.raises(DiscoLayoutError, match=message):
        group_balanced_order(
            batch.uids, [3] * batch.size, dp_size=dp, questions_per_mini_batch=q, group_size=4
        )


# --- the hooks on verl's v1 trainer ---------------------------------------------------------


def trainer_stub(
    adv_estimator: str,
    *,
    n: int = 4,
    mini: int = 2,
    dp: int = 2,
    dynamic: bool = False,
    weights: str = "current",
    bypass: bool | None = None,
) -> Any:
    config = OmegaConf.create(
        {
            "algorithm": {
                "adv_estimator": adv_estimator,
                "rollout_correction": None if bypass is None else {"bypass_mode": bypass},
            },
            "actor_rollout_ref": {
                "rollout": {"n": n, "temperature": 1.0},
                "actor": {
                    "ppo_mini_batch_size": mini,
                    "use_dynamic_bsz": dynamic,
                    "ppo_epochs": 1,
                    "data_loader_seed": 1,
                    "shuffle": False,
                    "calculate_entropy": False,
                    "entropy_coeff": 0.0,
                    "policy_loss": {"loss_mode": adv_estimator, "weights": weights},
                },
            },
        }
    )
    seen: dict[str, Any] = {}

    def update_actor(batch: Any) -> dict:
        seen.update(batch.extra_info)
        return {"metrics": {"mfu": [0.0]}}

    wg = SimpleNamespace(_dispatch_info={"actor": list(range(dp))}, update_actor=update_actor)
    stub = SimpleNamespace(
        config=config,
        actor_rollout_wg=wg,
        distillation_config=None,
        seen=seen,
        tokenizer=SimpleNamespace(eos_token_id=0),
        _get_required_batch_multiple=lambda d: math.lcm(d, mini * n),
    )
    return stub


def kv_batch(sizes: list[int]) -> Any:
    from transfer_queue import KVBatchMeta

    batch = make_batch(sizes, seed=12)
    keys = []
    session: dict[str, int] = {}
    for u in batch.uids:
        keys.append(f"{u}_{session.setdefault(u + '#', 0)}_0")
        session[u + "#"] += 1
    tags = [{"seq_len": p + r} for p, r in zip(batch.prompt_lens, batch.resp_lens)]
    return KVBatchMeta(partition_id="train", keys=keys, tags=tags), batch


def test_v1_trainer_is_patched_on_import() -> None:
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    assert getattr(PPOTrainer._balance_batch, "__discoloss__", False)
    assert getattr(PPOTrainer._update_actor, "__discoloss__", False)


def test_v1_balance_hook_planned_modes() -> None:
    """weights=current/sampling: each mini-batch (2 questions x 4 here) made of whole
    questions, its responses split over the ranks in equal numbers by workload."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    meta, batch = kv_batch([4] * 8)
    first = list(dict.fromkeys(k.rsplit("_", 2)[0] for k in meta.keys))
    metrics: dict = {}
    out = PPOTrainer._balance_batch(trainer_stub("disco", dp=2, mini=2), meta, metrics)
    uids = [k.rsplit("_", 2)[0] for k in out.keys]
    assert sorted(out.keys) == sorted(kv_batch([4] * 8)[0].keys)
    per_rank, mini_per_rank = 16, 4
    for m in range(4):  # mini-batch m = the m-th slice of each rank's chunk
        rows = [uids[r * per_rank + m * mini_per_rank + i] for r in range(2) for i in range(4)]
        assert sorted(set(rows)) == sorted(first[2 * m : 2 * m + 2])  # its 2 questions, whole
        assert sorted(rows.count(u) for u in set(rows)) == [4, 4]
    assert "global_seqlen/min" in metrics
    # the questions are split over the ranks: finer balance than whole questions per rank
    assert any(
        len({uids[i] for i in range(r * per_rank, (r + 1) * per_rank)}) > 4 for r in range(2)
    )


def test_mini_batch_balancer_with_padding_and_odd_questions() -> None:
    """Incomplete questions and verl's padding samples (appended last, one pad uid): the order
    keeps questions contiguous, cuts mini-batches in order, balances each over the ranks."""
    from discoloss.adapters.verl import mini_batch_balanced_order

    uids = ["a"] * 4 + ["b"] * 3 + ["c"] * 4 + ["d"] * 2 + ["a"] + ["pad"] * 2
    rng = torch.Generator().manual_seed(0)
    seq = torch.randint(3, 40, (len(uids),), generator=rng).tolist()
    order, parts = mini_batch_balanced_order(uids, seq, dp_size=2, mini_batch_size=8)
    assert sorted(order) == list(range(16)) and [len(p) for p in parts] == [8, 8]
    flat = (
        [i for i in range(16) if uids[i] == "a"]
        + [i for u in "bcd" for i in range(16) if uids[i] == u]
        + [14, 15]
    )
    for m in range(2):
        got = set(parts[0][4 * m : 4 * m + 4]) | set(parts[1][4 * m : 4 * m + 4])
        assert got == set(flat[8 * m : 8 * m + 8])
    with pytest.raises(DiscoLayoutError, match="not a multiple of the mini-batch size 8"):
        mini_batch_balanced_order(uids[:15], seq[:15], dp_size=2, mini_batch_size=8)
    with pytest.raises(DiscoLayoutError, match="does not split into equal parts"):
        mini_batch_balanced_order(uids, seq, dp_size=3, mini_batch_size=8)


def test_v1_balance_hook_disco_and_passthrough() -> None:
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    meta, batch = kv_batch([4] * 8)
    metrics: dict = {}
    out = PPOTrainer._balance_batch(trainer_stub("disco", weights="micro_batch"), meta, metrics)
    uids = [k.rsplit("_", 2)[0] for k in out.keys]
    assert all(len(set(uids[i : i + 4])) == 1 for i in range(0, len(uids), 4))
    assert "global_seqlen/min" in metrics
    # not DisCO: verl's own balancing runs unchanged (questions get mixed)
    meta2, _ = kv_batch([4] * 8)
    out2 = PPOTrainer._balance_batch(trainer_stub("grpo"), meta2, {})
    uids2 = [k.rsplit("_", 2)[0] for k in out2.keys]
    assert uids2 != uids
    # incomplete questions: refused instead of padded
    meta3, _ = kv_batch([4] * 7 + [3])
    with pytest.raises(DiscoLayoutError, match="not a multiple"):
        PPOTrainer._balance_batch(trainer_stub("disco", weights="micro_batch"), meta3, {})


@pytest.mark.parametrize("dynamic", [True, False])
def test_v1_update_hook_sets_force_group_size(dynamic: bool) -> None:
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    meta, _ = kv_batch([4] * 4)
    stub = trainer_stub("disco", dynamic=dynamic, weights="micro_batch")
    PPOTrainer._update_actor(stub, meta, {})
    assert stub.seen.get("force_group_size") == (4 if dynamic else None)
    assert stub.seen["global_batch_size"] == 8
    assert "disco_old_log_probs_at_theta_old" not in stub.seen


@pytest.mark.parametrize("bypass", [None, False, True])
@pytest.mark.parametrize("dynamic", [True, False])
def test_v1_update_hook_planned_modes(dynamic: bool, bypass: bool | None) -> None:
    """weights=current: no force_group_size; the workers learn whether the old log-probs are
    the actor's at theta_old (not in rollout-correction bypass mode, where they are the
    rollout's)."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    meta, _ = kv_batch([4] * 4)
    stub = trainer_stub("disco", dynamic=dynamic, bypass=bypass)
    PPOTrainer._update_actor(stub, meta, {})
    assert "force_group_size" not in stub.seen
    assert stub.seen["disco_old_log_probs_at_theta_old"] is (not bypass)
