"""``DiscoPolicyLossConfig``: verl's ``PolicyLossConfig`` plus the DisCO options.

Selected with ``actor_rollout_ref.actor.policy_loss._target_`` (the shipped
``disco_trainer.yaml`` does it), so that ``actor_rollout_ref.actor.policy_loss.tau=5`` and the
other options pass verl's config validation. Values are checked when verl builds the dataclass,
which happens in the driver (``verl.utils.config.validate_config``) before any worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from verl.workers.config import PolicyLossConfig

from ._options import DEFAULT_WEIGHTS, NAME, check_for_verl, options_from_mapping

__all__ = ["DiscoPolicyLossConfig", "TARGET"]

#: The ``_target_`` string selecting this class in verl's config.
TARGET = "discoloss.adapters.verl.config.DiscoPolicyLossConfig"


@dataclass
class DiscoPolicyLossConfig(PolicyLossConfig):
    """verl's policy-loss config with the options of :func:`discoloss.disco_loss`.

    Same names and defaults as ``disco_loss`` (validated by the core's
    :class:`discoloss.options.DiscoOptions`): score, objective, tau, delta, beta, kl_estimator,
    threshold, normalize, constraint, cvar_alpha, margin, clip_eps; plus the adapter's
    ``weights``, ``validate`` and ``lagrangian_lr``. A test checks that these fields are
    exactly the core's option names plus the adapter's.
    """

    loss_mode: str = NAME
    score: str = "log_likelihood"
    objective: str = "disco"
    tau: float | None = None
    delta: float = 1e-4
    beta: float = 1e3
    kl_estimator: str = "k1"
    threshold: float = 0.5
    normalize: str = "all"
    constraint: str = "squared_hinge"
    cvar_alpha: float = 0.5
    margin: float = 1.0
    clip_eps: float = 0.2
    weights: str = DEFAULT_WEIGHTS
    validate: bool = True
    lagrangian_lr: float = 1e3

    def __post_init__(self) -> None:
        if self.loss_mode == NAME:
            check_for_verl(options_from_mapping(self))
