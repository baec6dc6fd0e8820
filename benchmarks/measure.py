"""Measurement primitives: inputs, timing, peak memory and bandwidth, on CPU or CUDA.

Peak memory on CPU. PyTorch 2.13 keeps no statistics for its CPU allocator (``torch.cpu`` has
no ``memory_stats``; ``tracemalloc`` does not see tensor storage), so the peak is read from the
allocator events of the profiler: with ``torch.profiler.profile(profile_memory=True)`` every
allocation and free of the CPU allocator is recorded as a ``[memory]`` event with a signed byte
count. Sorted by time, their running sum is the memory held by the call beyond what existed
before it; its maximum is the peak extra memory of the call (the returned gradient included,
the inputs excluded). This is exact at the allocator level and independent of the machine's
load, but the profiler slows the call down, so memory and time are measured in separate calls.
On CUDA the allocator's own counters are used (``torch.cuda.reset_peak_memory_stats`` and
``max_memory_allocated`` minus the memory allocated before the call).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Inputs",
    "floor_bytes",
    "make_inputs",
    "peak_bandwidth",
    "peak_extra_memory",
    "profiled_peak_bytes",
    "run_fwd_bwd",
    "time_call",
]


class Inputs(NamedTuple):
    """One batch of B responses in groups of ``group_size``, padded to T tokens.

    log_probs: (B, T) leaf, requires grad; old_log_probs: (B, T); mask: (B, T) bool;
    mask_float: (B, T) mask in the log-probs' dtype (what the published code multiplies by);
    rewards: (B,) float in {0, 1}; group_ids: (B,) int64, responses of a group scattered.
    """

    log_probs: Tensor
    old_log_probs: Tensor
    mask: Tensor
    mask_float: Tensor
    rewards: Tensor
    group_ids: Tensor
    group_size: int


def make_inputs(
    batch: int,
    tokens: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    group_size: int = 8,
    seed: int = 0,
) -> Inputs:
    """Synthetic but realistic inputs: response lengths uniform in [T/4, T] (right padding),
    log-probs in (-3, 0], old log-probs shifted so that the k1 KL (~0.01) exceeds the published
    delta (the penalty's gradient path is exercised), binary rewards with p = 0.5."""
    if batch % group_size:
        raise ValueError(f"batch={batch} must be a multiple of group_size={group_size}")
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, tokens // 4), tokens + 1, (batch,), generator=g)
    mask = torch.arange(tokens).unsqueeze(0) < lengths.unsqueeze(1)
    lp = -3.0 * torch.rand(batch, tokens, generator=g)
    old = lp + 0.01 + 0.05 * torch.randn(batch, tokens, generator=g)
    lp = torch.where(mask, lp, 0.0)
    old = torch.where(mask, old, 0.0)
    rewards = (torch.rand(batch, generator=g) < 0.5).float()
    group_ids = torch.arange(batch) // group_size
    group_ids = group_ids[torch.randperm(batch, generator=g)]
    log_probs = lp.to(device=device, dtype=dtype).requires_grad_(True)
    return Inputs(
        log_probs=log_probs,
        old_log_probs=old.to(device=device, dtype=dtype),
        mask=mask.to(device),
        mask_float=mask.to(device=device, dtype=dtype),
        rewards=rewards.to(device),
        group_ids=group_ids.to(device),
        group_size=group_size,
    )


def floor_bytes(batch: int, tokens: int, dtype: torch.dtype) -> int:
    """Bytes a forward+backward must move at least: read log_probs, old_log_probs and the
    (bool) mask once, write the gradient once."""
    item = torch.empty((), dtype=dtype).element_size()
    return batch * tokens * (3 * item + 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_fwd_bwd(loss_fn: Callable[[Inputs], Tensor], inputs: Inputs) -> None:
    """One forward and backward; the gradient lands in ``inputs.log_probs.grad``."""
    inputs.log_probs.grad = None
    loss_fn(inputs).backward()


def time_call(loss_fn: Callable[[Inputs], Tensor], inputs: Inputs) -> tuple[float, float]:
    """(wall, cpu) seconds of one forward+backward, device work included in the wall time.

    cpu is this process's CPU time (all threads, user + system): unlike the wall time it does
    not grow while other processes hold the cores, so it cross-checks ratios on a busy machine
    (it does include the threads' spin-waits and the kernel's page-fault work)."""
    device = inputs.log_probs.device
    inputs.log_probs.grad = None
    _sync(device)
    c0 = time.process_time()
    t0 = time.perf_counter()
    loss_fn(inputs).backward()
    _sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _cpu_peak_from_profiler(prof: torch.profiler.profile) -> int:
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()  # type: ignore[union-attr]
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort()
    held = peak = 0
    for _, nbytes in events:
        held += nbytes
        peak = max(peak, held)
    return peak


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's start/stop lines, which its C++ side prints on file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_extra_memory(loss_fn: Callable[[Inputs], Tensor], inputs: Inputs) -> int:
    """Peak bytes allocated by one forward+backward beyond what was allocated before it (the
    gradient it leaves in ``log_probs.grad`` included). See the module docstring."""
    device = inputs.log_probs.device
    inputs.log_probs.grad = None
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run_fwd_bwd(loss_fn, inputs)
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    return profiled_peak_bytes(lambda: run_fwd_bwd(loss_fn, inputs))


def profiled_peak_bytes(call: Callable[[], object]) -> int:
    """Peak bytes of the CPU allocator held by ``call()`` beyond what was allocated before it,
    from the profiler's allocator events (see the module docstring). Memory allocated before
    the call and freed during it counts negatively, so the result is the call's high-water mark
    over the memory in use when it started."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with (
        _quiet_stderr(),
        torch.profiler.profile(activities=activities, profile_memory=True) as prof,
    ):
        call()
    return _cpu_peak_from_profiler(prof)


def peak_bandwidth(device: torch.device, *, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Measured copy bandwidth in bytes/s: the best of ``repeats`` copies of an ``nbytes``
    buffer (a copy reads and writes ``nbytes``, so it moves 2 * nbytes)."""
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / min(times[1:])


def median(xs: list[float]) -> float:
    return statistics.median(xs)
