"""DisCO for TRL: ``DisCOConfig`` (a ``GRPOConfig``) and ``DisCOTrainer`` (a ``GRPOTrainer``).

    from discoloss.adapters.trl import DisCOConfig, DisCOTrainer

Switching a TRL GRPO script to DisCO is two renamed classes. Tested with the TRL range pinned
by the ``trl`` extra (``pip install -e ".[trl]"`` in a checkout). See ``trainer.py`` for how
the loss is split across processes, gradient accumulation and several optimizer steps per
generation, and ``DisCOConfig.weights`` for where each optimizer step's weights come from.
"""

from __future__ import annotations

try:
    import trl  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "discoloss.adapters.trl needs TRL: pip install -e '.[trl]' in a checkout of discoloss"
    ) from exc

from .config import DEFAULT_WEIGHTS, GRPO_ONLY_OPTIONS, DisCOConfig
from .trainer import DisCOTrainer

__all__ = ["DEFAULT_WEIGHTS", "GRPO_ONLY_OPTIONS", "DisCOConfig", "DisCOTrainer"]
