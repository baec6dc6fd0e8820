"""DisCO for verl: ``algorithm.adv_estimator=disco`` and ``policy_loss.loss_mode=disco``.

Installing ``discoloss[verl]`` registers this module in verl's ``verl.plugins`` entry-point
group, which verl loads on every ``import verl``, in the driver and in every Ray worker. Where
entry points are disabled (``VERL_USE_EXTERNAL_PLUGINS=none``) set
``VERL_USE_EXTERNAL_MODULES=discoloss.adapters.verl`` instead. Importing it twice is harmless.

verl logs plugin failures only at DEBUG level, so a failure here is also logged at ERROR level
with its traceback before it propagates.
"""

from __future__ import annotations

import logging

_logger = logging.getLogger(__name__)

try:
    from ._options import (
        NAME,
        POLICY_LOSS_PATH,
        DiscoConfigError,
        DiscoLayoutError,
        VerlDiscoOptions,
        options_from_mapping,
    )
    from ._register import register
    from .encoding import broadcast_codes, decode_codes, encode_codes
    from .estimator import compute_disco_advantage
    from .layout import check_config, group_balanced_order, mini_batch_balanced_order
    from .loss import compute_policy_loss_disco

    register()
except Exception:
    _logger.error(
        "discoloss: the verl adapter failed to load, so verl does not know "
        "adv_estimator=disco / loss_mode=disco in this process",
        exc_info=True,
    )
    raise

__all__ = [
    "NAME",
    "POLICY_LOSS_PATH",
    "VerlDiscoOptions",
    "DiscoConfigError",
    "DiscoLayoutError",
    "broadcast_codes",
    "check_config",
    "compute_disco_advantage",
    "compute_policy_loss_disco",
    "decode_codes",
    "encode_codes",
    "group_balanced_order",
    "mini_batch_balanced_order",
    "options_from_mapping",
    "register",
]
