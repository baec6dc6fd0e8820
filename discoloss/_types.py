"""String options shared by the public functions."""

from __future__ import annotations

from typing import Literal, get_args

Score = Literal["log_likelihood", "likelihood_ratio"]
Objective = Literal["disco", "disco_b"]
KLEstimator = Literal["k1", "k3"]
Normalize = Literal["all", "valid"]

SCORES: tuple[str, ...] = get_args(Score)
OBJECTIVES: tuple[str, ...] = get_args(Objective)
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)
NORMALIZES: tuple[str, ...] = get_args(Normalize)

#: Default temperature of the DRO term per score (DESIGN.md section 1, published settings).
DEFAULT_TAU: dict[str, float] = {"log_likelihood": 10.0, "likelihood_ratio": 1.0}
