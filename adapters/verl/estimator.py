"""The ``disco`` advantage estimator: labels and questions as float32 codes (see
:mod:`discoloss.adapters.verl.encoding`).

verl calls it in the driver-side trainer with ``token_level_rewards, response_mask, config,
index`` (``index`` = the uid string of each response's prompt). It needs two settings that live
outside ``algorithm``: the reward ``threshold`` (``actor_rollout_ref.actor.policy_loss``) and
``rollout.n``; it reads them from the root of the config tree that ``config`` (the ``algorithm``
node) belongs to, and falls back to the defaults (threshold 0.5, most common group size) when
``config`` is detached.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._options import POLICY_LOSS_PATH, VerlDiscoOptions, options_from_mapping
from .encoding import broadcast_codes, encode_codes

__all__ = ["compute_disco_advantage", "settings_from_algorithm_config"]

logger = logging.getLogger(__name__)


def settings_from_algorithm_config(config: Any) -> tuple[VerlDiscoOptions, int | None]:
    """(options, rollout.n) reachable from verl's ``algorithm`` config node, else defaults."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - verl always ships omegaconf
        return VerlDiscoOptions(), None
    if isinstance(config, DictConfig):
        root = config._get_root()
        node = OmegaConf.select(root, POLICY_LOSS_PATH, default=None)
        n = OmegaConf.select(root, "actor_rollout_ref.rollout.n", default=None)
        if node is not None:
            return options_from_mapping(node), (int(n) if n is not None else None)
    logger.warning(
        "disco advantage estimator: %s is not reachable from the algorithm config; using the "
        "default threshold 0.5",
        POLICY_LOSS_PATH,
    )
    return VerlDiscoOptions(), None


def compute_disco_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: np.ndarray | list[Any] | None = None,
    config: Any = None,
    **_: Any,
) -> tuple[Tensor, Tensor]:
    """verl advantage estimator ``disco``.

    Args:
      token_level_rewards: (B, T); the sequence reward is its sum over T (as verl's GRPO).
      response_mask: (B, T).
      index: B uids (prompt ids); required.
      config: verl's ``algorithm`` config node.

    Returns:
      ``(advantages, returns)``: (B, T) float32 codes at the response positions, and zeros
      (DisCO trains no critic).
    """
    if index is None:
        raise ValueError(
            "index: the disco advantage estimator needs the uid of every response's prompt "
            "(verl passes non_tensor_batch['uid'] as index)"
        )
    options, n = settings_from_algorithm_config(config)
    rewards = token_level_rewards.sum(dim=-1)
    has_tokens = response_mask.sum(dim=-1) > 0
    codes = encode_codes(
        rewards, has_tokens, list(index), threshold=options.disco.threshold, group_size=n
    )
    advantages = broadcast_codes(codes, response_mask)
    return advantages, torch.zeros_like(advantages)
