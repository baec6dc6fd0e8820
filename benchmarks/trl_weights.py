"""DisCOTrainer (TRL): what ``weights="current"`` costs and how far ``weights="sampling"`` drifts.

    python -m benchmarks.trl_weights                 # in an environment with the [trl] extra
    python -m benchmarks.trl_weights --quick         # seconds: a smoke test of the command

Two runs of the real TRL trainer (``DisCOTrainer``, ``weights="current"``) on the example's
``a+b=`` task with a randomly initialised Llama, a generation batch reused for several
optimizer steps (``num_iterations``):

* **drift**: at every optimizer step that is not the first on its generation batch (where the
  two sources of weights coincide), the gradient the step applies (exact: the gradient of
  ``disco_loss`` on the generation batch at the current parameters) is compared with the
  gradient that ``weights="sampling"`` would apply at the same parameters on the same
  micro-batches (the sampling policy's weights, the per-micro-batch penalty), computed on the
  side with ``torch.autograd.grad`` from a second forward pass, and with a hybrid (sampling
  weights, exact penalty slope) that separates the two sources of error. Reported: cosine and
  relative norm difference ``|g - g_exact| / |g_exact|``, by use of the generation batch.
* **cost**: the same run without the side computation; per replanned optimizer step, the wall
  time of the planning pass (the no-grad forward over the generation batch, the gather and the
  plan) against the time of the step's training micro-batches (forward + backward), measured
  side by side in the same steps; and the wall time of a whole ``weights="sampling"`` run of
  the same configuration against the ``current`` one.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from discoloss.adapters.trl import DisCOConfig, DisCOTrainer  # noqa: E402
from torch import Tensor  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PrinterCallback, TrainerCallback  # noqa: E402

from discoloss.accumulation import micro_batch_loss  # noqa: E402

__all__ = ["main"]

EXAMPLE = Path(__file__).resolve().parents[1] / "adapters/trl/examples/train_disco_trl.py"


def load_example() -> Any:
    """The TRL example script as a module: its tokenizer, dataset and reward."""
    spec = importlib.util.spec_from_file_location("train_disco_trl", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_model(hidden: int, layers: int, vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


class TimedTrainer(DisCOTrainer):
    """Records the planning pass's wall time and each micro-batch's training time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.planning: list[float] = []  # one entry per optimizer step (0.0: not replanned)
        self.training: list[float] = []  # one entry per optimizer step
        self._planned = 0.0

    def _plan_at_current_parameters(self, chunks: list[dict[str, Any]]) -> None:
        start = time.perf_counter()
        super()._plan_at_current_parameters(chunks)
        self._planned = time.perf_counter() - start

    def training_step(self, model: Any, inputs: Any, num_items_in_batch: Any) -> Tensor:
        ga = self.args.gradient_accumulation_steps
        first = self._step % ga == 0
        if first:
            self._planned, self._step_time, self._generated = 0.0, 0.0, False
        buffered = self._buffered_inputs
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step_time += time.perf_counter() - start
        self._generated |= self._buffered_inputs is not buffered
        if self._step % ga == 0:  # the step's last micro-batch
            # steps that generated are left out: their time includes the generation
            self.planning.append(math.nan if self._generated else self._planned)
            self.training.append(math.nan if self._generated else self._step_time - self._planned)
        return loss


class DriftTrainer(DisCOTrainer):
    """``weights="current"``, plus, on the side, the gradient ``weights="sampling"`` would apply
    (and a hybrid: sampling weights, exact penalty slope) on the same micro-batches."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.side: dict[str, list[Tensor]] = {}
        self.replanned = False

    def _generate_and_score_completions(self, inputs: Any) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        # the generation's plan is the sampling policy's; it travels with the rows
        output["bench_sampling_weights"] = output["disco_weights"].clone()
        return output

    def _plan_at_current_parameters(self, chunks: list[dict[str, Any]]) -> None:
        super()._plan_at_current_parameters(chunks)
        self.replanned = True

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> Tensor:
        loss = super()._compute_loss(model, inputs)
        if not (self.model.training and self.replanned):
            return loss
        args = self._disco_args
        plan = self._disco_plan
        assert plan is not None
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model, ids, attention, inputs["completion_ids"].size(1)
        )
        k = args.steps_per_generation // args.gradient_accumulation_steps
        common = dict(
            score=args.score,
            kl_estimator=args.kl_estimator,
            delta=args.disco_delta,
            beta=args.disco_beta,
            constraint=args.constraint,
            multiplier=self.disco_multiplier,
            rewards=inputs["disco_rewards"],
            threshold=args.threshold,
            validate=False,
        )
        w = inputs["bench_sampling_weights"] * k
        mask = inputs["completion_mask"]
        old = inputs["old_per_token_logps"]
        losses = {
            "sampling": micro_batch_loss(
                logps, old, mask, w, num_tokens=inputs["disco_num_tokens"], kl_coef=None, **common
            ).loss,
            "hybrid": micro_batch_loss(
                logps, old, mask, w, num_tokens=plan.num_tokens, kl_coef=plan.kl_coef * k, **common
            ).loss,
        }
        params = [p for p in model.parameters() if p.requires_grad]
        for i, (name, value) in enumerate(losses.items()):
            grads = torch.autograd.grad(value, params, retain_graph=i + 1 < len(losses))
            acc = self.side.setdefault(name, [torch.zeros_like(p) for p in params])
            for a, g in zip(acc, grads):
                a.add_(g)
        return loss


class DriftRecorder(TrainerCallback):
    """Compares the applied gradient with the side gradients before each optimizer step."""

    def __init__(self, trainer: DriftTrainer) -> None:
        self.trainer = trainer
        self.rows: list[dict[str, float]] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        t = self.trainer
        step = state.global_step  # optimizer steps already taken
        a = t.args
        per_generation = a.num_iterations * a.steps_per_generation // a.gradient_accumulation_steps
        use = step % per_generation  # 0: the first optimizer step on its generation batch
        if t.replanned:
            params = [p for p in t.model.parameters() if p.requires_grad]
            exact = torch.cat([p.grad.flatten() for p in params]).double()
            row = {"step": step + 1, "use": use + 1}
            for name, grads in t.side.items():
                g = torch.cat([x.flatten() for x in grads]).double()
                row[f"{name}_cos"] = float(torch.nn.functional.cosine_similarity(g, exact, dim=0))
                row[f"{name}_rel"] = float((g - exact).norm() / exact.norm())
            assert t._disco_plan is not None
            row["kl"] = float(t._disco_plan.kl)
            self.rows.append(row)
        t.side, t.replanned = {}, False


def make_config(out: str, opts: argparse.Namespace, weights: str) -> DisCOConfig:
    return DisCOConfig(
        output_dir=out,
        weights=weights,
        num_generations=opts.num_generations,
        per_device_train_batch_size=opts.micro_batch,
        gradient_accumulation_steps=opts.ga,
        steps_per_generation=opts.steps_per_generation,
        num_iterations=opts.num_iterations,
        max_completion_length=opts.completion_length,
        temperature=1.0,
        learning_rate=opts.lr,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        max_steps=opts.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        disable_tqdm=True,
        seed=opts.seed,
    )


def run(kind: type[DisCOTrainer], opts: argparse.Namespace, weights: str) -> DisCOTrainer:
    ex = load_example()
    with tempfile.TemporaryDirectory() as out:
        trainer = kind(
            model=build_model(opts.hidden, opts.layers, len(ex.VOCAB), opts.seed),
            reward_funcs=ex.parity_reward,
            args=make_config(out, opts, weights),
            train_dataset=ex.build_dataset(max(64, 4 * opts.steps * opts.micro_batch)),
            processing_class=ex.build_tokenizer(),
        )
        trainer.remove_callback(PrinterCallback)  # the per-step log lines
        if isinstance(trainer, DriftTrainer):
            trainer.add_callback(DriftRecorder(trainer))
        trainer.train()
    return trainer


def summarise(values: list[float]) -> dict[str, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return {}
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps of a tiny model")
    parser.add_argument("--steps", type=int, default=32, help="optimizer steps per run")
    parser.add_argument("--num-iterations", type=int, default=4)
    parser.add_argument("--steps-per-generation", type=int, default=2)
    parser.add_argument("--ga", type=int, default=2, help="gradient_accumulation_steps")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--completion-length", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-cost", action="store_true", help="the drift run only")
    parser.add_argument("--skip-drift", action="store_true", help="the cost runs only")
    parser.add_argument("--json", type=Path, help="write the results here")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.steps, opts.hidden, opts.layers, opts.micro_batch = 2, 32, 2, 8
        opts.completion_length = 4
    torch.set_num_threads(opts.threads)
    k = opts.steps_per_generation // opts.ga
    print(
        f"{platform.machine()} {platform.processor() or ''} python {platform.python_version()} "
        f"torch {torch.__version__}, {opts.threads} thread(s); model hidden {opts.hidden} x "
        f"{opts.layers} layers; {opts.micro_batch} completions per micro-batch, ga {opts.ga}, "
        f"steps_per_generation {opts.steps_per_generation} (k = {k}), num_iterations "
        f"{opts.num_iterations}, lr {opts.lr}, {opts.steps} optimizer steps"
    )
    results: dict[str, Any] = {"options": vars(opts) | {"json": None}}

    if not opts.skip_drift:
        drift = run(DriftTrainer, opts, "current")
        recorder = next(c for c in drift.callback_handler.callbacks if isinstance(c, DriftRecorder))
        rows = recorder.rows
        results["drift"] = rows
        print("\ndrift of weights='sampling' from the exact gradient (replanned steps)")
        print("use  steps  kl median  sampling cos  sampling |dg|/|g|  hybrid cos  hybrid |dg|/|g|")
        for use in sorted({r["use"] for r in rows}):
            sel = [r for r in rows if r["use"] == use]
            med = {key: statistics.median(r[key] for r in sel) for key in sel[0] if key != "step"}
            print(
                f"{use:3d}  {len(sel):5d}  {med['kl']:9.2e}  {med['sampling_cos']:12.4f}  "
                f"{med['sampling_rel']:17.4f}  {med['hybrid_cos']:10.4f}  {med['hybrid_rel']:15.4f}"
            )
        if rows:
            results["drift_summary"] = {
                key: summarise([r[key] for r in rows])
                for key in ("kl", "sampling_cos", "sampling_rel", "hybrid_cos", "hybrid_rel")
            }
            print("all  " + json.dumps(results["drift_summary"]))

    if not opts.skip_cost:
        start = time.perf_counter()
        timed = run(TimedTrainer, opts, "current")
        current_s = time.perf_counter() - start
        assert isinstance(timed, TimedTrainer)
        ratios = [
            p / t for p, t in zip(timed.planning, timed.training) if not math.isnan(p) and p > 0.0
        ]
        start = time.perf_counter()
        run(DisCOTrainer, opts, "sampling")
        sampling_s = time.perf_counter() - start
        results["cost"] = {
            "planning_over_training": summarise(ratios),
            "planning_s": summarise([p for p in timed.planning if p > 0.0]),
            "training_s": summarise(timed.training),
            "replanned_steps": len(ratios),
            "run_s": {"sampling": sampling_s, "current": current_s},
        }
        print("\ncost of weights='current'")
        print(
            "planning pass / training micro-batches of the step: " + json.dumps(summarise(ratios))
        )
        print(
            f"whole run: sampling {sampling_s:.1f} s, current {current_s:.1f} s "
            f"(ratio {current_s / sampling_s:.3f})"
        )
    if opts.json is not None:
        opts.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
