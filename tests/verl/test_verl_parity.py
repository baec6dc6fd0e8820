"""Gradient and metric parity through verl's ppo_loss against disco_loss on each mini-batch."""

from __future__ import annotations

import math

import pytest
import torch
from verl_sim import Batch, estimate, make_batch, reference, run_update

EXACT = [
    "objective",
    "kl",
    "penalty",
    "num_groups",
    "groups_with_signal",
    "frac_groups_with_signal",
    "frac_positive",
]


def assert_parity(batch: Batch, step, *, exact_metrics: bool = True, **options) -> None:
    assert step.grads, "no mini-batch ran"
    for grad, logged, rows in zip(step.grads, step.metrics, step.members):
        ref_grad, ref = reference(batch, rows, **options)
        scale = ref_grad.abs().max().item()
        assert scale > 0
        torch.testing.assert_close(grad, ref_grad, atol=1e-6 * max(scale, 1.0), rtol=1e-5)
        assert logged["actor/pg_loss"] == pytest.approx(ref.loss.item(), rel=1e-5, abs=1e-7)
        for key in EXACT if exact_metrics else []:
            assert logged[f"actor/disco/{key}"] == pytest.approx(
                ref.metrics[key].item(), rel=1e-5, abs=1e-7
            ), key
        assert logged["actor/disco/split_responses"] == 0.0


@pytest.mark.parametrize(
    ("dp", "q_mini", "micro", "objective", "score"),
    [
        (1, 4, 4, "disco", "log_likelihood"),
        (2, 4, 4, "disco", "log_likelihood"),
        (2, 4, 8, "disco_b", "likelihood_ratio"),
        (4, 8, 4, "disco", "likelihood_ratio"),
    ],
)
def test_parity_fixed_micro_batches(
    dp: int, q_mini: int, micro: int, objective: str, score: str
) -> None:
    n = 4
    batch = make_batch([n] * 16, seed=dp * 10 + micro)
    estimate(batch, n)
    opts = dict(objective=objective, score=score, delta=1.0)  # penalty inactive: exact
    step = run_update(batch, n=n, dp=dp, questions_per_mini_batch=q_mini, micro=micro, **opts)
    assert len(step.grads) == 16 // q_mini
    assert any(r == 1 for r in batch.resp_lens), "no 1-token response in the batch"
    assert_parity(batch, step, **opts)


@pytest.mark.parametrize(
    ("dp", "micro", "dynamic"), [(1, 4, False), (2, 8, False), (2, None, True)]
)
def test_drpo_parity_whole_questions_per_micro_batch(dp: int, micro: int | None,
                                                     dynamic: bool) -> None:
    """weights=micro_batch, objective=drpo: every micro-batch's own DRPO loss adds up to
    disco_loss(objective="drpo") on the mini-batch. The length preference uses max_length, not
    the width verl pads each micro-batch to (micro-batches here are padded to their own longest
    response); DisCO's gradient and DRPO's with another max_length differ (the test sees both)."""
    n = 4
    batch = make_batch([n] * 8, seed=31 + dp, max_len=9)
    estimate(batch, n)
    opts = dict(objective="drpo", lam=0.1, max_length=12, delta=1.0)  # penalty inactive: exact
    extra = dict(dynamic=True, max_token_len=64, force_group_size=n) if dynamic else {}
    step = run_update(batch, n=n, dp=dp, questions_per_mini_batch=4, micro=micro, **extra, **opts)
    assert len(step.grads) == 2
    assert_parity(batch, step, exact_metrics=not dynamic, **opts)
    for other in (dict(opts, objective="disco"), dict(opts, max_length=9)):
        apart = 0.0
        for grad, rows in zip(step.grads, step.members):
            ref, _ = reference(batch, rows, **other)
            apart = max(apart, float((grad - ref).norm() / ref.norm()))
        assert apart > 1e-3, other


def test_parity_dynamic_batch_size_with_force_group_size() -> None:
    n = 4
    batch = make_batch([n] * 12, seed=7, max_len=9)
    estimate(batch, n)
    step = run_update(
        batch,
        n=n,
        dp=2,
        questions_per_mini_batch=6,
        micro=None,
        dynamic=True,
        max_token_len=64,
        force_group_size=n,
        delta=1.0,
    )
    assert max(len(m) for m in step.members) == 24
    # gradient and actor/pg_loss exact; actor/disco/* are row-weighted estimates here, since
    # micro-batches differ in size (documented)
    assert_parity(batch, step, exact_metrics=False, delta=1.0)


def test_parity_ragged_groups() -> None:
    """Questions of 3, 5, 2, 6, ... responses (mean n): whole in their micro-batches."""
    n = 4
    sizes = [3, 5, 4, 4, 2, 6, 1, 7]
    batch = make_batch(sizes, seed=3, shuffle=False)
    estimate(batch, n)
    order = list(range(batch.size))  # rank 0: 3,5,2,6 ... arranged below; rank 1: 4,4,1,7
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    rows = lambda g: list(range(starts[g], starts[g] + sizes[g]))  # noqa: E731
    order = rows(0) + rows(1) + rows(4) + rows(5) + rows(2) + rows(3) + rows(6) + rows(7)
    step = run_update(batch, n=n, dp=2, questions_per_mini_batch=4, micro=8, order=order, delta=1.0)
    assert [len(m) for m in step.members] == [16, 16]
    assert_parity(batch, step, delta=1.0)


def test_penalty_exact_when_micro_batch_kls_are_equal() -> None:
    """Two micro-batches with identical token data (so equal KL), penalty active."""
    n = 4
    half = make_batch([n, n], seed=11, shuffle=False, kl_scale=0.3)
    batch = Batch(
        uids=half.uids + [u + "-copy" for u in half.uids],
        rewards=torch.cat([half.rewards, half.rewards]),
        prompt_lens=half.prompt_lens * 2,
        resp_lens=half.resp_lens * 2,
        theta=torch.cat([half.theta, half.theta]),
        old=torch.cat([half.old, half.old]),
        mask=torch.cat([half.mask, half.mask]),
    )
    estimate(batch, n)
    opts = dict(delta=0.0, beta=1e3)
    step = run_update(
        batch, n=n, dp=1, questions_per_mini_batch=4, micro=8, order=list(range(16)), **opts
    )
    assert step.metrics[0]["actor/disco/penalty"] > 1e-4  # the penalty is really active
    assert_parity(batch, step, **opts)


def test_penalty_per_micro_batch_claim() -> None:
    """General case: value sum_m (N_m/N) P(KL_m) >= P(KL) and gradient
    sum_m beta [KL_m - delta]_+ grad(N_m KL_m) / N, checked against formulas."""
    from discoloss import disco_loss

    n, delta, beta = 4, 0.0, 50.0
    batch = make_batch([n] * 8, seed=5, kl_scale=0.3)
    estimate(batch, n)
    step = run_update(batch, n=n, dp=2, questions_per_mini_batch=8, micro=4, delta=delta, beta=beta)
    rows = step.members[0]
    # micro-batch membership, in the order run_update processed them (4 rows each)
    micro_rows = [rows[i : i + 4] for i in range(0, len(rows), 4)]
    theta = batch.theta.clone().requires_grad_(True)
    lp = torch.nn.functional.logsigmoid(theta)
    kl_tok = torch.where(batch.mask, batch.old.double() - lp, 0.0)
    n_all = sum(int(batch.mask[r].sum()) for r in rows)
    shares = []
    for m in micro_rows:
        n_m = int(batch.mask[m].sum())
        kl_m = kl_tok[m].sum() / n_m
        shares.append(n_m / n_all * beta / 2 * torch.clamp(kl_m - delta, min=0) ** 2)
    penalty = sum(shares)
    # objective part from the core with the penalty switched off
    _, ref_obj = reference(batch, rows, delta=1e9)
    idx = torch.tensor(sorted(rows))
    dense = {u: i for i, u in enumerate(dict.fromkeys(batch.uids))}
    groups = torch.tensor([dense[batch.uids[i]] for i in idx.tolist()])
    obj = disco_loss(
        lp[idx].float(), batch.old[idx], batch.mask[idx], batch.rewards[idx], groups, delta=1e9
    )
    total = obj.loss + penalty
    total.backward()
    torch.testing.assert_close(step.grads[0], theta.grad, atol=1e-6, rtol=1e-5)
    assert step.metrics[0]["actor/pg_loss"] == pytest.approx(total.item(), rel=1e-5)
    exact = reference(batch, rows, delta=delta, beta=beta)[1]
    assert total.item() >= exact.loss.item() - 1e-9  # Jensen: an upper bound
    assert penalty.item() > exact.penalty.item()  # strictly, since micro-batch KLs differ
    assert step.metrics[0]["actor/disco/kl"] == pytest.approx(exact.kl.item(), rel=1e-5)  # KL exact


def test_sync_free_mode_matches_validated_mode() -> None:
    n = 4
    batch = make_batch([n] * 8, seed=9)
    estimate(batch, n)
    a = run_update(batch, n=n, dp=2, questions_per_mini_batch=4, micro=4, delta=1.0, validate=True)
    b = run_update(batch, n=n, dp=2, questions_per_mini_batch=4, micro=4, delta=1.0, validate=False)
    for ga, gb in zip(a.grads, b.grads):
        assert torch.equal(ga, gb)
    assert all(math.isfinite(v) for m in b.metrics for v in m.values() if isinstance(v, float))


# Ablation variants (README "Ablation variants"): one option each, same names as disco_loss.
# The objectives need only one question's responses and the linear constraints add up over
# micro-batches, so all of these are exact against disco_loss on the whole mini-batch, with
# micro-batch KLs that differ. The objectives run with the default squared hinge switched off
# (delta=1: its per-micro-batch approximation is tested above) or with an exact constraint.
VARIANTS = [
    dict(objective="cvar", cvar_alpha=0.5, delta=1.0),
    dict(objective="cvar", cvar_alpha=0.3, score="likelihood_ratio", delta=1.0),
    dict(objective="disco_2way", tau=0.5, delta=1.0),
    dict(objective="auc_logistic", tau=0.5, delta=1.0),
    dict(objective="auc_sq_hinge", margin=0.5, delta=1.0),
    dict(objective="cvar", cvar_alpha=0.25, constraint="kl_penalty", beta=5.0),
    dict(objective="auc_logistic", constraint="none"),
    dict(constraint="kl_penalty", beta=5.0),
    dict(constraint="kl_penalty", beta=5.0, kl_estimator="k3", objective="disco_b"),
    dict(constraint="none"),
    dict(score="clipped_ratio", clip_eps=0.1, constraint="kl_penalty", beta=2.0),
]


def _micro_kls(batch: Batch, rows: list[int], size: int) -> list[float]:
    lp = torch.nn.functional.logsigmoid(batch.theta)
    kl = torch.where(batch.mask, batch.old.double() - lp, 0.0)
    return [
        float(kl[rows[i : i + size]].sum() / batch.mask[rows[i : i + size]].sum())
        for i in range(0, len(rows), size)
    ]


def _micro_kls_k3(batch: Batch, rows: list[int], size: int) -> list[float]:
    lp = torch.nn.functional.logsigmoid(batch.theta)
    log_rho = lp - batch.old.double()  # k3 = rho - 1 - log rho, rho = pi_theta / pi_old
    kl = torch.where(batch.mask, torch.exp(log_rho) - 1 - log_rho, 0.0)
    return [
        float(kl[rows[i : i + size]].sum() / batch.mask[rows[i : i + size]].sum())
        for i in range(0, len(rows), size)
    ]


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: "-".join(map(str, o.values())))
def test_parity_variants(options: dict) -> None:
    n = 4
    batch = make_batch([n] * 16, seed=21, kl_scale=0.3)
    estimate(batch, n)
    step = run_update(batch, n=n, dp=2, questions_per_mini_batch=8, micro=8, **options)
    assert len(step.grads) == 2
    kls = _micro_kls(batch, step.members[0], 8)
    assert max(kls) - min(kls) > 1e-3, "micro-batch KLs should differ (else trivially exact)"
    if options.get("constraint") == "kl_penalty":
        assert step.metrics[0]["actor/disco/penalty"] > 1e-3  # the penalty is really there
    assert_parity(batch, step, **options)


def test_parity_clipped_ratio_labels_from_codes() -> None:
    """clipped_ratio clips positives above and negatives below: the loss takes each response's
    label from its code's sign, so a non-default threshold (rewards -1/+1, threshold 0) and real
    clipping on both sides must still match disco_loss given the rewards."""
    n = 4
    batch = make_batch([n] * 8, seed=23, kl_scale=0.5)
    batch.rewards = batch.rewards * 2.0 - 1.0
    opts = dict(score="clipped_ratio", clip_eps=0.05, threshold=0.0, delta=1.0)
    estimate(batch, n, threshold=0.0)
    rho = torch.exp(torch.nn.functional.logsigmoid(batch.theta) - batch.old.double())
    pos = (batch.rewards > 0)[:, None] & batch.mask
    neg = (batch.rewards <= 0)[:, None] & batch.mask
    assert bool((rho[pos] > 1.05).any()) and bool((rho[neg] < 0.95).any()), "nothing clipped"
    assert bool((rho[pos] < 1.05).any()) and bool((rho[neg] > 0.95).any()), "all clipped"
    step = run_update(batch, n=n, dp=2, questions_per_mini_batch=4, micro=4, **opts)
    assert_parity(batch, step, **opts)
    # the labels matter: the other clip side gives another gradient
    flipped = Batch(**{**batch.__dict__, "rewards": -batch.rewards})
    other, _ = reference(flipped, step.members[0], **opts)
    assert not torch.allclose(step.grads[0], other, atol=1e-6)


def test_hinge_is_the_local_approximation() -> None:
    """constraint=hinge, like the squared hinge, applies the penalty per micro-batch:
    value sum_m (N_m/N) beta [KL_m - delta]_+ >= the mini-batch's beta [KL - delta]_+,
    exact when every micro-batch KL is on the same side of delta."""
    n, beta = 4, 3.0
    opts = dict(constraint="hinge", kl_estimator="k3", beta=beta)
    batch = make_batch([n] * 8, seed=5, kl_scale=0.3)
    estimate(batch, n)
    step = run_update(batch, n=n, dp=1, questions_per_mini_batch=8, micro=8, delta=0.0, **opts)
    kls = _micro_kls_k3(batch, step.members[0], 8)
    assert min(kls) > 0.0  # all active: the hinge's slope is beta in every micro-batch
    assert_parity(batch, step, delta=0.0, **opts)
    # one micro-batch inside the region, one outside: an upper bound, strictly
    delta = (min(kls) + max(kls)) / 2
    step2 = run_update(batch, n=n, dp=1, questions_per_mini_batch=8, micro=8, delta=delta, **opts)
    _, exact = reference(batch, step2.members[0], delta=delta, **opts)
    assert step2.metrics[0]["actor/pg_loss"] > exact.loss.item() + 1e-6
