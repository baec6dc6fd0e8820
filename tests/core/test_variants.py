"""Ablation variants of DisCO: objectives (CVaR, two-way DRO, pairwise AUC surrogates),
constraints (hinge, fixed KL penalty, Lagrangian, none) and the clipped-ratio score.

Each against a naive float64 reference written from the formulas with Python loops, its
weights against autograd, the stated limits, the multiplier's update rule and checkpoint round
trip, and bad parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import ref_constraint_penalty

from discoloss import (
    LagrangeMultiplier,
    disco_loss,
    discriminative_objective,
    discriminative_weights,
)
from discoloss.accumulation import ResponseStats, micro_batch_loss, plan_minibatch, response_stats

F64 = torch.float64


def make_batch(seed: int, b: int = 18, t: int = 7, kl_scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    lp = -2 * torch.rand(b, t, generator=g, dtype=F64)
    old = lp + kl_scale * torch.randn(b, t, generator=g, dtype=F64).abs()
    old = old + 0.3 * torch.randn(b, t, generator=g, dtype=F64) * (
        torch.rand(b, 1, generator=g) < 0.3
    )
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, 0] = True
    rewards = torch.randint(0, 2, (b,), generator=g).to(F64)
    group_ids = torch.randint(0, 4, (b,), generator=g) * 5 + 11
    return lp, old, mask, rewards, group_ids


# ----------------------------------------------------------------------------- reference
def ref_scores(lp, old, mask, rewards, score, clip_eps=0.2):
    out = []
    for i in range(lp.shape[0]):
        toks = [t for t in range(lp.shape[1]) if mask[i, t]]
        vals = []
        for t in toks:
            if score == "log_likelihood":
                vals.append(lp[i, t])
            else:
                rho = torch.exp(lp[i, t] - old[i, t])
                if score == "clipped_ratio":
                    rho = (
                        torch.clamp(rho, max=1 + clip_eps)
                        if rewards[i] > 0.5
                        else torch.clamp(rho, min=1 - clip_eps)
                    )
                vals.append(rho)
        out.append(sum(vals) / len(vals))
    return out


def lme(vals, tau):
    return tau * torch.log(sum(torch.exp(v / tau) for v in vals) / len(vals))


def ref_group_objective(pos, neg, objective, tau, alpha, margin):
    if objective == "disco":
        return sum(pos) / len(pos) - lme(neg, tau)
    if objective == "disco_b":
        return sum(pos) / len(pos) - sum(neg) / len(neg)
    if objective == "disco_2way":
        return -lme([-p for p in pos], tau) - lme(neg, tau)
    if objective == "cvar":
        # CVaR_alpha = min_lambda lambda + 1/(alpha n) sum (s - lambda)_+, attained at a
        # negative's score: evaluate at every candidate and take the minimum.
        n = len(neg)
        cands = [lam + sum(torch.clamp(v - lam, min=0) for v in neg) / (alpha * n) for lam in neg]
        return sum(pos) / len(pos) - min(cands, key=lambda c: c.item())
    pairs = [(p, q) for p in pos for q in neg]
    if objective == "auc_sq_hinge":
        losses = [torch.clamp(margin - (p - q), min=0) ** 2 for p, q in pairs]
    else:
        losses = [tau * torch.log1p(torch.exp(-(p - q) / tau)) for p, q in pairs]
    return -sum(losses) / len(pairs)


def ref_loss(
    lp,
    old,
    mask,
    rewards,
    group_ids,
    *,
    score="log_likelihood",
    objective="disco",
    tau=None,
    delta=1e-4,
    beta=1e3,
    constraint="squared_hinge",
    lam=0.0,
    alpha=0.5,
    margin=1.0,
    clip_eps=0.2,
):
    tau = (10.0 if score == "log_likelihood" else 1.0) if tau is None else tau
    s = ref_scores(lp, old, mask, rewards, score, clip_eps)
    groups = sorted(set(group_ids.tolist()))
    total = 0.0
    for g in groups:
        pos = [s[i] for i in range(len(s)) if group_ids[i] == g and rewards[i] > 0.5]
        neg = [s[i] for i in range(len(s)) if group_ids[i] == g and rewards[i] <= 0.5]
        if pos and neg:
            total = total + ref_group_objective(pos, neg, objective, tau, alpha, margin)
    objective_value = total / len(groups)
    kl_terms = [
        old[i, t] - lp[i, t] for i in range(lp.shape[0]) for t in range(lp.shape[1]) if mask[i, t]
    ]
    kl = sum(kl_terms) / len(kl_terms)
    penalty = ref_constraint_penalty(kl, constraint, delta, beta, lam)
    return -objective_value + penalty, objective_value, kl


CASES = [
    dict(objective="cvar"),
    dict(objective="cvar", cvar_alpha=0.3),
    dict(objective="cvar", cvar_alpha=1.0),
    dict(objective="disco_2way"),
    dict(objective="disco_2way", tau=0.05),
    dict(objective="auc_sq_hinge"),
    dict(objective="auc_sq_hinge", margin=0.0),
    dict(objective="auc_logistic", tau=0.5),
    dict(constraint="hinge", delta=1e-3),
    dict(constraint="kl_penalty", beta=0.7),
    dict(constraint="none"),
    dict(score="clipped_ratio"),
    dict(score="clipped_ratio", clip_eps=0.05, objective="disco_b"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_against_naive_reference(case: dict, seed: int) -> None:
    lp, old, mask, rewards, group_ids = make_batch(seed)
    x = lp.clone().requires_grad_()
    out = disco_loss(x, old, mask, rewards, group_ids, **case)
    (grad,) = torch.autograd.grad(out.loss, x)
    y = lp.clone().requires_grad_()
    ref_case = {("alpha" if k == "cvar_alpha" else k): v for k, v in case.items()}
    ref, ref_obj, ref_kl = ref_loss(y, old, mask, rewards, group_ids, **ref_case)
    (ref_grad,) = torch.autograd.grad(ref, y)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.objective, ref_obj.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.kl, ref_kl.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-11)
    assert (grad[~mask] == 0).all()


def test_lagrangian_against_reference_and_update_rule() -> None:
    lp, old, mask, rewards, group_ids = make_batch(4, kl_scale=0.2)
    m = LagrangeMultiplier(lr=10.0, init=0.25)
    x = lp.clone().requires_grad_()
    out = disco_loss(
        x, old, mask, rewards, group_ids, constraint="lagrangian", multiplier=m, delta=1e-3
    )
    (grad,) = torch.autograd.grad(out.loss, x)
    y = lp.clone().requires_grad_()
    ref, _, kl = ref_loss(
        y, old, mask, rewards, group_ids, constraint="lagrangian", lam=0.25, delta=1e-3
    )
    (ref_grad,) = torch.autograd.grad(ref, y)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-11)
    # projected dual ascent: lambda <- max(0, lambda + lr * (kl - delta))
    new = m.update(out.kl, delta=1e-3)
    assert math.isclose(new.item(), max(0.0, 0.25 + 10.0 * (kl.item() - 1e-3)), rel_tol=1e-12)
    m.update(torch.tensor(-100.0), delta=1e-3)
    assert m.value.item() == 0.0  # projected onto lambda >= 0
    capped = LagrangeMultiplier(lr=1e6, max_value=2.0)
    capped.update(torch.tensor(1.0), delta=0.0)
    assert capped.value.item() == 2.0


def test_multiplier_checkpoint_round_trip() -> None:
    m = LagrangeMultiplier(lr=3.0, init=0.5, max_value=9.0)
    m.update(torch.tensor(0.2), delta=0.1)
    state = m.state_dict()
    restored = LagrangeMultiplier()
    restored.load_state_dict(state)
    assert restored.value.item() == m.value.item() and restored.lr == 3.0
    assert restored.max_value == 9.0 and restored.steps == 1
    restored.update(torch.tensor(0.2), delta=0.1)
    m.update(torch.tensor(0.2), delta=0.1)
    assert restored.value.item() == m.value.item()
    # a torch.save / torch.load round trip (what checkpointing does)
    import io

    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    again = LagrangeMultiplier()
    again.load_state_dict(torch.load(buf))
    assert again.value.item() == m.value.item()
    with pytest.raises(ValueError, match="value"):
        again.load_state_dict({"lr": 1.0})


# --------------------------------------------------------------------- limits and weights
def scores_batch(seed: int, b: int = 30):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, generator=g, dtype=F64)
    r = torch.randint(0, 2, (b,), generator=g).to(F64)
    ids = torch.randint(0, 5, (b,), generator=g)
    return s, r, ids


@pytest.mark.parametrize("objective", ["cvar", "disco_2way", "auc_sq_hinge", "auc_logistic"])
@pytest.mark.parametrize("seed", [0, 1])
def test_weights_equal_autograd(objective: str, seed: int) -> None:
    s, r, ids = scores_batch(seed)
    x = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(discriminative_objective(x, r, ids, objective=objective, tau=0.7), x)
    w = discriminative_weights(s, r, ids, objective=objective, tau=0.7)
    torch.testing.assert_close(w, g, rtol=1e-10, atol=1e-13)


def test_limits() -> None:
    s, r, ids = scores_batch(3)
    mean = discriminative_objective(s, r, ids, objective="disco_b")
    # CVaR at fraction 1 is the mean
    torch.testing.assert_close(
        discriminative_objective(s, r, ids, objective="cvar", cvar_alpha=1.0), mean
    )
    # two-way DRO tends to DisCO-b as tau grows
    far = discriminative_objective(s, r, ids, objective="disco_2way", tau=1e7)
    torch.testing.assert_close(far, mean, rtol=1e-6, atol=1e-6)
    # CVaR with a tiny fraction is the hardest negative; DisCO with tiny tau tends to it too
    tiny = discriminative_objective(s, r, ids, objective="cvar", cvar_alpha=1e-6)
    hard = discriminative_objective(s, r, ids, objective="disco", tau=1e-4)
    torch.testing.assert_close(tiny, hard, rtol=1e-3, atol=1e-3)
    # CVaR is monotone in the fraction: fewer, harder negatives give a smaller objective
    vals = [
        discriminative_objective(s, r, ids, objective="cvar", cvar_alpha=a).item()
        for a in (0.2, 0.5, 1.0)
    ]
    assert vals[0] <= vals[1] <= vals[2]


def test_variants_through_accumulation_and_plan() -> None:
    """The weights form makes every variant split across micro-batches exactly."""
    lp, old, mask, rewards, group_ids = make_batch(9, kl_scale=0.3)
    for opts in [
        dict(objective="cvar"),
        dict(objective="auc_logistic"),
        dict(constraint="hinge"),
        dict(score="clipped_ratio"),
    ]:
        x = lp.clone().requires_grad_()
        full = disco_loss(x, old, mask, rewards, group_ids, delta=1e-3, **opts)
        (ref,) = torch.autograd.grad(full.loss, x)
        score = opts.get("score", "log_likelihood")
        cuts = [0, 5, 11, 18]
        extra = {"rewards": rewards} if score == "clipped_ratio" else {}
        with torch.no_grad():
            stats = ResponseStats.cat(
                [
                    response_stats(
                        lp[a:b],
                        old[a:b],
                        mask[a:b],
                        score=score,
                        **({"rewards": rewards[a:b]} if extra else {}),
                    )
                    for a, b in zip(cuts, cuts[1:])
                ]
            )
        plan_opts = {k: v for k, v in opts.items() if k != "score"}
        plan = plan_minibatch(stats, rewards, group_ids, score=score, delta=1e-3, **plan_opts)
        grad = torch.zeros_like(lp)
        y = lp.clone().requires_grad_()
        for a, b in zip(cuts, cuts[1:]):
            mb = micro_batch_loss(
                y[a:b],
                old[a:b],
                mask[a:b],
                plan.weights[a:b],
                num_tokens=plan.num_tokens,
                kl_coef=plan.kl_coef,
                score=score,
                **({"rewards": rewards[a:b]} if extra else {}),
            )
            (g,) = torch.autograd.grad(mb.loss, y)
            grad += g
        torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(plan.output.loss, full.loss.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(objective="cvar", cvar_alpha=0.0), ValueError, "cvar_alpha"),
        (dict(objective="cvar", cvar_alpha=1.5), ValueError, "cvar_alpha"),
        (dict(margin=-1.0), ValueError, "margin"),
        (dict(clip_eps=1.0), ValueError, "clip_eps"),
        (dict(clip_eps=0.0), ValueError, "clip_eps"),
        (dict(constraint="trust_region"), ValueError, "squared_hinge"),
        (dict(constraint="lagrangian"), ValueError, "multiplier"),
        (dict(objective="auc"), ValueError, "auc_sq_hinge"),
    ],
)
def test_bad_parameters(kwargs: dict, exc: type, match: str) -> None:
    lp, old, mask, rewards, group_ids = make_batch(0)
    with pytest.raises(exc, match=match):
        disco_loss(lp, old, mask, rewards, group_ids, **kwargs)


def test_bad_multiplier_parameters() -> None:
    with pytest.raises(ValueError, match="lr"):
        LagrangeMultiplier(lr=0.0)
    with pytest.raises(ValueError, match="init"):
        LagrangeMultiplier(init=-1.0)
    with pytest.raises(ValueError, match="delta"):
        LagrangeMultiplier().update(torch.tensor(0.1), delta=-1.0)
