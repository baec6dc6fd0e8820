"""constraint=lagrangian under verl: the loss at a given multiplier (gradient parity through
verl's ppo_loss), the once-per-optimizer-step update with the global KL (micro-batches, DP
ranks, all-reduce) and the checkpoint round trip through the adapter's hooks."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from discoloss.adapters.verl import lagrangian
from discoloss.adapters.verl._hooks import finish_lagrangian_step, lagrangian_options
from verl.workers.utils.losses import ppo_loss
from verl_sim import actor_config, estimate, make_batch, reference, run_update

from discoloss.constraints import LagrangeMultiplier

N = 4


def fixed_multiplier(value: float) -> LagrangeMultiplier:
    m = LagrangeMultiplier(lr=1e3)
    m.value = torch.tensor(value, dtype=torch.float64)
    return m


@pytest.fixture(autouse=True)
def fresh_state() -> Any:
    lagrangian.reset()
    yield
    lagrangian.reset()


@pytest.mark.parametrize(("dp", "micro"), [(1, 4), (2, 4), (2, 8)])
def test_parity_at_a_given_multiplier(dp: int, micro: int) -> None:
    batch = make_batch([N] * 8, seed=5 + dp + micro, kl_scale=0.3)
    estimate(batch, N)
    opts = dict(constraint="lagrangian", delta=1e-3)
    lagrangian.multiplier(lr=1e3).value = torch.tensor(0.7, dtype=torch.float64)
    step = run_update(batch, n=N, dp=dp, questions_per_mini_batch=8, micro=micro, **opts)
    assert len(step.grads) == 1
    grad, logged, rows = step.grads[0], step.metrics[0], step.members[0]
    ref_grad, ref = reference(batch, rows, multiplier=fixed_multiplier(0.7), **opts)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
    assert logged["actor/pg_loss"] == pytest.approx(ref.loss.item(), rel=1e-5, abs=1e-7)
    for key in ("objective", "kl", "penalty"):
        assert logged[f"actor/disco/{key}"] == pytest.approx(
            ref.metrics[key].item(), rel=1e-5, abs=1e-7
        ), key
    assert logged["actor/disco/multiplier"] == pytest.approx(0.7)
    assert abs(ref.penalty.item()) > 1e-4  # the multiplier term really acts
    free_grad, _ = reference(batch, rows, multiplier=fixed_multiplier(0.0), **opts)
    assert not torch.allclose(ref_grad, free_grad, atol=1e-6)
    # the loss only read lambda: it changes after the optimizer step, not inside the loss
    assert float(lagrangian.state().multiplier.value) == 0.7


def test_update_once_per_optimizer_step_with_the_global_kl() -> None:
    """Two mini-batches (optimizer steps) of 2 DP ranks x 2 micro-batches: after each, one
    update with the mini-batch KL (the shares of all micro-batches and ranks), and the next
    mini-batch's loss uses the new lambda."""
    batch = make_batch([N] * 16, seed=21, kl_scale=0.3)
    estimate(batch, N)
    lr, delta = 50.0, 1e-3
    opts = dict(constraint="lagrangian", delta=delta, lagrangian_lr=lr)
    seen: list[tuple[float, float]] = []

    def after() -> None:  # the wrapper of TrainingWorker.train_batch, one process for all ranks
        before = float(lagrangian.state().multiplier.value)
        kl = lagrangian.finish_step(delta=delta, group=None)
        seen.append((before, float(kl)))

    step = run_update(
        batch, n=N, dp=2, questions_per_mini_batch=8, micro=4, after_mini_batch=after, **opts
    )
    assert len(step.grads) == 2 and len(seen) == 2
    lam = 0.0
    for (before, kl), grad, logged, rows in zip(seen, step.grads, step.metrics, step.members):
        core = {k: v for k, v in opts.items() if k != "lagrangian_lr"}
        ref_grad, ref = reference(batch, rows, multiplier=fixed_multiplier(lam), **core)
        assert before == pytest.approx(lam, rel=1e-5)
        assert logged["actor/disco/multiplier"] == pytest.approx(lam, rel=1e-5)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)
        assert kl == pytest.approx(ref.kl.item(), rel=1e-5)  # the global mini-batch KL
        lam = max(0.0, lam + lr * (ref.kl.item() - delta))
    assert lam > 0.0  # the constraint was violated: the multiplier moved
    assert float(lagrangian.state().multiplier.value) == pytest.approx(lam, rel=1e-5)
    assert lagrangian.state().multiplier.steps == 2
    assert lagrangian.state().pending is None


def test_non_finite_kl_keeps_the_multiplier() -> None:
    m = lagrangian.multiplier(lr=10.0)
    m.value = torch.tensor(0.5, dtype=torch.float64)
    lagrangian.record_kl_share(torch.tensor(float("nan")))
    lagrangian.finish_step(delta=0.0)
    assert float(m.value) == 0.5
    assert lagrangian.finish_step(delta=0.0) is not None  # no pending share: KL 0
    assert float(m.value) == 0.5
    lagrangian.reset()
    assert lagrangian.finish_step(delta=0.0) is None  # no DisCO loss ran in this process


def _worker(config: Any, group: Any = None) -> Any:
    engine = SimpleNamespace(
        get_data_parallel_group=lambda: group,
        save_checkpoint=lambda *a, **k: None,
        load_checkpoint=lambda *a, **k: None,
    )
    return SimpleNamespace(loss_fn=functools.partial(ppo_loss, config=config), engine=engine)


def _rank(rank: int, world: int, init: str, shares: list[list[float]], out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        lagrangian.reset()
        config = actor_config(N, micro=4, constraint="lagrangian", delta=0.01, lagrangian_lr=20.0)
        worker = _worker(config, group=dist.group.WORLD)
        lagrangian.multiplier(lr=20.0)
        for share in shares[rank]:  # the micro-batch losses of this rank
            lagrangian.record_kl_share(torch.tensor(share, dtype=torch.float64))
        finish_lagrangian_step(worker)
        saved = lagrangian.save_state(f"{out}/ckpt")  # the last global rank writes
        state = dict(lagrangian.state().multiplier.state_dict(), saved=saved is not None)
        torch.save(state, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_update_all_reduces_over_dp_ranks(tmp_path: Path) -> None:
    """Two real processes (gloo): each rank's shares differ, both take the same step with the
    summed (global) KL, through the adapter's hook of TrainingWorker.train_batch."""
    shares = [[0.010, 0.015], [0.020, 0.005]]
    with tempfile.NamedTemporaryFile(delete=False) as f:
        init = f"file://{f.name}"
    os.unlink(f.name)
    mp.spawn(_rank, args=(2, init, shares, str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    expected = max(0.0, 20.0 * (sum(map(sum, shares)) - 0.01))
    for s in states:
        assert float(s["value"]) == pytest.approx(expected, rel=1e-9)
        assert s["steps"] == 1
    assert [s["saved"] for s in states] == [False, True]
    on_disk = torch.load(tmp_path / "ckpt" / lagrangian.STATE_FILE, weights_only=True)
    assert float(on_disk["value"]) == pytest.approx(expected, rel=1e-9)
    assert expected != pytest.approx(max(0.0, 20.0 * (sum(shares[0]) - 0.01)))  # not local


def test_checkpoint_round_trip_through_the_worker_hooks(tmp_path: Path) -> None:
    from verl.workers.engine_workers import TrainingWorker

    for fn in (TrainingWorker.train_batch, TrainingWorker.save_checkpoint):
        assert getattr(fn, "__discoloss__", False), "the adapter's worker hook is not installed"
    config = actor_config(N, micro=4, constraint="lagrangian", lagrangian_lr=7.0)
    worker = _worker(config)
    assert lagrangian_options(worker) is not None
    m = lagrangian.multiplier(lr=7.0)
    m.update(torch.tensor(0.3), delta=0.1)
    saved_value, saved_steps = float(m.value), m.steps
    folder = tmp_path / "global_step_3" / "actor"
    TrainingWorker.save_checkpoint(worker, str(folder), None, 3, None)
    assert (folder / lagrangian.STATE_FILE).is_file()

    lagrangian.reset()  # a fresh worker process resuming
    TrainingWorker.load_checkpoint(worker, str(folder))
    restored = lagrangian.state().multiplier
    assert float(restored.value) == pytest.approx(saved_value) and saved_value > 0
    assert restored.steps == saved_steps and restored.lr == 7.0

    # other losses neither write nor read the file
    other = _worker(actor_config(N, micro=4, constraint="squared_hinge"))
    assert lagrangian_options(other) is None
    TrainingWorker.save_checkpoint(other, str(tmp_path / "other"), None, 3, None)
    assert not (tmp_path / "other" / lagrangian.STATE_FILE).exists()


def test_forward_only_pass_leaves_the_step_kl_untouched() -> None:
    """verl's infer_batch with compute_loss=True runs the loss without an optimizer step: the
    adapter's hook drops the KL shares it records."""
    from contextlib import nullcontext

    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import TrainingWorker

    assert getattr(TrainingWorker.infer_batch, "__discoloss__", False)
    lagrangian.multiplier(lr=1.0)
    lagrangian.record_kl_share(torch.tensor(0.25, dtype=torch.float64))

    def engine_infer(data: Any, loss_function: Any = None) -> None:
        assert loss_function is not None
        lagrangian.record_kl_share(torch.tensor(0.5, dtype=torch.float64))  # the loss ran

    worker = _worker(actor_config(N, micro=4, constraint="lagrangian"))
    worker.model_config = {}
    worker.engine_config = SimpleNamespace(
        use_dynamic_bsz=False,
        infer_max_token_len_per_gpu=1,
        infer_micro_batch_size_per_gpu=1,
        use_fused_kernels=False,
    )
    worker.engine.eval_mode = lambda **kwargs: nullcontext()
    worker.engine.infer_batch = engine_infer
    worker.engine.is_mp_src_rank_with_outputs = lambda: False
    data = TensorDict({"x": torch.zeros(2)}, batch_size=[2])
    tu.assign_non_tensor(data, global_token_num=[1, 1], compute_loss=True)
    TrainingWorker.infer_batch(worker, data)
    assert float(lagrangian.state().pending) == 0.25
