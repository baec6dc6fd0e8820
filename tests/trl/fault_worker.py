"""One rank of the one-rank-fault test (run by ``accelerate launch``): short trainings
(``weights="current"``, the default), each with a bad value on rank 1 only; records, per
training, what this rank raised.

* ``old_log_prob``: a non-finite sampling log-prob at a completion token (the log-probs the
  trainer computes for DisCO's weights);
* ``current_log_prob``: a non-finite log-prob of the current policy in the training forward
  (what an overflowing model produces);
* ``planning_log_prob``: a non-finite log-prob in the no-grad planning pass that
  ``weights="current"`` runs before the second optimizer step on a generation batch;
* ``reward``: a reward function that returns inf for one completion;
* ``empty_completion``: a completion whose loss mask is all 0.

The stand-ins are test-only subclasses that change one value; nothing else is patched.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from trl_support import RecordingTrainer, load_example, tiny_config  # noqa: E402

FAULTY_RANK = 1


class FaultyTrainer(RecordingTrainer):
    """Puts a non-finite value at the first completion token of rank 1's first row."""

    fault = ""

    def _rank(self) -> int:
        return int(self.accelerator.process_index)

    def _sampling_log_probs(self, output: dict[str, Any], batch_size: int) -> torch.Tensor:
        if self.fault == "empty_completion" and self._rank() == FAULTY_RANK:
            output["completion_mask"][0] = 0  # in place: the loss mask of the generation batch
        logps = super()._sampling_log_probs(output, batch_size)
        if self.fault == "old_log_prob" and self._rank() == FAULTY_RANK:
            logps = logps.clone()
            logps[0, 0] = float("nan")
        return logps

    def _current_log_probs(self, chunk: dict[str, Any]) -> torch.Tensor:
        logps = super()._current_log_probs(chunk)
        if self.fault == "planning_log_prob" and self._rank() == FAULTY_RANK:
            logps = logps.clone()
            logps[0, 0] = float("nan")
        return logps

    def _get_per_token_logps_and_entropies(self, *args: Any, **kwargs: Any) -> Any:
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        training_forward = torch.is_grad_enabled() and kwargs.get("compute_entropy", False)
        if self.fault == "current_log_prob" and training_forward and self._rank() == FAULTY_RANK:
            bad = torch.zeros_like(logps)
            bad[0, 0] = float("-inf")
            logps = logps + bad  # keeps the graph: the model still gets a gradient
        return logps, entropies, aux


FAULTS = ("old_log_prob", "current_log_prob", "reward", "empty_completion", "planning_log_prob")


def main(out_dir: str, faults: tuple[str, ...] = FAULTS) -> None:
    ex = load_example()
    outcomes: dict[str, Any] = {}
    rank = -1
    for fault in faults:

        def reward(
            completions: list[str], answer: list[str], fault: str = fault, **kw: Any
        ) -> list[float]:
            scores = ex.parity_reward(completions, answer)
            if fault == "reward" and torch.distributed.get_rank() == FAULTY_RANK:
                scores[0] = float("inf")
            return scores

        planning = fault == "planning_log_prob"  # the second step on a generation batch
        config = tiny_config(
            str(Path(out_dir) / f"run-{fault}"),
            per_device_train_batch_size=3,
            num_generations=4,
            num_iterations=2 if planning else 1,
            max_steps=2 if planning else 1,
            ddp_timeout=60,  # a rank left alone in a collective fails instead of waiting 30 min
        )
        trainer = FaultyTrainer(
            model=ex.build_model(),
            reward_funcs=reward,
            args=config,
            train_dataset=ex.build_dataset(),
            processing_class=ex.build_tokenizer(),
        )
        trainer.fault = fault
        rank = trainer.accelerator.process_index
        try:
            trainer.train()
            outcomes[fault] = ("finished", trainer.state.global_step)
        except Exception as exc:  # recorded and compared across ranks by the test
            outcomes[fault] = (
                type(exc).__name__,
                str(exc),
                trainer.state.global_step,  # optimizer steps taken
                traceback.format_exc(),
            )
        torch.save(outcomes, Path(out_dir) / f"faults-rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], *[tuple(a.split(",")) for a in sys.argv[2:3]])
