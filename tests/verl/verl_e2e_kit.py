"""What a CPU run of verl's ``main_ppo`` needs, made in code: a tiny random Qwen2 model, a
byte-level BPE tokenizer trained on the task's alphabet, the task's data and reward, and a
launcher with the overrides that the CPU stand-ins (:mod:`verl_cpu`) need.

The task (learnable by a random 2-layer model in a few steps): every prompt is a unique
string of letters; a response is correct (reward 1) iff its first character is one of
:data:`GOOD` (about a third of the alphabet), else 0.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
GOOD = "abcdefgh"
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}>{% endif %}"
)

REWARD_SOURCE = f"""
GOOD = {GOOD!r}


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    text = solution_str.strip()
    return 1.0 if text[:1] in GOOD and text[:1] != "" else 0.0
"""


def reward_of(text: str) -> float:
    """The task's reward (the same rule as the reward file handed to verl)."""
    text = text.strip()
    return 1.0 if text[:1] != "" and text[:1] in GOOD else 0.0


def p_good(model: Any, tok: Any, prompts: list[str]) -> float:
    """The policy's exact probability that the first response token starts with a GOOD
    letter (no sampling), averaged over ``prompts``: the task's expected reward, up to
    responses whose first token is blank."""
    import torch

    good = torch.tensor(
        [
            tok.decode([i]).strip()[:1] in GOOD and tok.decode([i]).strip() != ""
            for i in range(len(tok))
        ]
    )
    total = 0.0
    with torch.no_grad():
        for q in prompts:
            text = tok.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            )
            ids = torch.tensor([tok.encode(text)])
            probs = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)
            total += float(probs[: len(good)][good[: probs.shape[0]]].sum())
    return total / len(prompts)


def make_tokenizer(out: Path) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [ALPHABET, "\n", ">", " ".join(ALPHABET)] + [
        "".join(ALPHABET[(i * 7 + j) % 26] for j in range(12)) for i in range(200)
    ]
    # the alphabet of the corpus only (no 256-byte alphabet): most tokens are letters
    trainer = trainers.BpeTrainer(vocab_size=64, special_tokens=[EOS], show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=EOS, bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def raise_eos(model: Any, eos: int, vocab: int, *, p_eos: float, seed: int = 0) -> None:
    """Tune ``model`` so that it ends a response with probability ~``p_eos`` at every token
    (a random model ends almost none before the length cap, so all its responses would have the
    same length): a few Adam steps on random token sequences pulling the EOS log-odds at every
    position towards log(p_eos / (1 - p_eos)). Deterministic (seeded)."""
    import math

    import torch

    g = torch.Generator().manual_seed(seed)
    target = math.log(p_eos / (1 - p_eos))
    others = torch.tensor([i for i in range(vocab) if i != eos])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~1 s; several threads on a busy machine took 100 times longer
    try:
        for _ in range(150):
            ids = others[torch.randint(len(others), (32, 12), generator=g)]
            logits = model(input_ids=ids).logits.float()
            rest = torch.cat([logits[..., :eos], logits[..., eos + 1 :]], -1)
            odds = logits[..., eos] - torch.logsumexp(rest, -1)
            loss = (odds - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)


def make_model(out: Path, seed: int = 0, p_eos: float | None = None) -> Path:
    """A random 2-layer Qwen2 (hidden 64) and its tokenizer, saved to ``out``; with ``p_eos``,
    tuned to end a response with about that probability at every token (:func:`raise_eos`:
    responses of many lengths)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.eos_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    if p_eos is not None:
        raise_eos(model, tok.eos_token_id, len(tok), p_eos=p_eos, seed=seed)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    # check the tokenizer survives verl's loading path (transformers picks the class by type)
    again = AutoTokenizer.from_pretrained(out)
    text = again.apply_chat_template(
        [{"role": "user", "content": "abc"}], add_generation_prompt=True, tokenize=False
    )
    assert again.decode(again.encode(text)) == text, (text, again.encode(text))
    return out


def make_data(out: Path, n_train: int, n_val: int = 4, seed: int = 0) -> tuple[Path, Path]:
    import random

    import pandas as pd

    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n_train + n_val:
        # prompts of different lengths: micro-batches of different sizes pad differently
        q = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(2, 9)))
        if q in seen:
            continue
        seen.add(q)
        rows.append(
            {
                "data_source": "disco_first_letter",
                "prompt": [{"role": "user", "content": q}],
                "ability": "toy",
                "reward_model": {"style": "rule", "ground_truth": GOOD},
                "extra_info": {"index": len(rows)},
            }
        )
    out.mkdir(parents=True, exist_ok=True)
    train, val = out / "train.parquet", out / "val.parquet"
    pd.DataFrame(rows[:n_train]).to_parquet(train)
    pd.DataFrame(rows[n_train:]).to_parquet(val)
    return train, val


@dataclass
class Run:
    rc: int | None
    where: str  # exited | reached | timeout
    log: str
    wall_s: float
    record: Path
    metrics: list[dict] = field(default_factory=list)

    def metric(self, name: str) -> list[float]:
        return [m[name] for m in self.metrics if name in m]

    def jsonl(self, prefix: str) -> dict[int, list[dict]]:
        out = {}
        for p in sorted(self.record.glob(f"{prefix}*.jsonl")):
            rank = int(p.stem[len(prefix) :])
            out[rank] = [json.loads(line) for line in p.read_text().splitlines() if line]
        return out


def base_overrides(
    model: Path,
    train: Path,
    val: Path,
    work: Path,
    *,
    gpus: int,
    steps: int,
    questions: int = 4,
    mini: int | None = None,
    n: int = 4,
    micro: int = 4,
    log_prob_micro: int = 8,
    lr: float = 1e-2,
) -> list[str]:
    reward = work / "reward.py"
    reward.write_text(REWARD_SOURCE)
    a = "actor_rollout_ref."
    return [
        "algorithm.adv_estimator=disco",
        f"{a}actor.policy_loss.loss_mode=disco",
        f"{a}rollout.n={n}",
        f"data.train_batch_size={questions}",
        f"{a}actor.ppo_mini_batch_size={mini or questions}",
        f"{a}actor.ppo_micro_batch_size_per_gpu={micro}",
        # a different micro-batching of the old log-probs than of the update, as in the README
        f"{a}rollout.log_prob_micro_batch_size_per_gpu={log_prob_micro}",
        f"{a}actor.entropy_coeff=0",
        f"{a}actor.use_kl_loss=false",
        f"{a}actor.optim.lr={lr}",
        f"{a}actor.strategy=fsdp2",
        f"{a}model.path={model}",
        f"{a}model.use_remove_padding=false",
        f"+{a}model.override_config.attn_implementation=sdpa",
        f"{a}rollout.name=hf",
        f"{a}rollout.tensor_model_parallel_size=1",
        f"{a}rollout.agent.num_workers=1",
        f"{a}rollout.temperature=1.0",
        f"{a}rollout.prompt_length=16",
        f"{a}rollout.response_length=6",
        "data.max_prompt_length=16",
        "data.max_response_length=6",
        f"data.train_files={train}",
        f"data.val_files={val}",
        "data.dataloader_num_workers=0",
        "data.shuffle=false",
        f"reward.custom_reward_function.path={reward}",
        "reward.custom_reward_function.name=compute_score",
        "trainer.device=cpu",
        f"trainer.n_gpus_per_node={gpus}",
        "trainer.nnodes=1",
        f"trainer.total_training_steps={steps}",
        "trainer.total_epochs=1000",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.logger=[console,file]",
        "trainer.project_name=disco_e2e",
        "trainer.experiment_name=cpu",
        f"trainer.default_local_dir={work}/ckpt",
        "ray_kwargs.ray_init.num_cpus=16",
        f"+ray_kwargs.ray_init.num_gpus={gpus}",
        "+ray_kwargs.ray_init.include_dashboard=false",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    ]


def launch(
    args: list[str],
    work: Path,
    *,
    deadline: float,
    stop_at: str | None = None,
    env: dict[str, str] | None = None,
    harness: bool = True,
) -> Run:
    """``python -m verl.trainer.main_ppo ARGS`` in its own session, killed (with its Ray
    cluster) at ``deadline`` seconds or when a line contains ``stop_at``."""
    work.mkdir(parents=True, exist_ok=True)
    record = work / "record"
    record.mkdir(exist_ok=True)
    ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # AF_UNIX paths are limited to 107 bytes
    metrics_file = work / "metrics.jsonl"
    full_env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DEDUP_LOGS": "0",
        "HYDRA_FULL_ERROR": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "VERL_FILE_LOGGER_PATH": str(metrics_file),
        **(env or {}),
    }
    if harness:
        full_env.update(
            {
                "PYTHONPATH": os.pathsep.join(
                    [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
                ),
                "VERL_USE_EXTERNAL_MODULES": "verl_cpu",
                "VERL_ENGINE_DEVICE": "cuda",
                "DISCO_E2E_DIR": str(record),
            }
        )
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "verl.trainer.main_ppo", *args, f"hydra.run.dir={work}/hydra"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=work,
        start_new_session=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    out: list[str] = []
    where = "timeout"
    end = start + deadline
    live = (work / "main_ppo.log").open("w")
    try:
        while time.monotonic() < end:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            if line is None:
                where = "exited"
                break
            out.append(line)
            live.write(line)
            live.flush()
            if stop_at is not None and stop_at in line:
                where = "reached"
                break
    finally:
        live.close()
        stop(proc, ray_tmp)
    wall = time.monotonic() - start
    metrics = []
    if metrics_file.exists():
        for line in metrics_file.read_text().splitlines():
            if line.strip():
                item = json.loads(line)
                metrics.append({"step": item.get("step"), **item.get("data", {})})
    return Run(
        proc.returncode if where == "exited" else None, where, "".join(out), wall, record, metrics
    )


def stop(proc: subprocess.Popen, ray_tmp: str) -> None:
    """End the driver and every process of its Ray cluster (its session and Ray's own)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # lets the driver shut its Ray cluster down
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    # Ray's processes of this cluster (raylet, GCS, workers) keep running after a killed
    # driver: find them by the cluster's temp dir in their command line and end them by pid.
    me = os.getpid()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == me:
            continue
        try:
            cmd = (pid_dir / "cmdline").read_bytes().decode(errors="replace")
            env = (pid_dir / "environ").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if ray_tmp in cmd or f"RAY_TMPDIR={ray_tmp}\0" in env:
            try:
                os.kill(int(pid_dir.name), signal.SIGKILL)
            except OSError:
                pass
    shutil.rmtree(ray_tmp, ignore_errors=True)
