"""Smoke test of ``python -m benchmarks.layout --quick``: verl's real actor update in one
process on the CPU (a tiny random model), every section, the report files. Nothing here is
timed; what is asserted are properties the numbers must have whatever the machine:

* memory: micro-batches of one response hold less at the peak than whole questions;
* time: every variant (current, sampling, GRPO at one response; micro_batch, GRPO at whole
  questions) ran in every round, its ratio to GRPO at the same layout is finite, and current's
  planning (its stats forward) took time;
* drift: on the first mini-batch of a step ``sampling`` applies the exact gradient (its stats
  are the old log-probs', computed at the parameters the step starts from, so they are the
  current ones), while the following mini-batch's parameters have moved (KL > delta);
* drift: the exact gradient equals the objective's plus kappa times the KL's, measured in
  separate passes (the decomposition the table's columns rely on).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_layout_benchmark_quick(tmp_path: Path) -> None:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("VERL_USE_EXTERNAL_MODULES", None)
    command = ["-m", "benchmarks.layout", "--quick", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    text = (tmp_path / "results.md").read_text()
    titles = (
        "Summary",
        "Peak memory of one update",
        "Update time",
        "Drift of weights=sampling",
        "On paper",
    )
    for title in titles:
        assert f"## {title}" in text
    assert (tmp_path / "layout_memory.png").stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["summary"]) == 3 + 3 + 2  # memory ratios, time ratios, drift (one lr)

    memory = {row["label"]: row["peak_bytes"] for row in results["memory"]}
    whole = results["memory"][0]
    assert whole["weights"] == "micro_batch" and whole["micro"] == results["preset"]["memory"]["n"]
    assert 0 < memory["current, 1"] < whole["peak_bytes"]
    assert 0 < memory["GRPO, 1"] < memory[f"GRPO, {whole['micro']}"]

    # every variant timed in every round; ratios to GRPO at the same layout, finite
    time = results["time"]
    assert set(time["wall"]) == {
        "current",
        "sampling",
        "GRPO",
        "micro_batch",
        "GRPO, whole questions",
    }
    assert all(len(ts) == time["rounds"] >= 1 for ts in time["wall"].values())
    for name in ("current/GRPO", "sampling/GRPO", "micro_batch/GRPO"):
        for value in results["time_ratios"][name].values():
            assert math.isfinite(value) and value > 0
    assert all(p > 0 for p in time["plan"]["current"])  # the stats forward is planned and timed

    drift = results["drift"]
    assert [r["mini_batch"] for r in drift] == [0, 1]
    first, second = drift
    assert first["sampling"][1] < 1e-5  # exact on the first mini-batch
    assert second["kl"] > 1e-4  # the parameters moved: the squared hinge is active
    assert second["sampling"][1] > 1e-3  # ... and sampling's per-micro-batch hinge is not exact
    for row in drift:
        assert row["decomposition_error"] < 1e-4
        for key in ("sampling", "stale_weights", "local_hinge", "previous_kl_slope"):
            cos, rel = row[key]
            assert -1 - 1e-9 <= cos <= 1 + 1e-9 and math.isfinite(rel) and rel >= 0
