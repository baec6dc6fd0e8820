"""verl's own ``python -m verl.trainer.main_ppo`` trains with ``algorithm.adv_estimator=disco``
end to end on CPU: rollout (transformers stand-in for vLLM) -> reward -> FSDP2 actor update
over gloo on fake GPUs -> weight sync, with the discoloss plugin loaded by its entry point and
nothing in verl or the adapter edited (the stand-ins: :mod:`verl_cpu`).

Four ``main_ppo`` runs serve all checks (each Ray start-up costs about a minute):

* ``dp2``: 2 data-parallel actor ranks, float32 compute, DisCO defaults, 5 steps, rollout dump;
* ``dp1``: 1 rank, verl's default dtypes (bfloat16 compute), ``constraint=lagrangian``, 10
  steps, a checkpoint at step 5;
* ``resume``: ``dp1`` resumed from its step-5 checkpoint folder;
* ``fault``: 2 ranks, a NaN old log-prob on rank 1 only.

Every run has a hard deadline (a hang fails the test) and every Ray process it started is
ended by pid afterwards.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import verl_e2e_kit as kit

pytestmark = pytest.mark.e2e

N = 4  # rollout.n
QUESTIONS = 4  # per step (= one mini-batch)
FP32 = "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32"
LAG = [
    "+actor_rollout_ref.actor.policy_loss.constraint=lagrangian",
    "+actor_rollout_ref.actor.policy_loss.lagrangian_lr=100",
]
DEADLINE = 600  # seconds per main_ppo run: a hang fails instead of stalling CI


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("verl_e2e")
    model = kit.make_model(root / "model")
    train, val = kit.make_data(root / "data", n_train=QUESTIONS * 10)
    return {"root": root, "model": model, "train": train, "val": val}


def _run(base: dict, name: str, *, gpus: int, steps: int, extra: list[str], **kw) -> kit.Run:
    work = base["root"] / name
    work.mkdir(exist_ok=True)
    args = kit.base_overrides(
        base["model"], base["train"], base["val"], work, gpus=gpus, steps=steps
    )
    run = kit.launch(args + extra, work, deadline=DEADLINE, **kw)
    print(f"main_ppo {name}: {run.where} rc={run.rc} wall {run.wall_s:.0f} s")
    return run


def _ok(run: kit.Run) -> None:
    assert run.where == "exited" and run.rc == 0, run.log[-4000:]
    assert "discoloss: the verl adapter failed" not in run.log


@pytest.fixture(scope="module")
def dp2(base: dict) -> kit.Run:
    dump = base["root"] / "dp2" / "rollouts"
    return _run(base, "dp2", gpus=2, steps=5, extra=[FP32, f"trainer.rollout_data_dir={dump}"])


@pytest.fixture(scope="module")
def dp1(base: dict) -> kit.Run:
    return _run(base, "dp1", gpus=1, steps=10, extra=[*LAG, "trainer.save_freq=5"])


@pytest.fixture(scope="module")
def resume(base: dict, dp1: kit.Run) -> kit.Run:
    _ok(dp1)
    ckpt = base["root"] / "dp1" / "ckpt" / "global_step_5"
    assert (ckpt / "actor").is_dir(), sorted(p.name for p in ckpt.parent.iterdir())
    return _run(
        base,
        "resume",
        gpus=1,
        steps=7,
        extra=[*LAG, "trainer.resume_mode=resume_path", f"trainer.resume_from_path={ckpt}"],
    )


RUNS = {"dp1": 1, "dp2": 2}


@pytest.fixture(params=sorted(RUNS))
def trained(request: pytest.FixtureRequest) -> tuple[kit.Run, int]:
    return request.getfixturevalue(request.param), RUNS[request.param]


# ---------------------------------------------------------------------------------------------


def test_main_ppo_trains_with_disco(trained: tuple[kit.Run, int]) -> None:
    run, world = trained
    _ok(run)
    steps = [m["step"] for m in run.metrics]
    assert len(steps) >= 5 and steps == list(range(1, len(steps) + 1)), steps
    disco = {k for m in run.metrics for k in m if k.startswith("actor/disco/")}
    assert {"actor/disco/objective", "actor/disco/kl", "actor/disco/split_responses"} <= disco
    for m in run.metrics:
        for k in disco:
            assert math.isfinite(m[k]), (m["step"], k, m[k])
        assert m["actor/disco/split_responses"] == 0
        assert m["actor/disco/num_groups"] == QUESTIONS

    # questions whole on every rank and micro-batch: group the rows the loss saw by prompt
    losses = run.jsonl("loss")
    assert sorted(losses) == list(range(world))
    for step in steps:
        seen: dict[tuple, int] = {}
        for rank, records in losses.items():
            for rec in (r for r in records if r["train"] and r["step"] == step):
                counts: dict[tuple, int] = {}
                for row in rec["rows"]:
                    counts[tuple(row["prompt"])] = counts.get(tuple(row["prompt"]), 0) + 1
                assert set(counts.values()) == {N}, (step, rank, counts)
                for q in counts:
                    assert q not in seen, f"step {step}: a question on two micro-batches"
                    seen[q] = rank
        assert len(seen) == QUESTIONS, (step, len(seen))
        if world > 1:
            assert sorted(set(seen.values())) == list(range(world)), "a rank got no question"

    # every step's trained weights reached every rollout server (fingerprints of the full
    # parameters after the step's optimizer step, taken on the actor, against the server's)
    params = run.jsonl("params")[0]
    assert [p["optimizer_step"] for p in params] == steps  # one mini-batch per step
    for replica in range(world):  # rollout TP 1: one replica per actor rank
        updates = json.loads((run.record / f"server{replica}.json").read_text())
        by_step = {u["global_steps"]: u["fingerprint"] for u in updates}
        for p in params[:-1]:  # the last step's weights are not synced (training ends)
            assert by_step.get(p["optimizer_step"]) == pytest.approx(p["fingerprint"], rel=1e-12)
        prints = [by_step[s] for s in sorted(by_step)]
        assert all(a != b for a, b in zip(prints, prints[1:])), "weights did not change"


# ---------------------------------------------------------------------------------------------
# gradient parity


def reference_gradient(model_dir: Path, rows: list[dict], **options) -> dict[str, torch.Tensor]:
    """The gradient of ``discoloss.disco_loss`` on one mini-batch, in this plain process: the
    initial model's float32 log-probs of every (prompt, response) that verl trained on, the
    rewards from the task's rule on the decoded responses, the questions from the prompts; at
    theta = theta_old (the first mini-batch of the run)."""
    from discoloss import disco_loss
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    width = max(len(r["lp"]) for r in rows)
    lps, masks, rewards, groups, prompts = [], [], [], [], {}
    for r in rows:
        resp = r["response"][: len(r["lp"])]
        ids = torch.tensor([r["prompt"] + resp])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        lp = logp.gather(-1, ids[0, 1:, None])[:, 0][-len(resp) :]
        lps.append(torch.nn.functional.pad(lp, (0, width - len(resp))))
        masks.append(torch.arange(width) < len(resp))
        rewards.append(kit.reward_of(tok.decode(resp, skip_special_tokens=True)))
        groups.append(prompts.setdefault(tuple(r["prompt"]), len(prompts)))
    log_probs = torch.stack(lps)
    out = disco_loss(
        log_probs,
        log_probs.detach(),
        torch.stack(masks),
        torch.tensor(rewards),
        torch.tensor(groups),
        **options,
    )
    model.zero_grad()
    out.loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


@pytest.mark.parametrize("name", sorted(RUNS))
def test_first_step_gradient_equals_disco_loss(
    name: str, base: dict, request: pytest.FixtureRequest
) -> None:
    run: kit.Run = request.getfixturevalue(name)
    _ok(run)
    rows = [
        row
        for records in run.jsonl("loss").values()
        for rec in records
        if rec["train"] and rec["step"] == 1
        for row in rec["rows"]
    ]
    assert len(rows) == QUESTIONS * N
    options = {}
    if name == "dp1":  # lagrangian with lambda = 0 at the first step
        from discoloss.constraints import LagrangeMultiplier

        options = {"constraint": "lagrangian", "multiplier": LagrangeMultiplier(lr=100.0)}
    ref = reference_gradient(base["model"], rows, **options)
    got = torch.load(run.record / "grad_step1.pt")
    ref_norm, logged = _norm(ref), run.metric("actor/grad_norm")[0]
    # fp32 compute (dp2) agrees to rounding; verl's default bfloat16 autocast (dp1) to ~1%
    rtol = 1e-4 if name == "dp2" else 3e-2
    print(
        f"{name}: actor/grad_norm {logged:.6g}, engine pre-clip {_norm(got):.6g}, "
        f"disco_loss reference {ref_norm:.6g} (rel. diff {abs(logged / ref_norm - 1):.2e})"
    )
    assert ref_norm > 0
    assert logged == pytest.approx(ref_norm, rel=rtol)
    assert _norm(got) == pytest.approx(ref_norm, rel=rtol)
    assert set(got) == set(ref)
    flat_got = torch.cat([got[k].flatten().double() for k in sorted(ref)])
    flat_ref = torch.cat([ref[k].flatten().double() for k in sorted(ref)])
    cos = float(flat_got @ flat_ref / (flat_got.norm() * flat_ref.norm()))
    print(f"{name}: cosine(full gradient, reference) = {cos:.8f}")
    assert cos > (1 - 1e-6 if name == "dp2" else 0.995)


# ---------------------------------------------------------------------------------------------
# learning, Lagrangian checkpoint round trip, rollout dump, KL noise floor


def test_disco_raises_the_training_reward(dp1: kit.Run) -> None:
    _ok(dp1)
    scores = dp1.metric("critic/score/mean")
    assert len(scores) == 10
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    print(f"training reward per step: {[round(s, 3) for s in scores]}")
    assert last >= first + 0.25, scores


def test_lagrangian_multiplier_survives_resume(dp1: kit.Run, resume: kit.Run, base: dict) -> None:
    _ok(resume)
    from discoloss.adapters.verl.lagrangian import STATE_FILE

    saved_file = base["root"] / "dp1" / "ckpt" / "global_step_5" / "actor" / STATE_FILE
    assert saved_file.is_file()
    saved = torch.load(saved_file, weights_only=True)
    lam = dp1.metric("actor/disco/multiplier")
    assert len(lam) == 10 and lam[0] == 0.0
    assert max(lam) > 0, "the multiplier never moved: the round trip would prove nothing"
    # the value used at step 6 is the one saved after step 5, in both runs
    assert float(saved["value"]) == pytest.approx(lam[5], rel=1e-6, abs=1e-12)
    resumed = resume.metrics
    assert [m["step"] for m in resumed] == [6, 7], [m["step"] for m in resumed]
    assert resumed[0]["actor/disco/multiplier"] == pytest.approx(lam[5], rel=1e-6, abs=1e-12)
    assert "no DisCO multiplier state" not in resume.log


def test_discoloss_analyze_reads_the_rollout_dump(dp2: kit.Run, base: dict) -> None:
    _ok(dp2)
    dump = base["root"] / "dp2" / "rollouts"
    files = sorted(dump.glob("*.jsonl"))
    assert len(files) == 5, files
    out = base["root"] / "dp2" / "analysis"
    proc = subprocess.run(
        [sys.executable, "-m", "discoloss", "analyze", str(dump), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "difficulty_report.json").read_text())
    last = dp2.metrics[-1]
    print(proc.stdout[-1500:])
    counts = report.get("counts", report)
    assert counts["questions"] == QUESTIONS
    assert counts["responses"] == QUESTIONS * N
    with_signal = last["actor/disco/groups_with_signal"]
    assert counts["questions_with_signal"] == round(with_signal)


def test_kl_noise_floor_at_theta_old(dp1: kit.Run, dp2: kit.Run) -> None:
    """One mini-batch per step: every step's KL is measured at theta = theta_old, where it is 0
    in exact arithmetic. float32 compute keeps it far below delta; bfloat16 (verl's default
    autocast) quantises the log-probs and its floor reaches delta = 1e-4."""
    _ok(dp1)
    _ok(dp2)
    fp32 = [abs(k) for k in dp2.metric("actor/disco/kl")]
    bf16 = [abs(k) for k in dp1.metric("actor/disco/kl")]
    print(f"|KL| at theta_old, float32: max {max(fp32):.3g}; bfloat16: max {max(bf16):.3g}, "
          f"values {sorted(set(dp1.metric('actor/disco/kl')))}")
    assert max(fp32) < 1e-6
    dtypes = {r["lp_dtype"] for recs in dp1.jsonl("loss").values() for r in recs}
    assert dtypes == {"torch.bfloat16"}
    dtypes = {r["lp_dtype"] for recs in dp2.jsonl("loss").values() for r in recs}
    assert dtypes == {"torch.float32"}


# ---------------------------------------------------------------------------------------------
# one rank meets a bad value


def test_a_bad_value_on_one_rank_stops_every_rank(base: dict) -> None:
    """A NaN old log-prob at one response token, on rank 1 only, in the first step. No rank
    may raise while the other waits in the gradient reduction: the adapter makes the step's
    gradient non-finite on both ranks (verl skips the optimizer step) and both raise the same
    error afterwards, so the job stops at once instead of hanging until the gloo timeout."""
    run = _run(
        base, "fault", gpus=2, steps=2, extra=[FP32], env={"DISCO_E2E_FAULT": "1:1"}
    )
    assert run.where == "exited", f"{run.where} after {run.wall_s:.0f} s:\n{run.log[-4000:]}"
    assert run.rc != 0
    message = "DisCO loss checks failed on 1 of 2 rank(s) (rank 1: a non-finite log_prob"
    assert run.log.count(message) >= 2, run.log[-6000:]  # raised on both ranks
    assert "This rank: log_prob/old_log_prob: non-finite value" in run.log
    assert "grad_norm is not finite" in run.log  # verl skipped the step
    params = run.jsonl("params")
    assert sorted(params) == [0, 1]
    for rank in (0, 1):  # both ranks' parameters after the skipped step: unchanged, equal
        assert len(params[rank]) == 1 and not math.isfinite(params[rank][0]["grad_norm"])
    assert params[0][0]["fingerprint"] == params[1][0]["fingerprint"]
    assert not run.metrics, "a step was logged after the fault"
