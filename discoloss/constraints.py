r"""Ways to keep the policy near the sampling policy: DisCO's constraint and its neighbours.

DisCO maximises J subject to KL <= delta (arXiv 2505.12366, eq. 9). ``disco_loss`` turns the
constraint into a penalty P(KL) added to -J, selected by ``constraint=``:

==================  =====================================  ======================================
constraint          P(KL)                                  dP/dKL
==================  =====================================  ======================================
``squared_hinge``   beta/2 * max(KL - delta, 0)^2          beta * max(KL - delta, 0)  (default)
``hinge``           beta * max(KL - delta, 0)              beta * [KL > delta]  (exact penalty)
``kl_penalty``      beta * KL                              beta  (fixed-coefficient KL penalty)
``lagrangian``      lambda * (KL - delta)                  lambda, a :class:`LagrangeMultiplier`
``none``            0                                      0
==================  =====================================  ======================================

The squared hinge is smooth and, for beta large, enforces the constraint up to
O(1/beta); the plain hinge is an exact penalty (for beta above the optimal multiplier the
constrained optimum is a minimiser) but non-smooth at the boundary; a fixed KL penalty (as in
PPO-penalty / GRPO's reference KL) keeps pulling even inside the trust region; the Lagrangian
adapts its multiplier by dual ascent.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from discoloss._checks import check_number
from discoloss.kl import squared_hinge_penalty

__all__ = ["LagrangeMultiplier", "constraint_penalty", "constraint_slope"]


class LagrangeMultiplier:
    r"""Multiplier of the KL constraint, updated by projected dual ascent.

    .. math:: \lambda \leftarrow \max(0,\ \lambda + \eta\,(\widehat{KL} - \delta))

    Used with ``disco_loss(..., constraint="lagrangian", multiplier=m)``: the loss adds
    ``lambda * (KL - delta)`` with lambda treated as a constant. Call :meth:`update` once per
    optimisation step with that step's (global) KL, e.g. ``m.update(out.kl, delta=1e-4)``.
    The update is a tensor op (no host sync). Save it with :meth:`state_dict` next to the
    optimizer's state so that it survives checkpoints.

    Args:
      lr: dual step size eta, > 0. The KL's violations are of the order of delta, so eta
        should be of the order of the penalty strength beta (default 1e3).
      init: initial multiplier, >= 0.
      max_value: optional upper bound of the multiplier.
    """

    def __init__(self, *, lr: float = 1e3, init: float = 0.0, max_value: float | None = None):
        self.lr = check_number("lr", lr, positive=True)
        init = check_number("init", init, non_negative=True)
        self.max_value = (
            None if max_value is None else check_number("max_value", max_value, non_negative=True)
        )
        self.value = torch.tensor(init, dtype=torch.float64)
        self.steps = 0

    def update(self, kl: Tensor | float, *, delta: float) -> Tensor:
        """One dual-ascent step; returns the new multiplier (0-d tensor)."""
        delta = check_number("delta", delta, non_negative=True)
        kl_t = kl.detach() if isinstance(kl, Tensor) else torch.tensor(float(kl))
        value = self.value.to(kl_t.device) + self.lr * (kl_t.to(torch.float64) - delta)
        value = value.clamp_min(0.0)
        if self.max_value is not None:
            value = value.clamp_max(self.max_value)
        self.value = value
        self.steps += 1
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {
            "value": self.value.detach().cpu().clone(),
            "lr": self.lr,
            "max_value": self.max_value,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"value", "lr", "max_value", "steps"} - set(state)
        if missing:
            raise KeyError(f"state is missing {sorted(missing)} for LagrangeMultiplier")
        self.value = torch.as_tensor(state["value"], dtype=torch.float64).clone()
        self.lr = float(state["lr"])
        self.max_value = None if state["max_value"] is None else float(state["max_value"])
        self.steps = int(state["steps"])

    def __repr__(self) -> str:
        return (
            f"LagrangeMultiplier(value={float(self.value):.6g}, lr={self.lr:g}, steps={self.steps})"
        )


def multiplier_value(multiplier: LagrangeMultiplier | None, like: Tensor) -> Tensor:
    if multiplier is None:
        raise ValueError('constraint="lagrangian" needs multiplier=LagrangeMultiplier(...)')
    return multiplier.value.to(device=like.device, dtype=like.dtype)


def constraint_penalty(
    kl: Tensor,
    *,
    constraint: str,
    delta: float,
    beta: float,
    multiplier: LagrangeMultiplier | None = None,
) -> Tensor:
    """Penalty P(KL) of the selected constraint (see the module table); options validated."""
    if constraint == "squared_hinge":
        return squared_hinge_penalty(kl, delta=delta, beta=beta)
    if constraint == "hinge":
        return beta * torch.clamp(kl - delta, min=0.0)
    if constraint == "kl_penalty":
        return beta * kl
    if constraint == "lagrangian":
        return multiplier_value(multiplier, kl) * (kl - delta)
    return torch.zeros_like(kl)


def constraint_slope(
    kl: Tensor,
    *,
    constraint: str,
    delta: float,
    beta: float,
    multiplier: LagrangeMultiplier | None = None,
) -> Tensor:
    """dP/dKL at ``kl`` (detached): the coefficient of the KL gradient."""
    kl = kl.detach()
    if constraint == "squared_hinge":
        return beta * torch.clamp(kl - delta, min=0.0)
    if constraint == "hinge":
        return beta * (kl > delta).to(kl.dtype)
    if constraint == "kl_penalty":
        return torch.full_like(kl, beta)
    if constraint == "lagrangian":
        return multiplier_value(multiplier, kl)
    return torch.zeros_like(kl)
