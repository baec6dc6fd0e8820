"""Supervised warm-up, the RL loop (DisCO and the GRPO family), and held-out evaluation.

The RL loop is the reference example of :func:`discoloss.disco_loss` in a custom training loop:

1. sample ``n`` responses per question with the current policy (the sampling policy
   pi_old) and score them with the verifier: rewards in {0, 1};
2. one no-grad forward pass gives ``old_log_probs`` (B, T) and the response mask;
3. split the questions into mini-batches of whole groups; per mini-batch a forward pass gives
   ``log_probs`` under the current parameters, then::

       out = disco_loss(log_probs, old_log_probs, mask, rewards, group_ids)
       out.loss.backward(); optimizer.step()

   From the second mini-batch on, theta differs from theta_old and the squared-hinge KL
   penalty of ``out`` pulls the policy back when KL(pi_old || pi_theta) exceeds delta.

Every method starts from the same warm-up checkpoint and sees the same questions and the same
sampling random streams at each step, with the same optimiser, learning rate and number of
updates; only the loss differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from discoloss.demo.model import (
    ModelConfig,
    Packed,
    build_model,
    generate,
    pack,
    response_log_probs,
)
from discoloss.demo.task import (
    FILLER,
    Question,
    TaskConfig,
    encode_answer,
    encode_prompt,
    rewards,
    sample_questions,
)

__all__ = [
    "METHODS",
    "EvalResult",
    "Method",
    "RLConfig",
    "StepLog",
    "WarmupConfig",
    "evaluate",
    "question_weights",
    "rl_train",
    "warmup",
]

Method = Literal["disco", "disco_b", "grpo", "dr_grpo", "dapo", "drpo", "grpo_lp"]
METHODS: tuple[str, ...] = ("disco", "disco_b", "grpo", "dr_grpo", "dapo", "drpo", "grpo_lp")
#: Display names.
LABELS: dict[str, str] = {
    "disco": "DisCO",
    "disco_b": "DisCO-b",
    "grpo": "GRPO",
    "dr_grpo": "Dr. GRPO",
    "dapo": "DAPO",
    "drpo": "DRPO",
    "grpo_lp": "GRPO + length penalty",
}

#: Version of the checkpoint format and warm-up procedure (part of the cache key): raise it
#: whenever the warm-up code changes what it trains, so that no stale checkpoint is reused.
WARMUP_FORMAT = 2


@dataclass(frozen=True)
class WarmupConfig:
    """Supervised warm-up: cross-entropy on the answer tokens, AdamW, linear warm-up + cosine."""

    steps: int = 1200
    batch_size: int = 128
    lr: float = 3e-3
    lr_warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    #: Second stage ("habit stage"): ``habit_steps`` more steps at the constant rate
    #: ``habit_lr`` on demonstrations of which the fraction ``habit`` is flawed (right digits,
    #: then a stray ``=`` before the end token: a habit the verifier rejects, which RL can
    #: unlearn; see docs/demo.md). The clean first stage is cached on its own, so every habit
    #: setting starts from the same arithmetic.
    habit: float = 0.0
    habit_steps: int = 0
    habit_lr: float = 1e-3
    #: The length setting: in the second stage, the fraction ``filler`` of the demonstrations
    #: carries 1 to ``filler_max`` filler tokens (uniform) after its digits.
    filler: float = 0.0
    filler_max: int = 0
    #: torch CPU threads while training. Part of the cache key: the checkpoint depends on it
    #: (matrix products split their work by thread count, so their rounding does too).
    threads: int = 1

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if not 0.0 <= self.habit < 1.0:
            raise ValueError(f"habit must be in [0, 1), got {self.habit}")
        if self.habit_steps < 0:
            raise ValueError(f"habit_steps must be >= 0, got {self.habit_steps}")
        if not self.habit_lr > 0:
            raise ValueError(f"habit_lr must be > 0, got {self.habit_lr}")
        if not 0.0 <= self.filler <= 1.0:
            raise ValueError(f"filler must be in [0, 1], got {self.filler}")
        if self.filler_max < 0 or (self.filler > 0) != (self.filler_max > 0):
            raise ValueError(
                f"filler_max must be >= 1 with filler > 0 and 0 without, got {self.filler_max}"
            )

    def clean_stage(self) -> dict[str, Any]:
        """The first stage's settings (its cache key)."""
        d = asdict(self)
        for k in ("habit", "habit_steps", "habit_lr", "filler", "filler_max"):
            d.pop(k)
        return d

    def second_stage(self) -> dict[str, Any]:
        """Every setting (the second stage's cache key); the filler settings only when used,
        so that the default run keeps its key."""
        d = asdict(self)
        if not self.filler:
            for k in ("filler", "filler_max"):
                d.pop(k)
        return d


@dataclass(frozen=True)
class RLConfig:
    """RL budget and hyper-parameters, shared by every method.

    One step: ``questions`` questions x ``samples`` responses at ``temperature``, split into
    ``minibatches`` mini-batches of whole groups, one AdamW update each. The learning rate
    ramps up linearly over the first ``lr_warmup_steps`` steps (Adam's first updates have
    the full size ``lr`` on every parameter, which is a large move for a model this small).
    """

    steps: int = 60
    questions: int = 64
    samples: int = 8
    minibatches: int = 4
    lr: float = 5e-5
    lr_warmup_steps: int = 5
    temperature: float = 1.0
    # DRPO (the paper's lambda) and GRPO's length-penalised reward
    # r = correct * (1 - length_penalty * |o| / max_answer_tokens)
    lam: float = 0.1
    length_penalty: float = 0.5
    grad_clip: float = 1.0
    eval_every: int = 10
    eval_samples: int = 4
    # DisCO (published settings)
    delta: float = 1e-4
    beta: float = 1e3
    tau: float = 10.0
    # GRPO family
    clip_eps: float = 0.2
    clip_eps_high: float = 0.28


class EvalResult(NamedTuple):
    """Held-out accuracy per bucket, as sums over the bucket's ``n`` questions.

    greedy_correct: questions answered correctly by greedy decoding.
    sampled_sum, sampled_sumsq: sum over questions of the per-question pass@1 estimate (mean
      reward of the ``samples`` responses drawn at temperature 1) and of its square (for a
      confidence interval across questions).
    """

    greedy_correct: dict[int, int]
    sampled_sum: dict[int, float]
    sampled_sumsq: dict[int, float]
    n: dict[int, int]
    #: Sampled responses that are correct: their number and the sum of their lengths (response
    #: tokens, the end token included), and how many of them carry a filler token.
    correct_n: dict[int, int] = {}
    correct_length_sum: dict[int, int] = {}
    correct_filler: dict[int, int] = {}


@dataclass
class StepLog:
    step: int
    reward: float
    entropy: float
    kl: float
    kl_max: float
    loss: float
    response_length: float
    frac_groups_with_signal: float
    #: Share of the sampled responses that are not digits followed by <eos> (wrong format,
    #: e.g. the warm-up's stray "="), whatever their digits.
    malformed: float = 0.0
    #: Mean length (response tokens) of the step's correct responses (0 when none).
    correct_length: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def config_key(*parts: Any) -> str:
    blob = json.dumps(
        [asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _answer_loss(
    model: Any,
    qs: Sequence[Question],
    spurious: Sequence[bool] | None = None,
    fillers: Sequence[int] | None = None,
) -> Tensor:
    flags = [False] * len(qs) if spurious is None else spurious
    pads = [0] * len(qs) if fillers is None else fillers
    batch = pack(
        [encode_prompt(q) for q in qs],
        [encode_answer(q, spurious=f, filler=k) for q, f, k in zip(qs, flags, pads)],
    )
    log_probs, _ = response_log_probs(model, batch)
    mask = batch.response_mask
    return -torch.where(mask, log_probs, 0.0).sum() / mask.sum()


def _load(path: Path | None, model: Any) -> dict[str, Any] | None:
    if path is None or not path.exists():
        return None
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(saved["state_dict"])
    info = dict(saved["info"])
    info.update(cached=True, path=str(path))
    return info


def _save(path: Path | None, model: Any, info: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"state_dict": model.state_dict(), "info": info}, tmp)
    os.replace(tmp, path)


def _supervised(
    model: Any,
    task: TaskConfig,
    config: WarmupConfig,
    *,
    steps: int,
    lr_factor: Callable[[int], float],
    lr: float,
    rng: random.Random,
    habit: float,
    habit_rng: random.Random,
    bar: Any,
    filler: float = 0.0,
    filler_rng: random.Random | None = None,
) -> float:
    opt = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=config.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    loss_value = float("nan")
    for _ in range(steps):
        qs = sample_questions(rng, config.batch_size, task)
        flags = [habit_rng.random() < habit for _ in qs] if habit > 0 else None
        fillers = None
        if filler > 0:
            assert filler_rng is not None
            fillers = [
                filler_rng.randint(1, config.filler_max) if filler_rng.random() < filler else 0
                for _ in qs
            ]
        loss = _answer_loss(model, qs, flags, fillers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    return loss_value


def warmup(
    task: TaskConfig,
    model_config: ModelConfig,
    config: WarmupConfig,
    *,
    seed: int,
    cache_dir: Path | None,
    progress: Callable[..., Any] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The warm-up checkpoint, trained or loaded from ``cache_dir``.

    Stage 1: ``steps`` steps on correct demonstrations (linear warm-up + cosine); stage 2 (if
    ``habit_steps``): the habit stage of :class:`WarmupConfig`. Each stage is cached under a
    key hashing the task's buckets, the model config, the stage's settings, the seed and
    :data:`WARMUP_FORMAT` (not the size of the held-out set, so ``--quick`` and the default
    run share the checkpoint; the thread count is part of the settings). Training runs with
    ``config.threads`` torch threads, restored afterwards. Returns (model, info) with info =
    {"key", "cached", "seconds", "cpu_seconds", "final_loss", "path"}; with a habit stage
    also "stage1".
    """
    base = ({"buckets": list(task.buckets)}, model_config)
    tail = {"seed": seed, "format": WARMUP_FORMAT}
    key1 = config_key(*base, config.clean_stage(), tail)
    key2 = config_key(*base, config.second_stage(), tail)
    path1 = None if cache_dir is None else Path(cache_dir) / f"warmup-{key1}.pt"
    path2 = None if cache_dir is None else Path(cache_dir) / f"warmup-{key2}.pt"
    model = build_model(model_config, task, seed=seed)
    if config.habit_steps:
        info2 = _load(path2, model)
        if info2 is not None:
            return model, info2
    old_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train_warmup(model, task, config, seed, path1, path2, key1, key2, progress)
    finally:
        torch.set_num_threads(old_threads)


def _train_warmup(
    model: Any,
    task: TaskConfig,
    config: WarmupConfig,
    seed: int,
    path1: Path | None,
    path2: Path | None,
    key1: str,
    key2: str,
    progress: Callable[..., Any] | None,
) -> tuple[Any, dict[str, Any]]:
    info1 = _load(path1, model)
    if info1 is None:
        t0 = time.perf_counter()
        c0 = time.process_time()

        def lr_factor(s: int) -> float:
            ramp = min(1.0, (s + 1) / max(config.lr_warmup, 1))
            return ramp * 0.5 * (1.0 + math.cos(math.pi * s / config.steps))

        bar = progress(total=config.steps, desc="warm-up (supervised)") if progress else None
        loss1 = _supervised(
            model,
            task,
            config,
            steps=config.steps,
            lr_factor=lr_factor,
            lr=config.lr,
            rng=random.Random(f"{seed}:warmup"),
            habit=0.0,
            habit_rng=random.Random(0),
            bar=bar,
        )
        if bar is not None:
            bar.close()
        info1 = {
            "key": key1,
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "final_loss": loss1,
        }
        _save(path1, model, info1)
        info1.update(cached=False, path=None if path1 is None else str(path1))
    if not config.habit_steps:
        return model, info1

    t0 = time.perf_counter()
    c0 = time.process_time()
    bar = progress(total=config.habit_steps, desc="warm-up (habit stage)") if progress else None
    loss2 = _supervised(
        model,
        task,
        config,
        steps=config.habit_steps,
        lr_factor=lambda s: 1.0,
        lr=config.habit_lr,
        rng=random.Random(f"{seed}:habitstage"),
        habit=config.habit,
        habit_rng=random.Random(f"{seed}:habit"),
        bar=bar,
        filler=config.filler,
        filler_rng=random.Random(f"{seed}:filler"),
    )
    if bar is not None:
        bar.close()
    s1_seconds = 0.0 if info1["cached"] else info1["seconds"]
    s1_cpu = 0.0 if info1["cached"] else info1["cpu_seconds"]
    info2 = {
        "key": key2,
        "seconds": s1_seconds + time.perf_counter() - t0,
        "cpu_seconds": s1_cpu + time.process_time() - c0,
        "final_loss": loss2,
        "stage1": {k: info1[k] for k in ("key", "final_loss", "cached")},
    }
    _save(path2, model, info2)
    info2.update(cached=False, path=None if path2 is None else str(path2))
    return model, info2


@torch.no_grad()
def evaluate(
    model: Any, questions: Sequence[Question], task: TaskConfig, *, samples: int, seed: int
) -> EvalResult:
    """Greedy accuracy and sampled pass@1 (T=1, mean of ``samples`` samples) per bucket, and
    the number and lengths of the correct samples."""
    prompts = [encode_prompt(q) for q in questions]
    ignore = task.ignore_filler
    greedy = rewards(
        questions,
        generate(model, prompts, max_new_tokens=task.max_answer_tokens, temperature=0),
        ignore_filler=ignore,
    )
    sampled = [0.0] * len(questions)
    cn: dict[int, int] = {k: 0 for k in task.buckets}
    cl: dict[int, int] = {k: 0 for k in task.buckets}
    cf: dict[int, int] = {k: 0 for k in task.buckets}
    if samples > 0:
        gen = torch.Generator().manual_seed(seed)
        reps = [p for p in prompts for _ in range(samples)]
        qreps = [q for q in questions for _ in range(samples)]
        responses = generate(
            model, reps, max_new_tokens=task.max_answer_tokens, temperature=1.0, generator=gen
        )
        r = rewards(qreps, responses, ignore_filler=ignore)
        sampled = [sum(r[i * samples : (i + 1) * samples]) / samples for i in range(len(questions))]
        for q, resp, ri in zip(qreps, responses, r):
            if ri > 0.5:
                cn[q.bucket] += 1
                cl[q.bucket] += len(resp)
                cf[q.bucket] += int(FILLER in resp)
    g: dict[int, int] = {k: 0 for k in task.buckets}
    s: dict[int, float] = {k: 0.0 for k in task.buckets}
    s2: dict[int, float] = {k: 0.0 for k in task.buckets}
    n: dict[int, int] = {k: 0 for k in task.buckets}
    for q, rg, rs in zip(questions, greedy, sampled):
        g[q.bucket] += int(rg)
        s[q.bucket] += rs
        s2[q.bucket] += rs * rs
        n[q.bucket] += 1
    return EvalResult(g, s, s2, n, cn, cl, cf)


def _slice(batch: Packed, rows: Tensor) -> Packed:
    return Packed(*(t[rows] for t in batch))


def _method_loss(
    method: str, config: RLConfig, max_tokens: int
) -> Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, dict[str, Tensor]]]:
    """(log_probs, old_log_probs, mask, rewards, group_ids) -> (loss, metrics with "kl").

    ``max_tokens``: the generation budget, Dr. GRPO's constant normaliser and DRPO's
    ``max_length``.
    """
    if method in ("disco", "disco_b", "drpo"):
        from discoloss import disco_loss

        drpo = {"lam": config.lam, "max_length": max_tokens} if method == "drpo" else {}

        def disco(lp: Tensor, old: Tensor, m: Tensor, r: Tensor, g: Tensor) -> Any:
            out = disco_loss(
                lp,
                old,
                m,
                r,
                g,
                score="log_likelihood",
                objective=method,  # type: ignore[arg-type]
                tau=config.tau,
                delta=config.delta,
                beta=config.beta,
                **drpo,  # type: ignore[arg-type]
            )
            return out.loss, out.metrics

        return disco
    from discoloss import baselines

    def baseline(lp: Tensor, old: Tensor, m: Tensor, r: Tensor, g: Tensor) -> Any:
        if method == "grpo":
            out = baselines.grpo_loss(lp, old, m, r, g, clip_eps=config.clip_eps)
        elif method == "grpo_lp":
            shaped = length_penalised(r, m, config.length_penalty, max_tokens)
            out = baselines.grpo_loss(lp, old, m, shaped, g, clip_eps=config.clip_eps)
            # the failure DRPO avoids: correct answers whose advantage is negative
            correct = r > 0.5
            pushed = correct & (baselines.group_advantages(shaped, g) < 0)
            share = pushed.sum() / correct.sum().clamp_min(1)
            return out.loss, {**out.metrics, "correct_negative_advantage": share}
        elif method == "dr_grpo":
            out = baselines.dr_grpo_loss(
                lp, old, m, r, g, clip_eps=config.clip_eps, max_tokens=max_tokens
            )
        else:
            out = baselines.dapo_loss(
                lp,
                old,
                m,
                r,
                g,
                clip_eps_low=config.clip_eps,
                clip_eps_high=config.clip_eps_high,
            )
        return out.loss, out.metrics

    return baseline


def length_penalised(rewards_t: Tensor, mask: Tensor, alpha: float, max_tokens: int) -> Tensor:
    """GRPO's length-penalised reward of the length setting: ``r * (1 - alpha * |o| / L)``
    with L the generation budget (a correct answer always keeps more than a wrong one for
    alpha < 1; the group normalisation can still give a long correct answer a negative
    advantage, which is what DRPO avoids)."""
    lengths = mask.sum(1).to(rewards_t.dtype)
    return rewards_t * (1.0 - alpha * lengths / max_tokens)


def question_weights(
    method: str,
    old_log_probs: Tensor,
    mask: Tensor,
    rewards_t: Tensor,
    group_ids: Tensor,
    config: RLConfig,
    max_tokens: int,
) -> tuple[list[float], list[float]]:
    """Per question of a batch: (accuracy p, weight omega_q), at theta = theta_old.

    The coefficient c_i of a response is the derivative of the method's objective with respect
    to its score at theta = theta_old (all ratios 1, nothing clipped):
    :func:`discoloss.discriminative_weights` for DisCO; for the GRPO family ``A_i / B`` (GRPO),
    ``A_i |o_i| / (B max_tokens)`` (Dr. GRPO) and ``A_i |o_i| / sum_j |o_j|`` (DAPO) with the
    advantages the baselines compute. omega_q = G * sum of the positive c_i of question q
    (:func:`discoloss.analysis.implied_weights`): 1 on every question with signal for DisCO,
    about sqrt(p (1-p)) for GRPO and p (1-p) for Dr. GRPO.
    """
    from discoloss import baselines, discriminative_weights, sequence_scores
    from discoloss.analysis import implied_weights

    m = mask.bool()
    lengths = m.sum(1).to(torch.float32)
    if method in ("disco", "disco_b", "drpo"):
        scores = sequence_scores(old_log_probs, old_log_probs, m)
        w = discriminative_weights(
            scores,
            rewards_t,
            group_ids,
            objective=method,  # type: ignore[arg-type]
            tau=config.tau,
            lam=config.lam,
            preferences=1.0 - lengths / max_tokens if method == "drpo" else None,
        )
        iw = implied_weights(w, rewards_t, group_ids, kind="weights")
    else:
        scale: Literal["std", "none"] = "std" if method in ("grpo", "dapo", "grpo_lp") else "none"
        shaped = rewards_t
        if method == "grpo_lp":
            shaped = length_penalised(rewards_t, m, config.length_penalty, max_tokens)
        adv = baselines.group_advantages(shaped, group_ids, scale=scale)
        if method in ("grpo", "grpo_lp"):
            iw = implied_weights(adv, rewards_t, group_ids)
        elif method == "dr_grpo":
            iw = implied_weights(
                adv, rewards_t, group_ids, lengths=lengths, token_normalizer=float(max_tokens)
            )
        else:
            iw = implied_weights(adv, rewards_t, group_ids, lengths=lengths)
    return iw.accuracy.tolist(), iw.weight.tolist()


def rl_train(
    method: str,
    model: Any,
    task: TaskConfig,
    config: RLConfig,
    *,
    seed: int,
    test_set: Sequence[Question],
    initial_eval: EvalResult | None = None,
    progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Train ``model`` in place with ``method``; returns the history.

    History: {"steps": [StepLog as dict], "evals": [(step, EvalResult as dict)],
    "last_batch": {"accuracy", "weight"}, "seconds"}.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a valid option; expected one of {METHODS}")
    loss_fn = _method_loss(method, config, task.max_answer_tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.999), weight_decay=0.0)
    ramp = max(1, config.lr_warmup_steps * config.minibatches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: min(1.0, (u + 1) / ramp))
    n, q_per_step = config.samples, config.questions
    group_ids = torch.arange(q_per_step).repeat_interleave(n)
    steps: list[dict[str, Any]] = []
    evals: list[tuple[int, EvalResult]] = []
    if initial_eval is not None:
        evals.append((0, initial_eval))
    last_batch: dict[str, list[float]] = {}
    t0 = time.perf_counter()
    c0 = time.process_time()
    eval_seconds = 0.0
    bar = progress(total=config.steps, desc=f"RL {LABELS[method]:<9}") if progress else None
    for step in range(1, config.steps + 1):
        qs = sample_questions(random.Random(f"{seed}:rl:{step}"), q_per_step, task)
        gen = torch.Generator().manual_seed(hash_seed(seed, step))
        prompts = [encode_prompt(q) for q in qs for _ in range(n)]
        qreps = [q for q in qs for _ in range(n)]
        responses = generate(
            model,
            prompts,
            max_new_tokens=task.max_answer_tokens,
            temperature=config.temperature,
            generator=gen,
        )
        r = torch.tensor(
            rewards(qreps, responses, ignore_filler=task.ignore_filler), dtype=torch.float32
        )
        batch = pack(prompts, responses)
        with torch.no_grad():
            old_log_probs, entropy = response_log_probs(model, batch)
        mask = batch.response_mask
        ent = float(torch.where(mask, entropy, 0.0).sum() / mask.sum())

        keep = torch.ones(len(prompts), dtype=torch.bool)
        if method == "dapo":
            from discoloss import baselines

            keep = baselines.dynamic_sampling_filter(r, group_ids)
        kept_groups = sorted(set(group_ids[keep].tolist()))
        chunks = [c for c in _split(kept_groups, config.minibatches) if c]
        kls: list[float] = []
        losses: list[float] = []
        extra: dict[str, list[float]] = {}
        for chunk in chunks:
            rows = torch.nonzero(torch.isin(group_ids, torch.tensor(chunk))).squeeze(1)
            mb = _slice(batch, rows)
            log_probs, _ = response_log_probs(model, mb)
            loss, metrics = loss_fn(
                log_probs, old_log_probs[rows], mb.response_mask, r[rows], group_ids[rows]
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            kls.append(float(metrics["kl"]))
            for k, v in metrics.items():
                if k not in ("kl", "loss"):
                    extra.setdefault(k, []).append(float(v))

        per_q = r.view(q_per_step, n)
        signal = ((per_q > 0.5).any(1) & (per_q <= 0.5).any(1)).float().mean()
        log = StepLog(
            step=step,
            reward=float(r.mean()),
            entropy=ent,
            kl=sum(kls) / len(kls) if kls else 0.0,
            kl_max=max(kls) if kls else 0.0,
            loss=sum(losses) / len(losses) if losses else 0.0,
            response_length=float(mask.sum(1).float().mean()),
            frac_groups_with_signal=float(signal),
            malformed=sum(map(_malformed, responses)) / len(responses),
            correct_length=_correct_length(responses, r),
            extra={k: sum(v) / len(v) for k, v in extra.items()},
        )
        steps.append(asdict(log))
        if step == config.steps:
            acc, w = question_weights(
                method, old_log_probs, mask, r, group_ids, config, task.max_answer_tokens
            )
            last_batch = {"accuracy": acc, "weight": w}
        if step % config.eval_every == 0 or step == config.steps:
            te = time.perf_counter()
            evals.append(
                (step, evaluate(model, test_set, task, samples=config.eval_samples, seed=seed))
            )
            eval_seconds += time.perf_counter() - te
        if bar is not None:
            bar.update(1)
            post = {"reward": f"{log.reward:.3f}", "H": f"{log.entropy:.3f}"}
            if evals:
                e = evals[-1][1]
                post["test"] = f"{sum(e.sampled_sum.values()) / sum(e.n.values()):.3f}"
            bar.set_postfix(post, refresh=False)
    if bar is not None:
        bar.close()
    return {
        "steps": steps,
        "evals": [(s, e._asdict()) for s, e in evals],
        "last_batch": last_batch,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "eval_seconds": eval_seconds,
    }


def _correct_length(responses: Sequence[Sequence[int]], r: Tensor) -> float:
    lengths = [len(x) for x, ri in zip(responses, r.tolist()) if ri > 0.5]
    return sum(lengths) / len(lengths) if lengths else 0.0


def _malformed(response: Sequence[int]) -> bool:
    from discoloss.demo.task import EOS, VOCAB

    digits = {VOCAB.index(d) for d in "0123456789"}
    body = list(response)
    if not body or body[-1] != EOS:
        return True
    return len(body) == 1 or any(t not in digits for t in body[:-1])


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs and platforms)."""
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _split(items: list[int], k: int) -> list[list[int]]:
    """``items`` into ``k`` contiguous chunks of near-equal size."""
    size, rem = divmod(len(items), k)
    out, start = [], 0
    for i in range(k):
        end = start + size + (1 if i < rem else 0)
        out.append(items[start:end])
        start = end
    return out
