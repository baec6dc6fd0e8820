"""The ablation variants reach DisCOTrainer by one option: parity with ``disco_loss`` under the
same option at every optimizer step on a reused generation batch, the Lagrangian multiplier's
dual ascent and its checkpoint round trip, and bad values refused at construction."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from discoloss.adapters.trl import DisCOConfig, DisCOTrainer
from trl_support import (
    assert_grads_close,
    check_generation_batch,
    concat,
    load_example,
    make_recording_trainer,
    reference_model,
    relative_error,
    tiny_config,
    token_log_probs,
)

from discoloss import LagrangeMultiplier, disco_loss


@pytest.mark.parametrize(
    "option",
    [
        {"objective": "cvar", "cvar_alpha": 0.5},
        {"objective": "disco_2way", "tau": 0.5},
        {"objective": "auc_logistic", "tau": 0.5},
        {"score": "clipped_ratio", "clip_eps": 0.1},
        {"constraint": "kl_penalty", "disco_beta": 3.0},
        {"constraint": "lagrangian", "lagrangian_lr": 50.0, "disco_delta": 0.0,
         "kl_estimator": "k3"},  # fmt: skip
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_every_update_equals_disco_loss_with_the_variant(tmp_path: Any, option: dict) -> None:
    """``weights="current"`` (the default), one generation batch reused for 3 optimizer steps:
    each step applies the gradient of ``disco_loss`` with the same option at its parameters
    (the Lagrangian with the multiplier the previous steps ascended to)."""
    config = tiny_config(str(tmp_path), max_steps=3, num_iterations=3, **option)
    assert config.weights == "current"
    trainer, rec = make_recording_trainer(config)
    trainer.train()
    rows = concat(trainer.micro_batches[:2])  # the generation batch (3 passes over it)
    rewards = check_generation_batch(trainer.processing_class, rows, config.num_generations)
    logs = [e for e in trainer.state.log_history if "disco/objective" in e]
    core = {
        ("beta" if k == "disco_beta" else "delta" if k == "disco_delta" else k): v
        for k, v in option.items()
        if k != "lagrangian_lr"
    }
    for step in range(3):
        if option.get("constraint") == "lagrangian":
            before = 0.0 if step == 0 else logs[step - 1]["disco/multiplier"]
            core["multiplier"] = LagrangeMultiplier(lr=50.0, init=before)
        model = reference_model(rec.params[step])
        logp = token_log_probs(model, rows)
        out = disco_loss(logp, rows["old_per_token_logps"], rows["completion_mask"], rewards,
                         rows["disco_group_ids"], **core)
        out.loss.backward()
        assert relative_error(rec.grads[step], model) <= 1e-5, step
        assert_grads_close(rec.grads[step], model)
    if option.get("constraint") == "lagrangian":
        assert logs[1]["disco/multiplier"] > 0.0  # the penalty's slope was tested at step 3


@pytest.mark.parametrize("weights", ["current", "sampling"])
def test_lagrangian_multiplier_ascends_and_survives_checkpoints(
    tmp_path: Any, weights: str
) -> None:
    """Dual ascent with the KL of each optimizer step (``weights="current"``: the generation
    batch's exact KL at the step's parameters, from the planning pass), saved in checkpoints,
    and restored on resume: the resumed run continues the ascent from the saved value."""
    ex = load_example()
    config = tiny_config(
        str(tmp_path / "run"), constraint="lagrangian", lagrangian_lr=50.0, disco_delta=0.0,
        max_steps=4, num_iterations=2, save_strategy="steps", save_steps=2, weights=weights,
        kl_estimator="k3",
    )
    trainer = DisCOTrainer(
        model=ex.build_model(), reward_funcs=ex.parity_reward, args=config,
        train_dataset=ex.build_dataset(), processing_class=ex.build_tokenizer(),
    )
    trainer.train()
    steps = [e for e in trainer.state.log_history if "disco/multiplier" in e]
    assert len(steps) == 4
    # projected dual ascent with the step's KL: lambda_t = max(0, lambda_{t-1} + lr * kl_t)
    value = 0.0
    for entry in steps:
        value = max(0.0, value + 50.0 * entry["disco/kl"])
        assert math.isclose(entry["disco/multiplier"], value, rel_tol=1e-5, abs_tol=1e-9)
    assert steps[1]["disco/multiplier"] > 0.0  # (k3: the KL of a moved policy is > 0)
    saved = torch.load(tmp_path / "run" / "checkpoint-2" / "disco_multiplier.pt")
    assert math.isclose(float(saved["value"]), steps[1]["disco/multiplier"], rel_tol=1e-5)

    resumed = DisCOTrainer(
        model=ex.build_model(), reward_funcs=ex.parity_reward, args=config,
        train_dataset=ex.build_dataset(), processing_class=ex.build_tokenizer(),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.disco_multiplier is not None and resumed.disco_multiplier.steps == 4
    after = [e for e in resumed.state.log_history if "disco/multiplier" in e and e["step"] > 2]
    assert [e["step"] for e in after] == [3, 4]
    value = float(saved["value"])  # not 0: the multiplier was restored
    for entry in after:
        value = max(0.0, value + 50.0 * entry["disco/kl"])
        assert math.isclose(entry["disco/multiplier"], value, rel_tol=1e-5, abs_tol=1e-9)
    assert math.isclose(float(resumed.disco_multiplier.value), value, rel_tol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"objective": "cvar", "cvar_alpha": 1.5}, "cvar_alpha"),
        ({"constraint": "trust_region"}, "constraint"),
        ({"clip_eps": 1.0}, "clip_eps"),
        ({"disco_delta": -1.0}, "disco_delta"),
        ({"constraint": "lagrangian", "lagrangian_lr": 0.0}, "lagrangian_lr"),
    ],
)
def test_bad_variant_options(tmp_path: Any, overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DisCOConfig(output_dir=str(tmp_path), num_generations=4, use_cpu=True, bf16=False,
                    report_to="none", **overrides)
