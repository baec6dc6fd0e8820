"""Tables of the fuzz suite (``test_fuzz.py``): every option of the public functions with its
valid range, and how the suite draws values at, inside and outside that range.

Adding an option means adding one row to a table here (and, if it changes what a function
computes, to the float64 reference in ``reference.py``); the strategies and the oracle read the
tables. A row says:

* what is valid regardless of the inputs (``Real``: an interval, open or closed at each end;
  ``Int``: whole numbers from ``low``; ``Choice``: strings; ``Flag``: a bool);
* whether the value also has to fit the dtype the function computes in (``dtype_limit``: a
  function of that dtype giving the usable interval, applied only when ``limited_when`` says
  the computation uses the option, e.g. ``tau`` only for the temperature objectives);
* the default, so that the reference can resolve omitted options;
* whether the library checks it (``checked``): a flag the library takes as any truthy value
  (e.g. ``validate``) is drawn only from its valid values.

A new objective with its own options and inputs takes what DRPO took: its name in
``OBJECTIVES`` (the suite fails until then:
``test_the_tables_know_every_option_value_of_the_library``), one row per option in ``DISCO``
(``lam``: a ``Real`` open at 0; ``max_length``: an ``Int`` from 1 that may be None; a
``dtype_limit`` where the option must fit the computation dtype), its group term in
``reference.ref_group_term``, and, for a new tensor argument, a way to draw it and a role
(``preferences``: ``draw_preferences`` in ``test_fuzz.py``, mutated as a ``RESP_REAL``) so that
it is made wrong like the others.

Values are drawn in three regions: *inside* (typical values a user would pass and arbitrary
floats of the interval), *at* (the ends of the interval and of the dtype limit, exactly), and
*outside* (beyond each end, NaN, infinities, a Python int beyond float64, wrong types: a
string, a bool, a tensor, None where None is not a value). A drawn value carries its verdict:
valid, or invalid with the name the error message must contain.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st

INF = math.inf

#: Objectives, scores, constraints... the suite has a reference for. ``test_fuzz`` checks that
#: they are exactly the library's: a new one fails the suite until its reference is written.
SCORES = ("log_likelihood", "likelihood_ratio", "clipped_ratio")
OBJECTIVES = ("disco", "disco_b", "drpo", "cvar", "disco_2way", "auc_sq_hinge", "auc_logistic")
KL_ESTIMATORS = ("k1", "k3")
NORMALIZES = ("all", "valid")
CONSTRAINTS = ("squared_hinge", "hinge", "kl_penalty", "lagrangian", "none")
TEMPERATURE_OBJECTIVES = ("disco", "drpo", "disco_2way", "auc_logistic")


def computation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the library computes in for inputs of ``dtype`` (its documented rule: half
    precision is reduced in float32, float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale_limit(dtype: torch.dtype) -> tuple[float, float]:
    """Usable positive scales (a temperature, a normaliser): x and 1/x normal, with a factor
    1/eps to spare: [tiny / eps, max * eps]."""
    fi = torch.finfo(dtype)
    return fi.tiny / fi.eps, fi.max * fi.eps


def max_limit(dtype: torch.dtype) -> tuple[float, float]:
    """A factor that must be a finite number of the dtype."""
    return 0.0, torch.finfo(dtype).max


def sqrt_max_limit(dtype: torch.dtype) -> tuple[float, float]:
    """A value that is squared."""
    return 0.0, math.sqrt(torch.finfo(dtype).max)


def tiny_limit(dtype: torch.dtype) -> tuple[float, float]:
    """A fraction that must stay a normal number of the dtype (a product with a count >= 1)."""
    return torch.finfo(dtype).tiny, INF


def always(options: Mapping[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class Real:
    low: float = -INF
    high: float = INF
    low_open: bool = False
    high_open: bool = False
    default: float | None = None
    none: bool = False  # None is a valid value (resolved to a default by the library)
    dtype_limit: Callable[[torch.dtype], tuple[float, float]] | None = None
    limited_when: Callable[[Mapping[str, Any]], bool] = always
    typical: tuple[float, ...] = ()
    checked: bool = True


@dataclass(frozen=True)
class Int:
    low: int = 1
    default: int | None = None
    none: bool = False
    typical: tuple[int, ...] = (1, 2, 8)
    checked: bool = True


@dataclass(frozen=True)
class Choice:
    values: tuple[str, ...]
    default: str = ""
    checked: bool = True


@dataclass(frozen=True)
class Flag:
    default: bool = False
    checked: bool = True


Spec = Real | Int | Choice | Flag


def _uses_tau(o: Mapping[str, Any]) -> bool:
    return o.get("objective", "disco") in TEMPERATURE_OBJECTIVES


def _uses_beta(o: Mapping[str, Any]) -> bool:
    return o.get("constraint", "squared_hinge") in ("squared_hinge", "hinge", "kl_penalty")


def _lagrangian(o: Mapping[str, Any]) -> bool:
    return o.get("constraint", "squared_hinge") == "lagrangian"


def _sq_hinge_objective(o: Mapping[str, Any]) -> bool:
    return o.get("objective", "disco") == "auc_sq_hinge"


#: The options of disco_loss, plan_minibatch, micro_batch_loss, response_stats, DiscoOptions
#: and the objective functions (each takes the subset it documents).
DISCO: dict[str, Spec] = {
    "score": Choice(SCORES, default="log_likelihood"),
    "objective": Choice(OBJECTIVES, default="disco"),
    "kl_estimator": Choice(KL_ESTIMATORS, default="k1"),
    "normalize": Choice(NORMALIZES, default="all"),
    "constraint": Choice(CONSTRAINTS, default="squared_hinge"),
    "tau": Real(
        0.0,
        low_open=True,
        none=True,
        dtype_limit=scale_limit,
        limited_when=_uses_tau,
        typical=(0.05, 1.0, 10.0, 1e3, 1e-6, 1e8),
    ),  # fmt: skip
    "delta": Real(
        0.0,
        default=1e-4,
        dtype_limit=max_limit,
        limited_when=_lagrangian,
        typical=(1e-4, 0.0, 0.01, 10.0),
    ),  # fmt: skip
    "beta": Real(
        0.0,
        default=1e3,
        dtype_limit=max_limit,
        limited_when=_uses_beta,
        typical=(1e3, 0.0, 1.0, 3.0),
    ),  # fmt: skip
    "threshold": Real(default=0.5, typical=(0.5, 0.0, -0.5, 0.99999, 0.7)),
    "cvar_alpha": Real(
        0.0,
        1.0,
        low_open=True,
        default=0.5,
        dtype_limit=tiny_limit,
        limited_when=lambda o: o.get("objective", "disco") == "cvar",
        typical=(0.5, 1.0, 0.3),
    ),  # fmt: skip
    "margin": Real(
        0.0,
        default=1.0,
        dtype_limit=sqrt_max_limit,
        limited_when=_sq_hinge_objective,
        typical=(1.0, 0.0, 0.1, 5.0),
    ),  # fmt: skip
    "clip_eps": Real(0.0, 1.0, low_open=True, high_open=True, default=0.2, typical=(0.2, 0.05)),
    # DRPO's: any lam > 0 works in every dtype (its logits are formed in float64)
    "lam": Real(0.0, low_open=True, default=0.1, typical=(0.1, 1.0, 0.01, 1e-4, 1e-12, 1e3)),
    "max_length": Int(1, none=True, typical=(1, 3, 8, 4096)),
}

#: The GRPO-family baselines (discoloss.baselines).
BASELINES: dict[str, Spec] = {
    "clip_eps": Real(0.0, 1.0, high_open=True, default=0.2, typical=(0.2, 0.0, 0.5)),
    "clip_eps_low": Real(0.0, 1.0, high_open=True, default=0.2, typical=(0.2, 0.0)),
    "clip_eps_high": Real(0.0, default=0.28, typical=(0.28, 0.0, 2.0)),
    "eps": Real(0.0, default=1e-6, typical=(1e-6, 1e-4, 0.0)),
    "std_unbiased": Flag(default=True),
    "dual_clip": Real(1.0, low_open=True, none=True, typical=(3.0, 1.5)),
    "max_tokens": Real(
        0.0,
        low_open=True,
        none=True,
        dtype_limit=scale_limit,
        typical=(16.0, 4096.0, 0.5),
    ),  # fmt: skip
    "scale": Choice(("std", "none"), default="std"),
    "threshold": Real(default=0.5, typical=(0.5, 0.0)),
}

#: discoloss.LagrangeMultiplier: the constructor, update and load_state_dict.
MULTIPLIER: dict[str, Spec] = {
    "lr": Real(0.0, low_open=True, default=1e3, typical=(1e3, 1.0, 1e-3)),
    "init": Real(0.0, default=0.0, typical=(0.0, 0.25, 5.0)),
    "max_value": Real(0.0, none=True, typical=(2.0, 0.0, 100.0)),
    "delta": Real(0.0, default=1e-4, typical=(1e-4, 0.0, 0.1)),
}

#: discoloss.analysis.
ANALYSIS: dict[str, Spec] = {
    "method": Choice(("grpo", "dr_grpo", "dapo", "disco", "disco_b", "drpo"), default="grpo"),
    "n": Int(1, none=True, typical=(1, 2, 3, 8, 16)),
    "expected": Flag(default=False),
    "std_unbiased": Flag(default=True),
    "eps": Real(0.0, default=0.0, typical=(0.0, 1e-6, 1e-4)),
    "kind": Choice(("advantages", "weights"), default="advantages"),
    "threshold": Real(default=0.5, typical=(0.5, 0.0)),
    "token_normalizer": Real(0.0, low_open=True, none=True, typical=(4.0, 1.5)),
    "bins": Int(1, default=10, typical=(1, 10, 3)),
    "binarize": Flag(default=False),
    "lam": Real(0.0, low_open=True, default=0.1, typical=(0.1, 1.0, 1e-3)),
    "max_length": Int(1, none=True, typical=(1, 8, 4096)),
}


# --------------------------------------------------------------------------- drawn values


@dataclass(frozen=True)
class Drawn:
    """A drawn option value; ``valid`` False means the call must raise naming the option."""

    value: Any
    valid: bool
    region: str  # "inside", "at", "outside"


@dataclass
class Options:
    """Options drawn for one call: ``kwargs`` to pass (omitted options take their defaults),
    ``resolved`` every option's value as the function will see it, ``invalid`` the name of the
    one invalid option (or None)."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    resolved: dict[str, Any] = field(default_factory=dict)
    invalid: str | None = None


class _Sentinel:
    def __repr__(self) -> str:
        return "<not a number>"


NOT_A_NUMBER = _Sentinel()


def _bounds(spec: Real, limit: tuple[float, float] | None) -> tuple[float, float, bool, bool]:
    low, high, low_open, high_open = spec.low, spec.high, spec.low_open, spec.high_open
    if limit is not None:
        if limit[0] > low or (limit[0] == low and not low_open):
            low, low_open = limit[0], False
        if limit[1] < high:
            high, high_open = limit[1], False
    return low, high, low_open, high_open


def real_is_valid(
    spec: Real, value: Any, options: Mapping[str, Any], dtype: torch.dtype | None
) -> bool:
    """The table's verdict on a value (``dtype``: the computation dtype, None if unknown)."""
    if value is None:
        return spec.none
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if isinstance(value, int) and abs(value) > 2**1023:
        return False
    v = float(value)
    if not math.isfinite(v):
        return False
    limit = (
        spec.dtype_limit(dtype)
        if spec.dtype_limit is not None and dtype is not None and spec.limited_when(options)
        else None
    )
    low, high, low_open, high_open = _bounds(spec, limit)
    above = v > low if low_open else v >= low
    below = v < high if high_open else v <= high
    return above and below


def _log_uniform(low: float, high: float) -> st.SearchStrategy[float]:
    a, b = math.log10(low), math.log10(high)
    return st.floats(a, b).map(lambda e: min(max(10.0**e, low), high))


def draw_real(
    draw: st.DrawFn,
    spec: Real,
    options: Mapping[str, Any],
    dtype: torch.dtype | None,
    region: str,
) -> Drawn:
    limit = (
        spec.dtype_limit(dtype)
        if spec.dtype_limit is not None and dtype is not None and spec.limited_when(options)
        else None
    )
    low, high, low_open, high_open = _bounds(spec, limit)
    if region == "outside":
        bad: list[Any] = [math.nan, math.inf, -math.inf, "1.0", True, torch.tensor(1.0), [1.0]]
        bad.append(10**400)
        if not spec.none:
            bad.append(None)
        if math.isfinite(low):
            bad.append(low if low_open else math.nextafter(low, -INF))
            bad.append(low - 1.0 if low > -1e300 else -INF)
        if math.isfinite(high):
            bad.append(high if high_open else math.nextafter(high, INF))
            bad.append(min(high * 10.0, 1e308) if high > 0 else high + 1.0)
        value = draw(st.sampled_from(bad))
        return Drawn(value, real_is_valid(spec, value, options, dtype), "outside")
    if region == "at":
        ends = []
        if math.isfinite(low):
            ends.append(math.nextafter(low, INF) if low_open else low)
        if math.isfinite(high):
            ends.append(math.nextafter(high, -INF) if high_open else high)
        if not ends:
            ends = [-1e300, 1e300]
        if spec.none:
            ends.append(None)
        value = draw(st.sampled_from(ends))
        return Drawn(value, real_is_valid(spec, value, options, dtype), "at")
    typical = [t for t in spec.typical if real_is_valid(spec, t, options, dtype)]
    lo = math.nextafter(low, INF) if low_open else low
    hi = math.nextafter(high, -INF) if high_open else high
    lo, hi = max(lo, -1e300), min(hi, 1e300)
    candidates: list[st.SearchStrategy[Any]] = [st.floats(lo, hi)]
    if typical:
        candidates.append(st.sampled_from(typical))
    if lo > 0:
        candidates.append(_log_uniform(lo, hi))
    elif hi > 1e-300:
        candidates.append(_log_uniform(1e-300, hi))
    value = draw(st.one_of(candidates))
    return Drawn(value, real_is_valid(spec, value, options, dtype), "inside")


def draw_int(draw: st.DrawFn, spec: Int, region: str) -> Drawn:
    if region == "outside":
        bad: list[Any] = [spec.low - 1, spec.low - 5, 2.5, "3", True, 10**400 * -1]
        if not spec.none:
            bad.append(None)
        value = draw(st.sampled_from(bad))
        return Drawn(value, False, "outside")
    if region == "at":
        return Drawn(spec.low, True, "at")
    return Drawn(draw(st.sampled_from(spec.typical)), True, "inside")


def draw_choice(draw: st.DrawFn, spec: Choice, region: str) -> Drawn:
    if region == "outside":
        value = draw(
            st.sampled_from(["nope", spec.values[0].upper(), "", None, 1, spec.values[0] + " "])
        )
        return Drawn(value, False, "outside")
    return Drawn(draw(st.sampled_from(spec.values)), True, region)


def draw_flag(draw: st.DrawFn, spec: Flag, region: str) -> Drawn:
    if region == "outside":
        return Drawn(draw(st.sampled_from(["yes", 1, None])), False, "outside")
    return Drawn(draw(st.booleans()), True, region)


def draw_options(
    draw: st.DrawFn,
    table: Mapping[str, Spec],
    names: tuple[str, ...],
    *,
    dtype: torch.dtype | None,
    fixed: Mapping[str, Any] | None = None,
    allow_invalid: bool = True,
    defaults: Mapping[str, Any] | None = None,
) -> Options:
    """Draw the options ``names`` of ``table``: each omitted, at or inside its range; at most
    one (when ``allow_invalid``) outside it. String options are drawn first, so that the
    ranges that depend on them (a dtype limit that applies to some objectives only) see them.
    ``fixed``: options set by the caller (not drawn, valid). ``defaults``: the defaults of
    the function called, where they differ from the table's (see :func:`signature_defaults`)."""
    out = Options()
    fixed = dict(fixed or {})
    checked = [n for n in names if table[n].checked and n not in fixed]
    # about one call in five gets one option outside its range (False first: see chance())
    wrong = draw(st.sampled_from([False] * 4 + [True]))
    invalid = draw(st.sampled_from(checked)) if wrong and allow_invalid and checked else None
    order = sorted(names, key=lambda n: not isinstance(table[n], (Choice, Flag)))
    for name in order:
        spec = table[name]
        if name in fixed:
            out.kwargs[name] = out.resolved[name] = fixed[name]
            continue
        if name == invalid:
            region = "outside"
        else:
            region = draw(st.sampled_from(["omit", "omit", "inside", "inside", "at"]))
        if region == "omit":
            out.resolved[name] = (defaults or {}).get(name, spec.default)
            continue
        if isinstance(spec, Real):
            drawn = draw_real(draw, spec, out.resolved, dtype, region)
        elif isinstance(spec, Int):
            drawn = draw_int(draw, spec, region)
        elif isinstance(spec, Choice):
            drawn = draw_choice(draw, spec, region)
        else:
            drawn = draw_flag(draw, spec, region)
        out.kwargs[name] = out.resolved[name] = drawn.value
        if not drawn.valid:
            out.invalid = name
    # a valid value of an option drawn before the one it depends on cannot be invalidated by
    # it: numbers are drawn after strings. An invalid string makes the others' limits moot.
    return out


def dtype_refusals(
    table: Mapping[str, Spec], resolved: Mapping[str, Any], dtype: torch.dtype
) -> list[str]:
    """Options whose (resolved, valid in themselves) values the table refuses for computation
    dtype ``dtype``."""
    return [
        name
        for name, spec in table.items()
        if isinstance(spec, Real)
        and spec.dtype_limit is not None
        and resolved.get(name) is not None
        and not real_is_valid(spec, resolved[name], resolved, dtype)
    ]


@st.composite
def options(
    draw: st.DrawFn, table: Mapping[str, Spec], names: tuple[str, ...], **kwargs: Any
) -> Options:
    """:func:`draw_options` as a strategy (``dtype`` defaults to None: no dtype limits)."""
    kwargs.setdefault("dtype", None)
    return draw_options(draw, table, names, **kwargs)


def signature_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """The documented defaults of a function's keyword options (its signature)."""
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
