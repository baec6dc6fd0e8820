"""Shared set-up for the OpenRLHF adapter tests (real OpenRLHF, CPU).

* The stand-ins for the GPU-only modules OpenRLHF imports at module level (``vllm``,
  ``flash_attn``) are put on ``sys.path`` and ``PYTHONPATH`` (for subprocesses and Ray workers).
* OpenRLHF itself must be importable: a missing engine is a failure, never a skip.
* OpenRLHF's wheel installs a top-level ``tests`` package into site-packages; this suite has no
  ``__init__.py`` and runs with ``--import-mode=importlib``, and
  :func:`test_modules_are_ours` (in test_openrlhf_guard.py) checks it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent
STANDINS = HERE / "standins"

if str(STANDINS) not in sys.path:
    sys.path.insert(0, str(STANDINS))
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(STANDINS), *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import openrlhf  # noqa: E402,F401  (a missing engine must fail the suite, not skip it)
from orlhf_testkit import save_tiny_model  # noqa: E402


def pytest_report_header(config: Any) -> str:
    from importlib.metadata import version

    return (f"openrlhf {version('openrlhf')}, deepspeed {version('deepspeed')}, "
            f"ray {version('ray')}, transformers {version('transformers')}, "
            f"torch {torch.__version__}")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture
def standin_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ray.get``/``ray.put`` as identities inside OpenRLHF's experience maker (no cluster)."""
    from openrlhf.trainer.ppo_utils import experience_maker

    monkeypatch.setattr(experience_maker, "ray",
                        SimpleNamespace(get=lambda x: x, put=lambda x: x), raising=True)


@pytest.fixture(scope="session", autouse=True)
def adapter_installed() -> None:
    from discoloss.adapters.openrlhf import install

    install()
