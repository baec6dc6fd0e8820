"""DisCOTrainer's optimizer steps against DisCO computed from the formulas on the same completions.

TRL shuffles each process's generation batch and splits it into micro-batches, so a prompt's
completions are spread over micro-batches (and, with several optimizer steps per generation,
over optimizer steps). The gradient each optimizer step applies is captured just before the
optimizer runs (no clipping) and compared with a reference evaluated at that step's parameters
on the micro-batches TRL actually formed: ``disco_loss`` on the whole generation batch for
``weights="current"``, the naive formulas of the sampling-policy surrogate for
``weights="sampling"``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from discoloss.adapters.trl import DisCOConfig
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
    relative_error,
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


def sampling_surrogate(
    model: torch.nn.Module,
    gen: dict[str, Tensor],
    old: Tensor,
    w: Tensor,
    chunks: list[int],
    *,
    b: int,
    k: int,
    score: str,
    kl_estimator: str,
) -> Tensor:
    """What ``weights="sampling"`` differentiates at an optimizer step made of the micro-batches
    ``chunks`` (rows ``c*b:(c+1)*b`` of the generation batch): ``-k sum_i w_i s_i`` with the
    sampling-policy weights ``w``, plus each micro-batch's token share of the penalty of its own
    KL (the local approximation)."""
    mask = gen["completion_mask"]
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
    return loss


def reused_generation_run(
    tmp_path: Any, weights: str, steps_per_generation: int, num_iterations: int, **options: Any
) -> tuple[int, int, DisCOConfig]:
    """The config of a run whose generation batches are reused for k = steps_per_generation / 2
    optimizer steps (2 micro-batches each), num_iterations passes: (k, the number of optimizer
    steps, the config)."""
    ga = 2
    k = steps_per_generation // ga
    steps = k * num_iterations
    config = tiny_config(
        str(tmp_path),
        gradient_accumulation_steps=ga,
        steps_per_generation=steps_per_generation,
        num_iterations=num_iterations,
        max_steps=steps,
        weights=weights,
        **options,
    )
    return k, steps, config


@pytest.mark.parametrize("weights", ["current", "sampling"])
def test_first_update_equals_disco_loss(tmp_path: Any, weights: str) -> None:
    """TRL's default batching (steps_per_generation == gradient_accumulation_steps): the first
    optimizer step of a generation batch applies exactly the gradient of ``disco_loss`` on all
    its completions, although each prompt's completions are split over micro-batches (both
    sources of weights: the parameters are still the sampling policy's)."""
    config = tiny_config(str(tmp_path), max_steps=1, weights=weights)
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
def test_sampling_weights_at_every_update(
    tmp_path: Any,
    objective: str,
    score: str,
    kl_estimator: str,
    steps_per_generation: int,
    num_iterations: int,
) -> None:
    """``weights="sampling"``, every optimizer step of a generation batch: weights from the
    sampling policy over the whole generation batch (exact for disco_b), times k =
    steps_per_generation / gradient_accumulation_steps, plus each micro-batch's token share of
    the penalty of its own KL (the local approximation)."""
    k, steps, config = reused_generation_run(
        tmp_path, "sampling", steps_per_generation, num_iterations,
        objective=objective, score=score, kl_estimator=kl_estimator,
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
        assert len(in_step) == config.gradient_accumulation_steps
        chunks = [j % steps_per_generation for j in in_step]
        loss = sampling_surrogate(
            model, gen, old, w, chunks, b=b, k=k, score=score, kl_estimator=kl_estimator
        )
        loss.backward()
        assert_grads_close(rec.grads[step], model)


#: DRPO's options in the exactness test (lam not the default: the test sees it reach the loss),
#: one prompt of 8 completions per generation batch: its correct completions (seeded) are 3, 4
#: and 4 tokens long (max_completion_length 4), so that DRPO's weights differ from DisCO's
DRPO_CONFIG = {"lam": 0.3, "num_generations": 8}
#: What a mistake in DRPO's plumbing would apply instead; each must differ from what TRL applied
DRPO_MISTAKES = {
    "DisCO (objective not passed)": {"objective": "disco"},
    "lam not passed (0.1)": {"lam": 0.1},
    "max_length twice max_completion_length": {"max_length": 8},  # (tiny_config: 4)
}


@pytest.mark.parametrize(
    ("objective", "score", "kl_estimator", "steps_per_generation", "num_iterations"),
    [
        ("disco", "log_likelihood", "k3", 2, 3),  # k = 1: a step is the generation batch
        ("disco", "likelihood_ratio", "k3", 4, 2),  # k = 2: a step holds half of it
        ("drpo", "log_likelihood", "k3", 2, 2),  # DRPO, lam 0.3, max_length from the config
    ],
)
def test_current_weights_are_exact_at_every_update(
    tmp_path: Any,
    objective: str,
    score: str,
    kl_estimator: str,
    steps_per_generation: int,
    num_iterations: int,
) -> None:
    """``weights="current"`` on a generation batch reused for several optimizer steps: every
    step applies exactly k times the gradient of ``disco_loss`` on the whole generation batch
    at the step's parameters, restricted to the step's completions (all of them when k = 1):
    weights and the squared hinge's slope from the generation batch at the current
    parameters. The sampling-policy surrogate differs at every step after the first. DRPO:
    ``DisCOConfig(objective="drpo", lam=0.3)`` with ``max_length`` left to its default,
    ``max_completion_length`` (4); DisCO's gradient, DRPO's at the default lam and at another
    max_length each differ from the applied one (the completions' lengths differ)."""
    k, steps, config = reused_generation_run(
        tmp_path, "current", steps_per_generation, num_iterations,
        objective=objective, score=score, kl_estimator=kl_estimator,
        **(DRPO_CONFIG if objective == "drpo" else {}),
    )
    # the reference's DRPO options beside objective (max_length: max_completion_length)
    drpo = {"lam": DRPO_CONFIG["lam"], "max_length": 4} if objective == "drpo" else {}
    assert config.max_completion_length == 4
    trainer, rec = make_recording_trainer(config)
    trainer.train()
    mbs = trainer.micro_batches
    b = config.per_device_train_batch_size
    assert len(mbs) == steps_per_generation * num_iterations and len(rec.grads) == steps
    gen = concat(mbs[:steps_per_generation])  # the chunks of the one generation batch
    rewards = check_generation_batch(trainer.processing_class, gen, config.num_generations)
    groups, mask = gen["disco_group_ids"], gen["completion_mask"]
    old = gen["old_per_token_logps"]  # the sampling policy's, checked against the reference
    with torch.no_grad():
        assert_masked_close(old, token_log_probs(reference_model(rec.params[0]), gen), mask)
    tau = 10.0 if score == "log_likelihood" else 1.0
    w0 = naive_weights(
        naive_scores(old, old, mask, score), rewards, groups, objective="disco", tau=tau
    )
    logs = [entry for entry in trainer.state.log_history if "disco/objective" in entry]
    assert len(logs) == steps
    apart = dict.fromkeys(DRPO_MISTAKES, 0.0)
    errors: list[float] = []
    # one planning pass per optimizer step, except the first on the generation batch
    assert trainer.planning_passes == list(range(1, steps))

    for step in range(steps):
        model = reference_model(rec.params[step])
        in_step_mbs = [j for j, mb in enumerate(mbs) if mb["optimizer_step"] == step]
        chunks = [j % steps_per_generation for j in in_step_mbs]
        assert len(chunks) == config.gradient_accumulation_steps
        in_step = torch.zeros(len(rewards), dtype=torch.bool)
        for c in chunks:
            in_step[c * b : (c + 1) * b] = True
        logp = token_log_probs(model, gen)
        # the whole generation batch's loss; only the step's completions carry a gradient
        out = disco_loss(
            torch.where(in_step.unsqueeze(1), logp, logp.detach()),
            old,
            mask,
            rewards,
            groups,
            objective=objective,
            score=score,
            kl_estimator=kl_estimator,
            **drpo,
        )
        (k * out.loss).backward(retain_graph=bool(drpo))
        j_value, kl_value = float(out.objective.detach()), float(out.kl.detach())
        errors.append(relative_error(rec.grads[step], model))
        assert errors[-1] <= 1e-5, step
        assert_grads_close(rec.grads[step], model)
        # the logged values are the generation batch's at the step's parameters
        assert logs[step]["disco/objective"] == pytest.approx(j_value, abs=1e-6)
        assert logs[step]["disco/kl"] == pytest.approx(kl_value, rel=1e-4, abs=1e-7)
        assert "disco/penalty_local" not in logs[step]
        if drpo:  # DRPO's metric, and what a mistake in its plumbing would apply instead
            assert logs[step]["disco/effective_positives"] == pytest.approx(
                float(out.metrics["effective_positives"]), rel=1e-5
            )
            for label, wrong in DRPO_MISTAKES.items():
                model.zero_grad()
                (
                    k
                    * disco_loss(
                        torch.where(in_step.unsqueeze(1), logp, logp.detach()),
                        old,
                        mask,
                        rewards,
                        groups,
                        score=score,
                        kl_estimator=kl_estimator,
                        **{"objective": objective, **drpo, **wrong},
                    ).loss
                ).backward(retain_graph=True)
                apart[label] = max(apart[label], relative_error(rec.grads[step], model))
            continue
        if step == 0:  # the sampling policy: no planning pass, the old log-probs' stats
            assert logs[step]["disco/kl"] == 0.0
            continue
        # k3 >= 0: the constraint is active and the squared hinge's exact slope is tested
        assert kl_value > 1e-4, "constraint inactive: the squared hinge would be untested"
        model.zero_grad()
        sampling_surrogate(
            model, gen, old, w0, chunks, b=b, k=k, score=score, kl_estimator=kl_estimator
        ).backward()
        assert relative_error(rec.grads[step], model) > 1e-3  # the test tells the modes apart
    if drpo:
        print(
            f"DRPO in TRL: relative error per step {errors}; largest relative difference of "
            f"the wrong options {apart}"
        )
        assert min(apart.values()) > 1e-3, apart


def test_penalty_is_the_local_approximation(tmp_path: Any) -> None:
    """``weights="sampling"``, second optimizer step on a generation batch (policy moved,
    constraint active): the penalty gradient is sum_mb (n_mb/N) grad pen(KL_mb), not the exact
    grad pen(KL) of the step's token-mean KL; the logged local penalty bounds the exact one from
    above."""
    config = tiny_config(
        str(tmp_path), num_iterations=2, max_steps=2, kl_estimator="k3", weights="sampling"
    )
    trainer, rec = make_recording_trainer(config)
    trainer.train()
    assert trainer.planning_passes == []  # no pass at the current parameters
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
