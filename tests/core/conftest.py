"""Shared configuration, tolerances, batch builders and hypothesis strategies of the core suite.

Hypothesis profiles (select with the HYPOTHESIS_PROFILE environment variable):

* ``ci`` (default): few examples, derandomized, so that a run is reproducible and fast;
* ``dev``: ten times more examples per test, random seeds.

Tests state their example counts as ``settings(max_examples=examples(n))``: ``n`` under ``ci``.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "dev",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
_FACTOR = 10 if PROFILE == "dev" else 1


def examples(n: int) -> int:
    """Number of hypothesis examples: ``n`` under the ci profile, more under dev."""
    return n * _FACTOR


# --------------------------------------------------------------------------------------------
# Tolerances (rtol, atol) per input dtype, for comparisons against the float64 reference.
#
# float64: the implementation and the reference differ only in summation order: ~1e-15
#   relative per operation; 1e-10 leaves room for cancellation in a few-hundred-term sums.
# float32: inputs are exact in the reference (cast up), the implementation accumulates in float32
#   (eps 1.2e-7); values here are O(1) sums of at most a few hundred terms.
# Half precision (bf16, float16) is compared with float32 in test_precision.py, where its own
# tolerances are derived.
# --------------------------------------------------------------------------------------------
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
}

#: Unit roundoff (half an ulp at 1) of the half-precision dtypes.
UNIT_ROUNDOFF: dict[torch.dtype, float] = {
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}

SCORES = ("log_likelihood", "likelihood_ratio")
OBJECTIVES = ("disco", "disco_b")
KL_ESTIMATORS = ("k1", "k3")
NORMALIZES = ("all", "valid")

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

#: Values written into padding positions: they must never matter.
GARBAGE = (math.nan, math.inf, -math.inf, 1e30, -1e30, 3.0)


@dataclass(frozen=True)
class Batch:
    """The five tensor arguments of ``disco_loss``."""

    log_probs: Tensor
    old_log_probs: Tensor
    mask: Tensor
    rewards: Tensor
    group_ids: Tensor

    def args(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        return (self.log_probs, self.old_log_probs, self.mask, self.rewards, self.group_ids)

    def leaf(self) -> Batch:
        """Same batch with ``log_probs`` a fresh leaf requiring grad."""
        return replace(self, log_probs=self.log_probs.detach().clone().requires_grad_(True))

    def to(self, dtype: torch.dtype) -> Batch:
        return replace(
            self,
            log_probs=self.log_probs.detach().to(dtype),
            old_log_probs=self.old_log_probs.detach().to(dtype),
        )

    @property
    def bmask(self) -> Tensor:
        return self.mask != 0


def fill_values(
    gen: torch.Generator,
    mask: Tensor,
    *,
    dtype: torch.dtype,
    shift: float,
    noise: float,
    garbage: bool,
) -> tuple[Tensor, Tensor]:
    """Random (log_probs, old_log_probs) of shape mask.shape; garbage at padding if asked.

    old ~ -U(0.01, 3); log_probs = old + noise * N(0, 1) - shift, so that the k1 KL is about
    ``shift`` (positive shift: the constraint can be made active).
    """
    b, t = mask.shape
    old = -(torch.rand(b, t, generator=gen, dtype=torch.float64) * 3.0 + 0.01)
    lp = old + noise * torch.randn(b, t, generator=gen, dtype=torch.float64) - shift
    lp = torch.minimum(lp, torch.zeros(()))  # valid log-probs
    if garbage:
        bad = torch.tensor(GARBAGE, dtype=torch.float64)
        pick = torch.randint(0, len(GARBAGE), (2, b, t), generator=gen)
        lp = torch.where(mask, lp, bad[pick[0]])
        old = torch.where(mask, old, bad[pick[1]])
    return lp.to(dtype), old.to(dtype)


def random_batch(
    seed: int,
    *,
    num_groups: int = 5,
    max_group: int = 6,
    T: int = 12,
    rewards: str = "01",
    dtype: torch.dtype = torch.float64,
    shift: float = 0.0,
    noise: float = 0.3,
    garbage: bool = True,
    signal: str = "mixed",
    mask_dtype: torch.dtype = torch.bool,
) -> Batch:
    """A random ragged, shuffled batch.

    rewards: "01" ({0, 1}), "pm1" ({-1, 1}), or "cont" (uniform in [0, 1], for custom
      thresholds).
    signal: "mixed" (most groups have a positive and a negative, some are all-positive or
      all-negative, some singletons) or "none" (no group has both).
    Masks mix right padding, left padding and holes; every response has at least one token.
    """
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_group + 1, (num_groups,), generator=gen).tolist()
    b = sum(sizes)
    ids = torch.randint(-(2**62), 2**62, (num_groups,), generator=gen, dtype=torch.int64)
    while ids.unique().numel() < num_groups:  # practically never
        ids = torch.randint(-(2**62), 2**62, (num_groups,), generator=gen, dtype=torch.int64)
    group_ids = torch.repeat_interleave(ids, torch.tensor(sizes))

    labels = []
    for q, n in enumerate(sizes):
        kind = torch.rand((), generator=gen).item()
        if signal == "none":
            lab = [q % 2 == 0] * n
        elif kind < 0.15:
            lab = [True] * n
        elif kind < 0.3:
            lab = [False] * n
        else:
            lab = (torch.rand(n, generator=gen) < 0.5).tolist()
            if n >= 2:
                lab[0], lab[1] = True, False
        labels += lab
    pos = torch.tensor(labels)
    if rewards == "01":
        r = pos.double()
    elif rewards == "pm1":
        r = pos.double() * 2.0 - 1.0
    elif rewards == "cont":
        u = torch.rand(b, generator=gen, dtype=torch.float64)
        r = torch.where(pos, 0.7 + 0.3 * u, 0.7 * u)  # threshold 0.7 separates them
    else:
        raise AssertionError(rewards)

    kind = torch.randint(0, 3, (b,), generator=gen)
    lengths = torch.randint(1, T + 1, (b,), generator=gen)
    ar = torch.arange(T)
    right = ar[None, :] < lengths[:, None]
    left = ar[None, :] >= (T - lengths)[:, None]
    holes = torch.rand(b, T, generator=gen) < 0.6
    first = torch.randint(0, T, (b,), generator=gen)
    holes[torch.arange(b), first] = True
    mask = torch.where((kind == 0)[:, None], right, torch.where((kind == 1)[:, None], left, holes))

    lp, old = fill_values(gen, mask, dtype=dtype, shift=shift, noise=noise, garbage=garbage)
    perm = torch.randperm(b, generator=gen)
    return Batch(
        lp[perm],
        old[perm],
        mask[perm].to(mask_dtype),
        r[perm],
        group_ids[perm],
    )


# --------------------------------------------------------------------------------------------
# Hypothesis strategies
# --------------------------------------------------------------------------------------------

int64s = st.integers(INT64_MIN, INT64_MAX)


@st.composite
def batches(
    draw: st.DrawFn,
    *,
    max_groups: int = 4,
    max_group_size: int = 5,
    max_T: int = 8,
    dtype: torch.dtype = torch.float64,
    reward_kinds: tuple[str, ...] = ("01", "pm1"),
    garbage: bool = True,
    shift: float = 0.0,
) -> Batch:
    """Ragged, shuffled batches with arbitrary int64 group ids (structure drawn by hypothesis,
    float values from a drawn seed)."""
    sizes = draw(st.lists(st.integers(1, max_group_size), min_size=1, max_size=max_groups))
    ids = draw(st.lists(int64s, min_size=len(sizes), max_size=len(sizes), unique=True))
    b = sum(sizes)
    labels = draw(st.lists(st.booleans(), min_size=b, max_size=b))
    t = draw(st.integers(1, max_T))
    rows = []
    for _ in range(b):
        row = draw(st.lists(st.booleans(), min_size=t, max_size=t))
        row[draw(st.integers(0, t - 1))] = True
        rows.append(row)
    perm = draw(st.permutations(range(b)))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(reward_kinds))

    gen = torch.Generator().manual_seed(seed)
    mask = torch.tensor(rows, dtype=torch.bool)
    lp, old = fill_values(gen, mask, dtype=dtype, shift=shift, noise=0.3, garbage=garbage)
    pos = torch.tensor(labels, dtype=torch.float64)
    rewards = pos if kind == "01" else 2.0 * pos - 1.0
    group_ids = torch.tensor([g for g, n in zip(ids, sizes) for _ in range(n)], dtype=torch.int64)
    p = torch.tensor(perm, dtype=torch.long)
    return Batch(lp[p], old[p], mask[p], rewards[p], group_ids[p])


@pytest.fixture(params=[0, 1, 2], ids=lambda s: f"seed{s}")
def seed(request: pytest.FixtureRequest) -> int:
    return int(request.param)
