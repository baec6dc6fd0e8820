"""Two processes (accelerate, CPU, gloo): a prompt's completions are split across ranks and
micro-batches, and the averaged gradient equals the single-process ``disco_loss`` gradient on
all the completions of the step."""

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
    groups = [set(torch.cat([mb["disco_group_ids"] for mb in r["micro_batches"]]).tolist())
              for r in ranks]  # fmt: skip
    assert groups[0] & groups[1]
    for r in ranks:
        a, b = (set(mb["disco_group_ids"].tolist()) for mb in r["micro_batches"])
        assert a & b or len(a | b) < 3

    # DDP averaged the ranks' gradients: both hold the same one.
    g0, g1 = ranks[0]["grads"][0], ranks[1]["grads"][0]
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name])
    for name, value in ranks[0]["params"][0].items():
        torch.testing.assert_close(value, ranks[1]["params"][0][name])

    rows = concat(ranks[0]["micro_batches"] + ranks[1]["micro_batches"])
    rewards = check_generation_batch(load_example().build_tokenizer(), rows, num_generations=4)
    assert len(rewards) == 12 and 0 < (rewards > 0.5).sum() < 12
    model = reference_model(ranks[0]["params"][0])
    logp = token_log_probs(model, rows)
    out = disco_loss(logp, logp.detach(), rows["completion_mask"], rewards, rows["disco_group_ids"])
    out.loss.backward()
    assert_grads_close(g0, model)

    logged = next(e for e in ranks[0]["log_history"] if "disco/objective" in e)
    assert abs(logged["disco/objective"] - float(out.objective.detach())) < 1e-5
