"""Fuzz suite of the public functions of the core: generated inputs, valid and invalid.

Each call must either raise ValueError / TypeError naming an argument or option (the one made
wrong, when the example made one wrong), or return finite values equal to the independent
float64 reference of ``reference.py``. The contract, the example budget (and its environment
variable ``DISCOLOSS_FUZZ_EXAMPLES``) and the tolerances are described in ``fuzz_support.py``;
the options and their ranges are the tables of ``fuzz_spec.py``.

What is generated: ragged groups with arbitrary int64 ids; every float dtype for the
log-probs (half precision included, the old log-probs sometimes of another dtype); mask and
reward dtypes; ordinary, equal, large (-1e4) and extreme (near the dtype's largest number)
log-probs; nan and inf at padding (valid) and at response tokens (invalid); every option at,
inside and outside its range, including ranges that depend on the computation dtype; counts
as ints and as tensors (valid, too small for the batch, fractional, of the wrong shape, dtype
or device); wrong shapes, dtypes, types and devices (``meta``) of every tensor argument; all
arguments on ``meta`` (a shape-only computation with ``validate=False``, a clear error with
``validate=True``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

import pytest
import torch
from conftest import INT64_MAX, INT64_MIN
from fuzz_spec import (
    BASELINES,
    CONSTRAINTS,
    DISCO,
    KL_ESTIMATORS,
    MULTIPLIER,
    NORMALIZES,
    OBJECTIVES,
    SCORES,
    Options,
    draw_options,
    dtype_refusals,
    options,
    signature_defaults,
)
from fuzz_support import (
    F64,
    INVALID,
    RESP_FLOAT,
    RESP_INT,
    RESP_REAL,
    TOKEN_FLOAT,
    TOKEN_MASK,
    UNCHECKED,
    VALID,
    Magnitudes,
    Outcome,
    Tokens,
    all_meta,
    assert_all_close,
    assert_close,
    chance,
    data_overflow,
    expect_error,
    expect_error_unless_overflow,
    expect_named,
    fuzz,
    kl_error,
    magnitudes,
    mutate,
    near_log_ratio,
    overflows,
    parameters,
    prod,
    run_call,
    score_error,
    subnormal,
    token_batches,
    unit_roundoff,
    weight_sensitivity,
)
from hypothesis import given
from hypothesis import strategies as st
from reference import (
    naive_advantages,
    naive_clipped_loss,
    ref_constraint_penalty,
    ref_constraint_slope,
    ref_disco_any,
    ref_groups,
    ref_kl_sums,
    ref_objective_and_weights,
    ref_token_scores,
    response_positions,
)
from torch import Tensor

import discoloss
from discoloss import (
    DiscoOptions,
    LagrangeMultiplier,
    disco_loss,
    discriminative_objective,
    discriminative_weights,
    kl_divergence,
    sequence_scores,
    squared_hinge_penalty,
)
from discoloss import _types as library_types
from discoloss.accumulation import ResponseStats, micro_batch_loss, plan_minibatch, response_stats
from discoloss.baselines import (
    dapo_loss,
    dr_grpo_loss,
    dynamic_sampling_filter,
    group_advantages,
    grpo_loss,
)
from discoloss.constraints import constraint_penalty, constraint_slope

LOSS_ROLES = {
    "log_probs": TOKEN_FLOAT,
    "old_log_probs": TOKEN_FLOAT,
    "mask": TOKEN_MASK,
    "rewards": RESP_REAL,
    "group_ids": RESP_INT,
}


def test_the_tables_know_every_option_value_of_the_library():
    """A new objective, score, constraint... must get its reference and its table row before
    the fuzz suite passes again."""
    assert SCORES == get_args(library_types.Score)
    assert OBJECTIVES == get_args(library_types.Objective)
    assert KL_ESTIMATORS == get_args(library_types.KLEstimator)
    assert NORMALIZES == get_args(library_types.Normalize)
    assert CONSTRAINTS == get_args(library_types.Constraint)
    assert set(DISCO) == set(DiscoOptions.names())


# --------------------------------------------------------------------------- the DisCO loss


@dataclass
class LossCase:
    """A generated disco_loss call and what the contract expects of it."""

    tokens: Tokens
    args: dict[str, Any]
    kwargs: dict[str, Any]
    options: Options
    verdict: str
    names: tuple[str, ...]
    what: str
    meta: bool = False
    lam: float = 0.0
    num_groups: float | None = None
    num_tokens: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def as_threshold(threshold: Any) -> float:
    """The threshold as a float (0.5 for an invalid one: the call raises anyway)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        return 0.5
    try:
        return float(threshold)
    except OverflowError:
        return 0.5


def labels_of(rewards: Tensor, threshold: Any) -> list[bool]:
    t = as_threshold(threshold)
    return [float(r) > t for r in rewards.double().tolist()]


def present_groups(tokens: Tokens, threshold: Any, normalize: Any) -> int:
    groups = ref_groups(
        [float(r) for r in tokens.rewards.double().tolist()],
        tokens.group_ids.tolist(),
        as_threshold(threshold),
    )
    if normalize == "valid":
        return sum(groups.has_signal(g) for g in groups.order)
    return len(groups.order)


def draw_count(
    draw: st.DrawFn, name: str, present: int, validate: bool, allow_bad: bool = True
) -> tuple[Any, str, float | None]:
    """(value, verdict, value for the reference) of num_groups / num_tokens."""
    kind = draw(st.sampled_from(["int", "tensor"]))
    if allow_bad and chance(draw, 2, 5):
        kind = draw(st.sampled_from(["bad_value", "bad_meta"]))
    if kind in ("int", "tensor"):
        value = max(present, 1) + draw(st.sampled_from([0, 0, 1, 7]))
        if kind == "int":
            return value, VALID, float(value)
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.float32, torch.float64]))
        shape = draw(st.sampled_from([(), (1,)]))
        return torch.tensor(value, dtype=dtype).reshape(shape), VALID, float(value)
    if kind == "bad_meta":
        bad = draw(
            st.sampled_from(
                [0, -3, 2.0, "4", True, torch.tensor([3, 4]), torch.tensor(True),
                 torch.tensor(5).to("meta"), torch.tensor(1 + 2j), 2**70]
            )
        )  # fmt: skip
        return bad, INVALID, None
    verdict = INVALID if validate else UNCHECKED
    if present >= 2 and not chance(draw, 1, 2):  # fewer than this batch holds
        below = draw(st.integers(1, present - 1))
        return (
            draw(st.sampled_from([below, torch.tensor(float(below)), torch.tensor(below)])),
            verdict,
            None,
        )
    choices: list[Any] = [torch.tensor(0), torch.tensor(-2.0), torch.tensor(2.5),
                          torch.tensor(math.nan), torch.tensor(math.inf)]  # fmt: skip
    return draw(st.sampled_from(choices)), verdict, None


def multiplier_for(draw: st.DrawFn, constraint: Any) -> tuple[dict[str, Any], float, bool]:
    """(kwargs, lambda, valid)."""
    lam = draw(st.sampled_from([0.0, 0.25, 3.0]))
    if constraint != "lagrangian":
        if draw(st.booleans()):
            return {"multiplier": LagrangeMultiplier(init=lam)}, lam, True
        return {}, 0.0, True
    choice = draw(st.sampled_from(["ok", "ok", "ok", "none", "float"]))
    if choice == "ok":
        return {"multiplier": LagrangeMultiplier(init=lam)}, lam, True
    return ({"multiplier": None} if choice == "none" else {"multiplier": 0.5}), 0.0, False


def preference_tensor(draw: st.DrawFn, b: int) -> Tensor:
    """DRPO preferences (B,) of any kind the library takes: values in [0, 1], length rewards,
    ties, values closer than float32 resolves, values near the dtype's largest number, int64
    (extremes included)."""
    kind = draw(st.sampled_from(["unit", "lengths", "equal", "close", "huge", "int"]))
    if kind == "int":
        ints = st.one_of(st.sampled_from([INT64_MIN, INT64_MAX, 0]), st.integers(-100, 100))
        return torch.tensor(draw(st.lists(ints, min_size=b, max_size=b)), dtype=torch.int64)
    dtype = draw(st.sampled_from([F64, torch.float32, torch.float16]))
    if kind == "unit":
        values = draw(st.lists(st.floats(0.0, 1.0), min_size=b, max_size=b))
    elif kind == "lengths":
        n = draw(st.integers(1, 100))
        values = [1.0 - k / n for k in draw(st.lists(st.integers(1, 50), min_size=b, max_size=b))]
    elif kind == "equal":
        values = [0.5] * b
    elif kind == "close":
        values = [
            1.0 + k * 2.0**-40 for k in draw(st.lists(st.integers(0, 3), min_size=b, max_size=b))
        ]
    else:
        big = torch.finfo(dtype).max
        values = [x * big for x in draw(st.lists(st.floats(-1.0, 1.0), min_size=b, max_size=b))]
    return torch.tensor(values, dtype=F64).to(dtype)


def drpo(draw: st.DrawFn) -> dict[str, Any] | None:
    """``objective="drpo"`` fixed in about one call in five (the objective it adds has inputs
    of its own: a fair share of the examples), else None (the objective is drawn)."""
    return {"objective": "drpo"} if chance(draw, 1, 5) else None


def draw_preferences(
    draw: st.DrawFn,
    b: int,
    objective: Any,
    max_length: Any,
    *,
    allow_invalid: bool,
    default_available: bool = True,
) -> tuple[Tensor | None, tuple[str, ...]]:
    """DRPO's ``preferences`` for a call: (the tensor to pass or None, the names the error must
    carry, () for a valid call). ``allow_invalid``: whether they may be wrong (not when
    something else already is: one wrong thing per call). ``default_available``: whether the
    function can form the default length preference (it needs ``max_length`` and the
    responses' lengths)."""
    if objective != "drpo":
        if allow_invalid and chance(draw, 1, 10):  # preferences of another objective
            return preference_tensor(draw, b), ("preferences",)
        return None, ()
    has_default = default_available and max_length is not None
    if has_default and chance(draw, 1, 2):
        return None, ()
    if (has_default or allow_invalid) and chance(draw, 1, 8):
        return None, (() if has_default else ("preferences", "max_length"))
    return preference_tensor(draw, b), ()


def none_preferences_verdict(objective: Any, max_length: Any, default_available: bool) -> str:
    """The verdict of a call whose preferences a mutation replaced by None."""
    if objective == "drpo" and (max_length is None or not default_available):
        return INVALID
    return VALID


@st.composite
def loss_cases(draw: st.DrawFn) -> LossCase:
    tokens = draw(token_batches())
    validate = draw(st.sampled_from([True, True, False]))
    opts = draw_options(draw, DISCO, tuple(DISCO), dtype=tokens.compute_dtype, fixed=drpo(draw))
    kwargs = dict(opts.kwargs, validate=validate)
    args = {k: getattr(tokens, k) for k in LOSS_ROLES}
    verdict, names, what = VALID, (), "valid"
    if opts.invalid is not None:
        verdict, names, what = INVALID, (opts.invalid,), f"option {opts.invalid}"
    mult, lam, mult_ok = multiplier_for(draw, opts.resolved["constraint"])
    if not mult_ok and verdict != VALID:  # one wrong thing at most
        mult, mult_ok = {"multiplier": LagrangeMultiplier(init=lam)}, True
    kwargs.update(mult)
    if verdict == VALID and not mult_ok:
        verdict, names, what = INVALID, ("multiplier",), "multiplier"
    objective, max_length = opts.resolved["objective"], opts.resolved["max_length"]
    prefs, pref_names = draw_preferences(
        draw, tokens.rewards.shape[0], objective, max_length, allow_invalid=verdict == VALID
    )
    if prefs is not None:
        args["preferences"] = prefs
    if verdict == VALID and pref_names:
        verdict, names, what = INVALID, pref_names, "preferences"
    case = LossCase(tokens, args, kwargs, opts, verdict, names, what, lam=lam)
    # counts of a larger batch (a wrong one only when nothing else is wrong)
    threshold, normalize = opts.resolved["threshold"], opts.resolved["normalize"]
    for name in ("num_groups", "num_tokens"):
        if not chance(draw, 1, 4):
            continue
        present = (
            present_groups(tokens, threshold, normalize)
            if name == "num_groups"
            else int(tokens.bmask.sum())
        )
        value, v, ref_value = draw_count(draw, name, present, validate, case.verdict == VALID)
        kwargs[name] = value
        setattr(case, name, ref_value)
        if case.verdict == VALID and v != VALID:
            case.verdict, case.names, case.what = v, (name,), f"{name}={value!r}"
    if case.verdict == VALID:
        if chance(draw, 1, 20):  # everything on the meta device
            case.args = all_meta(args)
            for name in ("num_groups", "num_tokens"):
                if isinstance(kwargs.get(name), Tensor):
                    kwargs[name] = kwargs[name].to("meta")
            case.meta = True
            if validate:
                case.verdict, case.names, case.what = INVALID, ("validate",), "meta, validate"
        else:
            m = mutate(draw, args, loss_roles(args), validate=validate)
            case.args, case.what = m.args, m.what
            if m.verdict != VALID:
                case.verdict, case.names = m.verdict, m.names
            if "preferences" in args and m.args["preferences"] is None:
                case.verdict = none_preferences_verdict(objective, max_length, True)
                case.names = ("preferences", "max_length")
    return case


def loss_roles(args: Mapping[str, Any]) -> dict[str, str]:
    """The roles of a loss call's tensor arguments (DRPO's preferences when passed)."""
    return {**LOSS_ROLES, **({"preferences": RESP_REAL} if "preferences" in args else {})}


def split_args(
    args: Mapping[str, Any], positional: Mapping[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """The positional arguments (in the order of ``positional``) and the keyword ones."""
    return [args[k] for k in positional], {k: v for k, v in args.items() if k not in positional}


def loss_tolerances(case: LossCase, ref: Any, m: Magnitudes) -> dict[str, float]:
    """Absolute tolerances of loss, objective, kl, penalty and the gradient (see
    fuzz_support's docstring for the derivation)."""
    o = case.options.resolved
    f = case.tokens.compute_dtype
    u = unit_roundoff(f)
    score, objective, constraint = o["score"], o["objective"], o["constraint"]
    tau = o["tau"] if o["tau"] is not None else (10.0 if score == "log_likelihood" else 1.0)
    beta, delta, margin = float(o["beta"]), float(o["delta"]), float(o["margin"])
    ds = score_error(m, score, u)
    dkl = kl_error(m, o["kl_estimator"], u)
    scores = [float(s) for s in ref.scores]
    b = len(scores)
    groups = ref.groups
    if case.num_groups is not None:
        denom = case.num_groups
    elif o["normalize"] == "valid":
        denom = sum(groups.has_signal(g) for g in groups.order)
    else:
        denom = len(groups.order)
    denom = max(denom, 1.0)
    spread = max(scores) - min(scores) + ds
    lip = 4.0 * (margin + spread) if objective == "auc_sq_hinge" else 2.0
    mag = max(1.0, abs(float(ref.objective)), max(abs(s) for s in scores))
    if objective == "auc_logistic":
        mag = max(mag, tau)
    if objective == "auc_sq_hinge":
        mag = max(mag, prod(margin + spread, margin + spread))  # inf, not OverflowError
    tol_j = prod(lip, ds) + 16 * b * u * mag
    n_local = sum(ref.lengths)
    n_all = case.num_tokens if case.num_tokens is not None else n_local
    local_kl = float(ref.kl_sums.sum()) / n_local
    excess = max(local_kl - delta, 0.0)
    slope = {
        "squared_hinge": beta * (excess + dkl),
        "hinge": beta,
        "kl_penalty": beta,
        "lagrangian": case.lam,
        "none": 0.0,
    }[constraint]
    frac = n_local / n_all
    tol_kl = dkl * frac + 16 * u * abs(float(ref.kl))
    tol_p = prod(frac, slope, dkl) + 16 * u * (abs(float(ref.penalty)) + prod(slope, abs(local_kl)))
    tol_loss = tol_j + tol_p + 16 * u * abs(float(ref.loss))
    # gradient
    ws = weight_sensitivity(
        objective, tau, ds, denom, scores, ref.positive, case.tokens.group_ids.tolist()
    )
    w_bound = (2.0 * (margin + spread) if objective == "auc_sq_hinge" else 1.0) / denom
    tok = 1.0 if score == "log_likelihood" else max(m.R_score, 1.0)
    rel = 1.0 if score == "log_likelihood" else 1.0 + m.D_score + 2.0 * m.L
    g_obj = prod(ws, tok) / m.n_min + prod(64 * u * rel, w_bound, tok) / m.n_min
    if score == "clipped_ratio" and near_log_ratio(case.tokens, clip_bounds(o["clip_eps"]), u):
        g_obj += 2.0 * w_bound * tok / m.n_min
    kfac = 1.0 if o["kl_estimator"] == "k1" else max(m.R, 1.0) + 1.0
    slope_err = {"squared_hinge": beta * dkl, "hinge": 0.0}.get(constraint, 0.0)
    if constraint == "hinge" and abs(local_kl - delta) <= dkl + 16 * u * delta + subnormal(f):
        slope_err = beta
    rel_k = 1.0 if o["kl_estimator"] == "k1" else 1.0 + m.D + 2.0 * m.L
    g_pen = (prod(slope_err, kfac) + prod(64 * u * rel_k, slope, kfac)) / n_all
    # the gradient is returned in the dtype of log_probs (half precision rounds it)
    lp_dtype = case.tokens.log_probs.dtype
    g_round = unit_roundoff(lp_dtype) * float(ref.grad.abs().max()) + subnormal(lp_dtype)
    tol_g = g_obj + g_pen + 64 * u * float(ref.grad.abs().max()) + g_round
    floor = subnormal(f)  # values below the normal range are quantised
    return {
        "loss": tol_loss + floor,
        "objective": tol_j + floor,
        "kl": tol_kl + floor,
        "penalty": tol_p + floor,
        "grad": tol_g + floor,
    }


def ratio_extent(m: Magnitudes, score: str, estimator: str = "k1") -> float:
    """The largest token sum of ratios the computation forms (0 when it forms none)."""
    extent = 0.0
    if score != "log_likelihood":
        extent = m.R_score * m.T
    if estimator == "k3":
        extent = max(extent, m.R * m.T)
    return extent


def clip_bounds(clip_eps: float) -> list[float]:
    """The log-ratios where the clipped-ratio score switches between clipped and not."""
    return [math.log1p(clip_eps), math.log1p(-clip_eps)]


def resolved_tau(o: Mapping[str, Any]) -> float:
    if o["tau"] is not None:
        return float(o["tau"])
    return 10.0 if o["score"] == "log_likelihood" else 1.0


def check_loss_against_reference(case: LossCase, out: Any, validate: bool) -> None:
    t = case.tokens
    o = case.options.resolved
    ref = ref_disco_any(
        t.log_probs, t.old_log_probs, t.mask, t.rewards, t.group_ids,
        score=o["score"], objective=o["objective"], tau=resolved_tau(o),
        delta=float(o["delta"]), beta=float(o["beta"]), kl_estimator=o["kl_estimator"],
        threshold=float(o["threshold"]), normalize=o["normalize"],
        constraint=o["constraint"], multiplier=case.lam, cvar_alpha=float(o["cvar_alpha"]),
        margin=float(o["margin"]), clip_eps=float(o["clip_eps"]),
        num_groups=case.num_groups, num_tokens=case.num_tokens, lam=float(o["lam"]),
        max_length=o["max_length"], preferences=case.args.get("preferences"),
    )  # fmt: skip
    m = magnitudes(t.log_probs, t.old_log_probs, t.mask, (ref.positive, float(o["clip_eps"])))
    f = t.compute_dtype
    big = overflows(
        f, ref.loss, ref.objective, ref.penalty, ref.kl, ref.grad, ref.scores,
        m.L * m.T, ratio_extent(m, o["score"], o["kl_estimator"]), ref.kl_sums,
    )  # fmt: skip
    context = f"{case.what}; options {case.kwargs}"
    if out.error is not None:
        assert big, f"valid input refused: {out.error!r} ({context})"
        expect_named(out, parameters(disco_loss), context)
        return
    if big and not validate:
        return  # values beyond the dtype, unchecked: IEEE arithmetic
    value, grad = out.value
    tol = loss_tolerances(case, ref, m)
    for name in ("loss", "objective", "kl", "penalty"):
        assert_close(name, getattr(value, name), getattr(ref, name), tol[name])
    if overflows(t.log_probs.dtype, ref.grad):
        return  # the gradient is returned in log_probs' dtype: a float16 one can overflow
    assert_all_close("grad", grad, ref.grad, tol["grad"])
    assert torch.equal(grad[~t.bmask], torch.zeros_like(grad[~t.bmask])), "padding gradient"



def as_leaf(value: Any) -> Any:
    """A fresh leaf that records the gradient for a floating tensor; anything else as is (an
    invalid input the call must refuse)."""
    if isinstance(value, Tensor) and value.dtype.is_floating_point:
        return value.detach().clone().requires_grad_(True)
    return value

@fuzz(1500)
@given(case=loss_cases())
def test_disco_loss(case: LossCase) -> None:
    validate = case.kwargs["validate"]
    args = dict(case.args)
    lp = args["log_probs"]
    leaf = as_leaf(lp)
    args["log_probs"] = leaf

    positional, keywords = split_args(args, LOSS_ROLES)

    def call() -> Any:
        out = disco_loss(*positional, **keywords, **case.kwargs)
        if case.meta:
            return out, None
        (grad,) = torch.autograd.grad(out.loss, leaf, allow_unused=True, materialize_grads=True)
        return out, grad

    out = run_call(call)
    context = f"{case.what}; options {case.kwargs}"
    if case.verdict == INVALID:
        overflow = data_overflow(case.tokens)
        expect_error_unless_overflow(out, case.names, parameters(disco_loss), overflow, context)
    elif case.verdict == UNCHECKED:
        if out.error is not None:
            expect_named(out, parameters(disco_loss), context)
    elif case.meta:
        assert out.error is None, f"shape-only call refused: {out.error!r} ({context})"
        value, _ = out.value
        for name in ("loss", "objective", "kl", "penalty"):
            x = getattr(value, name)
            assert x.device.type == "meta" and x.shape == (), (name, x)
    else:
        check_loss_against_reference(case, out, validate)


# --------------------------------------------------------------------------- scores and KL

KL_TABLE = {"estimator": DISCO["kl_estimator"]}
SCORE_TABLE = {"score": DISCO["score"]}
TOKEN_ROLES = {k: LOSS_ROLES[k] for k in ("log_probs", "old_log_probs", "mask")}


@st.composite
def token_cases(draw: st.DrawFn, table: Mapping[str, Any]) -> tuple[Any, ...]:
    tokens = draw(token_batches(max_groups=3))
    validate = draw(st.sampled_from([True, True, False]))
    opts = draw_options(draw, table, tuple(table), dtype=tokens.compute_dtype)
    args = {k: getattr(tokens, k) for k in TOKEN_ROLES}
    verdict, names, what = VALID, (), "valid"
    if opts.invalid is not None:
        verdict, names, what = INVALID, (opts.invalid,), f"option {opts.invalid}"
    else:
        m = mutate(draw, args, TOKEN_ROLES, validate=validate)
        args, what = m.args, m.what
        if m.verdict != VALID:
            verdict, names = m.verdict, m.names
    return tokens, args, opts, validate, verdict, names, what


def check_token_outcome(
    out: Outcome,
    verdict: str,
    names: tuple[str, ...],
    what: str,
    arguments: tuple[str, ...],
    overflow: bool = False,
) -> bool:
    """Checks the invalid / unchecked verdicts; True if the valid path must be compared.
    ``overflow``: the data overflow the computation dtype by themselves (their value check may
    come before the wrong argument's)."""
    if verdict == INVALID:
        expect_error_unless_overflow(out, names, arguments, overflow, what)
        return False
    if verdict == UNCHECKED:
        if out.error is not None:
            expect_named(out, arguments, what)
        return False
    return True


@fuzz(400)
@given(case=token_cases(SCORE_TABLE), drop_old=st.booleans())
def test_sequence_scores(case: tuple[Any, ...], drop_old: bool) -> None:
    tokens, args, opts, validate, verdict, names, what = case
    score = opts.resolved["score"]
    if score == "clipped_ratio" and opts.invalid is None:  # labels needed: refused first
        verdict, names, what = INVALID, ("score",), "clipped_ratio"
    if drop_old and verdict == VALID:
        args = dict(args, old_log_probs=None)
        if score != "log_likelihood":
            verdict, names, what = INVALID, ("old_log_probs",), "no old_log_probs"
    if args["old_log_probs"] is None and score == "log_likelihood" and what.startswith("type"):
        verdict, names = VALID, ()  # None is the documented value: the score does not use it
    out = run_call(lambda: sequence_scores(*args.values(), **opts.kwargs, validate=validate))
    arguments = parameters(sequence_scores)
    if not check_token_outcome(out, verdict, names, what, arguments, data_overflow(tokens)):
        return
    t = tokens
    mask = [[bool(v) for v in row] for row in t.bmask.tolist()]
    ref = ref_token_scores(t.log_probs.double(), t.old_log_probs.double(), mask, score)
    m = magnitudes(t.log_probs, t.old_log_probs, t.mask)
    if out.error is not None:
        assert overflows(t.compute_dtype, ref, m.L * m.T, ratio_extent(m, score)), repr(out.error)
        expect_named(out, arguments, what)
        return
    if not validate and overflows(t.compute_dtype, ref, m.L * m.T, ratio_extent(m, score)):
        return
    u = unit_roundoff(t.compute_dtype)
    assert_all_close("scores", out.value, ref, score_error(m, score, u) + 16 * u)


@fuzz(400)
@given(case=token_cases(KL_TABLE))
def test_kl_divergence(case: tuple[Any, ...]) -> None:
    tokens, args, opts, validate, verdict, names, what = case
    out = run_call(lambda: kl_divergence(*args.values(), **opts.kwargs, validate=validate))
    arguments = parameters(kl_divergence)
    if not check_token_outcome(out, verdict, names, what, arguments, data_overflow(tokens)):
        return
    t = tokens
    est = opts.resolved["estimator"]
    mask = [[bool(v) for v in row] for row in t.bmask.tolist()]
    sums = ref_kl_sums(t.log_probs.double(), t.old_log_probs.double(), mask, est)
    ref = sums.sum() / sum(len(response_positions(r)) for r in mask)
    m = magnitudes(t.log_probs, t.old_log_probs, t.mask)
    big = overflows(t.compute_dtype, ref, sums, m.L * m.T, ratio_extent(m, "log_likelihood", est))
    if out.error is not None:
        assert big, repr(out.error)
        expect_named(out, arguments, what)
        return
    if big and not validate:
        return
    u = unit_roundoff(t.compute_dtype)
    assert_close("kl", out.value, ref, kl_error(m, est, u) + 16 * u * abs(float(ref)))


# --------------------------------------------------------------------------- objective

OBJECTIVE_OPTIONS = ("objective", "tau", "threshold", "normalize", "cvar_alpha", "margin", "lam")
SCORE_ROLES = {"scores": RESP_FLOAT, "rewards": RESP_REAL, "group_ids": RESP_INT}
# discriminative_objective's tau defaults to 10 (None also means 10)
OBJECTIVE_TABLE = dict(DISCO)


@st.composite
def objective_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    tokens = draw(token_batches(max_groups=5, max_group=4, max_t=1))
    b = tokens.rewards.shape[0]
    dtype = draw(st.sampled_from([F64, torch.float32, torch.float16, torch.bfloat16]))
    spread = draw(st.sampled_from([1.0, 30.0, 1e4, 1e30, 3e38, 1e300]))
    values = draw(st.lists(st.floats(-1.0, 1.0), min_size=b, max_size=b))
    scores = (torch.tensor(values, dtype=F64) * spread).to(dtype)
    validate = draw(st.sampled_from([True, True, False]))
    f = F64 if dtype == F64 else torch.float32
    defaults = signature_defaults(discriminative_objective)
    opts = draw_options(
        draw, OBJECTIVE_TABLE, OBJECTIVE_OPTIONS, dtype=f, defaults=defaults, fixed=drpo(draw)
    )
    args = {"scores": scores, "rewards": tokens.rewards, "group_ids": tokens.group_ids}
    verdict, names, what = VALID, (), "valid"
    objective = opts.resolved["objective"]
    # scores carry no lengths: DRPO needs its preferences here
    prefs, pref_names = draw_preferences(
        draw, b, objective, None, allow_invalid=opts.invalid is None, default_available=False
    )
    if prefs is not None:
        args["preferences"] = prefs
    if opts.invalid is not None:
        verdict, names, what = INVALID, (opts.invalid,), f"option {opts.invalid}"
    elif pref_names:
        verdict, names, what = INVALID, pref_names, "preferences"
    else:
        roles = {**SCORE_ROLES, **({"preferences": RESP_REAL} if prefs is not None else {})}
        m = mutate(draw, args, roles, validate=validate)
        args, what = m.args, m.what
        if m.verdict != VALID:
            verdict, names = m.verdict, m.names
        if prefs is not None and args["preferences"] is None:
            verdict = none_preferences_verdict(objective, None, False)
            names = ("preferences", "max_length")
    return args, opts, validate, verdict, names, what, f


@fuzz(800)
@given(case=objective_cases(), which=st.sampled_from(["objective", "weights"]))
def test_discriminative_objective_and_weights(case: tuple[Any, ...], which: str) -> None:
    args, opts, validate, verdict, names, what, f = case
    fn = discriminative_objective if which == "objective" else discriminative_weights
    positional, keywords = split_args(args, SCORE_ROLES)
    out = run_call(lambda: fn(*positional, **keywords, **opts.kwargs, validate=validate))
    arguments = parameters(fn)
    if not check_token_outcome(out, verdict, names, what, arguments):
        return
    o = opts.resolved
    tau = 10.0 if o["tau"] is None else float(o["tau"])
    s, r, g = args["scores"], args["rewards"], args["group_ids"]
    j, w = ref_objective_and_weights(
        s, r, g, objective=o["objective"], tau=tau, threshold=float(o["threshold"]),
        normalize=o["normalize"], cvar_alpha=float(o["cvar_alpha"]), margin=float(o["margin"]),
        lam=float(o["lam"]), preferences=args.get("preferences"),
    )  # fmt: skip
    big = overflows(f, j, w, s.double().abs().max() * 4)
    if out.error is not None:
        assert big, f"valid input refused: {out.error!r} ({what}, {opts.kwargs})"
        expect_named(out, arguments, what)
        return
    if big and not validate:
        return
    u = unit_roundoff(f)
    sv = [float(x) for x in s.double()]
    positive = [float(x) > float(o["threshold"]) for x in r.double()]
    groups = ref_groups([float(x) for x in r.double()], g.tolist(), float(o["threshold"]))
    denom = (
        len(groups.order)
        if o["normalize"] == "all"
        else sum(groups.has_signal(q) for q in groups.order)
    )
    ds = 4 * u * max(1.0, max(abs(x) for x in sv))
    margin = float(o["margin"])
    spread = max(sv) - min(sv) + ds
    mag = max(1.0, abs(float(j)), max(abs(x) for x in sv))
    if o["objective"] == "auc_logistic":
        mag = max(mag, tau)
    if o["objective"] == "auc_sq_hinge":
        mag = max(mag, prod(margin + spread, margin + spread))  # inf, not OverflowError
    lip = 4.0 * (margin + spread) if o["objective"] == "auc_sq_hinge" else 2.0
    n = len(sv)
    if which == "objective":
        assert_close("objective", out.value, j, lip * ds + 16 * n * u * mag)
    else:
        ws = weight_sensitivity(o["objective"], tau, ds, denom, sv, positive, g.tolist())
        w_bound = 2.0 * (margin + spread) if o["objective"] == "auc_sq_hinge" else 1.0
        assert_all_close("weights", out.value, w, ws + 64 * u * w_bound / max(denom, 1))


# --------------------------------------------------------------------------- penalties


@st.composite
def penalty_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    dtype = draw(st.sampled_from([F64, torch.float32, torch.float16, torch.bfloat16, torch.int64]))
    shape = draw(st.sampled_from([(), (3,), (2, 2)]))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3, 1e30]))
    vals = draw(st.lists(st.floats(-1.0, 1.0), min_size=4, max_size=4))
    kl = (torch.tensor(vals[: math.prod(shape)], dtype=F64) * scale).reshape(shape).to(dtype)
    fn = draw(st.sampled_from(["squared_hinge_penalty", "constraint_penalty", "constraint_slope"]))
    names = ("delta", "beta") if fn == "squared_hinge_penalty" else ("constraint", "delta", "beta")
    f = kl.dtype if kl.dtype.is_floating_point else torch.get_default_dtype()
    opts = draw_options(draw, DISCO, names, dtype=f)
    kwargs = dict(opts.kwargs)
    if fn == "squared_hinge_penalty":
        kwargs.setdefault("delta", 1e-4)
        kwargs.setdefault("beta", 1e3)
        opts.resolved["constraint"] = "squared_hinge"
    else:
        kwargs.setdefault("constraint", "squared_hinge")
        kwargs.setdefault("delta", 1e-4)
        kwargs.setdefault("beta", 1e3)
    verdict, bad, what = VALID, (), "valid"
    lam = 0.0
    if opts.invalid is not None:
        verdict, bad, what = INVALID, (opts.invalid,), f"option {opts.invalid}"
    if fn != "squared_hinge_penalty" and opts.resolved["constraint"] == "lagrangian":
        mult, lam, ok = multiplier_for(draw, "lagrangian")
        kwargs.update(mult)
        if not ok and verdict == VALID:
            verdict, bad, what = INVALID, ("multiplier",), "multiplier"
    kind = draw(st.sampled_from(["ok", "ok", "ok", "list", "complex"]))
    if kind != "ok" and verdict == VALID:
        kl = kl.tolist() if kind == "list" else kl.to(torch.complex64)
        verdict, bad, what = INVALID, ("kl",), kind
    return fn, kl, kwargs, opts, lam, verdict, bad, what, f


@fuzz(500)
@given(case=penalty_cases())
def test_penalties(case: tuple[Any, ...]) -> None:
    fn_name, kl, kwargs, opts, lam, verdict, bad, what = case[:8]
    f = case[8]
    fn = {
        "squared_hinge_penalty": squared_hinge_penalty,
        "constraint_penalty": constraint_penalty,
        "constraint_slope": constraint_slope,
    }[fn_name]
    out = run_call(lambda: fn(kl, **kwargs))
    if verdict == INVALID:
        expect_error(out, bad, f"{fn_name}: {what}, {kwargs}")
        return
    constraint = kwargs.get("constraint", "squared_hinge")
    delta, beta = float(kwargs["delta"]), float(kwargs["beta"])
    k = kl.double()
    if fn_name == "constraint_slope":
        ref = torch.tensor(
            [ref_constraint_slope(float(x), constraint, delta, beta, lam) for x in k.reshape(-1)],
            dtype=F64,
        ).reshape(k.shape)
        # the slope is evaluated at kl rounded to its dtype, as given
    else:
        ref = ref_constraint_penalty(k, constraint, delta, beta, lam)
    assert out.error is None, f"{fn_name} refused valid input: {out.error!r} ({kwargs})"
    value = out.value
    assert value.shape == k.shape
    u = unit_roundoff(f)
    # No validate flag: elementwise ops that return inf where the result overflows the dtype.
    if overflows(f, ref, beta * (k.abs().max() + delta)):
        return
    # kl - delta rounds in the dtype: the penalty moves by its slope times that rounding
    slope = (
        torch.tensor([ref_constraint_slope(float(x), constraint, delta, beta, lam)
                      for x in k.reshape(-1)], dtype=F64).abs().max()
        if k.numel() else torch.tensor(0.0)
    )  # fmt: skip
    near_kink = bool(((k - delta).abs() <= 4 * u * (k.abs() + delta)).any())
    jump = beta if (fn_name == "constraint_slope" and constraint == "hinge" and near_kink) else 0
    subnormal = 4 * torch.finfo(f).tiny * u  # results below the normal range are quantised
    atol = (
        8 * u * (float(ref.abs().max()) if ref.numel() else 0.0)
        + 8 * u * float(slope) * (float(k.abs().max()) + delta if k.numel() else 0.0)
        + jump
        + subnormal
    )
    if fn_name == "constraint_slope" and constraint == "squared_hinge":
        atol += 8 * u * beta * (float(k.abs().max()) + delta)
    assert_all_close(fn_name, value, ref, atol)


# --------------------------------------------------------------------------- options objects


@fuzz(400)
@given(data=st.data(), dtype=st.sampled_from([F64, torch.float32]))
def test_disco_options(data: st.DataObject, dtype: torch.dtype) -> None:
    """DiscoOptions checks what it can without inputs; check_dtype adds the dtype limits."""
    opts = data.draw(options(DISCO, tuple(DISCO)))
    out = run_call(lambda: DiscoOptions(**opts.kwargs))
    if opts.invalid is not None:
        expect_error(out, (opts.invalid,), f"{opts.kwargs}")
        return
    assert out.error is None, f"{out.error!r} ({opts.kwargs})"
    made = out.value
    for name, value in opts.kwargs.items():
        got = getattr(made, name)
        assert got == value or (value is None and got is None), (name, got, value)
    resolved = dict(opts.resolved, tau=resolved_tau(opts.resolved))
    limited = dtype_refusals(DISCO, resolved, dtype)
    checked = run_call(lambda: made.check_dtype(dtype))
    if limited:
        expect_error(checked, tuple(limited), f"check_dtype({dtype}) of {opts.kwargs}")
    else:
        assert checked.error is None, f"{checked.error!r} for {dtype} ({opts.kwargs})"


@st.composite
def kl_values(draw: st.DrawFn) -> tuple[Any, bool, str]:
    """(kl, valid, what) for LagrangeMultiplier.update; nan/inf tensors are value errors."""
    kind = draw(
        st.sampled_from(["float", "tensor", "tensor1", "bad_type", "bad_shape", "nan", "meta"])
    )
    x = draw(st.sampled_from([0.0, 1e-4, 0.05, -0.3, 2.0, 1e300]))
    if kind == "float":
        return x, True, "float"
    if kind == "tensor":
        return torch.tensor(x, dtype=draw(st.sampled_from([F64, torch.float32]))), True, "t"
    if kind == "tensor1":
        return torch.tensor([x]), True, "t1"
    if kind == "bad_type":
        return draw(st.sampled_from(["0.1", True, None, [0.1], math.nan, math.inf])), False, "type"
    if kind == "bad_shape":
        return draw(st.sampled_from([torch.zeros(2), torch.tensor(True)])), False, "shape"
    if kind == "meta":
        return torch.tensor(x).to("meta"), False, "meta"
    return torch.tensor(draw(st.sampled_from([math.nan, math.inf, -math.inf]))), False, "nan"


@fuzz(500)
@given(data=st.data(), kl=kl_values(), validate=st.booleans())
def test_lagrange_multiplier(data: st.DataObject, kl: tuple[Any, bool, str], validate: bool):
    draw = data.draw
    ctor = draw(options(MULTIPLIER, ("lr", "init", "max_value")))
    made = run_call(lambda: LagrangeMultiplier(**ctor.kwargs))
    if ctor.invalid is not None:
        expect_error(made, (ctor.invalid,), f"{ctor.kwargs}")
        return
    assert made.error is None, f"{made.error!r} ({ctor.kwargs})"
    m = made.value
    before = float(m.value)
    upd = draw(options(MULTIPLIER, ("delta",)))
    upd.kwargs.setdefault("delta", upd.resolved["delta"])  # a required keyword
    value, valid, what = kl
    out = run_call(lambda: m.update(value, **upd.kwargs, validate=validate))
    if upd.invalid is not None:
        expect_error(out, (upd.invalid,), f"{upd.kwargs}")
        return
    if not valid:
        if what == "nan" and not validate:
            assert out.error is None, repr(out.error)
            assert float(m.value) == before, "a non-finite KL entered the multiplier"
            return
        expect_error(out, ("kl", "validate") if what == "meta" else ("kl",), f"kl={value!r}")
        return
    lr = float(ctor.resolved["lr"])
    max_value = ctor.resolved["max_value"]
    delta = float(upd.resolved["delta"])
    x = float(value)  # a float32 tensor of 1e300 is inf
    if not math.isfinite(x):
        if validate:
            expect_error(out, ("kl",), f"kl={value!r}")
        else:
            assert out.error is None and float(m.value) == before
        return
    expected = max(0.0, before + lr * (x - delta))
    if max_value is not None:
        expected = min(expected, float(max_value))
    if not math.isfinite(expected):
        if validate:
            expect_error(out, ("lr",), "overflow")
        else:
            assert out.error is None and float(m.value) == before
        return
    assert out.error is None, f"{out.error!r}"
    assert math.isclose(float(m.value), expected, rel_tol=1e-12, abs_tol=1e-300), (
        float(m.value),
        expected,
    )
    # the state round trip, and a state with one bad entry
    state = m.state_dict()
    key = draw(st.sampled_from(["ok", "value", "lr", "max_value", "steps", "missing", "type"]))
    restored = LagrangeMultiplier()
    if key == "ok":
        assert run_call(lambda: restored.load_state_dict(state)).error is None
        assert float(restored.value) == float(m.value)
        return
    if key == "missing":
        bad: Any = {k: v for k, v in state.items() if k != "lr"}
        names = ("lr",)
    elif key == "type":
        bad, names = [state], ("state",)
    else:
        bad = dict(state)
        bad[key] = draw(st.sampled_from([math.nan, -1.0, "x", torch.tensor([1.0, 2.0])]))
        names = (key,)
    expect_error(run_call(lambda: restored.load_state_dict(bad)), names, f"state {key}")


# --------------------------------------------------------------------------- accumulation

PLAN_OPTIONS = (
    "score", "objective", "tau", "delta", "beta", "threshold", "normalize", "constraint",
    "cvar_alpha", "margin", "lam", "max_length",
)  # fmt: skip
STATS_ROLES = {
    "scores": RESP_FLOAT,
    "kl_sums": RESP_FLOAT,
    "lengths": RESP_FLOAT,
    "rewards": RESP_REAL,
    "group_ids": RESP_INT,
}


@st.composite
def plan_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    tokens = draw(token_batches(max_groups=4, max_group=4, max_t=1))
    b = tokens.rewards.shape[0]
    dtype = draw(st.sampled_from([F64, torch.float32, torch.float16]))
    scores = torch.tensor(draw(st.lists(st.floats(-30.0, 2.0), min_size=b, max_size=b)))
    kl_sums = torch.tensor(draw(st.lists(st.floats(-1.0, 5.0), min_size=b, max_size=b)))
    lengths = torch.tensor(draw(st.lists(st.integers(1, 50), min_size=b, max_size=b)), dtype=F64)
    stats = {"scores": scores.to(dtype), "kl_sums": kl_sums.to(dtype), "lengths": lengths.to(dtype)}
    validate = draw(st.sampled_from([True, True, False]))
    f = F64 if dtype == F64 else torch.float32
    opts = draw_options(draw, DISCO, PLAN_OPTIONS, dtype=f, fixed=drpo(draw))
    kwargs = dict(opts.kwargs, validate=validate)
    mult, lam, ok = multiplier_for(draw, opts.resolved["constraint"])
    if not ok and opts.invalid is not None:  # one wrong thing at most
        mult, ok = {"multiplier": LagrangeMultiplier(init=lam)}, True
    kwargs.update(mult)
    args = dict(stats, rewards=tokens.rewards, group_ids=tokens.group_ids)
    verdict, names, what = VALID, (), "valid"
    objective, max_length = opts.resolved["objective"], opts.resolved["max_length"]
    prefs, pref_names = draw_preferences(
        draw, b, objective, max_length, allow_invalid=opts.invalid is None and ok
    )
    if prefs is not None:
        args["preferences"] = prefs
    if opts.invalid is not None:
        verdict, names, what = INVALID, (opts.invalid,), f"option {opts.invalid}"
    elif not ok:
        verdict, names, what = INVALID, ("multiplier",), "multiplier"
    elif pref_names:
        verdict, names, what = INVALID, pref_names, "preferences"
    else:
        kind = draw(st.sampled_from(["mutate", "mutate", "length"]))
        if kind == "length":
            y = args["lengths"].clone()
            y[draw(st.integers(0, b - 1))] = draw(st.sampled_from([0.0, -3.0, 2.5, math.nan]))
            args["lengths"] = y
            verdict, names, what = (INVALID if validate else UNCHECKED), ("stats.lengths",), "len"
        else:
            roles = {**STATS_ROLES, **({"preferences": RESP_REAL} if prefs is not None else {})}
            m = mutate(draw, args, roles, validate=validate)
            args, what = m.args, m.what
            if m.verdict != VALID:
                verdict = m.verdict
                names = tuple(f"stats.{n}" if n in stats else n for n in m.names)
            if prefs is not None and args["preferences"] is None:
                verdict = none_preferences_verdict(objective, max_length, True)
                names = ("preferences", "max_length")
    return args, kwargs, opts, lam, verdict, names, what, f


@fuzz(800)
@given(case=plan_cases())
def test_plan_minibatch(case: tuple[Any, ...]) -> None:
    args, kwargs, opts, lam, verdict, names, what, f = case
    stats = ResponseStats(args["scores"], args["kl_sums"], args["lengths"])
    prefs = args.get("preferences")
    out = run_call(
        lambda: plan_minibatch(
            stats, args["rewards"], args["group_ids"], preferences=prefs, **kwargs
        )
    )
    arguments = parameters(plan_minibatch) + tuple(f"stats.{n}" for n in ResponseStats._fields)
    context = f"{what}; {kwargs}"
    if verdict == INVALID:
        expect_error(out, names, context)
        return
    if verdict == UNCHECKED:
        if out.error is not None:
            expect_named(out, arguments, context)
        return
    o = opts.resolved
    s = stats.scores.detach().double()
    k = stats.kl_sums.double()
    n = stats.lengths.double()
    r, g = args["rewards"], args["group_ids"]
    if prefs is None and o["objective"] == "drpo":
        # the paper's length reward from the stats' token counts
        prefs = torch.tensor([1.0 - float(x) / o["max_length"] for x in n], dtype=F64)
    j, w = ref_objective_and_weights(
        s, r, g, objective=o["objective"], tau=resolved_tau(o), threshold=float(o["threshold"]),
        normalize=o["normalize"], cvar_alpha=float(o["cvar_alpha"]), margin=float(o["margin"]),
        lam=float(o["lam"]), preferences=prefs,
    )  # fmt: skip
    kl = k.sum() / n.sum()
    delta, beta = float(o["delta"]), float(o["beta"])
    penalty = ref_constraint_penalty(kl, o["constraint"], delta, beta, lam)
    slope = ref_constraint_slope(float(kl), o["constraint"], delta, beta, lam)
    big = overflows(f, j, w, penalty, slope, s, k.abs().sum(), -j + penalty)
    if out.error is not None:
        assert big, f"valid input refused: {out.error!r} ({context})"
        expect_named(out, arguments, context)
        return
    if big and not kwargs["validate"]:
        return
    plan = out.value
    u = unit_roundoff(f)
    sv = [float(x) for x in s]
    positive = [float(x) > float(o["threshold"]) for x in r.double()]
    groups = ref_groups([float(x) for x in r.double()], g.tolist(), float(o["threshold"]))
    denom = (
        len(groups.order)
        if o["normalize"] == "all"
        else sum(groups.has_signal(q) for q in groups.order)
    )
    ds = 4 * u * max(1.0, max(abs(x) for x in sv))
    margin = float(o["margin"])
    spread = max(sv) - min(sv) + ds
    tau = resolved_tau(o)
    ws = weight_sensitivity(o["objective"], tau, ds, denom, sv, positive, g.tolist())
    w_bound = 2.0 * (margin + spread) if o["objective"] == "auc_sq_hinge" else 1.0
    assert_all_close("weights", plan.weights, w, ws + 64 * u * w_bound / max(denom, 1))
    dkl = 8 * len(sv) * u * max(1.0, float(k.abs().max()))
    assert_close("num_tokens", plan.num_tokens, n.sum(), 0.0)
    assert_close("kl", plan.output.kl, kl, dkl)
    slope_err = {
        "squared_hinge": beta * dkl,
        "hinge": beta if abs(float(kl) - delta) <= dkl + 16 * u * delta + subnormal(f) else 0.0,
    }
    assert_close(
        "kl_coef", plan.kl_coef, slope,
        slope_err.get(o["constraint"], 0.0) + 16 * u * abs(slope) + subnormal(f),
    )  # fmt: skip
    mag = max(
        1.0,
        abs(float(j)),
        max(abs(x) for x in sv),
        tau if o["objective"] == "auc_logistic" else 0.0,
    )
    if o["objective"] == "auc_sq_hinge":
        mag = max(mag, prod(margin + spread, margin + spread))  # inf, not OverflowError
    assert_close(
        "objective",
        plan.output.objective,
        j,
        16 * len(sv) * u * mag
        + (4.0 * (margin + spread) if o["objective"] == "auc_sq_hinge" else 2.0) * ds,
    )


MICRO_OPTIONS = ("score", "kl_estimator", "delta", "beta", "constraint", "threshold", "clip_eps")


@st.composite
def micro_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    """One wrong thing at most: an option, the multiplier (used by the local approximation,
    kl_coef=None, only), num_tokens, kl_coef or a tensor argument."""
    tokens = draw(token_batches(max_groups=3))
    b = tokens.rewards.shape[0]
    validate = draw(st.sampled_from([True, True, False]))
    coef_kind = draw(st.sampled_from(["none", "none", "float", "tensor", "bad"]))
    # with kl_coef the penalty options are unused: no dtype limits apply to them
    dtype = tokens.compute_dtype if coef_kind == "none" else None
    opts = draw_options(draw, DISCO, MICRO_OPTIONS, dtype=dtype)
    kwargs = dict(opts.kwargs, validate=validate)
    verdict, names, what = VALID, (), "valid"
    if opts.invalid is not None:
        verdict, names, what = INVALID, (opts.invalid,), f"option {opts.invalid}"
    weights = torch.tensor(draw(st.lists(st.floats(-1.0, 1.0), min_size=b, max_size=b)))
    weights = weights.to(draw(st.sampled_from([F64, torch.float32])))
    present = int(tokens.bmask.sum())
    if verdict == VALID and chance(draw, 1, 4):
        value, count_verdict, n_ref = draw_count(draw, "num_tokens", present, validate)
        if count_verdict != VALID:
            verdict, names, what = count_verdict, ("num_tokens",), f"num_tokens={value!r}"
    else:
        n_ref = float(present + draw(st.sampled_from([0, 0, 3])))
        value = draw(st.sampled_from([int(n_ref), torch.tensor(n_ref)]))
    kwargs["num_tokens"] = value
    coef_value = draw(st.sampled_from([0.0, 0.5, 30.0]))
    if coef_kind == "bad" and verdict != VALID:
        coef_kind = "float"  # one wrong thing at most (and the penalty options stay unused)
    if coef_kind == "float":
        kwargs["kl_coef"] = coef_value
    elif coef_kind == "tensor":
        kwargs["kl_coef"] = torch.tensor(
            coef_value, dtype=draw(st.sampled_from([F64, torch.float32]))
        )
    elif coef_kind == "bad":
        bad = draw(
            st.sampled_from(
                [torch.tensor(-1.0), torch.tensor(math.nan), torch.tensor(math.inf), -1.0,
                 math.nan, "0.5", torch.zeros(2), torch.tensor(1), torch.tensor(0.5).to("meta")]
            )
        )  # fmt: skip
        kwargs["kl_coef"] = bad
        value_only = (
            isinstance(bad, Tensor)
            and bad.dtype.is_floating_point
            and bad.dim() == 0
            and bad.device.type == "cpu"
        )
        verdict = (UNCHECKED if not validate else INVALID) if value_only else INVALID
        names, what = ("kl_coef",), f"kl_coef={bad!r}"
    mult, lam, ok = multiplier_for(draw, opts.resolved["constraint"])
    if not ok and (verdict != VALID or "kl_coef" in kwargs):
        mult, ok = {"multiplier": LagrangeMultiplier(init=lam)}, True
    kwargs.update(mult)
    if not ok:
        verdict, names, what = INVALID, ("multiplier",), "multiplier"
    args = {
        "log_probs": tokens.log_probs,
        "old_log_probs": tokens.old_log_probs,
        "mask": tokens.mask,
        "weights": weights,
    }
    roles = {**TOKEN_ROLES, "weights": RESP_FLOAT}
    if opts.resolved["score"] == "clipped_ratio":
        kwargs["rewards"] = tokens.rewards
    if verdict == VALID:
        m = mutate(draw, args, roles, validate=validate)
        args, what = m.args, m.what
        if m.verdict != VALID:
            verdict, names = m.verdict, m.names
    return tokens, args, kwargs, opts, lam, n_ref, verdict, names, what


@fuzz(800)
@given(case=micro_cases())
def test_micro_batch_loss(case: tuple[Any, ...]) -> None:
    tokens, args, kwargs, opts, lam, n_ref, verdict, names, what = case
    lp = args["log_probs"]
    leaf = as_leaf(lp)

    def call() -> Any:
        mb = micro_batch_loss(leaf, *list(args.values())[1:], **kwargs)
        (grad,) = torch.autograd.grad(mb.loss, leaf, allow_unused=True, materialize_grads=True)
        return mb, grad

    out = run_call(call)
    arguments = parameters(micro_batch_loss)
    context = f"{what}; {kwargs}"
    if verdict == INVALID:
        expect_error_unless_overflow(out, names, arguments, data_overflow(tokens), context)
        return
    if verdict == UNCHECKED:
        if out.error is not None:
            expect_named(out, arguments, context)
        return
    o = opts.resolved
    t = tokens
    x = t.log_probs.detach().to(F64).clone().requires_grad_(True)
    old = t.old_log_probs.detach().to(F64)
    mask = [[bool(v) for v in row] for row in t.bmask.tolist()]
    positive = labels_of(t.rewards, o["threshold"])
    s = ref_token_scores(x, old, mask, o["score"], positive, float(o["clip_eps"]))
    k = ref_kl_sums(x, old, mask, o["kl_estimator"])
    n_local = sum(len(response_positions(row)) for row in mask)
    w = args["weights"].double()
    delta, beta = float(o["delta"]), float(o["beta"])
    coef = kwargs.get("kl_coef")
    if coef is None:
        penalty = (n_local / n_ref) * ref_constraint_penalty(
            k.sum() / n_local, o["constraint"], delta, beta, lam
        )
        slope = ref_constraint_slope(
            float(k.detach().sum() / n_local), o["constraint"], delta, beta, lam
        )
    else:
        slope = float(coef)
        penalty = slope * k.sum() / n_ref
    loss = -(w * s).sum() + penalty
    (grad,) = torch.autograd.grad(loss, x, allow_unused=True, materialize_grads=True)
    m = magnitudes(t.log_probs, t.old_log_probs, t.mask, (positive, float(o["clip_eps"])))
    f = t.compute_dtype
    extent = ratio_extent(m, o["score"], o["kl_estimator"])
    big = overflows(f, loss.detach(), grad, s.detach(), k.detach(), m.L * m.T, extent)
    if out.error is not None:
        assert big, f"valid input refused: {out.error!r} ({context})"
        expect_named(out, arguments, context)
        return
    if big and not kwargs["validate"]:
        return
    u = unit_roundoff(f)
    ds = score_error(m, o["score"], u)
    dkl = kl_error(m, o["kl_estimator"], u)
    wsum = float(w.abs().sum())
    excess = max(float(k.detach().sum() / n_local) - delta, 0.0)
    slopes = {"squared_hinge": beta * (excess + dkl), "hinge": beta, "kl_penalty": beta}
    slopes.update(lagrangian=lam, none=0.0)
    slope_b = slopes[o["constraint"]] if coef is None else slope
    magnitude = (
        abs(float(loss.detach()))
        + prod(wsum, max(1.0, float(s.detach().abs().max())))
        + abs(float(penalty.detach()))
        + prod(slope_b, abs(float(k.detach().sum()) / n_local))
    )
    tol = prod(wsum, ds) + prod(slope_b, dkl) + 16 * u * magnitude + subnormal(f)
    mb, g = out.value
    assert_close("loss", mb.loss, loss, tol)
    kfac = 1.0 if o["kl_estimator"] == "k1" else max(m.R, 1.0) + 1.0
    tok = 1.0 if o["score"] == "log_likelihood" else max(m.R_score, 1.0)
    slope_err = beta * dkl if (coef is None and o["constraint"] == "squared_hinge") else 0.0
    if (
        coef is None
        and o["constraint"] == "hinge"
        and abs(float(k.detach().sum() / n_local) - delta) <= dkl + 16 * u * delta + subnormal(f)
    ):
        slope_err = beta
    rel = 1.0 if o["score"] == "log_likelihood" else 1.0 + m.D_score + 2.0 * m.L
    rel_k = 1.0 if o["kl_estimator"] == "k1" else 1.0 + m.D + 2.0 * m.L
    w_max = float(w.abs().max())
    g_tol = (
        prod(64 * u * rel, w_max, tok) / m.n_min
        + (prod(slope_err, kfac) + prod(64 * u * rel_k, slope_b, kfac)) / n_ref
        + 64 * u * float(grad.abs().max())
        + unit_roundoff(t.log_probs.dtype) * float(grad.abs().max())
        + subnormal(t.log_probs.dtype)
    )
    if overflows(t.log_probs.dtype, grad):
        return  # the gradient is returned in log_probs' dtype: a float16 one can overflow
    if o["score"] == "clipped_ratio" and near_log_ratio(t, clip_bounds(float(o["clip_eps"])), u):
        g_tol += prod(2.0, w_max, tok) / m.n_min
    assert_all_close("grad", g, grad, g_tol)


STATS_OPTIONS = ("score", "kl_estimator", "threshold", "clip_eps")


@fuzz(400)
@given(case=token_cases({k: DISCO[k] for k in STATS_OPTIONS}), with_rewards=st.booleans())
def test_response_stats(case: tuple[Any, ...], with_rewards: bool) -> None:
    tokens, args, opts, validate, verdict, names, what = case
    kwargs = dict(opts.kwargs, validate=validate)
    score = opts.resolved["score"]
    if score == "clipped_ratio" or with_rewards:
        kwargs["rewards"] = tokens.rewards
    elif verdict == VALID and score == "clipped_ratio":
        verdict, names = INVALID, ("rewards", "score")
    out = run_call(lambda: response_stats(*args.values(), **kwargs))
    arguments = parameters(response_stats)
    if not check_token_outcome(out, verdict, names, what, arguments, data_overflow(tokens)):
        return
    t = tokens
    mask = [[bool(v) for v in row] for row in t.bmask.tolist()]
    positive = labels_of(t.rewards, opts.resolved["threshold"])
    lp, old = t.log_probs.double(), t.old_log_probs.double()
    s = ref_token_scores(lp, old, mask, score, positive, float(opts.resolved["clip_eps"]))
    k = ref_kl_sums(lp, old, mask, opts.resolved["kl_estimator"])
    m = magnitudes(
        t.log_probs, t.old_log_probs, t.mask, (positive, float(opts.resolved["clip_eps"]))
    )
    extent = ratio_extent(m, score, opts.resolved["kl_estimator"])
    big = overflows(t.compute_dtype, s, k, m.L * m.T, extent)
    if out.error is not None:
        assert big, repr(out.error)
        expect_named(out, arguments, what)
        return
    if big and not validate:
        return
    u = unit_roundoff(t.compute_dtype)
    stats = out.value
    assert_all_close("scores", stats.scores, s, score_error(m, score, u) + 16 * u)
    assert_all_close(
        "kl_sums", stats.kl_sums, k, m.T * kl_error(m, opts.resolved["kl_estimator"], u)
    )
    lengths = torch.tensor([len(response_positions(r)) for r in mask], dtype=F64)
    assert_all_close("lengths", stats.lengths, lengths, 0.0)


@fuzz(100)
@given(
    data=st.data(),
    n=st.integers(0, 3),
    kind=st.sampled_from(["ok", "ok", "not_list", "not_stats", "shape", "device", "dtype"]),
)
def test_response_stats_cat(data: st.DataObject, n: int, kind: str) -> None:
    parts = [
        ResponseStats(torch.randn(k + 1), torch.randn(k + 1), torch.full((k + 1,), 3.0))
        for k in range(n)
    ]
    names: tuple[str, ...] = ("parts",)
    if n == 0:
        kind = "empty"
    elif kind == "not_list":
        parts = parts[0]  # type: ignore[assignment]
    elif kind == "not_stats":
        parts = [tuple(p) for p in parts]  # type: ignore[misc]
        names = ("parts[0]",)
    elif kind != "ok":
        i = data.draw(st.integers(0, n - 1))
        bad = {
            "shape": torch.zeros(2, 2),
            "device": torch.zeros(i + 1).to("meta"),
            "dtype": torch.zeros(i + 1, dtype=torch.long),
        }[kind]
        parts[i] = parts[i]._replace(kl_sums=bad)
        names = (f"parts[{i}].kl_sums",)
    out = run_call(lambda: ResponseStats.cat(parts))
    if kind == "ok":
        assert out.error is None and out.value.scores.shape == (n * (n + 1) // 2,)
    else:
        expect_error(out, names, kind)


# --------------------------------------------------------------------------- baselines

GRPO_FAMILY = {
    "grpo_loss": (grpo_loss, ("clip_eps", "std_unbiased", "eps", "dual_clip")),
    "dr_grpo_loss": (dr_grpo_loss, ("clip_eps", "max_tokens", "dual_clip")),
    "dapo_loss": (
        dapo_loss,
        ("clip_eps_low", "clip_eps_high", "scale", "std_unbiased", "eps", "dual_clip"),
    ),
}


@st.composite
def baseline_cases(draw: st.DrawFn) -> tuple[Any, ...]:
    name = draw(st.sampled_from(sorted(GRPO_FAMILY)))
    fn, option_names = GRPO_FAMILY[name]
    tokens = draw(token_batches())
    validate = draw(st.sampled_from([True, True, False]))
    opts = draw_options(draw, BASELINES, option_names, dtype=tokens.compute_dtype)
    args = {k: getattr(tokens, k) for k in LOSS_ROLES}
    verdict, names, what = VALID, (), "valid"
    if opts.invalid is not None:
        verdict, names, what = INVALID, (opts.invalid,), f"option {opts.invalid}"
    else:
        m = mutate(draw, args, LOSS_ROLES, validate=validate)
        args, what = m.args, m.what
        if m.verdict != VALID:
            verdict, names = m.verdict, m.names
    return name, fn, tokens, args, opts, validate, verdict, names, what


@fuzz(800)
@given(case=baseline_cases())
def test_grpo_family(case: tuple[Any, ...]) -> None:
    name, fn, tokens, args, opts, validate, verdict, names, what = case
    lp = args["log_probs"]
    leaf = as_leaf(lp)

    def call() -> Any:
        out = fn(leaf, *list(args.values())[1:], **opts.kwargs, validate=validate)
        (grad,) = torch.autograd.grad(out.loss, leaf, allow_unused=True, materialize_grads=True)
        return out, grad

    out = run_call(call)
    arguments = parameters(fn)
    context = f"{name}: {what}; {opts.kwargs}"
    if not check_token_outcome(out, verdict, names, context, arguments, data_overflow(tokens)):
        return
    t = tokens
    o = opts.resolved
    rewards = [float(r) for r in t.rewards.double()]
    groups = t.group_ids.tolist()
    dual = o.get("dual_clip")
    if name == "grpo_loss":
        clip = float(o["clip_eps"])
        adv = naive_advantages(rewards, groups, scale="std", unbiased=o["std_unbiased"],
                               eps=float(o["eps"]))  # fmt: skip
        low, high, agg, max_tokens = clip, clip, "seq_mean_token_mean", None
    elif name == "dr_grpo_loss":
        clip = float(o["clip_eps"])
        adv = naive_advantages(rewards, groups, scale="none", unbiased=True, eps=0.0)
        low, high, agg = clip, clip, "seq_mean_token_sum_norm"
        max_tokens = float(o["max_tokens"]) if o["max_tokens"] is not None else t.mask.shape[1]
    else:
        adv = naive_advantages(rewards, groups, scale=o["scale"], unbiased=o["std_unbiased"],
                               eps=float(o["eps"]))  # fmt: skip
        low, high = float(o["clip_eps_low"]), float(o["clip_eps_high"])
        agg, max_tokens = "token_mean", None
    x = t.log_probs.detach().to(F64).clone().requires_grad_(True)
    mask = t.bmask
    ref = naive_clipped_loss(
        x, t.old_log_probs.double(), mask, adv, low=low, high=high, aggregation=agg,
        max_tokens=max_tokens, dual_clip=None if dual is None else float(dual),
    )  # fmt: skip
    (g_ref,) = torch.autograd.grad(ref, x, allow_unused=True, materialize_grads=True)
    m = magnitudes(t.log_probs, t.old_log_probs, t.mask)
    f = t.compute_dtype
    a_max = max([abs(a) for a in adv] + [1.0])
    big = overflows(f, ref.detach(), g_ref, m.R * m.T * a_max)
    if out.error is not None:
        assert big, f"valid input refused: {out.error!r} ({context})"
        expect_named(out, arguments, context)
        return
    if big and not validate:
        return
    value, grad = out.value
    u = unit_roundoff(f)
    # the advantages: (r - mean) / (std + eps) in f; dyadic rewards keep r - mean exact-ish
    # advantages are computed in float32 unless the rewards are float64 (dyadic rewards: the
    # centred rewards are exact, the std rounds)
    u_r = unit_roundoff(F64 if t.rewards.dtype == F64 else torch.float32)
    adv_err = 16 * max(u_r, u) * a_max
    scale_agg = (
        1.0 / (len(adv) * m.n_min)
        if agg == "seq_mean_token_mean"
        else 1.0 / (len(adv) * float(max_tokens))
        if agg == "seq_mean_token_sum_norm"
        else 1.0 / m.N
    )
    g_max = max(m.R, 1.0 + high, float(dual or 0.0))
    # lp - old is formed in f from inputs of magnitude L: 2 u L in the log-ratio
    rel = 1.0 + m.D + 2.0 * m.L
    ref_value = abs(float(ref.detach()))
    tol = (adv_err + 16 * u * a_max * rel) * g_max * m.T * len(adv) * scale_agg + 16 * u * ref_value
    assert_close("loss", value.loss, ref, tol)
    bounds = [math.log1p(high)] + ([math.log1p(-low)] if low < 1 else [])
    if dual is not None:
        bounds.append(math.log(float(dual)))
    near = near_log_ratio(t, bounds, u)
    g_tol = (
        (adv_err + 64 * u * a_max * rel) * g_max * scale_agg
        + 64 * u * float(g_ref.abs().max())
        + (a_max * g_max * scale_agg * 2 if near else 0.0)
    )
    g_tol += unit_roundoff(t.log_probs.dtype) * float(g_ref.abs().max()) + subnormal(
        t.log_probs.dtype
    )
    if overflows(t.log_probs.dtype, g_ref):
        return
    assert_all_close("grad", grad, g_ref, g_tol)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))


@fuzz(400)
@given(data=st.data(), which=st.sampled_from(["group_advantages", "dynamic_sampling_filter"]))
def test_group_advantages_and_filter(data: st.DataObject, which: str) -> None:
    draw = data.draw
    tokens = draw(token_batches(max_groups=5, max_group=4, max_t=1))
    validate = draw(st.booleans())
    names_ = ("scale", "std_unbiased", "eps") if which == "group_advantages" else ("threshold",)
    opts = draw(options(BASELINES, names_))
    roles = {"rewards": RESP_REAL, "group_ids": RESP_INT}
    args = {"rewards": tokens.rewards, "group_ids": tokens.group_ids}
    verdict, bad, what = VALID, (), "valid"
    if opts.invalid is not None:
        verdict, bad, what = INVALID, (opts.invalid,), "option"
    else:
        mm = mutate(draw, args, roles, validate=validate)
        args, what = mm.args, mm.what
        if mm.verdict != VALID:
            verdict, bad = mm.verdict, mm.names
    fn = group_advantages if which == "group_advantages" else dynamic_sampling_filter
    out = run_call(lambda: fn(*args.values(), **opts.kwargs, validate=validate))
    if not check_token_outcome(out, verdict, bad, what, parameters(fn)):
        return
    assert out.error is None, repr(out.error)
    rewards = [float(r) for r in tokens.rewards.double()]
    groups = tokens.group_ids.tolist()
    o = opts.resolved
    if which == "group_advantages":
        ref = naive_advantages(rewards, groups, scale=o["scale"], unbiased=o["std_unbiased"],
                               eps=float(o["eps"]))  # fmt: skip
        u = unit_roundoff(F64 if tokens.rewards.dtype == F64 else torch.float32)
        a = max([abs(x) for x in ref] + [1.0])
        assert_all_close("advantages", out.value, torch.tensor(ref, dtype=F64), 64 * u * a)
    else:
        thr = float(o["threshold"])
        info: dict[int, list[bool]] = {}
        for r, g in zip(rewards, groups):
            info.setdefault(g, []).append(r > thr)
        keep = [any(info[g]) and not all(info[g]) for g in groups]
        assert out.value.tolist() == keep


# --------------------------------------------------------------------------- public names


def test_every_public_function_is_fuzzed():
    """The fuzzed callables cover every public name of the core modules (classes count
    through their methods; NamedTuples and type aliases are outputs, not entry points)."""
    fuzzed = {
        "disco_loss", "sequence_scores", "kl_divergence", "discriminative_objective",
        "discriminative_weights", "squared_hinge_penalty", "constraint_penalty",
        "constraint_slope", "DiscoOptions", "LagrangeMultiplier", "plan_minibatch",
        "micro_batch_loss", "response_stats", "ResponseStats", "grpo_loss", "dr_grpo_loss",
        "dapo_loss", "group_advantages", "dynamic_sampling_filter",
    }  # fmt: skip
    outputs = {"DiscoOutput", "MiniBatchPlan", "MicroBatchLoss", "BaselineOutput",
               "AdvantageScale"}  # fmt: skip
    import discoloss.accumulation as acc
    import discoloss.baselines as base
    import discoloss.constraints as cons
    import discoloss.kl as kl
    import discoloss.objectives as obj
    import discoloss.scores as sc

    public = set(discoloss.__all__)
    for module in (acc, base, cons, kl, obj, sc):
        public |= set(module.__all__)
    assert public - outputs == fuzzed


@pytest.mark.parametrize("name", ["num_groups", "num_tokens"])
def test_count_table_is_the_one_checking_path(name: str) -> None:
    """Sanity of the strategy itself: a count drawn valid is accepted as an int and as every
    tensor form (so the fuzz examples above test the library, not the strategy)."""
    t = Tokens(
        torch.full((2, 3), -1.0), torch.full((2, 3), -1.1), torch.ones(2, 3, dtype=torch.bool),
        torch.tensor([1.0, 0.0]), torch.tensor([4, 4]), "normal",
    )  # fmt: skip
    present = 1 if name == "num_groups" else 6
    for value in (present, torch.tensor(present), torch.tensor([float(present)])):
        out = disco_loss(*(getattr(t, k) for k in LOSS_ROLES), **{name: value})
        assert torch.isfinite(out.loss)
