"""Two data-parallel ranks (gloo, CPU processes) of OpenRLHF's real ActorPPOTrainer with
``--algo.disco.weights current``.

OpenRLHF's own chunking deals the rollout to the ranks (a question split between them; with
dynamic batching, OpenRLHF's length balancing first); each rank trains with micro-batches of one
response (or OpenRLHF's token-budget micro-batches), two optimizer steps; the strategy averages
gradients over ranks as DeepSpeed does. Every optimizer step's averaged gradient must equal the
gradient of ``disco_loss`` on the whole mini-batch (both ranks' responses of that step) at the
step's parameters: the objective normalised by the questions with signal over both ranks
(``normalize="valid"``), the squared hinge with the mini-batch's KL. With
``constraint=lagrangian`` both ranks update the multiplier with the KL of the whole mini-batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from orlhf_testkit import load_actor, pad_cat, reference_gradient

from discoloss import kl_divergence
from discoloss.constraints import LagrangeMultiplier

HERE = Path(__file__).resolve().parent


def _run_ranks(tiny_model_path: str, tmp_path: Path, *args: str, timeout: float = 300
               ) -> tuple[list[int | None], list[str]]:
    """Run the two ranks; a rank still running at ``timeout`` is killed (return code None)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ["PYTHONPATH"]])}
    init = tmp_path / "init"
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "dp_rank.py"), str(r), "2", str(init),
                          tiny_model_path, str(tmp_path), *args], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    deadline = time.monotonic() + timeout
    codes: list[int | None] = []
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
            codes.append(p.returncode)
        except subprocess.TimeoutExpired:
            p.kill()
            outputs.append(p.communicate()[0])
            codes.append(None)
    return codes, outputs


def _relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    g = torch.cat([t.reshape(-1).double() for t in got])
    w = torch.cat([t.reshape(-1).double() for t in want])
    return float((g - w).norm() / w.norm())


def _step_micro_batches(result: dict) -> list[list[dict]]:
    start, steps = 0, []
    for end in result["backwards"]:
        steps.append(result["seen"][start:end])
        start = end
    return steps


@pytest.mark.parametrize("case", ["current", "dynamic-lagrangian"])
def test_two_ranks_every_step_equals_disco_on_the_mini_batch(tiny_model_path, tmp_path, case):
    sys.path.insert(0, str(HERE))
    from dp_rank import LAGRANGIAN, LAMBDA0, NUM_PROMPTS, case_settings

    codes, outputs = _run_ranks(tiny_model_path, tmp_path, case)
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    steps = [_step_micro_batches(res) for res in results]
    assert len(steps[0]) == len(steps[1]) == 2
    # a question on both ranks (OpenRLHF's chunking or its length balancing)
    per_rank = [{int(g) for m in res["seen"] for g in m["group_ids"]} for res in results]
    assert per_rank[0] & per_rank[1], per_rank
    assert per_rank[0] | per_rank[1] == set(range(NUM_PROMPTS))
    if case == "current":
        assert all(len(m["rewards"]) == 1 for res in results for m in res["seen"])
    settings = case_settings(case)
    lam = LAMBDA0
    probe = load_actor(tiny_model_path)
    kls = []
    for s in range(2):
        # both ranks applied the same averaged gradient, at the same parameters
        for g0, g1 in zip(results[0]["grads"][s], results[1]["grads"][s]):
            torch.testing.assert_close(g0, g1)
        micro = steps[0][s] + steps[1][s]
        probe.load_state_dict(results[0]["params"][s])
        step_settings = {k: v for k, v in settings.items() if k != "lagrangian_lr"}
        if case.endswith("lagrangian"):
            step_settings["multiplier"] = LagrangeMultiplier(init=lam)
        want = reference_gradient(probe, micro, step_settings, local_penalty=False)
        assert _relative_error(results[0]["grads"][s], want) <= 1e-5, s
        with torch.no_grad():
            lps = [probe(m["sequences"], m["action_mask"], attention_mask=m["attention_mask"])
                   for m in micro]
        kls.append(float(kl_divergence(pad_cat(lps), pad_cat([m["old"] for m in micro]),
                                       pad_cat([m["action_mask"] for m in micro]).bool(),
                                       estimator=settings["kl_estimator"])))
        lam = max(0.0, lam + LAGRANGIAN["lagrangian_lr"] * (kls[-1] - settings["delta"]))
    assert kls[1] > settings["delta"], kls  # the constraint is active at the second step
    if case.endswith("lagrangian"):
        for res in results:  # one dual ascent step per optimizer step, with the global KL
            assert float(res["multiplier"]["value"]) == pytest.approx(lam, rel=1e-5)
            assert res["multiplier"]["steps"] == 2
    else:
        assert results[0]["multiplier"] is None


#: The start of what each rank raises for each injected NaN (the response's index follows the
#: question order). A NaN old log-prob is caught when the first optimizer step is planned
#: (its stats come from the old log-probs), a NaN log-prob of the update's forward by the loss's
#: checks, a NaN reward by the plan's collective checks.
FAULTS = {
    "old_log_probs": "RuntimeError: discoloss: the DisCO loss failed its checks on data-parallel "
                     "rank 1: old_log_probs: non-finite value at a response token of response ",
    "log_probs": "RuntimeError: discoloss: the DisCO loss failed its checks on data-parallel "
                 "rank 1: log_probs: non-finite value at a response token of response ",
    "reward": "ValueError: plan_minibatch on rank 1 of 2 in process_group: rewards: non-finite "
              "value at response ",
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_two_ranks_stop_together_when_one_rank_meets_a_bad_value(tiny_model_path, tmp_path,
                                                                 fault):
    """A NaN in one input of one response on rank 1 only (its old log-probs, the log-probs of
    the update's forward, or its reward): both ranks raise the same error at the same point,
    naming rank 1 and the core's message; neither waits in a collective for the other. (A failed
    rank stays out of every collective, like a Ray actor whose method raised, until both ranks
    have failed: exit 3; a rank left alone exits 4.)"""
    codes, outputs = _run_ranks(tiny_model_path, tmp_path, "current", fault, timeout=240)
    assert codes == [3, 3], "\n".join(o[-3000:] for o in outputs)
    texts = [(tmp_path / f"rank{rank}.error").read_text() for rank in range(2)]
    for rank, text in enumerate(texts):
        assert text.startswith(FAULTS[fault]), text
        if fault != "reward":
            assert "rank 0:" not in text and f"(this is rank {rank})" in text, text
    if fault == "reward":
        assert texts[0] == texts[1]
