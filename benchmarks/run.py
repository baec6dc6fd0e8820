"""Benchmark suite: discoloss.disco_loss against the published loss and GRPO.

    python -m benchmarks.run                       # full suite on the default device
    python -m benchmarks.run --quick               # small sizes, a smoke test of the command
    python -m benchmarks.run --device cuda --out benchmarks/out

For every (B, T, dtype) it builds one batch (B responses in groups of 8, T tokens), then times
forward+backward of each loss in interleaved rounds (A, B, C, then B, C, A, ...) in the same
process, and reports median times and the median of the per-round ratios, which is robust to
other load on the machine. Peak extra memory of one forward+backward is measured separately
(see :mod:`benchmarks.measure`). The memory-bandwidth floor of the loss is one read of the two
log-prob tensors and the mask and one write of the gradient; "x floor" is the measured time over
floor bytes / measured copy bandwidth of the device.

Losses compared (all with their defaults, binary rewards, groups of 8):
  disco      discoloss.disco_loss (log-likelihood score, DisCO objective, k1 KL, validate=True)
  reference  benchmarks.reference.reference_disco_loss, the published code's pattern
  grpo       discoloss.baselines.grpo_loss (clipped ratio surrogate, verl-style aggregation)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import itertools
import json
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.measure import (
    Inputs,
    floor_bytes,
    make_inputs,
    median,
    peak_bandwidth,
    peak_extra_memory,
    time_call,
)
from benchmarks.reference import reference_disco_loss

__all__ = ["main"]

FULL_BATCHES = (256, 1024, 4096)
FULL_TOKENS = (1024, 4096, 16384)
QUICK_SIZES = ((64, 256), (256, 1024))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
METHODS = ("disco", "reference", "grpo")
CPU_TARGET = {"batch": 1024, "tokens": 4096, "dtype": "float32", "time_ratio": 0.5}
GPU_TARGET = {"min_tokens": 8 * 2**20, "floor_factor": 2.0}
MiB = 2**20


def _disco(score: str) -> Callable[[Inputs], Tensor]:
    from discoloss import disco_loss

    def f(x: Inputs) -> Tensor:
        return disco_loss(
            x.log_probs,
            x.old_log_probs,
            x.mask,
            x.rewards,
            x.group_ids,
            score=score,  # type: ignore[arg-type]
        ).loss

    return f


def _reference(score: str) -> Callable[[Inputs], Tensor]:
    def f(x: Inputs) -> Tensor:
        return reference_disco_loss(
            x.log_probs,
            x.old_log_probs,
            x.mask_float,
            x.rewards,
            x.group_ids,
            group_size=x.group_size,
            score=score,  # type: ignore[arg-type]
        ).loss

    return f


def _grpo(score: str) -> Callable[[Inputs], Tensor]:
    try:
        from discoloss.baselines import grpo_loss
    except ImportError as e:  # pragma: no cover - depends on the installed package
        raise SystemExit(
            "benchmarks: discoloss.baselines.grpo_loss is not available "
            f"({e}); install the full package or pass --methods disco,reference"
        ) from e

    def f(x: Inputs) -> Tensor:
        return grpo_loss(x.log_probs, x.old_log_probs, x.mask, x.rewards, x.group_ids).loss

    return f


LOSSES: dict[str, Callable[[str], Callable[[Inputs], Tensor]]] = {
    "disco": _disco,
    "reference": _reference,
    "grpo": _grpo,
}


@dataclass
class Row:
    """Results of one (device, dtype, B, T) configuration."""

    device: str
    dtype: str
    batch: int
    tokens: int
    rounds: int = 0
    time_ms: dict[str, float] = field(default_factory=dict)  # median per method
    ratio: dict[str, float] = field(default_factory=dict)  # median of per-round disco/other
    cpu_ratio: dict[str, float] = field(default_factory=dict)  # the same on process CPU time
    peak_mib: dict[str, float] = field(default_factory=dict)
    floor_ms: float = float("nan")  # floor bytes / measured copy bandwidth
    skipped: str = ""


def estimated_bytes(batch: int, tokens: int, dtype: torch.dtype) -> int:
    """Generous upper estimate of what one configuration holds at its peak: the inputs (two
    log-prob tensors, a bool and a float mask, the gradient) plus a dozen float32-sized
    temporaries of the reference-style loss."""
    item = torch.empty((), dtype=dtype).element_size()
    n = batch * tokens
    return n * (4 * item + 1) + n * 12 * max(item, 4)


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pages = os.sysconf("SC_AVPHYS_PAGES")
        return int(pages * os.sysconf("SC_PAGE_SIZE"))


def bench_config(
    row: Row,
    losses: dict[str, Callable[[Inputs], Tensor]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    bandwidth: float,
    min_rounds: int,
    max_rounds: int,
    min_time: float,
) -> None:
    """Fill ``row`` in place: memory once per loss, then interleaved timing rounds."""
    inputs = make_inputs(row.batch, row.tokens, dtype=dtype, device=device)
    names = list(losses)
    for name in names:  # warm-up (first-call allocations, lazy initialisation)
        time_call(losses[name], inputs)
    for name in names:
        row.peak_mib[name] = peak_extra_memory(losses[name], inputs) / MiB
    times: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    spent = 0.0
    r = 0
    while r < max_rounds and (r < min_rounds or spent < min_time):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t, c = time_call(losses[name], inputs)
            times[name].append(t)
            cpu[name].append(c)
            spent += t
        r += 1
    inputs.log_probs.grad = None
    del inputs
    row.rounds = r
    row.time_ms = {n: 1e3 * median(times[n]) for n in names}
    if "disco" in names:
        for other in names:
            if other != "disco":
                row.ratio[other] = median(
                    [a / b for a, b in zip(times["disco"], times[other], strict=True)]
                )
                row.cpu_ratio[other] = median(
                    [a / max(b, 1e-9) for a, b in zip(cpu["disco"], cpu[other], strict=True)]
                )
    row.floor_ms = 1e3 * floor_bytes(row.batch, row.tokens, dtype) / bandwidth


def _fmt(x: float | None, spec: str = ".1f") -> str:
    if x is None or x != x:
        return "-"
    return format(x, spec)


def tables_markdown(rows: Sequence[Row], methods: Sequence[str]) -> str:
    """One table per (device, dtype)."""
    out: list[str] = []
    others = [m for m in methods if m != "disco"]
    keys = sorted({(r.device, r.dtype) for r in rows}, key=lambda k: (k[0], k[1] != "float32"))
    for device, dtype in keys:
        out.append(f"### {device}, {dtype}\n")
        head = ["B", "T", "B*T"]
        head += [f"{m} ms" for m in methods]
        if "disco" in methods:
            head += [f"disco/{m} time" for m in others]
            if device == "cpu":
                head += [f"disco/{m} cpu-time" for m in others]
        head += [f"{m} MiB" for m in methods]
        if "disco" in methods:
            head += [f"disco/{m} mem" for m in others]
            head += ["floor ms", "disco x floor"]
        head += ["rounds"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join("---:" for _ in head) + "|")
        for r in rows:
            if (r.device, r.dtype) != (device, dtype):
                continue
            cells = [str(r.batch), str(r.tokens), f"{r.batch * r.tokens / 2**20:g}M"]
            if r.skipped:
                cells.append(f"skipped: {r.skipped}")
                cells += [""] * (len(head) - len(cells))
                out.append("| " + " | ".join(cells) + " |")
                continue
            cells += [_fmt(r.time_ms.get(m)) for m in methods]
            if "disco" in methods:
                cells += [_fmt(r.ratio.get(m), ".2f") for m in others]
                if device == "cpu":
                    cells += [_fmt(r.cpu_ratio.get(m), ".2f") for m in others]
            cells += [_fmt(r.peak_mib.get(m)) for m in methods]
            if "disco" in methods:
                d = r.peak_mib.get("disco")
                cells += [
                    _fmt(d / r.peak_mib[m] if d is not None and r.peak_mib.get(m) else None, ".2f")
                    for m in others
                ]
                cells += [_fmt(r.floor_ms), _fmt(r.time_ms["disco"] / r.floor_ms, ".1f")]
            cells.append(str(r.rounds))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def target_lines(rows: Sequence[Row]) -> list[str]:
    """The issue's targets, checked against the measured rows."""
    lines: list[str] = []
    for r in rows:
        if r.skipped or r.device != "cpu":
            continue
        if (r.batch, r.tokens, r.dtype) != (
            CPU_TARGET["batch"],
            CPU_TARGET["tokens"],
            CPU_TARGET["dtype"],
        ):
            continue
        if "reference" in r.ratio:
            ok = r.ratio["reference"] <= CPU_TARGET["time_ratio"]
            lines.append(
                f"CPU B=1024 T=4096 float32: disco/reference time {r.ratio['reference']:.2f} "
                f"(target <= {CPU_TARGET['time_ratio']}): {'MET' if ok else 'MISSED'}"
            )
        if "grpo" in r.peak_mib and "disco" in r.peak_mib:
            d, g = r.peak_mib["disco"], r.peak_mib["grpo"]
            ok = d <= g
            lines.append(
                f"CPU B=1024 T=4096 float32: disco peak extra memory {d:.1f} MiB vs GRPO "
                f"{g:.1f} MiB (target <= GRPO): {'MET' if ok else 'MISSED'}"
            )
    for r in rows:
        if r.skipped or r.device == "cpu" or "disco" not in r.time_ms:
            continue
        if r.batch * r.tokens < GPU_TARGET["min_tokens"]:
            continue
        x = r.time_ms["disco"] / r.floor_ms
        ok = x <= GPU_TARGET["floor_factor"]
        lines.append(
            f"{r.device} B={r.batch} T={r.tokens} {r.dtype}: disco at {x:.2f}x the bandwidth "
            f"floor (target <= {GPU_TARGET['floor_factor']}x): {'MET' if ok else 'MISSED'}"
        )
    if not lines:
        lines.append("no configuration of this run is covered by a target")
    return lines


def environment(device: torch.device, bandwidth: float) -> dict[str, Any]:
    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "copy_bandwidth_GBps": round(bandwidth / 1e9, 2),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "command": "python -m benchmarks.run " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def plot(rows: Sequence[Row], methods: Sequence[str], path: Path) -> bool:
    """Time and peak memory against B*T (log-log), one line per loss and dtype."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("benchmarks: matplotlib is not installed; no plot written", file=sys.stderr)
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"float32": "-", "bfloat16": "--", "float16": ":"}
    colors = {"disco": "C0", "reference": "C3", "grpo": "C2"}
    keys = sorted({(r.device, r.dtype) for r in rows if not r.skipped})
    for device, dtype in keys:
        sel = sorted(
            (r for r in rows if (r.device, r.dtype) == (device, dtype) and not r.skipped),
            key=lambda r: (r.batch * r.tokens, r.batch),
        )
        if not sel:
            continue
        n = [r.batch * r.tokens for r in sel]
        for m in methods:
            label = f"{m} ({device}, {dtype})"
            ls = styles.get(dtype, "-")
            ax_t.plot(n, [r.time_ms[m] for r in sel], ls, marker="o", color=colors[m], label=label)
            ax_m.plot(n, [r.peak_mib[m] for r in sel], ls, marker="o", color=colors[m], label=label)
        ax_t.plot(n, [r.floor_ms for r in sel], ls, color="0.5", label=f"bandwidth floor ({dtype})")
        item = torch.empty((), dtype=DTYPES[dtype]).element_size()
        ax_m.plot(n, [x * item / MiB for x in n], ls, color="0.5", label=f"gradient size ({dtype})")
    for ax, ylabel in ((ax_t, "forward+backward time (ms)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("B*T (token positions)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.legend(fontsize=7)
    fig.suptitle("disco_loss vs the published loss and GRPO: scaling with B*T")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """ "256x1024,1024x4096" -> [(256, 1024), (1024, 4096)]."""
    sizes = []
    for part in text.split(","):
        try:
            b, t = part.lower().split("x")
            sizes.append((int(b), int(t)))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--sizes: expected BxT[,BxT...] such as 1024x4096, got {part!r}"
            ) from None
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--quick", action="store_true", help="small sizes and few rounds (smoke test)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=None,
        help="BxT list, e.g. 1024x4096,4096x16384 (default: B in 256,1024,4096 x T in 1k,4k,16k)",
    )
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (default: %(default)s)")
    p.add_argument(
        "--score", choices=("log_likelihood", "likelihood_ratio"), default="log_likelihood"
    )
    p.add_argument("--min-rounds", type=int, default=None, help="timing rounds at least")
    p.add_argument("--max-rounds", type=int, default=None, help="timing rounds at most")
    p.add_argument("--min-time", type=float, default=None, help="timing seconds per size, at least")
    p.add_argument("--out", type=Path, default=None, help="folder for results.md/json, scaling.png")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = args.sizes or list(QUICK_SIZES)
        args.min_rounds = args.min_rounds or 3
        args.max_rounds = args.max_rounds or 5
        args.min_time = 0.0 if args.min_time is None else args.min_time
    else:
        args.sizes = args.sizes or list(itertools.product(FULL_BATCHES, FULL_TOKENS))
        args.min_rounds = args.min_rounds or 5
        args.max_rounds = args.max_rounds or 30
        args.min_time = 3.0 if args.min_time is None else args.min_time
    for d in args.dtypes.split(","):
        if d not in DTYPES:
            p.error(f"--dtypes: unknown dtype {d!r}; expected some of {', '.join(DTYPES)}")
    for m in args.methods.split(","):
        if m not in LOSSES:
            p.error(f"--methods: unknown loss {m!r}; expected some of {', '.join(METHODS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available in this PyTorch build/machine")
    methods = [m for m in METHODS if m in args.methods.split(",")]
    losses = {m: LOSSES[m](args.score) for m in methods}
    dtypes = args.dtypes.split(",")

    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None

    bandwidth = peak_bandwidth(device, nbytes=(1 << 30) if device.type == "cuda" else (1 << 28))
    env = environment(device, bandwidth)
    print("# discoloss benchmarks\n")
    for k, v in env.items():
        print(f"- {k}: {v}")
    print()

    configs = [(dt, b, t) for dt in dtypes for b, t in args.sizes]
    rows: list[Row] = []
    bar = tqdm(configs, desc="benchmarks", unit="size") if tqdm else configs
    for dt, b, t in bar:
        row = Row(device=device.type, dtype=dt, batch=b, tokens=t)
        if tqdm:
            bar.set_postfix_str(f"{dt} B={b} T={t}")
        need = estimated_bytes(b, t, DTYPES[dt])
        have = available_bytes(device)
        if need > 0.7 * have:
            row.skipped = f"needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"
        else:
            bench_config(
                row,
                losses,
                device=device,
                dtype=DTYPES[dt],
                bandwidth=bandwidth,
                min_rounds=args.min_rounds,
                max_rounds=args.max_rounds,
                min_time=args.min_time,
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]

    tables = tables_markdown(rows, methods)
    targets = target_lines(rows)
    text = (
        tables
        + "\nTargets:\n\n"
        + "\n".join(f"- {line}" for line in targets)
        + f"\n\nLoad average at the end: {env['load_avg_end']}\n"
    )
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        header = "\n".join(f"- {k}: {v}" for k, v in env.items())
        (args.out / "results.md").write_text(f"# discoloss benchmarks\n\n{header}\n\n{text}")
        (args.out / "results.json").write_text(
            json.dumps({"environment": env, "rows": [asdict(r) for r in rows]}, indent=1)
        )
        if plot(rows, methods, args.out / "scaling.png"):
            print(f"wrote {args.out / 'results.md'}, results.json, scaling.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
