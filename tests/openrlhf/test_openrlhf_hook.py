"""The worker setup hook installs the adapter inside Ray workers (a local Ray cluster on CPU).

A fresh Python process runs the launcher with DisCO flags; OpenRLHF's own ``train`` calls
``ray.init`` (through the launcher, which adds the hook) and is stopped at ``get_strategy``,
where a Ray task inspects a worker process: the hook ran there, OpenRLHF's classes are
patched once imported, and the hook itself did not import DeepSpeed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from discoloss.adapters.openrlhf.patch import _MARK

SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import openrlhf.utils
    import ray


    def probe():
        import os
        import sys

        from discoloss.adapters.openrlhf import patch

        before = {
            "finder": any(type(f).__name__ == "_PostImportFinder" for f in sys.meta_path),
            "deepspeed": "deepspeed" in sys.modules,
            "patched": sorted(patch.installed_modules()),
        }
        import openrlhf.trainer.ppo_utils.experience_maker as em
        import openrlhf.trainer.ray.ppo_actor as pa

        mark = "%(mark)s"
        return {
            "pid": os.getpid(),
            "before": before,
            "patched": sorted(patch.installed_modules()),
            "wrapped": {
                "ppo_train": hasattr(pa.ActorPPOTrainer.ppo_train, mark),
                "training_step": hasattr(pa.ActorPPOTrainer.training_step, mark),
                "__init__": hasattr(pa.ActorPPOTrainer.__init__, mark),
                "windows": hasattr(pa.iter_grad_accum_global_norm, mark),
                "advantages": hasattr(
                    em.RemoteExperienceMaker.compute_advantages_and_returns, mark
                ),
            },
        }


    def get_strategy(args):
        assert args.algo.advantage.estimator == "disco"
        result = ray.get(ray.remote(num_cpus=1)(probe).remote())
        result["driver_pid"] = __import__("os").getpid()
        print("PROBE " + json.dumps(result), flush=True)
        ray.shutdown()
        raise SystemExit(0)


    openrlhf.utils.get_strategy = get_strategy
    from discoloss.adapters.openrlhf.train_ppo_ray import main

    main(sys.argv[1:])
    """
) % {"mark": _MARK}

ARGV = [
    "--actor.model_name_or_path", "/models/tiny",
    "--reward.remote_url", "http://127.0.0.1:9/get_reward",
    "--rollout.n_samples_per_prompt", "4", "--rollout.batch_size", "8",
    "--rollout.micro_batch_size", "4", "--train.batch_size", "16", "--train.micro_batch_size", "8",
    "--actor.num_gpus_per_node", "1", "--algo.kl.init_coef", "0",
    "--algo.advantage.estimator", "disco", "--algo.disco.tau", "5",
]


def test_launcher_installs_the_adapter_in_ray_workers(tmp_path):
    script = tmp_path / "launch.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), *ARGV],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("PROBE "):])
    assert result["pid"] != result["driver_pid"]  # it ran in a Ray worker process
    # the hook ran before the task: finder registered, nothing imported or patched yet
    assert result["before"] == {"finder": True, "deepspeed": False, "patched": []}
    assert result["patched"] == ["openrlhf.trainer.ppo_utils.experience_maker",
                                 "openrlhf.trainer.ray.ppo_actor"]
    assert all(result["wrapped"].values()), result["wrapped"]
