r"""Question weights: the closed forms omega(p) and the weights an estimator actually applied.

With binary rewards every method here maximises, per question q of accuracy p = p(q),

.. math::

    J = \frac{1}{G}\sum_q \omega(p_q)\,\big(\bar s^+_q - \bar s^-_q\big)

(arXiv 2505.12366, section 3; DESIGN.md sections 1-2), where the s are per-response scores
(the clipped ratio token means for the GRPO family, DisCO's scores for DisCO), so omega(p) is the
weight the method puts on a question as a function of its difficulty:

=========  ==============================  =====================================================
method     population omega(p)             what it computes with n responses, k = p n correct
=========  ==============================  =====================================================
grpo       sqrt(p (1 - p))                 p (1-p) / (sigma_n + eps),
                                           sigma_n = sqrt(n/(n-1) p (1-p)) (Bessel, verl / TRL)
dr_grpo    p (1 - p)                       p (1-p)
dapo       sqrt(p (1 - p))                 as grpo (same advantage); the token-level mean further
                                           weights each response by its length / mean length
disco      1                               1
disco_b    1                               1
drpo       1                               1; within the question, softmax(pref / lam) over its
                                           correct answers (arXiv 2510.04474)
=========  ==============================  =====================================================

(every weight is 0 at p = 0 and p = 1: no positive or no negative, no signal). Derivation for
the GRPO family: with advantages A_i and a mean over the B responses, the coefficient of the
score s_i in J is c_i = A_i / B. For binary rewards A is (1-p)/sigma on each of the k positives
and -p/sigma on each of the n-k negatives, so with G questions of n responses (B = G n)

    sum_{i in q} c_i s_i = (1/G) * p (1-p) / sigma * (mean_{P_q} s - mean_{N_q} s),

i.e. omega = p (1-p) / sigma: sqrt(p(1-p)) for the population std, the finite-n form above for
the std an implementation computes, p (1-p) for Dr. GRPO's sigma = 1. DAPO uses GRPO's advantage
(arXiv 2503.14476, eq. 9) with a token-level mean, so c_i = A_i |o_i| / sum_j |o_j|: with equal
lengths its omega is GRPO's; with unequal lengths long responses count more (pass ``lengths`` to
:func:`implied_weights`). With DAPO run without the std its omega is Dr. GRPO's, up to that same
length factor. DisCO's positive weights sum to 1/G per question whatever p is (DESIGN.md
section 2): omega = 1. So do DRPO's, whose preference (by default the length reward) only
moves weight between a question's correct answers: omega = 1.

The measured counterpart is :func:`implied_weights`: G times the positive mass of the
coefficients c_i per question. For DisCO's weights (``normalize="all"``) it is exactly 1 on
every question with signal.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args, overload

import torch
from torch import Tensor

from discoloss._checks import (
    check_batch,
    check_device,
    check_number,
    check_option,
    check_tensor,
    raise_if_failed,
)
from discoloss.objectives import dense_group_ids, positive_labels, reward_checks

__all__ = ["METHODS", "ImpliedWeights", "Method", "difficulty_weight", "implied_weights"]

#: The methods whose per-question weights the analysis computes.
Method = Literal["grpo", "dr_grpo", "dapo", "disco", "disco_b", "drpo"]
#: The values of :data:`Method`, in order.
METHODS: tuple[str, ...] = get_args(Method)
WeightKind = Literal["advantages", "weights"]
_KINDS: tuple[str, ...] = get_args(WeightKind)


def _finite_n(p: Tensor, method: str, n: int, std_unbiased: bool, eps: float) -> Tensor:
    """omega_n(p) at empirical accuracy p of a group of n responses."""
    q = p * (1.0 - p)
    signal = (p > 0) & (p < 1)
    if method in ("disco", "disco_b", "drpo"):
        w = torch.ones_like(p)
    elif method == "dr_grpo":
        w = q
    else:
        if n == 1:
            return torch.zeros_like(p)
        var = q * (n / (n - 1.0)) if std_unbiased else q
        sigma = var.clamp_min(0.0).sqrt()
        w = q / torch.where(signal, sigma + eps, 1.0)
    return torch.where(signal, w, 0.0)


def _population(p: Tensor, method: str) -> Tensor:
    q = p * (1.0 - p)
    signal = (p > 0) & (p < 1)
    if method in ("disco", "disco_b", "drpo"):
        w = torch.ones_like(p)
    elif method == "dr_grpo":
        w = q
    else:
        w = q.clamp_min(0.0).sqrt()
    return torch.where(signal, w, 0.0)


def _binomial_pmf(p: Tensor, n: int) -> Tensor:
    """(..., n+1) probabilities of k = 0..n correct answers out of n, in float64."""
    k = torch.arange(n + 1, dtype=torch.float64)
    log_c = torch.tensor(
        [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in range(n + 1)],
        dtype=torch.float64,
    )
    pp = p.unsqueeze(-1)
    # p^k (1-p)^(n-k), with 0^0 = 1 at the end points
    pk = torch.where(k == 0, 1.0, pp.pow(k))
    qk = torch.where(k == n, 1.0, (1.0 - pp).pow(n - k))
    return torch.exp(log_c) * pk * qk


@overload
def difficulty_weight(
    p: float,
    method: Method,
    *,
    n: int | None = ...,
    expected: bool = ...,
    std_unbiased: bool = ...,
    eps: float = ...,
) -> float: ...
@overload
def difficulty_weight(
    p: Tensor | Sequence[float],
    method: Method,
    *,
    n: int | None = ...,
    expected: bool = ...,
    std_unbiased: bool = ...,
    eps: float = ...,
) -> Tensor: ...
def difficulty_weight(
    p: float | Tensor | Sequence[float],
    method: Method,
    *,
    n: int | None = None,
    expected: bool = False,
    std_unbiased: bool = True,
    eps: float = 0.0,
) -> float | Tensor:
    r"""Closed-form weight :math:`\omega(p)` a method puts on a question of accuracy p.

    Three variants (see the module docstring for the derivation):

    * ``n=None``: the population formula of the paper (arXiv 2505.12366, section 3):
      :math:`\sqrt{p(1-p)}` (grpo, dapo), :math:`p(1-p)` (dr_grpo), 1 (disco, disco_b,
      drpo).
    * ``n`` given: what an implementation computes on a group of n responses whose empirical
      accuracy is p = k/n. For grpo / dapo the std is the sample std, so
      :math:`\omega_n(p) = p(1-p) / (\sqrt{\tfrac{n}{n-1}p(1-p)} + \mathrm{eps})`
      (``std_unbiased=False``: without the n/(n-1)). Dr. GRPO, DisCO and DRPO have no
      finite-n correction. This is exactly what :func:`implied_weights` measures on groups of n.
    * ``n`` given and ``expected=True``: p is the question's true accuracy and the weight is
      averaged over the k ~ Binomial(n, p) correct answers a group of n draws:
      :math:`\sum_k \binom{n}{k} p^k (1-p)^{n-k}\,\omega_n(k/n)`. This is the weight of the
      question in the expected gradient (given k, the mean positive and negative scores are
      unbiased), e.g. :math:`\tfrac{n-1}{n}p(1-p)` for Dr. GRPO and
      :math:`1 - p^n - (1-p)^n` for DisCO.

    Every variant is 0 at p = 0 and p = 1 (no signal).

    Args:
      p: accuracy in [0, 1]: a Python number or a tensor / sequence of them.
      method: ``"grpo"``, ``"dr_grpo"``, ``"dapo"``, ``"disco"``, ``"disco_b"`` or
        ``"drpo"``.
      n: group size (responses per question), >= 1, for the finite-n variants.
      expected: average over Binomial(n, p) group outcomes (needs ``n``).
      std_unbiased: Bessel-corrected std (verl, TRL) in the finite-n GRPO / DAPO weight.
      eps: the constant added to the std by the implementation (verl 1e-6, TRL 1e-4); >= 0.

    Returns:
      A float for a Python number, else a float64 tensor of the shape of ``p``.
    """
    check_option("method", method, METHODS)
    eps = check_number("eps", eps, non_negative=True)
    for name, flag in (("std_unbiased", std_unbiased), ("expected", expected)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"n must be a positive int (responses per question), got {n!r}")
    if expected and n is None:
        raise ValueError("expected=True needs the group size n")
    scalar = isinstance(p, (int, float)) and not isinstance(p, bool)
    if isinstance(p, bool):
        raise TypeError("p must be a number or a tensor of accuracies, got a bool")
    if isinstance(p, Tensor):
        if p.device.type == "meta":
            raise ValueError("p is on the meta device: difficulty_weight reads its values")
        if p.dtype == torch.bool or p.dtype.is_complex:
            raise TypeError(f"p must hold real accuracies, got dtype {p.dtype}")
        pt = p.detach().to(torch.float64)
    elif scalar:
        pt = torch.tensor(check_number("p", p, allow_inf=True), dtype=torch.float64)
    else:
        try:
            pt = torch.as_tensor(p, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise TypeError(
                f"p must be a number, a sequence of numbers or a tensor, got {p!r:.80}"
            ) from None
    if pt.is_complex() or not bool(torch.all((pt >= 0) & (pt <= 1))):
        raise ValueError("p must hold accuracies in [0, 1] (no nan)")
    if n is None:
        out = _population(pt, method)
    elif not expected:
        out = _finite_n(pt, method, n, std_unbiased, eps)
    else:
        ks = torch.arange(n + 1, dtype=torch.float64) / n
        per_k = _finite_n(ks, method, n, std_unbiased, eps)
        out = (_binomial_pmf(pt, n) * per_k).sum(-1)
    return float(out) if scalar else out


class ImpliedWeights(NamedTuple):
    """Per-question view of the per-response weights an estimator produced (Q questions).

    group_ids: (Q,) the group id of each question, ascending.
    weight: (Q,) omega_q = G * sum of the positive coefficients of the question's responses
      (G = number of questions in the batch); 1 for DisCO, ~sqrt(p(1-p)) for GRPO.
    negative_weight: (Q,) ``G * |sum of the negative coefficients|``. Equal to ``weight`` for every
      method whose per-question coefficients sum to 0 (GRPO family with equal lengths, DisCO).
    accuracy: (Q,) share of the question's responses with reward > threshold.
    size: (Q,) number of responses (int64).
    """

    group_ids: Tensor
    weight: Tensor
    negative_weight: Tensor
    accuracy: Tensor
    size: Tensor


def implied_weights(
    advantages: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    kind: WeightKind = "advantages",
    lengths: Tensor | None = None,
    token_normalizer: float | None = None,
    threshold: float = 0.5,
) -> ImpliedWeights:
    r"""Measure the weight an estimator put on each question of a batch.

    Every method's objective is linear in per-response scores, :math:`J = \sum_i c_i s_i`. The
    weight of question q is :math:`\omega_q = G \sum_{i\in q} [c_i]_+` with G the number of
    questions of the batch (the normalisation of DESIGN.md section 2, where DisCO's positive
    weights sum to 1/G per question), and the coefficients are

    * ``kind="advantages"``: per-response advantages of a loss that averages over the B
      responses (GRPO's sequence mean): :math:`c_i = A_i / B`. With ``lengths`` the loss is a
      token-level one: :math:`c_i = A_i\,|o_i| / (B\,\ell)` with :math:`\ell` =
      ``token_normalizer``, by default the mean length (DAPO's token mean); Dr. GRPO's constant
      normaliser is ``token_normalizer=max_tokens``.
    * ``kind="weights"``: the coefficients themselves, e.g. DisCO's discriminative weights
      :math:`\partial J/\partial s_i`, or minus the per-response sum of a loss gradient taken
      at theta = theta_old.

    On GRPO advantages of groups of n this gives :func:`difficulty_weight` (``n=n``) at each
    question's empirical accuracy, on DisCO weights 1 for every question with signal.

    The number of questions is data dependent: this reads it from the device (analysis code,
    not for the training loop).

    Args:
      advantages: (B,) advantages or weights (real).
      rewards: (B,) rewards; accuracy counts reward > ``threshold``.
      group_ids: (B,) integer group ids (any order, any values, ragged groups).
      kind: ``"advantages"`` or ``"weights"`` (see above).
      lengths: optional (B,) response lengths (token counts), ``kind="advantages"`` only.
      token_normalizer: the per-response token normaliser with ``lengths`` (> 0).
      threshold: reward threshold of a correct answer.

    Returns:
      :class:`ImpliedWeights`, float64 tensors (size int64) on the inputs' device.
    """
    check_option("kind", kind, _KINDS)
    threshold = check_number("threshold", threshold)
    check_tensor("advantages", advantages, ndim=1, kind="real")
    check_tensor("rewards", rewards, ndim=1, kind="real")
    check_tensor("group_ids", group_ids, ndim=1, kind="int")
    names = ["advantages", "rewards", "group_ids"]
    tensors = [advantages, rewards, group_ids]
    if lengths is not None:
        if kind != "advantages":
            raise ValueError("lengths applies to kind='advantages' (a token-level aggregation)")
        check_tensor("lengths", lengths, ndim=1, kind="real")
        names.append("lengths")
        tensors.append(lengths)
    elif token_normalizer is not None:
        raise ValueError("token_normalizer needs lengths")
    check_batch(names, tensors)
    check_device(names, tensors)
    if advantages.device.type == "meta":
        raise ValueError("advantages is on the meta device: implied_weights reads its values")
    checks = reward_checks(rewards)
    a = advantages.detach().to(torch.float64)
    checks.append((a.isfinite().all(), lambda: "advantages: every value must be finite"))
    raise_if_failed(checks)

    b = a.shape[0]
    if kind == "advantages":
        c = a / b
        if lengths is not None:
            lens = lengths.detach().to(torch.float64)
            if not bool((lens.isfinite() & (lens >= 0)).all()):
                raise ValueError("lengths must be finite and >= 0")
            if token_normalizer is None:
                norm = lens.mean()
                if not bool(norm > 0):
                    raise ValueError("lengths are all 0: no token to normalise by")
            else:
                norm = torch.tensor(
                    check_number("token_normalizer", token_normalizer, positive=True),
                    dtype=torch.float64,
                )
            c = c * lens / norm
    else:
        c = a

    index = dense_group_ids(group_ids)
    q = int(index.num_groups)
    d = index.dense
    zeros = torch.zeros(b, dtype=torch.float64, device=a.device)
    pos = zeros.index_add(0, d, c.clamp_min(0.0))[:q] * q
    neg = zeros.index_add(0, d, (-c).clamp_min(0.0))[:q] * q
    size = torch.zeros(b, dtype=torch.int64, device=a.device).index_add(0, d, torch.ones_like(d))[
        :q
    ]
    correct = zeros.index_add(0, d, positive_labels(rewards, threshold).to(torch.float64))[:q]
    ids = torch.empty_like(group_ids).scatter_(0, d, group_ids)[:q]
    return ImpliedWeights(ids, pos, neg, correct / size.to(torch.float64), size)
