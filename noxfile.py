"""Test sessions. Each engine adapter is tested in its own virtual environment (their pins
conflict).

    pip install nox && nox            # every suite, as CI runs it
    nox -s core                       # one suite
    nox -R -s core                    # reuse an existing environment
    nox -s docs                       # the documentation site, into docs/_build/html
"""

from __future__ import annotations

import nox

nox.options.sessions = ["core", "docs", "verl", "trl", "openrlhf", "openrlhf_oldest"]
nox.options.error_on_missing_interpreters = True

PYTHON = "3.11"
TORCH = "torch==2.13.0"  # installed first: a bare torch requirement would pull a CUDA build


@nox.session(python=PYTHON)
def core(session: nox.Session) -> None:
    """The core package, analysis, baselines, distributed (gloo) and the demo's quick mode."""
    session.install(TORCH)
    session.install("-e", ".[test,analysis,demo]")
    session.run("pytest", "tests/core", *session.posargs)


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """The documentation site: warnings are errors (broken links and references, docstring
    markup, public names missing from the API reference). The engines are not installed."""
    session.install(TORCH)
    session.install("-e", ".[docs]")
    session.run(
        "sphinx-build", "-W", "--keep-going", "-n", "-E", "-b", "html",
        "docs", "docs/_build/html", *session.posargs,
    )


@nox.session(python=PYTHON)
def verl(session: nox.Session) -> None:
    """The verl adapter against the real verl 0.9.x on CPU: registries, config, ppo_loss,
    layout, and main_ppo training end to end (stand-ins for vLLM and the GPU platform)."""
    session.install(TORCH)
    session.install("-e", ".[verl,test,bench]")  # bench: the layout benchmark's smoke test
    session.run("pytest", "tests/verl", *session.posargs)


@nox.session(python=PYTHON)
def trl(session: nox.Session) -> None:
    """The TRL adapter against the real TRL: end to end training on CPU, gradient parity, two
    processes (accelerate, gloo), configuration errors."""
    session.install(TORCH)
    session.install("-e", ".[trl,test]")
    session.run("pytest", "tests/trl", *session.posargs, env={"HF_HUB_OFFLINE": "1"})


# OpenRLHF adapter: the real OpenRLHF on CPU. Its full install needs CUDA (flash-attn builds from
# source, vLLM), so OpenRLHF goes in without dependencies plus the minimal set its trainer,
# experience maker and launcher import; the tests provide stand-ins for vLLM and flash-attn.
OPENRLHF_NEWEST = ("openrlhf==0.11.2", "deepspeed==0.19.6")
OPENRLHF_OLDEST = ("openrlhf==0.11.0", "deepspeed==0.19.5")
OPENRLHF_DEPS = (
    "transformers==5.15.0",
    "ray==2.55.0",
    "peft==0.21.2",
    "datasets==5.2.0",
    "torchdata==0.11.0",
    "aiohttp",
    "pillow",
    "pylatexenc",
)


def _openrlhf_suite(session: nox.Session, openrlhf: str, deepspeed: str, *pytest_args: str) -> None:
    session.install(TORCH)
    session.install("--no-deps", openrlhf)
    session.install(*OPENRLHF_DEPS, "setuptools", "wheel")
    # DeepSpeed builds no ops here (CPU): no build isolation, so that it sees the torch above
    session.install("--no-build-isolation", deepspeed, env={"DS_BUILD_OPS": "0"})
    session.install("-e", ".[test]")
    # OpenRLHF's wheel installs a top-level ``tests`` package: import test files by path
    session.run(
        "pytest", "--import-mode=importlib", "-p", "no:cacheprovider", "tests/openrlhf",
        *pytest_args, *session.posargs,
    )


@nox.session(python=PYTHON)
def openrlhf(session: nox.Session) -> None:
    """OpenRLHF adapter against the newest supported OpenRLHF (0.11.2), including the PPO loop
    end to end on CPU (tests/openrlhf/test_openrlhf_e2e.py: two launcher runs, a few minutes)."""
    _openrlhf_suite(session, *OPENRLHF_NEWEST)


@nox.session(python=PYTHON)
def openrlhf_oldest(session: nox.Session) -> None:
    """OpenRLHF adapter against the oldest supported OpenRLHF (0.11.0).

    Every test that touches version-dependent OpenRLHF code runs here in-process; the
    multi-process tests (Ray worker hook, two gloo ranks, the end-to-end PPO loop: ~10 minutes)
    run in ``openrlhf`` only.
    """
    only_in_process = ("not test_launcher_installs_the_adapter_in_ray_workers"
                       " and not test_two_ranks and not test_e2e")
    _openrlhf_suite(session, *OPENRLHF_OLDEST, "-k", only_in_process)
