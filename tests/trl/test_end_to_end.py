"""DisCOTrainer.train() end to end on CPU: the README's script, and a model loaded from disk."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from trl_support import EXAMPLE, README, RecordingTrainer, load_example, tiny_config


def test_readme_shows_the_tested_script() -> None:
    """The script in docs/guides/trl.md is, verbatim, the file the next test runs."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert EXAMPLE.read_text() in blocks


def test_example_script_trains(tmp_path: Any) -> None:
    ex = load_example()
    trainer = ex.main(["--output-dir", str(tmp_path), "--max-steps", "8"])
    assert trainer.state.global_step == 8

    logs = trainer.state.log_history
    steps = [e for e in logs if "disco/objective" in e]
    generations = [e for e in logs if "reward" in e]
    assert len(steps) == 8 and len(generations) == 2  # 4 optimizer steps per generation batch
    for entry in logs:
        for key, value in entry.items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, entry)
    for key in (
        "loss",
        "entropy",
        "disco/objective",
        "disco/kl",
        "disco/penalty",
        "disco/constraint_active",
        "disco/frac_groups_with_signal",
    ):
        assert all(key in e for e in steps), key
    assert "train_loss" in logs[-1] and math.isfinite(logs[-1]["train_loss"])

    # weights="current": the values are the generation batch's at each step's parameters. The
    # first step of a generation batch runs at the sampling policy (KL exactly 0); the later
    # ones see the policy move, measured against the stored sampling log-probs.
    kls = [e["disco/kl"] for e in steps]
    assert kls[0] == 0.0 and kls[4] == 0.0
    assert all(kl != 0.0 for i, kl in enumerate(kls) if i % 4)
    assert any(e["disco/constraint_active"] == 1.0 for e in steps)
    assert not any("disco/penalty_local" in e for e in steps)  # the exact penalty is applied
    assert any(e["disco/frac_groups_with_signal"] > 0 for e in steps)

    initial = ex.build_model()
    trained = trainer.model.state_dict()
    changed = [n for n, p in initial.state_dict().items() if not torch.equal(p, trained[n])]
    assert len(changed) == len(initial.state_dict())


def test_model_from_disk_reference_kl_and_unscorable_completions(tmp_path: Any) -> None:
    """Model and reference model loaded by TRL from a directory; a reward function that cannot
    score some completions (returns None): those get weight 0 and the run stays finite; then
    an evaluation pass."""
    ex = load_example()
    model_dir = tmp_path / "tiny"
    ex.build_model().save_pretrained(model_dir)
    ex.build_tokenizer().save_pretrained(model_dir)

    def partial_reward(completions: list[str], answer: list[str], **kw: Any) -> list[Any]:
        scores = ex.parity_reward(completions, answer)
        return [s if c[:1].isdigit() else None for c, s in zip(completions, scores)]

    config = tiny_config(
        str(tmp_path / "out"),
        beta=0.04,
        allow_reference_kl=True,
        max_steps=2,
        num_iterations=2,
        max_completion_length=6,
    )
    trainer = RecordingTrainer(  # the model as a path: TRL loads it and its reference copy
        model=str(model_dir),
        reward_funcs=partial_reward,
        args=config,
        train_dataset=ex.build_dataset(),
        processing_class=ex.build_tokenizer(),
    )
    assert trainer.ref_model is not None
    trainer.train()
    logs = [e for e in trainer.state.log_history if "disco/objective" in e]
    assert len(logs) == 2
    assert all(math.isfinite(e["kl"]) and e["kl"] >= 0.0 for e in logs)
    assert logs[1]["kl"] > 0.0
    rewards = torch.cat([mb["disco_rewards"] for mb in trainer.micro_batches])
    weights = torch.cat([mb["disco_weights"] for mb in trainer.micro_batches])
    unscorable = torch.isnan(rewards)
    assert unscorable.any() and not unscorable.all()
    assert torch.all(weights[unscorable] == 0.0)
    assert torch.isfinite(weights).all()

    metrics = trainer.evaluate(ex.build_dataset(8, seed=1))  # eval batches: scored, not split
    for key in ("eval_disco/objective", "eval_disco/kl", "eval_entropy", "eval_loss"):
        assert math.isfinite(metrics[key]), key
    assert metrics["eval_disco/kl"] == 0.0  # evaluated at the policy that sampled them
