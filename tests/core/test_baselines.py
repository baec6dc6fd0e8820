"""GRPO-family baselines against naive references written from the papers' formulas."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from reference import naive_advantages, naive_clipped_loss
from torch import Tensor

from discoloss.baselines import (
    BaselineOutput,
    dapo_loss,
    dr_grpo_loss,
    dynamic_sampling_filter,
    group_advantages,
    grpo_loss,
)

# ----------------------------------------------------------------------------- data


def make_batch(
    seed: int,
    *,
    sizes: tuple[int, ...] = (4, 1, 6, 3, 5),
    t: int = 7,
    spread: float = 0.3,
    dtype: torch.dtype = torch.float64,
    binary: bool = True,
) -> dict[str, Any]:
    """Ragged groups in shuffled order, non-contiguous ids, garbage (nan/inf) in padding."""
    g = torch.Generator().manual_seed(seed)
    groups = torch.cat(
        [torch.full((n,), 1000 * (k + 1) - 7 * k, dtype=torch.long) for k, n in enumerate(sizes)]
    )
    b = groups.numel()
    perm = torch.randperm(b, generator=g)
    groups = groups[perm]
    if binary:
        rewards = (torch.rand(b, generator=g) < 0.5).to(dtype)
    else:
        rewards = torch.randn(b, generator=g, dtype=dtype)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    old = -torch.rand(b, t, generator=g, dtype=dtype) * 3.0
    log_probs = old + spread * torch.randn(b, t, generator=g, dtype=dtype)
    log_probs = torch.where(mask, log_probs, torch.full_like(log_probs, math.nan))
    old = torch.where(mask, old, torch.full_like(old, -math.inf))
    return {
        "log_probs": log_probs.requires_grad_(),
        "old_log_probs": old,
        "mask": mask,
        "rewards": rewards,
        "group_ids": groups,
    }


LOSSES: dict[str, tuple[Callable[..., BaselineOutput], dict[str, Any]]] = {
    "grpo": (grpo_loss, {}),
    "dr_grpo": (dr_grpo_loss, {}),
    "dapo": (dapo_loss, {}),
}


def reference(name: str, batch: dict[str, Any], **opts: Any) -> tuple[Tensor, list[float]]:
    rewards = batch["rewards"].tolist()
    groups = batch["group_ids"].tolist()
    lp = batch["log_probs"]
    old, mask = batch["old_log_probs"], batch["mask"]
    dual = opts.get("dual_clip")
    if name == "grpo":
        clip = opts.get("clip_eps", 0.2)
        adv = naive_advantages(
            rewards, groups, scale="std", unbiased=opts.get("std_unbiased", True),
            eps=opts.get("eps", 1e-6),
        )  # fmt: skip
        loss = naive_clipped_loss(
            lp, old, mask, adv, low=clip, high=clip, aggregation="seq_mean_token_mean",
            dual_clip=dual,
        )  # fmt: skip
    elif name == "dr_grpo":
        clip = opts.get("clip_eps", 0.2)
        adv = naive_advantages(rewards, groups, scale="none", unbiased=True, eps=0.0)
        loss = naive_clipped_loss(
            lp, old, mask, adv, low=clip, high=clip, aggregation="seq_mean_token_sum_norm",
            max_tokens=opts.get("max_tokens") or lp.shape[1], dual_clip=dual,
        )  # fmt: skip
    else:
        adv = naive_advantages(
            rewards, groups, scale=opts.get("scale", "std"),
            unbiased=opts.get("std_unbiased", True), eps=opts.get("eps", 1e-6),
        )  # fmt: skip
        loss = naive_clipped_loss(
            lp, old, mask, adv, low=opts.get("clip_eps_low", 0.2),
            high=opts.get("clip_eps_high", 0.28), aggregation="token_mean", dual_clip=dual,
        )  # fmt: skip
    return loss, adv


# ----------------------------------------------------------------------------- advantages


@pytest.mark.parametrize("scale", ["std", "none"])
@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("eps", [1e-6, 1e-4, 0.0])
@pytest.mark.parametrize("binary", [True, False])
def test_group_advantages_match_naive(scale: str, unbiased: bool, eps: float, binary: bool) -> None:
    for seed in range(3):
        batch = make_batch(seed, binary=binary)
        got = group_advantages(
            batch["rewards"], batch["group_ids"], scale=scale, std_unbiased=unbiased, eps=eps
        )
        want = naive_advantages(
            batch["rewards"].tolist(), batch["group_ids"].tolist(), scale=scale,
            unbiased=unbiased, eps=eps,
        )  # fmt: skip
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_group_advantages_conventions_of_verl_and_trl() -> None:
    """verl: (r - mean) / (torch.std + 1e-6); TRL: (r - mean) / (torch.std + 1e-4)."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.5])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    for eps in (1e-6, 1e-4):
        want = torch.empty_like(rewards)
        for gid in (0, 1):
            sel = groups == gid
            vals = rewards[sel]
            want[sel] = (vals - vals.mean()) / (vals.std() + eps)  # Bessel by default
        torch.testing.assert_close(group_advantages(rewards, groups, eps=eps), want)


def test_group_advantages_degenerate_groups_are_exactly_zero() -> None:
    # constant groups whose float mean is inexact (0.1 * 3 / 3 != 0.1) and a singleton
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.3, 5.0], dtype=torch.float32)
    groups = torch.tensor([3, 3, 3, 8, 8, -4])
    for scale in ("std", "none"):
        for eps in (0.0, 1e-6):
            a = group_advantages(rewards, groups, scale=scale, eps=eps)  # type: ignore[arg-type]
            assert a[[0, 1, 2, 5]].eq(0).all()
            assert a[3] > 0 > a[4]


def test_group_advantages_integer_rewards_and_permutation() -> None:
    batch = make_batch(5)
    r_int = batch["rewards"].to(torch.int64)
    a = group_advantages(r_int, batch["group_ids"])
    assert a.dtype == torch.float32
    perm = torch.randperm(r_int.numel(), generator=torch.Generator().manual_seed(1))
    a_perm = group_advantages(r_int[perm], batch["group_ids"][perm] * 3 + 11)
    torch.testing.assert_close(a_perm, a[perm])


# ----------------------------------------------------------------------------- losses

OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("grpo", {}),
    ("grpo", {"clip_eps": 0.1, "std_unbiased": False, "eps": 1e-4}),
    ("grpo", {"dual_clip": 1.5}),
    ("dr_grpo", {}),
    ("dr_grpo", {"clip_eps": 0.3, "max_tokens": 16}),
    ("dr_grpo", {"dual_clip": 3.0}),
    ("dapo", {}),
    ("dapo", {"scale": "none"}),
    ("dapo", {"clip_eps_low": 0.1, "clip_eps_high": 0.4, "dual_clip": 1.3}),
]


@pytest.mark.parametrize(("name", "opts"), OPTIONS)
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_gradient_match_naive(name: str, opts: dict[str, Any], seed: int) -> None:
    fn = LOSSES[name][0]
    batch = make_batch(seed, spread=0.4)
    out = fn(**batch, **opts)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float64
    (grad,) = torch.autograd.grad(out.loss, batch["log_probs"])

    ref_batch = dict(batch, log_probs=batch["log_probs"].detach().clone().requires_grad_())
    ref_loss, ref_adv = reference(name, ref_batch, **opts)
    (ref_grad,) = torch.autograd.grad(ref_loss, ref_batch["log_probs"])
    ref_grad = torch.where(batch["mask"], ref_grad, 0.0)

    torch.testing.assert_close(out.loss, ref_loss.detach())
    torch.testing.assert_close(out.advantages, torch.tensor(ref_adv, dtype=torch.float64))
    torch.testing.assert_close(grad, ref_grad)
    assert torch.isfinite(grad).all()  # nan / -inf padding gets exactly zero gradient
    assert grad[~batch["mask"]].eq(0).all()
    assert not out.advantages.requires_grad
    assert all(not v.requires_grad and v.dim() == 0 for v in out.metrics.values())


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradient_reaches_log_probs_only(name: str) -> None:
    batch = make_batch(3)
    batch["old_log_probs"] = batch["old_log_probs"].clone().requires_grad_()
    batch["rewards"] = batch["rewards"].clone().requires_grad_()
    out = LOSSES[name][0](**batch)
    out.loss.backward()
    assert batch["log_probs"].grad is not None
    assert batch["old_log_probs"].grad is None
    assert batch["rewards"].grad is None


def test_metrics_match_naive_counts() -> None:
    batch = make_batch(2, spread=0.5)
    out = dapo_loss(**batch, dual_clip=1.6)
    adv = out.advantages
    lp, old, mask = batch["log_probs"].detach(), batch["old_log_probs"], batch["mask"]
    n_tok = int(mask.sum())
    high = low = dual = 0
    kl = 0.0
    for i in range(lp.shape[0]):
        for j in range(lp.shape[1]):
            if not mask[i, j]:
                continue
            rho = math.exp(float(lp[i, j] - old[i, j]))
            kl += float(old[i, j] - lp[i, j])
            if adv[i] > 0 and rho > 1.28:
                high += 1
            if adv[i] < 0 and rho < 0.8:
                low += 1
            if adv[i] < 0 and rho > 1.6:
                dual += 1
    m = out.metrics
    assert high > 0 and low > 0 and dual > 0  # the data exercises every branch
    assert m["clip_fraction_high"].item() == pytest.approx(high / n_tok)
    assert m["clip_fraction_low"].item() == pytest.approx(low / n_tok)
    assert m["clip_fraction"].item() == pytest.approx((high + low + dual) / n_tok)
    assert m["kl"].item() == pytest.approx(kl / n_tok)
    assert m["num_groups"].item() == 5
    groups = batch["group_ids"].tolist()
    rewards = batch["rewards"].tolist()
    signal = sum(len({r for r, gg in zip(rewards, groups) if gg == g}) > 1 for g in set(groups))
    assert m["groups_with_signal"].item() == signal
    assert m["mean_response_length"].item() == pytest.approx(n_tok / lp.shape[0])
    assert m["loss"].item() == out.loss.item()


def test_losses_at_old_policy_have_zero_value_for_centred_advantages() -> None:
    """At theta = theta_old every ratio is 1: GRPO's loss is -mean_i A_i = 0 per group."""
    batch = make_batch(4)
    mask = torch.ones_like(batch["mask"])
    old = torch.randn(batch["mask"].shape, dtype=torch.float64)
    lp = old.clone().requires_grad_()
    for fn in (grpo_loss, dr_grpo_loss, dapo_loss):
        out = fn(lp, old, mask, batch["rewards"], batch["group_ids"])
        assert abs(out.loss.item()) < 1e-12
        assert out.metrics["clip_fraction"].item() == 0.0
        assert out.metrics["kl"].item() == 0.0


def test_permutation_and_relabelling_invariance() -> None:
    batch = make_batch(6)
    perm = torch.randperm(batch["rewards"].numel(), generator=torch.Generator().manual_seed(0))
    for fn in (grpo_loss, dr_grpo_loss, dapo_loss):
        out = fn(**batch)
        (g,) = torch.autograd.grad(out.loss, batch["log_probs"])
        lp2 = batch["log_probs"].detach()[perm].requires_grad_()
        out2 = fn(
            lp2, batch["old_log_probs"][perm], batch["mask"][perm], batch["rewards"][perm],
            -batch["group_ids"][perm] + 5,
        )  # fmt: skip
        (g2,) = torch.autograd.grad(out2.loss, lp2)
        torch.testing.assert_close(out2.loss, out.loss)
        torch.testing.assert_close(g2, g[perm])


def test_dr_grpo_constant_normaliser_is_padding_invariant() -> None:
    batch = make_batch(7)
    t = batch["mask"].shape[1]

    def padded(x: Tensor, value: float | bool) -> Tensor:
        return torch.cat([x, torch.full((x.shape[0], 5), value, dtype=x.dtype)], dim=1)

    wide = {
        "log_probs": padded(batch["log_probs"].detach(), 0.0),
        "old_log_probs": padded(batch["old_log_probs"], 0.0),
        "mask": padded(batch["mask"], False),
        "rewards": batch["rewards"],
        "group_ids": batch["group_ids"],
    }
    a = dr_grpo_loss(**batch, max_tokens=32).loss
    b = dr_grpo_loss(**wide, max_tokens=32).loss
    torch.testing.assert_close(a, b)
    # default normaliser: the padded width, as verl's seq-mean-token-sum-norm
    torch.testing.assert_close(dr_grpo_loss(**wide).loss * (t + 5), a.detach() * 32)
    # GRPO and DAPO do not depend on padding at all
    for fn in (grpo_loss, dapo_loss):
        torch.testing.assert_close(fn(**batch).loss, fn(**wide).loss)


def test_low_precision_inputs_are_reduced_in_float32() -> None:
    batch = make_batch(8, dtype=torch.float32)
    lp16 = batch["log_probs"].detach().to(torch.bfloat16).requires_grad_()
    out = dapo_loss(
        lp16, batch["old_log_probs"].to(torch.bfloat16), batch["mask"], batch["rewards"],
        batch["group_ids"],
    )  # fmt: skip
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert lp16.grad is not None and lp16.grad.dtype == torch.bfloat16
    ref = dapo_loss(
        lp16.detach().float(), batch["old_log_probs"].to(torch.bfloat16).float(), batch["mask"],
        batch["rewards"], batch["group_ids"],
    )  # fmt: skip
    torch.testing.assert_close(out.loss, ref.loss)


# ----------------------------------------------------------------------------- dynamic sampling


def test_dynamic_sampling_filter_matches_naive() -> None:
    for seed in range(5):
        batch = make_batch(seed, sizes=(3, 1, 4, 4, 2, 5), binary=False)
        rewards, groups = batch["rewards"], batch["group_ids"]
        for threshold in (-0.5, 0.0, 0.8):
            keep = dynamic_sampling_filter(rewards, groups, threshold=threshold)
            labels: dict[int, set[bool]] = {}
            for r, g in zip(rewards.tolist(), groups.tolist()):
                labels.setdefault(g, set()).add(r > threshold)
            want = [len(labels[g]) == 2 for g in groups.tolist()]
            assert keep.dtype == torch.bool
            assert keep.tolist() == want


def test_filtered_batch_keeps_every_nonzero_advantage() -> None:
    batch = make_batch(9, sizes=(4, 4, 4, 4, 4, 4))
    keep = dynamic_sampling_filter(batch["rewards"], batch["group_ids"])
    adv = group_advantages(batch["rewards"], batch["group_ids"])
    assert adv[~keep].eq(0).all()
    assert adv[keep].ne(0).all()


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "exc", "needle"),
    [
        (lambda b: grpo_loss(**b, clip_eps=1.0), ValueError, "clip_eps"),
        (lambda b: grpo_loss(**b, clip_eps=-0.1), ValueError, "clip_eps"),
        (lambda b: dapo_loss(**b, clip_eps_high=math.nan), ValueError, "clip_eps_high"),
        (lambda b: dapo_loss(**b, scale="mad"), ValueError, "scale"),
        (lambda b: grpo_loss(**b, eps=-1.0), ValueError, "eps"),
        (lambda b: grpo_loss(**b, std_unbiased=1), TypeError, "std_unbiased"),
        (lambda b: grpo_loss(**b, dual_clip=0.9), ValueError, "dual_clip"),
        (lambda b: dr_grpo_loss(**b, max_tokens=0), ValueError, "max_tokens"),
        (lambda b: grpo_loss(**dict(b, rewards=b["rewards"][:-1])), ValueError, "rewards"),
        (lambda b: dapo_loss(**dict(b, group_ids=b["group_ids"].float())), TypeError, "group_ids"),
        (lambda b: dapo_loss(**dict(b, mask=b["mask"][:, :-1])), ValueError, "mask"),
        (
            lambda b: grpo_loss(**dict(b, rewards=torch.full_like(b["rewards"], math.nan))),
            ValueError,
            "rewards",
        ),
        (
            lambda b: dr_grpo_loss(
                **dict(b, mask=b["mask"] & (torch.arange(b["mask"].shape[0]) != 2)[:, None])
            ),
            ValueError,
            "response 2",
        ),
        (lambda b: group_advantages(b["rewards"], b["group_ids"][:3]), ValueError, "group_ids"),
        (
            lambda b: dynamic_sampling_filter(b["rewards"], b["group_ids"], threshold="x"),
            TypeError,
            "threshold",
        ),
    ],
)
def test_bad_inputs_raise_naming_the_argument(
    call: Callable[[dict[str, Any]], Any], exc: type[Exception], needle: str
) -> None:
    batch = make_batch(0)
    with pytest.raises(exc, match=needle):
        call(batch)


def test_nonfinite_log_prob_at_a_response_token_is_reported() -> None:
    batch = make_batch(0)
    lp = batch["log_probs"].detach().clone()
    lp[1, 0] = math.inf
    with pytest.raises(ValueError, match="log_probs"):
        grpo_loss(**dict(batch, log_probs=lp))


# ----------------------------------------------------------------------------- host syncs


@contextmanager
def no_host_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail on the usual host-sync entry points (CPU stand-in for CUDA's sync debug mode)."""

    def forbid(name: str) -> Callable[..., Any]:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"host sync through {name}")

        return fail

    with monkeypatch.context() as m:
        for attr in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy",
                     "nonzero", "unique"):  # fmt: skip
            m.setattr(Tensor, attr, forbid(f"Tensor.{attr}"))
        for attr in ("nonzero", "unique", "masked_select", "unique_consecutive"):
            m.setattr(torch, attr, forbid(f"torch.{attr}"))
        yield


@pytest.mark.parametrize("name", list(LOSSES))
def test_validate_false_issues_no_host_sync(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = make_batch(1)
    fn = LOSSES[name][0]
    with no_host_sync(monkeypatch):
        out = fn(**batch, validate=False)
        out.loss.backward()
        group_advantages(batch["rewards"], batch["group_ids"], validate=False)
        dynamic_sampling_filter(batch["rewards"], batch["group_ids"], validate=False)
    assert torch.isfinite(batch["log_probs"].grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync debug mode needs a GPU")
@pytest.mark.parametrize("name", list(LOSSES))
def test_validate_false_issues_no_cuda_sync(name: str) -> None:  # pragma: no cover - GPU only
    batch = {
        k: (v.detach().cuda().requires_grad_() if k == "log_probs" else v.cuda())
        for k, v in make_batch(1).items()
    }
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = LOSSES[name][0](**batch, validate=False)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
