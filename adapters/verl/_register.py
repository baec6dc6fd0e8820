"""Registration of the ``disco`` advantage estimator and policy loss in verl's registries."""

from __future__ import annotations

from typing import Any

from ._options import NAME
from .estimator import compute_disco_advantage
from .loss import compute_policy_loss_disco

MARK = "__discoloss__"


def _ours(fn: Any) -> bool:
    return bool(getattr(fn, MARK, False))


setattr(compute_disco_advantage, MARK, True)
setattr(compute_policy_loss_disco, MARK, True)


def register() -> None:
    """Register both under ``disco`` and install the hooks; calling it again is harmless.

    Raises RuntimeError if another package already registered a different ``disco``.
    """
    from verl.trainer.ppo import core_algos

    from ._hooks import (
        install_engine_workers_hook,
        install_v1_trainer_hook,
        install_validate_config_hook,
    )

    for registry, fn, what in (
        (core_algos.ADV_ESTIMATOR_REGISTRY, compute_disco_advantage, "advantage estimator"),
        (core_algos.POLICY_LOSS_REGISTRY, compute_policy_loss_disco, "policy loss"),
    ):
        existing = registry.get(NAME)
        if existing is not None and existing is not fn and not _ours(existing):
            raise RuntimeError(
                f"verl already has a {what} named {NAME!r} ({existing!r}) that is not "
                "discoloss's; uninstall the other plugin"
            )
    # Another copy of this module (e.g. imported under a second name) may have registered
    # before: replace it, verl's own register_adv_est refuses to.
    core_algos.ADV_ESTIMATOR_REGISTRY.pop(NAME, None)
    core_algos.register_adv_est(NAME)(compute_disco_advantage)
    core_algos.register_policy_loss(NAME)(compute_policy_loss_disco)
    install_validate_config_hook()
    install_v1_trainer_hook()
    install_engine_workers_hook()
