"""DiscoOutput.metrics against independently computed values (reference.py and by hand).

Tolerances: float64 inputs; counts and flags exactly, means at rtol 1e-10 / atol 1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import KL_ESTIMATORS, OBJECTIVES, SCORES, Batch, batches, examples, random_batch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import ref_disco

from discoloss import disco_loss

F64 = torch.float64
EXACT = ("num_groups", "groups_with_signal", "constraint_active")
CLOSE = (
    "frac_positive",
    "mean_pos_score",
    "mean_neg_score",
    "effective_negatives",
    "effective_positives",
    "mean_response_length",
)


def check_metrics(batch: Batch, **options) -> dict[str, torch.Tensor]:
    lp = batch.log_probs.clone().requires_grad_(True)
    out = disco_loss(lp, *batch.args()[1:], **options)
    ref = ref_disco(*batch.args(), **options)
    metrics = out.metrics
    for name, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.shape == (), name
        assert not value.requires_grad, name
        assert value.dtype.is_floating_point, name
    for name in EXACT:
        assert float(metrics[name]) == ref.metrics[name], name
    for name in CLOSE:
        expected = ref.metrics[name]
        if math.isnan(expected):  # no positive / no negative in the batch: just finite
            assert math.isfinite(float(metrics[name])), name
            continue
        assert math.isclose(float(metrics[name]), expected, rel_tol=1e-10, abs_tol=1e-12), (
            name,
            float(metrics[name]),
            expected,
        )
    frac = ref.metrics["groups_with_signal"] / ref.metrics["num_groups"]
    assert math.isclose(float(metrics["frac_groups_with_signal"]), frac, rel_tol=1e-12)
    # the logged loss terms are the outputs' values
    for name in ("loss", "objective", "kl", "penalty"):
        assert torch.equal(metrics[name], getattr(out, name).detach()), name
        torch.testing.assert_close(metrics[name], getattr(ref, name), rtol=1e-10, atol=1e-12)
    return metrics


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("kl_estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("rewards", ["01", "pm1", "cont"])
def test_metrics_match_reference(seed, score, objective, kl_estimator, rewards):
    batch = random_batch(500 + seed, rewards=rewards, shift=0.02, num_groups=6)
    threshold = 0.7 if rewards == "cont" else 0.5
    delta = (0.0, 0.01, 10.0)[seed]  # constraint active and inactive
    check_metrics(
        batch,
        score=score,
        objective=objective,
        kl_estimator=kl_estimator,
        tau=0.4,
        delta=delta,
        threshold=threshold,
    )


@settings(max_examples=examples(30))
@given(
    batch=batches(),
    objective=st.sampled_from(OBJECTIVES),
    tau=st.floats(0.05, 50.0),
    delta=st.sampled_from([0.0, 1e-2, 1.0]),
)
def test_metrics_property(batch, objective, tau, delta):
    check_metrics(batch, objective=objective, tau=tau, delta=delta)


def hand_batch() -> Batch:
    """Group 10: 1 positive, 3 negatives; group 20: 2 positives, 1 negative; group 30: two
    negatives only (no signal). One token per response, so the score is that log-prob."""
    s = torch.tensor([-0.5, -1.0, -2.0, -4.0, -0.2, -0.4, -3.0, -1.5, -2.5], dtype=F64)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=F64)
    group_ids = torch.tensor([10, 10, 10, 10, 20, 20, 20, 30, 30])
    mask = torch.ones(9, 1, dtype=torch.bool)
    return Batch(s[:, None], s[:, None] + 0.1, mask, rewards, group_ids)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_metrics_by_hand(objective):
    batch = hand_batch()
    tau = 0.5
    m = disco_loss(*batch.args(), objective=objective, tau=tau, delta=0.05).metrics
    assert float(m["num_groups"]) == 3.0
    assert float(m["groups_with_signal"]) == 2.0
    assert math.isclose(float(m["frac_groups_with_signal"]), 2 / 3, rel_tol=1e-12)
    assert math.isclose(float(m["frac_positive"]), 3 / 9, rel_tol=1e-12)
    assert math.isclose(float(m["mean_pos_score"]), (-0.5 - 0.2 - 0.4) / 3, rel_tol=1e-12)
    assert math.isclose(
        float(m["mean_neg_score"]), (-1.0 - 2.0 - 4.0 - 3.0 - 1.5 - 2.5) / 6, rel_tol=1e-12
    )
    # k1 KL = mean(old - lp) = 0.1 > delta = 0.05
    assert float(m["constraint_active"]) == 1.0
    assert math.isclose(float(m["kl"]), 0.1, rel_tol=1e-12)
    assert float(m["mean_response_length"]) == 1.0
    if objective == "disco_b":
        expected = (3 + 1) / 2  # |N_q| averaged over the groups with signal
    else:
        e = [math.exp(x / tau) for x in (-1.0, -2.0, -4.0)]
        q = [x / sum(e) for x in e]
        expected = (1 / sum(x * x for x in q) + 1) / 2
    assert math.isclose(float(m["effective_negatives"]), expected, rel_tol=1e-12)
    inactive = disco_loss(*batch.args(), objective=objective, tau=tau, delta=0.2).metrics
    assert float(inactive["constraint_active"]) == 0.0


def test_metrics_without_signal_are_finite():
    batch = random_batch(7, signal="none")
    m = disco_loss(*batch.args()).metrics
    assert float(m["groups_with_signal"]) == 0.0
    for name, value in m.items():
        assert torch.isfinite(value), name
