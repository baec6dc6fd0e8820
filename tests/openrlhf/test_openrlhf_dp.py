"""Two data-parallel ranks (gloo, CPU processes) of OpenRLHF's real ActorPPOTrainer.

OpenRLHF's own chunking deals the rollout to the ranks; each rank trains on whole questions;
the strategy averages gradients over ranks as DeepSpeed does. The averaged gradient must equal
DisCO on the whole mini-batch: the objective normalised by the questions with signal over both
ranks (``normalize="valid"``), the penalty by the adapter's rule (token share of each
micro-batch's own penalty).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from orlhf_testkit import N, load_actor, reference_gradient

HERE = Path(__file__).resolve().parent


def test_two_ranks_equal_disco_on_the_mini_batch(tiny_model_path, tmp_path):
    sys.path.insert(0, str(HERE))
    from dp_rank import SETTINGS

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ["PYTHONPATH"]])}
    init = tmp_path / "init"
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "dp_rank.py"), str(r), "2", str(init),
                          tiny_model_path, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)

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

    want = reference_gradient(load_actor(tiny_model_path), seen, SETTINGS, local_penalty=True)
    for g, w in zip(results[0]["grads"][0], want):
        torch.testing.assert_close(g, w, rtol=2e-4, atol=1e-7)
    assert max(float(w.abs().max()) for w in want) > 1e-4
