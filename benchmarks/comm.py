"""Communication per loss call: discoloss's cross-rank mode vs the published all-gather pattern.

Both sides run in the same processes (gloo on CPU, ``--world`` ranks), interleaved A, B, A, B,
with medians. Each rank holds B / world responses of T tokens.

* discoloss: ``disco_loss(..., process_group=group)``: per-response scalars only.
* published pattern (DESIGN.md section 6): all-gather the token-level log-probs (with autograd),
  old log-probs and mask of every rank, then compute the loss on the gathered batch.

Bytes are what each rank passes to ``all_gather`` (recorded by wrapping the collective), so
they are exact; times are forward + backward wall time per call, including the loss compute.

    python benchmarks/comm.py                 # B in {256, 1024, 4096}, T in {1k, 8k, 32k}
    python benchmarks/comm.py --quick         # small sizes, seconds
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from discoloss import disco_loss

GROUP = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Recorder:
    """Wraps the collectives both sides use, counting calls and the bytes this rank sends."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0
        self._real = {"all_gather": dist.all_gather, "scatter": dist.scatter}

    def __enter__(self) -> Recorder:
        real_gather, real_scatter = self._real["all_gather"], self._real["scatter"]

        def all_gather(tensor_list, tensor, group=None, async_op=False):  # type: ignore[no-untyped-def]
            self.calls += 1
            self.bytes += tensor.numel() * tensor.element_size()
            return real_gather(tensor_list, tensor, group=group, async_op=async_op)

        def scatter(tensor, scatter_list=None, src=0, group=None, async_op=False):  # type: ignore[no-untyped-def]
            # the backward of torch's autograd all_gather on gloo: one scatter per rank
            if scatter_list is not None:
                self.calls += 1
                self.bytes += sum(x.numel() * x.element_size() for x in scatter_list)
            return real_scatter(tensor, scatter_list, src, group=group, async_op=async_op)

        dist.all_gather = all_gather
        dist.scatter = scatter
        return self

    def __exit__(self, *exc: object) -> None:
        dist.all_gather = self._real["all_gather"]
        dist.scatter = self._real["scatter"]


def published_bytes(n: int, t: int, world: int) -> int:
    """Bytes one rank sends in the published pattern: log-probs, old log-probs and mask
    (float32) and rewards (float32) and ids (int64) forward; the log-prob gradient (one slice
    per rank) backward."""
    return n * t * (4 + 4 + 4) + n * (4 + 8) + world * n * t * 4


def shard(rank: int, world: int, b: int, t: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1000 + rank)
    n = b // world
    lp = -torch.rand(n, t, generator=g)
    old = lp + 0.01 * torch.randn(n, t, generator=g)
    lengths = torch.randint(t // 4, t + 1, (n,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    rewards = torch.randint(0, 2, (n,), generator=g).float()
    group_ids = (torch.arange(n) + rank * n) // GROUP
    return lp, old, mask, rewards, group_ids


def gather_tokens(x: torch.Tensor, world: int) -> torch.Tensor:
    """The published pattern: all-gather a token tensor (autograd through torch's helper)."""
    if x.requires_grad:
        import torch.distributed.nn.functional as dnn

        return torch.cat(dnn.all_gather(x), dim=0)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=0)


def run_discoloss(lp: torch.Tensor, old, mask, rewards, group_ids, world: int) -> None:
    x = lp.detach().requires_grad_()
    out = disco_loss(x, old, mask, rewards, group_ids, process_group=dist.group.WORLD)
    out.loss.backward()


def run_published(lp: torch.Tensor, old, mask, rewards, group_ids, world: int) -> None:
    x = lp.detach().requires_grad_()
    full_lp = gather_tokens(x, world)
    full_old = gather_tokens(old, world)
    full_mask = gather_tokens(mask.to(torch.float32), world).bool()
    full_rewards = gather_tokens(rewards, world)
    full_ids = gather_tokens(group_ids, world)
    out = disco_loss(full_lp, full_old, full_mask, full_rewards, full_ids)
    out.loss.backward()


def measure(fn: Callable[..., None], args: tuple, world: int) -> tuple[float, int, int]:
    dist.barrier()
    with Recorder() as rec:
        t0 = time.perf_counter()
        fn(*args, world)
        dist.barrier()
        elapsed = time.perf_counter() - t0
    return elapsed, rec.bytes, rec.calls


def _worker(rank: int, world: int, port: int, configs, reps: int, out: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    it = configs
    if rank == 0:
        from tqdm import tqdm

        it = tqdm(configs, desc="comm benchmark", file=sys.stderr)
    for b, t, timed in it:
        args = shard(rank, world, b, t)
        res: dict[str, list] = {"discoloss": [], "published": []}
        nrep = reps if timed else 1
        for _ in range(nrep):  # interleaved A, B, A, B
            res["discoloss"].append(measure(run_discoloss, args, world))
            if timed:
                res["published"].append(measure(run_published, args, world))
        if not timed:  # too large to run: the published bytes follow from the shapes
            n = b // world
            res["published"].append((float("nan"), published_bytes(n, t, world), 6))
        else:
            expected = published_bytes(b // world, t, world)
            assert res["published"][0][1] == expected, (res["published"][0][1], expected)
        rows.append(
            dict(
                B=b,
                T=t,
                timed=timed,
                disco_bytes=res["discoloss"][0][1],
                disco_calls=res["discoloss"][0][2],
                disco_s=statistics.median(r[0] for r in res["discoloss"]),
                pub_bytes=res["published"][0][1],
                pub_calls=res["published"][0][2],
                pub_s=statistics.median(r[0] for r in res["published"]),
            )
        )
        del args
    if rank == 0:
        torch.save(rows, out)
    dist.destroy_process_group()


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def table(rows: list[dict], world: int) -> str:
    lines = [
        f"world = {world} ranks (gloo, CPU); bytes = sent by one rank per call (forward + "
        "backward); time = median forward+backward per call",
        "",
        "| B | T | discoloss bytes | published bytes | bytes ratio (pub / disco) "
        "| discoloss ms | published ms | time ratio (pub / disco) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio_b = r["pub_bytes"] / r["disco_bytes"]
        if r["timed"]:
            t_pub = f"{1e3 * r['pub_s']:.1f}"
            ratio_t = f"{r['pub_s'] / r['disco_s']:.1f}x"
        else:
            t_pub, ratio_t = "not run (memory)", "-"
        lines.append(
            f"| {r['B']} | {r['T']} | {human(r['disco_bytes'])} | {human(r['pub_bytes'])} "
            f"| {ratio_b:,.0f}x | {1e3 * r['disco_s']:.1f} | {t_pub} | {ratio_t} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="number of ranks (default 2)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    p.add_argument("--quick", action="store_true", help="small sizes only")
    p.add_argument(
        "--max-tokens",
        type=float,
        default=4096 * 8192,
        help="largest B*T whose published pattern is actually run (default 32M); larger "
        "sizes report the published bytes from the shapes",
    )
    p.add_argument("--out", default=None, help="write the markdown table to this file")
    args = p.parse_args(argv)
    bs, ts = ([64, 256], [128, 1024]) if args.quick else ([256, 1024, 4096], [1024, 8192, 32768])
    configs = [(b, t, b * t <= args.max_tokens) for b in bs for t in ts]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.pt")
        mp.spawn(
            _worker,
            args=(args.world, _free_port(), configs, args.reps, out),
            nprocs=args.world,
            join=True,
        )
        rows = torch.load(out)
    text = table(rows, args.world)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
