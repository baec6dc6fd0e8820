"""Properties of disco_loss and the objective, checked with hypothesis on float64 inputs.

Tolerances: float64 (rtol 1e-10, atol 1e-12) wherever two computations differ only in
summation order (permuted rows, relabelled groups, extra padding); exact equality where the
property is exact (zero gradient at padding positions).
"""

from __future__ import annotations

import math

import torch
from conftest import (
    GARBAGE,
    KL_ESTIMATORS,
    NORMALIZES,
    OBJECTIVES,
    SCORES,
    TOL,
    Batch,
    batches,
    examples,
    int64s,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ref_groups

from discoloss import (
    disco_loss,
    discriminative_objective,
    discriminative_weights,
    sequence_scores,
)

F64 = torch.float64
RTOL, ATOL = TOL[F64]


@st.composite
def loss_options(draw: st.DrawFn) -> dict:
    return {
        "score": draw(st.sampled_from(SCORES)),
        "objective": draw(st.sampled_from(OBJECTIVES)),
        "kl_estimator": draw(st.sampled_from(KL_ESTIMATORS)),
        "normalize": draw(st.sampled_from(NORMALIZES)),
        "tau": draw(st.floats(0.05, 20.0)),
        "delta": draw(st.sampled_from([0.0, 1e-3, 10.0])),
        "beta": draw(st.sampled_from([0.0, 3.0, 1e3])),
    }


def run(batch: Batch, **options) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    leaf = batch.leaf()
    out = disco_loss(*leaf.args(), **options)
    out.loss.backward()
    values = {
        "loss": out.loss.detach(),
        "objective": out.objective.detach(),
        "kl": out.kl.detach(),
        "penalty": out.penalty.detach(),
        **out.metrics,
    }
    for k, v in values.items():
        assert torch.isfinite(v), k
    grad = leaf.log_probs.grad
    assert grad is not None
    assert torch.equal(grad[~batch.bmask], torch.zeros_like(grad[~batch.bmask]))
    assert torch.isfinite(grad).all()
    return values, grad


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(
            value.double(), b[k].double(), rtol=RTOL, atol=ATOL, msg=lambda m, n=k: f"{n}: {m}"
        )


@settings(max_examples=examples(30))
@given(batch=batches(), options=loss_options(), data=st.data())
def test_permutation_invariance(batch: Batch, options: dict, data: st.DataObject):
    b = batch.rewards.shape[0]
    perm = torch.tensor(data.draw(st.permutations(range(b))), dtype=torch.long)
    permuted = Batch(*(t[perm] for t in batch.args()))
    v0, g0 = run(batch, **options)
    v1, g1 = run(permuted, **options)
    assert_same(v0, v1)
    torch.testing.assert_close(g1, g0[perm], rtol=RTOL, atol=ATOL)


@settings(max_examples=examples(30))
@given(batch=batches(), options=loss_options(), data=st.data())
def test_relabelling_groups_changes_nothing(batch: Batch, options: dict, data: st.DataObject):
    old_ids = sorted(set(batch.group_ids.tolist()))
    extremes = st.sampled_from([-(2**63), 2**63 - 1, -1, 0, 1, 2**24 + 1, -(2**53) - 1])
    new_ids = data.draw(
        st.lists(
            st.one_of(extremes, int64s), min_size=len(old_ids), max_size=len(old_ids), unique=True
        )
    )
    mapping = dict(zip(old_ids, new_ids))
    relabelled = Batch(
        batch.log_probs,
        batch.old_log_probs,
        batch.mask,
        batch.rewards,
        torch.tensor([mapping[g] for g in batch.group_ids.tolist()], dtype=torch.int64),
    )
    v0, g0 = run(batch, **options)
    v1, g1 = run(relabelled, **options)
    assert_same(v0, v1)
    torch.testing.assert_close(g1, g0, rtol=RTOL, atol=ATOL)


@settings(max_examples=examples(30))
@given(
    batch=batches(),
    options=loss_options(),
    left=st.integers(0, 3),
    right=st.integers(0, 5),
    seed=st.integers(0, 2**31),
)
def test_padding_changes_nothing(batch: Batch, options: dict, left: int, right: int, seed: int):
    """Extra padding columns and new garbage (inf, nan, huge) at padding positions."""
    gen = torch.Generator().manual_seed(seed)
    b, t = batch.mask.shape
    garbage = torch.tensor(GARBAGE, dtype=F64)

    def junk(shape):
        return garbage[torch.randint(0, len(GARBAGE), shape, generator=gen)]

    def pad(x: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
        return torch.cat([fill[:, :left], x, fill[:, left:]], dim=1)

    m = batch.bmask
    lp = torch.where(m, batch.log_probs, junk((b, t)))
    old = torch.where(m, batch.old_log_probs, junk((b, t)))
    padded = Batch(
        pad(lp, junk((b, left + right))),
        pad(old, junk((b, left + right))),
        pad(m, torch.zeros(b, left + right, dtype=torch.bool)),
        batch.rewards,
        batch.group_ids,
    )
    v0, g0 = run(batch, **options)
    v1, g1 = run(padded, **options)
    assert_same(v0, v1)
    torch.testing.assert_close(g1[:, left : left + t], g0, rtol=RTOL, atol=ATOL)
    assert torch.equal(g1[:, :left], torch.zeros(b, left, dtype=F64))
    assert torch.equal(g1[:, left + t :], torch.zeros(b, right, dtype=F64))


@st.composite
def scored_groups(draw: st.DrawFn):
    """(scores, rewards, group_ids) with ragged shuffled groups and arbitrary int64 ids."""
    batch = draw(batches(max_groups=6, max_group_size=6, max_T=1, garbage=False))
    b = batch.rewards.shape[0]
    scores = draw(st.lists(st.floats(-30.0, 5.0, allow_nan=False), min_size=b, max_size=b))
    return torch.tensor(scores, dtype=F64), batch.rewards, batch.group_ids


@settings(max_examples=examples(40))
@given(
    data=scored_groups(),
    objective=st.sampled_from(OBJECTIVES),
    normalize=st.sampled_from(NORMALIZES),
    tau=st.floats(1e-2, 1e3),
)
def test_weights_sum_to_one_over_G_per_group(data, objective, normalize, tau):
    scores, rewards, group_ids = data
    w = discriminative_weights(
        scores, rewards, group_ids, objective=objective, tau=tau, normalize=normalize
    )
    groups = ref_groups(rewards.tolist(), group_ids.tolist(), 0.5)
    valid = [g for g in groups.order if groups.has_signal(g)]
    G = len(groups.order) if normalize == "all" else len(valid)
    for g in groups.order:
        pos, neg = groups.pos[g], groups.neg[g]
        if groups.has_signal(g):
            assert math.isclose(float(w[pos].sum()), 1.0 / G, rel_tol=1e-12)
            assert math.isclose(float(w[neg].sum()), -1.0 / G, rel_tol=1e-12)
            assert bool((w[pos] > 0).all())
            assert bool((w[neg] <= 0).all())
            if objective == "disco_b" or len(neg) == 1:
                expected = torch.full((len(neg),), -1.0 / (len(neg) * G), dtype=F64)
                torch.testing.assert_close(w[neg], expected, rtol=1e-12, atol=0)
        else:
            assert bool((w[pos + neg] == 0).all())


@settings(max_examples=examples(40))
@given(
    data=scored_groups(),
    objective=st.sampled_from(OBJECTIVES),
    normalize=st.sampled_from(NORMALIZES),
    tau=st.floats(1e-2, 1e3),
)
def test_weights_equal_autograd_of_objective(data, objective, normalize, tau):
    scores, rewards, group_ids = data
    opts = {"objective": objective, "tau": tau, "normalize": normalize}
    s = scores.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(discriminative_objective(s, rewards, group_ids, **opts), s)
    w = discriminative_weights(scores, rewards, group_ids, **opts)
    torch.testing.assert_close(w, g, rtol=RTOL, atol=ATOL)


@settings(max_examples=examples(30))
@given(batch=batches(), options=loss_options())
def test_weighted_score_sum_has_the_gradient_of_J(batch: Batch, options: dict):
    """grad_theta J = grad_theta sum_i w_i s_i with w computed from detached scores."""
    opts = {
        "objective": options["objective"],
        "tau": options["tau"],
        "normalize": options["normalize"],
    }
    lp1 = batch.log_probs.clone().requires_grad_(True)
    s1 = sequence_scores(lp1, batch.old_log_probs, batch.mask, score=options["score"])
    discriminative_objective(s1, batch.rewards, batch.group_ids, **opts).backward()
    lp2 = batch.log_probs.clone().requires_grad_(True)
    s2 = sequence_scores(lp2, batch.old_log_probs, batch.mask, score=options["score"])
    w = discriminative_weights(s2.detach(), batch.rewards, batch.group_ids, **opts)
    (w * s2).sum().backward()
    torch.testing.assert_close(lp2.grad, lp1.grad, rtol=RTOL, atol=ATOL)
    # and the same through disco_loss with the penalty switched off
    lp3 = batch.log_probs.clone().requires_grad_(True)
    out = disco_loss(
        lp3,
        batch.old_log_probs,
        batch.mask,
        batch.rewards,
        batch.group_ids,
        score=options["score"],
        beta=0.0,
        **opts,
    )
    (-out.loss).backward()
    torch.testing.assert_close(lp3.grad, lp1.grad, rtol=RTOL, atol=ATOL)


@settings(max_examples=examples(40))
@given(data=scored_groups(), normalize=st.sampled_from(NORMALIZES))
def test_disco_tends_to_disco_b_from_below(data, normalize):
    """tau * log mean exp(s / tau) decreases to mean(s) as tau grows, and by Hoeffding's lemma
    exceeds it by at most (max - min)^2 / (8 tau) per group, so
    J_b - (max range)^2 / (8 tau) <= J_disco(tau) <= J_b and J_disco is non-decreasing in tau."""
    scores, rewards, group_ids = data
    j_b = float(
        discriminative_objective(
            scores, rewards, group_ids, objective="disco_b", normalize=normalize
        )
    )
    groups = ref_groups(rewards.tolist(), group_ids.tolist(), 0.5)
    spread = max(
        (
            float(scores[groups.neg[g]].max() - scores[groups.neg[g]].min())
            for g in groups.order
            if groups.has_signal(g)
        ),
        default=0.0,
    )
    previous = -math.inf
    for tau in (1e-2, 0.1, 1.0, 10.0, 1e2, 1e3, 1e4, 1e6):
        j = float(
            discriminative_objective(
                scores, rewards, group_ids, objective="disco", tau=tau, normalize=normalize
            )
        )
        # rounding of tau * log(...) in float64: a few ulps of tau per negative
        slack = 1e-14 * tau * scores.numel() + 1e-12 * (1.0 + float(scores.abs().max()))
        assert j <= j_b + slack
        assert j >= previous - slack
        assert j >= j_b - spread**2 / (8.0 * tau) - slack
        previous = j
