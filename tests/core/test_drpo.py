"""DRPO (``objective="drpo"``, arXiv 2510.04474) against the naive float64 reference of
reference.py (written from the paper's equations), under every option of ``disco_loss``:
values and gradients, ragged shuffled groups, both preference sources (the default length
reward 1 - |o| / max_length and explicit preferences), the stated limits, the weights view
through ``discoloss.accumulation``, the cross-rank mode, bad input, and no host sync.

Tolerances as in test_reference.py (conftest.TOL): float64 (1e-10, 1e-12), float32
(2e-5, 2e-6).
"""

from __future__ import annotations

import itertools
import math
import os
import tempfile
import zlib
from typing import Any

import pytest
import torch
from conftest import KL_ESTIMATORS, NORMALIZES, SCORES, TOL, Batch, random_batch
from dist_support import free_port, init_gloo, run_ranks
from reference import (
    drpo_positive_weights,
    ref_constraint_penalty,
    ref_disco,
    ref_groups,
    ref_kl,
    ref_length_preferences,
    ref_objective,
    ref_scores,
    ref_weights,
)
from test_sync_and_api import no_host_reads

from discoloss import (
    LagrangeMultiplier,
    disco_loss,
    discriminative_objective,
    discriminative_weights,
)
from discoloss.accumulation import ResponseStats, micro_batch_loss, plan_minibatch, response_stats
from discoloss.options import DiscoOptions

F64 = torch.float64
T = 12  # random_batch's width: the default max_length of these tests is a different number
MAX_LENGTH = 16
REWARDS = [("01", 0.5), ("pm1", 0.5), ("cont", 0.7), ("pm1", 0.0)]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        actual.detach().to(F64),
        expected.detach().to(F64),
        rtol=rtol,
        atol=atol,
        msg=lambda m: f"{what}: {m}",
    )


def random_preferences(batch: Batch, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch.rewards.shape[0], generator=g, dtype=F64) * 0.3


def check_against_reference(batch: Batch, dtype: torch.dtype, **options: Any) -> None:
    leaf = batch.leaf()
    out = disco_loss(*leaf.args(), objective="drpo", **options)
    out.loss.backward()
    ref = ref_disco(*batch.args(), objective="drpo", **options)
    for name in ("loss", "objective", "kl", "penalty"):
        assert_close(getattr(out, name), getattr(ref, name), dtype, name)
    grad = leaf.log_probs.grad
    assert grad is not None and grad.dtype == dtype
    assert torch.equal(grad[~batch.bmask], torch.zeros_like(grad[~batch.bmask]))
    assert_close(grad, ref.grad, dtype, "grad wrt log_probs")
    for name in ("effective_positives", "effective_negatives", "frac_positive"):
        assert math.isclose(
            float(out.metrics[name]), ref.metrics[name], rel_tol=TOL[dtype][0], abs_tol=1e-12
        ), name


def penalty_delta(batch: Batch, kl_estimator: str, active: bool) -> float:
    b64 = batch.to(F64)
    kl = float(ref_kl(b64.log_probs, b64.old_log_probs, batch.bmask.tolist(), kl_estimator))
    assert kl > 0.0, "test setup: the batch must have a positive KL"
    return 0.5 * kl if active else kl + 0.5


def has_several_positives(batch: Batch, threshold: float) -> bool:
    groups = ref_groups(batch.rewards.tolist(), batch.group_ids.tolist(), threshold)
    return any(groups.has_signal(g) and len(groups.pos[g]) > 1 for g in groups.order)


GRID = list(
    itertools.product(
        SCORES, KL_ESTIMATORS, (True, False), REWARDS, NORMALIZES, ("length", "given")
    )
)


@pytest.mark.parametrize(
    "score,kl_estimator,active,rewards,normalize,source",
    GRID,
    ids=[f"{s}-{k}-{'pen' if a else 'nopen'}-{r[0]}@{r[1]}-{n}-{p}" for s, k, a, r, n, p in GRID],
)
def test_drpo_matches_reference_float64(score, kl_estimator, active, rewards, normalize, source):
    kind, threshold = rewards
    seed = zlib.crc32(f"drpo{score}{kl_estimator}{active}{kind}{threshold}{normalize}".encode())
    batch = random_batch(seed, rewards=kind, shift=0.05, dtype=F64, num_groups=8, max_group=8)
    while not has_several_positives(batch, threshold):  # a case where DRPO is not DisCO
        seed += 1
        batch = random_batch(seed, rewards=kind, shift=0.05, dtype=F64, num_groups=8, max_group=8)
    options: dict[str, Any] = dict(
        score=score,
        kl_estimator=kl_estimator,
        delta=penalty_delta(batch, kl_estimator, active),
        beta=7.0,
        threshold=threshold,
        normalize=normalize,
        tau=0.37 if seed % 2 else None,
        lam=0.05 + (seed % 7) / 10,
    )
    if source == "length":
        options["max_length"] = MAX_LENGTH
    else:
        options["preferences"] = random_preferences(batch, seed)
    ref = ref_disco(*batch.args(), objective="drpo", **options)
    assert (float(ref.penalty) > 0.0) == active
    # the case has positives of unequal weight: DRPO differs from DisCO on it
    assert ref.metrics["effective_positives"] < ref_disco(*batch.args(), **{
        k: v for k, v in options.items() if k not in ("lam", "max_length", "preferences")
    }).metrics["effective_positives"]  # fmt: skip
    check_against_reference(batch, F64, **options)


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("source", ["length", "given"])
def test_drpo_matches_reference_float32(seed, score, kl_estimator, source):
    batch = random_batch(500 + seed, rewards="pm1", shift=0.05, dtype=torch.float32)
    options: dict[str, Any] = dict(
        score=score,
        kl_estimator=kl_estimator,
        delta=penalty_delta(batch, kl_estimator, active=seed != 2),
        beta=5.0,
        tau=0.8,
        lam=0.2,
    )
    if source == "length":
        options["max_length"] = MAX_LENGTH
    else:
        options["preferences"] = random_preferences(batch, seed).float()
    check_against_reference(batch, torch.float32, **options)


def test_defaults_are_the_paper_settings():
    """lam defaults to 0.1 (the paper's scripts), tau 10 (log-likelihood), delta 1e-4, beta 1e3,
    k1; the default preference is the length reward with the given max_length."""
    batch = random_batch(31, shift=0.05, num_groups=7)
    leaf = batch.leaf()
    out = disco_loss(*leaf.args(), objective="drpo", max_length=MAX_LENGTH)
    out.loss.backward()
    ref = ref_disco(
        *batch.args(), objective="drpo", tau=10.0, lam=0.1, max_length=MAX_LENGTH, delta=1e-4,
        beta=1e3, kl_estimator="k1", preferences=torch.tensor(
            ref_length_preferences(batch.bmask.tolist(), MAX_LENGTH), dtype=F64
        ),
    )  # fmt: skip
    assert float(ref.penalty) > 0.0
    assert_close(out.loss, ref.loss, F64, "loss")
    assert_close(leaf.log_probs.grad, ref.grad, F64, "grad")
    assert DiscoOptions().lam == 0.1 and DiscoOptions().max_length is None


def test_the_reference_positive_weights_by_hand():
    """drpo_positive_weights (the reference's own softmax) on numbers worked out by hand."""
    v = drpo_positive_weights([0, 2, 3], [0.9, 123.0, 0.5, 0.5], lam=0.2)
    e = [math.exp(0.9 / 0.2), math.exp(0.5 / 0.2), math.exp(0.5 / 0.2)]
    assert set(v) == {0, 2, 3}
    for i, x in zip((0, 2, 3), e):
        assert math.isclose(v[i], x / sum(e), rel_tol=1e-14)
    # 1 - |o| / max_length, counted on the mask
    assert ref_length_preferences([[True, False, True], [False, True, False]], 4) == [0.5, 0.75]


@pytest.mark.parametrize("normalize", NORMALIZES)
@pytest.mark.parametrize("rewards", REWARDS, ids=lambda r: f"{r[0]}@{r[1]}")
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_objective_and_weights_match_reference(seed, normalize, rewards, dtype):
    kind, threshold = rewards
    batch = random_batch(600 + seed, rewards=kind, num_groups=7)
    gen = torch.Generator().manual_seed(seed)
    scores64 = torch.randn(batch.rewards.shape[0], generator=gen, dtype=F64) * 2.0
    scores = scores64.to(dtype).requires_grad_(True)
    prefs = random_preferences(batch, seed)
    opts = dict(objective="drpo", tau=0.6, threshold=threshold, normalize=normalize, lam=0.15)
    j = discriminative_objective(scores, batch.rewards, batch.group_ids, preferences=prefs, **opts)
    w = discriminative_weights(scores, batch.rewards, batch.group_ids, preferences=prefs, **opts)
    assert j.shape == () and w.shape == scores.shape and not w.requires_grad
    s_ref = scores.detach().double().requires_grad_(True)
    r, g, p = batch.rewards.tolist(), batch.group_ids.tolist(), prefs.tolist()
    j_ref = ref_objective(s_ref, r, g, preferences=p, **opts)  # type: ignore[arg-type]
    assert_close(j, j_ref, dtype, "objective")
    (w_autograd,) = torch.autograd.grad(j_ref, s_ref)
    w_formula = torch.tensor(
        ref_weights(s_ref.detach().tolist(), r, g, preferences=p, **opts),  # type: ignore[arg-type]
        dtype=F64,
    )
    torch.testing.assert_close(w_autograd, w_formula, rtol=1e-12, atol=1e-15)
    assert_close(w, w_formula, dtype, "weights")
    j.backward()
    assert_close(scores.grad, w_formula, dtype, "dJ/ds")


# ------------------------------------------------------------------ other options (variants)


def naive_clipped_scores(lp, old, mask, positive, eps):
    out = []
    for i in range(lp.shape[0]):
        vals = []
        for t in range(lp.shape[1]):
            if mask[i, t]:
                rho = torch.exp(lp[i, t] - old[i, t])
                vals.append(torch.clamp(rho, max=1 + eps) if positive[i] else
                            torch.clamp(rho, min=1 - eps))  # fmt: skip
        out.append(sum(vals) / len(vals))
    return torch.stack(out)


VARIANT_CASES = [
    dict(constraint="hinge", delta=1e-3),
    dict(constraint="kl_penalty", beta=0.7),
    dict(constraint="none"),
    dict(constraint="lagrangian", delta=1e-3),
    dict(score="clipped_ratio"),
    dict(score="clipped_ratio", clip_eps=0.05, kl_estimator="k3"),
    dict(score="likelihood_ratio", normalize="valid", lam=3.0),
]


@pytest.mark.parametrize(
    "case", VARIANT_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items())
)
@pytest.mark.parametrize("source", ["length", "given"])
def test_drpo_with_every_constraint_and_score(case, source):
    batch = random_batch(zlib.crc32(repr(case).encode()), shift=0.05, num_groups=6)
    lp, old, mask, rewards, ids = batch.args()
    bmask = batch.bmask
    opts = dict(case)
    opts.setdefault("lam", 0.1)
    if source == "length":
        opts["max_length"] = 20
        prefs = ref_length_preferences(bmask.tolist(), 20)
    else:
        p = random_preferences(batch, 3)
        opts["preferences"] = p
        prefs = p.tolist()
    multiplier = LagrangeMultiplier(init=0.3) if case.get("constraint") == "lagrangian" else None
    x = lp.clone().requires_grad_()
    out = disco_loss(x, old, mask, rewards, ids, objective="drpo", multiplier=multiplier, **opts)
    (grad,) = torch.autograd.grad(out.loss, x)

    # naive: scores, reference objective, KL, penalty, by loops in float64
    y = lp.clone().requires_grad_()
    score = case.get("score", "log_likelihood")
    positive = [float(r) > 0.5 for r in rewards.tolist()]
    if score == "clipped_ratio":
        s = naive_clipped_scores(y, old, bmask, positive, case.get("clip_eps", 0.2))
    else:
        s = ref_scores(y, old, bmask.tolist(), score)
    tau = 10.0 if score == "log_likelihood" else 1.0
    j = ref_objective(
        s, rewards.tolist(), ids.tolist(), objective="drpo", tau=tau, threshold=0.5,
        normalize=case.get("normalize", "all"), lam=opts["lam"], preferences=prefs,
    )  # fmt: skip
    kl = ref_kl(y, old, bmask.tolist(), case.get("kl_estimator", "k1"))
    pen = ref_constraint_penalty(
        kl, case.get("constraint", "squared_hinge"), case.get("delta", 1e-4),
        case.get("beta", 1e3), 0.3,
    )  # fmt: skip
    ref = -j + pen
    (ref_grad,) = torch.autograd.grad(ref, y)
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.objective, j.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-11)


# ------------------------------------------------------------------------------ limits


def _scores_batch(seed: int):
    batch = random_batch(seed, num_groups=8, max_group=8)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch.rewards.shape[0], generator=g, dtype=F64)
    lengths = batch.bmask.sum(1).to(F64)
    return s, batch.rewards, batch.group_ids, lengths


def test_lam_to_infinity_is_disco_and_constant_preferences_are_disco():
    s, r, ids, lengths = _scores_batch(41)
    disco = discriminative_objective(s, r, ids, objective="disco", tau=0.5)
    w_disco = discriminative_weights(s, r, ids, objective="disco", tau=0.5)
    far = dict(objective="drpo", tau=0.5, lam=1e9, preferences=1 - lengths / 12)
    torch.testing.assert_close(discriminative_objective(s, r, ids, **far), disco)
    torch.testing.assert_close(discriminative_weights(s, r, ids, **far), w_disco)
    const = dict(objective="drpo", tau=0.5, lam=0.01, preferences=torch.full_like(s, 0.3))
    torch.testing.assert_close(discriminative_objective(s, r, ids, **const), disco)
    torch.testing.assert_close(discriminative_weights(s, r, ids, **const), w_disco)


def test_lam_to_zero_puts_the_weight_on_the_shortest_positives():
    """lam -> 0: each question's positive weight 1/G goes to its shortest positives, split
    equally among ties; no overflow even at lam = 1e-6 (pref / lam ~ 1e6)."""
    s, r, ids, lengths = _scores_batch(42)
    lengths = torch.minimum(lengths, torch.tensor(4.0))  # many ties
    w = discriminative_weights(
        s, r, ids, objective="drpo", lam=1e-6, preferences=1 - lengths / 12, tau=0.5
    )
    assert bool(w.isfinite().all())
    groups = ref_groups(r.tolist(), ids.tolist(), 0.5)
    num_groups = len(groups.order)
    for g in groups.order:
        pos = groups.pos[g]
        if not groups.has_signal(g):
            assert all(float(w[i]) == 0.0 for i in pos + groups.neg[g])
            continue
        shortest = min(float(lengths[i]) for i in pos)
        ties = [i for i in pos if float(lengths[i]) == shortest]
        for i in pos:
            expected = 1.0 / (len(ties) * num_groups) if i in ties else 0.0
            assert math.isclose(float(w[i]), expected, abs_tol=1e-12), (g, i)


def test_the_length_scale_is_lam_times_max_length_and_preferences_shift_freely():
    """softmax(pref / lam) is unchanged by adding a constant to pref: the default preference
    with (lam, max_length) equals pref = -|o| with lam * max_length, and pref + c."""
    batch = random_batch(43, shift=0.05, num_groups=7)
    lengths = batch.bmask.sum(1).to(F64)
    a = disco_loss(*batch.args(), objective="drpo", lam=0.1, max_length=40)
    b = disco_loss(*batch.args(), objective="drpo", lam=4.0, preferences=-lengths)
    c = disco_loss(*batch.args(), objective="drpo", lam=4.0, preferences=7.5 - lengths)
    for other in (b, c):
        torch.testing.assert_close(other.loss, a.loss, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(other.objective, a.objective, rtol=1e-12, atol=1e-14)


def test_no_correct_answer_is_pushed_down_and_negatives_are_disco():
    """The decoupling of arXiv 2510.04474: every positive keeps a positive weight whatever its
    length (a length-penalised GRPO advantage can turn negative, see the docs), the positives
    of a question sum to 1/G, and the negatives' weights are DisCO's, whatever the lengths."""
    scores = torch.tensor([-0.2, -0.3, -0.9, -1.1, -0.4, -0.5, -0.6], dtype=F64)
    rewards = torch.tensor([1.0, 1, 1, 0, 0, 1, 0], dtype=F64)
    ids = torch.tensor([3, 3, 3, 3, 3, 8, 8])
    lengths = torch.tensor([900.0, 150, 8000, 40, 7000, 8000, 10], dtype=F64)
    w = discriminative_weights(
        scores, rewards, ids, objective="drpo", preferences=1 - lengths / 8192, lam=0.1
    )
    w_disco = discriminative_weights(scores, rewards, ids, objective="disco")
    positive = rewards > 0.5
    assert bool((w[positive] > 0).all())
    assert math.isclose(float(w[:3].sum()), 0.5, rel_tol=1e-12) and float(w[5]) == 0.5
    assert float(w[1]) > float(w[0]) > float(w[2])  # shorter correct answers weigh more
    torch.testing.assert_close(w[~positive], w_disco[~positive], rtol=0, atol=0)
    # GRPO with the length-penalised reward of the same question: the 8000-token correct
    # answer gets a negative advantage (pushed down), though it is correct
    reward_lp = torch.tensor([1 - 900 / 8192, 1 - 150 / 8192, 1 - 8000 / 8192, 0, 0], dtype=F64)
    adv = (reward_lp - reward_lp.mean()) / reward_lp.std()
    assert float(adv[2]) < 0


# ---------------------------------------------------------------------- weights view


@pytest.mark.parametrize("source", ["length", "given"])
@pytest.mark.parametrize(
    "objective_opts", [dict(), dict(score="likelihood_ratio", kl_estimator="k3")]
)
def test_accumulation_over_micro_batches_is_exact(source, objective_opts):
    batch = random_batch(44, shift=0.1, num_groups=6)
    lp, old, mask, rewards, ids = batch.args()
    extra: dict[str, Any] = {}
    if source == "length":
        extra["max_length"] = 15
    else:
        extra["preferences"] = random_preferences(batch, 44)
    score = objective_opts.get("score", "log_likelihood")
    kl_est = objective_opts.get("kl_estimator", "k1")
    x = lp.clone().requires_grad_()
    full = disco_loss(x, old, mask, rewards, ids, objective="drpo", delta=1e-3, lam=0.2,
                      **objective_opts, **extra)  # fmt: skip
    (ref,) = torch.autograd.grad(full.loss, x)
    b = lp.shape[0]
    cuts = [0, 1, 4, b // 2, b - 1, b]
    with torch.no_grad():  # current-parameter stats (exact everywhere)
        stats = ResponseStats.cat([
            response_stats(lp[a:c], old[a:c], mask[a:c], score=score, kl_estimator=kl_est)
            for a, c in zip(cuts, cuts[1:])
        ])  # fmt: skip
    plan = plan_minibatch(stats, rewards, ids, score=score, objective="drpo", delta=1e-3, lam=0.2,
                          **extra)  # fmt: skip
    torch.testing.assert_close(plan.output.loss, full.loss.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        plan.output.metrics["effective_positives"], full.metrics["effective_positives"]
    )
    y = lp.clone().requires_grad_()
    grad = torch.zeros_like(lp)
    for a, c in zip(cuts, cuts[1:]):
        mb = micro_batch_loss(
            y[a:c], old[a:c], mask[a:c], plan.weights[a:c], num_tokens=plan.num_tokens,
            kl_coef=plan.kl_coef, score=score, kl_estimator=kl_est, delta=1e-3,
        )  # fmt: skip
        (g,) = torch.autograd.grad(mb.loss, y)
        grad += g
    torch.testing.assert_close(grad, ref, rtol=1e-9, atol=1e-12)


def test_plan_at_the_sampling_policy_uses_the_lengths():
    """Stats at the sampling policy (free) carry the lengths: the positives' weights are
    exact there for DRPO (they do not depend on the scores), the default preference included."""
    batch = random_batch(45, shift=0.1, num_groups=6)
    lp, old, mask, rewards, ids = batch.args()
    stats = response_stats(old, old, mask)
    plan = plan_minibatch(stats, rewards, ids, objective="drpo", max_length=15, lam=0.1)
    w = discriminative_weights(
        ref_scores(old, old, batch.bmask.tolist(), "log_likelihood"), rewards, ids,
        objective="drpo", preferences=1 - batch.bmask.sum(1).to(F64) / 15, lam=0.1,
    )  # fmt: skip
    torch.testing.assert_close(plan.weights, w, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(objective="drpo"), ValueError, "max_length"),
        (dict(objective="drpo", lam=0.0, max_length=8), ValueError, "lam must be > 0"),
        (dict(objective="drpo", lam=-1.0, max_length=8), ValueError, "lam must be > 0"),
        (dict(objective="drpo", lam=math.nan, max_length=8), ValueError, "lam must be finite"),
        (dict(objective="drpo", lam=math.inf, max_length=8), ValueError, "lam must be finite"),
        (dict(objective="drpo", lam=True, max_length=8), TypeError, "lam"),
        (dict(objective="drpo", max_length=0), ValueError, "max_length must be >= 1"),
        (dict(objective="drpo", max_length=8.0), TypeError, "max_length must be an int"),
        (dict(objective="drpo", max_length=True), TypeError, "max_length must be an int"),
        (dict(lam=0.0), ValueError, "lam"),  # validated whatever the objective, like cvar_alpha
        (dict(preferences=torch.zeros(3)), ValueError, "objective='drpo' only"),
        (dict(objective="drpo", preferences=torch.zeros(2)), ValueError, "preferences has 2"),
        (dict(objective="drpo", preferences=torch.zeros(3, 1)), ValueError, "preferences must"),
        (
            dict(objective="drpo", preferences=torch.zeros(3, dtype=torch.bool)),
            TypeError,
            "preferences must be a real",
        ),  # fmt: skip
        (dict(objective="drpo", preferences=[0.1, 0.2, 0.3]), TypeError, "preferences must be"),
        (
            dict(objective="drpo", preferences=torch.tensor([0.0, math.nan, 1.0])),
            ValueError,
            "preferences: non-finite value at response 1",
        ),  # fmt: skip
    ],
)
def test_bad_drpo_input_names_the_argument(kwargs, exc, match):
    lp = -torch.rand(3, 4, dtype=F64)
    args = (lp, lp + 0.01, torch.ones(3, 4, dtype=torch.bool), torch.tensor([1.0, 0, 1]),
            torch.tensor([0, 0, 0]))  # fmt: skip
    with pytest.raises(exc, match=match):
        disco_loss(*args, **kwargs)


def test_scores_level_functions_need_the_preferences():
    s, r, ids = torch.zeros(3, dtype=F64), torch.tensor([1.0, 0, 1]), torch.tensor([0, 0, 0])
    with pytest.raises(ValueError, match="preferences"):
        discriminative_weights(s, r, ids, objective="drpo")
    with pytest.raises(ValueError, match="preferences"):
        discriminative_objective(s, r, ids, objective="drpo", tau=1.0)
    stats = ResponseStats(s, s, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="max_length"):
        plan_minibatch(stats, r, ids, objective="drpo")
    with pytest.raises(ValueError, match="preferences has 2"):
        plan_minibatch(stats, r, ids, objective="drpo", preferences=torch.zeros(2))
    with pytest.raises(ValueError, match="preferences: non-finite"):
        plan_minibatch(stats, r, ids, objective="drpo", preferences=torch.tensor([0, math.inf, 0]))
    # validate=False skips the value check, not the metadata ones
    plan_minibatch(stats, r, ids, objective="drpo", preferences=torch.zeros(3), validate=False)


# ------------------------------------------------------------------------- host syncs


@pytest.mark.parametrize("source", ["length", "given"])
def test_validate_false_reads_nothing_on_the_host(monkeypatch, source):
    batch = random_batch(46, shift=0.05)
    extra: dict[str, Any] = (
        {"max_length": 20} if source == "length" else {"preferences": random_preferences(batch, 1)}
    )
    lp = batch.log_probs.clone().requires_grad_(True)
    opts = dict(objective="drpo", delta=1e-3, beta=10.0, **extra)
    with no_host_reads(monkeypatch):
        out = disco_loss(lp, *batch.args()[1:], validate=False, **opts)
        out.loss.backward()
        stats = response_stats(batch.log_probs, batch.old_log_probs, batch.mask, validate=False)
        plan_minibatch(stats, batch.rewards, batch.group_ids, validate=False, **opts)
    lp2 = batch.log_probs.clone().requires_grad_(True)
    ref = disco_loss(lp2, *batch.args()[1:], **opts)
    ref.loss.backward()
    assert torch.equal(out.loss, ref.loss) and torch.equal(lp.grad, lp2.grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only check: needs CUDA")
def test_validate_false_is_sync_free_on_cuda():
    batch = random_batch(47, shift=0.05)
    cuda = Batch(*(t.cuda() for t in batch.args()))
    prefs = random_preferences(batch, 2)
    for extra in ({"max_length": 20}, {"preferences": prefs.cuda()}):
        lp = cuda.log_probs.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = disco_loss(lp, *cuda.args()[1:], objective="drpo", validate=False, **extra)
            out.loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        cpu_extra = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in extra.items()}
        ref = disco_loss(*batch.args(), objective="drpo", **cpu_extra)
        torch.testing.assert_close(out.loss.cpu(), ref.loss, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------- cross-rank

HIDDEN = 5
SIZES = [6, 0, 9]  # three ranks, one of them empty; every question spans ranks


def _shards(seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for r, b in enumerate(SIZES):
        t = 5 + 4 * r
        mask = torch.rand(b, t, generator=g) > 0.3
        if b:
            mask[:, 0] = True
        out.append(dict(
            x=torch.randn(b, t, HIDDEN, generator=g, dtype=F64),
            mask=mask,
            old_shift=0.05 * torch.rand(b, t, generator=g, dtype=F64),
            rewards=torch.randint(0, 2, (b,), generator=g).to(F64),
            group_ids=(torch.arange(b) * 5 + r) % 4 * 1_000_003 - 11,
            preferences=torch.randn(b, generator=g, dtype=F64),
        ))  # fmt: skip
    return out


def _theta() -> torch.Tensor:
    return torch.linspace(-0.4, 0.6, HIDDEN, dtype=F64)


def _lp(theta: torch.Tensor, shard: dict[str, torch.Tensor]) -> torch.Tensor:
    return -torch.nn.functional.softplus(shard["x"] @ theta)


RANK_CASES: list[dict[str, Any]] = [
    dict(max_length=11, lam=0.3),
    dict(preferences=True, lam=0.5, score="likelihood_ratio", kl_estimator="k3"),
]


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    init_gloo(rank, world, port)
    pg = dist.group.WORLD
    results: dict[str, Any] = {}
    try:
        for k, case in enumerate(RANK_CASES):
            shard = _shards(k)[rank]
            opts = {key: v for key, v in case.items() if key != "preferences"}
            if case.get("preferences"):
                opts["preferences"] = shard["preferences"]
            theta = _theta().requires_grad_()
            lp = _lp(theta, shard)
            old = lp.detach() + shard["old_shift"]
            args = (lp, old, shard["mask"], shard["rewards"], shard["group_ids"])
            out = disco_loss(*args, objective="drpo", delta=1e-5, process_group=pg, **opts)
            out.loss.backward()
            grad = theta.grad.clone()
            dist.all_reduce(grad)
            # the plan across ranks, one response per micro-batch
            stat_opts = {key: v for key, v in opts.items() if key in ("score", "kl_estimator")}
            plan_opts = {key: v for key, v in opts.items() if key != "kl_estimator"}
            theta2 = _theta().requires_grad_()
            lp2 = _lp(theta2, shard)
            if lp2.shape[0]:
                with torch.no_grad():
                    stats = response_stats(lp2, old, shard["mask"], **stat_opts)
            else:
                stats = ResponseStats(*(torch.zeros(0, dtype=F64) for _ in range(3)))
            plan = plan_minibatch(stats, shard["rewards"], shard["group_ids"], objective="drpo",
                                  delta=1e-5, process_group=pg, **plan_opts)  # fmt: skip
            for i in range(lp2.shape[0]):
                mb = micro_batch_loss(
                    lp2[i : i + 1], old[i : i + 1], shard["mask"][i : i + 1],
                    plan.weights[i : i + 1], num_tokens=plan.num_tokens, kl_coef=plan.kl_coef,
                    **stat_opts,
                )  # fmt: skip
                mb.loss.backward(retain_graph=True)
            pgrad = theta2.grad if theta2.grad is not None else torch.zeros_like(theta2)
            dist.all_reduce(pgrad)
            results[f"ok{k}"] = dict(grad=grad / world, loss=out.loss.detach(),
                                     metrics=out.metrics, plan_grad=pgrad,
                                     plan_loss=plan.output.loss)  # fmt: skip
        shard = _shards(0)[rank]
        lp = _lp(_theta(), shard).detach()
        args = (lp, lp, shard["mask"], shard["rewards"], shard["group_ids"])
        faults = {
            # preferences on one rank only: the payloads would differ in width
            "one_rank_preferences": dict(
                preferences=shard["preferences"] if rank == 0 else None, max_length=11
            ),  # fmt: skip
            "lam_differs": dict(lam=0.1 if rank == 0 else 0.2, max_length=11),
            "max_length_differs": dict(
                max_length=11 if rank == 0 else None, preferences=shard["preferences"]
            ),  # fmt: skip
            "nan_preference_last_rank": dict(
                preferences=torch.where(
                    torch.arange(len(shard["preferences"])) == len(shard["preferences"]) - 1,
                    math.nan if rank == world - 1 else 0.0,
                    shard["preferences"],
                )
            ),
        }
        for name, kw in faults.items():
            try:
                disco_loss(*args, objective="drpo", process_group=pg, **kw)
                results[name] = None
            except ValueError as exc:
                results[name] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process(k: int) -> tuple[Any, torch.Tensor]:
    case = RANK_CASES[k]
    parts = _shards(k)
    opts = {key: v for key, v in case.items() if key != "preferences"}
    if case.get("preferences"):
        opts["preferences"] = torch.cat([p["preferences"] for p in parts])
    theta = _theta().requires_grad_()
    tmax = max(p["x"].shape[1] for p in parts)

    def cat(ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(t, (0, tmax - t.shape[1])) for t in ts])

    lps = [_lp(theta, p) for p in parts]
    out = disco_loss(
        cat(lps), cat([x.detach() + p["old_shift"] for x, p in zip(lps, parts)]),
        cat([p["mask"] for p in parts]), torch.cat([p["rewards"] for p in parts]),
        torch.cat([p["group_ids"] for p in parts]), objective="drpo", delta=1e-5, **opts,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(out.loss, theta)
    return out, grad


def test_cross_rank_drpo_equals_single_process_and_faults_are_collective():
    world = len(SIZES)
    with tempfile.TemporaryDirectory() as tmp:
        run_ranks(_rank_worker, world, (world, free_port(), tmp))
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    for k in range(len(RANK_CASES)):
        ref, ref_grad = _single_process(k)
        assert ref.penalty.item() > 0 and ref.metrics["groups_with_signal"].item() > 0
        assert ref.metrics["effective_positives"].item() > 1.0  # the positives differ
        for r in ranks:
            got = r[f"ok{k}"]
            torch.testing.assert_close(got["grad"], ref_grad, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(got["plan_grad"], ref_grad, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(got["loss"], ref.loss.detach(), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(got["plan_loss"], ref.loss.detach(), rtol=1e-9, atol=1e-12)
            for name, value in ref.metrics.items():
                torch.testing.assert_close(
                    got["metrics"][name].double(), value.double(), rtol=1e-9, atol=1e-12
                )
    last = world - 1
    for r in ranks:  # the same message on every rank
        assert r["one_rank_preferences"] == ranks[0]["one_rank_preferences"]
        assert "preferences: a tensor (rank 0) vs None (ranks 1, 2)" in r["one_rank_preferences"]
        assert "lam: 0.1 (rank 0) vs 0.2 (ranks 1, 2)" in r["lam_differs"]
        assert "max_length: 11 (rank 0) vs None (ranks 1, 2)" in r["max_length_differs"]
        assert r["nan_preference_last_rank"] == (
            f"disco_loss on rank {last} of {world} in process_group: preferences: non-finite "
            f"value at response {SIZES[last] - 1}"
        )
