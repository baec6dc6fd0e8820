"""The verl suite runs against the real verl (no skip: a missing verl is an import error)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import verl  # noqa: F401  # fails loudly without verl

sys.path.insert(0, str(Path(__file__).parent))

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "docs" / "guides" / "verl.md"  # the verl guide


def readme_overrides() -> list[str]:
    """The ``key=value`` overrides of the README's verl command (placeholders filled)."""
    text = README.read_text()
    block = re.search(r"<!-- verl-command -->\s*```bash\n(.*?)```", text, re.S)
    assert block, "README: verl command block not found"
    tokens = block.group(1).replace("\\\n", " ").split()
    assert tokens[:3] == ["python", "-m", "verl.trainer.main_ppo"], tokens[:3]
    out = []
    for tok in tokens[3:]:
        key, _, value = tok.partition("=")
        if "$" in value:
            value = "/nonexistent/placeholder"
        out.append(f"{key}={value}")
    return out
