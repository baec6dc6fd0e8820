"""OpenRLHF's wheel installs a top-level ``tests`` package into site-packages. This suite has
no ``__init__.py`` files and runs with ``--import-mode=importlib``: check that what runs is ours."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_no_package_markers():
    assert not list(HERE.glob("**/__init__.py")) or all(
        "standins" in p.parts for p in HERE.glob("**/__init__.py"))
    assert not (HERE.parent / "__init__.py").exists()


def test_collected_modules_are_ours():
    ours = [m for m in list(sys.modules.values())
            if Path(getattr(m, "__file__", None) or "x").name.startswith("test_openrlhf_")]
    assert ours, "no test module of this suite in sys.modules"
    assert all(Path(m.__file__).resolve().parent == HERE for m in ours)
    # whatever pytest names them, the modules registered under a ``tests`` prefix that hold
    # this suite's code come from this folder, not from OpenRLHF's site-packages ``tests``
    for name, module in list(sys.modules.items()):
        if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_openrlhf_"):
            assert Path(module.__file__).resolve().parent == HERE


def test_site_packages_tests_package_is_not_ours():
    spec = importlib.util.find_spec("tests")
    if spec is not None and spec.origin:  # OpenRLHF's: present, but never this suite
        assert HERE not in Path(spec.origin).resolve().parents
