"""The README and the documentation pages: one copy of each text, commands that work as written,
code blocks that run, links that resolve.

The Sphinx build (``nox -s docs``) checks the site's own links and references; these tests cover
what it does not see: the README (GitHub's landing page, not part of the site), the adapters'
stub READMEs, and the Python blocks of every page, run here with the core installed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
ENGINES = ("verl", "openrlhf", "trl")

# Pages whose Python blocks are not meant to run here, and where they are run instead.
NOT_RUN_HERE = {
    "docs/demo.md": "a fragment of the demo's loop (discoloss/demo/train.py, run by test_demo.py)",
    "docs/guides/trl.md": "the TRL example script: tests/trl checks it is the file it runs",
}


def pages() -> list[Path]:
    """The README and every Markdown file of the site (benchmarks/RESULTS.md is included)."""
    docs = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)
    return [README, *docs, ROOT / "benchmarks" / "RESULTS.md"]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def toy_namespace() -> dict[str, object]:
    """The names that code fragments of the pages take as given: a toy mini-batch of 2 questions
    x 4 responses, split into 2 micro-batches that cut the second question in half."""
    gen = torch.Generator().manual_seed(0)
    log_probs = -torch.rand(8, 6, generator=gen)
    old_log_probs = log_probs + 0.01 * torch.randn(8, 6, generator=gen)
    mask = torch.ones(8, 6, dtype=torch.bool)
    mask[::3, 4:] = False

    class MicroBatch:
        def __init__(self, rows: slice) -> None:
            self.slice = rows
            self.log_probs = log_probs[rows].clone().requires_grad_()
            self.old_log_probs = old_log_probs[rows]
            self.mask = mask[rows]

    return {
        "torch": torch,
        "micro_batches": [MicroBatch(slice(0, 6)), MicroBatch(slice(6, 8))],
        "rewards": torch.tensor([1.0, 0, 0, 1, 0, 1, 0, 0]),
        "group_ids": torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]),
    }


RUNNABLE = [
    p for p in pages() if python_blocks(p) and p.relative_to(ROOT).as_posix() not in NOT_RUN_HERE
]


def test_the_exclusions_exist() -> None:
    for page in NOT_RUN_HERE:
        assert python_blocks(ROOT / page), f"{page} has no Python block any more: drop it"


@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_python_blocks_run(page: Path) -> None:
    """Each page's blocks run in order in one namespace, as a reader would paste them."""
    namespace = toy_namespace()
    for i, block in enumerate(python_blocks(page)):
        exec(compile(block, f"{page.relative_to(ROOT)} [python block {i + 1}]", "exec"), namespace)


def test_readme_example_trains() -> None:
    """The README's example is the first loss a newcomer runs: it must reach log_probs.grad."""
    namespace: dict[str, object] = {}
    exec(compile(python_blocks(README)[0], "README.md", "exec"), namespace)
    grad = namespace["log_probs"].grad  # type: ignore[union-attr]
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_readme_is_short() -> None:
    size = len(README.read_bytes())
    assert size <= 12 * 1024, f"README.md is {size} bytes: keep it under 12 KB, move text to docs/"


def test_readme_names_the_two_commands() -> None:
    text = README.read_text()
    assert "discoloss demo" in text
    assert "pip install nox && nox" in text
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^nox$", ci, re.M), "the README's test command is what CI runs"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_install_from_the_package_index(page: Path) -> None:
    """discoloss is not on the package index: installs come from a checkout or the repository."""
    for line in page.read_text().splitlines():
        match = re.search(r"pip install (?:-U |--upgrade )?[\"']?discoloss\b(?!\S* @)", line)
        assert not match, f"{page.name}: {line.strip()!r} installs discoloss from the index"


def test_each_guide_lives_once() -> None:
    readme = README.read_text()
    for engine in ENGINES:
        guide = DOCS / "guides" / f"{engine}.md"
        stub = ROOT / "adapters" / engine / "README.md"
        assert f"docs/guides/{engine}.md" in stub.read_text()
        assert len(stub.read_bytes()) < 1500, f"{stub}: a pointer to the guide, not a copy"
        # no paragraph of the guide is repeated in the README
        for paragraph in guide.read_text().split("\n\n"):
            if len(paragraph) > 200:
                assert paragraph not in readme, f"README.md repeats a paragraph of {guide.name}"


@pytest.mark.parametrize(
    "page",
    [README, *(ROOT / "adapters" / e / "README.md" for e in ENGINES)],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_relative_links_resolve(page: Path) -> None:
    """GitHub renders these files outside the site: their relative links must point at files."""
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    relative = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert relative, f"{page}: expected links into the docs"
    for link in relative:
        assert (page.parent / link).exists(), f"{page.relative_to(ROOT)}: broken link {link}"
