"""Run helpers shared by the demo's comparison (:mod:`discoloss.demo.cli`) and its learning-rate
sweep (:mod:`discoloss.demo.sweep`): the pool of worker processes, progress bars and CPU time.

Imports nothing of the demo, so both modules import it without importing each other.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["cpu_seconds", "parallel_map", "progress_factory"]


def progress_factory(progress: bool) -> Any:
    """A tqdm constructor writing to stderr, or None without progress bars."""
    if not progress:
        return None
    from functools import partial

    from tqdm.auto import tqdm

    return partial(tqdm, file=sys.stderr, dynamic_ncols=True, leave=True)


def cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def parallel_map(
    fn: Any,
    calls: Sequence[dict[str, Any]],
    *,
    jobs: int,
    threads: int,
    bar: Any = None,
    desc: str = "",
) -> list[Any]:
    """``[fn(**kw) for kw in calls]``, in up to ``jobs`` spawned worker processes (each with
    ``threads`` torch threads) when ``jobs > 1``; results in the order of ``calls``. Every call
    is seeded, so the results do not depend on ``jobs``. ``bar``: a tqdm-like factory for a
    progress bar over the finished calls (worker processes show none of their own)."""
    if jobs <= 1 or len(calls) <= 1:
        return [fn(**kw) for kw in calls]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(
        max_workers=min(jobs, len(calls)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(threads,),
    ) as pool:
        futures = [pool.submit(fn, **kw) for kw in calls]
        if bar is not None:
            with bar(total=len(futures), desc=desc) as done:
                for _ in as_completed(futures):
                    done.update(1)
        return [f.result() for f in futures]
