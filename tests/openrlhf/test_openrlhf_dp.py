"""Two data-parallel ranks (gloo, CPU processes) of OpenRLHF's real ActorPPOTrainer.

OpenRLHF's own chunking deals the rollout to the ranks; each rank trains on whole questions;
the strategy averages gradients over ranks as DeepSpeed does. The averaged gradient must equal
DisCO on the whole mini-batch: the objective normalised by the questions with signal over both
ranks (``normalize="valid"``), the penalty by the adapter's rule (token share of each
micro-batch's own penalty). With ``constraint=lagrangian`` the penalty is exact, and both ranks
update the multiplier with the KL of the whole mini-batch (over both ranks).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from orlhf_testkit import N, load_actor, pad_cat, reference_gradient

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


@pytest.mark.parametrize("constraint", ["squared_hinge", "lagrangian"])
def test_two_ranks_equal_disco_on_the_mini_batch(tiny_model_path, tmp_path, constraint):
    sys.path.insert(0, str(HERE))
    from dp_rank import LAGRANGIAN, LAMBDA0, SETTINGS

    codes, outputs = _run_ranks(tiny_model_path, tmp_path, constraint)
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outputs)

    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    seen = [m for res in results for m in res["seen"]]
    # each rank holds whole questions, different ones
    per_rank = [set(torch.cat([m["group_ids"] for m in res["seen"]]).tolist()) for res in results]
    assert per_rank[0].isdisjoint(per_rank[1]) and len(per_rank[0] | per_rank[1]) == 4
    for m in seen:
        assert set(torch.bincount(m["group_ids"]).tolist()) <= {0, N}
    # both ranks applied the same averaged gradient
    for g0, g1 in zip(results[0]["grads"][0], results[1]["grads"][0]):
        torch.testing.assert_close(g0, g1)

    if constraint == "squared_hinge":
        want = reference_gradient(load_actor(tiny_model_path), seen, SETTINGS, local_penalty=True)
    else:
        settings = {**SETTINGS, "constraint": "lagrangian",
                    "multiplier": LagrangeMultiplier(init=LAMBDA0)}
        want = reference_gradient(load_actor(tiny_model_path), seen, settings, local_penalty=False)
    for g, w in zip(results[0]["grads"][0], want):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=1e-7)
    assert max(float(w.abs().max()) for w in want) > 1e-4
    if constraint != "lagrangian":
        assert results[0]["multiplier"] is None
        return
    # one dual-ascent step with the mini-batch's KL over both ranks, the same on both ranks
    actor0 = load_actor(tiny_model_path)
    with torch.no_grad():
        lps = [actor0(m["sequences"], m["action_mask"], attention_mask=m["attention_mask"])
               for m in seen]
    masks = [m["action_mask"].bool() for m in seen]
    olds = [m["old"] for m in seen]
    kl = float(kl_divergence(pad_cat(lps), pad_cat(olds), pad_cat(masks)))
    local = [float(kl_divergence(lp, o, k)) for lp, o, k in zip(lps, olds, masks)]
    assert abs(local[0] - local[1]) > 1e-4  # a rank's own KL would give another value
    lr, delta = LAGRANGIAN["lagrangian_lr"], SETTINGS["delta"]
    for res in results:
        assert float(res["multiplier"]["value"]) == pytest.approx(
            max(0.0, LAMBDA0 + lr * (kl - delta)), rel=1e-6)
        assert res["multiplier"]["steps"] == 1


#: The start of what the core's checks say about each injected NaN (the response's index in its
#: micro-batch follows the question shuffle). A NaN reward goes the same way as these two.
FAULTS = {
    "old_log_probs": "old_log_probs: non-finite value at a response token of response ",
    "log_probs": "log_probs: non-finite value at a response token of response ",
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_two_ranks_stop_together_when_one_rank_meets_a_bad_value(tiny_model_path, tmp_path,
                                                                 fault):
    """A NaN in one input of one response on rank 1 only (its old log-probs, or the log-probs of
    the update's forward): both ranks raise the same error at the same micro-batch, naming
    rank 1 and the core's message; neither waits in a collective for the other. (A failed rank
    stays out of every collective, like a Ray actor whose method raised, until both ranks have
    failed: exit 3; a rank left alone exits 4, as rank 1 did before the ranks agreed: rank 0
    waited in OpenRLHF's metric all-reduce until rank 1's process was gone.)"""
    codes, outputs = _run_ranks(tiny_model_path, tmp_path, "squared_hinge", fault, timeout=240)
    assert codes == [3, 3], "\n".join(o[-3000:] for o in outputs)
    want = ("RuntimeError: discoloss: the DisCO loss failed its checks on data-parallel rank 1: "
            + FAULTS[fault])
    for rank in range(2):
        text = (tmp_path / f"rank{rank}.error").read_text()
        assert text.startswith(want), text
        assert "rank 0:" not in text and f"(this is rank {rank})" in text, text
