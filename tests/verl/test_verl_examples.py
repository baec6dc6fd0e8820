"""Every launch script under adapters/verl/examples composes and passes validation."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from discoloss.adapters.verl.config import DiscoPolicyLossConfig
from test_verl_config import actor_of, shipped_config, validate, verl_config

EXAMPLES = Path(__file__).resolve().parents[2] / "adapters" / "verl" / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.sh") if p.name != "common.sh")


def captured_args(script: str, tmp_path: Path) -> list[str]:
    """Run the script with a stand-in python3 that records the main_ppo arguments."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "python3"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "-m" ]; then printf "%s\\n" "$@" > "$CAPTURE"; fi\n'
        "cat > /dev/null\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "TRAIN": "/data/t.parquet",
        "VAL": "/data/v.parquet",
        "CAPTURE": str(tmp_path / "args"),
    }
    extra = [str(tmp_path / "out")] if script == "smoke_gpu.sh" else []
    subprocess.run(
        ["bash", str(EXAMPLES / script), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return (tmp_path / "args").read_text().splitlines()


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_is_valid(script: str, tmp_path: Path) -> None:
    args = captured_args(script, tmp_path)
    assert args[:2] == ["-m", "verl.trainer.main_ppo"], args[:3]
    overrides = [a for a in args[2:] if not a.startswith("--config")]
    cfg = (
        shipped_config(*overrides)
        if "--config-name=disco_trainer" in args
        else verl_config(*overrides)
    )
    validate(cfg)
    pl = actor_of(cfg).policy_loss
    assert isinstance(pl, DiscoPolicyLossConfig)
    if script.startswith("disco_"):
        name = script.removesuffix(".sh")
        assert pl.objective == ("disco_b" if name.endswith("_b") else "disco")
        assert pl.score == ("likelihood_ratio" if "lratio" in name else "log_likelihood")
        assert pl.tau == (1.0 if "lratio" in name else 10.0)
        assert (pl.delta, pl.beta) == (1e-4, 1e3)
        assert cfg.actor_rollout_ref.actor.optim.lr == (2e-6 if "1.5b" in name else 1e-6)
        assert ("1.5B" if "1.5b" in name else "7B") in cfg.actor_rollout_ref.model.path
        assert (
            cfg.data.train_batch_size,
            cfg.actor_rollout_ref.actor.ppo_mini_batch_size,
            cfg.actor_rollout_ref.rollout.n,
            cfg.actor_rollout_ref.rollout.temperature,
        ) == (128, 32, 8, 0.6)
    print(script, json.dumps(overrides[:4]))


def test_all_paper_settings_present() -> None:
    expected = {
        f"disco_{m}_{s}{b}.sh"
        for m in ("1.5b", "7b")
        for s in ("logl", "lratio")
        for b in ("", "_b")
    }
    assert expected | {"smoke_gpu.sh"} == set(SCRIPTS)


def test_cpu_tryout_command_is_valid(tmp_path: Path) -> None:
    """The laptop tryout (its run is what test_verl_e2e does): its main_ppo command composes
    and passes validation."""
    proc = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "cpu_tryout.py"),
            "--out",
            str(tmp_path),
            "--print-command",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    args = shlex.split(proc.stdout.strip().splitlines()[-1])
    assert args[1:3] == ["-m", "verl.trainer.main_ppo"]
    cfg = verl_config(*args[3:])
    validate(cfg)
    assert cfg.algorithm.adv_estimator == "disco"
    assert isinstance(actor_of(cfg).policy_loss, DiscoPolicyLossConfig)
