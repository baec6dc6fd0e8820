"""verl's own ``python -m verl.trainer.main_ppo`` trains with ``algorithm.adv_estimator=disco``
end to end on CPU: rollout (transformers stand-in for vLLM) -> reward -> FSDP2 actor update
over gloo on fake GPUs -> weight sync, with the discoloss plugin loaded by its entry point and
nothing in verl or the adapter edited (the stand-ins: :mod:`verl_cpu`).

Four ``main_ppo`` runs serve all checks (each Ray start-up costs about a minute):

* ``dp2``: 2 data-parallel actor ranks, float32 compute, DisCO defaults, one mini-batch per
  step, 8 steps, rollout dump;
* ``dp1``: 1 rank, verl's default dtypes (bfloat16 compute), ``constraint=lagrangian``, two
  mini-batches per step, 6 steps, a checkpoint at step 3;
* ``resume``: ``dp1`` resumed from its step-3 checkpoint folder, 2 more steps;
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

N = 4  # rollout.n
QUESTIONS = 4  # per step (= one mini-batch)
FP32 = "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32"
LAG = [
    "+actor_rollout_ref.actor.policy_loss.constraint=lagrangian",
    "+actor_rollout_ref.actor.policy_loss.lagrangian_lr=10",
]
DEADLINE = 600  # seconds per main_ppo run: a hang fails instead of stalling CI


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("verl_e2e")
    model = kit.make_model(root / "model")
    train, val = kit.make_data(root / "data", n_train=QUESTIONS * 10)
    return {"root": root, "model": model, "train": train, "val": val}


def _run(
    base: dict,
    name: str,
    *,
    gpus: int,
    steps: int,
    extra: list[str],
    mini: int | None = None,
    **kw,
) -> kit.Run:
    work = base["root"] / name
    work.mkdir(exist_ok=True)
    args = kit.base_overrides(
        base["model"], base["train"], base["val"], work, gpus=gpus, steps=steps, mini=mini
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
    return _run(base, "dp2", gpus=2, steps=8, extra=[FP32, f"trainer.rollout_data_dir={dump}"])


@pytest.fixture(scope="module")
def dp1(base: dict) -> kit.Run:
    return _run(base, "dp1", gpus=1, steps=6, mini=2, extra=[*LAG, "trainer.save_freq=3"])


@pytest.fixture(scope="module")
def resume(base: dict, dp1: kit.Run) -> kit.Run:
    _ok(dp1)
    ckpt = base["root"] / "dp1" / "ckpt" / "global_step_3"
    assert (ckpt / "actor").is_dir(), sorted(p.name for p in ckpt.parent.iterdir())
    return _run(
        base,
        "resume",
        gpus=1,
        steps=5,
        mini=2,
        extra=[*LAG, "trainer.resume_mode=resume_path", f"trainer.resume_from_path={ckpt}"],
    )


#: run -> (data-parallel ranks, mini-batches (optimizer steps) per training step)
RUNS = {"dp1": (1, 2), "dp2": (2, 1)}


@pytest.fixture(params=sorted(RUNS))
def trained(request: pytest.FixtureRequest) -> tuple[kit.Run, int, int]:
    return request.getfixturevalue(request.param), *RUNS[request.param]


def train_records(run: kit.Run, opt_step: int) -> dict[int, list[dict]]:
    """The policy-loss calls (micro-batches) of one optimizer step, per rank."""
    return {
        rank: [r for r in records if r["train"] and r["opt_step"] == opt_step]
        for rank, records in run.jsonl("loss").items()
    }


# ---------------------------------------------------------------------------------------------


def test_main_ppo_trains_with_disco(trained: tuple[kit.Run, int, int]) -> None:
    run, world, per_step = trained
    _ok(run)
    steps = [m["step"] for m in run.metrics]
    assert len(steps) >= 5 and steps == list(range(1, len(steps) + 1)), steps
    disco = {k for m in run.metrics for k in m if k.startswith("actor/disco/")}
    assert {"actor/disco/objective", "actor/disco/kl", "actor/disco/split_responses"} <= disco
    for m in run.metrics:
        for k in disco:
            assert math.isfinite(m[k]), (m["step"], k, m[k])
        assert m["actor/disco/split_responses"] == 0
        assert m["actor/disco/num_groups"] == QUESTIONS // per_step

    # questions whole on every rank and micro-batch: group the rows the loss saw by prompt
    assert sorted(run.jsonl("loss")) == list(range(world))
    for step in steps:
        in_step: set[tuple] = set()
        for opt_step in range((step - 1) * per_step + 1, step * per_step + 1):
            seen: dict[tuple, int] = {}
            for rank, records in train_records(run, opt_step).items():
                assert records, f"rank {rank} ran no micro-batch in optimizer step {opt_step}"
                for rec in records:
                    counts: dict[tuple, int] = {}
                    for row in rec["rows"]:
                        counts[tuple(row["prompt"])] = counts.get(tuple(row["prompt"]), 0) + 1
                    assert set(counts.values()) == {N}, (opt_step, rank, counts)
                    for q in counts:
                        assert q not in seen, f"step {step}: a question on two micro-batches"
                        seen[q] = rank
            assert len(seen) == QUESTIONS // per_step, (opt_step, len(seen))
            in_step |= set(seen)
        assert len(in_step) == QUESTIONS

    # every step's trained weights reached every rollout server: fingerprints of the full
    # parameters after the step's last optimizer step, on the actor, against each server's
    params = run.jsonl("params")[0]
    assert [p["optimizer_step"] for p in params] == list(range(1, len(steps) * per_step + 1))
    after_step = {
        p["optimizer_step"] // per_step: p["fingerprint"] for p in params[per_step - 1 :: per_step]
    }
    for replica in range(world):  # rollout TP 1: one replica per actor rank
        updates = json.loads((run.record / f"server{replica}.json").read_text())
        by_step = {u["global_steps"]: u["fingerprint"] for u in updates}
        assert sorted(by_step) == [0, *steps]
        for step in steps:
            assert by_step[step] == pytest.approx(after_step[step], rel=1e-12), step
        prints = [by_step[s] for s in sorted(by_step)]
        assert all(a != b for a, b in zip(prints, prints[1:])), "weights did not change"
    # verl's logged grad norm is the engine's pre-clip norm (mean over the step's mini-batches)
    norms = [p["grad_norm"] for p in params]
    for m in run.metrics:
        k = m["step"]
        mean = sum(norms[(k - 1) * per_step : k * per_step]) / per_step
        assert m["actor/grad_norm"] == pytest.approx(mean, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# gradient parity


def reference_gradient(model_dir: Path, rows: list[dict], **options) -> dict[str, torch.Tensor]:
    """The gradient of ``discoloss.disco_loss`` on one mini-batch, in this plain process: the
    initial model's float32 log-probs of every (prompt, response) that verl trained on, the
    rewards from the task's rule on the decoded responses, the questions from the prompts; at
    theta = theta_old (the first mini-batch of the run)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from discoloss import disco_loss

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
    """The gradient verl applies in the run's first optimizer step (all ranks, all
    micro-batches, after verl's DP averaging) against disco_loss on that whole mini-batch."""
    run: kit.Run = request.getfixturevalue(name)
    _ok(run)
    world, per_step = RUNS[name]
    rows = [row for recs in train_records(run, 1).values() for rec in recs for row in rec["rows"]]
    assert len(rows) == QUESTIONS // per_step * N
    options = {}
    if name == "dp1":  # lagrangian, lambda = 0 in the first step
        from discoloss.constraints import LagrangeMultiplier

        options = {"constraint": "lagrangian", "multiplier": LagrangeMultiplier(lr=100.0)}
    ref = reference_gradient(base["model"], rows, **options)
    got = torch.load(run.record / "grad_step1.pt")
    engine = run.jsonl("params")[0][0]["grad_norm"]  # what verl clips and logs
    ref_norm = _norm(ref)
    # float32 compute (dp2) agrees to rounding; verl's default bfloat16 autocast (dp1) to ~1%
    rtol = 1e-5 if name == "dp2" else 3e-2
    flat_got = torch.cat([got[k].flatten().double() for k in sorted(ref)])
    flat_ref = torch.cat([ref[k].flatten().double() for k in sorted(ref)])
    cos = float(flat_got @ flat_ref / (flat_got.norm() * flat_ref.norm()))
    print(
        f"{name}: first-step gradient norm, verl {engine:.7g}, full gradient {_norm(got):.7g}, "
        f"disco_loss reference {ref_norm:.7g} (rel. diff {abs(engine / ref_norm - 1):.1e}); "
        f"cosine {cos:.8f}"
    )
    assert ref_norm > 0
    assert engine == pytest.approx(ref_norm, rel=rtol)
    assert _norm(got) == pytest.approx(ref_norm, rel=rtol)
    assert set(got) == set(ref)
    assert cos > (1 - 1e-6 if name == "dp2" else 0.995)
    if name == "dp2":
        assert run.metric("actor/grad_norm")[0] == pytest.approx(ref_norm, rel=rtol)


# ---------------------------------------------------------------------------------------------
# learning, Lagrangian checkpoint round trip, rollout dump, KL noise floor


def test_disco_raises_the_training_reward(dp2: kit.Run, base: dict) -> None:
    """The task: a response is correct iff its first letter is in a-h. One mini-batch per
    step, so the KL constraint is inactive (theta = theta_old) and each step follows DisCO's
    objective. Measured without sampling noise: the policy's exact probability of a correct
    first token on the training prompts, initial weights against the weights the rollout
    server received last."""
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _ok(dp2)
    scores = dp2.metric("critic/score/mean")
    assert len(scores) == 8  # seeded: model, data, sampling; float32 compute
    tok = AutoTokenizer.from_pretrained(base["model"])
    model = AutoModelForCausalLM.from_pretrained(base["model"], dtype=torch.float32)
    prompts = [p[0]["content"] for p in pd.read_parquet(base["train"])["prompt"]][: 4 * 8]
    before = kit.p_good(model.eval(), tok, prompts)
    model.load_state_dict(torch.load(dp2.record / "server0_last.pt"))
    after = kit.p_good(model.eval(), tok, prompts)
    print(
        f"training reward per step (sampled): {[round(s, 3) for s in scores]}; "
        f"P(correct first token): {before:.3f} -> {after:.3f}"
    )
    # the sampled reward (16 responses a step) is too noisy to compare over 8 steps
    assert after >= before + 0.1, (before, after)


def multipliers(run: kit.Run) -> dict[int, float]:
    """The multiplier each optimizer step's loss used (its first micro-batch on rank 0)."""
    out: dict[int, float] = {}
    for rec in run.jsonl("loss")[0]:
        if rec["train"]:
            out.setdefault(rec["opt_step"], rec["metrics"]["actor/disco/multiplier"])
    return out


def test_lagrangian_multiplier_survives_resume(dp1: kit.Run, resume: kit.Run, base: dict) -> None:
    """constraint=lagrangian: the multiplier saved in the real step-3 checkpoint folder is the
    one the resumed run uses in its first optimizer step, as the uninterrupted run did."""
    _ok(resume)
    from discoloss.adapters.verl.lagrangian import STATE_FILE

    saved_file = base["root"] / "dp1" / "ckpt" / "global_step_3" / "actor" / STATE_FILE
    assert saved_file.is_file()
    saved = float(torch.load(saved_file, weights_only=True)["value"])
    lam = multipliers(dp1)
    assert sorted(lam) == list(range(1, 13)) and lam[1] == 0.0
    assert saved > 0, f"the multiplier never moved: the round trip would prove nothing ({lam})"
    assert lam[7] == pytest.approx(saved, rel=1e-6)  # step 4, first mini-batch
    assert [m["step"] for m in resume.metrics] == [4, 5]
    resumed = multipliers(resume)  # the resumed process counts optimizer steps from 1
    assert sorted(resumed) == [1, 2, 3, 4]
    assert resumed[1] == pytest.approx(saved, rel=1e-6)
    assert "no DisCO multiplier state" not in resume.log
    print(
        f"multiplier: saved at step 3 {saved:.6g}, used at step 4: uninterrupted "
        f"{lam[7]:.6g}, resumed {resumed[1]:.6g}"
    )


def test_discoloss_analyze_reads_the_rollout_dump(dp2: kit.Run, base: dict) -> None:
    _ok(dp2)
    dump = base["root"] / "dp2" / "rollouts"
    files = sorted(dump.glob("*.jsonl"))
    assert len(files) == len(dp2.metrics), files
    out = base["root"] / "dp2" / "analysis"
    proc = subprocess.run(
        [sys.executable, "-m", "discoloss", "analyze", str(dump), "--out", str(out), "--no-plot"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    print(proc.stdout[-1500:])
    report = json.loads((out / "difficulty_report.json").read_text())
    last = dp2.metrics[-1]  # the report reads the latest step's file
    assert f"{last['step']}.jsonl" in json.dumps(report["source"])
    assert report["num_questions"] == QUESTIONS == last["actor/disco/num_groups"]
    assert report["num_responses"] == QUESTIONS * N and report["group_size"] == N
    assert report["frac_with_signal"] * QUESTIONS == last["actor/disco/groups_with_signal"]
    assert report["positive_rate"] == pytest.approx(last["actor/disco/frac_positive"])
    assert report["positive_rate"] == pytest.approx(last["critic/score/mean"])


def kl_at_theta_old(run: kit.Run, per_step: int) -> list[float]:
    """actor/disco/kl of every first mini-batch of a step (theta = theta_old there): the mean
    over the mini-batch's (rank, micro-batch) pairs of the loss's metric, as verl averages it."""
    out = []
    records = run.jsonl("loss")
    steps = max(r["opt_step"] for recs in records.values() for r in recs if r["train"])
    for opt_step in range(1, steps + 1, per_step):
        vals = [
            r["metrics"]["actor/disco/kl"]
            for recs in train_records(run, opt_step).values()
            for r in recs
        ]
        out.append(sum(vals) / len(vals))
    return out


def test_kl_noise_floor_at_theta_old(dp1: kit.Run, dp2: kit.Run) -> None:
    """At theta = theta_old the KL is 0 in exact arithmetic. float32 compute keeps it at 0;
    bfloat16 (verl's default autocast) quantises the log-probs: the README's numbers."""
    _ok(dp1)
    _ok(dp2)
    fp32 = kl_at_theta_old(dp2, 1)
    assert fp32 == pytest.approx(dp2.metric("actor/disco/kl"), abs=1e-12)  # one mini-batch
    bf16 = kl_at_theta_old(dp1, 2)
    print(
        f"KL at theta_old: float32 (dp2, {len(fp32)} steps) max |KL| {max(map(abs, fp32)):.3g}; "
        f"bfloat16 (dp1, {len(bf16)} steps) max |KL| {max(map(abs, bf16)):.3g}, "
        f"mean |KL| {sum(map(abs, bf16)) / len(bf16):.3g}, values {[f'{k:.3g}' for k in bf16]}; "
        f"delta 1e-4"
    )
    assert max(map(abs, fp32)) < 1e-6
    assert max(map(abs, bf16)) > 1e-6  # the bfloat16 floor is real (else the README is wrong)
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
    run = _run(base, "fault", gpus=2, steps=2, extra=[FP32], env={"DISCO_E2E_FAULT": "1:1"})
    assert run.where == "exited", f"{run.where} after {run.wall_s:.0f} s:\n{run.log[-4000:]}"
    assert run.rc != 0
    message = (
        "DisCO loss checks failed on 1 of 2 rank(s) (rank 1: a non-finite log_prob/old_log_prob "
        "at a response token (1 micro-batch))"
    )
    assert run.log.count(message) >= 2, run.log[-6000:]  # raised on both ranks
    assert "This rank: log_prob/old_log_prob: non-finite value" in run.log
    # verl skipped the step on both ranks (its "grad_norm is not finite" warning is printed
    # by the workers, but Ray may not forward it before the job ends): see the records
    params = run.jsonl("params")
    assert sorted(params) == [0, 1]
    initial = json.loads((run.record / "server0.json").read_text())[0]
    assert initial["global_steps"] == 0
    for rank in (0, 1):  # both ranks skipped the step: parameters as they were, on both
        assert len(params[rank]) == 1 and not math.isfinite(params[rank][0]["grad_norm"])
        assert params[rank][0]["fingerprint"] == pytest.approx(initial["fingerprint"], rel=1e-12)
    assert not run.metrics, "a step was logged after the fault"
