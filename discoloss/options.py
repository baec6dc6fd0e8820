"""Validated options of the DisCO loss, shared by the core functions and the engine adapters.

Engines validate a user's settings once, before any worker starts, with
``DiscoOptions(**settings)``; the loss functions build the same object from their keyword
arguments, so both reject the same values with the same messages.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from numbers import Integral
from typing import Any

import torch

from discoloss._checks import check_in_dtype_range, check_number, check_option, scale_range
from discoloss._types import (
    CONSTRAINTS,
    DEFAULT_TAU,
    KL_ESTIMATORS,
    NORMALIZES,
    OBJECTIVES,
    SCORES,
)

__all__ = ["DiscoOptions"]


@dataclass(frozen=True)
class DiscoOptions:
    """Options of :func:`discoloss.disco_loss` (same names and defaults).

    ``tau=None`` resolves to 10 for ``score="log_likelihood"`` and 1 otherwise; read the
    resolved value from :attr:`tau_value`. ``lam`` and ``max_length`` belong to
    ``objective="drpo"`` (validated whatever the objective, used by DRPO only; the default
    length preference needs ``max_length``, see :func:`discoloss.disco_loss`). Construction
    raises ValueError / TypeError naming the option for a bad value.
    """

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
    lam: float = 0.1
    max_length: int | None = None

    def __post_init__(self) -> None:
        check_option("score", self.score, SCORES)
        check_option("objective", self.objective, OBJECTIVES)
        check_option("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        check_option("normalize", self.normalize, NORMALIZES)
        check_option("constraint", self.constraint, CONSTRAINTS)
        if self.tau is not None:
            object.__setattr__(self, "tau", check_number("tau", self.tau, positive=True))
        for name in ("delta", "beta", "margin"):
            object.__setattr__(
                self, name, check_number(name, getattr(self, name), non_negative=True)
            )
        object.__setattr__(self, "threshold", check_number("threshold", self.threshold))
        alpha = check_number("cvar_alpha", self.cvar_alpha, positive=True)
        if alpha > 1.0:
            raise ValueError(f"cvar_alpha must be in (0, 1], got {self.cvar_alpha!r}")
        object.__setattr__(self, "cvar_alpha", alpha)
        eps = check_number("clip_eps", self.clip_eps, positive=True)
        if eps >= 1.0:
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps!r}")
        object.__setattr__(self, "clip_eps", eps)
        object.__setattr__(self, "lam", check_number("lam", self.lam, positive=True))
        if self.max_length is not None:
            n = self.max_length
            if isinstance(n, bool) or not isinstance(n, Integral):
                raise TypeError(
                    f"max_length must be an int (the maximum response length in tokens) or "
                    f"None, got {type(n).__name__}"
                )
            if n < 1:
                raise ValueError(f"max_length must be >= 1, got {n!r}")
            object.__setattr__(self, "max_length", int(n))

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Raise ValueError naming the option, the dtype and the usable range if a value,
        valid in itself, breaks the computation in ``dtype`` for every input. ``dtype`` is the
        dtype the loss computes in: float64 for float64 inputs, float32 for everything else.

        Only options that the selected variant uses are checked (``eps``, ``tiny``, ``max`` of
        ``torch.finfo(dtype)``): ``tau`` of the temperature objectives in
        ``[tiny / eps, max * eps]`` (``s / tau`` and ``tau * log(...)``), ``beta`` of the
        constraints that scale by it and ``delta`` of the Lagrangian up to ``max`` (beyond, they
        are infinite), ``cvar_alpha`` of ``"cvar"`` from ``tiny`` (``alpha * |N_q|`` must stay
        a normal number), ``margin`` of ``"auc_sq_hinge"`` up to ``sqrt(max)`` (it is squared).
        Overflow that depends on the data is left to the value checks.
        """
        fi = torch.finfo(dtype)
        if self.objective in ("disco", "drpo", "disco_2way", "auc_logistic"):
            low, high = scale_range(dtype)
            why = "the objective divides scores by tau"
            check_in_dtype_range("tau", self.tau_value, dtype, low, high, why)
        if self.constraint in ("squared_hinge", "hinge", "kl_penalty"):
            why = "the penalty scales by beta"
            check_in_dtype_range("beta", self.beta, dtype, 0.0, fi.max, why)
        if self.constraint == "lagrangian":
            why = "the Lagrangian penalty is lambda * (kl - delta)"
            check_in_dtype_range("delta", self.delta, dtype, 0.0, fi.max, why)
        if self.objective == "cvar":
            why = "the hardest negatives are weighted by 1 / (cvar_alpha * |N_q|)"
            check_in_dtype_range("cvar_alpha", self.cvar_alpha, dtype, fi.tiny, 1.0, why)
        if self.objective == "auc_sq_hinge":
            why = "the objective squares the margin"
            check_in_dtype_range("margin", self.margin, dtype, 0.0, math.sqrt(fi.max), why)

    @property
    def tau_value(self) -> float:
        return DEFAULT_TAU[self.score] if self.tau is None else float(self.tau)

    @property
    def needs_ratio(self) -> bool:
        """Whether the token pass must compute exp(log_probs - old_log_probs)."""
        return self.score == "likelihood_ratio" or self.kl_estimator == "k3"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
