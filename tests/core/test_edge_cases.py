"""gradcheck over all option combinations, and degenerate batches against the reference.

Tolerances: gradcheck's defaults for float64 (eps 1e-6, atol 1e-5, rtol 1e-3) on small
batches; reference comparisons at the float64 tolerances of conftest.TOL (1e-10, 1e-12).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import (
    KL_ESTIMATORS,
    NORMALIZES,
    OBJECTIVES,
    SCORES,
    TOL,
    Batch,
    fill_values,
    random_batch,
)
from reference import ref_disco, ref_kl

from discoloss import (
    disco_loss,
    discriminative_objective,
    kl_divergence,
    sequence_scores,
    squared_hinge_penalty,
)

F64 = torch.float64
RTOL, ATOL = TOL[F64]

COMBOS = list(itertools.product(SCORES, OBJECTIVES, KL_ESTIMATORS, NORMALIZES))


@pytest.mark.parametrize("score,objective,kl_estimator,normalize", COMBOS)
@pytest.mark.parametrize("active", [True, False], ids=["penalty", "nopenalty"])
def test_gradcheck_disco_loss(score, objective, kl_estimator, normalize, active):
    batch = random_batch(17, num_groups=3, max_group=4, T=5, shift=0.1, rewards="pm1")
    kl = float(ref_kl(batch.log_probs, batch.old_log_probs, batch.bmask.tolist(), kl_estimator))
    delta = 0.5 * kl if active else kl + 1.0  # away from the hinge's kink

    def f(lp: torch.Tensor) -> torch.Tensor:
        return disco_loss(
            lp,
            batch.old_log_probs,
            batch.mask,
            batch.rewards,
            batch.group_ids,
            score=score,
            objective=objective,
            kl_estimator=kl_estimator,
            normalize=normalize,
            tau=0.7,
            delta=delta,
            beta=4.0,
        ).loss

    lp = batch.log_probs.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (lp,))


@pytest.mark.parametrize("score", SCORES)
def test_gradcheck_sequence_scores(score):
    batch = random_batch(18, num_groups=2, T=6)
    lp = batch.log_probs.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: sequence_scores(x, batch.old_log_probs, batch.mask, score=score), (lp,)
    )


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_gradcheck_kl_divergence(estimator):
    batch = random_batch(19, num_groups=2, T=6)
    lp = batch.log_probs.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: kl_divergence(x, batch.old_log_probs, batch.mask, estimator=estimator), (lp,)
    )


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("normalize", NORMALIZES)
@pytest.mark.parametrize("tau", [0.05, 1.0, 50.0])
def test_gradcheck_objective(objective, normalize, tau):
    batch = random_batch(20, num_groups=4, max_group=5, T=1)
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(batch.rewards.shape[0], generator=gen, dtype=F64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: discriminative_objective(
            x, batch.rewards, batch.group_ids, objective=objective, tau=tau, normalize=normalize
        ),
        (s,),
    )


def test_gradcheck_penalty():
    k = torch.tensor(0.3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: squared_hinge_penalty(x, delta=0.1, beta=3.0), (k,))


def compare(batch: Batch, **options) -> None:
    leaf = batch.leaf()
    out = disco_loss(*leaf.args(), **options)
    out.loss.backward()
    ref = ref_disco(*batch.args(), **options)
    for name in ("loss", "objective", "kl", "penalty"):
        torch.testing.assert_close(
            getattr(out, name),
            getattr(ref, name),
            rtol=RTOL,
            atol=ATOL,
            msg=lambda m, n=name: f"{n}: {m}",
        )
    torch.testing.assert_close(leaf.log_probs.grad, ref.grad, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("normalize", NORMALIZES)
def test_no_group_with_signal(score, objective, normalize):
    """Every group is all-positive or all-negative: J = 0, loss = penalty, and the objective
    contributes an exactly zero (finite) gradient."""
    batch = random_batch(21, signal="none", shift=0.1, num_groups=6)
    lp = batch.log_probs.clone().requires_grad_(True)
    out = disco_loss(
        lp,
        *batch.args()[1:],
        score=score,
        objective=objective,
        normalize=normalize,
        delta=0.01,
        beta=2.0,
    )
    assert float(out.penalty.detach()) > 0.0
    assert float(out.objective.detach()) == 0.0
    assert torch.equal(out.loss, out.penalty)
    (g_obj,) = torch.autograd.grad(out.objective, lp, retain_graph=True, materialize_grads=True)
    assert torch.equal(g_obj, torch.zeros_like(g_obj))
    (g_loss,) = torch.autograd.grad(out.loss, lp, retain_graph=True)
    (g_pen,) = torch.autograd.grad(out.penalty, lp)
    assert torch.isfinite(g_loss).all()
    torch.testing.assert_close(g_loss, g_pen, rtol=RTOL, atol=ATOL)
    compare(batch, score=score, objective=objective, normalize=normalize, delta=0.01, beta=2.0)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
def test_all_masked_but_one_token(score, objective, kl_estimator):
    gen = torch.Generator().manual_seed(22)
    base = random_batch(22, num_groups=4, T=16, shift=0.1)
    b, t = base.mask.shape
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[torch.arange(b), torch.randint(0, t, (b,), generator=gen)] = True
    lp, old = fill_values(gen, mask, dtype=F64, shift=0.1, noise=0.3, garbage=True)
    batch = Batch(lp, old, mask, base.rewards, base.group_ids)
    compare(
        batch,
        score=score,
        objective=objective,
        kl_estimator=kl_estimator,
        tau=0.3,
        delta=1e-3,
        beta=5.0,
    )


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
def test_one_token_responses(score, objective, kl_estimator):
    batch = random_batch(23, num_groups=5, T=1, shift=0.1)
    assert batch.mask.shape[1] == 1 and bool(batch.bmask.all())
    compare(
        batch,
        score=score,
        objective=objective,
        kl_estimator=kl_estimator,
        tau=0.3,
        delta=1e-3,
        beta=5.0,
    )


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("normalize", NORMALIZES)
@pytest.mark.parametrize("reward", [0.0, 1.0])
def test_single_response(score, objective, normalize, reward):
    gen = torch.Generator().manual_seed(24)
    mask = torch.tensor([[True, False, True, True, False]])
    lp, old = fill_values(gen, mask, dtype=F64, shift=0.2, noise=0.3, garbage=True)
    batch = Batch(lp, old, mask, torch.tensor([reward], dtype=F64), torch.tensor([-7]))
    out = disco_loss(
        *batch.args(), score=score, objective=objective, normalize=normalize, delta=0.0, beta=1.0
    )
    assert float(out.objective.detach()) == 0.0
    assert torch.equal(out.loss, out.penalty)
    compare(batch, score=score, objective=objective, normalize=normalize, delta=0.0, beta=1.0)


def test_ties_and_singleton_groups():
    """Equal scores among negatives (uniform softmax) and singleton groups."""
    lp = torch.tensor(
        [[-1.0, -1.0], [-1.0, -1.0], [-1.0, -1.0], [-0.5, -9.0], [-2.0, -2.0]], dtype=F64
    )
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    rewards = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0], dtype=F64)
    group_ids = torch.tensor([3, 3, 3, 3, 8])
    for objective in OBJECTIVES:
        batch = Batch(lp, lp - 0.1, mask, rewards, group_ids)
        compare(batch, objective=objective, tau=0.01, delta=0.05, beta=3.0)
        # J = (-0.5 - (-1)) / 2 groups for both objectives (equal negative scores)
        j = disco_loss(*batch.args(), objective=objective, tau=0.01).objective
        torch.testing.assert_close(j, torch.tensor(0.25, dtype=F64), rtol=1e-12, atol=1e-15)
