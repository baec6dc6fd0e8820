"""One rank of the two-process test (run by ``accelerate launch``): two DisCO optimizer steps on
one generation batch (``num_iterations=2``, ``weights="current"``: the second step is planned
from a no-grad pass at its parameters, gathered over both processes), then save what this rank
saw and the gradients it applied."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from trl_support import make_recording_trainer, tiny_config  # noqa: E402


def main(out_dir: str) -> None:
    # 3 completions per rank per micro-batch, 4 per prompt: prompts straddle the two ranks.
    config = tiny_config(
        str(Path(out_dir) / "run"),
        per_device_train_batch_size=3,
        num_generations=4,
        num_iterations=2,
        max_steps=2,
        weights="current",
    )
    trainer, recorder = make_recording_trainer(config)
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(
        {
            "world_size": trainer.accelerator.num_processes,
            "micro_batches": trainer.micro_batches,
            "params": recorder.params,
            "grads": recorder.grads,
            "log_history": trainer.state.log_history,
        },
        Path(out_dir) / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main(sys.argv[1])
