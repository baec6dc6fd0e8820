"""``discoloss demo --sweep-lr LR,LR,...``: pick each method's learning rate on a validation split.

For every method and every learning rate, RL from the same warm-up checkpoint with the
preset's budget; the final policy is evaluated on the fixed validation set
(:func:`discoloss.demo.task.validation_questions`: its own residue of the split hash, disjoint
from the test set and from every training question). The chosen learning rate of a method is
the one with the highest validation pass@1. The test set is not looked at.

Writes ``sweep.md`` (table), ``sweep.json`` (every number) and ``sweep.png`` into ``--out``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = ["sweep"]


def sweep(
    preset: Any,
    *,
    methods: Sequence[str],
    lrs: Sequence[float],
    seed: int,
    out: Path,
    cache_dir: Path | None,
    threads: int,
    jobs: int = 1,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Run the sweep (methods in up to ``jobs`` worker processes); returns what
    ``sweep.json`` holds."""
    import torch

    from discoloss.demo import report
    from discoloss.demo.task import validation_questions
    from discoloss.demo.train import LABELS, evaluate, warmup
    from discoloss.demo.workers import cpu_seconds, parallel_map, progress_factory

    bar = progress_factory(progress)
    t0 = time.perf_counter()
    c0 = cpu_seconds()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out.mkdir(parents=True, exist_ok=True)
        model, winfo = warmup(
            preset.task, preset.model, preset.warmup, seed=seed, cache_dir=cache_dir, progress=bar
        )
        val = validation_questions(preset.task)
        start = evaluate(model, val, preset.task, samples=preset.rl.eval_samples, seed=seed)
        # workers load the warm-up from the cache; without a cache, one process
        workers = jobs if cache_dir is not None else 1
        parallel = workers > 1 and len(methods) > 1
        results = parallel_map(
            _sweep_method,
            [
                dict(
                    preset=preset,
                    method=method,
                    lrs=lrs,
                    seed=seed,
                    cache_dir=cache_dir,
                    model=None if parallel else model,
                    bar=None if parallel else bar,
                )
                for method in methods
            ],
            jobs=workers,
            threads=threads,
            bar=bar if parallel else None,
            desc=f"sweep ({workers} processes)",
        )
        runs = dict(zip(methods, results))
    finally:
        torch.set_num_threads(old_threads)
    chosen = {
        m: max(r.values(), key=lambda x: (x["val"]["pass1"], -x["lr"]))["lr"]
        for m, r in runs.items()
    }
    doc = {
        "command": command,
        "seed": seed,
        "lrs": list(lrs),
        "split": "validation",
        "validation_questions": len(val),
        "start": report._eval_numbers(start._asdict(), preset.task.buckets)["all"],
        "runs": runs,
        "chosen": chosen,
        "warmup": winfo,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": cpu_seconds() - c0,
    }
    report.write_json_plain(doc, out / "sweep.json")
    lines = [
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen |",
        "|---" * (len(lrs) + 2) + "|",
        "| warm-up checkpoint | "
        + " | ".join([f"{100 * doc['start']['pass1']:.1f}"] * len(lrs))
        + " | |",
    ]
    for m, r in runs.items():
        cells = []
        for lr in lrs:
            x = r[repr(lr)]
            lo, hi = x["val"]["pass1_ci"]
            cells.append(
                f"{100 * x['val']['pass1']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]; "
                f"reward {x['reward_first']:.2f}→{x['reward_last']:.2f}"
            )
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + f" | {chosen[m]:g} |")
    lines += [
        "",
        f"Validation pass@1 (%, {len(val)} questions, {preset.rl.eval_samples} samples at "
        f"temperature 1 each, 95% interval across questions) after {preset.rl.steps} RL steps, "
        f"seed {seed}; train reward: first → last tenth of the run. Chosen: the highest "
        "validation pass@1 per method (the test set is not used).",
    ]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    _plot(doc, out / "sweep.png")
    return doc


def _sweep_method(
    preset: Any,
    *,
    method: str,
    lrs: Sequence[float],
    seed: int,
    cache_dir: Path | None,
    model: Any = None,
    bar: Any = None,
) -> dict[str, Any]:
    """One method at every learning rate, from the warm-up checkpoint (``model``, or the
    cached one), evaluated on the validation split at the end."""
    from discoloss.demo import report
    from discoloss.demo.task import validation_questions
    from discoloss.demo.train import rl_train, warmup

    if model is None:
        model, _ = warmup(preset.task, preset.model, preset.warmup, seed=seed, cache_dir=cache_dir)
    state0 = copy.deepcopy(model.state_dict())
    val = validation_questions(preset.task)
    rl = replace(preset.rl, eval_every=preset.rl.steps)  # evaluate at the end only
    out: dict[str, Any] = {}
    for lr in lrs:
        model.load_state_dict(state0)
        hist = rl_train(
            method, model, preset.task, replace(rl, lr=lr), seed=seed, test_set=val, progress=bar
        )
        steps = hist["steps"]
        tail = max(1, len(steps) // 10)
        out[repr(lr)] = {
            "lr": lr,
            "val": report._eval_numbers(hist["evals"][-1][1], preset.task.buckets)["all"],
            "reward_first": sum(s["reward"] for s in steps[:tail]) / tail,
            "reward_last": sum(s["reward"] for s in steps[-tail:]) / tail,
            "entropy_last": sum(s["entropy"] for s in steps[-tail:]) / tail,
        }
    model.load_state_dict(state0)
    return out


def _plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from discoloss.demo.report import COLORS
    from discoloss.demo.train import LABELS

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for m, r in doc["runs"].items():
        xs = [x["lr"] for x in r.values()]
        ys = [100 * x["val"]["pass1"] for x in r.values()]
        lo = [100 * x["val"]["pass1_ci"][0] for x in r.values()]
        hi = [100 * x["val"]["pass1_ci"][1] for x in r.values()]
        c = COLORS.get(m)
        ax.plot(xs, ys, marker="o", color=c, lw=2, label=LABELS[m])
        ax.fill_between(xs, lo, hi, color=c, alpha=0.12, lw=0)
    ax.axhline(100 * doc["start"]["pass1"], color="k", ls=":", lw=1, label="warm-up")
    ax.set_xscale("log")
    ax.set_xlabel("RL learning rate (AdamW)")
    ax.set_ylabel("validation pass@1 (%), 95% band")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
