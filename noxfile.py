"""Test sessions. Each engine adapter is tested in its own virtual environment (their pins conflict).

    pip install nox && nox            # every suite, as CI runs it
    nox -s core                       # one suite
    nox -R -s core                    # reuse an existing environment
"""

from __future__ import annotations

import nox

nox.options.sessions = ["core", "verl", "trl"]
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
def verl(session: nox.Session) -> None:
    """The verl adapter against the real verl 0.9.x (CPU: registries, config, ppo_loss, layout)."""
    session.install(TORCH)
    session.install("-e", ".[verl,test]")
    session.run("pytest", "tests/verl", *session.posargs)


@nox.session(python=PYTHON)
def trl(session: nox.Session) -> None:
    """The TRL adapter against the real TRL: end to end training on CPU, gradient parity, two
    processes (accelerate, gloo), configuration errors."""
    session.install(TORCH)
    session.install("-e", ".[trl,test]")
    session.run("pytest", "tests/trl", *session.posargs, env={"HF_HUB_OFFLINE": "1"})
