"""Input validation shared by every public function.

Two kinds of checks:

* metadata checks (shape, dtype, device, option strings, Python scalars) never touch tensor
  values and run always;
* value checks (non-finite numbers, empty responses, mask values) need the values on the host.
  They are gathered into one boolean vector and read with a single device-to-host copy, and they
  run only when ``validate=True``. With ``validate=False`` the loss path performs no host sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__: list[str] = []


def check_option(name: str, value: object, valid: Sequence[str]) -> None:
    if value not in valid:
        options = ", ".join(repr(v) for v in valid)
        raise ValueError(f"{name}={value!r} is not a valid option; expected one of {options}")


def check_number(
    name: str,
    value: object,
    *,
    positive: bool = False,
    non_negative: bool = False,
    allow_inf: bool = False,
) -> float:
    """Validate a Python scalar option and return it as a float."""
    if isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Python number, got a tensor")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if non_negative and not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def check_tensor(name: str, x: object, *, ndim: int, kind: str) -> Tensor:
    """Check that ``x`` is a tensor of rank ``ndim`` and of dtype ``kind``.

    kind: "float" (floating point), "int" (integer, not bool), "mask" (bool, integer or
    floating), "real" (integer or floating, not bool).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    dt = x.dtype
    if kind == "float" and not dt.is_floating_point:
        raise TypeError(f"{name} must be a floating point tensor, got dtype {dt}")
    if kind == "int" and (dt.is_floating_point or dt.is_complex or dt == torch.bool):
        raise TypeError(f"{name} must be an integer tensor (e.g. torch.long), got dtype {dt}")
    if kind == "real" and (dt.is_complex or dt == torch.bool):
        raise TypeError(f"{name} must be a real-valued (int or float) tensor, got dtype {dt}")
    if kind == "mask" and dt.is_complex:
        raise TypeError(f"{name} must be a bool or 0/1 tensor, got dtype {dt}")
    return x


def check_same_shape(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    ref = tuple(tensors[0].shape)
    for n, t in zip(names[1:], tensors[1:]):
        if tuple(t.shape) != ref:
            raise ValueError(
                f"{n} has shape {tuple(t.shape)} but {names[0]} has shape {ref}; they must match"
            )


def check_batch(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    """Leading dimensions must match and be non-empty."""
    b = tensors[0].shape[0]
    if b == 0:
        raise ValueError(f"{names[0]} is an empty batch (0 responses); at least one is required")
    for n, t in zip(names[1:], tensors[1:]):
        if t.shape[0] != b:
            raise ValueError(
                f"{n} has {t.shape[0]} entries but {names[0]} has {b} responses; they must match"
            )


def check_device(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    dev = tensors[0].device
    for n, t in zip(names[1:], tensors[1:]):
        if t.device != dev:
            raise ValueError(f"{n} is on {t.device} but {names[0]} is on {dev}; use one device")


Check = tuple[Tensor, Callable[[], str]]


def raise_if_failed(checks: Sequence[Check], exc: type[Exception] = ValueError) -> None:
    """Evaluate 0-d boolean ``checks`` (True = ok) with a single host sync.

    The message callables run only for a failed check, so they may sync freely.
    """
    if not checks:
        return
    ok = torch.stack([c.reshape(()) for c, _ in checks]).cpu()
    if bool(ok.all()):
        return
    for flag, (_, message) in zip(ok.tolist(), checks):
        if not flag:
            raise exc(message())


def first_index(bad: Tensor) -> int:
    """Index of the first True entry (error path only)."""
    return int(bad.reshape(-1).nonzero()[0, 0].item())


def describe(x: Any) -> str:
    return repr(x.item()) if isinstance(x, Tensor) and x.numel() == 1 else repr(x)
