"""DisCO options as verl sees them: the core's :class:`discoloss.options.DiscoOptions` plus the
adapter's own setting, read from a verl config node (no verl import).

Validation of the DisCO options is the core's (same names, defaults, ranges and messages as
:func:`discoloss.disco_loss`); the adapter only prefixes every message with the full verl setting
path, ``actor_rollout_ref.actor.policy_loss.<name>``, and refuses the values that cannot be
exact under verl (:func:`check_for_verl`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from discoloss.options import DiscoOptions

#: Where the options live in verl's configuration tree.
POLICY_LOSS_PATH = "actor_rollout_ref.actor.policy_loss"
#: The registered names (advantage estimator and policy loss).
NAME = "disco"

#: The DisCO options, exactly those of :func:`discoloss.disco_loss` (from the core).
CORE_OPTION_NAMES: tuple[str, ...] = DiscoOptions.names()
#: Settings that only the verl adapter has.
ADAPTER_OPTION_NAMES: tuple[str, ...] = ("validate", "lagrangian_lr")
OPTION_NAMES: tuple[str, ...] = CORE_OPTION_NAMES + ADAPTER_OPTION_NAMES


class DiscoConfigError(ValueError):
    """A verl setting that DisCO cannot run with; the message names the setting to change."""


class DiscoLayoutError(DiscoConfigError):
    """A batch or micro-batch that does not hold whole questions (or no DisCO codes)."""


@dataclass(frozen=True)
class VerlDiscoOptions:
    """The validated options of a DisCO run under verl.

    disco: the core's :class:`discoloss.options.DiscoOptions` (score, objective, tau, delta,
      beta, kl_estimator, threshold, normalize, constraint, cvar_alpha, margin, clip_eps), passed
      to :func:`discoloss.disco_loss` unchanged.
    validate: value and layout checks. Inside verl's workers they are deferred to the end of
      each pass and stop every rank at once (``discoloss.adapters.verl.faults``: no host
      sync in the loss, one small all-reduce per pass); called directly, the loss raises at
      once (one host sync). False: no checks, a split question or a non-finite value makes
      the step's gradient non-finite so that verl skips it (adapter-only setting).
    lagrangian_lr: dual step size eta of the multiplier of ``constraint=lagrangian``
      (:class:`discoloss.constraints.LagrangeMultiplier`), > 0; unused by the other constraints
      (adapter-only setting).
    """

    disco: DiscoOptions = field(default_factory=DiscoOptions)
    validate: bool = True
    lagrangian_lr: float = 1e3


def _core_error(error: ValueError | TypeError) -> DiscoConfigError:
    """The core's message with the verl setting path of the option it names."""
    message = str(error)
    for name in sorted(CORE_OPTION_NAMES, key=len, reverse=True):
        rest = message[len(name) :]
        if message.startswith(name) and not (rest[:1].isalnum() or rest[:1] == "_"):
            return DiscoConfigError(f"{POLICY_LOSS_PATH}.{message}")
    return DiscoConfigError(f"{POLICY_LOSS_PATH}: {message}")


def options_from_mapping(node: Mapping[str, Any] | Any) -> VerlDiscoOptions:
    """Read and validate the DisCO options from a ``policy_loss`` node (DictConfig, dataclass or
    dict). Missing keys take :func:`discoloss.disco_loss`'s defaults; other keys are ignored.

    Raises :class:`DiscoConfigError` naming the full setting path of a bad value.
    """
    if node is None:
        node = {}
    get = node.get if hasattr(node, "get") else (lambda k, d=None: getattr(node, k, d))
    missing = object()
    given = {name: get(name, missing) for name in CORE_OPTION_NAMES}
    try:
        disco = DiscoOptions(**{k: v for k, v in given.items() if v is not missing})
    except (ValueError, TypeError) as error:
        raise _core_error(error) from error
    validate = get("validate", True)
    if not isinstance(validate, bool):
        raise DiscoConfigError(
            f"{POLICY_LOSS_PATH}.validate: expected true or false, got {validate!r}"
        )
    lr = get("lagrangian_lr", 1e3)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise DiscoConfigError(
            f"{POLICY_LOSS_PATH}.lagrangian_lr: expected a number > 0, got {lr!r}"
        )
    if not (math.isfinite(lr) and lr > 0):
        raise DiscoConfigError(
            f"{POLICY_LOSS_PATH}.lagrangian_lr: expected a finite number > 0, got {lr!r}"
        )
    return VerlDiscoOptions(disco=disco, validate=validate, lagrangian_lr=float(lr))


def check_for_verl(options: VerlDiscoOptions) -> VerlDiscoOptions:
    """Options that are valid for :func:`discoloss.disco_loss` but cannot run correctly under
    verl are refused here, in the driver."""
    o = options.disco
    if o.normalize != "all":
        raise DiscoConfigError(
            f"{POLICY_LOSS_PATH}.normalize={o.normalize!r} is not supported with verl: the "
            "number of questions with signal in a mini-batch is only known after all of its "
            "micro-batches have run (verl back-propagates each micro-batch at once), so the "
            "per-micro-batch losses could not add up to the mini-batch objective. Use "
            "normalize=all (the published normalisation)."
        )
    return options
