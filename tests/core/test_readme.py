"""The top-level README holds verbatim, up-to-date copies of the sections that live (and are
tested) next to their code: the adapters' READMEs and the demo's results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_sections_are_in_sync() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sync_readme.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_readme_names_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    assert "discoloss demo" in text
    assert "pip install nox && nox" in text
    assert "nox" in (ROOT / ".ci" / "run").read_text()
