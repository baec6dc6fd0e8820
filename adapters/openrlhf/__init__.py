"""DisCO for OpenRLHF (0.11.x) without forking it.

Launch with ``python -m discoloss.adapters.openrlhf.train_ppo_ray <OpenRLHF flags>
--algo.advantage.estimator disco --algo.disco.*`` (see ``docs/guides/openrlhf.md``).

Programmatic use: call :func:`install` in every process that runs OpenRLHF trainers, e.g. with
``ray.init(runtime_env={"worker_process_setup_hook": HOOK})``, and set
``args.algo.advantage.estimator = "disco"`` (options in ``args.algo.disco``).

Importing this package does not import OpenRLHF.
"""

from __future__ import annotations

from discoloss.adapters.openrlhf.hook import HOOK, setup, with_setup_hook
from discoloss.adapters.openrlhf.settings import (
    ESTIMATOR,
    DiscoSettings,
    LayoutError,
    check_layout,
    settings_from_args,
)


def install() -> None:
    """Install the adapter in this process (idempotent); see :mod:`.patch`."""
    from discoloss.adapters.openrlhf.patch import install as _install

    _install()


__all__ = [
    "ESTIMATOR",
    "HOOK",
    "DiscoSettings",
    "LayoutError",
    "check_layout",
    "install",
    "settings_from_args",
    "setup",
    "with_setup_hook",
]
