"""Cross-rank mode when something is wrong on one rank only (gloo, 2 and 3 ranks).

One spawned job per world size runs every case below on the same process group, in order; a
rank records, per case, the exception it raised (type and message) or its results. Every rank
must raise the same exception, with the message written here (it names the failing rank and
the argument), or every rank must succeed with the same results, equal to the single-process
loss on the concatenated batch. A case that left a rank alone in a collective would make the
next cases fail (gloo's timeout) and the job's hard timeout catches a hang. Each rank also
counts its all_gathers and host reads per case.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_support import free_port, init_gloo, run_ranks

from discoloss import LagrangeMultiplier, disco_loss

#: Tensor methods that read values on the host (counted, not trapped: the mode has one read).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def shard(rank: int, world: int, size: int | None = None) -> dict[str, Any]:
    """Rank ``rank``'s inputs: uneven sizes (5, 8, 11), different T per rank (7, 11, 15),
    groups interleaved across ranks."""
    b = 5 + 3 * rank if size is None else size
    t = 7 + 4 * rank
    g = torch.Generator().manual_seed(1000 * world + rank)
    lp = -torch.rand(b, t, generator=g, dtype=torch.float64) - 0.1
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, 0] = True
    old = lp + 0.05 * torch.randn(b, t, generator=g, dtype=torch.float64)
    rewards = torch.randint(0, 2, (b,), generator=g).double()
    group_ids = (torch.arange(b) + rank) % 4 * 1_000_003 - 7
    return dict(log_probs=lp, old_log_probs=old, mask=mask, rewards=rewards, group_ids=group_ids)


def where(rank: int, world: int) -> str:
    return f"disco_loss on rank {rank} of {world} in process_group: "


def nan_old(rank: int, world: int) -> dict[str, Any]:
    s = shard(rank, world)
    if rank == 1:
        s["old_log_probs"][2, 0] = float("nan")
    return s


def inf_log_prob_last(rank: int, world: int) -> dict[str, Any]:
    s = shard(rank, world)
    if rank == world - 1:
        s["log_probs"][3, 0] = float("-inf")
    return s


def inf_reward_first(rank: int, world: int) -> dict[str, Any]:
    s = shard(rank, world)
    if rank == 0:
        s["rewards"][1] = float("inf")
    return s


def bad_mask_values(rank: int, world: int) -> dict[str, Any]:
    s = shard(rank, world)
    s["mask"] = s["mask"].double()
    if rank == 1:
        s["mask"][4, 0] = 2.0
    return s


def shape_error(rank: int, world: int) -> dict[str, Any]:
    s = shard(rank, world)
    if rank == 1:
        s["mask"] = torch.cat([s["mask"], s["mask"][:, :1]], dim=1)
    return s


def float_group_ids_last(rank: int, world: int) -> dict[str, Any]:
    s = shard(rank, world)
    if rank == world - 1:
        s["group_ids"] = s["group_ids"].float()
    return s


def option_mismatch(rank: int, world: int) -> dict[str, Any]:
    # the example of a silent wrong answer: different objectives on different ranks
    options = dict(tau=1.0, threshold=2.0) if rank == 1 else dict(tau=10.0, threshold=0.5)
    return {**shard(rank, world), **options}


def default_tau_vs_explicit(rank: int, world: int) -> dict[str, Any]:
    # tau=None resolves to 10 for the log-likelihood score: the same option, not a mismatch
    return {**shard(rank, world), "tau": 10.0 if rank == 0 else None}


def bad_option_value(rank: int, world: int) -> dict[str, Any]:
    return {**shard(rank, world), "beta": -1.0 if rank == 1 else 1e3}


def counts_with_process_group(rank: int, world: int) -> dict[str, Any]:
    return {**shard(rank, world), "num_groups": 3}


def multiplier_mismatch(rank: int, world: int) -> dict[str, Any]:
    m = LagrangeMultiplier(init=2.0 if rank == world - 1 else 1.0)
    return {**shard(rank, world), "constraint": "lagrangian", "multiplier": m}


def empty_rank1(rank: int, world: int) -> dict[str, Any]:
    return shard(rank, world, size=0 if rank == 1 else None)


def all_empty(rank: int, world: int) -> dict[str, Any]:
    return shard(rank, world, size=0)


def not_validated_nan(rank: int, world: int) -> dict[str, Any]:
    return {**nan_old(rank, world), "validate": False}


def baseline(rank: int, world: int) -> dict[str, Any]:
    return shard(rank, world)


def baseline_not_validated(rank: int, world: int) -> dict[str, Any]:
    return {**shard(rank, world), "validate": False}


def likelihood_ratio_empty_last(rank: int, world: int) -> dict[str, Any]:
    s = shard(rank, world, size=0 if rank == world - 1 else None)
    return {**s, "score": "likelihood_ratio", "kl_estimator": "k3"}


#: name -> (inputs of a rank, expected outcome for a world size: None = every rank succeeds
#: with the single-process result, else (exception type name, message))
CASES: dict[str, tuple[Callable[[int, int], dict[str, Any]], Callable[[int], Any]]] = {
    "baseline": (baseline, lambda w: None),
    "nan_old_log_prob_on_rank_1": (
        nan_old,
        lambda w: (
            "ValueError",
            where(1, w) + "old_log_probs: non-finite value at a response token of response 2",
        ),
    ),
    "inf_log_prob_on_last_rank": (
        inf_log_prob_last,
        lambda w: (
            "ValueError",
            where(w - 1, w) + "log_probs: non-finite value at a response token of response 3",
        ),
    ),
    "inf_reward_on_rank_0": (
        inf_reward_first,
        lambda w: (
            "ValueError",
            where(0, w) + "rewards: non-finite value at response 1; every reward must be "
            "finite to be labelled positive or negative",
        ),
    ),
    "mask_value_on_rank_1": (
        bad_mask_values,
        lambda w: (
            "ValueError",
            where(1, w) + "mask must hold only 0 and 1 (or be a bool tensor); found other "
            "values (first at response 4)",
        ),
    ),
    "shape_error_on_rank_1": (
        shape_error,
        lambda w: (
            "ValueError",
            where(1, w) + "mask has shape (8, 12) but log_probs has shape (8, 11); they must match",
        ),
    ),
    "float_group_ids_on_last_rank": (
        float_group_ids_last,
        lambda w: (
            "TypeError",
            where(w - 1, w) + "group_ids must be an integer tensor (e.g. torch.long), got dtype "
            "torch.float32",
        ),
    ),
    "option_mismatch": (
        option_mismatch,
        lambda w: (
            "ValueError",
            "disco_loss options differ across the ranks of process_group (every rank must pass "
            "the same options): tau: 10.0 ({0}) vs 1.0 (rank 1); threshold: 0.5 ({0}) vs 2.0 "
            "(rank 1)".format("rank 0" if w == 2 else "ranks 0, 2"),
        ),
    ),
    "default_tau_equals_explicit": (default_tau_vs_explicit, lambda w: None),
    "bad_option_value_on_rank_1": (
        bad_option_value,
        lambda w: ("ValueError", where(1, w) + "beta must be >= 0, got -1.0"),
    ),
    "global_counts_with_process_group": (
        counts_with_process_group,
        lambda w: (
            "ValueError",
            where(0, w)
            + "num_groups/num_tokens cannot be combined with process_group: the "
            "cross-rank mode already normalises by the global counts ({} failed a check "
            "too)".format("rank 1" if w == 2 else "ranks 1, 2"),
        ),
    ),
    "multiplier_mismatch": (
        multiplier_mismatch,
        lambda w: (
            "ValueError",
            "disco_loss options differ across the ranks of process_group (every rank must pass "
            "the same options): multiplier: LagrangeMultiplier(value=1.0) ({}) vs "
            "LagrangeMultiplier(value=2.0) (rank {})".format(
                "rank 0" if w == 2 else "ranks 0, 1", w - 1
            ),
        ),
    ),
    "empty_shard_on_rank_1": (empty_rank1, lambda w: None),
    "likelihood_ratio_empty_last_rank": (likelihood_ratio_empty_last, lambda w: None),
    "every_rank_empty": (
        all_empty,
        lambda w: (
            "ValueError",
            f"log_probs is an empty batch (0 responses) on every rank of process_group ({w} "
            "ranks); at least one response is required across the ranks",
        ),
    ),
    "validate_false_lets_nan_through": (not_validated_nan, lambda w: "nan"),
    "baseline_not_validated": (baseline_not_validated, lambda w: None),
    "baseline_again": (baseline, lambda w: None),
}


def _counting(counts: dict[str, int]) -> dict[str, Any]:
    """Wrap the host-reading Tensor methods and all_gather so that they count their calls."""
    originals: dict[str, Any] = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name: str, real: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] = counts.get(name, 0) + 1
            return real(*args, **kwargs)

        return counted

    for name, real in originals.items():
        setattr(torch.Tensor, name, wrap(name, real))
    originals["all_gather"] = dist.all_gather
    dist.all_gather = wrap("all_gather", dist.all_gather)
    return originals


def _restore(originals: dict[str, Any]) -> None:
    dist.all_gather = originals.pop("all_gather")
    for name, real in originals.items():
        setattr(torch.Tensor, name, real)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    init_gloo(rank, world, port)
    results: dict[str, Any] = {}
    try:
        for name, (inputs_of, _) in CASES.items():
            kwargs = inputs_of(rank, world)
            lp = kwargs["log_probs"].requires_grad_()
            counts: dict[str, int] = {}
            originals = _counting(counts)
            try:
                out = disco_loss(**kwargs, process_group=dist.group.WORLD)
                out.loss.backward()
                outcome: Any = dict(
                    loss=out.loss.detach().clone(),
                    metrics={k: v.clone() for k, v in out.metrics.items()},
                    grad=lp.grad.clone(),
                )
            except Exception as exc:  # recorded, compared across ranks by the test
                outcome = (type(exc).__name__, str(exc))
            finally:
                _restore(originals)
            results[name] = dict(outcome=outcome, counts=counts)
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def single_process(world: int, name: str) -> tuple[Any, list[torch.Tensor]]:
    """disco_loss on the concatenated batch (padded to the longest T), and its gradient cut
    into the ranks' shards."""
    shards = [CASES[name][0](r, world) for r in range(world)]
    options = {
        k: v for k, v in shards[0].items() if k not in ("log_probs", "old_log_probs", "mask")
    }
    for k in ("rewards", "group_ids"):
        options.pop(k)
    tmax = max(s["log_probs"].shape[1] for s in shards)

    def cat(key: str) -> torch.Tensor:
        return torch.cat(
            [torch.nn.functional.pad(s[key], (0, tmax - s[key].shape[1])) for s in shards]
        )

    lp = cat("log_probs").requires_grad_()
    out = disco_loss(
        lp,
        cat("old_log_probs"),
        cat("mask"),
        torch.cat([s["rewards"] for s in shards]),
        torch.cat([s["group_ids"] for s in shards]),
        **options,
    )
    (grad,) = torch.autograd.grad(out.loss, lp)
    sizes = [s["log_probs"].shape[0] for s in shards]
    pieces = torch.split(grad, sizes)
    return out, [p[:, : s["log_probs"].shape[1]] for p, s in zip(pieces, shards)]


@pytest.mark.parametrize("world", [2, 3])
def test_one_rank_faults_are_decided_by_every_rank(world: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_worker, world, (world, free_port(), tmp))
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    assert all(set(r) == set(CASES) for r in ranks), "a rank did not run every case"
    for name, (_, expected_of) in CASES.items():
        expected = expected_of(world)
        got = [r[name]["outcome"] for r in ranks]
        counts = [r[name]["counts"] for r in ranks]
        if isinstance(expected, tuple):
            for outcome in got:
                assert outcome == expected, (name, outcome)
            # decided from the first gather: the payload gather is never entered
            assert all(c.get("all_gather") == 1 for c in counts), (name, counts)
            continue
        for outcome in got:
            assert isinstance(outcome, dict), (name, outcome)
        # two gathers per forward, none in backward, and one host read (the headers)
        for c in counts:
            assert c.get("all_gather") == 2, (name, c)
            reads = {k: v for k, v in c.items() if k != "all_gather"}
            assert reads == {"tolist": 1}, (name, reads)
        if expected == "nan":
            assert all(torch.isnan(o["loss"]) for o in got), name
            continue
        ref, ref_grads = single_process(world, name)
        for rank, outcome in enumerate(got):
            torch.testing.assert_close(outcome["loss"], ref.loss.detach(), rtol=1e-9, atol=1e-12)
            for k, v in ref.metrics.items():
                torch.testing.assert_close(
                    outcome["metrics"][k].double(), v.double(), rtol=1e-9, atol=1e-12
                )
            # the local gradient is scaled by the world size (DDP averages it back)
            assert outcome["grad"].shape == ref_grads[rank].shape, name
            torch.testing.assert_close(
                outcome["grad"] / world, ref_grads[rank], rtol=1e-9, atol=1e-12
            )


def _table(headers: list[torch.Tensor]) -> list[list[int]]:
    return torch.stack(headers).tolist()  # what gather_headers reads


def test_decision_order_and_long_messages_without_processes() -> None:
    """The decision is a function of the gathered headers alone: simulate the gather."""
    from discoloss import DiscoOptions
    from discoloss._checks import ValueCheck
    from discoloss.distributed import MESSAGE_BYTES, build_header, collective_error

    cpu = torch.device("cpu")
    opts = DiscoOptions()

    def header(**kw: Any) -> torch.Tensor:
        base: dict[str, Any] = dict(
            count=4, failure=None, options=opts, validate=True, multiplier=None, checks=()
        )
        return build_header(**{**base, **kw}, device=cpu)

    nan_at_2 = ValueCheck("log_probs", torch.tensor([False, False, True, True]))
    long = TypeError("x" * (2 * MESSAGE_BYTES) + " é")
    # a failed local check beats different options and value failures; messages are cut
    error = collective_error(
        _table(
            [
                header(checks=[nan_at_2]),
                header(failure=long, options=None),
                header(options=DiscoOptions(tau=3.0)),
                header(failure=ValueError("second")),
            ]
        )
    )
    assert type(error) is TypeError
    assert str(error) == (
        "disco_loss on rank 1 of 4 in process_group: "
        + "x" * MESSAGE_BYTES
        + " (rank 3 failed a check too)"
    )
    # different options beat value failures
    error = collective_error(
        _table([header(checks=[nan_at_2]), header(options=DiscoOptions(tau=3.0))])
    )
    assert str(error).endswith("tau: 10.0 (rank 0) vs 3.0 (rank 1)")
    # value failures: the lowest rank, its first failing response
    error = collective_error(
        _table([header(), header(checks=[nan_at_2]), header(checks=[nan_at_2])])
    )
    assert str(error) == (
        "disco_loss on rank 1 of 3 in process_group: log_probs: non-finite value at a response "
        "token of response 2"
    )
    assert collective_error(_table([header(), header(count=0)])) is None
    assert "empty batch" in str(collective_error(_table([header(count=0), header(count=0)])))
