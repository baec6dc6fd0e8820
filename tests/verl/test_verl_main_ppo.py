"""verl's own entry point with the README command (real model and data paths left as
placeholders), on CPU, up to where the adapter's part of the start-up ends.

What runs: Hydra composition, the adapter's driver-side checks and verl's validate_config,
ray.init, and the TaskRunnerV1 actor receiving the resolved config (with the DisCO policy-loss
target); the test stops the run there. verl does not wait for GPUs at that point: with the
placeholders there is no model to load, and with verl's defaults on a 2-core machine the next
step, TransferQueue's start-up with 8 storage units, hangs (see the CPU settings in
``verl_e2e_kit.base_overrides``). Full training runs on CPU, with the stand-ins for the
GPU-only pieces, are in ``test_verl_e2e.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import verl_e2e_kit as kit
from conftest import readme_overrides

REACHED = "'_target_': 'discoloss.adapters.verl.config.DiscoPolicyLossConfig'"
CPU = [
    "trainer.n_gpus_per_node=1",
    "trainer.nnodes=1",
    "ray_kwargs.ray_init.num_cpus=2",
    "trainer.logger=[console]",
]


def launch(
    args: list[str], tmp_path: Path, deadline: float, stop_at: str | None
) -> tuple[int | None, str, str]:
    run = kit.launch(args, tmp_path, deadline=deadline, stop_at=stop_at, harness=False)
    return run.rc, run.where, run.log


def test_main_ppo_gets_past_the_adapter(tmp_path: Path) -> None:
    rc, where, log = launch(readme_overrides() + CPU, tmp_path, deadline=420, stop_at=REACHED)
    assert "discoloss: the verl adapter failed" not in log
    assert "DiscoConfigError" not in log and "DiscoLayoutError" not in log
    assert "[validate_config] All configuration checks passed successfully!" in log, log[-3000:]
    assert "ray init kwargs" in log
    assert where == "reached", (
        f"verl stopped before the task runner got the config ({where}, rc={rc}):\n{log[-3000:]}"
    )
    print(
        "main_ppo on CPU: driver validation passed, Ray started, TaskRunnerV1 received the DisCO "
        "config (stopped by the test there; full CPU training runs: test_verl_e2e.py)"
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tau=-1", "actor_rollout_ref.actor.policy_loss.tau must be > 0, got -1"),
        (
            "lagrangian_lr=0",
            "actor_rollout_ref.actor.policy_loss.lagrangian_lr: expected a finite number > 0",
        ),
        (
            "weights=per_question",
            "actor_rollout_ref.actor.policy_loss.weights='per_question' is not a valid option",
        ),
    ],
)
def test_main_ppo_bad_value_fails_in_the_driver(
    tmp_path: Path, override: str, message: str
) -> None:
    args = readme_overrides() + CPU + [f"+actor_rollout_ref.actor.policy_loss.{override}"]
    rc, where, log = launch(args, tmp_path, deadline=240, stop_at=None)
    assert where == "exited" and rc != 0, log[-2000:]
    assert message in log
    assert "ray init kwargs" not in log  # refused before any Ray process started
