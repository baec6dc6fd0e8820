"""A bad value on one data-parallel rank in TRL's loop (two processes, accelerate, gloo).

The job must stop on every rank with discoloss's message, never with one rank raising while
the other waits in a collective (under NCCL that is a hang until the timeout; under gloo the
waiting rank dies of "Connection closed by peer"). Each rank records what it raised; both must
have raised the same exception with the same message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from trl_support import launch_two_processes

WORKER = Path(__file__).resolve().parent / "fault_worker.py"

EXPECTED = {
    "old_log_prob": "DisCOTrainer: non-finite sampling log-prob (old_per_token_logps) at a "
    "completion token of process 1, completion 0",
    "current_log_prob": "DisCOTrainer: non-finite log-prob of the current policy in the "
    "optimizer step at a completion token of process 1, completion 0",
    "reward": "DisCOTrainer: non-finite reward for the completion at process 1, completion 0 "
    "(the rewards of the reward functions, weighted and summed, must be finite; None marks a "
    "completion that cannot be scored)",
    "empty_completion": "DisCOTrainer: the completion at process 1, completion 0 has no "
    "completion token (completion_mask * tool_mask is all 0); DisCO scores are token means "
    "over a non-empty completion",
    "planning_log_prob": "DisCOTrainer: non-finite log-prob of the current policy in the "
    "planning pass of weights='current' at a completion token of process 1, completion 0",
}
#: Optimizer steps taken before the error: the planning pass runs before the second step.
STEPS_BEFORE = {"planning_log_prob": 1}


def test_a_bad_value_on_one_rank_stops_every_rank_with_our_message(tmp_path: Any) -> None:
    launch_two_processes(WORKER, str(tmp_path))
    ranks = [torch.load(tmp_path / f"faults-rank{r}.pt", weights_only=False) for r in (0, 1)]
    for fault, message in EXPECTED.items():
        for rank, outcomes in enumerate(ranks):
            # the same error on both processes, raised before the step it would corrupt
            expected = ("ValueError", message, STEPS_BEFORE.get(fault, 0))
            assert outcomes[fault][:3] == expected, (fault, rank, outcomes[fault])
