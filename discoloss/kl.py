"""KL estimators and the squared-hinge constraint penalty of DisCO.

DisCO maximises J(theta) subject to KL(pi_old || pi_theta) <= delta (arXiv 2505.12366,
eq. 9), with the KL estimated as a token mean over all response tokens of the batch::

    k1 = log pi_old - log pi_theta
    k3 = rho - 1 - log rho,          rho = pi_theta / pi_old

and enforced by the squared-hinge penalty (beta / 2) * max(KL - delta, 0)^2, whose gradient
beta * max(KL - delta, 0) * grad KL is what the published code applies.
"""

from __future__ import annotations

import torch
from torch import Tensor

from discoloss._checks import (
    check_in_dtype_range,
    check_number,
    check_option,
    dtype_name,
    float64_hint,
    raise_if_failed,
)
from discoloss._types import KL_ESTIMATORS, KLEstimator
from discoloss.scores import TokenSums, check_token_inputs, token_sums

__all__ = ["kl_divergence", "squared_hinge_penalty"]


def kl_row_sums(sums: TokenSums, estimator: str) -> Tensor:
    """(B,) per-response sums of the per-token KL estimate."""
    if estimator == "k1":
        return sums.old_log_prob - sums.log_prob
    assert sums.expm1_log_ratio is not None
    # k3 = (rho - 1) - log rho; expm1 keeps the first term accurate when rho is close to 1.
    return sums.expm1_log_ratio - (sums.log_prob - sums.old_log_prob)


def kl_divergence(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    *,
    estimator: KLEstimator = "k1",
    validate: bool = True,
) -> Tensor:
    r"""Token-mean estimate of KL(pi_old || pi_theta) over all response tokens of the batch.

    .. math::

        \widehat{KL} = \frac{\sum_{i,t} m_{it}\, k(\log\pi_\theta - \log\pi_{old})_{it}}
                            {\sum_{i,t} m_{it}},\qquad
        k_1(x) = -x,\quad k_3(x) = e^{x} - 1 - x

    Args:
      log_probs: (B, T) current-policy token log-probs (differentiable).
      old_log_probs: (B, T) sampling-policy token log-probs (not differentiated).
      mask: (B, T) bool or 0/1, True at response tokens.
      estimator: ``"k1"`` (unbiased, can be negative) or ``"k3"`` (unbiased, non-negative).
      validate: check values (one host sync).

    Returns:
      0-d tensor (float32, or float64 for float64 inputs).
    """
    check_option("estimator", estimator, KL_ESTIMATORS)
    log_probs, old_log_probs, mask = check_token_inputs(log_probs, old_log_probs, mask)
    sums, checks = token_sums(
        log_probs, old_log_probs, mask, need_ratio=estimator == "k3", validate=validate
    )
    kl = kl_row_sums(sums, estimator).sum() / sums.lengths.sum().clamp_min(1.0)
    if validate:
        checks.append(
            (
                kl.detach().isfinite(),
                lambda: (
                    f"kl: not finite in {dtype_name(kl.dtype)}: log_probs and "
                    f"old_log_probs are too far apart for it{float64_hint(kl.dtype)}"
                ),
            )
        )
    raise_if_failed(checks)
    return kl


def squared_hinge_penalty(kl: Tensor, *, delta: float, beta: float) -> Tensor:
    r"""DisCO's constraint penalty :math:`\frac{\beta}{2}\,[\mathrm{KL} - \delta]_+^2`.

    Its gradient, :math:`\beta\,[\mathrm{KL}-\delta]_+\,\nabla\mathrm{KL}`, equals the published
    code's ``max(beta * (kl - delta), 0).detach() * kl`` surrogate, so the published
    hyper-parameters (delta = 1e-4, beta = 1e3) carry over; unlike that surrogate, the value is the
    penalty itself.

    Args:
      kl: tensor of any shape (usually 0-d).
      delta: constraint radius, >= 0.
      beta: penalty strength, >= 0.
    """
    if not isinstance(kl, Tensor):
        raise TypeError(f"kl must be a torch.Tensor, got {type(kl).__name__}")
    if kl.dtype.is_complex:
        raise TypeError(f"kl must be a real tensor, got dtype {kl.dtype}")
    delta = check_number("delta", delta, non_negative=True)
    beta = check_number("beta", beta, non_negative=True)
    dtype = kl.dtype if kl.dtype.is_floating_point else torch.get_default_dtype()
    check_in_dtype_range(
        "beta", beta, dtype, 0.0, torch.finfo(dtype).max, "the penalty scales by beta"
    )
    excess = torch.clamp(kl - delta, min=0.0)
    return 0.5 * beta * excess * excess
