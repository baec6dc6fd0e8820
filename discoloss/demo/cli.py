"""``discoloss demo``: command line and orchestration.

    discoloss demo                      # default run (~7 min on 2 CPU cores, nothing cached)
    discoloss demo --quick              # DisCO vs GRPO, small budget (~3 min; ~30 s once cached)
    discoloss demo --methods disco,grpo --steps 30 --seed 1 --out runs/a
    discoloss demo --length --seeds 3   # DRPO vs DisCO vs length-penalised GRPO

Writes into ``--out``: ``table.md`` (also printed), ``results.json`` (every number) and the
PNG plots of :func:`discoloss.demo.report.write_plots`.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from discoloss.demo.workers import cpu_seconds, parallel_map, progress_factory

__all__ = ["Preset", "build_parser", "main", "run"]

DEFAULT_METHODS = ("disco", "grpo", "dr_grpo", "dapo")
#: ``--quick`` compares DisCO with GRPO only: one RL run per worker process on 2 cores.
QUICK_METHODS = ("disco", "grpo")
#: ``--length``: DRPO against DisCO and GRPO with a length-penalised reward.
LENGTH_METHODS = ("drpo", "disco", "grpo_lp")
#: RL learning rate per method (AdamW), chosen by ``--sweep-lr 3e-5,1e-4,3e-4`` on the
#: validation split: 1e-4 for every method (see docs/demo.md).
DEFAULT_LRS: tuple[tuple[str, float], ...] = (
    ("dapo", 1e-4),
    ("disco", 1e-4),
    ("disco_b", 1e-4),
    ("dr_grpo", 1e-4),
    ("grpo", 1e-4),
)
#: The length setting's methods run at the rate of DisCO and GRPO (not swept separately).
LENGTH_LRS: tuple[tuple[str, float], ...] = (*DEFAULT_LRS, ("drpo", 1e-4), ("grpo_lp", 1e-4))


def _configs() -> tuple[Any, Any, Any, Any]:
    from discoloss.demo.model import ModelConfig
    from discoloss.demo.task import TaskConfig
    from discoloss.demo.train import RLConfig, WarmupConfig

    return TaskConfig, ModelConfig, WarmupConfig, RLConfig


@dataclass(frozen=True)
class Preset:
    """Everything a run needs besides the seed and the methods."""

    task: Any
    model: Any
    warmup: Any
    rl: Any
    #: Learning rate per method (``rl.lr`` for a method not listed): chosen by the sweep.
    lrs: tuple[tuple[str, float], ...] = ()

    def lr(self, method: str) -> float:
        return float(dict(self.lrs).get(method, self.rl.lr))


def default_warmup_threads() -> int:
    """torch threads of the warm-up: 2, or 1 on a one-core machine. A warm-up runs alone (one
    seed) or one seed at a time, and a second thread cuts its time by about a fifth (measured
    on 2 idle cores: 138 s against 168 s). The checkpoint depends on this number (it is part
    of the cache key)."""
    return min(2, os.cpu_count() or 1)


def _presets() -> dict[str, Preset]:
    TaskConfig, ModelConfig, WarmupConfig, RLConfig = _configs()
    # The warm-up learns the arithmetic from correct demonstrations (1000 steps), then 100
    # steps on demonstrations of which 30% carry a stray "=" before the end token: the policy
    # keeps the arithmetic and picks up the habit in part of its samples, which the verifier
    # rejects. Removing it is a correction shared by every question, which RL from a binary
    # reward accumulates (see docs/demo.md for why this is the setting).
    default = Preset(
        task=TaskConfig(buckets=(2, 3, 4, 5), test_per_bucket=400),
        model=ModelConfig(hidden=64, layers=4, heads=4, ffn=256),
        warmup=WarmupConfig(
            steps=1000,
            batch_size=128,
            lr=3e-3,
            habit=0.3,
            habit_steps=100,
            habit_lr=1e-3,
            threads=default_warmup_threads(),
        ),
        rl=RLConfig(steps=60, questions=64, samples=8, minibatches=4, lr=1e-4, eval_every=15),
        lrs=DEFAULT_LRS,
    )
    quick = Preset(
        task=replace(default.task, test_per_bucket=200),
        model=default.model,
        warmup=default.warmup,  # same checkpoint (cache key) as the default run
        rl=RLConfig(
            steps=10,
            questions=32,
            samples=8,
            minibatches=2,
            lr=1e-4,
            eval_every=5,
            eval_samples=2,
        ),  # fmt: skip
        lrs=DEFAULT_LRS,
    )
    long = Preset(
        task=default.task,
        model=default.model,
        warmup=default.warmup,  # same checkpoint as the default run
        rl=replace(default.rl, steps=300, eval_every=50),
        lrs=default.lrs,
    )
    # The length setting: the same arithmetic (the default run's first warm-up stage, shared
    # through the cache), then a second stage on demonstrations of which half carry 1 to 6
    # filler tokens ("=") after their digits, which the verifier ignores: correct answers of
    # different lengths with the same content, as a reasoning model's overlong answers (see
    # docs/demo.md).
    length_task = replace(default.task, filler=6)
    length_warmup = replace(default.warmup, habit=0.0, filler=0.5, filler_max=6)
    length = Preset(
        task=length_task, model=default.model, warmup=length_warmup, rl=default.rl,
        lrs=LENGTH_LRS,
    )  # fmt: skip
    length_quick = Preset(
        task=replace(length_task, test_per_bucket=200), model=default.model,
        warmup=length_warmup, rl=quick.rl, lrs=LENGTH_LRS,
    )  # fmt: skip
    return {
        "default": default,
        "quick": quick,
        "long": long,
        "length": length,
        "length_quick": length_quick,
    }


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "discoloss" / "demo"


class _Error(Exception):
    """A bad option: printed as ``discoloss demo: error: ...``, exit status 2."""


def _positive_int(name: str, minimum: int = 1) -> Any:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {v}")
        return v

    return parse


def _positive_float(name: str) -> Any:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not (v > 0 and v < float("inf")):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {text!r}")
        return v

    return parse


def _methods(text: str) -> tuple[str, ...]:
    from discoloss.demo.train import METHODS

    names = tuple(m.strip().lower().replace("-", "_").replace(".", "") for m in text.split(","))
    if not names or any(not m for m in names):
        raise argparse.ArgumentTypeError(
            f"--methods must be a comma-separated list of {', '.join(METHODS)}; got {text!r}"
        )
    bad = [m for m in names if m not in METHODS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"--methods: unknown method {bad[0]!r}; expected a comma-separated list of "
            f"{', '.join(METHODS)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--methods lists a method twice: {text!r}")
    return names


def _lrs(text: str) -> dict[str, float]:
    """``--lr``: one number for every method, or ``method=lr`` pairs (others keep theirs)."""
    from discoloss.demo.train import METHODS

    parse = _positive_float("--lr")
    if "=" not in text:
        v = parse(text)
        return dict.fromkeys(METHODS, v)
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        m = name.strip().lower().replace("-", "_").replace(".", "")
        if not sep or m not in METHODS:
            raise argparse.ArgumentTypeError(
                f"--lr: expected a number or method=lr pairs such as disco=1e-4,grpo=3e-4 "
                f"(methods: {', '.join(METHODS)}); got {text!r}"
            )
        out[m] = parse(value)
    return out


def _lr_list(text: str) -> tuple[float, ...]:
    parse = _positive_float("--sweep-lr")
    values = tuple(parse(t) for t in text.split(","))
    if len(values) < 2 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"--sweep-lr needs at least 2 distinct comma-separated learning rates; got {text!r}"
        )
    return values


def _buckets(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--buckets must be comma-separated digit counts such as 2,3,4; got {text!r}"
        ) from None
    if any(v < 1 or v > 9 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"--buckets must be distinct digit counts between 1 and 9; got {text!r}"
        )
    return tuple(sorted(values))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="discoloss demo",
        description=(
            "DisCO vs GRPO, Dr. GRPO and DAPO, end to end on CPU: a tiny causal LM learns "
            "multi-digit addition (supervised warm-up, cached), then RL from a binary verifier "
            "with each loss from the same checkpoint, same budget and seeds. Writes a table, "
            "PNG plots and a JSON of every number into --out."
        ),
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("demo_out"),
        help="output directory (created; default: ./demo_out)",
    )
    p.add_argument(
        "--methods",
        type=_methods,
        default=None,
        help="comma-separated losses to compare, from disco, disco_b, grpo, "
        "dr_grpo, dapo, drpo, grpo_lp (default: disco,grpo,dr_grpo,dapo; --quick: disco,grpo; "
        "--length: drpo,disco,grpo_lp)",
    )
    p.add_argument(
        "--steps",
        type=_positive_int("--steps"),
        default=None,
        help="RL steps per method (default: 60; --quick: 10)",
    )
    p.add_argument(
        "--seed",
        type=_positive_int("--seed", 0),
        default=0,
        help="seed of the warm-up, the question stream and the sampling (default 0)",
    )
    p.add_argument(
        "--seeds",
        type=_positive_int("--seeds"),
        default=1,
        help="number of seeds, --seed, --seed+1, ... (warm-up per seed, cached); with 2 or "
        "more the table reports the mean over seeds with a 95%% interval across seeds "
        "(default 1)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smaller run, under 3 minutes on 2 cores with the warm-up not cached: DisCO and "
        "GRPO only, 10 RL steps of 32 questions, 200 test questions per bucket (same warm-up "
        "as the default run)",
    )
    p.add_argument(
        "--long",
        action="store_true",
        help="long RL run (300 steps, evaluations every 50) for the entropy and KL "
        "trajectories; about 10 minutes of CPU time per method (about 20 minutes for the four "
        "on 2 idle cores)",
    )
    p.add_argument(
        "--length",
        action="store_true",
        help="the length setting: half of the warm-up's demonstrations carry 1 to 6 filler "
        "tokens that the verifier ignores, so correct answers differ in length; compares DRPO, "
        "DisCO and GRPO with a length-penalised reward and writes length.md and length.png "
        "(held-out pass@1 and the mean length of the correct answers); with --quick, the quick "
        "budget",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where the warm-up checkpoint is cached (default: "
        "$XDG_CACHE_HOME/discoloss/demo or ~/.cache/discoloss/demo)",
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="always train the warm-up, do not read or write the cache",
    )
    p.add_argument(
        "--warmup-steps",
        type=_positive_int("--warmup-steps"),
        default=None,
        help="supervised warm-up steps (default 1000, --quick too: both share the "
        "cached checkpoint)",
    )
    p.add_argument(
        "--warmup-threads",
        type=_positive_int("--warmup-threads"),
        default=None,
        help="torch threads of the warm-up (default: 2, or 1 on a one-core machine); the "
        "checkpoint depends on it, so it is part of the cache key",
    )
    p.add_argument(
        "--buckets",
        type=_buckets,
        default=None,
        help="difficulty buckets: digit counts of the larger operand (default 2,3,4,5)",
    )
    p.add_argument(
        "--test-per-bucket",
        type=_positive_int("--test-per-bucket"),
        default=None,
        help="held-out questions per difficulty bucket (default 400; --quick: 200)",
    )
    p.add_argument(
        "--eval-every",
        type=_positive_int("--eval-every"),
        default=None,
        help="evaluate on the held-out set every N steps (default 15; --quick: 5)",
    )
    p.add_argument(
        "--lr",
        type=_lrs,
        default=None,
        help="RL learning rate (AdamW): one number for every method, or method=lr pairs "
        "(default: each method's value chosen by the sweep, see docs/demo.md)",
    )
    p.add_argument(
        "--sweep-lr",
        type=_lr_list,
        default=None,
        metavar="LR,LR,...",
        help="instead of the comparison: train every method with each of these learning "
        "rates, evaluate on the validation split (disjoint from the test set) and write "
        "sweep.md, sweep.json and sweep.png with the best value per method",
    )
    p.add_argument(
        "--threads",
        type=_positive_int("--threads"),
        default=1,
        help="torch CPU threads (default 1: the model is too small to gain much "
        "from more, and several threads slow down badly on a busy machine); "
        "results are deterministic for a given seed and thread count",
    )
    p.add_argument(
        "--jobs",
        type=_positive_int("--jobs"),
        default=min(2, os.cpu_count() or 1),
        help="worker processes (default: 2, or 1 on a one-core machine): the methods' RL runs "
        "(and the seeds' warm-ups) run in parallel, each worker with --threads threads, "
        "sharing the warm-up through the cache; the numbers are the same as with one process "
        "(--jobs 1)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_dependencies() -> None:
    missing = []
    for mod in ("transformers", "matplotlib", "tqdm"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise _Error(
            f"missing {', '.join(missing)}: the demo needs the 'demo' extra "
            "(pip install -e '.[demo]' in a checkout of discoloss)"
        )


def _param_vector(model: Any) -> Any:
    import torch

    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


def _start(
    preset: Preset, *, seed: int, cache_dir: Path | None, bar: Any = None
) -> tuple[Any, dict[str, Any]]:
    """Warm-up (or load it) for ``seed`` and its held-out evaluation: where every method's RL
    starts. Returns (model, info)."""
    from discoloss.demo.task import test_questions
    from discoloss.demo.train import evaluate, warmup

    model0, winfo = warmup(
        preset.task, preset.model, preset.warmup, seed=seed, cache_dir=cache_dir, progress=bar
    )
    t0 = time.perf_counter()
    initial = evaluate(
        model0, test_questions(preset.task), preset.task, samples=preset.rl.eval_samples, seed=seed
    )
    return model0, {
        "seed": seed,
        "warmup": winfo,
        "initial": initial,
        "initial_eval_seconds": time.perf_counter() - t0,
        "model_parameters": sum(p.numel() for p in model0.parameters()),
    }


def _start_info(preset: Preset, *, seed: int, cache_dir: Path | None) -> dict[str, Any]:
    """:func:`_start` in a worker process: the checkpoint stays in the cache."""
    return _start(preset, seed=seed, cache_dir=cache_dir)[1]


def _rl_method(
    preset: Preset,
    *,
    method: str,
    seed: int,
    cache_dir: Path | None,
    initial: Any,
    model: Any = None,
    bar: Any = None,
) -> dict[str, Any]:
    """RL with ``method`` from the warm-up checkpoint (``model``, restored afterwards, or the
    cached one); returns its history."""
    from discoloss.demo.task import test_questions
    from discoloss.demo.train import LABELS, rl_train, warmup

    if model is None:
        model, _ = warmup(preset.task, preset.model, preset.warmup, seed=seed, cache_dir=cache_dir)
    state0 = copy.deepcopy(model.state_dict())
    before = _param_vector(model)
    hist = rl_train(
        method,
        model,
        preset.task,
        replace(preset.rl, lr=preset.lr(method)),
        seed=seed,
        test_set=test_questions(preset.task),
        initial_eval=initial,
        progress=bar,
    )
    delta = _param_vector(model) - before
    hist["label"] = LABELS[method]
    hist["param_change_norm"] = float(delta.norm())
    hist["params_changed"] = bool((delta != 0).any())
    model.load_state_dict(state0)
    return hist


def _seed_result(info: dict[str, Any], histories: dict[str, Any]) -> dict[str, Any]:
    return {
        "seed": info["seed"],
        "warmup": info["warmup"],
        "initial_eval": info["initial"]._asdict(),
        "initial_eval_seconds": info["initial_eval_seconds"],
        "model_parameters": info["model_parameters"],
        "methods": histories,
    }


def _run_all(
    preset: Preset,
    *,
    methods: Sequence[str],
    seeds: Sequence[int],
    cache_dir: Path | None,
    bar: Any,
    jobs: int,
    threads: int,
) -> list[dict[str, Any]]:
    """Every seed's warm-up, then every (seed, method) RL run; with ``jobs > 1`` (and a cache
    through which the workers share the warm-ups) in worker processes, same numbers."""
    if jobs <= 1 or cache_dir is None:
        runs = []
        for s in seeds:
            model0, info = _start(preset, seed=s, cache_dir=cache_dir, bar=bar)
            histories = {
                m: _rl_method(
                    preset,
                    method=m,
                    seed=s,
                    cache_dir=cache_dir,
                    initial=info["initial"],
                    model=model0,
                    bar=bar,
                )
                for m in methods
            }
            runs.append(_seed_result(info, histories))
        return runs
    calls = [dict(preset=preset, seed=s, cache_dir=cache_dir) for s in seeds]
    # Each warm-up trains with preset.warmup.threads threads: run only as many at once as the
    # jobs' threads allow (one at a time on 2 cores), so that they do not oversubscribe the CPU.
    warmup_jobs = max(1, (jobs * threads) // preset.warmup.threads)
    infos = parallel_map(
        _start_info, calls, jobs=warmup_jobs, threads=threads, bar=bar, desc="warm-ups"
    )
    pairs = [(i, m) for i in range(len(seeds)) for m in methods]
    calls = [
        dict(
            preset=preset,
            method=m,
            seed=infos[i]["seed"],
            cache_dir=cache_dir,
            initial=infos[i]["initial"],
        )
        for i, m in pairs
    ]
    desc = f"RL runs ({min(jobs, len(calls))} processes)"
    hists = parallel_map(_rl_method, calls, jobs=jobs, threads=threads, bar=bar, desc=desc)
    by_seed: list[dict[str, Any]] = [{} for _ in seeds]
    for (i, m), h in zip(pairs, hists):
        by_seed[i][m] = h
    return [_seed_result(info, h) for info, h in zip(infos, by_seed)]


def _seed_digest(r: dict[str, Any]) -> dict[str, Any]:
    """The per-seed detail kept in results.json: final evaluations and reward endpoints."""
    out: dict[str, Any] = {
        "seed": r["seed"],
        "warmup": r["warmup"],
        "initial_eval": r["initial_eval"],
        "methods": {},
    }
    for m, h in r["methods"].items():
        steps = h["steps"]
        tail = max(1, len(steps) // 10)
        out["methods"][m] = {
            "final_eval": h["evals"][-1][1],
            "reward_first": sum(s["reward"] for s in steps[:tail]) / tail,
            "reward_last": sum(s["reward"] for s in steps[-tail:]) / tail,
            "reward": [s["reward"] for s in steps],
            "entropy": [s["entropy"] for s in steps],
            "kl": [s["kl"] for s in steps],
            "evals": h["evals"],
            "seconds": h["seconds"],
        }
    return out


def _pooled(per_seed: Sequence[dict[str, Any]], first: dict[str, Any]) -> dict[str, Any]:
    """Histories for the plots: training curves averaged over seeds, evaluations pooled
    (summed over seeds, so pass@1 is the mean over seeds)."""
    out: dict[str, Any] = {}
    for m, h in first.items():
        steps = []
        for i, s in enumerate(h["steps"]):
            row = dict(s)
            for f in ("reward", "entropy", "kl"):
                row[f] = sum(sr["methods"][m][f][i] for sr in per_seed) / len(per_seed)
            steps.append(row)
        evals = []
        for j, (step, e0) in enumerate(h["evals"]):
            pooled = {k: dict.fromkeys(e0[k], 0) for k in e0}
            for sr in per_seed:
                e = sr["methods"][m]["evals"][j][1]
                for k in e0:
                    for b in e0[k]:
                        pooled[k][b] += e[k][b]
            evals.append((step, pooled))
        out[m] = {**h, "steps": steps, "evals": evals}
    return out


def run(
    preset: Preset,
    *,
    methods: Sequence[str],
    seed: int,
    out: Path,
    cache_dir: Path | None,
    threads: int,
    progress: bool = True,
    command: str = "",
    seeds: int = 1,
    jobs: int = 1,
) -> dict[str, Any]:
    """For each of ``seeds`` seeds (``seed``, ``seed + 1``, ...): warm-up (or load it), then RL
    with each method from the same checkpoint; write results.

    Returns the results dictionary that ``results.json`` holds. Its ``initial_eval`` and
    ``methods`` are the first seed's full run; ``per_seed`` holds every seed's final numbers,
    and with two or more seeds the ``summary`` reports means with intervals across seeds.
    """
    import torch

    from discoloss.demo import report

    bar = progress_factory(progress)

    t_start = time.perf_counter()
    cpu_start = cpu_seconds()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out.mkdir(parents=True, exist_ok=True)
        runs = _run_all(
            preset,
            methods=methods,
            seeds=range(seed, seed + seeds),
            cache_dir=cache_dir,
            bar=bar,
            jobs=jobs,
            threads=threads,
        )
    finally:
        torch.set_num_threads(old_threads)

    import transformers

    first = runs[0]
    winfo = first["warmup"]
    histories = first["methods"]
    results: dict[str, Any] = {
        "command": command,
        "config": {
            "seed": seed,
            "seeds": [r["seed"] for r in runs],
            "methods": list(methods),
            "threads": threads,
            "jobs": jobs,
            "task": asdict(preset.task),
            "model": asdict(preset.model),
            "model_parameters": first["model_parameters"],
            "warmup": asdict(preset.warmup),
            "rl": asdict(preset.rl),
            "lr": {m: preset.lr(m) for m in methods},
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "warmup": winfo,
        "initial_eval": first["initial_eval"],
        "methods": histories,
        "per_seed": [_seed_digest(r) for r in runs],
        "timing": {
            "warmup_seconds": None if winfo["cached"] else winfo["seconds"],
            "warmup_cached": winfo["cached"],
            "warmup_seconds_per_seed": [
                None if r["warmup"]["cached"] else r["warmup"]["seconds"] for r in runs
            ],
            "initial_eval_seconds": first["initial_eval_seconds"],
            "methods_seconds": {m: h["seconds"] for m, h in histories.items()},
            "total_seconds": time.perf_counter() - t_start,
            "total_cpu_seconds": cpu_seconds() - cpu_start,
        },
    }
    table = report.table_markdown(results)
    (out / "table.md").write_text(table + "\n")
    if preset.task.filler:
        (out / "length.md").write_text(report.length_table_markdown(results) + "\n")
        report.write_length_plot(results, out)
    plot_results = results
    if len(runs) > 1:
        plot_results = {**results, "methods": _pooled(results["per_seed"], histories)}
    report.write_plots(plot_results, out)
    results["timing"]["total_seconds"] = time.perf_counter() - t_start
    results["timing"]["total_cpu_seconds"] = cpu_seconds() - cpu_start
    report.write_json(results, out / "results.json")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``discoloss demo``; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # argparse printed the message (or --help)
        return int(exc.code) if isinstance(exc.code, int) else 2
    try:
        _check_dependencies()
        if args.out.exists() and not args.out.is_dir():
            raise _Error(f"--out {str(args.out)!r} exists and is not a directory")
        if args.no_cache and args.cache_dir is not None:
            raise _Error("--no-cache and --cache-dir exclude each other")
        if args.quick and args.long:
            raise _Error("--quick and --long exclude each other")
        if args.length and args.long:
            raise _Error("--length and --long exclude each other")
        name = "quick" if args.quick else "long" if args.long else "default"
        if args.length:
            name = "length_quick" if args.quick else "length"
        preset = _presets()[name]
        rl = preset.rl
        if args.steps is not None:
            rl = replace(rl, steps=args.steps)
        if args.eval_every is not None:
            rl = replace(rl, eval_every=args.eval_every)
        lrs = dict(preset.lrs)
        if args.lr is not None:
            lrs.update(args.lr)
        warm = preset.warmup
        if args.warmup_steps is not None:
            warm = replace(warm, steps=args.warmup_steps)
        if args.warmup_threads is not None:
            warm = replace(warm, threads=args.warmup_threads)
        task = preset.task
        changes: dict[str, Any] = {}
        if args.buckets is not None:
            changes["buckets"] = args.buckets
        if args.test_per_bucket is not None:
            changes["test_per_bucket"] = args.test_per_bucket
        try:
            task = replace(task, **changes)
        except ValueError as exc:
            raise _Error(f"--buckets / --test-per-bucket: {exc}") from None
        preset = Preset(
            task=task, model=preset.model, warmup=warm, rl=rl, lrs=tuple(sorted(lrs.items()))
        )
        threads = args.threads
        cache_dir = None if args.no_cache else (args.cache_dir or _default_cache_dir())
    except _Error as exc:
        print(f"discoloss demo: error: {exc}", file=sys.stderr)
        return 2

    command = "discoloss demo " + " ".join(args_list)
    common: dict[str, Any] = dict(
        methods=args.methods
        or (LENGTH_METHODS if args.length else QUICK_METHODS if args.quick else DEFAULT_METHODS),
        seed=args.seed,
        out=args.out,
        cache_dir=cache_dir,
        threads=threads,
        jobs=args.jobs,
        progress=not args.no_progress,
        command=command.strip(),
    )
    if args.sweep_lr is not None:
        from discoloss.demo.sweep import sweep

        sweep(preset, lrs=args.sweep_lr, **common)
        print((args.out / "sweep.md").read_text())
        return 0
    results = run(preset, seeds=args.seeds, **common)
    print((args.out / "table.md").read_text())
    if args.length:
        print((args.out / "length.md").read_text())
    t = results["timing"]
    print(
        f"wall time {t['total_seconds']:.0f} s (warm-up "
        + ("cached" if t["warmup_cached"] else f"{t['warmup_seconds']:.0f} s")
        + "); results in "
        + str(args.out)
        + ": table.md, results.json, reward.png, entropy.png, kl.png, heldout.png, weights.png"
        + (", length.md, length.png" if args.length else "")
    )
    return 0
