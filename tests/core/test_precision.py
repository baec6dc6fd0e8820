"""Half-precision inputs (bfloat16, float16) against float32.

Tolerances, with u the unit roundoff of the half dtype (bf16 2^-8, fp16 2^-11):

1. Same values: the half inputs cast to float32 and run in float32. Everything is reduced in
   float32 either way, so values agree to float32 accuracy: rtol 1e-5, atol 1e-6. The gradient
   is returned in the half dtype, i.e. rounded once: rtol u (plus atol 1e-7 near zero).

2. Original values: the float32 inputs before rounding to the half dtype. Rounding perturbs each
   input by at most u * L (L = max |log-prob| over response tokens), so
     - scores: |ds| <= u L (log_likelihood), <= 2 u L R (likelihood_ratio, R = max ratio);
     - J: |dJ| <= sum_i |w_i| max|ds| <= 2 max|ds| (the |w| sum to at most 2);
     - KL: <= 2 u L (k1), <= 2 u L (R + 1) (k3); penalty: <= beta (kl - delta)_+ |dKL| + ...
   We allow twice the bound, 2 (2 |ds| + (1 + beta max(kl, 0)) |dKL|), on every value. Per
   token gradients, w_i / |o_i| * (ratio or 1) plus the penalty term, move by the same relative
   amounts plus the softmax sensitivity 2 |ds| / tau of the DisCO weights and one final rounding:
   rtol = 4 u L (R + 1) (1 + 1 / tau) + u, times max |grad| as atol.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import KL_ESTIMATORS, OBJECTIVES, SCORES, UNIT_ROUNDOFF, Batch, random_batch

from discoloss import disco_loss

HALF = [torch.bfloat16, torch.float16]
NAMES = ("loss", "objective", "kl", "penalty")


def run(batch: Batch, **options) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    leaf = batch.leaf()
    out = disco_loss(*leaf.args(), **options)
    out.loss.backward()
    values = {n: getattr(out, n).detach().double() for n in NAMES}
    for n, v in values.items():
        assert torch.isfinite(v), n
    g = leaf.log_probs.grad
    assert g is not None and g.dtype == batch.log_probs.dtype
    assert torch.equal(g[~batch.bmask], torch.zeros_like(g[~batch.bmask]))
    return values, g.double()


OPTION_GRID = [
    {"score": s, "objective": o, "kl_estimator": k}
    for s in SCORES
    for o in OBJECTIVES
    for k in KL_ESTIMATORS
]


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("opts", OPTION_GRID, ids=lambda o: "-".join(o.values()))
def test_half_matches_float32_on_the_same_values(dtype, opts):
    u = UNIT_ROUNDOFF[dtype]
    batch = random_batch(31, shift=0.05, dtype=torch.float32, garbage=True)
    half = batch.to(dtype)
    options = dict(tau=0.5, delta=1e-3, beta=2.0, **opts)
    v_half, g_half = run(half, **options)
    v_32, g_32 = run(half.to(torch.float32), **options)
    for n in NAMES:
        torch.testing.assert_close(
            v_half[n], v_32[n], rtol=1e-5, atol=1e-6, msg=lambda m, _n=n: f"{_n}: {m}"
        )
    torch.testing.assert_close(g_half, g_32, rtol=u, atol=1e-7)


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("opts", OPTION_GRID, ids=lambda o: "-".join(o.values()))
def test_half_within_rounding_bound_of_float32(dtype, opts):
    u = UNIT_ROUNDOFF[dtype]
    tau, beta, delta = 0.5, 2.0, 1e-3
    batch = random_batch(32, shift=0.05, dtype=torch.float32, garbage=True)
    options = dict(tau=tau, delta=delta, beta=beta, **opts)
    v_half, g_half = run(batch.to(dtype), **options)
    v_32, g_32 = run(batch, **options)

    m = batch.bmask
    lp, old = batch.log_probs[m].double(), batch.old_log_probs[m].double()
    L = float(torch.maximum(lp.abs().max(), old.abs().max()))
    R = float(torch.exp(lp - old).max()) * math.exp(2 * u * L)
    kl = max(float(v_32["kl"]), 0.0)
    ds = u * L if opts["score"] == "log_likelihood" else 2 * u * L * R
    dkl = 2 * u * L if opts["kl_estimator"] == "k1" else 2 * u * L * (R + 1)
    atol = 2 * (2 * ds + (1 + beta * kl) * dkl)
    for n in NAMES:
        torch.testing.assert_close(
            v_half[n], v_32[n], rtol=0.0, atol=atol, msg=lambda m, _n=n: f"{_n}: {m}"
        )
    rtol = 4 * u * L * (R + 1) * (1 + 1 / tau) + u
    torch.testing.assert_close(g_half, g_32, rtol=rtol, atol=rtol * float(g_32.abs().max()))
