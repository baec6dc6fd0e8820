"""Machinery of the fuzz suite (``test_fuzz.py``, ``test_fuzz_analysis.py``): the example
budget, the token batches and their mutations, the outcome contract, the tolerances.

**The contract.** Every call either raises ``ValueError`` / ``TypeError`` whose message names
an argument or option of the function (the one that is wrong, when the suite made one wrong on
purpose), or returns finite values equal to an independent float64 reference
(``reference.py``) within the tolerance derived below. Any other exception is a failure (a
traceback from inside torch or Python). With ``validate=False`` inputs with bad *values* are
not checked (that is what the flag gives up): the call may return anything but must not end in
another exception; bad metadata (shapes, dtypes, devices, option values) still raises.

**Budget.** Each fuzz test runs a fixed number of derandomized examples by default (about a
minute for the whole suite on a 2-core machine). ``DISCOLOSS_FUZZ_EXAMPLES=<n>`` runs ``n``
examples per test with random seeds instead (the large budget: e.g. 5000), and prints the blob
of a failing example so that it can be reproduced.

**Tolerances.** Inputs are exact in the reference (cast to float64); the library computes in
float32 (half precision and float32 inputs) or float64, with unit roundoff ``u``. With T token
positions, L the largest |log-prob| at a response token, D the largest |log_probs - old| and R
the largest ratio exp(log_probs - old):

* a score is a token mean: its error is at most ``ds = 4 T u L`` (log-likelihood) or
  ``4 T u R (1 + D)`` (ratio scores); the KL's token mean likewise (``dkl``, the sum of both);
* the objective is Lipschitz in the scores with constant 2 (per question, its score gradient
  sums to 2/G in absolute value; ``auc_sq_hinge``: 4 (margin + spread)), plus the rounding of
  its own terms (``16 B u M``, M the largest magnitude among them: scores, J, and tau for the
  logistic objective whose pair losses are ~tau log 2);
* the penalty moves by its slope times ``dkl``;
* a response's weight dJ/ds moves with its scores by at most: 0 (DisCO-b; DRPO's positives,
  whose weights depend on the preferences only),
  ``expm1(2 ds / tau) / G`` (softmax weights: ||dq||_1 <= e^(2 ||dz||_inf) - 1),
  ``ds / tau / G`` (logistic), ``8 ds / G`` (squared hinge), ``2 / G`` when two negatives of a
  question are within ``4 ds`` (CVaR's rank weights jump at ties); each bounded by 2/G. The
  gradient of a token then moves by that over the response's length (times the ratio for the
  ratio scores), and by the penalty slope's own error over the token count.

A reference value that overflows the computation dtype (or intermediate sums beyond 1/64 of its
largest number) allows the call to raise instead of returning a value.
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from conftest import INT64_MAX, INT64_MIN, examples
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import Tensor

F64 = torch.float64

#: Examples per fuzz test for the large budget (random seeds); unset: the default budget.
FUZZ_ENV = "DISCOLOSS_FUZZ_EXAMPLES"
_LARGE = os.environ.get(FUZZ_ENV)


def fuzz(n: int) -> settings:
    """Settings of a fuzz test: ``n`` derandomized examples (the default budget; more under the
    ``dev`` hypothesis profile), or ``$DISCOLOSS_FUZZ_EXAMPLES`` examples with random seeds."""
    common = dict(
        deadline=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
    )
    if _LARGE:
        return settings(max_examples=int(_LARGE), derandomize=False, database=None, **common)
    return settings(max_examples=examples(n), **common)


# --------------------------------------------------------------------------- outcomes


def chance(draw: st.DrawFn, k: int, n: int) -> bool:
    """True in about k of n examples. (Hypothesis favours the first entries of a choice and
    small integers; the likely outcome comes first, so that the odds hold at least.)"""
    return bool(draw(st.sampled_from([False] * (n - k) + [True] * k)))


VALID, INVALID, UNCHECKED = "valid", "invalid", "unchecked"


def parameters(*functions: Callable[..., Any]) -> tuple[str, ...]:
    """The parameter names of the functions: what an error message may name."""
    return tuple(n for fn in functions for n in inspect.signature(fn).parameters)


def names_re(name: str) -> re.Pattern[str]:
    """The name as a whole identifier ("log_probs" does not match inside "old_log_probs")."""
    return re.compile(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])")


def mentions(message: str, names: Iterable[str]) -> bool:
    return any(names_re(n).search(message) for n in names)


@dataclass
class Outcome:
    value: Any = None
    error: Exception | None = None


def run_call(fn: Callable[[], Any]) -> Outcome:
    """Run a call; ValueError / TypeError are the contract's errors, anything else fails the
    test right here (with the original traceback)."""
    try:
        return Outcome(value=fn())
    except (ValueError, TypeError) as exc:
        return Outcome(error=exc)


def expect_error(out: Outcome, names: Sequence[str], context: str) -> None:
    assert out.error is not None, f"accepted, but must raise naming {list(names)}: {context}"
    message = str(out.error)
    assert mentions(message, names), (
        f"{type(out.error).__name__} does not name {list(names)}: {message!r} ({context})"
    )


def expect_error_unless_overflow(
    out: Outcome, names: Sequence[str], arguments: Sequence[str], overflow: bool, context: str
) -> None:
    """An invalid call: it must raise naming ``names``; if its data also overflow the dtype,
    a value check of the data may come first (then any argument may be named)."""
    if overflow and out.error is not None and not mentions(str(out.error), names):
        expect_named(out, arguments, context)
    else:
        expect_error(out, names, context)


def data_overflow(t: Tokens) -> bool:
    """Whether the token inputs' own sums or ratios overflow the computation dtype."""
    m = magnitudes(t.log_probs, t.old_log_probs, t.mask)
    return overflows(t.compute_dtype, m.L * m.T, m.R * m.T, math.exp(min(m.D, 700.0)) * m.T)


def expect_named(out: Outcome, arguments: Sequence[str], context: str) -> None:
    """An error that the contract allows: it must name some argument of the function."""
    assert out.error is not None
    message = str(out.error)
    assert mentions(message, arguments), (
        f"{type(out.error).__name__} names no argument of the function: {message!r} ({context})"
    )


# --------------------------------------------------------------------------- token batches

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
MASK_DTYPES = (torch.bool, torch.uint8, torch.int64, torch.float32)
REWARD_DTYPES = (torch.float64, torch.float32, torch.float16, torch.int64, torch.int32)
GARBAGE = (math.nan, math.inf, -math.inf, 1e30, -3.0)

#: Magnitudes of the log-probs: ordinary, equal to the old ones (the first step), large,
#: and near the largest number of the input dtype.
REGIMES = ("normal", "normal", "equal", "large", "extreme")


@dataclass(frozen=True)
class Tokens:
    """The token-level and per-response inputs of a loss call."""

    log_probs: Tensor
    old_log_probs: Tensor
    mask: Tensor
    rewards: Tensor
    group_ids: Tensor
    regime: str

    @property
    def bmask(self) -> Tensor:
        return self.mask != 0

    @property
    def compute_dtype(self) -> torch.dtype:
        return F64 if self.log_probs.dtype == F64 else torch.float32


def _extreme(dtype: torch.dtype) -> float:
    return {torch.float16: 3e4, torch.bfloat16: 1e37, torch.float32: 1e37}.get(dtype, 1e300)


@st.composite
def token_batches(
    draw: st.DrawFn, *, max_groups: int = 4, max_group: int = 3, max_t: int = 6
) -> Tokens:
    """Ragged shuffled groups, arbitrary int64 ids, masks with right/left padding and holes
    (every response has a token), garbage (nan, inf) at padding, any float dtype (the old
    log-probs sometimes of another), mask and reward dtypes, and one of the REGIMES."""
    sizes = draw(st.lists(st.integers(1, max_group), min_size=1, max_size=max_groups))
    extremes = st.sampled_from([INT64_MIN, INT64_MAX, -1, 0, 2**53 + 1])
    ids = draw(
        st.lists(
            st.one_of(extremes, st.integers(INT64_MIN, INT64_MAX)),
            min_size=len(sizes),
            max_size=len(sizes),
            unique=True,
        )
    )
    b = sum(sizes)
    t = draw(st.integers(1, max_t))
    rows = []
    for _ in range(b):
        row = draw(st.lists(st.booleans(), min_size=t, max_size=t))
        row[draw(st.integers(0, t - 1))] = True
        rows.append(row)
    perm = draw(st.permutations(range(b)))
    dtype = draw(st.sampled_from(DTYPES))
    old_dtype = draw(st.sampled_from([dtype, dtype, dtype, torch.float64, torch.float32]))
    regime = draw(st.sampled_from(REGIMES))
    reward_kind = draw(st.sampled_from(["01", "pm1", "dyadic"]))
    reward_dtype = draw(st.sampled_from(REWARD_DTYPES))
    if reward_kind == "dyadic" and not reward_dtype.is_floating_point:
        reward_kind = "01"
    mask_dtype = draw(st.sampled_from(MASK_DTYPES))
    seed = draw(st.integers(0, 2**32 - 1))

    gen = torch.Generator().manual_seed(seed)
    mask = torch.tensor(rows, dtype=torch.bool)
    old = -(torch.rand(b, t, generator=gen, dtype=F64) * 3.0 + 0.01)
    noise = torch.randn(b, t, generator=gen, dtype=F64)
    if regime == "normal":
        lp = torch.minimum(old + 0.3 * noise - 0.05, torch.zeros(()))
    elif regime == "equal":
        lp = old.clone()
    elif regime == "large":
        old = -1e4 + 0.01 * noise
        lp = old + 1e-3 * torch.randn(b, t, generator=gen, dtype=F64)
    else:
        big = _extreme(dtype)
        old = -big * torch.rand(b, t, generator=gen, dtype=F64)
        lp = -big * torch.rand(b, t, generator=gen, dtype=F64)
    bad = torch.tensor(GARBAGE, dtype=F64)
    pick = torch.randint(0, len(GARBAGE), (2, b, t), generator=gen)
    lp = torch.where(mask, lp, bad[pick[0]])
    old = torch.where(mask, old, bad[pick[1]])
    if reward_kind == "01":
        r = torch.randint(0, 2, (b,), generator=gen).to(F64)
    elif reward_kind == "pm1":
        r = torch.randint(0, 2, (b,), generator=gen).to(F64) * 2 - 1
    else:
        r = torch.randint(0, 9, (b,), generator=gen).to(F64) / 8
    group_ids = torch.tensor([g for g, n in zip(ids, sizes) for _ in range(n)], dtype=torch.int64)
    p = torch.tensor(perm, dtype=torch.long)
    return Tokens(
        lp[p].to(dtype),
        old[p].to(old_dtype),
        mask[p].to(mask_dtype),
        r[p].to(reward_dtype),
        group_ids[p],
        regime,
    )


# --------------------------------------------------------------------------- mutations

#: Roles of tensor arguments: what a wrong shape, dtype or value is for them.
TOKEN_FLOAT, TOKEN_MASK, RESP_REAL, RESP_INT, RESP_FLOAT = (
    "token_float",
    "token_mask",
    "resp_real",
    "resp_int",
    "resp_float",
)
MUTATIONS = ("shape", "dtype", "type", "device", "value")


@dataclass
class Mutated:
    args: dict[str, Any]
    verdict: str
    names: tuple[str, ...]
    what: str


def mutate(
    draw: st.DrawFn,
    args: Mapping[str, Any],
    roles: Mapping[str, str],
    *,
    validate: bool,
) -> Mutated:
    """Make one tensor argument wrong (or none): a shape, a dtype, a non-tensor, the meta
    device (next to CPU tensors), or a bad value (non-finite at a response token, a mask value
    other than 0/1, a response without tokens, a non-finite reward), which only validation
    catches."""
    out = dict(args)
    if not chance(draw, 1, 2):
        return Mutated(out, VALID, (), "none")
    kind = draw(st.sampled_from(MUTATIONS))
    name = draw(st.sampled_from([n for n in roles if isinstance(args[n], Tensor)]))
    x: Tensor = args[name]
    role = roles[name]
    what = f"{kind} of {name}"
    if kind == "shape":
        choices = [x.unsqueeze(-1), x.reshape(-1)[:0].reshape((0,) * x.dim())]
        if x.dim() == 2:
            choices += [x[0]]
            if x.shape[1] > 1:
                choices.append(x[:, :-1])
        if x.shape[0] > 1:
            choices.append(x[:-1])
        if x.dim() == 1:
            choices.append(x[:1].reshape(()))
        out[name] = draw(st.sampled_from(choices))
        return Mutated(out, INVALID, (name,), what)
    if kind == "dtype":
        wrong = {
            TOKEN_FLOAT: (torch.int64, torch.bool),
            TOKEN_MASK: (torch.complex64,),
            RESP_REAL: (torch.bool, torch.complex64),
            RESP_INT: (torch.float32, torch.float64, torch.bool),
            RESP_FLOAT: (torch.int64, torch.bool),
        }[role]
        out[name] = x.to(draw(st.sampled_from(wrong)))
        return Mutated(out, INVALID, (name,), what)
    if kind == "type":
        out[name] = draw(st.sampled_from([x.tolist(), None, 1.0]))
        return Mutated(out, INVALID, (name,), what)
    if kind == "device":
        out[name] = x.to("meta")
        return Mutated(out, INVALID, (name,), what)
    # values: only validation sees them
    verdict = INVALID if validate else UNCHECKED
    if role == TOKEN_FLOAT:
        mask = args.get("mask")
        bm = (mask != 0) if isinstance(mask, Tensor) else torch.ones(x.shape, dtype=torch.bool)
        where = bm.nonzero()
        k = draw(st.integers(0, where.shape[0] - 1))
        y = x.clone()
        y[tuple(where[k])] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        out[name] = y
        return Mutated(out, verdict, (name,), f"non-finite {name} at a response token")
    if role == TOKEN_MASK:
        y = x.clone()
        i = draw(st.integers(0, x.shape[0] - 1))
        if x.dtype != torch.bool and draw(st.booleans()):
            y[i, draw(st.integers(0, x.shape[1] - 1))] = draw(st.sampled_from([2, -1]))
            return Mutated(out | {name: y}, verdict, (name,), "mask value not 0/1")
        y[i] = 0
        return Mutated(out | {name: y}, verdict, (name,), "a response without tokens")
    if (role in (RESP_REAL, RESP_FLOAT)) and x.dtype.is_floating_point:
        y = x.clone()
        y[draw(st.integers(0, x.shape[0] - 1))] = draw(
            st.sampled_from([math.nan, math.inf, -math.inf])
        )
        return Mutated(out | {name: y}, verdict, (name,), f"non-finite {name}")
    return Mutated(out, VALID, (), "none")


def all_meta(args: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.to("meta") if isinstance(v, Tensor) else v) for k, v in args.items()}


# --------------------------------------------------------------------------- tolerances


def unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def subnormal(dtype: torch.dtype) -> float:
    """Absolute resolution below the normal range: results there are quantised to it."""
    fi = torch.finfo(dtype)
    return 4.0 * fi.tiny * fi.eps


@dataclass(frozen=True)
class Magnitudes:
    """Of the inputs at response tokens, in float64: L = max |log-prob|, D = max |lp - old|,
    R = max ratio, T = token positions, n_min = shortest response."""

    L: float
    D: float
    R: float
    T: int
    n_min: int
    N: int
    R_score: float  # the largest ratio a score uses (clipped ratios: after the clip)
    D_score: float


def magnitudes(
    lp: Tensor, old: Tensor, mask: Tensor, clip: tuple[Sequence[bool], float] | None = None
) -> Magnitudes:
    """``clip``: (labels, clip_eps) of the clipped-ratio score, whose positives use
    min(rho, 1 + eps) and negatives max(rho, 1 - eps)."""
    bm = mask != 0
    a = lp.detach().to(F64)
    b = old.detach().to(F64)
    x = a - b
    xs = x
    if clip is not None:
        positive, eps = clip
        pos = torch.tensor(list(positive), dtype=torch.bool)[:, None]
        xs = torch.where(pos, x.clamp(max=math.log1p(eps)), x.clamp(min=math.log1p(-eps)))
    lengths = bm.sum(-1)
    return Magnitudes(
        L=float(torch.maximum(a[bm].abs(), b[bm].abs()).max()),
        D=float(x[bm].abs().max()),
        R=float(torch.exp(x[bm]).max()),
        T=int(mask.shape[1]),
        n_min=int(lengths.min()),
        N=int(lengths.sum()),
        R_score=float(torch.exp(xs[bm]).max()),
        D_score=float(xs[bm].abs().max()),
    )


def prod(*factors: float) -> float:
    """A product of tolerance factors where 0 wins over inf (no contribution, not nan)."""
    return 0.0 if any(f == 0 for f in factors) else math.prod(factors)


def ratio_error(m: Magnitudes, u: float, *, score: bool = False) -> float:
    """Error of a token mean of ratios: lp - old is formed in the computation dtype from
    inputs of magnitude L (an error of 2 u L, relative in the ratio), then exponentiated."""
    r, d = (m.R_score, m.D_score) if score else (m.R, m.D)
    return 4 * m.T * u * max(r, 1.0) * (1.0 + d + 2.0 * m.L)


def score_error(m: Magnitudes, score: str, u: float) -> float:
    if score == "log_likelihood":
        return 4 * m.T * u * max(m.L, 1.0)
    return ratio_error(m, u, score=True) + 4 * m.T * u * max(m.L, 1.0)


def kl_error(m: Magnitudes, estimator: str, u: float) -> float:
    e = 4 * m.T * u * max(m.L, 1.0)
    if estimator == "k3":
        e += ratio_error(m, u)
    return e


def near_log_ratio(t: Tokens, bounds: Sequence[float], u: float) -> bool:
    """Whether a response token's log-ratio lies within rounding of a clip bound, where the
    library (lp - old formed in the computation dtype, from inputs of magnitude L) and the
    reference may fall on different sides: its gradient is then either on or off."""
    lp, old = t.log_probs.double()[t.bmask], t.old_log_probs.double()[t.bmask]
    x = lp - old
    mag = torch.maximum(lp.abs(), old.abs())
    near = torch.zeros_like(x, dtype=torch.bool)
    for bound in bounds:
        near |= (x - bound).abs() <= 32 * u * (1.0 + x.abs() + 2.0 * mag)
    return bool(near.any())


def weight_sensitivity(
    objective: str,
    tau: float,
    ds: float,
    denom: float,
    scores: Sequence[float],
    positive: Sequence[bool],
    group_ids: Sequence[int],
) -> float:
    """Bound on how much one response's weight dJ/ds moves when the scores move by ds."""
    g = max(denom, 1.0)
    if objective == "disco_b":
        return 0.0
    if objective in ("disco", "drpo", "disco_2way"):  # DRPO's positive weights: scores-free
        return min(2.0, math.expm1(min(2.0 * ds / tau, 700.0))) / g
    if objective == "auc_logistic":
        return min(2.0, ds / tau) / g
    if objective == "auc_sq_hinge":
        return min(2.0, 8.0 * ds) / g if ds > 0 else 0.0
    # cvar: rank weights jump where two negatives of a question (nearly) tie
    by_group: dict[int, list[float]] = {}
    for s, p, q in zip(scores, positive, group_ids):
        if not p:
            by_group.setdefault(q, []).append(s)
    for vals in by_group.values():
        vals = sorted(vals)
        if any(b - a <= 4.0 * ds for a, b in zip(vals, vals[1:])):
            return 2.0 / g
    return 0.0


def close(actual: float, expected: float, atol: float) -> bool:
    return abs(actual - expected) <= atol or (math.isnan(actual) and math.isnan(expected))


def assert_close(name: str, actual: Tensor | float, expected: Tensor | float, atol: float) -> None:
    a = float(actual.detach().double()) if isinstance(actual, Tensor) else float(actual)
    e = float(expected.detach().double()) if isinstance(expected, Tensor) else float(expected)
    assert math.isfinite(a), f"{name} = {a} is not finite (reference {e})"
    assert not math.isnan(atol), f"{name}: the tolerance is nan (a bug of the test)"
    assert abs(a - e) <= atol, (
        f"{name} = {a!r}, reference {e!r}, |diff| {abs(a - e):.3g} > {atol:.3g}"
    )


def assert_all_close(name: str, actual: Tensor, expected: Tensor, atol: float) -> None:
    a = actual.detach().to(F64)
    e = expected.detach().to(F64)
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)}, reference {tuple(e.shape)}"
    assert bool(a.isfinite().all()), f"{name} has non-finite values: {a}"
    diff = float((a - e).abs().max()) if a.numel() else 0.0
    assert diff <= atol, f"{name}: max |diff| {diff:.3g} > {atol:.3g}\n{a}\n{e}"


def overflows(dtype: torch.dtype, *values: float | Tensor) -> bool:
    """True if a reference quantity is non-finite or within 1/64 of the dtype's largest
    number (a computation of it in ``dtype`` may overflow on the way)."""
    limit = torch.finfo(dtype).max / 64.0
    for v in values:
        x = v.detach().to(F64).abs().max() if isinstance(v, Tensor) else abs(float(v))
        x = float(x)
        if not math.isfinite(x) or x >= limit:
            return True
    return False


def with_tokens(tokens: Tokens, **changes: Any) -> Tokens:
    return replace(tokens, **changes)
