"""Difficulty-bias analysis: how much weight each method puts on each question.

GRPO weights a question of accuracy p by sqrt(p(1-p)), Dr. GRPO by p(1-p): questions that are
almost always or almost never solved barely train (arXiv 2505.12366, section 3). DisCO weights
every question with signal equally, and so does DRPO (arXiv 2510.04474), which moves weight
between a question's correct answers only (towards the short ones, given their lengths). This
package computes those weights in closed form (:func:`difficulty_weight`), measures them on the
advantages or weights any estimator produced (:func:`implied_weights`) and reports them for a
batch of rollouts (:func:`difficulty_report`, and the ``discoloss analyze`` command for rollout
dumps, :mod:`discoloss.analysis.cli`).

Needs torch only; the plot imports matplotlib and Parquet input pyarrow when used.
"""

from discoloss.analysis.report import DifficultyReport, PositiveWeights, difficulty_report
from discoloss.analysis.weights import (
    METHODS,
    ImpliedWeights,
    Method,
    difficulty_weight,
    implied_weights,
)

__all__ = [
    "METHODS",
    "DifficultyReport",
    "ImpliedWeights",
    "Method",
    "PositiveWeights",
    "difficulty_report",
    "difficulty_weight",
    "implied_weights",
]
