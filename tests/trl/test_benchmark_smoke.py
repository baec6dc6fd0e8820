"""Smoke test of ``benchmarks/trl_weights.py`` (the measurements behind ``DisCOConfig.weights``'s
default): its instrumented trainers still run against the adapter. Nothing here is timed."""

from __future__ import annotations

import math

from benchmarks.trl_weights import main


def test_quick_run_measures_drift_and_cost() -> None:
    results = main(["--quick"])
    rows = results["drift"]
    # --quick: 2 optimizer steps on one generation batch (num_iterations=4): the second replans
    assert [(r["step"], r["use"]) for r in rows] == [(2, 2)]
    for key in ("sampling_cos", "hybrid_cos"):
        assert -1.0 <= rows[0][key] <= 1.0 + 1e-12
    for key in ("sampling_rel", "hybrid_rel"):
        assert math.isfinite(rows[0][key]) and rows[0][key] >= 0.0
    cost = results["cost"]
    assert cost["replanned_steps"] == 1
    assert cost["planning_over_training"]["median"] > 0.0
    assert all(v > 0.0 for v in cost["run_s"].values())
