"""A bad value on one rank: the DisCO loss inside a (simulated) verl worker pass, 2 processes
over gloo. Nothing raises inside the loss; after the pass both ranks raise the same error,
and the DP-reduced gradient is non-finite on both (verl skips the optimizer step). The real
``main_ppo`` run of this case is in test_verl_e2e.py."""

from __future__ import annotations

import os
import socket
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from discoloss.adapters.verl import DiscoLayoutError, compute_policy_loss_disco, faults
from verl_sim import actor_config, estimate, make_batch

N = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, bad_rank: int, out: Any) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        batch = make_batch([N] * world, seed=3, shuffle=False)  # same batch on every rank
        # the bad rank's question has no signal: its loss does not depend on its tokens, so a
        # NaN must be injected into the gradient, not only into the loss value
        batch.rewards[bad_rank * N : (bad_rank + 1) * N] = 0.0
        estimate(batch, N)
        rows = slice(rank * N, (rank + 1) * N)  # rank r: question r, whole
        theta = batch.theta[rows].clone().requires_grad_(True)
        old = batch.old[rows].clone()
        mask = batch.mask[rows]
        if rank == bad_rank:
            old[1, 0] = float("nan")
        cfg = actor_config(N, micro=N)
        cfg.global_batch_info.update(
            dp_size=world, batch_num_tokens=int(batch.mask.sum()), global_batch_size=N * world
        )
        with faults.deferring() as collected:
            loss, _ = compute_policy_loss_disco(  # no raise here, on any rank
                old_log_prob=old,
                log_prob=torch.nn.functional.logsigmoid(theta),
                advantages=batch.advantages[rows],
                response_mask=mask,
                config=cfg,
            )
            loss.backward()
            grad = theta.grad.clone()
            dist.all_reduce(grad)  # what FSDP's reduction does with the gradients
        message = None
        try:
            faults.check_pass(collected)
        except DiscoLayoutError as e:
            message = str(e)
        out.put((rank, bool(torch.isfinite(loss)), bool(torch.isfinite(grad).all()), message))
    finally:
        dist.destroy_process_group()


def test_one_rank_fault_raises_on_every_rank_after_the_pass() -> None:
    world, bad_rank = 2, 1
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, bad_rank, out)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results = {}
    for _ in range(world):
        rank, loss_ok, grad_ok, message = out.get(timeout=120)
        results[rank] = (loss_ok, grad_ok, message)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0][0] and not results[1][0]  # only the bad rank's loss is NaN
    assert not results[0][1] and not results[1][1]  # the reduced gradient: NaN on both
    head = (
        "DisCO loss checks failed on 1 of 2 rank(s) (rank 1: a non-finite "
        "log_prob/old_log_prob at a response token (1 micro-batch))"
    )
    for rank in (0, 1):
        assert results[rank][2] is not None and results[rank][2].startswith(head), results
    assert "This rank: log_prob/old_log_prob: non-finite value" in results[1][2]
    assert "This rank" not in results[0][2]
