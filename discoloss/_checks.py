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
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

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
    try:
        v = float(value)
    except OverflowError:  # an int beyond float64's range
        raise ValueError(f"{name} must be finite, got an int too large for a float") from None
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if non_negative and not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return v


def computation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the losses compute in for inputs of ``dtype``: float64 stays float64, everything
    else (half precision included) is reduced in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def scale_range(dtype: torch.dtype) -> tuple[float, float]:
    """Usable values of a positive scale x (a temperature, a normaliser) in ``dtype``:
    ``[tiny / eps, max * eps]``. In that range x and 1/x are normal numbers with a factor
    1/eps to spare, so that ``y / x`` and ``x * f(y / x)`` neither overflow nor lose their
    precision to subnormals for O(1) values y."""
    fi = torch.finfo(dtype)
    return fi.tiny / fi.eps, fi.max * fi.eps


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def float64_hint(dtype: torch.dtype) -> str:
    """What to do about a value beyond ``dtype``: use float64, unless it is float64 already."""
    return "" if dtype == torch.float64 else "; use float64 inputs"


def check_in_dtype_range(
    name: str, value: float, dtype: torch.dtype, low: float, high: float, why: str
) -> None:
    """Raise ValueError naming the option, the dtype and the usable range, unless
    ``low <= value <= high``."""
    if low <= value <= high:
        return
    kind = dtype_name(dtype)
    wider = "" if dtype == torch.float64 else "; float64 inputs allow a wider range"
    raise ValueError(
        f"{name}={value!r} cannot be used in {kind}: {why}, which needs {name} in "
        f"[{low:.6g}, {high:.6g}] in {kind}{wider}"
    )


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


def check_batch(
    names: Sequence[str], tensors: Sequence[Tensor], *, allow_empty: bool = False
) -> None:
    """Leading dimensions must match and be non-empty (or may be empty, with ``allow_empty``:
    a rank's shard in cross-rank mode)."""
    b = tensors[0].shape[0]
    if b == 0 and not allow_empty:
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

#: The largest count a 0-d int64 tensor holds.
_INT64_MAX = 2**63 - 1


def check_count(name: str, value: object, device: torch.device) -> tuple[Tensor, list[Check]]:
    """A count (e.g. ``num_groups``, ``num_tokens``) given as a Python int or as a one-element
    tensor: one checking path for both.

    Metadata (type; for a tensor its shape, dtype and device) is checked at once. So is the
    value of a Python int (it is on the host already): a whole number >= 1. A tensor's value
    is on the device; its check (finite, whole, >= 1) is returned, for the caller to evaluate
    with its other value checks in one host sync, under ``validate`` only.

    Returns the count as a 0-d tensor on ``device`` (a tensor's own dtype is kept) and the
    value checks.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(
                f"{name} must be a scalar count (a 0-d tensor), got a tensor of shape "
                f"{tuple(value.shape)}"
            )
        dt = value.dtype
        if dt == torch.bool or dt.is_complex:
            raise TypeError(f"{name} must be an integer or floating point count, got dtype {dt}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but log_probs is on {device}")
        v = value.detach().reshape(())
        ok = v >= 1
        if dt.is_floating_point:
            ok = ok & v.isfinite() & (v == v.trunc())
        return v, [(ok, lambda: f"{name} must be a whole number >= 1, got {describe(v)}")]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or a 0-d tensor, got {type(value).__name__}")
    count = int(value)
    if count < 1:
        raise ValueError(f"{name} must be >= 1, got {count}")
    if count > _INT64_MAX:
        raise ValueError(f"{name}={count} is too large for an int64 count")
    # a fill kernel, not a copy from host memory: no sync on CUDA
    return torch.full((), count, dtype=torch.int64, device=device), []


def check_coefficient(
    name: str, value: object, device: torch.device
) -> tuple[Tensor | float, list[Check]]:
    """A non-negative coefficient (e.g. ``kl_coef``) given as a Python number or as a
    one-element tensor: one checking path for both, as :func:`check_count` (a number's value
    is checked at once; a tensor's metadata at once and its value, finite and >= 0, by the
    returned check, under ``validate`` only)."""
    if not isinstance(value, Tensor):
        return check_number(name, value, non_negative=True), []
    if value.numel() != 1 or value.dim() > 1:
        raise ValueError(
            f"{name} must be a scalar (a 0-d tensor), got a tensor of shape {tuple(value.shape)}"
        )
    if not value.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating point tensor, got dtype {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but log_probs is on {device}")
    v = value.detach().reshape(())
    ok = v.isfinite() & (v >= 0)
    return v, [(ok, lambda: f"{name} must be finite and >= 0, got {describe(v)}")]


def check_at_least(name: str, count: Tensor, present: Tensor, what: str) -> Check:
    """Value check: a count of a larger batch must be at least what this batch holds."""
    return (
        count >= present,
        lambda: (
            f"{name}={describe(count)} is smaller than the {describe(present)} {what} of "
            f"this batch; it must count those of the whole batch this one is a piece of"
        ),
    )


#: Value checks of the per-response inputs, in the order they are reported: key -> message,
#: formatted with the index of the first failing response. A check that every rank can name by
#: its key and index can be decided collectively (``discoloss.distributed``): any rank can
#: write the failing rank's message from two integers.
VALUE_CHECKS: dict[str, str] = {
    "mask_values": "mask must hold only 0 and 1 (or be a bool tensor); found other values "
    "(first at response {index})",
    "empty_response": "mask: response {index} has no response token; every response needs at "
    "least one",
    "log_probs": "log_probs: non-finite value at a response token of response {index}",
    "old_log_probs": "old_log_probs: non-finite value at a response token of response {index}",
    "ratio": "exp(log_probs - old_log_probs) overflows at a response token of response "
    "{index}: the likelihood ratio is too large to represent",
    "rewards": "rewards: non-finite value at response {index}; every reward must be finite to "
    "be labelled positive or negative",
    "preferences": "preferences: non-finite value at response {index}",
    "kl_sums": "kl: the KL sum of response {index} is not finite in the computation dtype: "
    "log_probs and old_log_probs are too far apart for it",
    "stats.scores": "stats.scores: non-finite value at response {index}",
    "stats.kl_sums": "stats.kl_sums: non-finite value at response {index}",
    "stats.lengths": "stats.lengths: response {index} has a token count that is not a whole "
    "number >= 1 (every response needs at least one response token)",
}
VALUE_CHECK_KEYS: tuple[str, ...] = tuple(VALUE_CHECKS)


class ValueCheck(NamedTuple):
    """A value check over the responses: ``bad`` is (B,) bool, True where it fails."""

    key: str
    bad: Tensor

    def message(self, index: int) -> str:
        return VALUE_CHECKS[self.key].format(index=index)


def raise_if_failed(
    checks: Sequence[Check | ValueCheck], exc: type[Exception] = ValueError
) -> None:
    """Evaluate the checks with a single host sync: ``(ok, message)`` pairs (0-d boolean ok,
    True = passed) and :class:`ValueCheck` s.

    The message callables run only for a failed check, so they may sync freely.
    """
    if not checks:
        return
    flags = [~c.bad.any() if isinstance(c, ValueCheck) else c[0].reshape(()) for c in checks]
    if any(f.device.type == "meta" for f in flags):
        raise ValueError(
            "validate=True checks tensor values, and tensors on the meta device have none: "
            "pass validate=False for a shape-only computation"
        )
    ok = torch.stack([f.to(flags[0].device) for f in flags]).cpu()
    if bool(ok.all()):
        return
    for flag, check in zip(ok.tolist(), checks):
        if not flag:
            if isinstance(check, ValueCheck):
                raise exc(check.message(first_index(check.bad)))
            raise exc(check[1]())


def first_failures(checks: Sequence[ValueCheck], device: torch.device) -> Tensor:
    """(len(VALUE_CHECKS),) int64 on ``device``: per registered check, the index of its first
    failing response, -1 where it passes or was not run. No host sync."""
    out = torch.full((len(VALUE_CHECK_KEYS),), -1, dtype=torch.int64, device=device)
    live = [c for c in checks if c.bad.numel() > 0]
    if not live:
        return out
    bad = torch.stack([c.bad.reshape(-1) for c in live])
    first = torch.where(bad.any(1), bad.to(torch.uint8).argmax(1), -1)
    slots = torch.tensor([VALUE_CHECK_KEYS.index(c.key) for c in live], device=device)
    return out.index_copy_(0, slots, first)


def first_index(bad: Tensor) -> int:
    """Index of the first True entry (error path only)."""
    return int(bad.reshape(-1).nonzero()[0, 0].item())


def describe(x: Any) -> str:
    return repr(x.item()) if isinstance(x, Tensor) and x.numel() == 1 else repr(x)
