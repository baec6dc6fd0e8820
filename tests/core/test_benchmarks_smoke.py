"""Smoke test of the benchmark suite: imports, argument parsing, and that the reference-style
published loss it measures against computes what DisCO computes. Nothing here is timed.

What must agree between ``benchmarks.reference.reference_disco_loss`` (the published code's
pattern) and ``discoloss.disco_loss(normalize="all", kl_estimator="k1")`` on binary rewards and
equal group sizes:

* the gradient with respect to log_probs (up to the published ``E / (E.detach() + eps)`` factor,
  E >= 1 after the max shift, so to ~eps relative), for both scores and both objectives;
* the KL value;
* DisCO-b: the objective value;
* DisCO: the objective values differ by exactly the DRO term the published code replaces by a
  constant, J_ref = J + (1/Q) sum_{q with signal} (tau * log mean_{N_q} exp(s/tau) - tau);
* the penalty values differ by design: reference max(beta (kl - delta), 0) * kl, ours
  beta/2 * max(kl - delta, 0)^2 (same gradient).
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.measure import floor_bytes, make_inputs
from benchmarks.reference import reference_disco_loss, reference_drpo_loss
from benchmarks.run import Row, parse_args, tables_markdown, target_lines
from discoloss import disco_loss, sequence_scores

GROUP = 8


def _batch(seed: int, *, kl_shift: float) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q, t = 6, 37
    b = q * GROUP
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t) < lengths[:, None]
    lp = -2.0 * torch.rand(b, t, generator=g, dtype=torch.float64)
    old = lp + kl_shift + 0.1 * torch.randn(b, t, generator=g, dtype=torch.float64)
    lp = torch.where(mask, lp, 0.0)
    rewards = (torch.rand(b, generator=g) < 0.5).double()
    ids = torch.arange(b) // GROUP
    rewards[ids == 0] = 1.0  # a question without a negative
    rewards[ids == 1] = 0.0  # a question without a positive
    perm = torch.randperm(b, generator=g)
    return lp[perm], old[perm], mask[perm], rewards[perm], (ids * 7 + 3)[perm]


def _dro_gap(scores: torch.Tensor, rewards: torch.Tensor, ids: torch.Tensor, tau: float) -> float:
    """(1/Q) sum over questions with signal of tau * log mean_{N_q} exp(s/tau) - tau, by loop."""
    total, questions = 0.0, ids.unique().tolist()
    for q in questions:
        sel = ids == q
        r, s = rewards[sel], scores[sel]
        if (r == 1).any() and (r == 0).any():
            neg = s[r == 0].tolist()
            total += tau * math.log(sum(math.exp(x / tau) for x in neg) / len(neg)) - tau
    return total / len(questions)


@pytest.mark.parametrize("objective", ["disco", "disco_b"])
@pytest.mark.parametrize("score", ["log_likelihood", "likelihood_ratio"])
@pytest.mark.parametrize("kl_shift", [0.05, -0.05])  # penalty active / inactive
def test_reference_matches_disco_loss(objective: str, score: str, kl_shift: float) -> None:
    lp, old, mask, rewards, ids = _batch(1, kl_shift=kl_shift)
    x_ref = lp.clone().requires_grad_(True)
    ref = reference_disco_loss(
        x_ref,
        old,
        mask.double(),
        rewards,
        ids,
        group_size=GROUP,
        score=score,
        objective=objective,  # type: ignore[arg-type]
    )
    ref.loss.backward()
    x = lp.clone().requires_grad_(True)
    out = disco_loss(x, old, mask, rewards, ids, score=score, objective=objective)  # type: ignore[arg-type]
    out.loss.backward()

    assert x.grad is not None and x_ref.grad is not None
    assert x.grad.abs().max() > 0
    torch.testing.assert_close(x_ref.grad, x.grad, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(ref.kl, out.kl, rtol=1e-9, atol=1e-12)  # 1e-8 in its denominator
    assert (out.kl > 1e-4) == (kl_shift > 0)

    tau = 10.0 if score == "log_likelihood" else 1.0
    if objective == "disco_b":
        torch.testing.assert_close(ref.objective, out.objective, rtol=1e-7, atol=1e-8)
    else:
        s = sequence_scores(lp, old, mask, score=score)  # type: ignore[arg-type]
        gap = _dro_gap(s, rewards, ids, tau)
        assert abs(gap) > 1e-3  # the two values really differ
        torch.testing.assert_close(
            ref.objective.item(), out.objective.item() + gap, rtol=1e-7, atol=1e-9
        )
    kl = out.kl.item()
    ref_penalty = max(1e3 * (kl - 1e-4), 0.0) * kl
    torch.testing.assert_close(ref.loss.item(), -ref.objective.item() + ref_penalty)
    torch.testing.assert_close(out.penalty.item(), 0.5 * 1e3 * max(kl - 1e-4, 0.0) ** 2)


@pytest.mark.parametrize("kl_shift", [0.05, -0.05])
@pytest.mark.parametrize("lam", [0.1, 0.5])
def test_reference_drpo_matches_drpo_where_it_is_defined(kl_shift: float, lam: float) -> None:
    """The published DRPO pattern on its domain (equal groups, rewards in {0, 1}, k1, tensors
    exactly max_length wide): same gradient as ``objective="drpo"``, objectives apart by the
    DRO gap of its log-mean-exp trick."""
    lp, old, mask, rewards, ids = _batch(2, kl_shift=kl_shift)
    width = mask.shape[-1]
    x_ref = lp.clone().requires_grad_(True)
    ref = reference_drpo_loss(x_ref, old, mask.double(), rewards, ids, group_size=GROUP, lam=lam)
    ref.loss.backward()
    x = lp.clone().requires_grad_(True)
    out = disco_loss(x, old, mask, rewards, ids, objective="drpo", lam=lam, max_length=width)
    out.loss.backward()
    assert x.grad is not None and x_ref.grad is not None and x.grad.abs().max() > 0
    torch.testing.assert_close(x_ref.grad, x.grad, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(ref.kl, out.kl, rtol=1e-12, atol=1e-15)
    s = sequence_scores(lp, old, mask)
    gap = _dro_gap(s, rewards, ids, 10.0)
    torch.testing.assert_close(ref.objective.item(), out.objective.item() + gap, rtol=1e-9,
                               atol=1e-12)  # fmt: skip
    # and DRPO is not DisCO on this batch
    x_disco = lp.clone().requires_grad_(True)
    disco_loss(x_disco, old, mask, rewards, ids).loss.backward()
    assert x_disco.grad is not None
    assert (x_disco.grad - x.grad).abs().max() > 0.1 * x.grad.abs().max()


def test_reference_drpo_depends_on_the_padding_and_overflows() -> None:
    """What the published pattern gets wrong outside its domain: (1) its length scale is the
    tensor's padded width, so padding the same responses further changes its gradient (ours,
    with an explicit max_length, is unchanged); (2) exp((1 - |o|/T) / lam) without a shift
    overflows float32 for small lam (nan), where the shifted softmax stays exact."""
    lp, old, mask, rewards, ids = _batch(3, kl_shift=0.05)
    width = mask.shape[-1]

    def pad(t: torch.Tensor, value: float) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width), value=value)

    grads = []
    for padded in (False, True):
        a, b, m = (pad(lp, 0.0), pad(old, 0.0), pad(mask, False)) if padded else (lp, old, mask)
        x_ref = a.clone().requires_grad_(True)
        reference_drpo_loss(x_ref, b, m.double(), rewards, ids, group_size=GROUP).loss.backward()
        x = a.clone().requires_grad_(True)
        disco_loss(x, b, m, rewards, ids, objective="drpo", max_length=width).loss.backward()
        assert x_ref.grad is not None and x.grad is not None
        grads.append((x_ref.grad[:, :width], x.grad[:, :width]))
    (ref_narrow, ours_narrow), (ref_wide, ours_wide) = grads
    torch.testing.assert_close(ours_wide, ours_narrow, rtol=1e-12, atol=1e-15)
    assert (ref_wide - ref_narrow).abs().max() > 1e-3 * ref_narrow.abs().max()

    f32 = [t.float() if t.is_floating_point() else t for t in (lp, old, mask, rewards, ids)]
    x_ref = f32[0].clone().requires_grad_(True)
    ref = reference_drpo_loss(x_ref, f32[1], f32[2].float(), f32[3], f32[4], group_size=GROUP,
                              lam=0.01)  # fmt: skip
    assert not bool(ref.loss.isfinite())
    out = disco_loss(*f32, objective="drpo", lam=0.01, max_length=width)
    assert bool(out.loss.isfinite())


def test_benchmark_inputs_and_report() -> None:
    x = make_inputs(16, 32, dtype=torch.float32, device=torch.device("cpu"), seed=3)
    assert x.log_probs.shape == (16, 32) and x.log_probs.requires_grad
    assert x.mask.dtype == torch.bool and bool(x.mask.any(-1).all())
    assert torch.equal(x.mask_float.bool(), x.mask)
    assert torch.bincount(x.group_ids).tolist() == [8, 8]
    assert set(x.rewards.tolist()) <= {0.0, 1.0}
    out = disco_loss(x.log_probs, x.old_log_probs, x.mask, x.rewards, x.group_ids)
    assert out.kl.item() > 1e-4  # the penalty path is exercised
    assert floor_bytes(16, 32, torch.float32) == 16 * 32 * 13

    args = parse_args(["--quick", "--dtypes", "float32", "--methods", "disco,reference"])
    assert args.sizes and args.min_rounds >= 1
    row = Row(device="cpu", dtype="float32", batch=1024, tokens=4096, rounds=3)
    row.time_ms = {"disco": 1.0, "reference": 4.0}
    row.ratio = {"reference": 0.25}
    row.peak_mib = {"disco": 16.0, "reference": 64.0}
    row.floor_ms = 0.5
    table = tables_markdown([row], ["disco", "reference"])
    assert "| 1024 | 4096 |" in table and "0.25" in table
    assert any("MET" in line for line in target_lines([row]))
    with pytest.raises(SystemExit):
        parse_args(["--dtypes", "float8"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_cpu_zero_padding_is_where_bit_for_bit(dtype: torch.dtype) -> None:
    """The CPU fast path of the token sums (found by these benchmarks) selects like ``where``."""
    from discoloss.scores import zero_padding

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(9, 70, generator=g) < 0.6
    x = torch.randn(9, 70, generator=g).to(dtype)
    x[~mask] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 5.0]).to(dtype)[
        torch.arange(int((~mask).sum())) % 5
    ]
    x[0, 0], mask[0, 0] = -0.0, True  # a kept negative zero stays -0.0
    zero = torch.zeros((), dtype=dtype)
    for a, m in ((x, mask), (x.t(), mask.t()), (x[:, :1], mask)):  # strided; (B, 1) broadcast
        want = torch.where(m, a, zero)
        got = zero_padding(a, m)
        reused = zero_padding(a, m, reuse=torch.full_like(want, 7.0))
        for out in (got, reused):
            assert out.shape == want.shape and out.dtype == dtype
            assert torch.equal(
                out.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [64, 1 << 20])
def test_cpu_blocked_token_sums_match_whole_tensor_ops(
    dtype: torch.dtype, block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of rows give the sums and gradients of whole-tensor ``where`` ops, bit for bit."""
    import discoloss.scores as scores

    monkeypatch.setattr(scores, "CPU_BLOCK", block)
    g = torch.Generator().manual_seed(1)
    b, t = 37, 50  # 64 positions per block: 2-row blocks, the 1-row tail joins the last
    mask = torch.arange(t) < torch.randint(1, t + 1, (b,), generator=g)[:, None]
    lp = torch.where(mask, -3 * torch.rand(b, t, generator=g), float("nan")).to(dtype)
    old = (lp.float() + 0.05 * torch.randn(b, t, generator=g)).to(dtype)
    zero = torch.zeros((), dtype=dtype)
    acc = torch.float32
    for need_ratio in (False, True):
        x = lp.clone().requires_grad_(True)
        sums, _ = scores.token_sums(x, old, mask, need_ratio=need_ratio, validate=False)
        w_lp = torch.randn(b, generator=g)
        w_e = torch.randn(b, generator=g)
        total = (w_lp * sums.log_prob).sum()
        if need_ratio:
            assert sums.expm1_log_ratio is not None
            total = total + (w_e * sums.expm1_log_ratio).sum()
        total.backward()
        assert x.grad is not None
        assert torch.equal(sums.lengths, mask.sum(-1).to(acc))
        assert torch.equal(sums.log_prob, torch.where(mask, lp, zero).sum(-1, dtype=acc))
        assert torch.equal(sums.old_log_prob, torch.where(mask, old, zero).sum(-1, dtype=acc))
        if need_ratio:
            d = torch.expm1(lp.to(acc) - old.to(acc))
            assert torch.equal(sums.expm1_log_ratio, torch.where(mask, d, 0.0).sum(-1))
            coef = torch.exp(lp.to(acc) - old.to(acc)) * w_e[:, None] + w_lp[:, None]
            want = torch.where(mask, coef.to(dtype), zero)
        else:
            want = torch.where(mask, w_lp.to(dtype)[:, None], zero)
        assert torch.equal(x.grad, want)


def test_layout_memory_on_paper() -> None:
    """The on-paper activation model against hand-computed values (Qwen2 shapes from the
    models' public configs): 1.5B = 28 layers x 1536 hidden, 8k-token responses, n = 8."""
    from benchmarks.layout_memory import MODELS, micro_batch_memory, table

    small, large = MODELS
    whole = micro_batch_memory(small, 8 * 8192)
    one = micro_batch_memory(small, 8192)
    assert whole.checkpoints == 65536 * 28 * 1536 * 2  # 5.25 GiB
    assert whole.recompute == 65536 * (6 * 1536 + 2 * 256 + 4 * 8960) * 2
    assert whole.logits == 65536 * 151936 * 2
    assert whole.total == 8 * one.total  # linear in the tokens of the micro-batch
    biggest = micro_batch_memory(large, 16 * 32768)
    assert round(biggest.checkpoints / 1024**3, 1) == 98.0
    rows = table().splitlines()
    assert len(rows) == 2 + 2 * 2 * 2 * 2  # header + models x lengths x n x layouts
