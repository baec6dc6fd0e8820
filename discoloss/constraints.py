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

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from discoloss._checks import check_number, describe
from discoloss.kl import squared_hinge_penalty
from discoloss.options import DiscoOptions

__all__ = ["LagrangeMultiplier", "constraint_penalty", "constraint_slope"]


class LagrangeMultiplier:
    r"""Multiplier of the KL constraint, updated by projected dual ascent.

    .. math:: \lambda \leftarrow \max(0,\ \lambda + \eta\,(\widehat{KL} - \delta))

    Used with ``disco_loss(..., constraint="lagrangian", multiplier=m)``: the loss adds
    ``lambda * (KL - delta)`` with lambda treated as a constant. Call :meth:`update` once per
    optimisation step with that step's (global) KL, e.g. ``m.update(out.kl, delta=1e-4)``.
    The update is a tensor op; checking a tensor KL's value costs one host sync
    (``validate=False``: none). Save it with :meth:`state_dict` next to the optimizer's state
    so that it survives checkpoints.

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

    def update(self, kl: Tensor | float, *, delta: float, validate: bool = True) -> Tensor:
        """One dual-ascent step; returns the new multiplier (0-d tensor).

        Args:
          kl: the step's KL: a Python number or a one-element tensor.
          delta: the constraint radius, >= 0.
          validate: raise ValueError for a non-finite KL or a multiplier that overflows
            (a tensor KL is read with one host sync). With ``validate=False`` there is no
            sync, and such an update leaves the multiplier unchanged instead: a NaN never
            enters its state.
        """
        delta = check_number("delta", delta, non_negative=True)
        if isinstance(kl, Tensor):
            if kl.device.type == "meta":
                raise ValueError("kl is on the meta device: the update needs the KL's value")
            if kl.numel() != 1 or kl.dim() > 1:
                raise ValueError(f"kl must be a scalar (a 0-d tensor), got shape {tuple(kl.shape)}")
            if kl.dtype == torch.bool or kl.dtype.is_complex:
                raise TypeError(f"kl must be a real tensor, got dtype {kl.dtype}")
            kl_t = kl.detach().reshape(()).to(torch.float64)
        else:
            kl_t = torch.tensor(check_number("kl", kl), dtype=torch.float64)
        old = self.value.to(kl_t.device)
        value = (old + self.lr * (kl_t - delta)).clamp_min(0.0)
        if self.max_value is not None:
            value = value.clamp_max(self.max_value)
        if validate:
            flags = torch.stack([kl_t.isfinite(), value.isfinite()]).cpu()  # the one host sync
            if not bool(flags[0]):
                raise ValueError(f"kl must be finite, got {describe(kl_t)}")
            if not bool(flags[1]):
                raise ValueError(
                    f"the multiplier overflows: {float(old)!r} + lr={self.lr!r} * "
                    f"(kl={describe(kl_t)} - delta={delta!r}); use a smaller lr or max_value"
                )
        else:
            value = torch.where(value.isfinite() & kl_t.isfinite(), value, old)
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
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping (a state_dict), got {type(state).__name__}")
        missing = {"value", "lr", "max_value", "steps"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)} for LagrangeMultiplier")
        value = state["value"]
        if isinstance(value, Tensor):
            if value.numel() != 1 or value.dtype == torch.bool or value.dtype.is_complex:
                raise ValueError(
                    f"state['value'] must be a real scalar, got a {value.dtype} tensor of shape "
                    f"{tuple(value.shape)}"
                )
            value = float(value.detach().cpu().reshape(()))
        value = check_number("state['value']", value, non_negative=True)
        lr = check_number("state['lr']", state["lr"], positive=True)
        max_value = state["max_value"]
        if max_value is not None:
            max_value = check_number("state['max_value']", max_value, non_negative=True)
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state['steps'] must be an int >= 0, got {steps!r}")
        self.value = torch.tensor(value, dtype=torch.float64)
        self.lr, self.max_value, self.steps = lr, max_value, steps

    def __repr__(self) -> str:
        return (
            f"LagrangeMultiplier(value={float(self.value):.6g}, lr={self.lr:g}, steps={self.steps})"
        )


def multiplier_value(multiplier: LagrangeMultiplier | None, like: Tensor) -> Tensor:
    if multiplier is None:
        raise ValueError('constraint="lagrangian" needs multiplier=LagrangeMultiplier(...)')
    if not isinstance(multiplier, LagrangeMultiplier):
        raise TypeError(f"multiplier must be a LagrangeMultiplier, got {type(multiplier).__name__}")
    # in the dtype of the penalty (an integer kl would truncate the multiplier)
    return multiplier.value.to(device=like.device, dtype=torch.result_type(like, 1.0))


def _check_penalty_options(
    kl: Tensor, constraint: str, delta: float, beta: float
) -> tuple[float, float]:
    """The options of a public penalty call, checked as the loss checks them (in the dtype the
    penalty is computed in, kl's)."""
    if not isinstance(kl, Tensor):
        raise TypeError(f"kl must be a torch.Tensor, got {type(kl).__name__}")
    if kl.dtype.is_complex:
        raise TypeError(f"kl must be a real tensor, got dtype {kl.dtype}")
    # disco_b: no temperature to check here
    options = DiscoOptions(objective="disco_b", constraint=constraint, delta=delta, beta=beta)
    options.check_dtype(kl.dtype if kl.dtype.is_floating_point else torch.get_default_dtype())
    return options.delta, options.beta


def constraint_penalty(
    kl: Tensor,
    *,
    constraint: str,
    delta: float,
    beta: float,
    multiplier: LagrangeMultiplier | None = None,
) -> Tensor:
    """Penalty P(KL) of the selected constraint (see the module table)."""
    delta, beta = _check_penalty_options(kl, constraint, delta, beta)
    if constraint == "squared_hinge":
        return squared_hinge_penalty(kl, delta=delta, beta=beta)
    if constraint == "hinge":
        return beta * torch.clamp(kl - delta, min=0.0)
    if constraint == "kl_penalty":
        return beta * kl
    if constraint == "lagrangian":
        return multiplier_value(multiplier, kl) * (kl - delta)
    return torch.zeros_like(kl, dtype=torch.result_type(kl, 1.0))


def constraint_slope(
    kl: Tensor,
    *,
    constraint: str,
    delta: float,
    beta: float,
    multiplier: LagrangeMultiplier | None = None,
) -> Tensor:
    """dP/dKL at ``kl`` (detached): the coefficient of the KL gradient."""
    delta, beta = _check_penalty_options(kl, constraint, delta, beta)
    kl = kl.detach()
    f = torch.result_type(kl, 1.0)  # a float slope, also for an integer kl
    if constraint == "squared_hinge":
        return beta * torch.clamp(kl - delta, min=0.0)
    if constraint == "hinge":
        return beta * (kl > delta).to(f)
    if constraint == "kl_penalty":
        return torch.full(kl.shape, beta, dtype=f, device=kl.device)
    if constraint == "lagrangian":
        return multiplier_value(multiplier, kl).expand_as(kl).clone()
    return torch.zeros_like(kl, dtype=f)
