"""The error contract, pattern by pattern: inputs that were silently accepted or ended in a
traceback, each refused with a clear error now; what validation costs (one host sync with
``validate=True``, none without); the meta device.

The fuzz suite (test_fuzz.py) explores the same classes of inputs at random; these are the
named cases.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import random_batch
from reference import ref_disco_any

from discoloss import (
    LagrangeMultiplier,
    disco_loss,
    discriminative_objective,
    discriminative_weights,
    kl_divergence,
    sequence_scores,
)
from discoloss.accumulation import ResponseStats, micro_batch_loss, plan_minibatch, response_stats
from discoloss.analysis import difficulty_report, difficulty_weight, implied_weights
from discoloss.analysis.cli import main as analyze_main
from discoloss.baselines import (
    dapo_loss,
    dr_grpo_loss,
    dynamic_sampling_filter,
    group_advantages,
    grpo_loss,
)

F64 = torch.float64


def raises_naming(exc: type[Exception], name: str, fn: Callable[[], object]) -> str:
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message), message
    return message


@pytest.fixture
def batch() -> Any:
    """6 groups, every response with tokens in columns 0..7 at least, 48 response tokens in
    the first 6 responses (the issue's example)."""
    b = random_batch(5, num_groups=4, max_group=4, T=8, garbage=False, shift=0.05)
    return b


# --------------------------------------------------------------------------- counts


def test_num_tokens_below_the_batch_is_refused_as_int_and_as_tensor():
    """The issue's example: num_tokens=5 with 48 response tokens gave a KL ten times too large."""
    b = random_batch(5, num_groups=3, T=8, garbage=False)
    mask = torch.ones_like(b.mask)[:6]
    args = (b.log_probs[:6], b.old_log_probs[:6], mask, b.rewards[:6], b.group_ids[:6])
    assert int(mask.sum()) == 48
    for value in (5, torch.tensor(5), torch.tensor([5.0])):
        message = raises_naming(
            ValueError, "num_tokens", lambda value=value: disco_loss(*args, num_tokens=value)
        )
        assert "48" in message
    out = disco_loss(*args, num_tokens=torch.tensor(48.0))
    torch.testing.assert_close(out.kl, disco_loss(*args).kl)


@pytest.mark.parametrize("name", ["num_groups", "num_tokens"])
@pytest.mark.parametrize(
    "value,exc",
    [
        (torch.tensor(-3), ValueError),
        (torch.tensor(0.0), ValueError),
        (torch.tensor(2.5), ValueError),
        (torch.tensor(math.nan), ValueError),
        (torch.tensor(math.inf), ValueError),
        (torch.tensor([4, 5]), ValueError),
        (torch.ones(1, 1, 1), ValueError),
        (torch.tensor(True), TypeError),
        (-3, ValueError),
        (0, ValueError),
        (2.0, TypeError),
        ("4", TypeError),
        (True, TypeError),
        (2**70, ValueError),
    ],
    ids=repr,
)
def test_counts_as_numbers_and_tensors_get_the_same_checks(batch, name, value, exc):
    raises_naming(exc, name, lambda: disco_loss(*batch.args(), **{name: value}))


def test_num_groups_below_the_groups_present_is_refused(batch):
    groups = len(set(batch.group_ids.tolist()))
    for value in (groups - 1, torch.tensor(groups - 1)):
        raises_naming(
            ValueError, "num_groups", lambda v=value: disco_loss(*batch.args(), num_groups=v)
        )
    disco_loss(*batch.args(), num_groups=groups)
    # normalize="valid": the normaliser counts groups with signal, the bound too
    with_signal = disco_loss(*batch.args(), normalize="valid").metrics["groups_with_signal"]
    assert int(with_signal) < groups
    disco_loss(*batch.args(), normalize="valid", num_groups=int(with_signal))


def test_count_values_are_not_read_without_validation(batch):
    """Values of tensor counts need a host sync: only validate=True checks them; metadata
    is checked either way."""
    out = disco_loss(*batch.args(), num_tokens=torch.tensor(2.5), validate=False)
    assert torch.isfinite(out.loss)
    raises_naming(
        ValueError, "num_tokens", lambda: disco_loss(*batch.args(), num_tokens=torch.zeros(2),
                                                     validate=False)
    )  # fmt: skip
    raises_naming(ValueError, "num_tokens", lambda: disco_loss(*batch.args(), num_tokens=0,
                                                               validate=False))  # fmt: skip


# --------------------------------------------------------------------------- accumulation


def micro_inputs(batch: Any) -> tuple[Any, ...]:
    stats = response_stats(batch.log_probs, batch.old_log_probs, batch.mask)
    plan = plan_minibatch(stats, batch.rewards, batch.group_ids)
    return batch.log_probs, batch.old_log_probs, batch.mask, plan


@pytest.mark.parametrize(
    "change,name",
    [
        (dict(weights=lambda w: w.clone().fill_(math.nan)), "weights"),
        (dict(weights=lambda w: w.clone().index_fill_(0, torch.tensor([2]), math.inf)), "weights"),
        (dict(num_tokens=3), "num_tokens"),
        (dict(num_tokens=torch.tensor(-1.0)), "num_tokens"),
        (dict(kl_coef=torch.tensor(-1.0)), "kl_coef"),
        (dict(kl_coef=torch.tensor(math.nan)), "kl_coef"),
        (dict(kl_coef=-1.0), "kl_coef"),
        (dict(kl_coef=torch.zeros(2)), "kl_coef"),
        (dict(kl_coef=torch.tensor(1)), "kl_coef"),
    ],
    ids=lambda x: repr(x) if isinstance(x, str) else "",
)
def test_micro_batch_loss_checks_what_it_is_given(batch, change, name):
    lp, old, mask, plan = micro_inputs(batch)
    kwargs: dict[str, Any] = {"num_tokens": plan.num_tokens, "kl_coef": plan.kl_coef}
    weights = plan.weights
    for key, value in change.items():
        if key == "weights":
            weights = value(weights)
        else:
            kwargs[key] = value
    exc = TypeError if name == "kl_coef" and isinstance(kwargs["kl_coef"], torch.Tensor) and \
        not kwargs["kl_coef"].dtype.is_floating_point else ValueError  # fmt: skip
    raises_naming(exc, name, lambda: micro_batch_loss(lp, old, mask, weights, **kwargs))


@pytest.mark.parametrize(
    "field,value",
    [("scores", math.nan), ("kl_sums", math.inf), ("lengths", -2.0), ("lengths", 0.5)],
)
def test_plan_minibatch_checks_its_stats(batch, field, value):
    stats = response_stats(batch.log_probs, batch.old_log_probs, batch.mask)
    bad = getattr(stats, field).clone()
    bad[1] = value
    stats = stats._replace(**{field: bad})
    raises_naming(
        ValueError, f"stats.{field}", lambda: plan_minibatch(stats, batch.rewards, batch.group_ids)
    )
    plan_minibatch(stats, batch.rewards, batch.group_ids, validate=False)  # unchecked


def test_nan_rewards_reach_no_plan(batch):
    stats = response_stats(batch.log_probs, batch.old_log_probs, batch.mask)
    rewards = batch.rewards.clone()
    rewards[0] = math.nan
    raises_naming(ValueError, "rewards", lambda: plan_minibatch(stats, rewards, batch.group_ids))


# --------------------------------------------------------------------------- dtype ranges


@pytest.mark.parametrize("tau", [1e39, 1e-40, 1e32, 1e-33])
@pytest.mark.parametrize("objective", ["disco", "disco_2way", "auc_logistic"])
def test_tau_beyond_float32_is_refused_naming_the_range(batch, tau, objective):
    b32 = batch.to(torch.float32)
    message = raises_naming(
        ValueError, "tau", lambda: disco_loss(*b32.args(), tau=tau, objective=objective)
    )
    assert "float32" in message and "[" in message
    # the same value in float64 computes (and float32 inputs with DisCO-b do not use tau)
    assert torch.isfinite(disco_loss(*batch.args(), tau=tau, objective=objective).loss)
    assert torch.isfinite(disco_loss(*b32.args(), tau=tau, objective="disco_b").loss)


@pytest.mark.parametrize("objective", ["disco", "disco_2way", "auc_logistic"])
@pytest.mark.parametrize("end", ["low", "high"])
def test_tau_at_the_ends_of_its_float32_range_equals_the_reference(batch, objective, end):
    fi = torch.finfo(torch.float32)
    tau = fi.tiny / fi.eps if end == "low" else fi.max * fi.eps
    b32 = batch.to(torch.float32).leaf()
    out = disco_loss(*b32.args(), tau=tau, objective=objective, beta=0.0)
    out.loss.backward()
    ref = ref_disco_any(*batch.to(torch.float32).args(), tau=tau, objective=objective, beta=0.0)
    scale = max(1.0, abs(float(ref.objective)))
    torch.testing.assert_close(out.objective.double(), ref.objective, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(b32.log_probs.grad.double(), ref.grad, rtol=1e-3, atol=1e-6)


def test_half_precision_is_checked_in_float32_where_it_computes(batch):
    """bfloat16 and float16 inputs are reduced in float32: float32's range applies to tau, not
    float16's (tau = 1e6 is beyond float16's largest number but works)."""
    b16 = batch.to(torch.float16)
    assert torch.isfinite(disco_loss(*b16.args(), tau=1e6).loss)
    raises_naming(ValueError, "tau", lambda: disco_loss(*b16.args(), tau=1e39))


@pytest.mark.parametrize(
    "options,name",
    [
        (dict(beta=1e39), "beta"),
        (dict(beta=1e39, constraint="kl_penalty"), "beta"),
        (dict(delta=1e39, constraint="lagrangian", multiplier=LagrangeMultiplier()), "delta"),
        (dict(margin=1e20, objective="auc_sq_hinge"), "margin"),
        (dict(cvar_alpha=1e-40, objective="cvar"), "cvar_alpha"),
    ],
)
def test_other_options_beyond_float32(batch, options, name):
    b32 = batch.to(torch.float32)
    raises_naming(ValueError, name, lambda: disco_loss(*b32.args(), **options))
    assert torch.isfinite(disco_loss(*batch.args(), **options).loss)  # float64 holds them


def test_values_that_only_break_other_options_are_not_refused(batch):
    b32 = batch.to(torch.float32)
    for options in (dict(beta=1e39, constraint="none"), dict(delta=1e39), dict(margin=1e20)):
        assert torch.isfinite(disco_loss(*b32.args(), **options).loss), options


def test_results_beyond_the_dtype_are_refused(batch):
    """Valid options and finite inputs whose penalty overflows float32 together."""
    b32 = batch.to(torch.float32)
    lp = b32.log_probs - 1e30 * b32.bmask
    raises_naming(ValueError, "beta", lambda: disco_loss(lp, *b32.args()[1:], delta=0.0))
    out = disco_loss(lp, *b32.args()[1:], delta=0.0, validate=False)  # unchecked: IEEE inf
    assert not torch.isfinite(out.penalty)


def test_labels_compare_rewards_with_the_threshold_in_float64(batch):
    """A threshold rounded to a float16 reward dtype flipped labels: 1.0 > 0.99999."""
    r16 = torch.ones_like(batch.rewards, dtype=torch.float16)
    r64 = torch.ones_like(batch.rewards)
    for threshold in (0.99999, 1.0 - 2**-30):
        a = disco_loss(*batch.args()[:3], r16, batch.group_ids, threshold=threshold)
        b = disco_loss(*batch.args()[:3], r64, batch.group_ids, threshold=threshold)
        assert float(a.metrics["frac_positive"]) == float(b.metrics["frac_positive"]) == 1.0


def test_drpo_weights_do_not_depend_on_the_scores_dtype_or_a_small_lam():
    """DRPO's logits pref / lam were formed in the scores' dtype: a lam below float32's range
    or float64 preferences beyond it gave nan (refused under validate with a message blaming
    the scores), and preferences closer than float32 resolves were treated as equal (a
    silently wrong weighting)."""
    lp = torch.tensor([[-1.0, -2.0], [-1.5, -0.5], [-1.0, -1.0]])
    mask, rewards, ids = torch.ones(3, 2), torch.tensor([1.0, 1.0, 0.0]), torch.zeros(3).long()
    cases: list[dict[str, Any]] = [
        dict(preferences=torch.tensor([1e300, -1e300, 0.0], dtype=torch.float64)),
        dict(preferences=torch.tensor([1.0, 1.0 + 2e-12, 0.0], dtype=torch.float64), lam=1e-12),
        dict(max_length=4, lam=1e-40),
    ]  # fmt: skip
    for kwargs in cases:
        for validate in (True, False):
            out = disco_loss(lp, lp, mask, rewards, ids, objective="drpo", validate=validate,
                             **kwargs)  # fmt: skip
            ref = ref_disco_any(
                lp, lp, mask, rewards, ids, objective="drpo",
                lam=float(kwargs.get("lam", 0.1)), max_length=kwargs.get("max_length"),
                preferences=kwargs.get("preferences"),
            )  # fmt: skip
            assert float(out.objective) == pytest.approx(float(ref.objective), rel=1e-6, abs=1e-6)


# --------------------------------------------------------------------------- multiplier


@pytest.mark.parametrize(
    "kl", [math.nan, math.inf, torch.tensor(math.nan), torch.tensor([-math.inf])]
)
def test_multiplier_refuses_a_non_finite_kl(kl):
    m = LagrangeMultiplier(lr=10.0, init=0.5)
    raises_naming(ValueError, "kl", lambda: m.update(kl, delta=0.1))
    assert float(m.value) == 0.5 and m.steps == 0
    if isinstance(kl, torch.Tensor):  # unchecked: no sync, and the state stays usable
        m.update(kl, delta=0.1, validate=False)
        assert float(m.value) == 0.5
    m.update(torch.tensor(0.2, dtype=F64), delta=0.1)
    assert math.isclose(float(m.value), 1.5)


@pytest.mark.parametrize(
    "kl,exc", [(torch.zeros(3), ValueError), (torch.tensor(True), TypeError), ("0.1", TypeError)]
)
def test_multiplier_refuses_malformed_kl(kl, exc):
    raises_naming(exc, "kl", lambda: LagrangeMultiplier().update(kl, delta=0.1))


def test_multiplier_overflow_is_refused():
    m = LagrangeMultiplier(lr=1e308)
    raises_naming(ValueError, "lr", lambda: m.update(1e10, delta=0.0))


@pytest.mark.parametrize("key,value", [("value", math.nan), ("value", -1.0), ("lr", 0.0),
                                       ("max_value", "x"), ("steps", -1)])  # fmt: skip
def test_multiplier_state_is_checked(key, value):
    state = LagrangeMultiplier().state_dict()
    state[key] = value
    with pytest.raises((ValueError, TypeError), match=re.escape(f"state['{key}']")):
        LagrangeMultiplier().load_state_dict(state)


# --------------------------------------------------------------------------- analyze


def run_analyze(path: Path, tmp: Path, *extra: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = analyze_main([str(path), "--out", str(tmp / "out"), "--no-plot", *extra])
    return code, err.getvalue()


def test_analyze_random_bytes_exits_2_with_a_message(tmp_path):
    path = tmp_path / "rollouts.jsonl"
    path.write_bytes(bytes(range(256)) * 4)
    code, err = run_analyze(path, tmp_path)
    assert code == 2
    assert err.startswith("discoloss analyze: error: ") and "not UTF-8 text" in err
    assert "Traceback" not in err


def test_analyze_reads_a_parquet_file_under_a_jsonl_name(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rollouts.jsonl"
    pq.write_table(pa.table({"score": [1.0, 0.0, 1.0], "uid": ["a", "a", "b"]}), path)
    assert run_analyze(path, tmp_path)[0] == 0
    # forced to JSONL it is refused, with the hint
    code, err = run_analyze(path, tmp_path, "--format", "jsonl")
    assert code == 2 and "--format parquet" in err


# --------------------------------------------------------------------------- host syncs

TRAPPED = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def count_host_reads(monkeypatch: pytest.MonkeyPatch, *, forbid: bool) -> Iterator[list[str]]:
    """Record (or forbid) every Python-level read of tensor values on the host."""
    reads: list[str] = []
    with monkeypatch.context() as m:
        for name in TRAPPED:
            original = getattr(torch.Tensor, name)

            def wrapper(self, *a, __name=name, __original=original, **k):  # type: ignore[no-untyped-def]
                if forbid:
                    raise AssertionError(f"host read: Tensor.{__name}")
                reads.append(__name)
                return __original(self, *a, **k)

            m.setattr(torch.Tensor, name, wrapper)
        yield reads


def test_tensor_counts_and_coefficients_add_no_sync_without_validation(batch, monkeypatch):
    lp, old, mask, plan = micro_inputs(batch)
    counts = dict(num_groups=torch.tensor(9), num_tokens=torch.tensor(500.0))
    with count_host_reads(monkeypatch, forbid=True):
        out = disco_loss(*batch.args(), **counts, validate=False)
        out.loss.backward() if out.loss.requires_grad else None
        stats = response_stats(lp, old, mask, validate=False)
        plan_minibatch(stats, batch.rewards, batch.group_ids, validate=False)
        for coef in (None, plan.kl_coef, 0.5):
            micro_batch_loss(lp, old, mask, plan.weights, num_tokens=plan.num_tokens,
                             kl_coef=coef, validate=False)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU-only check: needs CUDA")
def test_counts_and_coefficients_are_sync_free_on_cuda(batch):
    cuda = tuple(t.cuda() for t in batch.args())
    lp, old, mask = cuda[:3]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for counts in (
            dict(num_groups=9, num_tokens=500),
            dict(num_groups=torch.tensor(9.0).cuda(), num_tokens=torch.tensor(500).cuda()),
        ):
            disco_loss(*cuda, **counts, validate=False)
        stats = response_stats(lp, old, mask, validate=False)
        plan = plan_minibatch(stats, cuda[3], cuda[4], validate=False)
        for coef in (None, plan.kl_coef, 0.5):
            micro_batch_loss(
                lp,
                old,
                mask,
                plan.weights,
                num_tokens=plan.num_tokens,
                kl_coef=coef,
                validate=False,
            )
            micro_batch_loss(
                lp, old, mask, plan.weights, num_tokens=500, kl_coef=coef, validate=False
            )
    finally:
        torch.cuda.set_sync_debug_mode("default")


def one_sync(reads: list[str]) -> bool:
    """One copy of the flag vector to the host, then reads of that host copy only."""
    return reads[:1] == ["cpu"] and set(reads[1:]) <= {"__bool__"}


def test_validation_of_tensor_counts_is_folded_into_the_one_sync(batch, monkeypatch):
    lp, old, mask, plan = micro_inputs(batch)
    with count_host_reads(monkeypatch, forbid=False) as reads:
        disco_loss(*batch.args(), num_groups=torch.tensor(9), num_tokens=torch.tensor(500.0))
    assert one_sync(reads), reads
    with count_host_reads(monkeypatch, forbid=False) as reads:
        micro_batch_loss(lp, old, mask, plan.weights, num_tokens=plan.num_tokens,
                         kl_coef=plan.kl_coef)  # fmt: skip
    assert one_sync(reads), reads
    stats = response_stats(lp, old, mask)
    with count_host_reads(monkeypatch, forbid=False) as reads:
        plan_minibatch(stats, batch.rewards, batch.group_ids)
    assert one_sync(reads), reads


# --------------------------------------------------------------------------- meta device


def meta_calls() -> list[tuple[str, Callable[..., Any], Callable[[Any], list[torch.Tensor]]]]:
    """Every tensor-in, tensor-out public function, with what it returns."""
    return [
        ("disco_loss", lambda b, v: disco_loss(*b, validate=v), lambda o: [o.loss, o.kl]),
        ("sequence_scores", lambda b, v: sequence_scores(*b[:3], validate=v), lambda o: [o]),
        ("kl_divergence", lambda b, v: kl_divergence(*b[:3], validate=v), lambda o: [o]),
        ("discriminative_objective",
         lambda b, v: discriminative_objective(b[3].float(), b[3], b[4], validate=v),
         lambda o: [o]),
        ("discriminative_weights",
         lambda b, v: discriminative_weights(b[3].float(), b[3], b[4], validate=v),
         lambda o: [o]),
        ("response_stats", lambda b, v: response_stats(*b[:3], validate=v), lambda o: list(o)),
        ("plan_minibatch",
         lambda b, v: plan_minibatch(ResponseStats(b[3].float(), b[3].float(), b[3].float() + 1),
                                     b[3], b[4], validate=v),
         lambda o: [o.weights, o.kl_coef]),
        ("micro_batch_loss",
         lambda b, v: micro_batch_loss(*b[:3], b[3].float(), num_tokens=100, validate=v),
         lambda o: [o.loss]),
        ("grpo_loss", lambda b, v: grpo_loss(*b, validate=v), lambda o: [o.loss]),
        ("dr_grpo_loss", lambda b, v: dr_grpo_loss(*b, validate=v), lambda o: [o.loss]),
        ("dapo_loss", lambda b, v: dapo_loss(*b, validate=v), lambda o: [o.loss]),
        ("group_advantages", lambda b, v: group_advantages(*b[3:], validate=v), lambda o: [o]),
        ("dynamic_sampling_filter",
         lambda b, v: dynamic_sampling_filter(*b[3:], validate=v), lambda o: [o]),
    ]  # fmt: skip


@pytest.mark.parametrize("name,call,outputs", meta_calls(), ids=[c[0] for c in meta_calls()])
def test_meta_device_is_shape_only_without_validation(batch, name, call, outputs):
    """validate=False: a shape-only computation on meta tensors (the shapes of the CPU
    results); validate=True: a clear error naming validate."""
    cpu = call(batch.args(), False)
    meta = call(tuple(t.to("meta") for t in batch.args()), False)
    for a, b in zip(outputs(meta), outputs(cpu)):
        assert a.device.type == "meta" and a.shape == b.shape and a.dtype == b.dtype, name
    raises_naming(
        ValueError, "validate", lambda: call(tuple(t.to("meta") for t in batch.args()), True)
    )


def test_analysis_refuses_meta_tensors(batch):
    r, g = batch.rewards.to("meta"), batch.group_ids.to("meta")
    raises_naming(ValueError, "rewards", lambda: difficulty_report(r, g))
    raises_naming(ValueError, "advantages", lambda: implied_weights(r, r, g))
    raises_naming(ValueError, "p", lambda: difficulty_weight(r.clamp(0, 1), "grpo"))
