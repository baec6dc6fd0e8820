"""Run ``python -m discoloss.adapters.openrlhf.train_ppo_ray`` on CPU with the stand-ins of this
folder, under a hard timeout, and leave no Ray process behind.

Used by tests/openrlhf/test_openrlhf_e2e.py; also runnable by hand::

    python tests/openrlhf/e2e/run.py OUT_DIR [--ranks 2] [extra launcher flags...]
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
STANDINS = TESTS / "standins"

N = 4  # responses per question
PROMPTS_PER_STEP = 5  # 20 samples: each of the 2 ranks gets 10, question 2 is split between them
WORDS = [f"w{i}" for i in range(4, 32)]


def write_prompts(path: Path, num_prompts: int) -> str:
    """``num_prompts`` prompts of 3 words; each label is half of the vocabulary's words."""
    with open(path, "w") as f:
        for p in range(num_prompts):
            prompt = " ".join(WORDS[(p * 5 + k * 3) % len(WORDS)] for k in range(3))
            label = " ".join(WORDS[(p + k) % len(WORDS)] for k in range(0, len(WORDS), 2))
            f.write(json.dumps({"input": prompt, "label": label}) + "\n")
    return str(path)


def launcher_flags(model: str, prompts: str, out: Path, ranks: int, *, micro: int = 1
                   ) -> list[str]:
    """The launcher's flags: DisCO; per PPO step 5 questions of 4 responses, 2 optimizer steps
    (train.batch_size = half a rollout), micro-batches of ``micro`` responses; ZeRO-0 on CPU;
    one rollout engine (the stand-in)."""
    samples = PROMPTS_PER_STEP * N
    return [
        "--actor.model_name_or_path", model,
        "--reward.remote_url", str(HERE / "reward_first_word.py"),
        "--data.prompt_dataset", prompts, "--data.input_key", "input",
        "--data.label_key", "label", "--data.max_len", "16",
        "--rollout.n_samples_per_prompt", str(N), "--rollout.batch_size", str(PROMPTS_PER_STEP),
        "--rollout.micro_batch_size", "2", "--rollout.max_new_tokens", "6",
        "--train.batch_size", str(samples // 2), "--train.micro_batch_size", str(micro),
        "--train.seed", "1",
        "--actor.num_nodes", "1", "--actor.num_gpus_per_node", str(ranks),
        "--actor.adam.lr", "1e-2", "--actor.lr_scheduler", "constant",
        "--vllm.num_engines", "1", "--vllm.tensor_parallel_size", "1",
        "--ds.zero_stage", "0", "--ds.attn_implementation", "sdpa",
        "--algo.kl.init_coef", "0",
        "--ckpt.output_dir", str(out / "model"), "--ckpt.path", str(out / "ckpt"),
        "--algo.advantage.estimator", "disco",
        "--algo.disco.tau", "5", "--algo.disco.delta", "1e-3", "--algo.disco.beta", "100",
    ]


@dataclass
class Result:
    returncode: int | None  # None: killed at the timeout
    output: str
    wall_s: float
    leaked: list[int]  # Ray processes still alive after the driver ended (then killed)


def _pids_using(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        text = ""
        for name in ("cmdline", "environ"):  # Ray's workers rename themselves (ray::...)
            try:
                with open(f"/proc/{entry}/{name}", "rb") as f:
                    text += f.read().decode(errors="replace")
            except OSError:
                pass
        if marker in text:
            pids.append(int(entry))
    return pids


def run_launcher(args: list[str], out: Path, *, ranks: int, timeout: float,
                 env: dict[str, str] | None = None) -> Result:
    """Run the launcher in a new session; on timeout kill its process group. Afterwards every
    process whose command line or environment names this run's Ray temp dir is ours (Ray's
    processes inherit the driver's environment): report and kill it."""
    out.mkdir(parents=True, exist_ok=True)
    ray_tmp = tempfile.mkdtemp(prefix="dlray", dir="/tmp")  # short: Ray's socket paths
    path = [str(HERE), str(STANDINS), *[p for p in os.environ.get("PYTHONPATH", "").split(
        os.pathsep) if p]]
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        "DISCOLOSS_OPENRLHF_CPU": "1", "DISCOLOSS_E2E_OUT": str(out),
        "DISCOLOSS_E2E_GPUS": str(ranks), "DISCOLOSS_E2E_RAY_TMP": ray_tmp,
        "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    full_env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "discoloss.adapters.openrlhf.train_ppo_ray", *args]
    start = time.monotonic()
    with open(out / "launcher.log", "w") as log:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=out)
        try:
            returncode: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            returncode = None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    wall = time.monotonic() - start
    leaked = []
    for _ in range(20):  # Ray's processes stop on their own shortly after the driver
        leaked = _pids_using(ray_tmp)
        if not leaked:
            break
        time.sleep(0.5)
    for pid in leaked:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return Result(returncode, (out / "launcher.log").read_text(errors="replace"), wall, leaked)


def read_jsonl(out: Path, pattern: str) -> dict[str, list[dict]]:
    return {p.name: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted(out.glob(pattern))}


def main() -> None:
    import argparse

    sys.path.insert(0, str(TESTS))
    from orlhf_testkit import save_tiny_model_with_tokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=3 * PROMPTS_PER_STEP)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--fault", default=None, help="DISCOLOSS_E2E_FAULT (see orlhf_cpu)")
    parser.add_argument("--micro", type=int, default=1, help="--train.micro_batch_size")
    parser.add_argument("--trace", action="store_true", help="DISCOLOSS_E2E_TRACE=1")
    known, extra = parser.parse_known_args()
    out = known.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model = save_tiny_model_with_tokenizer(out / "tiny")
    prompts = write_prompts(out / "prompts.jsonl", known.prompts)
    env = {"DISCOLOSS_E2E_FAULT": known.fault} if known.fault else {}
    if known.trace:
        env["DISCOLOSS_E2E_TRACE"] = "1"
    result = run_launcher([*launcher_flags(model, prompts, out, known.ranks, micro=known.micro),
                           *extra], out, ranks=known.ranks, timeout=known.timeout, env=env)
    print(result.output[-4000:])
    print(f"returncode={result.returncode} wall={result.wall_s:.0f}s leaked={result.leaked}")


if __name__ == "__main__":
    main()
