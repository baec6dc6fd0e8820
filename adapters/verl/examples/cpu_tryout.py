"""Try DisCO in verl on a laptop without a GPU: a TRYOUT, not a training setup.

Runs verl 0.9.1's own ``python -m verl.trainer.main_ppo`` with ``algorithm.adv_estimator=disco``
for a few steps on CPU: a random 2-layer Qwen2 and a byte-level BPE tokenizer made in code, a
toy task (a response is correct iff its first letter is in a-h), a transformers rollout server
standing in for vLLM and a ``cpu`` platform (gloo, fake Ray GPUs). The stand-ins live in this
project's test suite (``tests/verl/verl_cpu.py``, ``tests/verl/verl_e2e_kit.py``), so run it
from a checkout:

    pip install torch                       # the CPU build is enough
    pip install -e ".[verl]"
    python adapters/verl/examples/cpu_tryout.py --out /tmp/disco_tryout --steps 5

It prints the DisCO metrics of every step (a few minutes, most of it Ray's start-up) and leaves
verl's log, metrics and rollout dump under ``--out``; ``discoloss analyze OUT/run/rollouts``
then reports on the dump. ``--print-command`` only prints the ``main_ppo`` command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests" / "verl"))

import verl_e2e_kit as kit  # noqa: E402

SHOWN = (
    "critic/score/mean",
    "actor/disco/objective",
    "actor/disco/kl",
    "actor/disco/frac_groups_with_signal",
    "actor/disco/whole_questions",
    "actor/grad_norm",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("disco_tryout"))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--ranks", type=int, default=1, help="data-parallel actor ranks (fake GPUs)")
    p.add_argument("--print-command", action="store_true")
    p.add_argument("overrides", nargs="*", help="extra main_ppo overrides (key=value)")
    args = p.parse_args(argv)

    out: Path = args.out.resolve()
    model = kit.make_model(out / "model")
    train, val = kit.make_data(out / "data", n_train=4 * args.steps)
    run_dir = out / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = kit.base_overrides(
        model, train, val, run_dir, gpus=args.ranks, steps=args.steps
    ) + [f"trainer.rollout_data_dir={run_dir / 'rollouts'}", *args.overrides]
    if args.print_command:
        print(shlex.join([sys.executable, "-m", "verl.trainer.main_ppo", *overrides]))
        return 0
    print(f"main_ppo, {args.steps} steps on CPU (log: {run_dir / 'main_ppo.log'}) ...")
    run = kit.launch(overrides, run_dir, deadline=3600)
    for m in run.metrics:
        print(f"step {m['step']}: " + ", ".join(f"{k} {m[k]:.4g}" for k in SHOWN if k in m))
    if run.rc != 0:
        print(run.log[-3000:], file=sys.stderr)
        print(f"main_ppo failed ({run.where}, rc={run.rc})", file=sys.stderr)
        return 1
    print(f"done in {run.wall_s:.0f} s; rollout dump: {run_dir / 'rollouts'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
