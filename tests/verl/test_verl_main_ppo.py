"""verl's own entry point with the README command, on CPU, as far as verl allows.

What runs: Hydra composition, the adapter's driver-side checks and verl's validate_config,
ray.init, and the TaskRunnerV1 actor receiving the resolved config (with the DisCO policy-loss
target). Where verl stops on a CPU-only machine (recorded in the test output): the V1 task
runner then initialises TransferQueue and the GPU resource pool for the actor and rollout
workers, which never becomes available here; the run waits there until this test ends it.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
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
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX paths are limited to 107 bytes
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "RAY_USAGE_STATS_ENABLED": "0",
        "HYDRA_FULL_ERROR": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "verl.trainer.main_ppo", *args, f"hydra.run.dir={tmp_path}/hydra"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    out: list[str] = []
    where = "timeout"
    end = time.monotonic() + deadline
    try:
        while time.monotonic() < end:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                where = "exited"
                break
            out.append(line)
            if stop_at is not None and stop_at in line:
                where = "reached"
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # lets the driver shut its Ray cluster down
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return proc.returncode if where == "exited" else None, where, "".join(out)


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
        "config; verl then waits for TransferQueue/GPU resources (stopped by the test)"
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("tau=-1", "actor_rollout_ref.actor.policy_loss.tau must be > 0, got -1"),
        (
            "lagrangian_lr=0",
            "actor_rollout_ref.actor.policy_loss.lagrangian_lr: expected a finite number > 0",
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
