"""Shared helpers of the TRL adapter tests: the example script's builders, a trainer that records
what TRL fed it, and a naive DisCO reference written from the formulas (DESIGN.md sections 1-2).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import trl  # noqa: E402,F401  (the engine itself: a missing TRL must fail, never skip)
from discoloss.adapters.trl import DisCOConfig, DisCOTrainer  # noqa: E402
from torch import Tensor  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "adapters" / "trl" / "examples" / "train_disco_trl.py"
README = ROOT / "docs" / "guides" / "trl.md"  # the TRL guide


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_two_processes(worker: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``worker`` on two processes with accelerate's multi-process launcher (torchrun
    underneath; with use_cpu=True the Trainer joins a gloo process group and wraps the model
    in DDP on CPU). Hard timeout: a hang fails the test."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
        str(worker), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=420, env=env)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def load_example() -> Any:
    """The example script as a module (the very file the README shows)."""
    name = "train_disco_trl"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def tiny_config(output_dir: str, **overrides: Any) -> DisCOConfig:
    """A CPU, float32, no-clipping, log-every-step DisCOConfig for tests."""
    options: dict[str, Any] = dict(
        output_dir=output_dir,
        num_generations=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_completion_length=4,
        temperature=1.0,
        learning_rate=1e-2,
        max_grad_norm=0.0,
        max_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
    )
    options.update(overrides)
    return DisCOConfig(**options)


class RecordingTrainer(DisCOTrainer):
    """Records every micro-batch TRL hands to the loss (a test-only subclass, no patching)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.micro_batches: list[dict[str, Any]] = []
        self.planning_passes: list[int] = []  # optimizer steps (0-based) that replanned

    def _plan_at_current_parameters(self, chunks: list[dict[str, Any]]) -> None:
        self.planning_passes.append(self.state.global_step)
        super()._plan_at_current_parameters(chunks)

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Tensor:
        record = {
            k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in inputs.items()
        }
        record["optimizer_step"] = self.state.global_step
        self.micro_batches.append(record)
        return super()._compute_loss(model, inputs)


class GradRecorder(TrainerCallback):
    """Parameters at the start of each optimizer step and the gradient it applies."""

    def __init__(self) -> None:
        self.params: list[dict[str, Tensor]] = []
        self.grads: list[dict[str, Tensor]] = []

    def on_step_begin(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def on_pre_optimizer_step(
        self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any
    ) -> None:
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        )


def make_recording_trainer(
    config: DisCOConfig, reward_funcs: Any = None
) -> tuple[RecordingTrainer, GradRecorder]:
    ex = load_example()
    recorder = GradRecorder()
    trainer = RecordingTrainer(
        model=ex.build_model(),
        reward_funcs=reward_funcs or ex.parity_reward,
        args=config,
        train_dataset=ex.build_dataset(),
        processing_class=ex.build_tokenizer(),
        callbacks=[recorder],
    )
    return trainer, recorder


# ---------------------------------------------------------------------- naive reference


def reference_model(params: dict[str, Tensor]) -> torch.nn.Module:
    model = load_example().build_model()
    model.load_state_dict(params, strict=False)
    model.train()
    return model


def token_log_probs(model: torch.nn.Module, mb: dict[str, Any]) -> Tensor:
    """log pi(o_t | q, o_<t) of the completion tokens, from plain logits (temperature 1)."""
    ids = torch.cat([mb["prompt_ids"], mb["completion_ids"]], dim=1)
    attention = torch.cat([mb["prompt_mask"], mb["completion_mask"]], dim=1)
    width = mb["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -width - 1 : -1].float()
    return logits.log_softmax(-1).gather(-1, mb["completion_ids"].unsqueeze(-1)).squeeze(-1)


def naive_scores(logp: Tensor, old: Tensor, mask: Tensor, score: str) -> Tensor:
    m = mask.bool()
    values = logp if score == "log_likelihood" else torch.exp(logp - old)
    return torch.where(m, values, 0.0).sum(1) / m.sum(1)


def naive_weights(
    scores: Tensor,
    rewards: Tensor,
    groups: Tensor,
    *,
    objective: str,
    tau: float,
    threshold: float = 0.5,
) -> Tensor:
    """dJ/ds (DESIGN.md section 2), normalised by all groups."""
    w = torch.zeros_like(scores)
    unique = groups.unique()
    num_groups = len(unique)
    for g in unique:
        pos = (groups == g) & (rewards > threshold)
        neg = (groups == g) & ~(rewards > threshold)
        if pos.any() and neg.any():
            w[pos] = 1.0 / (pos.sum() * num_groups)
            if objective == "disco_b":
                w[neg] = -1.0 / (neg.sum() * num_groups)
            else:
                w[neg] = -torch.softmax(scores[neg] / tau, dim=0) / num_groups
    return w


def naive_kl_sum(logp: Tensor, old: Tensor, mask: Tensor, estimator: str) -> Tensor:
    d = old - logp  # log pi_old / pi_theta
    per_token = d if estimator == "k1" else torch.exp(-d) - 1 + d
    return torch.where(mask.bool(), per_token, 0.0).sum()


def hinge(kl: Tensor, delta: float, beta: float) -> Tensor:
    return beta / 2 * torch.clamp(kl - delta, min=0.0) ** 2


def prompt_answers(tokenizer: Any, mb: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Decoded prompts and the true sums, recomputed from the prompt text."""
    prompts = tokenizer.batch_decode(mb["prompt_ids"], skip_special_tokens=True)
    answers = [str(sum(int(x) for x in p.rstrip("=").split("+"))) for p in prompts]
    return prompts, answers


# ---------------------------------------------------------------------- comparisons

TENSOR_KEYS = (
    "prompt_ids",
    "prompt_mask",
    "completion_ids",
    "completion_mask",
    "old_per_token_logps",
    "disco_rewards",
    "disco_group_ids",
)


def concat(mbs: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Rows of several micro-batches, padded to a common completion width."""
    width = max(mb["completion_ids"].size(1) for mb in mbs)
    plen = max(mb["prompt_ids"].size(1) for mb in mbs)
    out: dict[str, list[Tensor]] = {k: [] for k in TENSOR_KEYS}
    for mb in mbs:
        for k in TENSOR_KEYS:
            v = mb[k]
            if k.startswith("prompt"):
                v = torch.nn.functional.pad(v, (plen - v.size(1), 0))
            elif v.dim() == 2:
                v = torch.nn.functional.pad(v, (0, width - v.size(1)))
            out[k].append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def check_generation_batch(tokenizer: Any, rows: dict[str, Tensor], num_generations: int) -> Tensor:
    """Rewards recomputed from the decoded text; group ids consistent with the prompts."""
    ex = load_example()
    tok = tokenizer
    prompts, answers = prompt_answers(tok, rows)
    completions = tok.batch_decode(rows["completion_ids"], skip_special_tokens=True)
    rewards = torch.tensor(ex.parity_reward(completions, answers), dtype=torch.float64)
    torch.testing.assert_close(rows["disco_rewards"], rewards)
    groups = rows["disco_group_ids"]
    for g in groups.unique():
        members = [p for p, gg in zip(prompts, groups.tolist()) if gg == g]
        assert len(members) == num_generations and len(set(members)) == 1
    return rewards


def assert_masked_close(actual: Tensor, expected: Tensor, mask: Tensor) -> None:
    m = mask.bool()
    torch.testing.assert_close(actual[m], expected[m], rtol=1e-5, atol=1e-5)


def assert_grads_close(actual: dict[str, Tensor], model: torch.nn.Module) -> None:
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=2e-4, atol=2e-6, msg=name)


def relative_error(actual: dict[str, Tensor], model: torch.nn.Module) -> float:
    """||actual - expected|| / ||expected|| over all parameters (expected: ``model``'s grads)."""
    expected = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert expected.keys() == actual.keys()
    diff = torch.cat([(actual[n] - g).flatten() for n, g in expected.items()]).norm()
    return float(diff / torch.cat([g.flatten() for g in expected.values()]).norm())
