"""OpenRLHF's real PPO loop with DisCO, end to end on CPU.

``python -m discoloss.adapters.openrlhf.train_ppo_ray`` with the DisCO flags runs OpenRLHF's own
``train``: Ray (a local cluster), ``PPOTrainer.fit``, the prompt data loader, generation,
rewards (a ``reward_func`` file), the experience maker, the replay buffer, two DeepSpeed
(ZeRO-0, ``DS_ACCELERATOR=cpu``) actor ranks in Ray actors, the weight sync after every step,
checkpoints and the final save. The adapter runs unmodified: the launcher, the Ray worker setup
hook that installs it in every worker, the ``disco`` estimator, the planned per-mini-batch
weights (the question order shared by the ranks, the stats forward, ``plan_minibatch`` over the
two ranks) and the Lagrange multiplier with its checkpoint.

Three launcher runs: the default ``--algo.disco.weights current`` with micro-batches of one
response, the squared hinge and DRPO (``--algo.disco.objective drpo``, ``--algo.disco.lam 0.2``,
``--algo.disco.max_length`` left to its default, the generation cap ``--rollout.max_new_tokens
6``; each optimizer step's applied gradient is compared with ``disco_loss(objective="drpo")``
on its whole mini-batch); ``sampling`` with ``constraint=lagrangian`` and a
checkpoint after every step; a run resuming from that checkpoint. Each PPO step: 5 questions of 4
responses, 10 samples per rank (question 2 split between the ranks), 2 optimizer steps.

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
   temp dir (to find and kill every Ray process of a run);
8. float32 instead of bf16 for the actor (OpenRLHF's ``--ds.param_dtype`` offers bf16 and fp16
   only; the gradient comparison needs float32 log-probs).

Plus observation-only probes (``training_step``: each micro-batch's question ids, and with the
trace on its inputs; ``DeepspeedStrategy.optimizer_step``: the parameters and the gradient of
every optimizer step; ``ppo_train``: the status it returns and the multiplier around it; the
rollout stand-in: its weights after each sync and the number of syncs behind each generation).

Each run has a hard timeout and every Ray process it started is killed afterwards. The
``openrlhf_oldest`` session skips this module (``-k``), as it skips the other multi-process
tests.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "e2e"))

from orlhf_testkit import pad_cat, save_tiny_model_with_tokenizer  # noqa: E402
from run import (  # noqa: E402
    PROMPTS_PER_STEP,
    N,
    launcher_flags,
    read_jsonl,
    run_launcher,
    write_prompts,
)

from discoloss import disco_loss  # noqa: E402

RANKS = 2
STEPS = 3
OPTIMIZER_STEPS_PER_PPO_STEP = 2  # launcher_flags: train.batch_size = half a rollout
SAMPLES_PER_RANK_PER_STEP = PROMPTS_PER_STEP * N // RANKS // OPTIMIZER_STEPS_PER_PPO_STEP
TIMEOUT = 420  # seconds per launcher run (1-3 minutes each on a loaded 2-core machine)

DISCO_METRICS = ("disco/loss", "disco/objective", "disco/kl", "disco/penalty",
                 "disco/frac_groups_with_signal", "disco/effective_negatives",
                 "disco/plan_seconds")

#: The exactness run: the default weights (current), micro-batches of one response, the squared
#: hinge with the k3 estimator (>= 0, so that the constraint becomes active once the policy
#: moves: Adam at lr 1e-2 moves it far past delta = 1e-3 in one optimizer step), and DRPO with
#: lam 0.2 (not the default, so that the test sees it reach the loss) and max_length left to
#: its default, the generation cap (launcher_flags: --rollout.max_new_tokens 6).
DRPO_LAM = 0.2
GENERATION_CAP = 6
EXACT = ["--algo.disco.kl_estimator", "k3",
         "--algo.disco.objective", "drpo", "--algo.disco.lam", str(DRPO_LAM)]
#: ``sampling`` weights and ``constraint=lagrangian`` with a checkpoint after every step: the
#: run the checkpoint tests read also gives the checkpoint the last test resumes from. With the
#: k3 estimator (>= 0) and delta = 0 the multiplier grows as soon as the policy has moved.
LAGRANGIAN = ["--algo.disco.weights", "sampling",
              "--algo.disco.constraint", "lagrangian", "--algo.disco.lagrangian_lr", "1000",
              "--algo.disco.kl_estimator", "k3", "--algo.disco.delta", "0",
              "--ckpt.save_steps", "1", "--ckpt.max_num", "6"]
LAGRANGIAN_MICRO = 5  # one micro-batch per rank and optimizer step


def _run(tmp: Path, name: str, steps: int, *extra: str, model: str | None = None,
         micro: int = 1, trace: bool = False) -> tuple:
    out = tmp / name
    out.mkdir(parents=True)
    model = model or save_tiny_model_with_tokenizer(tmp / "tiny")
    prompts = write_prompts(out / "prompts.jsonl", steps * PROMPTS_PER_STEP)
    result = run_launcher([*launcher_flags(model, prompts, out, RANKS, micro=micro), *extra],
                          out, ranks=RANKS, timeout=TIMEOUT,
                          env={"DISCOLOSS_E2E_TRACE": "1"} if trace else None)
    assert not result.leaked, f"Ray processes left behind (killed): {result.leaked}"
    assert result.returncode == 0, (
        f"launcher {'timed out' if result.returncode is None else f'exit {result.returncode}'}"
        f" after {result.wall_s:.0f}s:\n{result.output[-6000:]}")
    print(f"{name}: {result.wall_s:.0f}s")
    return out, result, model


@pytest.fixture(scope="module")
def exact_run(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """2 actor ranks, 3 PPO steps of 2 optimizer steps each, micro-batches of one response,
    ``--algo.disco.weights`` left at its default, DRPO, every step traced; the tiny model tuned
    to end a response early (:func:`save_tiny_model_with_tokenizer` with ``p_eos``)."""
    tmp = tmp_path_factory.mktemp("e2e")
    # responses of many lengths (p_eos 0.2 a token): DRPO's weights act on correct answers of
    # different lengths only
    model = save_tiny_model_with_tokenizer(tmp / "tiny_eos", p_eos=0.2)
    return _run(tmp, "exact", STEPS, *EXACT, model=model, trace=True)


@pytest.fixture(scope="module")
def lagrangian_run(exact_run: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Same layout with ``sampling`` weights, ``constraint=lagrangian`` and checkpoints."""
    _, _, model = exact_run
    return _run(tmp_path_factory.mktemp("e2e"), "lagrangian", STEPS, *LAGRANGIAN, model=model,
                micro=LAGRANGIAN_MICRO)


def _per_rank(out: Path, kind: str) -> list[list[dict]]:
    records = read_jsonl(out, f"{kind}_rank*.jsonl")
    assert sorted(records) == [f"{kind}_rank{r}.jsonl" for r in range(RANKS)], sorted(records)
    return [records[f"{kind}_rank{r}.jsonl"] for r in range(RANKS)]


@pytest.mark.parametrize("run", ["exact_run", "lagrangian_run"])
def test_e2e_runs_the_ppo_loop_with_finite_disco_metrics(run, request):
    """Exit 0, OpenRLHF's step log, finite DisCO metrics in every step's status on both ranks."""
    out, result, _ = request.getfixturevalue(run)
    assert f"Global step {STEPS}:" in result.output  # OpenRLHF's own step log
    assert "'disco/loss'" in result.output
    for rank, steps in enumerate(_per_rank(out, "ppo_train")):
        assert len(steps) == STEPS, (rank, len(steps))
        for step in steps:
            status = step["status"]
            keys = DISCO_METRICS + (("disco/effective_positives",) if run == "exact_run" else ())
            for key in keys:
                assert isinstance(status.get(key), float) and math.isfinite(status[key]), (
                    rank, key, status.get(key))
            # (no "actor_grad_norm": DeepSpeed reports none for a float32 model without ZeRO;
            # the exact run checks the gradients themselves)
    # the constraint had something to do: after the first optimizer step of a PPO step the
    # policy had moved away from the rollout policy
    kls = [s["status"]["disco/kl"] for steps in _per_rank(out, "ppo_train") for s in steps]
    assert max(kls) > 0
    if run == "lagrangian_run":
        assert all("disco/lagrange_multiplier" in s["status"]
                   for steps in _per_rank(out, "ppo_train") for s in steps)


def test_e2e_micro_batches_split_questions_and_every_response_trains_once(lagrangian_run,
                                                                          exact_run):
    """Micro-batches of ``--train.micro_batch_size`` responses; per PPO step every response
    of the rollout is trained on exactly once, a question's responses on both ranks."""
    for (out, _, _), micro in ((exact_run[0:3], 1), (lagrangian_run[0:3], LAGRANGIAN_MICRO)):
        batches = _per_rank(out, "micro")
        per_step_rank = PROMPTS_PER_STEP * N // RANKS
        for rank, records in enumerate(batches):
            assert len(records) == STEPS * per_step_rank // micro, (rank, len(records))
            assert all(len(b["group_ids"]) == micro for b in records)
        for step in range(STEPS):
            window = slice(step * per_step_rank // micro, (step + 1) * per_step_rank // micro)
            per_rank = [Counter(g for b in records[window] for g in b["group_ids"])
                        for records in batches]
            total = per_rank[0] + per_rank[1]
            assert total == Counter({q: N for q in range(PROMPTS_PER_STEP)}), total
            assert set(per_rank[0]) & set(per_rank[1])  # a question on both ranks


def _reference_actor(model: str) -> Any:
    from openrlhf.models import Actor

    actor = Actor(model, attn_implementation="sdpa", param_dtype="bf16")
    actor.model.float()
    return actor


def _traces(out: Path) -> list[list[dict]]:
    """Per PPO step, per rank: the trace of that ``ppo_train`` call."""
    return [[torch.load(out / f"trace_rank{r}_{c}.pt", weights_only=False)
             for r in range(RANKS)] for c in range(STEPS)]


def _step_mini_batches(traces: list[list[dict]]):
    """Every optimizer step of the run: its micro-batches over both ranks, its parameters and
    the gradient applied (rank 0's, checked equal to rank 1's)."""
    for call in traces:
        assert [len(t["steps"]) for t in call] == [OPTIMIZER_STEPS_PER_PPO_STEP] * RANKS
        for s in range(OPTIMIZER_STEPS_PER_PPO_STEP):
            steps = [t["steps"][s] for t in call]
            for name, value in steps[0]["params"].items():
                assert torch.equal(value, steps[1]["params"][name]), name
                torch.testing.assert_close(steps[0]["grads"][name], steps[1]["grads"][name])
            micro = [m for t in call for m in t["micro"] if m["step"] == s]
            assert sum(len(m["rewards"]) for m in micro) == RANKS * SAMPLES_PER_RANK_PER_STEP
            yield micro, steps[0]["params"], steps[0]["grads"]


#: What a mistake in DRPO's plumbing would apply instead of the exact run's options; each must
#: differ from what DeepSpeed applied, or the comparison could not see the mistake.
WRONG_OPTIONS = {
    "DisCO (objective not passed)": dict(objective="disco"),
    "lam not passed (0.1)": dict(lam=0.1),
    "max_length twice the cap": dict(max_length=2 * GENERATION_CAP),
}


def test_e2e_every_optimizer_step_applies_disco_on_its_whole_mini_batch(exact_run):
    """The gradient DeepSpeed applies at every optimizer step (both ranks' micro-batches of one
    response, averaged over the ranks) equals the gradient of ``disco_loss(objective="drpo",
    lam=0.2, max_length=6)`` on that step's whole mini-batch at the step's parameters, within
    1e-5 relative; the squared hinge is active in at least one step. DisCO's gradient, DRPO's
    at the default lam and at another max_length each differ from the applied one by more than
    1e-3 in some step (the run's correct answers differ in length). (Checked to fail without
    the data-parallel factor, with the local token count as the normaliser, and with stats at
    the sampling policy after the first step.)"""
    out, _, model = exact_run
    probe = _reference_actor(model)
    names = [n for n, _ in probe.model.named_parameters()]
    settings = dict(tau=5.0, delta=1e-3, beta=100.0, kl_estimator="k3", objective="drpo",
                    lam=DRPO_LAM, max_length=GENERATION_CAP)
    errors, kls, split = [], [], 0
    apart = dict.fromkeys(WRONG_OPTIONS, 0.0)
    lengths: Counter[int] = Counter()

    def gradient(lps: list[torch.Tensor], micro: list[dict], **options: Any) -> tuple:
        probe.zero_grad()
        result = disco_loss(pad_cat(lps), pad_cat([m["old"] for m in micro]),
                            pad_cat([m["action_mask"] for m in micro]).bool(),
                            torch.cat([m["rewards"] for m in micro]),
                            torch.cat([m["group_ids"] for m in micro]), **options)
        result.loss.backward(retain_graph=True)
        params_ = dict(probe.model.named_parameters())
        return torch.cat([params_[n].grad.reshape(-1).double() for n in names]), result

    for micro, params, grads in _step_mini_batches(_traces(out)):
        probe.model.load_state_dict(params)
        lps = [probe(m["sequences"], m["action_mask"], attention_mask=m["attention_mask"])
               for m in micro]
        want, result = gradient(lps, micro, **settings)
        got = torch.cat([grads[n].reshape(-1).double() for n in names])
        # a mini-batch without signal at theta_old (no question with a correct and a wrong
        # answer, KL 0) has a zero gradient: the error is then absolute
        scale = float(want.norm())
        errors.append(float((got - want).norm()) / scale if scale > 0 else float(got.norm()))
        for label, wrong in WRONG_OPTIONS.items():
            other, _ = gradient(lps, micro, **{**settings, **wrong})
            if float(got.norm()) > 0:
                apart[label] = max(apart[label], float((got - other).norm() / got.norm()))
        kls.append(float(result.kl.detach()))
        per_micro = Counter(int(g) for m in micro for g in m["group_ids"])
        split += sum(c > 1 for c in per_micro.values())
        for m in micro:
            positive = m["rewards"] > 0.5
            lengths.update(int(n) for n in m["action_mask"].sum(-1)[positive])
    print(f"exact: relative error per optimizer step {[f'{e:.1e}' for e in errors]}; lengths "
          f"of the correct answers {dict(sorted(lengths.items()))}; largest relative "
          f"difference of the wrong options: {apart}")
    assert len(errors) == STEPS * OPTIMIZER_STEPS_PER_PPO_STEP
    assert max(errors) <= 1e-5, errors
    assert min(apart.values()) > 1e-3, apart
    assert max(kls) > settings["delta"], kls  # the squared hinge is active
    assert split > 0  # questions with responses in several micro-batches


def _state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".pt":
        return {k: v.float() for k, v in torch.load(path, weights_only=True).items()}
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(path).items()}


def test_e2e_the_rollout_engine_receives_the_trained_weights(exact_run):
    """After every step the engine gets the actor's new weights (the last ones exactly those
    OpenRLHF saves at the end), and each step generates with the weights of the step before."""
    out, _, model = exact_run
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


def test_e2e_lagrangian_multiplier_is_saved_with_the_deepspeed_checkpoint(lagrangian_run):
    out, _, _ = lagrangian_run
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


def test_e2e_lagrangian_multiplier_resumes_from_the_deepspeed_checkpoint(lagrangian_run,
                                                                        tmp_path):
    """OpenRLHF resumes from the lagrangian run's last checkpoint (step, data loader) and runs a
    second episode; the multiplier starts where the first run left it."""
    first, _, model = lagrangian_run
    end = [steps[-1]["multiplier_after"] for steps in _per_rank(first, "ppo_train")]
    resumed, result, _ = _run(tmp_path, "resumed", STEPS, *LAGRANGIAN, "--ckpt.load_enable",
                              "--train.num_episodes", "2", "--ckpt.path", str(first / "ckpt"),
                              model=model, micro=LAGRANGIAN_MICRO)
    assert "Loading the checkpoint" in result.output
    assert f"Global step {2 * STEPS}:" in result.output
    for rank, steps in enumerate(_per_rank(resumed, "ppo_train")):
        assert len(steps) == STEPS
        assert steps[0]["multiplier_before"] == end[rank]
        assert steps[-1]["multiplier_after"]["steps"] == 2 * STEPS * OPTIMIZER_STEPS_PER_PPO_STEP
