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
    algebra) so that small lam does not overflow."""
    top = max(preferences[i] / lam for i in pos)
    e = {i: math.exp(preferences[i] / lam - top) for i in pos}
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
