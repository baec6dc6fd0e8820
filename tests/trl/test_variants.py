"""The ablation variants reach DisCOTrainer by one option: first-update parity with
``disco_loss`` under the same option, the Lagrangian multiplier's dual ascent and its
checkpoint round trip, and bad values refused at construction."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from trl_support import (
    assert_grads_close,
    check_generation_batch,
    concat,
    load_example,
    make_recording_trainer,
    reference_model,
    tiny_config,
    token_log_probs,
)

from discoloss import disco_loss
from discoloss.adapters.trl import DisCOConfig, DisCOTrainer


@pytest.mark.parametrize(
    "option",
    [
        {"objective": "cvar", "cvar_alpha": 0.5},
        {"objective": "disco_2way", "tau": 0.5},
        {"objective": "auc_logistic", "tau": 0.5},
        {"score": "clipped_ratio", "clip_eps": 0.1},
        {"constraint": "kl_penalty", "disco_beta": 3.0},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_first_update_equals_disco_loss_with_the_variant(tmp_path: Any, option: dict) -> None:
    config = tiny_config(str(tmp_path), max_steps=1, **option)
    trainer, rec = make_recording_trainer(config)
    trainer.train()
    rows = concat(trainer.micro_batches)
    rewards = check_generation_batch(trainer.processing_class, rows, config.num_generations)
    model = reference_model(rec.params[0])
    logp = token_log_probs(model, rows)
    core = {("beta" if k == "disco_beta" else k): v for k, v in option.items()}
    out = disco_loss(logp, logp.detach(), rows["completion_mask"], rewards,
                     rows["disco_group_ids"], **core)
    out.loss.backward()
    assert_grads_close(rec.grads[0], model)


def test_lagrangian_multiplier_ascends_and_survives_checkpoints(tmp_path: Any) -> None:
    ex = load_example()
    config = tiny_config(
        str(tmp_path / "run"), constraint="lagrangian", lagrangian_lr=50.0, disco_delta=0.0,
        max_steps=4, num_iterations=2, save_strategy="steps", save_steps=2,
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
    assert value > 0.0
    saved = torch.load(tmp_path / "run" / "checkpoint-2" / "disco_multiplier.pt")
    assert math.isclose(float(saved["value"]), steps[1]["disco/multiplier"], rel_tol=1e-5)

    resumed = DisCOTrainer(
        model=ex.build_model(), reward_funcs=ex.parity_reward, args=config,
        train_dataset=ex.build_dataset(), processing_class=ex.build_tokenizer(),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert resumed.disco_multiplier is not None and resumed.disco_multiplier.steps == 4


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
