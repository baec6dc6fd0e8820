"""disco_loss and its building blocks against the naive float64 reference (reference.py).

Tolerances (rtol, atol), from conftest.TOL:
  float64 inputs: (1e-10, 1e-12) on values and gradients (summation order only).
  float32 inputs: (2e-5, 2e-6) on values and gradients (float32 accumulation of O(1) terms).
The reference always runs in float64 on the same (cast up) input values.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import replace

import pytest
import torch
from conftest import KL_ESTIMATORS, NORMALIZES, OBJECTIVES, SCORES, TOL, Batch, random_batch
from reference import (
    ref_disco,
    ref_groups,
    ref_kl,
    ref_objective,
    ref_scores,
    ref_weights,
)

from discoloss import (
    disco_loss,
    discriminative_objective,
    discriminative_weights,
    kl_divergence,
    sequence_scores,
    squared_hinge_penalty,
)

#: (rewards kind, threshold): {0,1} and {-1,1} with the default threshold, continuous rewards
#: with a custom one (the batch builder separates the classes at 0.7).
REWARDS = [("01", 0.5), ("pm1", 0.5), ("cont", 0.7), ("pm1", 0.0)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        actual.detach().to(torch.float64),
        expected.detach().to(torch.float64),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{what}: {m}",
    )


def check_against_reference(batch: Batch, dtype: torch.dtype, **options) -> None:
    leaf = batch.leaf()
    out = disco_loss(*leaf.args(), **options)
    out.loss.backward()
    ref = ref_disco(*batch.args(), **options)
    assert_close(out.loss, ref.loss, dtype, "loss")
    assert_close(out.objective, ref.objective, dtype, "objective")
    assert_close(out.kl, ref.kl, dtype, "kl")
    assert_close(out.penalty, ref.penalty, dtype, "penalty")
    grad = leaf.log_probs.grad
    assert grad is not None and grad.dtype == dtype and grad.shape == batch.log_probs.shape
    # padding gets exactly zero gradient, response tokens the reference gradient
    assert torch.equal(grad[~batch.bmask], torch.zeros_like(grad[~batch.bmask]))
    assert_close(grad, ref.grad, dtype, "grad wrt log_probs")


def penalty_delta(batch: Batch, kl_estimator: str, active: bool) -> float:
    """A delta that makes the constraint active (half the KL) or inactive (KL + 0.5)."""
    b64 = batch.to(torch.float64)
    m = batch.bmask.tolist()
    kl = float(ref_kl(b64.log_probs, b64.old_log_probs, m, kl_estimator))
    assert kl > 0.0, "test setup: the batch must have a positive KL"
    return 0.5 * kl if active else kl + 0.5


GRID = list(
    itertools.product(SCORES, OBJECTIVES, KL_ESTIMATORS, (True, False), REWARDS, NORMALIZES)
)


@pytest.mark.parametrize(
    "score,objective,kl_estimator,active,rewards,normalize",
    GRID,
    ids=[f"{s}-{o}-{k}-{'pen' if a else 'nopen'}-{r[0]}@{r[1]}-{n}" for s, o, k, a, r, n in GRID],
)
@pytest.mark.parametrize("tau", [None, 0.37])
def test_disco_loss_matches_reference_float64(
    score, objective, kl_estimator, active, rewards, normalize, tau
):
    kind, threshold = rewards
    seed = zlib.crc32(f"{score}{objective}{kl_estimator}{active}{kind}{normalize}".encode())
    batch = random_batch(seed, rewards=kind, shift=0.05, dtype=torch.float64)
    delta = penalty_delta(batch, kl_estimator, active)
    options = {
        "score": score,
        "objective": objective,
        "kl_estimator": kl_estimator,
        "tau": tau,
        "delta": delta,
        "beta": 7.0,
        "threshold": threshold,
        "normalize": normalize,
    }
    ref = ref_disco(*batch.args(), **options)
    assert (float(ref.penalty) > 0.0) == active  # the case is what it claims to be
    check_against_reference(batch, torch.float64, **options)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("normalize", NORMALIZES)
def test_disco_loss_matches_reference_float32(seed, score, objective, kl_estimator, normalize):
    batch = random_batch(100 + seed, rewards="pm1", shift=0.05, dtype=torch.float32)
    delta = penalty_delta(batch, kl_estimator, active=seed != 2)
    options = {
        "score": score,
        "objective": objective,
        "kl_estimator": kl_estimator,
        "tau": 0.8,
        "delta": delta,
        "beta": 5.0,
        "normalize": normalize,
    }
    check_against_reference(batch, torch.float32, **options)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32, torch.uint8])
def test_mask_dtypes(mask_dtype):
    batch = random_batch(7, mask_dtype=mask_dtype, shift=0.05)
    check_against_reference(batch, torch.float64, delta=0.01, beta=3.0, tau=0.5)


def test_defaults_are_the_published_settings():
    """tau defaults to 10 (log_likelihood) / 1 (likelihood_ratio); delta 1e-4, beta 1e3, k1,
    threshold 0.5, normalize "all"."""
    batch = random_batch(11, shift=0.05)
    for score, tau in (("log_likelihood", 10.0), ("likelihood_ratio", 1.0)):
        leaf = batch.leaf()
        out = disco_loss(*leaf.args(), score=score)
        out.loss.backward()
        ref = ref_disco(
            *batch.args(),
            score=score,
            objective="disco",
            tau=tau,
            delta=1e-4,
            beta=1e3,
            kl_estimator="k1",
            threshold=0.5,
            normalize="all",
        )
        assert float(ref.penalty) > 0.0
        assert_close(out.loss, ref.loss, torch.float64, f"loss ({score})")
        assert_close(leaf.log_probs.grad, ref.grad, torch.float64, f"grad ({score})")


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sequence_scores_match_reference(seed, score, dtype):
    batch = random_batch(200 + seed, dtype=dtype)
    lp = batch.log_probs.clone().requires_grad_(True)
    s = sequence_scores(lp, batch.old_log_probs, batch.mask, score=score)
    assert s.shape == (batch.mask.shape[0],)
    lp64 = batch.log_probs.double().requires_grad_(True)
    ref = ref_scores(lp64, batch.old_log_probs.double(), batch.bmask.tolist(), score)
    assert_close(s, ref, dtype, "scores")
    # vector-Jacobian product with a random cotangent
    v = torch.randn(s.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    (s * v.to(s.dtype)).sum().backward()
    (g_ref,) = torch.autograd.grad((ref * v).sum(), lp64)
    assert_close(lp.grad, g_ref, dtype, "score vjp")


def test_sequence_scores_without_old_log_probs():
    batch = random_batch(3)
    s = sequence_scores(batch.log_probs, None, batch.mask)
    ref = ref_scores(batch.log_probs, batch.old_log_probs, batch.bmask.tolist(), "log_likelihood")
    assert_close(s, ref, torch.float64, "scores")


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_divergence_matches_reference(seed, estimator, dtype):
    batch = random_batch(300 + seed, dtype=dtype, shift=0.1 * seed - 0.1)
    lp = batch.log_probs.clone().requires_grad_(True)
    kl = kl_divergence(lp, batch.old_log_probs, batch.mask, estimator=estimator)
    assert kl.shape == ()
    lp64 = batch.log_probs.double().requires_grad_(True)
    ref = ref_kl(lp64, batch.old_log_probs.double(), batch.bmask.tolist(), estimator)
    assert_close(kl, ref, dtype, "kl")
    kl.backward()
    (g_ref,) = torch.autograd.grad(ref, lp64)
    assert_close(lp.grad, g_ref, dtype, "kl grad")
    if estimator == "k3":
        assert float(kl.detach()) >= 0.0


@pytest.mark.parametrize(
    "kl,delta,beta,expected",
    [
        (0.3, 0.1, 2.0, 0.5 * 2.0 * 0.2**2),
        (0.1, 0.3, 2.0, 0.0),
        (0.3, 0.3, 2.0, 0.0),
        (-1.0, 0.0, 5.0, 0.0),
        (2.0, 0.0, 0.0, 0.0),
        (1e-3, 1e-4, 1e3, 0.5 * 1e3 * (9e-4) ** 2),
    ],
)
def test_squared_hinge_penalty_values_and_gradient(kl, delta, beta, expected):
    k = torch.tensor(kl, dtype=torch.float64, requires_grad=True)
    p = squared_hinge_penalty(k, delta=delta, beta=beta)
    torch.testing.assert_close(p, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)
    p.backward()
    expected_grad = beta * max(kl - delta, 0.0)  # the published surrogate's gradient
    torch.testing.assert_close(
        k.grad, torch.tensor(expected_grad, dtype=torch.float64), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("normalize", NORMALIZES)
@pytest.mark.parametrize("rewards", REWARDS, ids=lambda r: f"{r[0]}@{r[1]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_objective_and_weights_match_reference(seed, objective, normalize, rewards, dtype):
    kind, threshold = rewards
    batch = random_batch(400 + seed, rewards=kind, num_groups=7)
    gen = torch.Generator().manual_seed(seed)
    scores64 = torch.randn(batch.rewards.shape[0], generator=gen, dtype=torch.float64) * 2.0
    scores = scores64.to(dtype).requires_grad_(True)
    opts = {"objective": objective, "tau": 0.6, "threshold": threshold, "normalize": normalize}
    j = discriminative_objective(scores, batch.rewards, batch.group_ids, **opts)
    w = discriminative_weights(scores, batch.rewards, batch.group_ids, **opts)
    assert j.shape == () and w.shape == scores.shape and not w.requires_grad
    s_ref = scores.detach().double().requires_grad_(True)
    r = batch.rewards.tolist()
    g = batch.group_ids.tolist()
    j_ref = ref_objective(s_ref, r, g, **opts)
    assert_close(j, j_ref, dtype, "objective")
    (w_autograd,) = torch.autograd.grad(j_ref, s_ref)
    w_formula = torch.tensor(
        ref_weights(s_ref.detach().tolist(), r, g, **opts), dtype=torch.float64
    )
    # the reference's two routes agree with each other (checks the reference itself)
    torch.testing.assert_close(w_autograd, w_formula, rtol=1e-12, atol=1e-15)
    assert_close(w, w_formula, dtype, "weights")
    j.backward()
    assert_close(scores.grad, w_formula, dtype, "dJ/ds")


def test_groups_with_equal_total_size_are_not_mixed():
    """Two groups of sizes 1 and 3 (total divisible by 2) must not be reshaped into 2 x 2."""
    scores = torch.tensor([0.0, -1.0, -2.5, -3.0], dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    group_ids = torch.tensor([5, 9, 9, 9])
    groups = ref_groups(rewards.tolist(), group_ids.tolist(), 0.5)
    assert not groups.has_signal(5) and groups.has_signal(9)
    # group 5 has no negative (no signal); group 9 = {-1 (neg), -2.5 (pos), -3 (neg)}:
    # J_9 = -2.5 - (-2) = -0.5, divided by G = 2 groups.
    j = discriminative_objective(scores, rewards, group_ids, objective="disco_b")
    torch.testing.assert_close(j, torch.tensor(-0.25, dtype=torch.float64))
    # DisCO: J_9 = -2.5 - tau * log(mean(exp(-1/tau), exp(-3/tau))), tau = 2
    j = discriminative_objective(scores, rewards, group_ids, objective="disco", tau=2.0)
    lme = math.log(0.5 * (math.exp(-0.5) + math.exp(-1.5)))
    torch.testing.assert_close(j, torch.tensor((-2.5 - 2.0 * lme) / 2, dtype=torch.float64))


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_reward_equal_to_threshold_is_negative(objective):
    """positive iff reward > threshold: a reward exactly at the threshold is a negative."""
    batch = random_batch(13, num_groups=6, shift=0.05)
    gen = torch.Generator().manual_seed(13)
    rewards = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)[
        torch.randint(0, 3, batch.rewards.shape, generator=gen)
    ]
    assert bool((rewards == 0.5).any())
    check_against_reference(
        replace(batch, rewards=rewards),
        torch.float64,
        objective=objective,
        threshold=0.5,
        tau=0.5,
        delta=0.01,
        beta=2.0,
    )
    # the labels matter: treating 0.5 as positive changes the objective
    j_half_neg = disco_loss(
        *batch.args()[:3], rewards, batch.group_ids, objective=objective, threshold=0.5, tau=0.5
    ).objective
    j_half_pos = disco_loss(
        *batch.args()[:3], rewards, batch.group_ids, objective=objective, threshold=0.25, tau=0.5
    ).objective
    assert not torch.allclose(j_half_neg, j_half_pos)


def test_integer_rewards():
    batch = random_batch(14, shift=0.05)
    ints = replace(batch, rewards=batch.rewards.long())
    check_against_reference(ints, torch.float64, tau=0.5, delta=0.01, beta=2.0)
