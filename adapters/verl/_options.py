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
from typing import Any, Literal, get_args

from discoloss.options import DiscoOptions

#: Where the options live in verl's configuration tree.
POLICY_LOSS_PATH = "actor_rollout_ref.actor.policy_loss"
#: The registered names (advantage estimator and policy loss).
NAME = "disco"

#: The DisCO options, exactly those of :func:`discoloss.disco_loss` (from the core).
CORE_OPTION_NAMES: tuple[str, ...] = DiscoOptions.names()
#: Settings that only the verl adapter has.
ADAPTER_OPTION_NAMES: tuple[str, ...] = ("weights", "validate", "lagrangian_lr")
OPTION_NAMES: tuple[str, ...] = CORE_OPTION_NAMES + ADAPTER_OPTION_NAMES

#: Where the per-response weights of a mini-batch come from (``policy_loss.weights``):
#: ``current`` (stats at the current parameters: exact at any layout), ``sampling`` (stats at
#: the sampling policy, no extra forward pass) or ``micro_batch`` (whole questions per
#: micro-batch, each micro-batch its own DisCO loss).
Weights = Literal["current", "sampling", "micro_batch"]
WEIGHTS: tuple[str, ...] = get_args(Weights)
#: The default of ``policy_loss.weights``.
DEFAULT_WEIGHTS: Weights = "current"


class DiscoConfigError(ValueError):
    """A verl setting that DisCO cannot run with; the message names the setting to change."""


class DiscoLayoutError(DiscoConfigError):
    """A batch or micro-batch that does not hold whole questions (or no DisCO codes)."""


@dataclass(frozen=True)
class VerlDiscoOptions:
    """The validated options of a DisCO run under verl.

    weights: where the per-response weights of each mini-batch come from (adapter-only
      setting). ``current``: one plan per mini-batch from per-response stats at the current
      parameters (a no-grad forward pass over the mini-batch, skipped on the first mini-batch of
      a step where the old log-probs give them), gathered over the data-parallel ranks; exact at
      any layout, squared hinge included. ``sampling``: the same plan from the stats at the
      sampling policy (the old log-probs, no extra pass); exact for ``disco_b`` and on the first
      mini-batch of a step, an approximation afterwards; penalties that are not linear in the
      KL are applied per micro-batch. ``micro_batch``: every micro-batch holds whole questions
      and computes its own DisCO loss (the layout rules of ``discoloss.adapters.verl.layout``).
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
    weights: Weights = DEFAULT_WEIGHTS
    validate: bool = True
    lagrangian_lr: float = 1e3

    @property
    def planned(self) -> bool:
        """True when one plan per mini-batch gives the weights (``weights`` is not
        ``micro_batch``): any micro-batch layout is exact."""
        return self.weights != "micro_batch"


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
    weights = get("weights", DEFAULT_WEIGHTS)
    if weights not in WEIGHTS:
        raise DiscoConfigError(
            f"{POLICY_LOSS_PATH}.weights={weights!r} is not a valid option; expected one of "
            f"{', '.join(repr(w) for w in WEIGHTS)}"
        )
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
    return VerlDiscoOptions(
        disco=disco, weights=weights, validate=validate, lagrangian_lr=float(lr)
    )


def check_for_verl(options: VerlDiscoOptions) -> VerlDiscoOptions:
    """Options that are valid for :func:`discoloss.disco_loss` but cannot run correctly under
    verl are refused here, in the driver."""
    o = options.disco
    if o.normalize != "all" and not options.planned:
        raise DiscoConfigError(
            f"{POLICY_LOSS_PATH}.normalize={o.normalize!r} is not supported with "
            "weights=micro_batch: the number of questions with signal in a mini-batch is only "
            "known after all of its micro-batches have run (verl back-propagates each "
            "micro-batch at once), so the per-micro-batch losses could not add up to the "
            "mini-batch objective. Use weights=current or weights=sampling (the mini-batch's "
            "plan knows the count), or normalize=all (the published normalisation)."
        )
    return options
