"""Package discovery: the core ``discoloss/`` plus ``adapters/`` installed as
``discoloss.adapters``.

Everything else (metadata, dependencies, extras) lives in pyproject.toml.
"""

from setuptools import find_packages, setup

core = find_packages(include=["discoloss", "discoloss.*"])
adapters = ["discoloss.adapters"] + [
    f"discoloss.adapters.{name}" for name in find_packages("adapters", exclude=["*.examples*"])
]

setup(packages=core + adapters, package_dir={"discoloss.adapters": "adapters"})
