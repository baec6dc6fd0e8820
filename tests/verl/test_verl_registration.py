"""Registration through verl's plugin mechanisms, in fresh processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

CHECK = (
    "import verl\n"
    "from verl.trainer.ppo import core_algos as c\n"
    "print('disco' in c.ADV_ESTIMATOR_REGISTRY, 'disco' in c.POLICY_LOSS_REGISTRY)\n"
)


def run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300
    )


def test_plain_import_verl_registers_both() -> None:
    r = run(CHECK)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["True", "True"]


def test_without_entry_points_and_with_external_modules() -> None:
    off = run(CHECK, VERL_USE_EXTERNAL_PLUGINS="none")
    assert off.returncode == 0, off.stderr
    assert off.stdout.split()[-2:] == ["False", "False"]  # the test can fail: entry point is ours
    on = run(
        CHECK, VERL_USE_EXTERNAL_PLUGINS="none", VERL_USE_EXTERNAL_MODULES="discoloss.adapters.verl"
    )
    assert on.returncode == 0, on.stderr
    assert on.stdout.split()[-2:] == ["True", "True"]


def test_registering_twice_is_harmless() -> None:
    code = CHECK + textwrap.dedent(
        """
        import importlib
        import discoloss.adapters.verl as a
        a.register(); a.register()
        mod = importlib.reload(importlib.import_module("discoloss.adapters.verl._register"))
        mod.register()
        fn = c.get_adv_estimator_fn("disco")
        print(getattr(fn, "__discoloss__", False), c.get_policy_loss_fn("disco").__name__)
        """
    )
    r = run(code, VERL_USE_EXTERNAL_MODULES="discoloss.adapters.verl")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["True", "compute_policy_loss_disco"]


def test_load_failure_is_visible(tmp_path: Path) -> None:
    """Another package took the name: verl swallows the plugin error at DEBUG; ours is logged."""
    (tmp_path / "other_disco.py").write_text(
        "from verl.trainer.ppo.core_algos import register_policy_loss\n"
        "register_policy_loss('disco')(lambda **kw: None)\n"
    )
    r = run(
        CHECK,
        VERL_USE_EXTERNAL_MODULES="other_disco",
        PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    assert r.returncode == 0, r.stderr  # verl itself carries on
    assert "discoloss: the verl adapter failed to load" in r.stderr
    assert "not discoloss's" in r.stderr
