"""weights=current / sampling: one plan per mini-batch, any micro-batch layout, through verl's
own data path (``make_iterator`` mini-batches, ``prepare_micro_batches`` fixed or dynamic,
``ppo_loss`` with nested tensors, :mod:`verl_sim`), against :func:`discoloss.disco_loss` on the
whole mini-batch. Two data-parallel ranks run as two processes over gloo (the plan's
collectives for real). The real ``main_ppo`` runs are in test_verl_e2e.py."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from discoloss.adapters.verl import DiscoLayoutError, compute_policy_loss_disco, planning
from discoloss.adapters.verl.loss import options_of
from verl_sim import (
    actor_config,
    add_padding,
    estimate,
    make_batch,
    reference,
    run_planned_update,
    to_tensordict,
)

N = 4


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def _batch(seed: int, questions: int = 8, kl_scale: float = 0.05, padding: int = 0) -> Any:
    """8 questions x 4 in random order; the old log-probs 0.01 above the current ones on
    average, so that the k1 KL (~0.01) activates the squared hinge at delta=1e-4."""
    batch = make_batch([N] * questions, seed=seed, kl_scale=kl_scale)
    batch.old = batch.old + 0.01
    if padding:
        add_padding(batch, padding)
    estimate(batch, N)
    return batch


LAYOUTS = {
    "micro 1": dict(micro=1),
    "micro 2": dict(micro=2),
    "micro 3 of a 12-row mini-batch": dict(micro=3),
    "dynamic": dict(micro=None, dynamic=True, max_token_len=12),
    "shuffled": dict(micro=1, shuffle=True),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_current_is_exact_at_every_mini_batch_and_layout(layout: str) -> None:
    """weights=current: every mini-batch's gradient equals disco_loss on that mini-batch at
    the current parameters, squared hinge active (sim KL per token ~ 0.05^2/2 >> delta)."""
    batch = _batch(seed=11, questions=6 if "12" in layout else 8)
    mini = 12 if "12" in layout else 16
    opts = dict(delta=1e-4, beta=1e3)
    step = run_planned_update(batch, n=N, dp=1, mini_batch_size=mini, **LAYOUTS[layout], **opts)
    assert len(step.grads) >= 2
    for grad, rows, metrics in zip(step.grads, step.members, step.metrics):
        ref, out = reference(batch, rows, **opts)
        assert _rel(grad, ref) < 1e-5, layout
        assert metrics["kl"] == pytest.approx(float(out.kl), rel=1e-5)
        assert metrics["objective"] == pytest.approx(float(out.objective), rel=1e-5)
        assert metrics["penalty"] == pytest.approx(float(out.penalty), rel=1e-4)
        assert float(out.penalty) > 0  # the squared hinge is active
        assert metrics["whole_questions"] == (
            1.0 if layout != "shuffled" else metrics["whole_questions"]
        )
    if layout == "shuffled":  # stock shuffling scatters questions over mini-batches: reported
        assert min(m["whole_questions"] for m in step.metrics) < 1.0


VARIANTS = [
    dict(objective="disco_b"),
    dict(objective="cvar", cvar_alpha=0.5),
    dict(objective="auc_logistic"),
    dict(score="likelihood_ratio", kl_estimator="k3"),
    dict(score="clipped_ratio"),
    dict(normalize="valid"),
    dict(constraint="hinge"),
    dict(constraint="kl_penalty", beta=3.0),
    dict(threshold=0.0),
]


@pytest.mark.parametrize(
    "variant", VARIANTS, ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items())
)
def test_current_is_exact_for_every_variant(variant: dict) -> None:
    batch = _batch(seed=5)
    opts = dict(delta=1e-4, **variant)
    if "threshold" in variant:
        estimate(batch, N, threshold=variant["threshold"])
    step = run_planned_update(batch, n=N, dp=1, mini_batch_size=16, micro=1, **opts)
    for grad, rows in zip(step.grads, step.members):
        ref, _ = reference(batch, rows, **opts)
        assert _rel(grad, ref) < 1e-5


def test_a_second_epoch_reads_the_codes_again() -> None:
    """ppo_epochs=2: the handoff replaced each mini-batch's advantages by a new tensor, so the
    second epoch's mini-batches (cut again from the same rows) still carry the codes."""
    batch = _batch(seed=12)
    step = run_planned_update(batch, n=N, dp=1, mini_batch_size=16, micro=2, epochs=2)
    assert len(step.grads) == 4
    for grad, rows in zip(step.grads, step.members):
        assert _rel(grad, reference(batch, rows)[0]) < 1e-5


def test_padding_samples_carry_no_weight() -> None:
    """verl's synthetic padding samples (no response token): weight 0, left out of the plan;
    the gradient is disco_loss's on the real responses."""
    batch = _batch(seed=8, questions=7, padding=4)
    step = run_planned_update(batch, n=N, dp=1, mini_batch_size=16, micro=1, delta=1e-4)
    padded = [i for i, u in enumerate(batch.uids) if u == "pad"]
    assert any(set(padded) & set(rows) for rows in step.members)
    for grad, rows in zip(step.grads, step.members):
        ref, _ = reference(batch, rows, delta=1e-4)
        assert _rel(grad, ref) < 1e-5
        assert float(grad[padded].abs().sum()) == 0.0


def test_sampling_is_exact_for_disco_b_with_a_linear_penalty_and_at_theta_old() -> None:
    """weights=sampling: the stats at the old log-probs. Exact where the weights do not depend
    on the scores (disco_b) and the penalty is linear in the KL, and wherever theta = theta_old;
    not exact for DisCO after theta moved (the test would see the difference)."""
    batch = _batch(seed=6)
    linear = dict(objective="disco_b", constraint="kl_penalty", beta=2.0)
    step = run_planned_update(
        batch, n=N, dp=1, mini_batch_size=16, micro=1, weights="sampling", **linear
    )
    for grad, rows in zip(step.grads, step.members):
        assert _rel(grad, reference(batch, rows, **linear)[0]) < 1e-5

    at_old = _batch(seed=6)
    at_old.old = torch.nn.functional.logsigmoid(at_old.theta).float()  # theta = theta_old
    step = run_planned_update(
        at_old, n=N, dp=1, mini_batch_size=16, micro=1, weights="sampling", delta=1e-4
    )
    for grad, rows in zip(step.grads, step.members):
        assert _rel(grad, reference(at_old, rows, delta=1e-4)[0]) < 1e-5

    far = _batch(seed=6, kl_scale=0.5)
    moved = run_planned_update(
        far, n=N, dp=1, mini_batch_size=16, micro=4, weights="sampling", delta=10.0
    )  # DisCO, penalty inactive: only the stale weights differ
    for grad, rows in zip(moved.grads, moved.members):
        assert _rel(grad, reference(far, rows, delta=10.0)[0]) > 1e-3


def test_rows_that_do_not_match_the_plan_are_caught() -> None:
    """A micro-batch whose advantages are not the plan's row positions (changed after the
    plan, or another mini-batch's plan) fails its check instead of using wrong weights."""
    batch = _batch(seed=9)
    config = actor_config(N, micro=4, delta=1e-4)
    opts = options_of(config)
    td = to_tensordict(batch, list(range(16)))
    plan = planning.plan_mini_batch(td, opts, group_size=N)
    planning.install(td, plan)
    adv = td["advantages"].to_padded_tensor(0.0)
    mask = td["response_mask"].to_padded_tensor(0).bool()
    lp = torch.nn.functional.logsigmoid(batch.theta[:16, : mask.shape[1]]).float()
    old = batch.old[:16, : mask.shape[1]]
    config.global_batch_info.update(
        dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=16
    )
    kw = dict(old_log_prob=old, log_prob=lp, response_mask=mask, config=config)
    with planning.running(plan):
        compute_policy_loss_disco(advantages=adv, **kw)  # the plan's own rows: fine
        lengths = mask.sum(-1)
        a, b = next((i, j) for i in range(16) for j in range(16) if lengths[i] != lengths[j])
        swapped = adv.clone()
        swapped[a], swapped[b] = adv[b].max(), adv[a].max()
        swapped = torch.where(mask, swapped, 0.0)
        with pytest.raises(DiscoLayoutError, match="does not match|does not carry a position"):
            compute_policy_loss_disco(advantages=swapped, **kw)
        with pytest.raises(DiscoLayoutError, match="does not carry a position"):
            compute_policy_loss_disco(advantages=torch.where(mask, 99.0, 0.0), **kw)
    # the plan counted its rows: twice and never both fail the finish
    with pytest.raises(DiscoLayoutError, match="did not reach the loss exactly once"):
        planning.finish(plan)


def test_without_a_plan_the_loss_keeps_questions_whole() -> None:
    """Called outside a planned mini-batch (e.g. directly), the loss in weights=current works
    as weights=micro_batch: its own DisCO loss on the whole questions of the micro-batch."""
    batch = _batch(seed=10, questions=2)
    config = actor_config(N, micro=8, delta=1.0)
    mask = batch.mask
    loss, metrics = compute_policy_loss_disco(
        old_log_prob=batch.old,
        log_prob=torch.nn.functional.logsigmoid(batch.theta).float(),
        advantages=batch.advantages,
        response_mask=mask,
        config=config,
    )
    _, out = reference(batch, list(range(batch.size)), delta=1.0)
    assert float(loss) == pytest.approx(float(out.loss), rel=1e-5)
    assert metrics["actor/disco/split_responses"] == 0


# ---------------------------------------------------------------------------------------------
# two data-parallel ranks (two processes, gloo)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(target: Any, world: int, *args: Any) -> dict[int, Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, out, *args)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(world):
            rank, value = out.get(timeout=240)
            results[rank] = value
    finally:
        for p in procs:
            p.join(timeout=60)
    for p in procs:
        assert p.exitcode == 0
    return results


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)


RANK_RUNS = {
    "micro 1": dict(micro=1),
    "dynamic": dict(micro=None, dynamic=True, max_token_len=12),
    "shuffled": dict(micro=1, shuffle=True),
    "world-size factor lost": dict(micro=1, dp_factor=1),
    "sampling": dict(micro=1, weights="sampling"),
}


def _ranks_worker(rank: int, world: int, port: int, out: Any) -> None:
    _init(rank, world, port)
    try:
        batch = _batch(seed=13, padding=2 * world)
        results = {}
        for name, kw in RANK_RUNS.items():
            step = run_planned_update(
                batch,
                n=N,
                dp=world,
                rank=rank,
                group=dist.group.WORLD,
                mini_batch_size=12,
                delta=1e-4,
                **kw,
            )
            members: list[Any] = [None] * world
            dist.all_gather_object(members, step.members)
            rows = [sum((m[k] for m in members), []) for k in range(len(step.grads))]
            split = [
                len({i for m in members for i in m[k]}) == len(rows[k]) for k in range(len(rows))
            ]
            on_ranks = [
                [set(batch.uids[i] for i in m[k]) for m in members] for k in range(len(rows))
            ]
            grads = [g.numpy() for g in step.grads]  # plain pickles through the queue
            results[name] = (grads, rows, step.metrics, split, on_ranks)
        out.put((rank, results))
    finally:
        dist.destroy_process_group()


def test_two_ranks_exact_at_every_mini_batch() -> None:
    """2 ranks, micro-batches of 1 response or token-based, questions split over micro-batches
    and ranks (and over mini-batches when shuffled), padding samples: the gradient of every
    mini-batch (averaged over the ranks, as FSDP does) equals disco_loss's on it. A lost
    world-size factor and the sampling policy's stale weights fail the same comparison."""
    results = _spawn(_ranks_worker, 2)
    batch = _batch(seed=13, padding=4)
    r0 = results[0]
    for name, (grads, rows, metrics, unique, on_ranks) in r0.items():
        assert len(grads) == 3
        penalties = []
        for k, (array, rws, m) in enumerate(zip(grads, rows, metrics)):
            assert unique[k]
            grad = torch.from_numpy(array)
            ref, out = reference(batch, rws, delta=1e-4)
            assert (array == results[1][name][0][k]).all()  # the same gradient on both ranks
            rel = _rel(grad, ref)
            if name == "world-size factor lost":
                assert rel == pytest.approx(0.5, abs=1e-4)
            elif name == "sampling":
                assert rel > 1e-2  # stale stats: not the gradient at the current parameters
            else:
                assert rel < 1e-5, (name, k, rel)
                assert m["kl"] == pytest.approx(float(out.kl), rel=1e-4, abs=1e-7)
                penalties.append(float(out.penalty))
        assert name in ("world-size factor lost", "sampling") or max(penalties) > 0
        # questions split across the ranks (the adapter balances responses, not questions)
        assert any(on_ranks[k][0] & on_ranks[k][1] for k in range(len(rows))), name


def _fault_worker(rank: int, world: int, port: int, out: Any, fault: str) -> None:
    _init(rank, world, port)
    try:
        batch = _batch(seed=14)
        if rank == 1 and fault == "nan":
            i = int(batch.mask.any(-1).nonzero()[-1])  # a row of rank 1's chunk
            batch.old[i, 0] = float("nan")
        if rank == 1 and fault == "codes":
            batch.advantages = batch.advantages * 0.37
        message = None
        try:
            run_planned_update(
                batch, n=N, dp=world, rank=rank, group=dist.group.WORLD, mini_batch_size=16, micro=1
            )
        except DiscoLayoutError as error:
            message = str(error)
        out.put((rank, message))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("nan", "DisCO mini-batch plan: plan_minibatch on rank 1 of 2 in process_group: stats."),
        ("codes", "DisCO mini-batch plan: advantages without DisCO codes on rank(s) 1"),
    ],
)
def test_a_bad_value_on_one_rank_stops_every_rank_in_the_plan(fault: str, expected: str) -> None:
    """A non-finite old log-prob or advantages without codes on rank 1 only: the plan raises
    the same error on both ranks, before any backward pass (no rank waits in a collective)."""
    results = _spawn(_fault_worker, 2, fault)
    assert results[0] is not None and results[0] == results[1], results
    assert results[0].startswith(expected), results[0]
    if fault == "nan":
        assert "rank 1" in results[0]
