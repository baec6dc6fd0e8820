"""Sequence scores: length-normalised token means of the current policy's log-probs.

DisCO (arXiv 2505.12366, section 3) scores a response o of length |o| with a non-clipping
function of the current policy pi_theta::

    log_likelihood:    s(o) = (1/|o|) * sum_t log pi_theta(o_t | q, o_<t)
    likelihood_ratio:  s(o) = (1/|o|) * sum_t pi_theta(o_t | q, o_<t) / pi_old(o_t | q, o_<t)

Everything the loss needs from the (B, T) token tensors is a handful of per-response sums, so
the token tensors are read once and reduced at once (DESIGN.md section 7). The private
``token_sums`` computes them with a custom autograd function whose backward writes the gradient
with a single (B, T) allocation. On CPU both passes run over blocks of rows with a bitwise
selection instead of ``where`` (see ``zero_padding``): bit for bit the same results, several
times faster, and no (B, T) temporary besides the gradient.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from discoloss._checks import (
    Check,
    ValueCheck,
    check_batch,
    check_device,
    check_option,
    check_same_shape,
    check_tensor,
    raise_if_failed,
)
from discoloss._types import SCORES, Score

__all__ = ["sequence_scores"]


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); everything else is reduced in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TokenSums(NamedTuple):
    """Per-response reductions of the token tensors, each of shape (B,).

    lengths:  number of response tokens |o_i| (no gradient).
    log_prob: sum_t m_t * log_probs (differentiable wrt log_probs).
    old_log_prob: sum_t m_t * old_log_probs (no gradient).
    expm1_log_ratio: sum_t m_t * (exp(log_probs - old_log_probs) - 1), or None when neither the
        likelihood-ratio score nor the k3 estimator needs it (saves the most expensive pass).
    """

    lengths: Tensor
    log_prob: Tensor
    old_log_prob: Tensor
    expm1_log_ratio: Tensor | None


_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def zero_padding(x: Tensor, mask: Tensor, *, reuse: Tensor | None = None) -> Tensor:
    """``torch.where(mask, x, 0)`` bit for bit: x at response tokens, +0.0 at padding.

    x: (B, T), or broadcastable to mask's shape such as (B, 1); mask: (B, T) bool.
    reuse: optional (B, T) result of an earlier call with the same mask, no longer needed; on
      CPU its storage is overwritten instead of allocating a new tensor.
    Returns a (B, T) tensor of x's dtype.

    On CPU, ``where`` runs a scalar loop (about 10x the time of a copy). There the padding
    positions are cleared instead with a vectorised bitwise AND against an integer mask of x's
    width (all bits set at response tokens, none at padding), which yields the same bits (inf
    and nan at padding become +0.0 too); the integer mask's buffer becomes the result, so one
    (B, T) tensor is allocated, like ``where``, or none with ``reuse``. On other devices
    ``where`` is already a single vectorised pass over fewer bytes and is kept.
    """
    bits = _BITS.get(x.element_size())
    if x.device.type != "cpu" or bits is None:
        return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    if reuse is not None and reuse.element_size() == x.element_size() and reuse.shape == mask.shape:
        word = reuse.view(bits)
        word.copy_(mask)
    else:
        word = mask.to(bits)
    word.neg_()
    word.bitwise_and_(x.view(bits))
    return word.view(x.dtype)


#: Token positions per block of rows on CPU. A block's temporaries (4 MiB each in float32) stay
#: in the last-level cache and are recycled by the C allocator instead of being mapped afresh
#: (page faults) on every call; blocks of 2^18 to 2^20 positions were fastest on a 2-core EPYC
#: (B=1024..4096, T=4096..16384), smaller ones pay for more thread synchronisation.
CPU_BLOCK = 1 << 20


def _cpu_blocks(log_probs: Tensor, old_log_probs: Tensor, mask: Tensor) -> bool:
    """Blocks of rows on CPU, for rows contiguous in memory (a row's sum is then computed in
    the same order as over the whole tensor; other layouts take the whole-tensor path)."""
    return (
        log_probs.device.type == "cpu"
        and log_probs.element_size() in _BITS
        and old_log_probs.element_size() in _BITS
        and all(t.stride(-1) == 1 for t in (log_probs, old_log_probs, mask))
    )


def _row_blocks(rows: int, cols: int) -> list[slice]:
    """Row slices of about ``CPU_BLOCK`` positions. At least 2 rows per block (unless there is
    only one row): a row's sum is then reduced by one thread in one order, exactly as over the
    whole tensor (a single-row reduction may be split across threads)."""
    step = max(2, CPU_BLOCK // max(cols, 1))
    starts = list(range(0, rows, step))
    if len(starts) > 1 and rows - starts[-1] == 1:
        starts.pop()  # no 1-row tail: it joins the previous block
    return [slice(a, b) for a, b in zip(starts, starts[1:] + [rows])]


def _sums_by_blocks(
    log_probs: Tensor, old_log_probs: Tensor, mask: Tensor, need_ratio: bool, acc: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CPU forward of :class:`_MaskedTokenSums`, block of rows by block of rows."""
    b = log_probs.shape[0]
    lengths = torch.empty(b, dtype=torch.int32)
    s_lp = torch.empty(b, dtype=acc)
    s_old = torch.empty(b, dtype=acc)
    s_e = torch.zeros(b, dtype=acc)
    buf: Tensor | None = None
    for rows in _row_blocks(*log_probs.shape):
        m = mask[rows]
        torch.sum(m, -1, dtype=torch.int32, out=lengths[rows])
        reuse = buf if buf is not None and buf.shape == m.shape else None
        x = zero_padding(log_probs[rows], m, reuse=reuse)
        torch.sum(x, -1, dtype=acc, out=s_lp[rows])
        buf = zero_padding(old_log_probs[rows], m, reuse=x)
        torch.sum(buf, -1, dtype=acc, out=s_old[rows])
        if need_ratio:
            d = log_probs[rows].to(acc) - old_log_probs[rows].to(acc)
            torch.expm1(d, out=d)
            torch.sum(zero_padding(d, m), -1, out=s_e[rows])
    return lengths, s_lp, s_old, s_e


class _MaskedTokenSums(torch.autograd.Function):
    """(log_probs, old_log_probs, mask) -> (lengths, sum m*lp, sum m*old, sum m*expm1(lp - old)).

    Padding positions (mask False) may hold anything, inf and nan included: they are excluded
    by selection (``zero_padding``, never a multiplication by 0) and receive exactly zero
    gradient. The backward allocates one (B, T) tensor, the gradient. On CPU both passes run
    over blocks of rows (``CPU_BLOCK``), so that their temporaries stay small and in cache; the
    results are bit for bit those of whole-tensor ops.
    """

    @staticmethod
    def forward(
        ctx: Any, log_probs: Tensor, old_log_probs: Tensor, mask: Tensor, need_ratio: bool
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        acc = _accum_dtype(log_probs.dtype)
        blocks = _cpu_blocks(log_probs, old_log_probs, mask)
        if blocks:
            lengths, s_lp, s_old, s_e = _sums_by_blocks(
                log_probs, old_log_probs, mask, need_ratio, acc
            )
        else:
            lengths = mask.sum(-1, dtype=torch.int32)
            s_lp = zero_padding(log_probs, mask).sum(-1, dtype=acc)
            s_old = zero_padding(old_log_probs, mask).sum(-1, dtype=acc)
            if need_ratio:
                d = log_probs.to(acc) - old_log_probs.to(acc)
                torch.expm1(d, out=d)
                s_e = zero_padding(d, mask).sum(-1)
                del d
            else:
                s_e = s_lp.new_zeros(s_lp.shape)
        ctx.need_ratio = need_ratio
        ctx.lp_dtype = log_probs.dtype
        ctx.blocks = blocks
        if need_ratio:
            ctx.save_for_backward(log_probs, old_log_probs, mask)
        else:
            ctx.save_for_backward(mask)
        # Shape and layout of the gradient to allocate (no data, no reference to log_probs).
        ctx.lp_meta = torch.empty_like(log_probs, device="meta")
        # Exact counts in int32; float counts are exact below 2^24 tokens per response.
        lengths = lengths.to(acc)
        ctx.mark_non_differentiable(lengths, s_old)
        return lengths, s_lp, s_old, s_e

    @staticmethod
    def backward(
        ctx: Any,
        g_len: Tensor | None,
        g_lp: Tensor | None,
        g_old: Tensor | None,
        g_e: Tensor | None,
    ) -> tuple[Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        dtype = ctx.lp_dtype
        ratio = ctx.need_ratio and g_e is not None
        if ratio:
            log_probs, old_log_probs, mask = ctx.saved_tensors
        else:
            if g_lp is None:
                return None, None, None, None
            (mask,) = ctx.saved_tensors
        acc = _accum_dtype(dtype)

        def coef(rows: slice | None) -> Tensor:
            """dL/d(token) before masking, for the rows (all rows for None)."""
            r = slice(None) if rows is None else rows
            if not ratio:
                assert g_lp is not None
                return g_lp[r].to(dtype).unsqueeze(-1)
            assert g_e is not None
            t: Tensor = log_probs[r].to(acc) - old_log_probs[r].to(acc)
            t.exp_()
            t.mul_(g_e[r].to(acc).unsqueeze(-1))
            if g_lp is not None:
                t.add_(g_lp[r].to(acc).unsqueeze(-1))
            return t.to(dtype)

        if ctx.blocks:
            grad = torch.empty_like(ctx.lp_meta, device=mask.device)
            for rows in _row_blocks(*mask.shape):
                zero_padding(coef(rows), mask[rows], reuse=grad[rows])
            return grad, None, None, None
        return zero_padding(coef(None), mask), None, None, None


def as_bool_mask(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def check_token_inputs(
    log_probs: Tensor, old_log_probs: Tensor, mask: Tensor, *, allow_empty: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Metadata checks of the (B, T) inputs; returns (log_probs, old_log_probs, mask).

    ``allow_empty``: B = 0 is legal (a rank's empty shard in cross-rank mode).
    """
    check_tensor("log_probs", log_probs, ndim=2, kind="float")
    check_tensor("old_log_probs", old_log_probs, ndim=2, kind="float")
    check_tensor("mask", mask, ndim=2, kind="mask")
    names = ("log_probs", "old_log_probs", "mask")
    check_same_shape(names, (log_probs, old_log_probs, mask))
    check_device(names, (log_probs, old_log_probs, mask))
    check_batch(names, (log_probs, old_log_probs, mask), allow_empty=allow_empty)
    if log_probs.shape[1] == 0 and log_probs.shape[0] > 0:
        raise ValueError(
            "log_probs has 0 token positions (shape (B, 0)); responses cannot be empty"
        )
    return log_probs, old_log_probs, mask


def token_sums(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    *,
    need_ratio: bool,
    validate: bool,
) -> tuple[TokenSums, list[Check | ValueCheck]]:
    """Reduce the token tensors to per-response sums (inputs already metadata-checked).

    Returns the sums and the value checks to run (empty when ``validate`` is False), so that
    the caller can evaluate all of its checks with one host sync.
    """
    bmask = as_bool_mask(mask)
    lengths, s_lp, s_old, s_e = _MaskedTokenSums.apply(  # type: ignore[no-untyped-call]
        log_probs, old_log_probs.detach(), bmask, need_ratio
    )
    sums = TokenSums(lengths, s_lp, s_old, s_e if need_ratio else None)
    checks: list[Check | ValueCheck] = []
    if validate:
        if mask.dtype != torch.bool:
            binary = (mask == 0) | (mask == 1)
            checks.append(ValueCheck("mask_values", (~binary).any(-1)))
        checks.append(ValueCheck("empty_response", lengths == 0))
        checks.append(ValueCheck("log_probs", ~s_lp.detach().isfinite()))
        checks.append(ValueCheck("old_log_probs", ~s_old.isfinite()))
        if need_ratio:
            checks.append(ValueCheck("ratio", ~s_e.detach().isfinite()))
    return sums, checks


def scores_from_sums(sums: TokenSums, score: str) -> Tensor:
    """(B,) sequence scores from the per-response sums (float32, or float64 for float64 input)."""
    lengths = sums.lengths.clamp_min(1.0)  # an empty response is an error under validation
    if score == "log_likelihood":
        return sums.log_prob / lengths
    assert sums.expm1_log_ratio is not None
    return 1.0 + sums.expm1_log_ratio / lengths


def sequence_scores(
    log_probs: Tensor,
    old_log_probs: Tensor | None,
    mask: Tensor,
    *,
    score: Score = "log_likelihood",
    validate: bool = True,
) -> Tensor:
    r"""Length-normalised sequence scores of DisCO (arXiv 2505.12366, eq. 6 and 7).

    .. math::

        s_{ll}(o) = \frac{1}{|o|}\sum_t \log\pi_\theta(o_t\mid q, o_{<t}), \qquad
        s_{lr}(o) = \frac{1}{|o|}\sum_t \frac{\pi_\theta(o_t\mid q, o_{<t})}
                                             {\pi_{old}(o_t\mid q, o_{<t})}

    Args:
      log_probs: (B, T) token log-probs under the current policy (differentiable).
      old_log_probs: (B, T) token log-probs under the sampling policy (never differentiated).
        May be None for ``score="log_likelihood"``, which does not use it.
      mask: (B, T) bool or 0/1 tensor, True at response tokens. Padding positions may hold any
        value (inf and nan included): they are ignored and get zero gradient.
      score: ``"log_likelihood"`` or ``"likelihood_ratio"`` (the label-dependent
        ``"clipped_ratio"`` is computed by :func:`clipped_ratio_scores`).
      validate: check values (one host sync); metadata is always checked.

    Returns:
      (B,) scores, float32 (float64 for float64 inputs). Half-precision inputs are reduced in
      float32.
    """
    check_option("score", score, SCORES)
    if score == "clipped_ratio":
        raise ValueError(
            "score='clipped_ratio' depends on each response's label; use disco_loss or "
            "clipped_ratio_scores(..., positive=...)"
        )
    if old_log_probs is None:
        if score != "log_likelihood":
            raise ValueError(f"old_log_probs is required for score={score!r}")
        check_tensor("log_probs", log_probs, ndim=2, kind="float")
        old_log_probs = log_probs.detach()  # unused by the log-likelihood score
    log_probs, old_log_probs, mask = check_token_inputs(log_probs, old_log_probs, mask)
    sums, checks = token_sums(
        log_probs, old_log_probs, mask, need_ratio=score == "likelihood_ratio", validate=validate
    )
    raise_if_failed(checks)
    return scores_from_sums(sums, score)


def clipped_ratio_scores(
    log_probs: Tensor,
    old_log_probs: Tensor,
    mask: Tensor,
    positive: Tensor,
    *,
    clip_eps: float,
) -> Tensor:
    r"""GRPO's clipped ratio surrogate used as a DisCO score (the clipping-vs-constraint
    ablation of arXiv 2505.12366, section 3.1): with :math:`\rho_t = \pi_\theta / \pi_{old}`,

    .. math::

        s^+(o) = \frac{1}{|o|}\sum_t \min(\rho_t, 1 + \epsilon),\qquad
        s^-(o) = \frac{1}{|o|}\sum_t \max(\rho_t, 1 - \epsilon)

    for positive and negative responses. A clipped token contributes no gradient.

    Args:
      log_probs, old_log_probs, mask: (B, T) as in :func:`sequence_scores` (metadata-checked).
      positive: (B,) bool labels.
      clip_eps: epsilon in (0, 1).
    """
    acc = _accum_dtype(log_probs.dtype)
    bmask = as_bool_mask(mask)
    d = torch.where(bmask, log_probs.to(acc) - old_log_probs.detach().to(acc), 0.0)
    # Clipped in log space, exp(clamp(d, log lo, log hi)): a clipped ratio is never formed, so
    # it cannot overflow (nor turn its zero gradient into 0 * inf = nan in exp's backward).
    inf = torch.full_like(positive, math.inf, dtype=acc)
    lo = torch.where(positive, -inf, math.log1p(-clip_eps))[:, None]
    hi = torch.where(positive, math.log1p(clip_eps), inf)[:, None]
    clipped = torch.exp(torch.clamp(d, lo, hi))
    lengths = bmask.sum(-1, dtype=acc).clamp_min(1.0)
    return torch.where(bmask, clipped, 0.0).sum(-1) / lengths
