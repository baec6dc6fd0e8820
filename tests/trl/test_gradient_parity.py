"""DisCOTrainer's optimizer steps against DisCO computed from the formulas on the same completions.

TRL shuffles each process's generation batch and splits it into micro-batches, so a prompt's
completions are spread over micro-batches (and, with several optimizer steps per generation,
over optimizer steps). The gradient each optimizer step applies is captured just before the
optimizer runs (no clipping) and compared with a naive reference evaluated at that step's
parameters on the micro-batches TRL actually formed.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor
from trl_support import (
    assert_grads_close,
    assert_masked_close,
    check_generation_batch,
    concat,
    hinge,
    make_recording_trainer,
    naive_kl_sum,
    naive_scores,
    naive_weights,
    reference_model,
    tiny_config,
    token_log_probs,
)

from discoloss import disco_loss


def grads_differ(actual: dict[str, Tensor], model: torch.nn.Module) -> float:
    """Largest gradient difference relative to the gradient's scale."""
    worst = 0.0
    for n, p in model.named_parameters():
        if p.grad is not None:
            scale = p.grad.abs().max().clamp_min(1e-12)
            worst = max(worst, float((actual[n] - p.grad).abs().max() / scale))
    return worst


def test_first_update_equals_disco_loss(tmp_path: Any) -> None:
    """TRL's default batching (steps_per_generation == gradient_accumulation_steps): the first
    optimizer step of a generation batch applies exactly the gradient of ``disco_loss`` on all
    its completions, although each prompt's completions are split over micro-batches."""
    config = tiny_config(str(tmp_path), max_steps=1)
    trainer, rec = make_recording_trainer(config)
    trainer.train()
    mbs = trainer.micro_batches
    assert len(mbs) == 2 and len(rec.grads) == 1
    first, second = (set(mb["disco_group_ids"].tolist()) for mb in mbs)
    assert first & second, "no prompt was split over micro-batches: the test would be vacuous"

    rows = concat(mbs)
    rewards = check_generation_batch(trainer.processing_class, rows, config.num_generations)
    assert 0 < (rewards > 0.5).sum() < len(rewards)
    model = reference_model(rec.params[0])
    logp = token_log_probs(model, rows)
    assert_masked_close(rows["old_per_token_logps"], logp.detach(), rows["completion_mask"])
    out = disco_loss(logp, logp.detach(), rows["completion_mask"], rewards, rows["disco_group_ids"])
    out.loss.backward()
    assert_grads_close(rec.grads[0], model)


@pytest.mark.parametrize(
    ("objective", "score", "kl_estimator", "steps_per_generation", "num_iterations"),
    [
        ("disco", "log_likelihood", "k1", 2, 2),  # 2 passes over each generation batch
        ("disco_b", "likelihood_ratio", "k3", 4, 1),  # 2 optimizer steps per pass
        ("disco", "likelihood_ratio", "k1", 4, 2),  # both: 4 optimizer steps per generation
    ],
)
def test_every_update_matches_reference(
    tmp_path: Any,
    objective: str,
    score: str,
    kl_estimator: str,
    steps_per_generation: int,
    num_iterations: int,
) -> None:
    """Every optimizer step of a generation batch: weights from the sampling policy over the
    whole generation batch (exact for disco_b), times k = steps_per_generation /
    gradient_accumulation_steps, plus each micro-batch's token share of the penalty of its own
    KL (the local approximation)."""
    ga = 2
    k = steps_per_generation // ga
    steps = k * num_iterations
    config = tiny_config(
        str(tmp_path),
        objective=objective,
        score=score,
        kl_estimator=kl_estimator,
        gradient_accumulation_steps=ga,
        steps_per_generation=steps_per_generation,
        num_iterations=num_iterations,
        max_steps=steps,
    )
    trainer, rec = make_recording_trainer(config)
    trainer.train()
    mbs = trainer.micro_batches
    b = config.per_device_train_batch_size
    assert len(mbs) == steps_per_generation * num_iterations and len(rec.grads) == steps
    gen = concat(mbs[:steps_per_generation])  # the chunks of the one generation batch
    rewards = check_generation_batch(trainer.processing_class, gen, config.num_generations)
    groups = gen["disco_group_ids"]
    mask = gen["completion_mask"]

    with torch.no_grad():  # sampling policy = parameters at the first step
        old = token_log_probs(reference_model(rec.params[0]), gen)
    assert_masked_close(gen["old_per_token_logps"], old, mask)
    tau = 10.0 if score == "log_likelihood" else 1.0
    w = naive_weights(
        naive_scores(old, old, mask, score), rewards, groups, objective=objective, tau=tau
    )

    for step in range(steps):
        model = reference_model(rec.params[step])
        in_step = [j for j, mb in enumerate(mbs) if mb["optimizer_step"] == step]
        assert len(in_step) == ga
        chunks = [j % steps_per_generation for j in in_step]
        total_tokens = sum(mask[c * b : (c + 1) * b].sum() for c in chunks)
        loss = torch.zeros(())
        for c in chunks:
            rows = slice(c * b, (c + 1) * b)
            mb = {key: value[rows] for key, value in gen.items()}
            logp = token_log_probs(model, mb)
            s = naive_scores(logp, old[rows], mask[rows], score)
            loss = loss - k * (w[rows] * s).sum()
            n_mb = mask[rows].sum()
            kl_mb = naive_kl_sum(logp, old[rows], mask[rows], kl_estimator) / n_mb
            loss = loss + n_mb / total_tokens * hinge(kl_mb, 1e-4, 1e3)
        loss.backward()
        assert_grads_close(rec.grads[step], model)


def test_penalty_is_the_local_approximation(tmp_path: Any) -> None:
    """Second optimizer step on a generation batch (policy moved, constraint active): the
    penalty gradient is sum_mb (n_mb/N) grad pen(KL_mb), not the exact grad pen(KL) of the
    step's token-mean KL; the logged local penalty bounds the exact one from above."""
    config = tiny_config(str(tmp_path), num_iterations=2, max_steps=2, kl_estimator="k3")
    trainer, rec = make_recording_trainer(config)
    trainer.train()
    mbs = trainer.micro_batches
    gen = concat(mbs[:2])
    rewards = gen["disco_rewards"]
    mask, groups = gen["completion_mask"], gen["disco_group_ids"]
    b = config.per_device_train_batch_size
    with torch.no_grad():
        old = token_log_probs(reference_model(rec.params[0]), gen)
    w = naive_weights(
        naive_scores(old, old, mask, "log_likelihood"), rewards, groups, objective="disco", tau=10.0
    )

    model = reference_model(rec.params[1])
    logp = token_log_probs(model, gen)
    n = mask.sum()
    objective = (w * naive_scores(logp, old, mask, "log_likelihood")).sum()
    kl_mbs = [
        naive_kl_sum(logp[r], old[r], mask[r], "k3") / mask[r].sum()
        for r in (slice(0, b), slice(b, 2 * b))
    ]
    kl = naive_kl_sum(logp, old, mask, "k3") / n
    assert float(kl.detach()) > 1e-4, (
        "constraint inactive: the test would not distinguish the two penalties"
    )
    assert abs(float((kl_mbs[0] - kl_mbs[1]).detach())) > 1e-3
    local = sum(
        mask[r].sum() / n * hinge(x, 1e-4, 1e3)
        for r, x in zip((slice(0, b), slice(b, 2 * b)), kl_mbs)
    )
    exact = hinge(kl, 1e-4, 1e3)
    assert local >= exact

    (-objective + exact).backward(retain_graph=True)
    assert grads_differ(rec.grads[1], model) > 1e-2  # the exact penalty is NOT what is applied
    model.zero_grad()
    (-objective + local).backward()
    assert_grads_close(rec.grads[1], model)

    logs = [entry for entry in trainer.state.log_history if "disco/penalty" in entry]
    assert len(logs) == 2
    assert logs[0]["disco/penalty"] == 0.0 and logs[0]["disco/penalty_local"] == 0.0
    assert logs[1]["disco/penalty_local"] >= logs[1]["disco/penalty"] > 0.0
    assert logs[1]["disco/penalty"] == pytest.approx(float(exact.detach()), rel=1e-3)
    assert logs[1]["disco/penalty_local"] == pytest.approx(float(local.detach()), rel=1e-3)
