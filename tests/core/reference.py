"""Naive float64 reference of the DisCO loss, written from the formulas (DESIGN.md sections 1-2).

Deliberately simple: Python loops over groups, responses and tokens; float64 throughout; no
grouping tricks, no custom autograd, no masking by multiplication. It never imports discoloss.
Torch is used only for float64 arithmetic and for autograd (the reference gradient wrt the
log-probs is the autograd gradient of this naive computation).

Formulas (per question q with positives P_q = {i : r_i > threshold} and negatives N_q)::

    s_ll(o) = (1/|o|) sum_t log pi(o_t)             s_lr(o) = (1/|o|) sum_t exp(lp_t - old_t)
    DisCO-b:  J_q = mean_{P_q} s - mean_{N_q} s
    DisCO:    J_q = mean_{P_q} s - tau * log(mean_{N_q} exp(s / tau))
    DRPO:     J_q = E_{o ~ P*_q}[s] - tau * log(mean_{N_q} exp(s / tau))      (arXiv 2510.04474)
              P*_q = argmax_P E_P[pref] - lam KL(P || pi_old(. | q, correct))
                   ∝ pi_old(o | q, correct) exp(pref(o) / lam); with the sampled positives as
              the sample of pi_old(. | q, correct), the self-normalised importance weights
              P*/pi_old give E_{P*}[s] ~ sum_{P_q} exp(pref_i/lam) s_i / sum_{P_q} exp(pref_k/lam)
              pref(o) = 1 - |o| / max_length (the paper's length reward), or given
    J = sum_{q with P_q and N_q non-empty} J_q / G   (G = all questions, or those with signal)
    KL = sum_{i,t in response} k(lp - old) / #response tokens, k1(x) = -x, k3(x) = e^x - 1 - x
    penalty = beta/2 * max(KL - delta, 0)^2,  loss = -J + penalty
    w_i = dJ/ds_i: +1/(|P_q| G), -1/(|N_q| G) (DisCO-b), -softmax_{N_q}(s/tau)_j / G (DisCO)
          DRPO: exp(pref_i/lam) / (sum_{P_q} exp(pref_k/lam) G) on positives, DisCO's otherwise
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

F64 = torch.float64


def response_positions(mask_row: Sequence[bool]) -> list[int]:
    """Token positions of a response: a plain loop over the row."""
    positions = []
    for t, m in enumerate(mask_row):
        if m:
            positions.append(t)
    return positions


def ref_scores(
    log_probs: Tensor, old_log_probs: Tensor, mask: Sequence[Sequence[bool]], score: str
) -> Tensor:
    """(B,) float64 scores; differentiable wrt ``log_probs`` (a float64 leaf)."""
    out = []
    for i, row in enumerate(mask):
        pos = response_positions(row)
        idx = torch.tensor(pos, dtype=torch.long)
        lp = log_probs[i].index_select(0, idx)
        if score == "log_likelihood":
            out.append(lp.sum() / len(pos))
        elif score == "likelihood_ratio":
            old = old_log_probs[i].index_select(0, idx).detach()
            out.append(torch.exp(lp - old).sum() / len(pos))
        else:
            raise AssertionError(score)
    return torch.stack(out)


def ref_kl(
    log_probs: Tensor, old_log_probs: Tensor, mask: Sequence[Sequence[bool]], estimator: str
) -> Tensor:
    total = torch.zeros((), dtype=F64)
    count = 0
    for i, row in enumerate(mask):
        pos = response_positions(row)
        idx = torch.tensor(pos, dtype=torch.long)
        x = log_probs[i].index_select(0, idx) - old_log_probs[i].index_select(0, idx).detach()
        if estimator == "k1":
            total = total + (-x).sum()
        elif estimator == "k3":
            total = total + (torch.exp(x) - 1.0 - x).sum()
        else:
            raise AssertionError(estimator)
        count += len(pos)
    return total / count


def ref_penalty(kl: Tensor, delta: float, beta: float) -> Tensor:
    excess = kl - delta
    if float(excess.detach()) <= 0.0:
        return kl * 0.0
    return 0.5 * beta * excess**2


@dataclass
class Groups:
    """Responses of each question, in first-appearance order, split by label."""

    order: list[int] = field(default_factory=list)
    pos: dict[int, list[int]] = field(default_factory=dict)
    neg: dict[int, list[int]] = field(default_factory=dict)

    def has_signal(self, g: int) -> bool:
        return len(self.pos[g]) > 0 and len(self.neg[g]) > 0


def ref_groups(rewards: Sequence[float], group_ids: Sequence[int], threshold: float) -> Groups:
    groups = Groups()
    for i, (r, g) in enumerate(zip(rewards, group_ids)):
        if g not in groups.pos:
            groups.order.append(g)
            groups.pos[g] = []
            groups.neg[g] = []
        if r > threshold:
            groups.pos[g].append(i)
        else:
            groups.neg[g].append(i)
    return groups


def ref_denominator(groups: Groups, normalize: str) -> int:
    if normalize == "all":
        return len(groups.order)
    if normalize == "valid":
        return sum(1 for g in groups.order if groups.has_signal(g))
    raise AssertionError(normalize)


def drpo_positive_weights(
    pos: Sequence[int], preferences: Sequence[float], lam: float
) -> dict[int, float]:
    """Self-normalised importance weights of the optimized positive distribution over the
    sampled positives: exp(pref_i / lam) / sum_k exp(pref_k / lam), in plain Python floats.
    A common factor exp(-max pref / lam) is taken out of numerator and denominator (exact
    algebra), the preferences shifted before the division, so that neither a small lam nor
    large preferences overflow (every exponent is <= 0)."""
    top = max(preferences[i] for i in pos)
    e = {i: math.exp((preferences[i] - top) / lam) for i in pos}
    z = sum(e.values())
    return {i: e[i] / z for i in pos}


def ref_length_preferences(mask: Sequence[Sequence[bool]], max_length: int) -> list[float]:
    """The paper's length reward 1 - |o| / max_length, |o| counted by a loop over the mask."""
    return [1.0 - len(response_positions(row)) / max_length for row in mask]


def log_mean_exp(x: Tensor) -> Tensor:
    """log(mean(exp(x))) = m + log(1 + mean(exp(x - m) - 1)), m = max(x).

    The shift makes it computable for any finite x; expm1/log1p keep it accurate when all x are
    nearly equal (x = s / tau with a huge tau), where exp(x - m) would round to 1.
    """
    m = x.detach().max()
    return m + torch.log1p(torch.expm1(x - m).sum() / x.numel())


def ref_objective(
    scores: Tensor,
    rewards: Sequence[float],
    group_ids: Sequence[int],
    *,
    objective: str,
    tau: float,
    threshold: float,
    normalize: str,
    lam: float = 0.1,
    preferences: Sequence[float] | None = None,
) -> Tensor:
    groups = ref_groups(rewards, group_ids, threshold)
    total = scores.sum() * 0.0
    for g in groups.order:
        if not groups.has_signal(g):
            continue
        sp = scores[groups.pos[g]]
        sn = scores[groups.neg[g]]
        if objective == "disco_b":
            total = total + sp.mean() - sn.mean()
        elif objective == "disco":
            total = total + sp.mean() - tau * log_mean_exp(sn / tau)
        elif objective == "drpo":
            assert preferences is not None
            v = drpo_positive_weights(groups.pos[g], preferences, lam)
            expected_pos = sum(v[i] * scores[i] for i in groups.pos[g])
            total = total + expected_pos - tau * log_mean_exp(sn / tau)
        else:
            raise AssertionError(objective)
    denom = ref_denominator(groups, normalize)
    return total / max(denom, 1)


def ref_weights(
    scores: Sequence[float],
    rewards: Sequence[float],
    group_ids: Sequence[int],
    *,
    objective: str,
    tau: float,
    threshold: float,
    normalize: str,
    lam: float = 0.1,
    preferences: Sequence[float] | None = None,
) -> list[float]:
    """Closed-form dJ/ds (DESIGN.md section 2), in plain Python floats."""
    groups = ref_groups(rewards, group_ids, threshold)
    G = max(ref_denominator(groups, normalize), 1)
    w = [0.0] * len(scores)
    for g in groups.order:
        if not groups.has_signal(g):
            continue
        if objective == "drpo":
            assert preferences is not None
            v = drpo_positive_weights(groups.pos[g], preferences, lam)
            for i in groups.pos[g]:
                w[i] = v[i] / G
        else:
            for i in groups.pos[g]:
                w[i] = 1.0 / (len(groups.pos[g]) * G)
        neg = groups.neg[g]
        if objective == "disco_b":
            for j in neg:
                w[j] = -1.0 / (len(neg) * G)
        else:
            m = max(scores[j] / tau for j in neg)
            e = {j: math.exp(scores[j] / tau - m) for j in neg}
            z = sum(e.values())
            for j in neg:
                w[j] = -e[j] / z / G
    return w


def ref_effective_negatives(
    scores: Sequence[float],
    rewards: Sequence[float],
    group_ids: Sequence[int],
    *,
    objective: str,
    tau: float,
    threshold: float,
) -> float:
    """Mean over groups with signal of 1 / sum_j q_j^2 (q: normalised weights on negatives;
    DisCO-b's are uniform, DisCO's and DRPO's the softmax of s / tau)."""
    groups = ref_groups(rewards, group_ids, threshold)
    vals = []
    for g in groups.order:
        if not groups.has_signal(g):
            continue
        neg = groups.neg[g]
        if objective == "disco_b":
            q = [1.0 / len(neg)] * len(neg)
        else:
            m = max(scores[j] / tau for j in neg)
            e = [math.exp(scores[j] / tau - m) for j in neg]
            q = [x / sum(e) for x in e]
        vals.append(1.0 / sum(x * x for x in q))
    return sum(vals) / len(vals) if vals else 0.0


def ref_effective_positives(
    rewards: Sequence[float],
    group_ids: Sequence[int],
    *,
    objective: str,
    threshold: float,
    lam: float,
    preferences: Sequence[float] | None,
) -> float:
    """Mean over groups with signal of 1 / sum_i v_i^2 over the positives (|P_q| unless DRPO)."""
    groups = ref_groups(rewards, group_ids, threshold)
    vals = []
    for g in groups.order:
        if not groups.has_signal(g):
            continue
        pos = groups.pos[g]
        if objective == "drpo":
            assert preferences is not None
            v = list(drpo_positive_weights(pos, preferences, lam).values())
        else:
            v = [1.0 / len(pos)] * len(pos)
        vals.append(1.0 / sum(x * x for x in v))
    return sum(vals) / len(vals) if vals else 0.0


@dataclass
class RefResult:
    loss: Tensor
    objective: Tensor
    kl: Tensor
    penalty: Tensor
    scores: Tensor
    grad: Tensor  # d loss / d log_probs, (B, T) float64
    metrics: dict[str, float]


def ref_disco(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    score: str = "log_likelihood",
    objective: str = "disco",
    tau: float | None = None,
    delta: float = 1e-4,
    beta: float = 1e3,
    kl_estimator: str = "k1",
    threshold: float = 0.5,
    normalize: str = "all",
    lam: float = 0.1,
    max_length: int | None = None,
    preferences: Tensor | None = None,
) -> RefResult:
    """The full loss in float64 from any-dtype inputs, with its autograd gradient. DRPO's
    preferences: given, else the length reward with ``max_length``."""
    if tau is None:
        tau = 10.0 if score == "log_likelihood" else 1.0
    lp = log_probs.detach().to(F64).clone().requires_grad_(True)
    old = old_log_probs.detach().to(F64)
    m = [[bool(v != 0) for v in row] for row in mask.tolist()]
    r = [float(v) for v in rewards.tolist()]
    g = [int(v) for v in group_ids.tolist()]

    if preferences is not None:
        prefs: list[float] | None = [float(v) for v in preferences.tolist()]
    elif objective == "drpo":
        assert max_length is not None
        prefs = ref_length_preferences(m, max_length)
    else:
        prefs = None

    scores = ref_scores(lp, old, m, score)
    j = ref_objective(
        scores, r, g, objective=objective, tau=tau, threshold=threshold, normalize=normalize,
        lam=lam, preferences=prefs,
    )  # fmt: skip
    kl = ref_kl(lp, old, m, kl_estimator)
    pen = ref_penalty(kl, delta, beta)
    loss = -j + pen
    (grad,) = torch.autograd.grad(loss, lp)

    s = [float(v) for v in scores.detach()]
    groups = ref_groups(r, g, threshold)
    pos = [s[i] for i in range(len(s)) if r[i] > threshold]
    neg = [s[i] for i in range(len(s)) if not r[i] > threshold]
    metrics = {
        "num_groups": float(len(groups.order)),
        "groups_with_signal": float(sum(groups.has_signal(q) for q in groups.order)),
        "frac_positive": len(pos) / len(s),
        "mean_pos_score": sum(pos) / len(pos) if pos else math.nan,
        "mean_neg_score": sum(neg) / len(neg) if neg else math.nan,
        "constraint_active": 1.0 if float(kl.detach()) > delta else 0.0,
        "effective_negatives": ref_effective_negatives(
            s, r, g, objective=objective, tau=tau, threshold=threshold
        ),
        "effective_positives": ref_effective_positives(
            r, g, objective=objective, threshold=threshold, lam=lam, preferences=prefs
        ),
        "mean_response_length": sum(len(response_positions(row)) for row in m) / len(m),
    }
    return RefResult(
        loss=loss.detach(),
        objective=j.detach(),
        kl=kl.detach(),
        penalty=pen.detach(),
        scores=scores.detach(),
        grad=grad,
        metrics=metrics,
    )


# --------------------------------------------------------------------------------------------
# Every variant, pieces of a batch, accumulation, baselines and analysis (the fuzz suite,
# test_fuzz.py). Same rules: float64, plain loops, formulas as the papers and the docstrings
# state them. Written so that they stay finite wherever the true value is finite: a clipped
# ratio is the constant it is clipped to (never exp of a huge log-ratio), the log-mean-exp is
# shifted, the logistic loss is split at 0.
# --------------------------------------------------------------------------------------------


def ref_token_scores(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Sequence[Sequence[bool]],
    score: str,
    positive: Sequence[bool] | None = None,
    clip_eps: float = 0.2,
) -> Tensor:
    """(B,) float64 scores of any kind (log_likelihood, likelihood_ratio, clipped_ratio),
    differentiable wrt ``log_probs``. The clipped ratio per token, for rho = exp(lp - old):
    min(rho, 1 + eps) for a positive response, max(rho, 1 - eps) for a negative one."""
    if score != "clipped_ratio":
        return ref_scores(log_probs, old_log_probs, mask, score)
    assert positive is not None
    out = []
    for i, row in enumerate(mask):
        terms = []
        for t in response_positions(row):
            x = log_probs[i, t] - old_log_probs[i, t].detach()
            if positive[i] and float(x.detach()) >= math.log1p(clip_eps):
                terms.append(x * 0.0 + (1.0 + clip_eps))  # clipped: constant
            elif not positive[i] and float(x.detach()) <= math.log1p(-clip_eps):
                terms.append(x * 0.0 + (1.0 - clip_eps))
            else:
                terms.append(torch.exp(x))
        out.append(torch.stack(terms).sum() / len(terms))
    return torch.stack(out)


def ref_kl_sums(
    log_probs: Tensor, old_log_probs: Tensor, mask: Sequence[Sequence[bool]], estimator: str
) -> Tensor:
    """(B,) per-response sums of the per-token KL estimate (k1 or k3)."""
    out = []
    for i, row in enumerate(mask):
        total = log_probs.new_zeros(())
        for t in response_positions(row):
            x = log_probs[i, t] - old_log_probs[i, t].detach()
            total = total + (-x if estimator == "k1" else torch.expm1(x) - x)
        out.append(total)
    return torch.stack(out)


def _lme(x: list[Tensor], tau: float) -> Tensor:
    """tau * log(mean_j exp(x_j / tau)) = m + tau * log(1 + mean_j expm1((x_j - m) / tau)),
    m = max x: shifted before the division, so that neither a tiny tau nor a huge spread of
    the x overflows (finite for any finite x)."""
    s = torch.stack(x)
    m = s.detach().max()
    return m + tau * torch.log1p(torch.expm1((s - m) / tau).sum() / s.numel())


def _softplus_t(d: Tensor, tau: float) -> Tensor:
    """tau * log(1 + exp(-d / tau)), evaluated on the side where exp cannot overflow:
    -d + tau * log(1 + exp(d / tau)) for d < 0 (both smooth at 0, where the first is used)."""
    if float(d.detach()) >= 0.0:
        return tau * torch.log1p(torch.exp(-d / tau))
    return -d + tau * torch.log1p(torch.exp(d / tau))


def ref_group_term(
    pos: list[Tensor],
    neg: list[Tensor],
    objective: str,
    tau: float,
    alpha: float,
    margin: float,
    pos_weights: Sequence[float] | None = None,
) -> Tensor:
    """J_q of one question with both positives and negatives (``pos_weights``: DRPO's v of
    the positives, in their order)."""
    mean_pos = torch.stack(pos).mean()
    if objective == "disco":
        return mean_pos - _lme(neg, tau)
    if objective == "drpo":
        assert pos_weights is not None
        return sum((v * p for v, p in zip(pos_weights, pos)), pos[0] * 0.0) - _lme(neg, tau)
    if objective == "disco_b":
        return mean_pos - torch.stack(neg).mean()
    if objective == "disco_2way":
        return _lme([-p for p in pos], tau) * -1.0 - _lme(neg, tau)
    if objective == "cvar":
        # CVaR_alpha of the negatives: the mean of their highest alpha-fraction, k = alpha n of
        # them, the (floor(k)+1)-th with weight k - floor(k). Ties are broken by position (the
        # gradient at a tie is then one of CVaR's subgradients, as any order gives).
        k = alpha * len(neg)
        order = sorted(range(len(neg)), key=lambda i: (-float(neg[i].detach()), i))
        total = neg[0] * 0.0
        for rank, i in enumerate(order):
            total = total + min(max(k - rank, 0.0), 1.0) * neg[i]
        return mean_pos - total / k
    pairs = [(p, q) for p in pos for q in neg]
    if objective == "auc_sq_hinge":
        losses = [torch.clamp(margin - (p - q), min=0.0) ** 2 for p, q in pairs]
    elif objective == "auc_logistic":
        losses = [_softplus_t(p - q, tau) for p, q in pairs]
    else:
        raise AssertionError(objective)
    return -torch.stack(losses).sum() / len(pairs)


def ref_objective_any(
    scores: Tensor,
    rewards: Sequence[float],
    group_ids: Sequence[int],
    *,
    objective: str,
    tau: float,
    threshold: float,
    normalize: str,
    cvar_alpha: float = 0.5,
    margin: float = 1.0,
    num_groups: float | None = None,
    lam: float = 0.1,
    preferences: Sequence[float] | None = None,
) -> Tensor:
    """J for every objective; ``num_groups`` replaces the denominator (a piece of a batch).
    ``lam``, ``preferences``: DRPO's (one preference per response)."""
    groups = ref_groups(rewards, group_ids, threshold)
    total = scores.sum() * 0.0
    for g in groups.order:
        if groups.has_signal(g):
            pos = [scores[i] for i in groups.pos[g]]
            neg = [scores[j] for j in groups.neg[g]]
            v = None
            if objective == "drpo":
                assert preferences is not None
                vs = drpo_positive_weights(groups.pos[g], preferences, lam)
                v = [vs[i] for i in groups.pos[g]]
            total = total + ref_group_term(pos, neg, objective, tau, cvar_alpha, margin, v)
    denom = ref_denominator(groups, normalize) if num_groups is None else num_groups
    return total / max(denom, 1)


def ref_constraint_penalty(
    kl: Tensor, constraint: str, delta: float, beta: float, multiplier: float = 0.0
) -> Tensor:
    """P(KL) of every constraint (the table of discoloss.constraints); ``multiplier``: the
    Lagrange multiplier's value."""
    excess = torch.clamp(kl - delta, min=0.0)
    if constraint == "squared_hinge":
        return 0.5 * beta * excess * excess
    if constraint == "hinge":
        return beta * excess
    if constraint == "kl_penalty":
        return beta * kl
    if constraint == "lagrangian":
        return multiplier * (kl - delta)
    if constraint == "none":
        return kl * 0.0
    raise AssertionError(constraint)


def ref_constraint_slope(
    kl: float, constraint: str, delta: float, beta: float, multiplier: float = 0.0
) -> float:
    """dP/dKL."""
    if constraint == "squared_hinge":
        return beta * max(kl - delta, 0.0)
    if constraint == "hinge":
        return beta if kl > delta else 0.0
    if constraint == "kl_penalty":
        return beta
    if constraint == "lagrangian":
        return multiplier
    return 0.0


@dataclass
class RefLoss:
    """Reference values of a DisCO loss call (float64), its gradient wrt log_probs and the
    intermediate magnitudes the fuzz suite's tolerances need."""

    loss: Tensor
    objective: Tensor
    kl: Tensor
    penalty: Tensor
    scores: Tensor
    kl_sums: Tensor
    lengths: list[int]
    grad: Tensor
    positive: list[bool]
    groups: Groups


def ref_disco_any(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    *,
    score: str = "log_likelihood",
    objective: str = "disco",
    tau: float | None = None,
    delta: float = 1e-4,
    beta: float = 1e3,
    kl_estimator: str = "k1",
    threshold: float = 0.5,
    normalize: str = "all",
    constraint: str = "squared_hinge",
    multiplier: float = 0.0,
    cvar_alpha: float = 0.5,
    margin: float = 1.0,
    clip_eps: float = 0.2,
    lam: float = 0.1,
    max_length: int | None = None,
    preferences: Tensor | None = None,
    num_groups: float | None = None,
    num_tokens: float | None = None,
) -> RefLoss:
    """disco_loss for every option, from any-dtype inputs (cast to float64). ``multiplier``:
    the Lagrange multiplier's value; ``lam``, ``max_length``, ``preferences``: DRPO's (the
    preferences given, else the length reward 1 - |o| / max_length counted from the mask).

    With ``num_tokens`` (a piece of a larger batch of N tokens): kl = sum_i k_i / N and
    penalty = (n / N) * P(sum_i k_i / n), n the piece's own tokens.
    """
    if tau is None:
        tau = 10.0 if score == "log_likelihood" else 1.0
    lp = log_probs.detach().to(F64).clone().requires_grad_(True)
    old = old_log_probs.detach().to(F64)
    m = [[bool(v != 0) for v in row] for row in mask.tolist()]
    r = [float(v) for v in rewards.double().tolist()]
    g = [int(v) for v in group_ids.tolist()]
    positive = [v > threshold for v in r]
    scores = ref_token_scores(lp, old, m, score, positive, clip_eps)
    prefs: list[float] | None = None
    if preferences is not None:
        prefs = [float(v) for v in preferences.double().tolist()]
    elif objective == "drpo":
        assert max_length is not None
        prefs = ref_length_preferences(m, max_length)
    j = ref_objective_any(
        scores, r, g, objective=objective, tau=tau, threshold=threshold, normalize=normalize,
        cvar_alpha=cvar_alpha, margin=margin, num_groups=num_groups, lam=lam, preferences=prefs,
    )  # fmt: skip
    kl_sums = ref_kl_sums(lp, old, m, kl_estimator)
    lengths = [len(response_positions(row)) for row in m]
    n = sum(lengths)
    local_kl = kl_sums.sum() / n
    if num_tokens is None:
        kl = local_kl
        penalty = ref_constraint_penalty(kl, constraint, delta, beta, multiplier)
    else:
        kl = kl_sums.sum() / num_tokens
        local_penalty = ref_constraint_penalty(local_kl, constraint, delta, beta, multiplier)
        penalty = (n / num_tokens) * local_penalty
    loss = -j + penalty
    (grad,) = torch.autograd.grad(loss, lp, allow_unused=True, materialize_grads=True)
    return RefLoss(
        loss=loss.detach(),
        objective=j.detach(),
        kl=kl.detach(),
        penalty=penalty.detach(),
        scores=scores.detach(),
        kl_sums=kl_sums.detach(),
        lengths=lengths,
        grad=grad,
        positive=positive,
        groups=ref_groups(r, g, threshold),
    )


def ref_objective_and_weights(
    scores: Tensor, rewards: Tensor, group_ids: Tensor, **options: object
) -> tuple[Tensor, Tensor]:
    """J and dJ/ds (autograd of the naive objective) for any-dtype scores."""
    s = scores.detach().to(F64).clone().requires_grad_(True)
    r = [float(v) for v in rewards.double().tolist()]
    g = [int(v) for v in group_ids.tolist()]
    prefs = options.pop("preferences", None)
    if isinstance(prefs, Tensor):
        options["preferences"] = [float(v) for v in prefs.double().tolist()]
    j = ref_objective_any(s, r, g, **options)  # type: ignore[arg-type]
    (w,) = torch.autograd.grad(j, s, allow_unused=True, materialize_grads=True)
    return j.detach(), w


# ---------------------------------------------------------------- baselines (GRPO family)


def naive_advantages(
    rewards: list[float], groups: list[int], *, scale: str, unbiased: bool, eps: float
) -> list[float]:
    """Per response, from Python lists, with the statistics module."""
    members: dict[int, list[float]] = {}
    for r, g in zip(rewards, groups):
        members.setdefault(g, []).append(r)
    out = []
    for r, g in zip(rewards, groups):
        vals = members[g]
        if len(set(vals)) == 1:
            out.append(0.0)
            continue
        mean = statistics.fmean(vals)
        if scale == "none":
            out.append(r - mean)
            continue
        std = statistics.stdev(vals) if unbiased else statistics.pstdev(vals)
        out.append((r - mean) / (std + eps))
    return out


def naive_clipped_loss(
    log_probs: Tensor,
    old: Tensor,
    mask: Tensor,
    adv: list[float],
    *,
    low: float,
    high: float,
    aggregation: str,
    max_tokens: float | None = None,
    dual_clip: float | None = None,
) -> Tensor:
    """Token-by-token PPO surrogate min(rho*A, clip(rho)*A), aggregated as in the papers.

    A token whose ratio is clipped is the constant it is clipped to (its gradient is 0 by the
    formula), so that a huge log-ratio on the clipped side never forms exp(huge)."""
    b, t = log_probs.shape
    per_response: list[Tensor] = []
    lengths: list[int] = []
    for i in range(b):
        terms: list[Tensor] = []
        a = adv[i]
        for j in range(t):
            if not bool(mask[i, j]):
                continue
            x = log_probs[i, j] - old[i, j]
            xv = float(x.detach())
            if a >= 0 and xv >= math.log1p(high):
                obj = x * 0.0 + (1.0 + high) * a
            elif a < 0 and dual_clip is not None and xv >= math.log(dual_clip):
                obj = x * 0.0 + dual_clip * a
            else:
                rho = torch.exp(x)
                unclipped = rho * a
                clipped = torch.clamp(rho, 1 - low, 1 + high) * a
                obj = torch.minimum(unclipped, clipped)
                if dual_clip is not None and a < 0:
                    obj = torch.maximum(obj, torch.tensor(dual_clip * a, dtype=obj.dtype))
            terms.append(-obj)
        per_response.append(torch.stack(terms).sum())
        lengths.append(len(terms))
    if aggregation == "seq_mean_token_mean":
        return sum(s / n for s, n in zip(per_response, lengths)) / b  # type: ignore[return-value]
    if aggregation == "seq_mean_token_sum_norm":
        assert max_tokens is not None
        return sum(per_response) / (b * max_tokens)  # type: ignore[return-value]
    return sum(per_response) / sum(lengths)  # type: ignore[return-value]


# ---------------------------------------------------------------- analysis


def ref_difficulty_weight(
    p: float, method: str, *, n: int | None, expected: bool, std_unbiased: bool, eps: float
) -> float:
    """omega(p) from the formulas of discoloss.analysis.weights' docstring, in plain floats."""

    def omega_n(x: float) -> float:
        """What an implementation computes on a group of n with empirical accuracy x."""
        if x <= 0.0 or x >= 1.0:
            return 0.0
        q = x * (1 - x)
        if method in ("disco", "disco_b", "drpo"):
            return 1.0
        if method == "dr_grpo":
            return q
        if n == 1:
            return 0.0
        var = q * n / (n - 1) if std_unbiased else q  # type: ignore[operator]
        return q / (math.sqrt(var) + eps)

    if n is None:
        if p <= 0.0 or p >= 1.0:
            return 0.0
        if method in ("disco", "disco_b", "drpo"):
            return 1.0
        return p * (1 - p) if method == "dr_grpo" else math.sqrt(p * (1 - p))
    if not expected:
        return omega_n(p)
    return sum(
        math.comb(n, k)
        * (p**k if k else 1.0)
        * ((1 - p) ** (n - k) if n - k else 1.0)
        * omega_n(k / n)
        for k in range(n + 1)
    )
