"""Cross-rank DisCO with the gloo backend on CPU: 2 and 3 ranks, uneven shards, groups cut
across ranks, different sequence lengths per rank.

Each rank holds a shard of the batch and the same parameters theta; log-probs are a function of
theta and the rank's data. After averaging the parameter gradients over ranks (what DDP/FSDP
do), they must equal the single-process gradient of ``disco_loss`` on the concatenated batch.
The collectives are wrapped to record what each call sends.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from dist_support import free_port, init_gloo, run_ranks

from discoloss import disco_loss
from discoloss.distributed import HEADER_WORDS

OPTIONS = [
    dict(score="log_likelihood", objective="disco", kl_estimator="k1"),
    dict(score="likelihood_ratio", objective="disco", kl_estimator="k3"),
    dict(score="log_likelihood", objective="disco_b", kl_estimator="k1", normalize="valid"),
]
HIDDEN = 6


def make_shards(world: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Uneven shards; groups deliberately interleaved so that every group spans ranks."""
    g = torch.Generator().manual_seed(seed)
    sizes = [5 + 3 * r for r in range(world)]  # uneven: 5, 8, 11
    lengths = [7 + 4 * r for r in range(world)]  # different T per rank
    shards = []
    for r, (b, t) in enumerate(zip(sizes, lengths)):
        x = torch.randn(b, t, HIDDEN, generator=g, dtype=torch.float64)
        mask = torch.rand(b, t, generator=g) > 0.3
        mask[:, 0] = True
        old_noise = 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64).abs()
        rewards = torch.randint(0, 2, (b,), generator=g).double()
        group_ids = (torch.arange(b) + r) % 4 * 1_000_003 - 7  # 4 groups, large/negative ids
        shards.append(
            dict(x=x, mask=mask, old_noise=old_noise, rewards=rewards, group_ids=group_ids)
        )
    return shards


def log_probs_of(theta: torch.Tensor, shard: dict[str, torch.Tensor]) -> torch.Tensor:
    return -torch.nn.functional.softplus(shard["x"] @ theta)


def theta0() -> torch.Tensor:
    return torch.linspace(-0.5, 0.5, HIDDEN, dtype=torch.float64)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Every option set of OPTIONS on one process group (one spawned job per world size)."""
    init_gloo(rank, world, port)
    results = []
    sent: list[tuple[str, int]] = []
    real_all_gather = dist.all_gather

    def recording_all_gather(tensor_list, tensor, group=None, async_op=False):
        sent.append(("all_gather", tensor.numel() * tensor.element_size()))
        return real_all_gather(tensor_list, tensor, group=group, async_op=async_op)

    try:
        for opt_index, opts in enumerate(OPTIONS):
            seed = 10 * world + opt_index
            sent.clear()
            dist.all_gather = recording_all_gather
            shard = make_shards(world, seed)[rank]
            theta = theta0().requires_grad_()
            lp = log_probs_of(theta, shard)
            old = (lp.detach() + shard["old_noise"]).clone()
            out = disco_loss(
                lp,
                old,
                shard["mask"],
                shard["rewards"],
                shard["group_ids"],
                delta=1e-3,
                process_group=dist.group.WORLD,
                **opts,
            )
            n_calls_forward = len(sent)
            out.loss.backward()
            dist.all_gather = real_all_gather
            grad = theta.grad.clone()
            dist.all_reduce(grad)  # what DDP does: average over ranks
            grad /= world
            results.append(
                dict(
                    grad=grad,
                    loss=out.loss.detach(),
                    metrics={k: v.clone() for k, v in out.metrics.items()},
                    sent=list(sent),
                    n_calls_forward=n_calls_forward,
                )
            )
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def single_process(world: int, seed: int, opts: dict):
    shards = make_shards(world, seed)
    theta = theta0().requires_grad_()
    tmax = max(s["x"].shape[1] for s in shards)
    lps, olds, masks = [], [], []
    for s in shards:
        lp = log_probs_of(theta, s)
        pad = tmax - lp.shape[1]
        lps.append(torch.nn.functional.pad(lp, (0, pad)))
        olds.append(torch.nn.functional.pad(lp.detach() + s["old_noise"], (0, pad)))
        masks.append(torch.nn.functional.pad(s["mask"], (0, pad)))
    out = disco_loss(
        torch.cat(lps),
        torch.cat(olds),
        torch.cat(masks),
        torch.cat([s["rewards"] for s in shards]),
        torch.cat([s["group_ids"] for s in shards]),
        delta=1e-3,
        **opts,
    )
    (grad,) = torch.autograd.grad(out.loss, theta)
    return out, grad, sum(s["x"].shape[0] for s in shards)


@pytest.mark.parametrize("world", [2, 3])
def test_cross_rank_gradient_equals_single_process(world: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_worker, world, (world, free_port(), tmp))
        per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    assert all(len(r) == len(OPTIONS) for r in per_rank), "a rank did not run every case"
    for opt_index, opts in enumerate(OPTIONS):
        seed = 10 * world + opt_index
        ref, ref_grad, total = single_process(world, seed, opts)
        assert ref.penalty.item() > 0, "test data must activate the penalty"
        assert ref.metrics["groups_with_signal"].item() > 0
        for res in (r[opt_index] for r in per_rank):
            torch.testing.assert_close(res["grad"], ref_grad, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(res["loss"], ref.loss.detach(), rtol=1e-9, atol=1e-12)
            for k, v in ref.metrics.items():  # global metrics, identical on every rank
                torch.testing.assert_close(
                    res["metrics"][k].double(), v.double(), rtol=1e-9, atol=1e-12
                )
            # exactly two all_gathers per call, none in backward; O(B) bytes independent of T:
            # a fixed-size header (counts, check outcomes, options), then the payload
            assert res["n_calls_forward"] == 2
            assert [name for name, _ in res["sent"]] == ["all_gather", "all_gather"]
            max_count = max(5 + 3 * r for r in range(world))
            assert res["sent"][0][1] == HEADER_WORDS * 8 == 768
            assert res["sent"][1][1] == max_count * 5 * 8


def test_process_group_requires_initialised_backend() -> None:
    lp = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="init_process_group"):
        disco_loss(
            lp,
            lp,
            torch.ones(2, 3, dtype=torch.bool),
            torch.tensor([0.0, 1.0]),
            torch.tensor([0, 0]),
            process_group=object(),
        )
