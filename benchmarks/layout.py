"""verl's real actor update at any micro-batch layout: peak memory, update time and the drift
of ``weights=sampling``, on the CPU.

    python -m benchmarks.layout                  # full run (6 to 8 minutes on 2 cores)
    python -m benchmarks.layout --quick          # seconds: a smoke test of the command
    python -m benchmarks.layout --out DIR        # also results.md, results.json, layout_memory.png
    python -m benchmarks.layout --sections time --threads 1

Needs the verl extra (``pip install -e ".[verl]"``; ``.[bench]`` adds the plot and the progress
bar) and a checkout of the repository: verl runs on the CPU through the test suite's ``cpu``
platform (``tests/verl/verl_cpu.py``), loaded the way the end-to-end tests load it
(``VERL_USE_EXTERNAL_MODULES``). What runs is verl 0.9's own actor update, in this process and
without Ray: verl's ``TrainingWorker`` (the class the actor worker and verl's SFT trainer
build) with its FSDP2 engine in a one-process gloo group, a random Qwen2 built from a config,
gradient checkpointing, bfloat16 mixed precision (verl's defaults), padded micro-batches
(``use_remove_padding=false``: the padding-free path needs flash-attn). Each update is one call
of ``TrainingWorker.train_mini_batch`` (verl's mini-batch loop, micro-batching, optimizer steps,
and the adapter's wrappers of ``train_batch`` / ``train_mini_batch``) with the ``disco`` policy
loss (``weights`` = ``current``, ``sampling`` or ``micro_batch``) or verl's ``vanilla`` policy
loss with GRPO advantages (verl's ``grpo`` estimator), on the same rows. The old log-probs are
computed by the same worker's ``infer_batch`` at the parameters the update starts from, as
verl's ``compute_log_prob`` does, and the update is told so (the first mini-batch's stats of
``current`` are then free, as in a v1-trainer run).

Sections (``--sections``, default all three):

* **memory**: peak memory of one update, whole-question micro-batches of n responses
  (``weights=micro_batch``, the only layout that mode allows) against smaller micro-batches
  (``weights=current`` at every divisor of n, ``sampling`` and GRPO at 1 and n) on the same
  rows, with long responses and a small model so that activations dominate. PyTorch keeps no
  CPU allocator statistics: the peak is read from the allocator events of
  ``torch.profiler.profile(profile_memory=True)`` (:func:`benchmarks.measure.
  profiled_peak_bytes`), the high-water mark of the memory allocated during the update over
  what was allocated when it started (parameters and optimizer state exist from a warm-up
  update; the gradients are freed and allocated again by each mini-batch).
* **time**: update time of ``current``, ``sampling`` and GRPO at the same micro-batch size
  (one response), and of ``micro_batch`` and GRPO at whole-question micro-batches (n
  responses), on the same rows, 4 mini-batches per step, in interleaved rounds (A, B, C, ...,
  then B, C, ..., A, ...) in this process: medians, and the medians of the per-round ratios to
  GRPO at the same micro-batch size (wall and process CPU time). ``plan s`` is the adapter's
  planning time per update (its ``actor/disco/plan_seconds``, summed over the step's
  mini-batches; for ``current`` it includes the no-grad forward passes over the mini-batches
  after the first); ``without plan`` takes it off the variant's time round by round.
* **drift**: per mini-batch of a step (index 0..3), the gradient that ``sampling`` applies
  against the exact one (``current``) at the same parameters, and the two effects separately.
  At every mini-batch, before its optimizer step, several variants run their whole pass over
  the mini-batch at the same parameters and their gradients are recorded without stepping;
  then ``current`` with DisCO's squared hinge runs and its step is applied (the trajectory is
  the exact one). Float32 by default (``--drift-dtype``), so that the rows show the methods'
  difference, not bfloat16 rounding. One run per learning rate (``--lrs``), from the same
  model.

The report opens with a summary table of the ratios measured in the run, and ends with the
on-paper table of :mod:`benchmarks.layout_memory` (the paper's models and lengths).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks import layout_memory
from benchmarks.measure import profiled_peak_bytes

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
CPU_STANDINS = ROOT / "tests" / "verl"  # verl_cpu.py: verl's ``cpu`` platform
MiB = 2**20
TIME_GOAL = 1.3  # current <= 1.3x GRPO's update time at 4 mini-batches per step


# ------------------------------------------------------------------------------------------
# configuration


@dataclass(frozen=True)
class ModelSize:
    """A random Qwen2 built from a config (no hub)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Shape:
    """One step's rows: ``mini_batches`` x ``questions`` (per mini-batch) x ``n`` responses of
    ``response_tokens`` tokens after a prompt of ``prompt_tokens``."""

    questions: int
    mini_batches: int
    n: int
    prompt_tokens: int
    response_tokens: int

    @property
    def rows(self) -> int:
        return self.questions * self.mini_batches * self.n

    @property
    def mini_batch_rows(self) -> int:
        return self.questions * self.n


@dataclass(frozen=True)
class Preset:
    model: ModelSize
    memory: Shape
    time: Shape
    drift: Shape
    time_micro: int  # training micro-batch (responses) of the timed variants
    infer_micro: int  # rollout.log_prob_micro_batch_size_per_gpu: current's no-grad forward
    min_rounds: int
    max_rounds: int
    min_time: float
    drift_steps: int
    lrs: tuple[float, ...]  # of the drift runs (AdamW), one run from the same model each
    warmup: bool = True  # one untimed update per variant before the timed rounds


FULL = Preset(
    model=ModelSize(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, vocab=512),
    memory=Shape(questions=1, mini_batches=2, n=8, prompt_tokens=16, response_tokens=1024),
    time=Shape(questions=1, mini_batches=4, n=4, prompt_tokens=16, response_tokens=1024),
    drift=Shape(questions=4, mini_batches=4, n=8, prompt_tokens=16, response_tokens=96),
    time_micro=1,
    infer_micro=4,
    min_rounds=9,
    max_rounds=15,
    min_time=60.0,
    drift_steps=1,
    lrs=(5e-5, 5e-4),
)
QUICK = Preset(
    model=ModelSize(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, vocab=64),
    memory=Shape(questions=1, mini_batches=2, n=2, prompt_tokens=4, response_tokens=48),
    time=Shape(questions=1, mini_batches=4, n=2, prompt_tokens=4, response_tokens=16),
    drift=Shape(questions=2, mini_batches=2, n=2, prompt_tokens=4, response_tokens=12),
    time_micro=1,
    infer_micro=2,
    min_rounds=1,
    max_rounds=1,
    min_time=0.0,
    drift_steps=1,
    lrs=(2e-3,),
    warmup=False,
)
SECTIONS = ("memory", "time", "drift")
DELTA, BETA = 1e-4, 1e3  # DisCO's published constraint (the adapter's defaults)


@dataclass(frozen=True)
class Variant:
    """One actor-update configuration: the loss, where DisCO's weights come from, the
    constraint and objective, and the training micro-batch size (responses)."""

    label: str
    loss: str  # "disco" or "grpo"
    micro: int
    weights: str | None = None  # current | sampling | micro_batch (disco only)
    objective: str = "disco"
    constraint: str = "squared_hinge"


# ------------------------------------------------------------------------------------------
# verl on the CPU, in this process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup_verl_cpu() -> None:
    """Load verl with the test suite's ``cpu`` platform (before any verl module: some read the
    device name at import), select the FSDP engine (registered for cuda/npu, it then runs on
    the CPU through the platform) and start a one-process gloo group (world size 1)."""
    import torch.distributed as dist

    if "verl" in sys.modules:
        raise RuntimeError(
            "benchmarks.layout sets verl's platform before verl is imported: run it in a fresh "
            "process (python -m benchmarks.layout)"
        )
    sys.path.insert(0, str(CPU_STANDINS))
    modules = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    os.environ["VERL_USE_EXTERNAL_MODULES"] = ",".join(["verl_cpu", *modules])
    os.environ["VERL_ENGINE_DEVICE"] = "cuda"
    port = free_port()
    for key, value in dict(
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    ).items():
        os.environ[key] = value
    import verl  # noqa: F401  (loads verl_cpu, then the discoloss plugin)
    from verl.utils.device import get_device_name

    if get_device_name() != "cpu":
        raise RuntimeError(f"verl's device is {get_device_name()!r}, expected the cpu platform")
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")


def make_model(path: Path, size: ModelSize, *, max_positions: int, seed: int) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).save_pretrained(path)


def build_worker(model_dir: Path, *, dtype: str, lr: float) -> Any:
    """verl's ``TrainingWorker`` with its FSDP2 engine, as verl's actor worker configures it
    (gradient checkpointing, AdamW, grad clip 1.0); float32 or bfloat16 mixed precision."""
    from verl.trainer.config import CheckpointConfig
    from verl.workers.config import FSDPEngineConfig, FSDPOptimizerConfig, HFModelConfig
    from verl.workers.config.engine import TrainingWorkerConfig
    from verl.workers.engine_workers import TrainingWorker

    model = HFModelConfig(
        path=str(model_dir),
        load_tokenizer=False,
        use_remove_padding=False,
        enable_gradient_checkpointing=True,
        override_config={"attn_implementation": "sdpa"},
    )
    precision = None
    if dtype == "float32":
        precision = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}
    engine = FSDPEngineConfig(
        strategy="fsdp2",
        use_dynamic_bsz=False,
        micro_batch_size_per_gpu=1,
        infer_micro_batch_size_per_gpu=1,
        use_torch_compile=False,
        mixed_precision=precision,
    )
    optim = FSDPOptimizerConfig(lr=lr, total_training_steps=10**6)
    worker = TrainingWorker(
        TrainingWorkerConfig(
            model_type="language_model",
            model_config=model,
            engine_config=engine,
            optimizer_config=optim,
            checkpoint_config=CheckpointConfig(),
        )
    )
    worker.reset()
    return worker


def state_bytes(worker: Any) -> dict[str, int]:
    """Bytes of the parameters, their gradients and AdamW's two moments (float32)."""
    numel = sum(p.numel() for p in worker.engine.module.parameters())
    return {"parameters": 4 * numel, "gradients": 4 * numel, "optimizer": 8 * numel}


# ------------------------------------------------------------------------------------------
# data


def _nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def make_rows(shape: Shape, vocab: int, *, seed: int) -> tuple[Any, torch.Tensor, list[str]]:
    """Random prompts and responses in verl's padding-free update layout (nested tensors), one
    question's n responses after each other, a mini-batch's questions after each other (what
    the adapter's balancing gives with one data-parallel rank); 0/1 rewards with both labels
    in every question."""
    from tensordict import TensorDict

    g = torch.Generator().manual_seed(seed)
    q, n = shape.questions * shape.mini_batches, shape.n
    p, r = shape.prompt_tokens, shape.response_tokens
    prompts = [torch.randint(2, vocab, (p,), generator=g) for _ in range(q)]
    rows_p = [prompts[i // n] for i in range(q * n)]
    rows_r = [torch.randint(2, vocab, (r,), generator=g) for _ in range(q * n)]
    rewards = (torch.rand(q, n, generator=g) < 0.5).float()
    rewards[:, 0], rewards[:, 1] = 1.0, 0.0  # every question has signal
    rewards = rewards[:, torch.randperm(n, generator=g)].flatten()
    td = TensorDict(
        {
            "prompts": _nested(rows_p),
            "responses": _nested(rows_r),
            "input_ids": _nested([torch.cat([a, b]) for a, b in zip(rows_p, rows_r)]),
            "position_ids": _nested([torch.arange(p + r) for _ in rows_r]),
            "response_mask": _nested([torch.ones(r, dtype=torch.int64) for _ in rows_r]),
        },
        batch_size=[q * n],
    )
    td["loss_mask"] = td["response_mask"]
    uids = [f"question-{i // n}" for i in range(q * n)]
    return td, rewards, uids


def old_log_probs(worker: Any, td: Any, *, micro: int) -> torch.Tensor:
    """(B, T) log-probs of the rows at the worker's parameters: verl's ``infer_batch`` (what
    ``compute_log_prob`` runs), micro-batched by ``micro``."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import no_padding_2_padding

    worker.engine_config.infer_micro_batch_size_per_gpu = micro
    data = td.copy()
    tu.assign_non_tensor(data, temperature=1.0, calculate_entropy=False, compute_loss=False)
    out = worker.infer_batch(data)
    return no_padding_2_padding(out["log_probs"], td).float()


@dataclass
class StepRows:
    """The rows of one step with the old log-probs, as DisCO (codes in ``advantages``) and as
    GRPO (verl's ``grpo`` advantages) see them."""

    disco: Any
    grpo: Any
    shape: Shape


def make_step(worker: Any, shape: Shape, vocab: int, *, seed: int, infer_micro: int) -> StepRows:
    import numpy as np
    from omegaconf import OmegaConf
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn
    from verl.utils import tensordict_utils as tu

    td, rewards, uids = make_rows(shape, vocab, seed=seed)
    lengths = td["responses"].offsets().diff().tolist()
    old = old_log_probs(worker, td, micro=infer_micro)
    td["old_log_probs"] = _nested([old[i, :k] for i, k in enumerate(lengths)])
    tu.assign_non_tensor(td, temperature=1.0, calculate_entropy=False)
    width = max(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).float()
    token_rewards = torch.zeros(len(lengths), width)
    token_rewards[torch.arange(len(lengths)), torch.tensor(lengths) - 1] = rewards
    index = np.array(uids, dtype=object)
    root = OmegaConf.create(
        {
            "algorithm": {"adv_estimator": "disco"},
            "actor_rollout_ref": {
                "rollout": {"n": shape.n},
                "actor": {"policy_loss": {"loss_mode": "disco"}},
            },
        }
    )
    codes, _ = get_adv_estimator_fn("disco")(
        token_level_rewards=token_rewards, response_mask=mask, config=root.algorithm, index=index
    )
    grpo, _ = get_adv_estimator_fn("grpo")(
        token_level_rewards=token_rewards, response_mask=mask, index=index
    )
    disco_td, grpo_td = td.copy(), td.copy()
    disco_td["advantages"] = _nested([codes[i, :k].float() for i, k in enumerate(lengths)])
    grpo_td["advantages"] = _nested([grpo[i, :k].float() for i, k in enumerate(lengths)])
    return StepRows(disco=disco_td, grpo=grpo_td, shape=shape)


# ------------------------------------------------------------------------------------------
# one actor update


def actor_config(variant: Variant, shape: Shape) -> Any:
    from discoloss.adapters.verl.config import DiscoPolicyLossConfig
    from verl.workers.config import FSDPActorConfig, PolicyLossConfig

    if variant.loss == "disco":
        policy_loss: Any = DiscoPolicyLossConfig(
            loss_mode="disco",
            weights=variant.weights,
            objective=variant.objective,
            constraint=variant.constraint,
            delta=DELTA,
            beta=BETA,
        )
    else:
        policy_loss = PolicyLossConfig(loss_mode="vanilla")
    return FSDPActorConfig(
        strategy="fsdp2",
        rollout_n=shape.n,
        ppo_mini_batch_size=shape.questions,
        ppo_micro_batch_size_per_gpu=variant.micro,
        use_dynamic_bsz=False,
        entropy_coeff=0.0,
        policy_loss=policy_loss,
    )


class Updater:
    """Runs one actor update (``TrainingWorker.train_mini_batch``) of a variant on a step's
    rows; loss functions are built once per variant and shape."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self._losses: dict[tuple[Variant, Shape], Any] = {}

    def loss_fn(self, variant: Variant, shape: Shape) -> Any:
        from verl.workers.utils.losses import ppo_loss

        key = (variant, shape)
        if key not in self._losses:
            self._losses[key] = partial(ppo_loss, config=actor_config(variant, shape))
        return self._losses[key]

    def __call__(self, variant: Variant, step: StepRows, *, infer_micro: int) -> dict[str, Any]:
        # the key the adapter's v1-trainer hook sets in a real run: the old log-probs were
        # computed by the actor at the parameters the update starts from
        from discoloss.adapters.verl._hooks import OLD_AT_THETA_OLD
        from verl.utils import tensordict_utils as tu

        shape = step.shape
        self.worker.engine_config.micro_batch_size_per_gpu = variant.micro
        self.worker.engine_config.infer_micro_batch_size_per_gpu = infer_micro
        self.worker.set_loss_fn(self.loss_fn(variant, shape))
        data = (step.disco if variant.loss == "disco" else step.grpo).copy()
        tu.assign_non_tensor(
            data,
            mini_batch_size=shape.mini_batch_rows,
            global_batch_size=shape.mini_batch_rows,
            epochs=1,
            seed=42,
            dataloader_kwargs={"shuffle": False},
            **{OLD_AT_THETA_OLD: True},
        )
        out = self.worker.train_mini_batch(data)
        return dict(tu.get(out, "metrics"))


def plan_seconds(metrics: dict[str, Any]) -> float:
    return float(sum(metrics.get("actor/disco/plan_seconds", [])))


# ------------------------------------------------------------------------------------------
# memory


@dataclass
class MemoryRow:
    label: str
    loss: str
    weights: str | None
    micro: int
    infer_micro: int | None
    tokens_per_micro_batch: int
    peak_bytes: int


def memory_variants(n: int) -> list[tuple[Variant, int | None]]:
    """(variant, infer micro-batch of current's stats forward) for the memory section."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    out: list[tuple[Variant, int | None]] = [
        (Variant(f"whole questions (micro_batch), {n}", "disco", n, "micro_batch"), None)
    ]
    for d in divisors:
        out.append((Variant(f"current, {d}", "disco", d, "current"), d))
    out.append((Variant(f"current, 1 (stats forward by {n})", "disco", 1, "current"), n))
    out.append((Variant("sampling, 1", "disco", 1, "sampling"), None))
    out.append((Variant("GRPO, 1", "grpo", 1), None))
    out.append((Variant(f"GRPO, {n}", "grpo", n), None))
    return out


def measure_memory(
    updater: Updater, step: StepRows, *, progress: Callable[[str], None]
) -> list[MemoryRow]:
    shape = step.shape
    variants = memory_variants(shape.n)
    first, first_infer = variants[0]
    updater(first, step, infer_micro=first_infer or 1)  # parameters, optimizer state, gradients
    rows = []
    for variant, infer in variants:
        progress(f"memory: {variant.label}")
        peak = profiled_peak_bytes(partial(updater, variant, step, infer_micro=infer or 1))
        rows.append(
            MemoryRow(
                label=variant.label,
                loss=variant.loss,
                weights=variant.weights,
                micro=variant.micro,
                infer_micro=infer,
                tokens_per_micro_batch=variant.micro
                * (shape.prompt_tokens + shape.response_tokens),
                peak_bytes=peak,
            )
        )
    return rows


# ------------------------------------------------------------------------------------------
# time


@dataclass
class TimeResult:
    labels: list[str]
    wall: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    plan: dict[str, list[float]] = field(default_factory=dict)
    rounds: int = 0

    def median(self, label: str, what: str = "wall") -> float:
        return float(statistics.median(getattr(self, what)[label]))

    def ratio(self, label: str, base: str, what: str = "wall") -> float:
        """Median over rounds of label's time / base's time in the same round."""
        xs, ys = getattr(self, what)[label], getattr(self, what)[base]
        return float(statistics.median(a / b for a, b in zip(xs, ys)))

    def ratio_without_plan(self, label: str, base: str) -> float:
        """Median over rounds of (label's wall time - its planning time) / base's wall time."""
        xs, ps, ys = self.wall[label], self.plan[label], self.wall[base]
        return float(statistics.median((a - p) / b for a, p, b in zip(xs, ps, ys)))


def time_variants(micro: int, n: int) -> list[Variant]:
    """current, sampling and GRPO at the micro-batch ``micro``; micro_batch (whole questions,
    the only layout it allows) and GRPO at micro-batches of ``n``."""
    return [
        Variant("current", "disco", micro, "current"),
        Variant("sampling", "disco", micro, "sampling"),
        Variant("GRPO", "grpo", micro),
        Variant("micro_batch", "disco", n, "micro_batch"),
        Variant("GRPO, whole questions", "grpo", n),
    ]


# each timed variant's baseline: GRPO at the same layout, on the same rows, in the same rounds
TIME_BASE = {
    "current": "GRPO",
    "sampling": "GRPO",
    "GRPO": "GRPO",
    "micro_batch": "GRPO, whole questions",
    "GRPO, whole questions": "GRPO, whole questions",
}
TIME_RATIOS = ("current", "sampling", "micro_batch")


def measure_time(
    updater: Updater,
    step: StepRows,
    *,
    micro: int,
    infer_micro: int,
    min_rounds: int,
    max_rounds: int,
    min_time: float,
    warmup: bool,
    progress: Callable[[str], None],
) -> TimeResult:
    variants = time_variants(micro, step.shape.n)
    result = TimeResult(labels=[v.label for v in variants])
    for v in variants if warmup else ():
        progress(f"time: warm-up {v.label}")
        updater(v, step, infer_micro=infer_micro)
    for v in variants:
        result.wall[v.label], result.cpu[v.label], result.plan[v.label] = [], [], []
    start = time.perf_counter()
    k = len(variants)
    while result.rounds < max_rounds and (
        result.rounds < min_rounds or time.perf_counter() - start < min_time
    ):
        order = variants[result.rounds % k :] + variants[: result.rounds % k]
        for v in order:
            progress(f"time: round {result.rounds + 1}, {v.label}")
            c0, t0 = time.process_time(), time.perf_counter()
            metrics = updater(v, step, infer_micro=infer_micro)
            result.wall[v.label].append(time.perf_counter() - t0)
            result.cpu[v.label].append(time.process_time() - c0)
            result.plan[v.label].append(plan_seconds(metrics))
        result.rounds += 1
    return result


# ------------------------------------------------------------------------------------------
# drift


def flat_grad(module: torch.nn.Module) -> torch.Tensor:
    """All parameter gradients as one float64 vector (full tensors of FSDP2's DTensors)."""
    from torch.distributed.tensor import DTensor

    parts = []
    for p in module.parameters():
        g = p.grad
        if g is None:
            parts.append(torch.zeros(p.numel(), dtype=torch.float64))
            continue
        if isinstance(g, DTensor):
            g = g.full_tensor()
        parts.append(g.detach().flatten().to(torch.float64))
    return torch.cat(parts)


DRIFT_PROBES = (
    # label, weights, objective, constraint
    ("sampling", "sampling", "disco", "squared_hinge"),
    ("current, constraint=none", "current", "disco", "none"),
    ("sampling, constraint=none", "sampling", "disco", "none"),
    ("current, constraint=kl_penalty", "current", "disco", "kl_penalty"),
    ("current, disco_b", "current", "disco_b", "squared_hinge"),
    ("sampling, disco_b", "sampling", "disco_b", "squared_hinge"),
)
DRIFT_REFERENCE = ("current", "current", "disco", "squared_hinge")


@dataclass
class DriftPass:
    """One mini-batch: every probe's gradient and DisCO metrics at the same parameters."""

    step: int
    mini_batch: int
    grads: dict[str, torch.Tensor]
    metrics: dict[str, dict[str, float]]


class GradientProbes:
    """Stands in for ``worker.train_batch`` (an instance attribute in front of the class's,
    which the adapter wraps) during one update: for every mini-batch, each probe variant runs
    the adapter's and verl's ``train_batch`` on a copy of the mini-batch with the optimizer step
    replaced by a record of the gradient (no step), then the reference variant runs it with its
    step applied (gradient recorded too)."""

    def __init__(self, updater: Updater, shape: Shape, micro: int) -> None:
        self.updater = updater
        self.worker = updater.worker
        self.shape = shape
        self.probes = {
            label: Variant(label, "disco", micro, weights, objective, constraint)
            for label, weights, objective, constraint in DRIFT_PROBES
        }
        label, weights, objective, constraint = DRIFT_REFERENCE
        self.reference = Variant(label, "disco", micro, weights, objective, constraint)
        self.passes: list[DriftPass] = []
        self.step = 0

    @contextmanager
    def installed(self, step: int) -> Iterator[None]:
        self.step = step
        self.worker.train_batch = self._train_batch
        try:
            yield
        finally:
            del self.worker.train_batch

    @contextmanager
    def _recording(self, grads: list[torch.Tensor], *, apply: bool) -> Iterator[None]:
        engine = self.worker.engine
        step = type(engine).optimizer_step

        def optimizer_step() -> Any:
            grads.append(flat_grad(engine.module))
            if apply:
                return step(engine)
            norm = float(grads[-1].norm())
            engine.optimizer.zero_grad()
            return norm

        engine.optimizer_step = optimizer_step
        try:
            yield
        finally:
            del engine.optimizer_step

    def _train_batch(self, data: Any) -> Any:
        from verl.utils import tensordict_utils as tu

        train_batch = type(self.worker).train_batch
        grads: dict[str, torch.Tensor] = {}
        metrics: dict[str, dict[str, float]] = {}
        for label, variant in self.probes.items():
            self.worker.loss_fn = self.updater.loss_fn(variant, self.shape)
            copy = data.copy()
            tu.assign_non_tensor(copy, update_lr_scheduler=False)
            got: list[torch.Tensor] = []
            with self._recording(got, apply=False):
                out = train_batch(self.worker, copy)
            grads[label] = got[0]
            metrics[label] = _disco_metrics(out)
        self.worker.loss_fn = self.updater.loss_fn(self.reference, self.shape)
        got = []
        with self._recording(got, apply=True):
            out = train_batch(self.worker, data)
        grads[self.reference.label] = got[0]
        metrics[self.reference.label] = _disco_metrics(out)
        index = sum(1 for p in self.passes if p.step == self.step)
        self.passes.append(DriftPass(self.step, index, grads, metrics))
        return out


def _disco_metrics(out: Any) -> dict[str, float]:
    from verl.utils import tensordict_utils as tu

    metrics = tu.get(out, "metrics")
    return {k.rsplit("/", 1)[-1]: float(v) for k, v in metrics.items() if "/disco/" in k}


def _compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(cosine, relative norm difference ||got - want|| / ||want||)."""
    norm = float(want.norm())
    if norm == 0.0:
        return (math.nan, math.inf if float(got.norm()) > 0 else 0.0)
    cos = float(got @ want) / (float(got.norm()) * norm) if float(got.norm()) > 0 else math.nan
    return cos, float((got - want).norm()) / norm


@dataclass
class DriftRow:
    step: int
    mini_batch: int
    kl: float  # the mini-batch's token-mean KL at the parameters of the pass (exact)
    kl_previous: float  # the previous mini-batch's, measured by its own pass (0 on the first)
    exact_norm: float
    sampling: tuple[float, float]  # as shipped (stale weights + per-micro-batch hinge)
    stale_weights: tuple[float, float]  # sampling's weights, exact slope
    local_hinge: tuple[float, float]  # disco_b: exact weights, per-micro-batch hinge
    previous_kl_slope: tuple[float, float]  # candidate: sampling's weights, slope of kl_previous
    decomposition_error: float  # exact vs objective + kappa * grad KL, reassembled from probes
    lr: float = math.nan


def drift_rows(passes: Sequence[DriftPass]) -> list[DriftRow]:
    rows = []
    previous_kl: dict[int, float] = {}
    for p in passes:
        g = p.grads
        exact = g["current"]
        kl = p.metrics["current"]["kl"]
        kl_prev = previous_kl.get(p.step, 0.0)
        previous_kl[p.step] = kl
        kappa = BETA * max(kl - DELTA, 0.0)
        kappa_prev = BETA * max(kl_prev - DELTA, 0.0)
        objective = g["current, constraint=none"]
        grad_kl = (g["current, constraint=kl_penalty"] - objective) / BETA
        stale = g["sampling, constraint=none"]
        reassembled = objective + kappa * grad_kl
        rows.append(
            DriftRow(
                step=p.step,
                mini_batch=p.mini_batch,
                kl=kl,
                kl_previous=kl_prev,
                exact_norm=float(exact.norm()),
                sampling=_compare(g["sampling"], exact),
                stale_weights=_compare(stale + kappa * grad_kl, exact),
                local_hinge=_compare(g["sampling, disco_b"], g["current, disco_b"]),
                previous_kl_slope=_compare(stale + kappa_prev * grad_kl, exact),
                decomposition_error=_compare(reassembled, exact)[1],
            )
        )
    return rows


def measure_drift(
    preset: Preset,
    model_dir: Path,
    *,
    dtype: str,
    micro: int,
    seed: int,
    progress: Callable[[str], None],
) -> list[DriftRow]:
    out = []
    for lr in preset.lrs:
        worker = build_worker(model_dir, dtype=dtype, lr=lr)
        updater = Updater(worker)
        shape = preset.drift
        probes = GradientProbes(updater, shape, micro)
        for s in range(preset.drift_steps):
            progress(f"drift: lr {lr:g}, step {s + 1}")
            rows = make_step(
                worker,
                shape,
                preset.model.vocab,
                seed=seed + 100 + s,
                infer_micro=preset.infer_micro,
            )
            with probes.installed(s):
                updater(probes.reference, rows, infer_micro=preset.infer_micro)
        out += [replace(r, lr=lr) for r in drift_rows(probes.passes)]
    return out


# ------------------------------------------------------------------------------------------
# report


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import transformers
    import verl

    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "verl": getattr(verl, "__version__", "?"),
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "command": "python -m benchmarks.layout " + " ".join(shlex.quote(a) for a in args.argv),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_markdown(rows: Sequence[MemoryRow], state: dict[str, int], shape: Shape) -> str:
    whole = rows[0].peak_bytes
    lines = [
        f"One update: {shape.mini_batches} mini-batches of {shape.questions} question(s) x "
        f"n = {shape.n} responses of {shape.response_tokens} tokens (prompt "
        f"{shape.prompt_tokens}); parameters {state['parameters'] / MiB:.2f} MiB, gradients "
        f"{state['gradients'] / MiB:.2f} MiB, AdamW state {state['optimizer'] / MiB:.2f} MiB "
        "(float32).",
        "",
        "| layout | training micro-batch (responses) | tokens / micro-batch | stats forward "
        "micro-batch | peak extra MiB | / whole questions | x 1/n |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = r.peak_bytes / whole if whole else math.nan
        expect = r.micro / shape.n
        lines.append(
            f"| {r.label} | {r.micro} | {r.tokens_per_micro_batch:,} | "
            f"{r.infer_micro if r.infer_micro else '-'} | {r.peak_bytes / MiB:.1f} | "
            f"{ratio:.3f} | {ratio / expect:.2f} |"
        )
    return "\n".join(lines)


def time_markdown(result: TimeResult, shape: Shape, micro: int, infer_micro: int) -> str:
    lines = [
        f"One update: {shape.mini_batches} mini-batches of {shape.questions} question(s) x "
        f"n = {shape.n} responses of {shape.response_tokens} tokens (prompt "
        f"{shape.prompt_tokens}); current, sampling and GRPO with training micro-batches of "
        f"{micro} response(s), micro_batch and GRPO, whole questions with micro-batches of "
        f"{shape.n}; current's stats forward in micro-batches of {infer_micro}; "
        f"{result.rounds} interleaved rounds. Ratios are medians of per-round ratios to GRPO "
        "at the same micro-batch size; `without plan` takes the adapter's planning time "
        "(for current: the stats forward) off the variant's time in each round.",
        "",
        "| variant | micro-batch | median s | median cpu s | / GRPO (wall) | / GRPO (cpu) "
        "| plan s / update | plan share | without plan / GRPO (wall) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label in result.labels:
        base = TIME_BASE[label]
        wall = result.median(label)
        plan = statistics.median(result.plan[label])
        size = shape.n if base != "GRPO" else micro
        lines.append(
            f"| {label} | {size} | {wall:.2f} | {result.median(label, 'cpu'):.2f} | "
            f"{result.ratio(label, base):.3f} | {result.ratio(label, base, 'cpu'):.3f} | "
            f"{plan:.2f} | {plan / wall:.1%} | {result.ratio_without_plan(label, base):.3f} |"
        )
    return "\n".join(lines)


def time_ratios(result: TimeResult) -> dict[str, dict[str, float]]:
    return {
        f"{a}/GRPO": {
            "wall": result.ratio(a, TIME_BASE[a]),
            "cpu": result.ratio(a, TIME_BASE[a], "cpu"),
            "wall_without_plan": result.ratio_without_plan(a, TIME_BASE[a]),
        }
        for a in TIME_RATIOS
    }


def time_verdict(result: TimeResult) -> str:
    r = result.ratio("current", "GRPO")
    verdict = "met" if r <= TIME_GOAL else "missed"
    return (
        f"current / GRPO = {r:.3f} (goal <= {TIME_GOAL}: {verdict}); sampling / GRPO = "
        f"{result.ratio('sampling', 'GRPO'):.3f}; micro_batch / GRPO (whole questions) = "
        f"{result.ratio('micro_batch', TIME_BASE['micro_batch']):.3f}"
    )


def _pair(x: tuple[float, float]) -> str:
    return f"{x[0]:.4f} / {x[1]:.2e}"


def drift_markdown(rows: Sequence[DriftRow], shape: Shape, micro: int) -> str:
    lines = [
        f"Each step: {shape.mini_batches} mini-batches of {shape.questions} questions x "
        f"n = {shape.n} responses of {shape.response_tokens} tokens, micro-batches of {micro} "
        f"response(s); delta = {DELTA:g}, beta = {BETA:g}. Cells: cosine / relative norm "
        "difference against the exact gradient (`current`) at the same parameters.",
        "",
        "| lr | step | mini-batch | KL (exact) | KL of the previous mini-batch "
        "| sampling (as shipped) | stale weights alone | per-micro-batch hinge alone (disco_b) "
        "| candidate: slope from the previous KL | check |",
        "|---:|---:|---:|---:|---:|---|---|---|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.lr:g} | {r.step} | {r.mini_batch} | {r.kl:.2e} | {r.kl_previous:.2e} | "
            f"{_pair(r.sampling)} | {_pair(r.stale_weights)} | {_pair(r.local_hinge)} | "
            f"{_pair(r.previous_kl_slope)} | {r.decomposition_error:.1e} |"
        )
    return "\n".join(lines)


def summary_rows(
    mem: Sequence[MemoryRow] | None,
    timed: TimeResult | None,
    drift: Sequence[DriftRow] | None,
    n: int,
) -> list[tuple[str, str, str]]:
    """(quantity, measured, expected or goal) for the summary table."""
    rows: list[tuple[str, str, str]] = []
    if mem:
        peak = {r.label: r.peak_bytes for r in mem}
        for label, base in (
            ("current, 1", mem[0].label),
            ("sampling, 1", mem[0].label),
            ("GRPO, 1", f"GRPO, {n}"),
        ):
            rows.append(
                (
                    f"peak memory: {label} / {base}",
                    f"{peak[label] / peak[base]:.3f}",
                    f"about 1/n = {1 / n:.3f}",
                )
            )
    if timed is not None:
        for a in TIME_RATIOS:
            base = TIME_BASE[a]
            goal = f"<= {TIME_GOAL}" if a == "current" else "-"
            rows.append(
                (
                    f"update time: {a} / {base} (wall; cpu)",
                    f"{timed.ratio(a, base):.3f}; {timed.ratio(a, base, 'cpu'):.3f}",
                    goal,
                )
            )
    if drift:
        for lr in sorted({r.lr for r in drift}):
            later = [r for r in drift if r.lr == lr and r.mini_batch > 0]
            first = [r for r in drift if r.lr == lr and r.mini_batch == 0]
            if first:
                rows.append(
                    (
                        f"sampling vs exact, first mini-batch (lr {lr:g}): worst rel. diff",
                        f"{max(r.sampling[1] for r in first):.1e}",
                        "0 (exact)",
                    )
                )
            if later:
                cos = [r.sampling[0] for r in later]
                rel = [r.sampling[1] for r in later]
                rows.append(
                    (
                        f"sampling vs exact, later mini-batches (lr {lr:g}): cosine; rel. diff",
                        f"{min(cos):.3f} to {max(cos):.3f}; {min(rel):.2e} to {max(rel):.2e}",
                        "1; 0 if exact",
                    )
                )
    return rows


def summary_markdown(rows: Sequence[tuple[str, str, str]]) -> str:
    lines = [
        "Ratios measured side by side in this run (details below).",
        "",
        "| quantity | measured | expected / goal |",
        "|---|---:|---|",
    ]
    lines += [f"| {q} | {m} | {e} |" for q, m, e in rows]
    return "\n".join(lines)


def plot_memory(rows: Sequence[MemoryRow], shape: Shape, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("benchmarks: matplotlib is not installed; no plot written", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    current = [r for r in rows if r.weights == "current" and r.infer_micro == r.micro]
    ax.plot(
        [r.micro for r in current],
        [r.peak_bytes / MiB for r in current],
        "o-",
        label="weights=current (stats forward at the same size)",
    )
    whole = rows[0]
    ax.plot(
        [whole.micro], [whole.peak_bytes / MiB], "s", label="weights=micro_batch (whole questions)"
    )
    grpo = [r for r in rows if r.loss == "grpo"]
    ax.plot([r.micro for r in grpo], [r.peak_bytes / MiB for r in grpo], "^", label="GRPO")
    xs = sorted({r.micro for r in current})
    ax.plot(
        xs,
        [whole.peak_bytes / MiB * x / shape.n for x in xs],
        ":",
        color="gray",
        label="whole questions x micro / n",
    )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("training micro-batch (responses)")
    ax.set_ylabel("peak extra memory of one update (MiB)")
    ax.set_title(f"verl actor update (CPU), n = {shape.n}, {shape.response_tokens}-token responses")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------
# command


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.layout",
        description="verl's actor update at any micro-batch layout: memory, time, drift (CPU)",
    )
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds (smoke test)")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma list of memory,time,drift")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="mixed precision of the memory and time sections (default: %(default)s)",
    )
    p.add_argument("--drift-dtype", choices=("bfloat16", "float32"), default="float32")
    p.add_argument(
        "--micro",
        type=int,
        default=None,
        help="micro-batch of the time and drift sections (default: the preset's, 1)",
    )
    p.add_argument("--min-rounds", type=int, default=None)
    p.add_argument("--max-rounds", type=int, default=None)
    p.add_argument("--min-time", type=float, default=None, help="timing seconds, at least")
    p.add_argument("--lrs", default=None, help="comma list: learning rates of the drift runs")
    p.add_argument("--drift-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="folder for results.md/json and the plot")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"--sections: unknown {unknown}; expected a comma list of {','.join(SECTIONS)}")
    args.sections = sections
    return args


def preset_of(args: argparse.Namespace) -> Preset:
    preset = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {}
    for name in ("min_rounds", "max_rounds", "min_time", "drift_steps"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if args.lrs is not None:
        overrides["lrs"] = tuple(float(x) for x in args.lrs.split(","))
    if args.micro is not None:
        overrides["time_micro"] = args.micro
    return replace(preset, **overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    preset = preset_of(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_verl_cpu()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    env = environment(args)
    print("# verl actor update at any micro-batch layout (CPU)\n")
    for k, v in env.items():
        print(f"- {k}: {v}")
    print()

    total = 0
    if "memory" in args.sections:
        total += len(memory_variants(preset.memory.n)) + 1
    if "time" in args.sections:
        total += len(time_variants(1, 1)) * (int(preset.warmup) + preset.max_rounds)
    if "drift" in args.sections:
        total += preset.drift_steps * len(preset.lrs)
    bar = tqdm(total=total, desc="layout", unit="update") if tqdm else None

    def progress(what: str) -> None:
        if bar is not None:
            bar.set_postfix_str(what)
            bar.update(1)

    results: dict[str, Any] = {"environment": env, "preset": asdict(preset)}
    parts: list[str] = []
    mem: list[MemoryRow] | None = None
    timed: TimeResult | None = None
    drift: list[DriftRow] | None = None
    shapes = [preset.memory, preset.time, preset.drift]
    max_positions = max(s.prompt_tokens + s.response_tokens for s in shapes) + 8
    with tempfile.TemporaryDirectory(prefix="discoloss-layout-") as tmp:
        model_dir = Path(tmp) / "model"
        make_model(model_dir, preset.model, max_positions=max_positions, seed=args.seed)
        worker = None
        if {"memory", "time"} & set(args.sections):
            worker = build_worker(model_dir, dtype=args.dtype, lr=1e-6)
            results["state_bytes"] = state_bytes(worker)
            updater = Updater(worker)
        if "memory" in args.sections:
            step = make_step(
                worker,
                preset.memory,
                preset.model.vocab,
                seed=args.seed,
                infer_micro=preset.infer_micro,
            )
            mem = measure_memory(updater, step, progress=progress)
            results["memory"] = [asdict(r) for r in mem]
            parts.append(
                "## Peak memory of one update\n\n"
                + memory_markdown(mem, results["state_bytes"], preset.memory)
            )
        if "time" in args.sections:
            step = make_step(
                worker,
                preset.time,
                preset.model.vocab,
                seed=args.seed + 1,
                infer_micro=preset.infer_micro,
            )
            timed = measure_time(
                updater,
                step,
                micro=preset.time_micro,
                infer_micro=preset.infer_micro,
                min_rounds=preset.min_rounds,
                max_rounds=preset.max_rounds,
                min_time=preset.min_time,
                warmup=preset.warmup,
                progress=progress,
            )
            results["time"] = asdict(timed)
            results["time_ratios"] = time_ratios(timed)
            parts.append(
                "## Update time\n\n"
                + time_markdown(timed, preset.time, preset.time_micro, preset.infer_micro)
                + "\n\n"
                + time_verdict(timed)
            )
        del worker
        if "drift" in args.sections:
            drift = measure_drift(
                preset,
                model_dir,
                dtype=args.drift_dtype,
                micro=preset.time_micro,
                seed=args.seed,
                progress=progress,
            )
            results["drift"] = [asdict(r) for r in drift]
            parts.append(
                "## Drift of weights=sampling\n\n"
                + drift_markdown(drift, preset.drift, preset.time_micro)
            )
    if bar is not None:
        bar.total = bar.n  # the timed rounds stop between min_rounds and max_rounds
        bar.refresh()
        bar.close()
    env["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = summary_rows(mem, timed, drift, preset.memory.n)
    results["summary"] = [list(r) for r in summary]
    parts.insert(0, "## Summary\n\n" + summary_markdown(summary))
    parts.append("## On paper (benchmarks/layout_memory.py)\n\n" + layout_memory.table())
    text = "\n\n".join(parts) + f"\n\nLoad average at the end: {env['load_avg_end']}\n"
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        header = "\n".join(f"- {k}: {v}" for k, v in env.items())
        (args.out / "results.md").write_text(f"# verl layout benchmark\n\n{header}\n\n{text}")
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        if mem and plot_memory(mem, preset.memory, args.out / "layout_memory.png"):
            print(f"wrote {args.out / 'layout_memory.png'}")
        print(f"wrote {args.out / 'results.md'}, results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
