"""``plan_minibatch(process_group=...)``: one mini-batch spread over gloo ranks (ragged shards,
a rank with no responses, questions cut across ranks), each rank accumulating micro-batches of
one response. The sum over ranks of the accumulated gradients must equal the gradient of
``disco_loss`` on the concatenated mini-batch in one process (float64), and a bad value on one
rank must raise the same error on every rank."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
import torch
from dist_support import free_port, init_gloo, run_ranks

from discoloss import disco_loss
from discoloss.accumulation import (
    ResponseStats,
    micro_batch_loss,
    plan_minibatch,
    response_stats,
)

F64 = torch.float64
HIDDEN = 5
SIZES = {2: [6, 9], 3: [7, 0, 10]}  # a rank with no responses in the 3-rank job
OPTIONS: list[dict[str, Any]] = [
    dict(objective="disco", score="log_likelihood", kl_estimator="k1"),
    dict(objective="disco_b", score="likelihood_ratio", kl_estimator="k3", normalize="valid"),
    dict(objective="disco", constraint="hinge", beta=10.0),
]


def shards(world: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for r, b in enumerate(SIZES[world]):
        t = 6 + 3 * r
        x = torch.randn(b, t, HIDDEN, generator=g, dtype=F64)
        mask = torch.rand(b, t, generator=g) > 0.3
        if b:
            mask[:, 0] = True
        # old log-probs above the current ones: the k1 KL is positive, the hinge active
        old_shift = 0.05 * torch.rand(b, t, generator=g, dtype=F64)
        rewards = torch.randint(0, 2, (b,), generator=g).to(F64)
        group_ids = (torch.arange(b) * 7 + r) % 5 * 1_000_003 - 11  # every question spans ranks
        out.append(dict(x=x, mask=mask, old_shift=old_shift, rewards=rewards, group_ids=group_ids))
    return out


def theta0() -> torch.Tensor:
    return torch.linspace(-0.4, 0.6, HIDDEN, dtype=F64)


def log_probs(theta: torch.Tensor, shard: dict[str, torch.Tensor]) -> torch.Tensor:
    return -torch.nn.functional.softplus(shard["x"] @ theta)


def accumulate_on_rank(shard: dict[str, torch.Tensor], opts: dict[str, Any], group: Any):
    """Plan across ranks with current-parameter stats, then one response per micro-batch."""
    theta = theta0().requires_grad_()
    lp = log_probs(theta, shard)
    old = lp.detach() + shard["old_shift"]
    stat_opts = {k: v for k, v in opts.items() if k in ("score", "kl_estimator")}
    plan_opts = {k: v for k, v in opts.items() if k != "kl_estimator"}
    if lp.shape[0]:
        with torch.no_grad():
            stats = response_stats(lp, old, shard["mask"], **stat_opts)
    else:  # a rank that holds no response of this mini-batch
        stats = ResponseStats(*(torch.zeros(0, dtype=F64) for _ in range(3)))
    plan = plan_minibatch(
        stats, shard["rewards"], shard["group_ids"], process_group=group, **plan_opts
    )
    for i in range(lp.shape[0]):
        mb = micro_batch_loss(
            lp[i : i + 1],
            old[i : i + 1],
            shard["mask"][i : i + 1],
            plan.weights[i : i + 1],
            num_tokens=plan.num_tokens,
            kl_coef=plan.kl_coef,
            **stat_opts,
        )
        mb.loss.backward(retain_graph=True)
    grad = theta.grad if theta.grad is not None else torch.zeros_like(theta)
    return plan, grad


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    init_gloo(rank, world, port)
    results: dict[str, Any] = {}
    try:
        for k, opts in enumerate(OPTIONS):
            shard = shards(world, 100 * world + k)[rank]
            plan, grad = accumulate_on_rank(shard, opts, dist.group.WORLD)
            results[f"ok{k}"] = dict(
                grad=grad,
                kl_coef=plan.kl_coef,
                num_tokens=plan.num_tokens,
                loss=plan.output.loss,
                metrics=plan.output.metrics,
                weights=plan.weights,
            )
        # a NaN score on the last rank only: every rank raises the same error
        shard = shards(world, 7)[rank]
        stats = ResponseStats(
            torch.zeros(len(shard["rewards"]), dtype=F64),
            torch.zeros(len(shard["rewards"]), dtype=F64),
            torch.ones(len(shard["rewards"]), dtype=F64),
        )
        if rank == world - 1:
            stats.scores[-1] = float("nan")
        try:
            plan_minibatch(
                stats, shard["rewards"], shard["group_ids"], process_group=dist.group.WORLD
            )
            results["nan"] = None
        except ValueError as exc:
            results["nan"] = str(exc)
        # options that differ on one rank
        try:
            plan_minibatch(
                stats._replace(scores=torch.zeros_like(stats.scores)),
                shard["rewards"],
                shard["group_ids"],
                tau=3.0 if rank == 0 else 4.0,
                process_group=dist.group.WORLD,
            )
            results["options"] = None
        except ValueError as exc:
            results["options"] = str(exc)
        # a malformed input on rank 0 only (rewards of the wrong length)
        try:
            plan_minibatch(
                stats._replace(scores=torch.zeros_like(stats.scores)),
                shard["rewards"][:-1] if rank == 0 else shard["rewards"],
                shard["group_ids"],
                process_group=dist.group.WORLD,
            )
            results["shape"] = None
        except ValueError as exc:
            results["shape"] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def single_process(world: int, k: int) -> tuple[Any, torch.Tensor]:
    opts = OPTIONS[k]
    parts = shards(world, 100 * world + k)
    theta = theta0().requires_grad_()
    tmax = max(p["x"].shape[1] for p in parts)

    def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(t, (0, tmax - t.shape[1])) for t in tensors])

    lps = [log_probs(theta, p) for p in parts]
    lp = cat(lps)
    old = cat([lp_.detach() + p["old_shift"] for lp_, p in zip(lps, parts)])
    mask = cat([p["mask"] for p in parts])
    out = disco_loss(
        lp,
        old,
        mask,
        torch.cat([p["rewards"] for p in parts]),
        torch.cat([p["group_ids"] for p in parts]),
        **opts,
    )
    (grad,) = torch.autograd.grad(out.loss, theta)
    return out, grad


@pytest.mark.parametrize("world", [2, 3])
def test_cross_rank_plan_gives_the_minibatch_gradient(world: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_worker, world, (world, free_port(), tmp))
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    for k in range(len(OPTIONS)):
        ref, ref_grad = single_process(world, k)
        got = [r[f"ok{k}"] for r in ranks]
        # the micro-batch gradients summed over ranks = the mini-batch gradient
        total = sum(g["grad"] for g in got)
        torch.testing.assert_close(total, ref_grad, rtol=1e-9, atol=1e-12)
        for rank, g in enumerate(got):
            assert g["weights"].shape == (SIZES[world][rank],)
            torch.testing.assert_close(g["loss"], ref.loss.detach(), rtol=1e-9, atol=1e-12)
            for name, value in ref.metrics.items():
                torch.testing.assert_close(
                    g["metrics"][name].double(), value.double(), rtol=1e-9, atol=1e-12
                )
        if OPTIONS[k].get("constraint") == "hinge":
            assert float(got[0]["kl_coef"]) > 0, "the hinge should be active in this case"
    last = world - 1
    for r in ranks:
        assert r["nan"] == (
            f"plan_minibatch on rank {last} of {world} in process_group: stats.scores: "
            f"non-finite value at response {SIZES[world][last] - 1}"
        )
        assert r["options"] is not None and r["options"].startswith(
            "plan_minibatch options differ across the ranks of process_group"
        )
        assert r["shape"] is not None and r["shape"].startswith(
            f"plan_minibatch on rank 0 of {world} in process_group: rewards has"
        )
