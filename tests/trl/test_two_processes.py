"""Two processes (accelerate, CPU, gloo): a prompt's completions are split across ranks and
micro-batches, and at both optimizer steps on one generation batch (the first at the sampling
policy, the second replanned at its own parameters by ``weights="current"``) the averaged
gradient equals the single-process ``disco_loss`` gradient on all the completions at the
step's parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from trl_support import (
    assert_grads_close,
    check_generation_batch,
    concat,
    launch_two_processes,
    load_example,
    reference_model,
    token_log_probs,
)

from discoloss import disco_loss

WORKER = Path(__file__).resolve().parent / "two_process_worker.py"


def test_two_processes_match_one(tmp_path: Any) -> None:
    launch_two_processes(WORKER, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)

    # A prompt straddles the ranks, and a rank's prompts straddle its micro-batches.
    assert all(len(r["micro_batches"]) == 4 and len(r["grads"]) == 2 for r in ranks)
    first_pass = [r["micro_batches"][:2] for r in ranks]  # the second pass reuses these rows
    groups = [set(torch.cat([mb["disco_group_ids"] for mb in mbs]).tolist()) for mbs in first_pass]
    assert groups[0] & groups[1]
    for mbs in first_pass:
        a, b = (set(mb["disco_group_ids"].tolist()) for mb in mbs)
        assert a & b or len(a | b) < 3

    rows = concat(first_pass[0] + first_pass[1])
    rewards = check_generation_batch(load_example().build_tokenizer(), rows, num_generations=4)
    assert len(rewards) == 12 and 0 < (rewards > 0.5).sum() < 12
    logs = [e for e in ranks[0]["log_history"] if "disco/objective" in e]
    assert len(logs) == 2
    for step in range(2):
        # DDP averaged the ranks' gradients: both hold the same one, at the same parameters.
        g0, g1 = ranks[0]["grads"][step], ranks[1]["grads"][step]
        for name in g0:
            torch.testing.assert_close(g0[name], g1[name])
        for name, value in ranks[0]["params"][step].items():
            torch.testing.assert_close(value, ranks[1]["params"][step][name])

        model = reference_model(ranks[0]["params"][step])
        logp = token_log_probs(model, rows)
        out = disco_loss(
            logp, rows["old_per_token_logps"], rows["completion_mask"], rewards,
            rows["disco_group_ids"],
        )  # fmt: skip
        out.loss.backward()
        assert_grads_close(g0, model)
        assert abs(logs[step]["disco/objective"] - float(out.objective.detach())) < 1e-5
    assert logs[1]["disco/kl"] != 0.0  # the policy moved: the second step is not the first's
    # the second pass reuses the rows with new weights (replanned), not the sampling ones
    first, second = ([r["micro_batches"][i]["disco_weights"] for r in ranks] for i in (0, 2))
    assert any(not torch.equal(a, b) for a, b in zip(first, second))
