"""Ray ``worker_process_setup_hook`` that installs the DisCO adapter in every Ray worker.

OpenRLHF's trainers run inside ``@ray.remote`` actors: a patch applied in the driver does not
reach them (Ray ships the classes by reference and each worker imports OpenRLHF afresh). Ray runs
``runtime_env["worker_process_setup_hook"]`` in every worker process before it executes
anything, which is where :func:`setup` installs the adapter.

The launcher (:mod:`discoloss.adapters.openrlhf.train_ppo_ray`) adds the hook to OpenRLHF's
``ray.init`` call. With ``ray job submit`` you may also set it at job level::

    ray job submit --runtime-env-json='{"worker_process_setup_hook":
        "discoloss.adapters.openrlhf.hook.setup"}' -- python -m ...
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["HOOK", "setup", "with_setup_hook"]

#: Import path of :func:`setup`, as Ray's runtime_env wants it.
HOOK = "discoloss.adapters.openrlhf.hook.setup"

#: Environment variable Ray uses to pass a job-level runtime env to the driver of a submitted job.
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def setup() -> None:
    """Install the adapter in this (worker) process. Idempotent, cheap: OpenRLHF modules are
    patched when the process imports them."""
    from discoloss.adapters.openrlhf.patch import install

    install()


def _job_level_hook() -> Any:
    """The setup hook of the submitted job's runtime env, if this driver runs under
    ``ray job submit``."""
    import json

    raw = os.environ.get(_JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    runtime_env = config.get("runtime_env") or {}
    return runtime_env.get("worker_process_setup_hook")


def with_setup_hook(runtime_env: dict[str, Any] | None) -> dict[str, Any]:
    """Return ``runtime_env`` with the DisCO worker setup hook added.

    Raises ValueError if another setup hook is already configured (Ray runs only one).
    A hook set at job level (``ray job submit --runtime-env-json``) is left to Ray's merge.
    """
    env = dict(runtime_env or {})
    job_hook = _job_level_hook()
    for where, hook in (("runtime_env", env.get("worker_process_setup_hook")),
                        ("the submitted job's runtime env", job_hook)):
        if hook is not None and hook != HOOK:
            raise ValueError(
                f"worker_process_setup_hook: {where} already sets {hook!r}; Ray runs a single "
                f"hook per job, and DisCO needs {HOOK!r} (call your setup from a wrapper that "
                "also calls discoloss.adapters.openrlhf.hook.setup)"
            )
    if job_hook is None:
        env["worker_process_setup_hook"] = HOOK
    return env
