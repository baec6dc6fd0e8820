"""Closed-form difficulty weights against finite-n computations, Monte Carlo and the baselines'
own gradients."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from discoloss import disco_loss, discriminative_weights
from discoloss.analysis import METHODS, difficulty_weight, implied_weights
from discoloss.baselines import dapo_loss, dr_grpo_loss, group_advantages, grpo_loss

P_GRID = [0.0, 0.05, 0.125, 0.3, 0.5, 0.62, 0.875, 0.97, 1.0]


def all_k_batch(n: int) -> tuple[Tensor, Tensor]:
    """One question per k = 0..n correct answers out of n (shuffled order)."""
    rewards = torch.cat([(torch.arange(n) < k).to(torch.float64) for k in range(n + 1)])
    groups = torch.arange(n + 1).repeat_interleave(n) * 7 + 3
    perm = torch.randperm(rewards.numel(), generator=torch.Generator().manual_seed(n))
    return rewards[perm], groups[perm]


# ----------------------------------------------------------------------------- closed forms


def test_population_closed_forms() -> None:
    for p in P_GRID:
        signal = 0.0 < p < 1.0
        assert difficulty_weight(p, "grpo") == pytest.approx(math.sqrt(p * (1 - p)))
        assert difficulty_weight(p, "dapo") == pytest.approx(math.sqrt(p * (1 - p)))
        assert difficulty_weight(p, "dr_grpo") == pytest.approx(p * (1 - p))
        assert difficulty_weight(p, "disco") == (1.0 if signal else 0.0)
        assert difficulty_weight(p, "disco_b") == (1.0 if signal else 0.0)


def test_scalar_and_tensor_inputs() -> None:
    assert isinstance(difficulty_weight(0.3, "grpo"), float)
    out = difficulty_weight(torch.tensor([[0.1, 0.2], [0.3, 0.9]]), "dr_grpo", n=8)
    assert isinstance(out, Tensor) and out.shape == (2, 2) and out.dtype == torch.float64
    seq = difficulty_weight([0.25, 0.5], "grpo")
    torch.testing.assert_close(seq, torch.tensor([math.sqrt(0.1875), 0.5], dtype=torch.float64))


@pytest.mark.parametrize("n", [2, 3, 5, 8, 16])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-4])
def test_finite_n_weight_is_what_group_advantages_compute(
    n: int, unbiased: bool, eps: float
) -> None:
    rewards, groups = all_k_batch(n)
    for method, scale in (("grpo", "std"), ("dapo", "std"), ("dr_grpo", "none")):
        adv = group_advantages(rewards, groups, scale=scale, std_unbiased=unbiased, eps=eps)  # type: ignore[arg-type]
        iw = implied_weights(adv, rewards, groups)
        want = difficulty_weight(iw.accuracy, method, n=n, std_unbiased=unbiased, eps=eps)  # type: ignore[arg-type]
        torch.testing.assert_close(iw.weight, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(iw.negative_weight, iw.weight, rtol=1e-9, atol=1e-12)
        assert iw.size.eq(n).all()
    # the finite-n GRPO weight is the population one times sqrt((n-1)/n) (Bessel, eps = 0)
    if unbiased and eps == 0.0:
        k = torch.arange(n + 1, dtype=torch.float64) / n
        torch.testing.assert_close(
            difficulty_weight(k, "grpo", n=n),
            difficulty_weight(k, "grpo") * math.sqrt((n - 1) / n),
        )


@pytest.mark.parametrize("objective", ["disco", "disco_b"])
@pytest.mark.parametrize("normalize", ["all", "valid"])
def test_disco_weights_are_constant(objective: str, normalize: str) -> None:
    rewards, groups = all_k_batch(8)
    scores = torch.randn(
        rewards.numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    w = discriminative_weights(scores, rewards, groups, objective=objective, normalize=normalize)  # type: ignore[arg-type]
    iw = implied_weights(w, rewards, groups, kind="weights")
    signal = (iw.accuracy > 0) & (iw.accuracy < 1)
    constant = 1.0 if normalize == "all" else 9 / 7  # G / number of questions with signal
    torch.testing.assert_close(iw.weight[signal], torch.full((7,), constant, dtype=torch.float64))
    torch.testing.assert_close(iw.negative_weight[signal], iw.weight[signal])
    assert iw.weight[~signal].eq(0).all()
    want = difficulty_weight(iw.accuracy, objective, n=8) * constant  # type: ignore[arg-type]
    torch.testing.assert_close(iw.weight, want)


def test_expected_weight_is_the_binomial_average() -> None:
    n = 8
    for p in P_GRID:
        for method in METHODS:
            got = difficulty_weight(p, method, n=n, expected=True, eps=1e-6)  # type: ignore[arg-type]
            want = sum(
                math.comb(n, k) * p**k * (1 - p) ** (n - k)
                * difficulty_weight(k / n, method, n=n, eps=1e-6)  # type: ignore[arg-type]
                for k in range(n + 1)
            )  # fmt: skip
            assert got == pytest.approx(want, abs=1e-12)
        # closed forms of the simple cases
        assert difficulty_weight(p, "dr_grpo", n=n, expected=True) == pytest.approx(
            (n - 1) / n * p * (1 - p), abs=1e-12
        )
        assert difficulty_weight(p, "disco", n=n, expected=True) == pytest.approx(
            1 - p**n - (1 - p) ** n, abs=1e-12
        )


# ----------------------------------------------------------------------------- Monte Carlo


def test_population_weight_by_monte_carlo() -> None:
    """Large groups: (1/n) sum_i A_i s_i -> omega(p) (E+ s - E- s) (DESIGN.md section 1)."""
    gen = torch.Generator().manual_seed(0)
    n = 50_000
    for p in (0.03, 0.2, 0.5, 0.9):
        labels = (torch.rand(n, generator=gen, dtype=torch.float64) < p).to(torch.float64)
        scores = torch.randn(n, generator=gen, dtype=torch.float64) + 1.5 * labels  # gap 1.5
        groups = torch.zeros(n, dtype=torch.long)
        for method, scale in (("grpo", "std"), ("dr_grpo", "none")):
            adv = group_advantages(labels, groups, scale=scale)  # type: ignore[arg-type]
            objective = float((adv * scores).mean())
            omega = difficulty_weight(p, method)  # type: ignore[arg-type]
            # standard error of the mean of A * s is below 2 / sqrt(n) = 0.009; gap 1.5
            assert objective == pytest.approx(1.5 * omega, abs=0.04)
            iw = implied_weights(adv, labels, groups)
            assert float(iw.weight[0]) == pytest.approx(omega, abs=0.01)


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "disco"])
def test_expected_weight_by_monte_carlo(method: str) -> None:
    """Many groups of n = 8 at true accuracy p: mean weight and mean objective per question."""
    gen = torch.Generator().manual_seed(1)
    n, groups_per_p = 8, 8_000
    for p in (0.05, 0.3, 0.7):
        labels = (torch.rand(groups_per_p, n, generator=gen, dtype=torch.float64) < p).to(
            torch.float64
        )
        scores = torch.randn(groups_per_p, n, generator=gen, dtype=torch.float64) + labels
        rewards = labels.reshape(-1)
        groups = torch.arange(groups_per_p).repeat_interleave(n)
        if method == "disco":
            coef = discriminative_weights(scores.reshape(-1), rewards, groups, objective="disco_b")
            kind = "weights"
            # J = sum_i w_i s_i is already the mean over the G questions
            mean_objective = float((coef * scores.reshape(-1)).sum())
        else:
            coef = group_advantages(rewards, groups, scale="std" if method == "grpo" else "none")
            kind = "advantages"
            # mean over the B = G n responses = mean over questions of (1/n) sum_i A_i s_i
            mean_objective = float((coef * scores.reshape(-1)).mean())
        iw = implied_weights(coef, rewards, groups, kind=kind)  # type: ignore[arg-type]
        want = difficulty_weight(p, method, n=n, expected=True, eps=1e-6)  # type: ignore[arg-type]
        # per-question weights are in [0, 1]: standard error < 0.006. Tolerances stay below the
        # gap to the population weight (0.026 for Dr. GRPO at p = 0.3, 0.058 for DisCO)
        assert float(iw.weight.mean()) == pytest.approx(want, abs=0.01)
        # the expected objective per question is omega_expected * (E+ s - E- s), gap 1; its
        # standard error is about 0.008 for DisCO (weight 1), less for the others
        tol = {"grpo": 0.03, "dr_grpo": 0.015, "disco": 0.045}[method]
        assert mean_objective == pytest.approx(want, abs=tol)


# ----------------------------------------------------------------------------- baselines' gradients


def coefficients_from_gradient(loss: Tensor, log_probs: Tensor) -> Tensor:
    """At theta = theta_old, minus the per-response sum of dL/dlog_prob is the coefficient c_i of
    the response's score (token-mean ratio, whose gradient sums to 1 over the tokens)."""
    (grad,) = torch.autograd.grad(loss, log_probs)
    return -grad.sum(-1)


def old_policy_batch(n: int, lengths: Tensor | None = None, t: int = 6) -> dict[str, Any]:
    rewards, groups = all_k_batch(n)
    b = rewards.numel()
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 2
    mask = torch.ones(b, t, dtype=torch.bool)
    if lengths is not None:
        mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    return {
        "log_probs": old.clone().requires_grad_(),
        "old_log_probs": old,
        "mask": mask,
        "rewards": rewards,
        "group_ids": groups,
    }


LOSS_FNS: dict[str, Callable[..., Any]] = {
    "grpo": grpo_loss,
    "dr_grpo": dr_grpo_loss,
    "dapo": dapo_loss,
}


@pytest.mark.parametrize("method", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("n", [4, 8])
def test_baseline_loss_gradients_give_their_closed_form(method: str, n: int) -> None:
    batch = old_policy_batch(n)
    out = LOSS_FNS[method](**batch)
    coef = coefficients_from_gradient(out.loss, batch["log_probs"])
    iw = implied_weights(coef, batch["rewards"], batch["group_ids"], kind="weights")
    want = difficulty_weight(iw.accuracy, method, n=n, eps=1e-6)  # type: ignore[arg-type]
    torch.testing.assert_close(iw.weight, want, rtol=1e-9, atol=1e-12)
    # the advantages the loss returns give the same weights
    from_adv = implied_weights(out.advantages, batch["rewards"], batch["group_ids"])
    torch.testing.assert_close(from_adv.weight, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("score", ["log_likelihood", "likelihood_ratio"])
@pytest.mark.parametrize("objective", ["disco", "disco_b"])
def test_disco_loss_gradient_gives_constant_weight(score: str, objective: str) -> None:
    batch = old_policy_batch(
        8, lengths=torch.randint(1, 7, (72,), generator=torch.Generator().manual_seed(5))
    )
    out = disco_loss(**batch, score=score, objective=objective)  # type: ignore[arg-type]
    coef = coefficients_from_gradient(out.loss, batch["log_probs"])
    iw = implied_weights(coef, batch["rewards"], batch["group_ids"], kind="weights")
    want = difficulty_weight(iw.accuracy, objective, n=8)  # type: ignore[arg-type]
    torch.testing.assert_close(iw.weight, want)


def test_token_level_losses_weight_responses_by_length() -> None:
    n = 6
    lengths = torch.randint(1, 9, (n * (n + 1),), generator=torch.Generator().manual_seed(2))
    batch = old_policy_batch(n, lengths=lengths, t=8)
    r, g = batch["rewards"], batch["group_ids"]
    # DAPO: token mean over the batch
    out = dapo_loss(**batch)
    coef = coefficients_from_gradient(out.loss, batch["log_probs"])
    measured = implied_weights(coef, r, g, kind="weights")
    modelled = implied_weights(out.advantages, r, g, lengths=lengths)
    torch.testing.assert_close(measured.weight, modelled.weight)
    torch.testing.assert_close(measured.negative_weight, modelled.negative_weight)
    # ... which is not GRPO's weight once lengths differ
    assert not torch.allclose(measured.weight, implied_weights(out.advantages, r, g).weight)
    # Dr. GRPO: token sum over a constant
    out = dr_grpo_loss(**batch, max_tokens=16)
    coef = coefficients_from_gradient(out.loss, batch["log_probs"])
    measured = implied_weights(coef, r, g, kind="weights")
    modelled = implied_weights(out.advantages, r, g, lengths=lengths, token_normalizer=16)
    torch.testing.assert_close(measured.weight, modelled.weight)


def test_ragged_groups_weight_by_group_size_under_a_sequence_mean() -> None:
    sizes = [2, 5, 8, 3]
    rewards = torch.cat([(torch.arange(s) < (s + 1) // 2).double() for s in sizes])
    groups = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])
    adv = group_advantages(rewards, groups)
    iw = implied_weights(adv, rewards, groups)
    b, q = rewards.numel(), len(sizes)
    for i, s in enumerate(sizes):
        p = ((s + 1) // 2) / s
        want = q / b * s * difficulty_weight(p, "grpo", n=s, eps=1e-6)
        assert float(iw.weight[i]) == pytest.approx(want)
    assert iw.size.tolist() == sizes
    assert iw.group_ids.tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "exc", "needle"),
    [
        (lambda: difficulty_weight(0.5, "ppo"), ValueError, "method"),  # type: ignore[arg-type]
        (lambda: difficulty_weight(1.5, "grpo"), ValueError, "p must"),
        (lambda: difficulty_weight(math.nan, "grpo"), ValueError, "p must"),
        (lambda: difficulty_weight(0.5, "grpo", n=0), ValueError, "n must"),
        (lambda: difficulty_weight(0.5, "grpo", n=2.0), ValueError, "n must"),  # type: ignore[arg-type]
        (lambda: difficulty_weight(0.5, "grpo", expected=True), ValueError, "expected"),
        (lambda: difficulty_weight(0.5, "grpo", eps=-1), ValueError, "eps"),
        (lambda: difficulty_weight(True, "grpo"), TypeError, "bool"),
        (
            lambda: implied_weights(
                torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.long), kind="x"
            ),  # type: ignore[arg-type]
            ValueError,
            "kind",
        ),
        (
            lambda: implied_weights(
                torch.zeros(3), torch.zeros(2), torch.zeros(3, dtype=torch.long)
            ),
            ValueError,
            "rewards",
        ),
        (
            lambda: implied_weights(torch.zeros(3), torch.zeros(3), torch.zeros(3)),
            TypeError,
            "group_ids",
        ),
        (
            lambda: implied_weights(
                torch.tensor([0.0, math.inf, 0.0]), torch.zeros(3), torch.zeros(3, dtype=torch.long)
            ),
            ValueError,
            "advantages",
        ),
        (
            lambda: implied_weights(
                torch.zeros(3),
                torch.zeros(3),
                torch.zeros(3, dtype=torch.long),
                kind="weights",
                lengths=torch.ones(3),
            ),
            ValueError,
            "lengths",
        ),
        (
            lambda: implied_weights(
                torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.long), token_normalizer=4
            ),
            ValueError,
            "token_normalizer",
        ),
    ],
)
def test_bad_inputs_raise(call: Callable[[], Any], exc: type[Exception], needle: str) -> None:
    with pytest.raises(exc, match=needle):
        call()
