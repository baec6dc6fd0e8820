"""Bad inputs raise ValueError / TypeError whose message names the offending argument."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from conftest import Batch, random_batch

from discoloss import (
    disco_loss,
    discriminative_objective,
    discriminative_weights,
    kl_divergence,
    sequence_scores,
    squared_hinge_penalty,
)

F64 = torch.float64


def names(argument: str) -> re.Pattern[str]:
    """The argument as a whole identifier: "log_probs" does not match inside "old_log_probs"."""
    return re.compile(rf"(?<![A-Za-z0-9_]){re.escape(argument)}(?![A-Za-z0-9_])")


def assert_raises(exc: type[Exception], argument: str, fn: Callable[[], object]) -> str:
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    assert names(argument).search(message), f"message does not name {argument!r}: {message!r}"
    return message


@pytest.fixture
def batch() -> Batch:
    """At least 4 responses, T = 5, every response has a token in column 0, padding elsewhere."""
    b = random_batch(61, num_groups=3, max_group=3, T=5, garbage=False)
    assert b.mask.shape[0] >= 4
    mask = b.mask.clone()
    mask[:, 0] = True
    return replace(b, mask=mask)


def call(batch: Batch, **changes) -> Callable[[], object]:
    options = {k: changes.pop(k) for k in list(changes) if k not in Batch.__dataclass_fields__}
    b = replace(batch, **changes)
    return lambda: disco_loss(*b.args(), **options)


# ------------------------------------------------------------------------------- shapes


def test_shape_mismatches_name_the_argument(batch):
    _B, _T = batch.mask.shape
    lp, old, mask = batch.log_probs, batch.old_log_probs, batch.mask
    cases = [
        ("log_probs", {"log_probs": lp[:, :, None]}),
        ("log_probs", {"log_probs": lp[0]}),
        ("old_log_probs", {"old_log_probs": old[:, :-1]}),
        ("old_log_probs", {"old_log_probs": old[:-1]}),
        ("old_log_probs", {"old_log_probs": old[0]}),
        ("mask", {"mask": mask[:, :-1]}),
        ("mask", {"mask": mask[:-1]}),
        ("mask", {"mask": mask[:, :, None]}),
        ("rewards", {"rewards": batch.rewards[:-1]}),
        ("rewards", {"rewards": torch.cat([batch.rewards, batch.rewards[:1]])}),
        ("rewards", {"rewards": batch.rewards[:, None]}),
        ("group_ids", {"group_ids": batch.group_ids[:-1]}),
        ("group_ids", {"group_ids": batch.group_ids[:, None]}),
    ]
    for argument, change in cases:
        assert_raises(ValueError, argument, call(batch, **change))
        # metadata is checked even without value validation
        assert_raises(ValueError, argument, call(batch, validate=False, **change))


def test_empty_batch(batch):
    empty = Batch(
        torch.zeros(0, 5, dtype=F64),
        torch.zeros(0, 5, dtype=F64),
        torch.zeros(0, 5, dtype=torch.bool),
        torch.zeros(0, dtype=F64),
        torch.zeros(0, dtype=torch.long),
    )
    message = assert_raises(ValueError, "log_probs", lambda: disco_loss(*empty.args()))
    assert "empty" in message


def test_zero_length_responses(batch):
    B = batch.mask.shape[0]
    zero_t = replace(
        batch,
        log_probs=torch.zeros(B, 0, dtype=F64),
        old_log_probs=torch.zeros(B, 0, dtype=F64),
        mask=torch.zeros(B, 0, dtype=torch.bool),
    )
    assert_raises(ValueError, "log_probs", lambda: disco_loss(*zero_t.args()))


def test_wrong_types(batch):
    assert_raises(TypeError, "log_probs", call(batch, log_probs=batch.log_probs.long()))
    assert_raises(TypeError, "old_log_probs", call(batch, old_log_probs=batch.old_log_probs.long()))
    assert_raises(TypeError, "rewards", call(batch, rewards=batch.rewards.tolist()))
    assert_raises(TypeError, "mask", call(batch, mask=batch.mask.tolist()))
    assert_raises(TypeError, "group_ids", call(batch, group_ids=batch.group_ids.tolist()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_float_group_ids(batch, dtype):
    assert_raises(TypeError, "group_ids", call(batch, group_ids=batch.group_ids.to(dtype)))


def test_bool_group_ids(batch):
    assert_raises(TypeError, "group_ids", call(batch, group_ids=batch.group_ids > 0))


# ------------------------------------------------------------------------------- devices


@pytest.mark.parametrize("argument", ["old_log_probs", "mask", "rewards", "group_ids"])
def test_device_mismatch(batch, argument):
    """A tensor on the meta device next to CPU tensors (metadata only, runs anywhere)."""
    moved = getattr(batch, argument).to("meta")
    assert_raises(ValueError, argument, call(batch, **{argument: moved}))
    assert_raises(ValueError, argument, call(batch, validate=False, **{argument: moved}))


# ------------------------------------------------------------------------------- values


def test_response_without_tokens(batch):
    mask = batch.mask.clone()
    mask[3] = False
    message = assert_raises(ValueError, "mask", call(batch, mask=mask))
    assert "3" in message  # points at the response


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_rewards(batch, value):
    rewards = batch.rewards.clone()
    rewards[2] = value
    assert_raises(ValueError, "rewards", call(batch, rewards=rewards))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("score", ["log_likelihood", "likelihood_ratio"])
@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_non_finite_log_probs_at_response_tokens(batch, value, score, kl_estimator):
    opts = {"score": score, "kl_estimator": kl_estimator}
    lp = batch.log_probs.clone()
    lp[-1, 0] = value  # column 0 is a response token of every response
    assert_raises(ValueError, "log_probs", call(batch, log_probs=lp, **opts))
    old = batch.old_log_probs.clone()
    old[1, 0] = value
    assert_raises(ValueError, "old_log_probs", call(batch, old_log_probs=old, **opts))


@pytest.mark.parametrize("score", ["log_likelihood", "likelihood_ratio"])
@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_non_finite_values_at_padding_are_accepted(batch, score, kl_estimator):
    pad = ~batch.bmask
    assert bool(pad.any())
    lp = batch.log_probs.masked_fill(pad, math.nan)
    old = batch.old_log_probs.masked_fill(pad, -math.inf)
    out = disco_loss(
        lp, old, batch.mask, batch.rewards, batch.group_ids, score=score, kl_estimator=kl_estimator
    )
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize(
    "mask_values",
    [
        torch.tensor([1, 0, 2, 0, 1], dtype=torch.int64),
        torch.tensor([1, 0, -1, 0, 1], dtype=torch.int32),
        torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0], dtype=torch.float32),
        torch.tensor([1.0, 0.0, math.nan, 0.0, 1.0], dtype=torch.float32),
    ],
    ids=["int2", "int-1", "float0.5", "floatnan"],
)
def test_mask_values_other_than_0_1(batch, mask_values):
    mask = batch.mask.to(mask_values.dtype)
    mask[2] = mask_values
    assert_raises(ValueError, "mask", call(batch, mask=mask))


# ------------------------------------------------------------------------------- options


@pytest.mark.parametrize("tau", [0.0, -1.0, -1e-300, math.nan])
def test_bad_tau(batch, tau):
    assert_raises(ValueError, "tau", call(batch, tau=tau))


@pytest.mark.parametrize("delta", [-1e-6, -1.0, math.nan])
def test_bad_delta(batch, delta):
    assert_raises(ValueError, "delta", call(batch, delta=delta))


@pytest.mark.parametrize("beta", [-1e-6, -1.0, math.nan])
def test_bad_beta(batch, beta):
    assert_raises(ValueError, "beta", call(batch, beta=beta))


def test_nan_threshold(batch):
    assert_raises(ValueError, "threshold", call(batch, threshold=math.nan))


@pytest.mark.parametrize("argument", ["tau", "delta", "beta", "threshold"])
def test_non_numeric_options(batch, argument):
    assert_raises(TypeError, argument, call(batch, **{argument: "1.0"}))
    assert_raises(TypeError, argument, call(batch, **{argument: torch.tensor(1.0)}))


@pytest.mark.parametrize(
    "argument,valid",
    [
        ("score", ["log_likelihood", "likelihood_ratio"]),
        ("objective", ["disco", "disco_b"]),
        ("kl_estimator", ["k1", "k3"]),
        ("normalize", ["all", "valid"]),
    ],
)
def test_unknown_option_strings_list_the_valid_ones(batch, argument, valid):
    for bad in ("nope", valid[0].upper(), ""):
        message = assert_raises(ValueError, argument, call(batch, **{argument: bad}))
        for v in valid:
            assert repr(v) in message or v in message, (v, message)


# ------------------------------------------------------------------------------- building blocks


def test_scores_kl_and_penalty_name_their_arguments(batch):
    lp, old, mask = batch.log_probs, batch.old_log_probs, batch.mask
    assert_raises(ValueError, "score", lambda: sequence_scores(lp, old, mask, score="ratio"))
    assert_raises(
        ValueError,
        "old_log_probs",
        lambda: sequence_scores(lp, None, mask, score="likelihood_ratio"),
    )
    assert_raises(ValueError, "mask", lambda: sequence_scores(lp, old, mask[:, 1:]))
    assert_raises(ValueError, "estimator", lambda: kl_divergence(lp, old, mask, estimator="k2"))
    assert_raises(ValueError, "old_log_probs", lambda: kl_divergence(lp, old[1:], mask))
    lp_nan = lp.clone()
    lp_nan[0, 0] = math.nan
    assert_raises(ValueError, "log_probs", lambda: kl_divergence(lp_nan, old, mask))
    kl = torch.tensor(0.5)
    assert_raises(ValueError, "delta", lambda: squared_hinge_penalty(kl, delta=-1.0, beta=1.0))
    assert_raises(ValueError, "beta", lambda: squared_hinge_penalty(kl, delta=0.0, beta=-1.0))
    assert_raises(ValueError, "beta", lambda: squared_hinge_penalty(kl, delta=0.0, beta=math.nan))
    assert_raises(TypeError, "kl", lambda: squared_hinge_penalty(0.5, delta=0.0, beta=1.0))


@pytest.mark.parametrize(
    "fn", [discriminative_objective, discriminative_weights], ids=lambda f: f.__name__
)
def test_objective_functions_name_their_arguments(batch, fn):
    s = torch.randn(batch.rewards.shape[0], dtype=F64)
    r, g = batch.rewards, batch.group_ids
    assert_raises(ValueError, "scores", lambda: fn(s[:, None], r, g))
    assert_raises(TypeError, "scores", lambda: fn(s.long(), r, g))
    assert_raises(ValueError, "rewards", lambda: fn(s, r[1:], g))
    assert_raises(ValueError, "group_ids", lambda: fn(s, r, g[1:]))
    assert_raises(TypeError, "group_ids", lambda: fn(s, r, g.double()))
    assert_raises(TypeError, "group_ids", lambda: fn(s, r, g > 0))
    assert_raises(ValueError, "tau", lambda: fn(s, r, g, tau=0.0))
    assert_raises(ValueError, "objective", lambda: fn(s, r, g, objective="grpo"))
    assert_raises(ValueError, "normalize", lambda: fn(s, r, g, normalize="none"))
    r_bad = r.clone()
    r_bad[0] = math.nan
    assert_raises(ValueError, "rewards", lambda: fn(s, r_bad, g))
    s_bad = s.clone()
    s_bad[1] = math.inf
    assert_raises(ValueError, "scores", lambda: fn(s_bad, r, g))
    assert_raises(ValueError, "group_ids", lambda: fn(s, r, g.to("meta")))
