"""String options shared by the public functions."""

from __future__ import annotations

from typing import Literal, get_args

Score = Literal["log_likelihood", "likelihood_ratio", "clipped_ratio"]
Objective = Literal[
    "disco", "disco_b", "drpo", "cvar", "disco_2way", "auc_sq_hinge", "auc_logistic"
]
KLEstimator = Literal["k1", "k3"]
Normalize = Literal["all", "valid"]
Constraint = Literal["squared_hinge", "hinge", "kl_penalty", "lagrangian", "none"]

SCORES: tuple[str, ...] = get_args(Score)
OBJECTIVES: tuple[str, ...] = get_args(Objective)
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
NORMALIZES: tuple[str, ...] = get_args(Normalize)
CONSTRAINTS: tuple[str, ...] = get_args(Constraint)

#: Default temperature of the DRO term per score (DESIGN.md section 1, published settings).
DEFAULT_TAU: dict[str, float] = {
    "log_likelihood": 10.0,
    "likelihood_ratio": 1.0,
    "clipped_ratio": 1.0,
}
