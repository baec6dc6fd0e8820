"""OpenRLHF's real PPO loop with DisCO, end to end on CPU.

``python -m discoloss.adapters.openrlhf.train_ppo_ray`` with the DisCO flags runs OpenRLHF's own
``train``: Ray (a local cluster), ``PPOTrainer.fit``, the prompt data loader, generation,
rewards (a ``reward_func`` file), the experience maker, the replay buffer, two DeepSpeed
(ZeRO-0, ``DS_ACCELERATOR=cpu``) actor ranks in Ray actors, the weight sync after every step,
checkpoints and the final save. The adapter runs unmodified: the launcher, the Ray worker setup
hook that installs it in every worker, the ``disco`` estimator, the question-level shuffle, the
all-reduce of the normalisers G and T and the Lagrange multiplier with its checkpoint.

The GPU-only pieces are replaced by test stand-ins (tests/openrlhf/e2e/, installed in every
process by its ``sitecustomize.py``; each says what it replaces):

1. the vLLM rollout actor (``create_vllm_engines``): Ray actors generating with transformers,
   driven by OpenRLHF's own ``SingleTurnAgentExecutor`` (``e2e/rollout_standin.py``);
2. the NCCL group of ``ActorPPOTrainer._init_vllm_sync_group``: a Ray push of each tensor
   OpenRLHF's unmodified ``broadcast_to_vllm`` broadcasts;
3. ``torch.cuda.set_device / synchronize / current_stream / current_device``: no-ops / "cpu";
4. ``init_device_mesh("cuda")`` in OpenRLHF's DeepSpeed strategy: the mesh on "cpu";
5. the replay buffer's ``cuda:<device>`` target device: cpu;
6. DeepSpeed's ``FusedAdam`` (compiled at first use on CPU, minutes): ``torch_adam`` AdamW;
   its shared-memory CPU all-reduce op (compiled at start-up, inference only): not built;
7. ``ray.init`` in the driver: logical GPUs (for OpenRLHF's ``num_gpus=1`` actors) and a private
   temp dir (to find and kill every Ray process of a run).

Plus observation-only probes (``training_step``: each micro-batch's question ids;
``ppo_train``: the status it returns and the multiplier around it; the rollout stand-in: its
weights after each sync and the number of syncs behind each generation).

Each run has a hard timeout and every Ray process it started is killed afterwards. The
``openrlhf_oldest`` session skips this module (``-k``), as it skips the other multi-process
tests.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "e2e"))

from orlhf_testkit import save_tiny_model_with_tokenizer  # noqa: E402
from run import (  # noqa: E402
    PROMPTS_PER_STEP,
    N,
    launcher_flags,
    read_jsonl,
    run_launcher,
    write_prompts,
)

RANKS = 2
STEPS = 3
OPTIMIZER_STEPS_PER_PPO_STEP = 2  # launcher_flags: train.batch_size = half a rollout
MICRO_PER_RANK_PER_STEP = PROMPTS_PER_STEP // RANKS  # one question per micro-batch
TIMEOUT = 420  # seconds per launcher run (2.5-3 minutes each on a loaded 2-core machine)

DISCO_METRICS = ("disco/loss", "disco/objective", "disco/kl", "disco/penalty",
                 "disco/frac_groups_with_signal", "disco/effective_negatives")


def _run(tmp: Path, name: str, steps: int, *extra: str, model: str | None = None) -> tuple:
    out = tmp / name
    out.mkdir(parents=True)
    model = model or save_tiny_model_with_tokenizer(tmp / "tiny")
    prompts = write_prompts(out / "prompts.jsonl", steps * PROMPTS_PER_STEP)
    result = run_launcher([*launcher_flags(model, prompts, out, RANKS), *extra], out,
                          ranks=RANKS, timeout=TIMEOUT)
    assert not result.leaked, f"Ray processes left behind (killed): {result.leaked}"
    assert result.returncode == 0, (
        f"launcher {'timed out' if result.returncode is None else f'exit {result.returncode}'}"
        f" after {result.wall_s:.0f}s:\n{result.output[-6000:]}")
    print(f"{name}: {result.wall_s:.0f}s")
    return out, result, model


#: ``constraint=lagrangian`` with a checkpoint after every step: the run the other tests read
#: also gives the checkpoint the last test resumes from (one launcher start less: most of a run's
#: time is starting Ray, DeepSpeed and the models, not the 3 steps). With the k3 estimator
#: (>= 0) and delta = 0 the multiplier grows as soon as the policy has moved.
LAGRANGIAN = ["--algo.disco.constraint", "lagrangian", "--algo.disco.lagrangian_lr", "1000",
              "--algo.disco.kl_estimator", "k3", "--algo.disco.delta", "0",
              "--ckpt.save_steps", "1", "--ckpt.max_num", "6"]


@pytest.fixture(scope="module")
def disco_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """One run: 2 actor ranks, 3 PPO steps of 2 optimizer steps each, constraint=lagrangian."""
    return _run(tmp_path_factory.mktemp("e2e"), "disco", STEPS, *LAGRANGIAN)


def _per_rank(out: Path, kind: str) -> list[list[dict]]:
    records = read_jsonl(out, f"{kind}_rank*.jsonl")
    assert sorted(records) == [f"{kind}_rank{r}.jsonl" for r in range(RANKS)], sorted(records)
    return [records[f"{kind}_rank{r}.jsonl"] for r in range(RANKS)]


def test_e2e_runs_the_ppo_loop_with_finite_disco_metrics(disco_run):
    """Exit 0, OpenRLHF's step log, finite DisCO metrics in every step's status on both ranks."""
    out, result, _ = disco_run
    assert f"Global step {STEPS}:" in result.output  # OpenRLHF's own step log
    assert "'disco/loss'" in result.output
    for rank, steps in enumerate(_per_rank(out, "ppo_train")):
        assert len(steps) == STEPS, (rank, len(steps))
        for step in steps:
            status = step["status"]
            for key in DISCO_METRICS:
                assert isinstance(status.get(key), float) and math.isfinite(status[key]), (
                    rank, key, status.get(key))
            assert math.isfinite(status["actor_grad_norm"]) and status["actor_grad_norm"] > 0
    # the constraint had something to do: after the first optimizer step of a PPO step the
    # policy had moved away from the rollout policy
    kls = [s["status"]["disco/kl"] for steps in _per_rank(out, "ppo_train") for s in steps]
    assert max(kls) > 0
    assert all("disco/lagrange_multiplier" in s["status"]
               for steps in _per_rank(out, "ppo_train") for s in steps)


def test_e2e_no_question_is_split_across_micro_batches(disco_run):
    """Every micro-batch holds whole questions; per step the ranks hold different questions
    and together all of them."""
    out, _, _ = disco_run
    micro = _per_rank(out, "micro")
    for rank, batches in enumerate(micro):
        assert len(batches) == STEPS * MICRO_PER_RANK_PER_STEP, (rank, len(batches))
        for batch in batches:
            counts = Counter(batch["group_ids"])
            assert set(counts.values()) == {N}, (rank, batch["group_ids"])
    for step in range(STEPS):
        window = slice(step * MICRO_PER_RANK_PER_STEP, (step + 1) * MICRO_PER_RANK_PER_STEP)
        per_rank = [{g for b in batches[window] for g in b["group_ids"]} for batches in micro]
        # each rank holds whole questions, different ones, all of the step's questions
        assert per_rank[0].isdisjoint(per_rank[1])
        assert set().union(*per_rank) == set(range(PROMPTS_PER_STEP))


def _state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".pt":
        return {k: v.float() for k, v in torch.load(path, weights_only=True).items()}
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(path).items()}


def test_e2e_the_rollout_engine_receives_the_trained_weights(disco_run):
    """After every step the engine gets the actor's new weights (the last ones exactly those
    OpenRLHF saves at the end), and each step generates with the weights of the step before."""
    out, _, model = disco_run
    syncs = sorted(out.glob("engine0_sync*.pt"))
    assert [p.name for p in syncs] == [f"engine0_sync{k}.pt" for k in range(1, STEPS + 1)]
    initial = _state(Path(model) / "model.safetensors")
    final = _state(out / "model" / "model.safetensors")  # OpenRLHF's save after fit
    pushed = [_state(p) for p in syncs]
    assert set(pushed[-1]) == set(final)
    for name in final:  # the engine holds exactly the weights the actor ended with
        torch.testing.assert_close(pushed[-1][name], final[name], rtol=0, atol=0)
    for before, after in zip([initial, *pushed], pushed):  # and every sync brought new ones
        assert any(not torch.equal(before[k], after[k]) for k in after)
    # step k's responses were generated after the k-1 syncs before it
    generations = read_jsonl(out, "generate_engine0.jsonl")["generate_engine0.jsonl"]
    per_step = PROMPTS_PER_STEP * N
    assert [g["syncs"] for g in generations] == [k for k in range(STEPS) for _ in range(per_step)]


def test_e2e_lagrangian_multiplier_is_saved_with_the_deepspeed_checkpoint(disco_run):
    out, _, _ = disco_run
    ckpt = out / "ckpt" / "_actor"
    assert (ckpt / "latest").read_text().strip() == f"global_step{STEPS}"
    for step in range(1, STEPS + 1):
        assert (ckpt / f"global_step{step}" / "mp_rank_00_model_states.pt").is_file()
        ends = [steps[step - 1]["multiplier_after"] for steps in _per_rank(out, "ppo_train")]
        assert ends[0] == ends[1], ends  # one update per optimizer step, the same on every rank
        assert ends[0]["steps"] == step * OPTIMIZER_STEPS_PER_PPO_STEP
        for rank in range(RANKS):
            saved = torch.load(ckpt / f"global_step{step}" / f"discoloss_lagrange_rank{rank}.pt",
                               weights_only=True)
            assert (float(saved["value"]), int(saved["steps"])) == (ends[0]["value"],
                                                                    ends[0]["steps"])
    assert ends[0]["value"] > 0


def test_e2e_lagrangian_multiplier_resumes_from_the_deepspeed_checkpoint(disco_run, tmp_path):
    """OpenRLHF resumes from the first run's last checkpoint (step, data loader) and runs a
    second episode; the multiplier starts where the first run left it."""
    first, _, model = disco_run
    end = [steps[-1]["multiplier_after"] for steps in _per_rank(first, "ppo_train")]
    resumed, result, _ = _run(tmp_path, "resumed", STEPS, *LAGRANGIAN, "--ckpt.load_enable",
                              "--train.num_episodes", "2", "--ckpt.path", str(first / "ckpt"),
                              model=model)
    assert "Loading the checkpoint" in result.output
    assert f"Global step {2 * STEPS}:" in result.output
    for rank, steps in enumerate(_per_rank(resumed, "ppo_train")):
        assert len(steps) == STEPS
        assert steps[0]["multiplier_before"] == end[rank]
        assert steps[-1]["multiplier_after"]["steps"] == 2 * STEPS * OPTIMIZER_STEPS_PER_PPO_STEP
