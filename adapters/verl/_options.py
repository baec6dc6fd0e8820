"""DisCO options as verl sees them: names, defaults and validation (no verl import).

The names and defaults are those of :func:`discoloss.disco_loss`. Under verl they live in
``actor_rollout_ref.actor.policy_loss``; every error names the full setting path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

Score = Literal["log_likelihood", "likelihood_ratio"]
Objective = Literal["disco", "disco_b"]
KLEstimator = Literal["k1", "k3"]
Normalize = Literal["all", "valid"]

#: Where the options live in verl's configuration tree.
POLICY_LOSS_PATH = "actor_rollout_ref.actor.policy_loss"
#: The registered names (advantage estimator and policy loss).
NAME = "disco"

_CHOICES: dict[str, tuple[str, ...]] = {
    "score": ("log_likelihood", "likelihood_ratio"),
    "objective": ("disco", "disco_b"),
    "kl_estimator": ("k1", "k3"),
    "normalize": ("all", "valid"),
}


class DiscoConfigError(ValueError):
    """A verl setting that DisCO cannot run with; the message names the setting to change."""


class DiscoLayoutError(DiscoConfigError):
    """A batch or micro-batch that does not hold whole questions (or no DisCO codes)."""


@dataclass(frozen=True)
class DiscoOptions:
    """Validated DisCO options (same names and defaults as :func:`discoloss.disco_loss`).

    score: ``"log_likelihood"`` or ``"likelihood_ratio"``.
    objective: ``"disco"`` (log-mean-exp over negatives) or ``"disco_b"`` (mean).
    tau: DRO temperature > 0; None gives 10 (log_likelihood) or 1 (likelihood_ratio).
    delta: KL radius >= 0.  beta: penalty strength >= 0.
    kl_estimator: ``"k1"`` or ``"k3"``.  threshold: a response is positive iff reward > threshold.
    normalize: ``"all"``; ``"valid"`` is refused under verl (see :func:`check_for_verl`).
    validate: value checks with one host sync per micro-batch; False gives a sync-free loss.
    """

    score: Score = "log_likelihood"
    objective: Objective = "disco"
    tau: float | None = None
    delta: float = 1e-4
    beta: float = 1e3
    kl_estimator: KLEstimator = "k1"
    threshold: float = 0.5
    normalize: Normalize = "all"
    validate: bool = True

    @property
    def resolved_tau(self) -> float:
        if self.tau is not None:
            return float(self.tau)
        return 10.0 if self.score == "log_likelihood" else 1.0


OPTION_NAMES: tuple[str, ...] = tuple(f.name for f in fields(DiscoOptions))


def _number(name: str, value: Any, *, positive: bool = False, non_negative: bool = False) -> float:
    where = f"{POLICY_LOSS_PATH}.{name}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DiscoConfigError(f"{where}: expected a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise DiscoConfigError(f"{where}: must be finite, got {value!r}")
    if positive and v <= 0:
        raise DiscoConfigError(f"{where}: must be > 0, got {value!r}")
    if non_negative and v < 0:
        raise DiscoConfigError(f"{where}: must be >= 0, got {value!r}")
    return v


def options_from_mapping(node: Mapping[str, Any] | Any) -> DiscoOptions:
    """Read and validate the DisCO options from a ``policy_loss`` node (DictConfig, dataclass or
    dict). Missing keys take :func:`discoloss.disco_loss`'s defaults; other keys are ignored."""
    get = node.get if hasattr(node, "get") else (lambda k, d=None: getattr(node, k, d))
    d = DiscoOptions()
    raw = {name: get(name, getattr(d, name)) for name in OPTION_NAMES}
    for name, choices in _CHOICES.items():
        if raw[name] not in choices:
            raise DiscoConfigError(
                f"{POLICY_LOSS_PATH}.{name}: expected one of {list(choices)}, got {raw[name]!r}"
            )
    tau = raw["tau"]
    if tau is not None:
        tau = _number("tau", tau, positive=True)
    if not isinstance(raw["validate"], bool):
        raise DiscoConfigError(
            f"{POLICY_LOSS_PATH}.validate: expected true or false, got {raw['validate']!r}"
        )
    return DiscoOptions(
        score=raw["score"],
        objective=raw["objective"],
        tau=tau,
        delta=_number("delta", raw["delta"], non_negative=True),
        beta=_number("beta", raw["beta"], non_negative=True),
        kl_estimator=raw["kl_estimator"],
        threshold=_number("threshold", raw["threshold"]),
        normalize=raw["normalize"],
        validate=raw["validate"],
    )


def check_for_verl(options: DiscoOptions) -> DiscoOptions:
    """Options that are valid for :func:`discoloss.disco_loss` but cannot be exact under verl."""
    if options.normalize != "all":
        raise DiscoConfigError(
            f"{POLICY_LOSS_PATH}.normalize={options.normalize!r} is not supported with verl: the "
            "number of questions with signal in a mini-batch is only known after all of its "
            "micro-batches have run (verl back-propagates each micro-batch at once), so the "
            "per-micro-batch losses could not add up to the mini-batch objective. Use "
            "normalize=all (the published normalisation)."
        )
    return options
