"""Gradient accumulation over micro-batches that split groups (discoloss.accumulation) and
pieces of whole groups (disco_loss's num_groups / num_tokens): the accumulated gradient must
equal the gradient of disco_loss on the whole mini-batch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from discoloss import disco_loss
from discoloss.accumulation import (
    ResponseStats,
    micro_batch_loss,
    plan_minibatch,
    response_stats,
)

F64 = torch.float64


def batch(seed: int, b: int = 20, t: int = 9, kl_scale: float = 0.1, groups: int = 5):
    g = torch.Generator().manual_seed(seed)
    lp = -2 * torch.rand(b, t, generator=g, dtype=F64)
    # old > new on average so that the k1 KL is positive and the penalty can be active
    old = lp + kl_scale * torch.rand(b, t, generator=g, dtype=F64)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, 0] = True
    rewards = torch.randint(0, 2, (b,), generator=g).to(F64)
    group_ids = torch.randint(0, groups, (b,), generator=g) * 7 - 3
    return lp, old, mask, rewards, group_ids


def split_points(draw_cuts: list[int], b: int) -> list[int]:
    return sorted({0, b, *[c % b for c in draw_cuts]})


def accumulate(lp, old, mask, rewards, group_ids, cuts, *, plan_at, exact_penalty, **opts):
    lp = lp.clone().requires_grad_()
    score = opts.get("score", "log_likelihood")
    kl_est = opts.pop("kl_estimator", "k1")
    with torch.no_grad():
        src = lp if plan_at == "current" else old
        stats = ResponseStats.cat(
            [
                response_stats(src[a:b], old[a:b], mask[a:b], score=score, kl_estimator=kl_est)
                for a, b in zip(cuts, cuts[1:])
            ]
        )
    plan = plan_minibatch(stats, rewards, group_ids, **opts)
    grad = torch.zeros_like(lp)
    for a, b in zip(cuts, cuts[1:]):
        mb = micro_batch_loss(
            lp[a:b],
            old[a:b],
            mask[a:b],
            plan.weights[a:b],
            num_tokens=plan.num_tokens,
            kl_coef=plan.kl_coef if exact_penalty else None,
            score=score,
            kl_estimator=kl_est,
            delta=opts.get("delta", 1e-4),
            beta=opts.get("beta", 1e3),
        )
        (g,) = torch.autograd.grad(mb.loss, lp)
        grad += g
    return plan, grad


def full_grad(lp, old, mask, rewards, group_ids, **opts):
    lp = lp.clone().requires_grad_()
    out = disco_loss(lp, old, mask, rewards, group_ids, **opts)
    (g,) = torch.autograd.grad(out.loss, lp)
    return out, g


OPTS = st.fixed_dictionaries(
    {
        "score": st.sampled_from(["log_likelihood", "likelihood_ratio"]),
        "objective": st.sampled_from(["disco", "disco_b"]),
        "kl_estimator": st.sampled_from(["k1", "k3"]),
        "delta": st.sampled_from([1e-4, 10.0]),  # penalty active / inactive
        "normalize": st.sampled_from(["all", "valid"]),
    }
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(opts=OPTS, seed=st.integers(0, 10_000), cuts=st.lists(st.integers(0, 1000), max_size=5))
def test_exact_path_equals_full_batch(opts, seed, cuts) -> None:
    data = batch(seed)
    cut = split_points(cuts, data[0].shape[0])
    out, ref = full_grad(*data, **opts)
    plan, grad = accumulate(*data, cut, plan_at="current", exact_penalty=True, **dict(opts))
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-13)
    for k, v in out.metrics.items():
        torch.testing.assert_close(plan.output.metrics[k], v.detach(), rtol=1e-10, atol=1e-13)
    if opts["delta"] == 1e-4:
        assert out.penalty.item() > 0


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 10_000),
    cuts=st.lists(st.integers(0, 1000), max_size=5),
    score=st.sampled_from(["log_likelihood", "likelihood_ratio"]),
)
def test_disco_b_weights_from_sampling_policy_are_exact(seed, cuts, score) -> None:
    data = batch(seed)
    opts = dict(score=score, objective="disco_b", delta=10.0)  # penalty inactive
    out, ref = full_grad(*data, **opts)
    _, grad = accumulate(*data, split_points(cuts, 20), plan_at="old", exact_penalty=True, **opts)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-13)


def test_disco_weights_from_sampling_policy_exact_at_theta_old() -> None:
    lp, old, mask, rewards, group_ids = batch(3)
    # first mini-batch of a step: current parameters are the sampling parameters
    out, ref = full_grad(old, old, mask, rewards, group_ids, objective="disco")
    _, grad = accumulate(
        old,
        old,
        mask,
        rewards,
        group_ids,
        [0, 4, 11, 20],
        plan_at="old",
        exact_penalty=True,
        objective="disco",
    )
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-13)
    # ... and not exact once the parameters moved (the weights depend on the scores)
    out, ref = full_grad(lp, old, mask, rewards, group_ids, objective="disco", tau=0.1, delta=10.0)
    _, grad = accumulate(
        lp,
        old,
        mask,
        rewards,
        group_ids,
        [0, 4, 11, 20],
        plan_at="old",
        exact_penalty=True,
        objective="disco",
        tau=0.1,
        delta=10.0,
    )
    assert (grad - ref).abs().max() > 1e-6


def test_local_penalty_is_jensen_upper_bound_and_exact_for_one_piece() -> None:
    lp, old, mask, rewards, group_ids = batch(5, kl_scale=0.3)
    cuts = [0, 3, 12, 20]
    with torch.no_grad():
        stats = response_stats(lp, old, mask)
    plan = plan_minibatch(stats, rewards, group_ids, delta=1e-3)
    local = sum(
        micro_batch_loss(
            lp[a:b], old[a:b], mask[a:b], plan.weights[a:b], num_tokens=plan.num_tokens, delta=1e-3
        ).penalty_term
        for a, b in zip(cuts, cuts[1:])
    )
    assert plan.output.penalty.item() > 0
    assert local.item() >= plan.output.penalty.item() - 1e-15
    one = micro_batch_loss(lp, old, mask, plan.weights, num_tokens=plan.num_tokens, delta=1e-3)
    torch.testing.assert_close(one.penalty_term, plan.output.penalty, rtol=1e-12, atol=0)
    # micro-batch KL shares add up to the mini-batch KL
    shares = sum(
        micro_batch_loss(
            lp[a:b], old[a:b], mask[a:b], plan.weights[a:b], num_tokens=plan.num_tokens
        ).kl
        for a, b in zip(cuts, cuts[1:])
    )
    torch.testing.assert_close(shares, plan.output.kl, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("objective", ["disco", "disco_b"])
@pytest.mark.parametrize("score", ["log_likelihood", "likelihood_ratio"])
def test_whole_group_pieces_add_up_with_global_counts(objective: str, score: str) -> None:
    """Micro-batches holding whole groups: disco_loss with num_groups/num_tokens of the
    mini-batch gives pieces whose objectives, KL shares and gradients add up exactly."""
    lp, old, mask, rewards, _ = batch(7, b=24)
    group_ids = torch.arange(24) // 4  # 6 groups of 4, consecutive
    opts = dict(objective=objective, score=score, delta=10.0)
    out, ref = full_grad(lp, old, mask, rewards, group_ids, **opts)
    x = lp.clone().requires_grad_()
    total_obj = torch.zeros((), dtype=F64)
    total_kl = torch.zeros((), dtype=F64)
    grad = torch.zeros_like(lp)
    for a, b in [(0, 8), (8, 12), (12, 24)]:
        piece = disco_loss(
            x[a:b],
            old[a:b],
            mask[a:b],
            rewards[a:b],
            group_ids[a:b],
            num_groups=6,
            num_tokens=int(mask.sum()),
            **opts,
        )
        (g,) = torch.autograd.grad(piece.loss, x)
        grad += g
        total_obj += piece.objective.detach()
        total_kl += piece.kl.detach()
    torch.testing.assert_close(total_obj, out.objective.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(total_kl, out.kl.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, ref, rtol=1e-10, atol=1e-13)


def test_bad_inputs() -> None:
    lp, old, mask, rewards, group_ids = batch(1)
    stats = response_stats(lp, old, mask)
    with pytest.raises(ValueError, match="rewards"):
        plan_minibatch(stats, rewards[:-1], group_ids)
    with pytest.raises(TypeError, match="stats"):
        plan_minibatch((stats.scores,), rewards, group_ids)  # type: ignore[arg-type]
    plan = plan_minibatch(stats, rewards, group_ids)
    with pytest.raises(ValueError, match="weights"):
        micro_batch_loss(lp[:4], old[:4], mask[:4], plan.weights[:3], num_tokens=plan.num_tokens)
    with pytest.raises(ValueError, match="num_tokens"):
        micro_batch_loss(lp, old, mask, plan.weights, num_tokens=0)
    with pytest.raises(ValueError, match="parts"):
        ResponseStats.cat([])
    with pytest.raises(ValueError, match="num_groups"):
        disco_loss(lp, old, mask, rewards, group_ids, num_groups=0)
    with pytest.raises(TypeError, match="num_tokens"):
        disco_loss(lp, old, mask, rewards, group_ids, num_tokens=3.5)  # type: ignore[arg-type]
