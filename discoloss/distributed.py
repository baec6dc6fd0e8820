"""Cross-rank DisCO: form groups across data-parallel ranks from per-response scalars.

A question's responses may land on different ranks. DisCO only needs five numbers per response
to form its groups (score, KL sum, token count, reward, group id), so each rank contributes a
(B_r, 5) float64 payload and every rank computes the same global loss (DRPO with explicit
preferences: a sixth column, the preference; its default length preference needs only the
token count). Token-level tensors are
never communicated: traffic is O(sum_r B_r), not O(B * T * world) as in the published code.

Collectives per forward call, in this order, on ``process_group``:

1. ``all_gather`` of a fixed-size int64 *header* per rank (:data:`HEADER_WORDS` words): the
   local response count, the outcome of the rank's checks, and its resolved options;
2. ``all_gather`` of the payload, padded to the largest count ((max_count, 5) float64 per
   rank, 6 columns with DRPO's explicit preferences), only when every rank's header says that
   everything is in order.

None in backward. Reading the headers is the one host sync (it was needed anyway for the
counts). Every rank must call the loss the same number of times (as for any collective).

**Collective errors.** No check that can fail on one rank only raises before the headers are
exchanged. A rank whose inputs are malformed (bad shapes, dtypes, devices, option values)
catches its own error, sends a header that carries its type and message, and takes part in the
header gather like every other rank; with ``validate=True`` the value checks (non-finite
inputs, empty responses, mask values) are computed on the device before the gather and travel
as one int64 per check (the index of the first failing response, or -1). Every rank then reads
the same table of headers and raises the same exception, which names the failing rank, before
the payload gather, which then no rank enters. The options are compared the same way (each
header carries the resolved options, :func:`options_words`): different options on two ranks
are an error on every rank that names the options and the ranks. A rank with 0 responses is
legal (it contributes nothing and gets a zero-size gradient); all ranks empty is an error on
every rank.

Gradient convention: every rank holds the same global loss L. The backward of the gather
returns, for the local responses, ``world_size * dL/d(local payload)``, so that after the
usual gradient averaging of DDP / FSDP (mean over ranks) the parameters receive exactly
``dL/dtheta`` of the single-process computation on the concatenated batch. If your engine sums
gradients across ranks instead of averaging them, divide the loss by the world size.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from discoloss._checks import VALUE_CHECK_KEYS, VALUE_CHECKS, Check, ValueCheck, first_failures
from discoloss._types import CONSTRAINTS, KL_ESTIMATORS, NORMALIZES, OBJECTIVES, SCORES
from discoloss.constraints import LagrangeMultiplier
from discoloss.options import DiscoOptions

__all__ = ["gather_response_stats"]

#: Columns of the per-response payload (then "preference" when DRPO's preferences are given).
PAYLOAD_COLUMNS = ("score", "kl_sum", "length", "reward", "group_id")

#: Options compared across ranks, in header order: (name, choices) for string options,
#: (name, None) for numbers (sent as float64 bit patterns; tau resolved).
OPTION_FIELDS: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("score", SCORES),
    ("objective", OBJECTIVES),
    ("tau", None),
    ("delta", None),
    ("beta", None),
    ("kl_estimator", KL_ESTIMATORS),
    ("threshold", None),
    ("normalize", NORMALIZES),
    ("constraint", CONSTRAINTS),
    ("cvar_alpha", None),
    ("margin", None),
    ("clip_eps", None),
    ("lam", None),
    ("max_length", None),  # NO_MAX_LENGTH when None
    ("validate", ("False", "True")),
    ("preferences", ("None", "a tensor")),  # whether DRPO's preferences were passed
    ("multiplier", None),  # the Lagrange multiplier's value; NO_MULTIPLIER when there is none
)
#: Bytes of a rank's error message carried in its header (longer messages are cut).
MESSAGE_BYTES = 512

# Header layout (int64 words).
_COUNT, _ERROR, _MESSAGE_LEN, _OPTIONS_OK = 0, 1, 2, 3
_OPTIONS = 4
_MESSAGE = _OPTIONS + len(OPTION_FIELDS) - 1  # the multiplier word is on the device part
_MULTIPLIER = _MESSAGE + MESSAGE_BYTES // 8
_VALUES = _MULTIPLIER + 1
HEADER_WORDS = _VALUES + len(VALUE_CHECK_KEYS)

#: Exception types a rank's failed check can carry (index = header code - 1).
_ERROR_TYPES: tuple[type[Exception], ...] = (ValueError, TypeError)
NO_MULTIPLIER = -(2**63)
NO_MAX_LENGTH = -1


def _float_word(x: float) -> int:
    return int(struct.unpack("<q", struct.pack("<d", float(x)))[0])


def _word_float(w: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", int(w)))[0])


def options_words(options: DiscoOptions, validate: bool, preferences: bool = False) -> list[int]:
    """The resolved options as int64 words (without the multiplier, which lives on the device):
    the fingerprint compared across ranks. Bit-exact: equal words iff equal options.
    ``preferences``: whether DRPO's preferences tensor was passed (it changes the payload)."""
    words = []
    for name, choices in OPTION_FIELDS[:-1]:
        if name == "validate":
            words.append(int(bool(validate)))
        elif name == "preferences":
            words.append(int(bool(preferences)))
        elif name == "max_length":
            words.append(NO_MAX_LENGTH if options.max_length is None else options.max_length)
        elif name == "tau":
            words.append(_float_word(options.tau_value))
        elif choices is None:
            words.append(_float_word(getattr(options, name)))
        else:
            words.append(choices.index(getattr(options, name)))
    return words


def _option_text(name: str, word: int) -> str:
    choices = dict(OPTION_FIELDS)[name]
    if name == "multiplier":
        return (
            "None" if word == NO_MULTIPLIER else f"LagrangeMultiplier(value={_word_float(word)!r})"
        )
    if name == "max_length":
        return "None" if word == NO_MAX_LENGTH else str(word)
    if choices is not None:
        return choices[word] if name in ("validate", "preferences") else repr(choices[word])
    return repr(_word_float(word))


def comm_device(group: Any, log_probs: object) -> torch.device:
    """Device of the header: CUDA under NCCL (whatever a malformed rank passed), else the
    device of ``log_probs`` (CPU when it is not a tensor)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return log_probs.device if isinstance(log_probs, Tensor) else torch.device("cpu")


def build_header(
    *,
    count: int,
    failure: Exception | None,
    options: DiscoOptions | None,
    validate: bool,
    multiplier: LagrangeMultiplier | None,
    checks: Sequence[Check | ValueCheck],
    device: torch.device,
    preferences: bool = False,
) -> Tensor:
    """This rank's (HEADER_WORDS,) int64 header. Host-known words go in one host-to-device
    copy; the value checks' first failures and the multiplier are device tensors (no sync).
    ``preferences``: whether DRPO's preferences were passed (compared across ranks)."""
    host = [0] * _MULTIPLIER
    host[_COUNT] = count
    if failure is not None:
        exc = failure
        code = next(i for i, t in enumerate(_ERROR_TYPES) if isinstance(exc, t)) + 1
        raw = str(exc).encode("utf-8")[:MESSAGE_BYTES]
        host[_ERROR], host[_MESSAGE_LEN] = code, len(raw)
        padded = raw.ljust(MESSAGE_BYTES, b"\0")
        host[_MESSAGE:_MULTIPLIER] = list(struct.unpack(f"<{MESSAGE_BYTES // 8}q", padded))
    if options is not None:
        host[_OPTIONS_OK] = 1
        host[_OPTIONS:_MESSAGE] = options_words(options, validate, preferences)
    head = torch.tensor(host, dtype=torch.int64, device=device)
    use_multiplier = failure is None and options is not None and options.constraint == "lagrangian"
    value_checks = [c for c in checks if isinstance(c, ValueCheck)]
    if not use_multiplier and not value_checks:
        tail = [NO_MULTIPLIER] + [-1] * len(VALUE_CHECK_KEYS)
        return torch.cat([head, torch.tensor(tail, dtype=torch.int64, device=device)])
    if use_multiplier:
        assert multiplier is not None
        value = multiplier.value.detach().to(device=device, dtype=torch.float64)
        mult = value.reshape(1).view(torch.int64)
    else:
        mult = torch.full((1,), NO_MULTIPLIER, dtype=torch.int64, device=device)
    return torch.cat([head, mult, first_failures(value_checks, device)])


def gather_headers(header: Tensor, group: Any) -> list[list[int]]:
    """Collective 1: every rank's header; reading it is the one host sync."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(header) for _ in range(world)]
    dist.all_gather(parts, header, group=group)
    table: list[list[int]] = torch.stack(parts).tolist()  # the one host sync
    return table


def _ranks_text(ranks: Sequence[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(str(r) for r in ranks)


def collective_error(table: list[list[int]], what: str = "disco_loss") -> Exception | None:
    """The error every rank raises, decided from the gathered headers alone (so it is the same
    on every rank), or None. Order: a failed local check (lowest rank), different options,
    a failed value check (lowest rank, then the check order of VALUE_CHECKS), an empty global
    batch. ``what`` names the calling function in the messages."""
    world = len(table)
    where = f"of {world} in process_group"
    failed = [r for r, h in enumerate(table) if h[_ERROR] != 0]
    if failed:
        h = table[failed[0]]
        raw = struct.pack(f"<{MESSAGE_BYTES // 8}q", *h[_MESSAGE:_MULTIPLIER])
        text = raw[: h[_MESSAGE_LEN]].decode("utf-8", errors="ignore")
        also = f" ({_ranks_text(failed[1:])} failed a check too)" if len(failed) > 1 else ""
        return _ERROR_TYPES[h[_ERROR] - 1](f"{what} on rank {failed[0]} {where}: {text}{also}")
    names = [name for name, _ in OPTION_FIELDS]
    words = [h[_OPTIONS:_MESSAGE] + [h[_MULTIPLIER]] for h in table]
    differ = []
    for i, name in enumerate(names):
        values: dict[int, list[int]] = {}
        for r in range(world):
            values.setdefault(words[r][i], []).append(r)
        if len(values) > 1:
            parts = [f"{_option_text(name, w)} ({_ranks_text(rs)})" for w, rs in values.items()]
            differ.append(f"{name}: " + " vs ".join(parts))
    if differ:
        return ValueError(
            f"{what} options differ across the ranks of process_group (every rank must "
            "pass the same options): " + "; ".join(differ)
        )
    for r, h in enumerate(table):
        for key, index in zip(VALUE_CHECK_KEYS, h[_VALUES:]):
            if index >= 0:
                return ValueError(
                    f"{what} on rank {r} {where}: {VALUE_CHECKS[key].format(index=index)}"
                )
    if sum(h[_COUNT] for h in table) == 0:
        batch = "log_probs" if what == "disco_loss" else f"{what}: stats"
        return ValueError(
            f"{batch} is an empty batch (0 responses) on every rank of process_group "
            f"({world} ranks); at least one response is required across the ranks"
        )
    return None


class _GatherRows(torch.autograd.Function):
    """all_gather of a (n_local, k) tensor with ragged n across ranks; autograd without comms."""

    @staticmethod
    def forward(ctx: Any, payload: Tensor, group: Any, counts: list[int], rank: int) -> Tensor:
        world = len(counts)
        max_count = max(counts)
        padded = payload.new_zeros((max_count, payload.shape[1]))
        padded[: payload.shape[0]] = payload
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
        ctx.offset = sum(counts[:rank])
        ctx.n = payload.shape[0]
        ctx.world = world
        return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        local = grad[ctx.offset : ctx.offset + ctx.n]
        return local * ctx.world, None, None, None


def require_initialised() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "process_group was given but torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first or pass process_group=None"
        )


def decide_across_ranks(
    header: Tensor, failure: Exception | None, group: Any, what: str = "disco_loss"
) -> list[int]:
    """Collective 1 and the collective decision, from this rank's :func:`build_header`:
    returns every rank's response count, or raises the same exception on every rank (chained
    to the local error on a failing rank). ``what`` names the caller in the messages."""
    table = gather_headers(header, group)
    error = collective_error(table, what)
    if error is not None:
        raise error from failure
    return [h[_COUNT] for h in table]


def gather_response_stats(
    scores: Tensor,
    kl_sums: Tensor,
    lengths: Tensor,
    rewards: Tensor,
    group_ids: Tensor,
    group: Any,
    counts: list[int] | None = None,
    *,
    preferences: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Concatenate per-response scalars of every rank, in rank order.

    ``counts``: every rank's response count, from :func:`decide_across_ranks` (then this is
    the payload gather alone); None gathers a header first, with no options to compare.
    Scores and KL sums keep their autograd connection to the local inputs (see the module
    docstring for the gradient scale). Group ids travel bit-exactly (int64 reinterpreted as
    float64), so any int64 id is preserved. ``preferences`` (DRPO's, optional; every rank
    must pass them or none) travel as a sixth column and come back last (None when not
    given). Returned float tensors are float64.
    """
    require_initialised()
    f = torch.float64
    columns = [
        scores.to(f),
        kl_sums.to(f),
        lengths.to(f),
        rewards.to(f),
        group_ids.to(torch.int64).view(f),
    ]
    if preferences is not None:
        columns.append(preferences.detach().to(f))
    payload = torch.stack(columns, dim=1)
    if counts is None:
        header = build_header(
            count=payload.shape[0],
            failure=None,
            options=None,
            validate=False,
            multiplier=None,
            checks=(),
            device=payload.device,
        )
        counts = decide_across_ranks(header, None, group)
    rank = dist.get_rank(group)
    full: Tensor = _GatherRows.apply(payload, group, counts, rank)  # type: ignore[no-untyped-call]
    ids = full[:, 4].detach().contiguous().view(torch.int64)
    prefs = None if preferences is None else full[:, 5].detach()
    return full[:, 0], full[:, 1], full[:, 2], full[:, 3], ids, prefs
