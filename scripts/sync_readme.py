"""Copy each adapter's README section (and the demo's results) into the top-level README.

The sections live next to the code they document (adapters/<engine>/README.md, docs/demo.md),
where their tests read them; the top-level README holds verbatim copies between markers.
``python scripts/sync_readme.py`` rewrites them; ``--check`` exits 1 if any copy is stale
(tests/core/test_readme.py runs the check).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = (
    "docs/demo.md",
    "adapters/verl/README.md",
    "adapters/openrlhf/README.md",
    "adapters/trl/README.md",
)


def block(source: str, text: str) -> str:
    return f"<!-- BEGIN {source} -->\n{text.rstrip()}\n<!-- END {source} -->"


def synced(readme: str) -> str:
    for source in SECTIONS:
        path = ROOT / source
        if not path.is_file():
            continue
        text = path.read_text()
        # links relative to the section's folder must stay valid from the top level
        folder = str(Path(source).parent)
        if folder != ".":
            text = re.sub(
                r"\]\((?!https?://|#|/)([^)]+)\)", lambda m: f"]({folder}/{m.group(1)})", text
            )
        pattern = re.compile(
            rf"<!-- BEGIN {re.escape(source)} -->.*?<!-- END {re.escape(source)} -->", re.S
        )
        if pattern.search(readme):
            readme = pattern.sub(lambda _: block(source, text), readme)
        else:
            readme = readme.rstrip() + "\n\n" + block(source, text) + "\n"
    return readme


def main(argv: list[str]) -> int:
    readme_path = ROOT / "README.md"
    current = readme_path.read_text()
    new = synced(current)
    if "--check" in argv:
        if new != current:
            print("README.md is stale: run python scripts/sync_readme.py", file=sys.stderr)
            return 1
        return 0
    readme_path.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
