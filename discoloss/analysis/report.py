"""Difficulty report of a batch: which questions carry signal, and how much weight each method
puts on them.

:func:`difficulty_report` runs each method's own estimator on the batch (the baselines'
:func:`~discoloss.baselines.group_advantages`, the core's
:func:`~discoloss.discriminative_weights`) and measures the weight per question with
:func:`~discoloss.analysis.implied_weights`; the closed forms of
:func:`~discoloss.analysis.difficulty_weight` give the curves of the plot. Rendering needs
nothing beyond the standard library (text table, JSON); the plot imports matplotlib when called.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import Tensor

from discoloss._checks import check_batch, check_device, check_number, check_tensor
from discoloss.analysis.weights import (
    METHODS,
    Method,
    WeightKind,
    difficulty_weight,
    implied_weights,
)
from discoloss.baselines import group_advantages
from discoloss.objectives import dense_group_ids, discriminative_weights
from discoloss.options import DiscoOptions

__all__ = ["DifficultyReport", "PositiveWeights", "difficulty_report"]

#: Accuracy rows of the table: exact k/n values when every group has the same size up to this.
_MAX_EXACT_ROWS = 32
_LABELS = {
    "grpo": "GRPO",
    "dr_grpo": "Dr. GRPO",
    "dapo": "DAPO",
    "disco": "DisCO",
    "disco_b": "DisCO-b",
    "drpo": "DRPO",
}
_STYLE = {  # colour, line style, marker
    "grpo": ("tab:blue", "-", "o"),
    "dr_grpo": ("tab:orange", "-", "s"),
    "dapo": ("tab:green", (0, (4, 2)), "^"),
    "disco": ("tab:red", "-", "D"),
    "disco_b": ("tab:purple", (0, (1, 2)), "v"),
    "drpo": ("tab:brown", (0, (6, 2, 1, 2)), "P"),
}


@dataclass(frozen=True)
class AccuracyRow:
    """One row of the table: the questions whose accuracy falls in [low, high] (label)."""

    label: str
    low: float
    high: float
    questions: int
    mean_weight: dict[str, float]
    weight_share: dict[str, float]


@dataclass(frozen=True)
class PositiveWeights:
    """DRPO's weights within each question's correct answers (arXiv 2510.04474), from the
    responses' lengths: v = softmax(pref / lam) over the correct answers of a question with
    signal, pref = 1 - length / max_length.

    Per question (the report's order; 0 or nan for questions without signal):
    ``num_positives`` (correct answers), ``effective_positives`` (1 / sum v^2: the number of
    correct answers DRPO effectively learns from; ``num_positives`` for DisCO),
    ``mean_positive_length`` (plain mean length of the correct answers, DisCO's weighting) and
    ``weighted_positive_length`` (sum v_i length_i, DRPO's weighting).
    """

    lam: float
    max_length: int
    max_length_source: str
    length_source: str
    num_positives: Tensor
    effective_positives: Tensor
    mean_positive_length: Tensor
    weighted_positive_length: Tensor

    def summary(self) -> dict[str, float]:
        """Means over the questions with signal (nan when there is none)."""
        signal = self.effective_positives > 0
        if not bool(signal.any()):
            nan = math.nan
            return dict.fromkeys(
                ("positives", "effective_positives", "mean_length", "weighted_length"), nan
            )
        return {
            "positives": float(self.num_positives[signal].to(torch.float64).mean()),
            "effective_positives": float(self.effective_positives[signal].mean()),
            "mean_length": float(self.mean_positive_length[signal].mean()),
            "weighted_length": float(self.weighted_positive_length[signal].mean()),
        }


@dataclass(frozen=True)
class DifficultyReport:
    """Per-question accuracies and weights of a batch, with summaries.

    Per question (Q of them, ascending group id): ``group_ids``, ``size`` (responses),
    ``accuracy`` (share with reward > threshold) and ``weights[method]`` (the weight that
    method's estimator put on it, see :func:`~discoloss.analysis.implied_weights`).
    Summaries: ``frac_no_correct`` / ``frac_all_correct`` (questions no method learns from),
    ``frac_with_signal``, the negative-to-positive imbalance over questions with signal
    (``imbalance_mean`` / ``imbalance_median`` of ``|N|/|P|``, ``frac_more_negatives``,
    ``negatives_per_positive`` pooled), the accuracy histogram (``hist_edges``, ``hist_counts``)
    and ``rows``, the table's accuracy buckets. ``positive_weights``: DRPO's weights within
    each question's correct answers, when the responses' lengths were given.
    """

    threshold: float
    methods: tuple[str, ...]
    group_ids: Tensor
    size: Tensor
    accuracy: Tensor
    weights: dict[str, Tensor]
    num_responses: int
    binary_rewards: bool
    binarized: bool
    frac_no_correct: float
    frac_all_correct: float
    frac_with_signal: float
    imbalance_mean: float
    imbalance_median: float
    frac_more_negatives: float
    negatives_per_positive: float
    positive_rate: float
    hist_edges: list[float]
    hist_counts: list[int]
    rows: list[AccuracyRow]
    common_size: int | None
    eps: float
    std_unbiased: bool
    group_names: list[str] | None = field(default=None)
    positive_weights: PositiveWeights | None = field(default=None)

    @property
    def num_questions(self) -> int:
        return int(self.group_ids.numel())

    # ------------------------------------------------------------------ text

    def to_table(self, *, per_question: bool = False, max_rows: int | None = None) -> str:
        """Plain-text report: summary lines and the accuracy-bucket table.

        Per bucket: the number of questions, each method's mean weight per question and the
        share of the method's total weight that lands in the bucket. ``per_question`` appends
        one line per question (at most ``max_rows``).
        """
        q = self.num_questions
        lines: list[str] = []
        sizes = self.size.tolist()
        if self.common_size is not None:
            size_txt = f"{self.common_size} responses each"
        else:
            size_txt = f"{min(sizes)}-{max(sizes)} responses each, ragged"
        lines.append(
            f"Difficulty report: {self.num_responses} responses, {q} questions ({size_txt}); "
            f"correct iff reward > {self.threshold:g}"
        )
        if not self.binary_rewards:
            how = "labels (binarized)" if self.binarized else "raw rewards"
            lines.append(f"  rewards are not 0/1: GRPO-family advantages use the {how}")
        lines.append(
            f"  no correct answer: {_pct(self.frac_no_correct)}   all correct: "
            f"{_pct(self.frac_all_correct)}   -> no signal for any method: "
            f"{_pct(1.0 - self.frac_with_signal)} of questions"
        )
        if self.frac_with_signal > 0:
            lines.append(
                f"  imbalance (questions with signal): {self.imbalance_mean:.2f} negatives per "
                f"positive on average (median {self.imbalance_median:.2f}, pooled "
                f"{self.negatives_per_positive:.2f}); "
                f"{_pct(self.frac_more_negatives)} have more negatives than positives"
            )
        lines.append("")
        lines.extend(self._bucket_table())
        lines.append("")
        lines.append(
            "  weight: G x positive mass per question (DisCO = 1 on every question with signal); "
            "share: % of the method's total weight"
        )
        if self.positive_weights is not None:
            lines.append("")
            lines.extend(self._positive_lines(self.positive_weights))
        elif "drpo" in self.methods:
            lines.append(
                "  DRPO: 1 per question with signal, like DisCO; its weights within a question's "
                "correct answers need the responses' lengths (--length-column)"
            )
        if per_question:
            lines.append("")
            lines.extend(self._question_table(max_rows))
        return "\n".join(lines)

    def _bucket_table(self) -> list[str]:
        methods = self.methods
        head1 = f"{'accuracy':>11} {'questions':>9} |"
        head2 = f"{'':>11} {'':>9} |"
        for m in methods:
            head1 += f" {_LABELS[m]:^15} |"
            head2 += f" {'weight':>7} {'share':>7} |"
        out = [head1, head2, "-" * len(head1)]
        for row in self.rows:
            line = f"{row.label:>11} {row.questions:>9} |"
            for m in methods:
                if row.questions == 0:
                    line += f" {'-':>7} {'-':>7} |"
                else:
                    line += f" {row.mean_weight[m]:>7.3f} {_pct(row.weight_share[m]):>7} |"
            out.append(line)
        out.append("-" * len(head1))
        total = f"{'all':>11} {self.num_questions:>9} |"
        for m in methods:
            w = self.weights[m]
            mean = float(w.mean()) if w.numel() else 0.0
            total += f" {mean:>7.3f} {'':>7} |"
        out.append(total)
        return out

    @staticmethod
    def _positive_lines(pw: PositiveWeights) -> list[str]:
        s = pw.summary()
        scale = pw.lam * pw.max_length
        out = [
            f"DRPO within a question's correct answers: v = softmax((1 - length / max_length) "
            f"/ lam), lam = {pw.lam:g}, max_length = {pw.max_length} ({pw.max_length_source}); "
            f"lengths: {pw.length_source}",
            f"  an answer shorter than another by lam x max_length = {scale:.4g} gets e = 2.72 "
            "times its weight",
        ]
        if math.isnan(s["positives"]):
            out.append("  no question with signal")
            return out
        change = (s["weighted_length"] / s["mean_length"] - 1.0) if s["mean_length"] > 0 else 0.0
        out.append(
            f"  questions with signal: {s['positives']:.2f} correct answers on average, "
            f"{s['effective_positives']:.2f} effective under DRPO's weights (1 / sum v^2)"
        )
        out.append(
            f"  length of the correct answers: mean {s['mean_length']:.1f} (DisCO's weighting), "
            f"DRPO-weighted {s['weighted_length']:.1f} ({100.0 * change:+.1f}%)"
        )
        return out

    def _question_table(self, max_rows: int | None) -> list[str]:
        names = self._names()
        width = min(max((len(n) for n in names), default=8), 40)
        pw = self.positive_weights
        head = f"{'question':<{width}} {'n':>4} {'accuracy':>8}"
        for m in self.methods:
            head += f" {_LABELS[m]:>9}"
        if pw is not None:
            head += f" {'DRPO eff.pos':>12} {'len mean':>9} {'len DRPO':>9}"
        out = [head, "-" * len(head)]
        order = sorted(range(self.num_questions), key=lambda i: float(self.accuracy[i]))
        shown = order if max_rows is None else order[:max_rows]
        for i in shown:
            name = names[i] if len(names[i]) <= width else names[i][: width - 3] + "..."
            line = f"{name:<{width}} {int(self.size[i]):>4} {float(self.accuracy[i]):>8.3f}"
            for m in self.methods:
                line += f" {float(self.weights[m][i]):>9.4f}"
            if pw is not None:
                line += (
                    f" {float(pw.effective_positives[i]):>12.2f}"
                    f" {float(pw.mean_positive_length[i]):>9.1f}"
                    f" {float(pw.weighted_positive_length[i]):>9.1f}"
                )
            out.append(line)
        if len(shown) < len(order):
            out.append(f"... {len(order) - len(shown)} more questions")
        return out

    def _names(self) -> list[str]:
        if self.group_names is not None:
            return list(self.group_names)
        return [str(g) for g in self.group_ids.tolist()]

    def __str__(self) -> str:
        return self.to_table()

    # ------------------------------------------------------------------ JSON

    def to_dict(self, *, per_question: bool = True) -> dict[str, Any]:
        """JSON-serialisable summary (floats, ints, strings, lists)."""
        out: dict[str, Any] = {
            "num_responses": self.num_responses,
            "num_questions": self.num_questions,
            "threshold": self.threshold,
            "group_size": self.common_size
            if self.common_size is not None
            else {"min": int(self.size.min()), "max": int(self.size.max())},
            "binary_rewards": self.binary_rewards,
            "binarized": self.binarized,
            "std_unbiased": self.std_unbiased,
            "eps": self.eps,
            "frac_no_correct": self.frac_no_correct,
            "frac_all_correct": self.frac_all_correct,
            "frac_with_signal": self.frac_with_signal,
            "positive_rate": self.positive_rate,
            "imbalance": {
                "mean_negatives_per_positive": _finite_or_none(self.imbalance_mean),
                "median_negatives_per_positive": _finite_or_none(self.imbalance_median),
                "pooled_negatives_per_positive": _finite_or_none(self.negatives_per_positive),
                "frac_more_negatives": self.frac_more_negatives,
            },
            "accuracy_histogram": {"edges": self.hist_edges, "counts": self.hist_counts},
            "methods": list(self.methods),
            "mean_weight": {m: float(self.weights[m].mean()) for m in self.methods},
            "rows": [
                {
                    "label": r.label,
                    "low": r.low,
                    "high": r.high,
                    "questions": r.questions,
                    "mean_weight": r.mean_weight,
                    "weight_share": r.weight_share,
                }
                for r in self.rows
            ],
        }
        pw = self.positive_weights
        if pw is not None:
            out["drpo_positive_weights"] = {
                "lam": pw.lam,
                "max_length": pw.max_length,
                "max_length_source": pw.max_length_source,
                "length_source": pw.length_source,
                **{k: _finite_or_none(v) for k, v in pw.summary().items()},
            }
        if per_question:
            names = self._names()
            out["questions"] = [
                {
                    "group": names[i],
                    "size": int(self.size[i]),
                    "accuracy": float(self.accuracy[i]),
                    "weights": {m: float(self.weights[m][i]) for m in self.methods},
                }
                for i in range(self.num_questions)
            ]
            if pw is not None:
                for i, q in enumerate(out["questions"]):
                    q["drpo"] = {
                        "effective_positives": float(pw.effective_positives[i]),
                        "mean_positive_length": _finite_or_none(float(pw.mean_positive_length[i])),
                        "weighted_positive_length": _finite_or_none(
                            float(pw.weighted_positive_length[i])
                        ),
                    }
        return out

    # ------------------------------------------------------------------ plot

    def plot(self, path: str | Path, *, dpi: int = 120, title: str | None = None) -> Path:
        """Write a PNG: weight vs accuracy (closed-form curve per method, this batch's questions
        as points) above the histogram of the questions' accuracies. Needs matplotlib."""
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as exc:  # pragma: no cover - exercised without the extra
            raise ImportError(
                "plotting needs matplotlib: pip install matplotlib (or pip install -e "
                "'.[analysis]' in a checkout of discoloss)"
            ) from exc
        path = Path(path)
        fig = Figure(figsize=(8.0, 6.4), layout="constrained")
        FigureCanvasAgg(fig)
        ax, hx = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
        grid = torch.linspace(0.0, 1.0, 401, dtype=torch.float64)
        n = self.common_size
        acc = self.accuracy
        for k, m in enumerate(self.methods):
            colour, style, marker = _STYLE[m]
            label = _LABELS[m]
            if n is not None and n > 1:
                curve = difficulty_weight(
                    grid, cast(Method, m), n=n, std_unbiased=self.std_unbiased, eps=self.eps
                )
                ax.plot(grid, curve, color=colour, linestyle=":", linewidth=1.0, alpha=0.8)
            pop = difficulty_weight(grid, cast(Method, m))
            ax.plot(grid, pop, color=colour, linestyle=style, linewidth=1.8, label=label)
            jitter = (k - (len(self.methods) - 1) / 2) * 0.004
            ax.scatter(
                acc + jitter, self.weights[m], color=colour, marker=marker, s=22, alpha=0.55,
                edgecolors="none",
            )  # fmt: skip
        ax.set_ylabel("weight on the question  omega")
        top = max(
            [1.0] + [float(self.weights[m].max()) for m in self.methods if self.num_questions]
        )
        ax.set_ylim(0.0, 1.3 * top)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="grey", linestyle="-", linewidth=1.8))
        labels.append("population omega(p)")
        if n is not None and n > 1:
            handles.append(Line2D([], [], color="grey", linestyle=":", linewidth=1.0))
            labels.append(f"computed from n={n} responses")
        handles.append(Line2D([], [], color="grey", marker="o", linestyle="", alpha=0.6))
        labels.append("this batch's questions")
        ax.legend(handles, labels, loc="upper center", fontsize=8, ncols=4)
        ax.set_title(
            title
            or (
                f"Difficulty weights: {self.num_questions} questions, "
                f"{_pct(1.0 - self.frac_with_signal)} without signal"
            )
        )
        edges = self.hist_edges
        hx.stairs(self.hist_counts, edges, fill=True, color="tab:gray", alpha=0.6)
        hx.set_xlabel("question accuracy p (share of correct responses)")
        hx.set_ylabel("questions")
        hx.set_xlim(-0.02, 1.02)
        hx.grid(alpha=0.3)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, format="png")
        return path


def _pct(x: float) -> str:
    return f"{100.0 * x:.1f}%"


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _method_weights(
    rewards: Tensor,
    group_ids: Tensor,
    methods: Sequence[str],
    *,
    threshold: float,
    binarize: bool,
    std_unbiased: bool,
    eps: float,
    preferences: Tensor,
    lam: float,
) -> dict[str, Tensor]:
    """Run each method's estimator on the batch and measure its weight per question."""
    labels = (rewards > threshold).to(torch.float64)
    pg_rewards = labels if binarize else rewards
    out: dict[str, Tensor] = {}
    for m in methods:
        kind: WeightKind = "advantages"
        if m in ("grpo", "dapo"):
            adv = group_advantages(
                pg_rewards, group_ids, scale="std", std_unbiased=std_unbiased, eps=eps,
                validate=False,
            )  # fmt: skip
        elif m == "dr_grpo":
            adv = group_advantages(pg_rewards, group_ids, scale="none", validate=False)
        else:
            # DisCO's weight per question does not depend on the scores: equal scores suffice.
            scores = torch.zeros(rewards.shape[0], dtype=torch.float64, device=rewards.device)
            objective = cast(Literal["disco", "disco_b", "drpo"], m)
            adv = discriminative_weights(
                scores, rewards, group_ids, objective=objective, threshold=threshold,
                validate=False, lam=lam, preferences=preferences if m == "drpo" else None,
            )  # fmt: skip
            kind = "weights"
        iw = implied_weights(adv, rewards, group_ids, kind=kind, threshold=threshold)
        out[m] = iw.weight.cpu()
    return out


def _rows(
    accuracy: Tensor,
    size: Tensor,
    weights: Mapping[str, Tensor],
    methods: Sequence[str],
    *,
    common: int | None,
    bins: int,
) -> tuple[list[AccuracyRow], list[float], list[int]]:
    """Table buckets and histogram: exact k/n values for a common group size n, else bins."""
    if common is not None and common <= _MAX_EXACT_ROWS:
        n = common
        ks = torch.round(accuracy * n).to(torch.int64)
        buckets = [(f"{k}/{n}", k / n, k / n, ks == k) for k in range(n + 1)]
        edges = [(k - 0.5) / n for k in range(n + 2)]  # one bar centred on each k/n
    else:
        inner = [(i / bins, (i + 1) / bins) for i in range(bins)]
        buckets = [("0", 0.0, 0.0, accuracy == 0)]
        for lo, hi in inner:
            sel = (accuracy > 0) & (accuracy < 1) & (accuracy >= lo)
            sel = sel & ((accuracy < hi) if hi < 1 else (accuracy < 1))
            buckets.append((f"{lo:.2f}-{hi:.2f}", lo, hi, sel))
        buckets.append(("1", 1.0, 1.0, accuracy == 1))
        edges = [i / bins for i in range(bins + 1)]
    totals = {m: float(weights[m].sum()) for m in methods}
    rows = []
    for label, lo, hi, sel in buckets:
        count = int(sel.sum())
        mean_w = {m: float(weights[m][sel].mean()) if count else 0.0 for m in methods}
        share = {
            m: (float(weights[m][sel].sum()) / totals[m]) if totals[m] > 0 else 0.0 for m in methods
        }
        rows.append(AccuracyRow(label, lo, hi, count, mean_w, share))
    if common is not None and common <= _MAX_EXACT_ROWS:
        counts = [r.questions for r in rows]
    else:
        hist = torch.histogram(accuracy.to(torch.float64), bins=bins, range=(0.0, 1.0))
        counts = [int(c) for c in hist.hist.tolist()]
    return rows, edges, counts


def _lengths(
    lengths: Tensor | None, rewards: Tensor, max_length: int | None
) -> tuple[Tensor | None, int, str]:
    """Validated float64 CPU lengths (or None), DRPO's max_length and where it comes from."""
    if lengths is None:
        if max_length is not None:
            raise ValueError("max_length needs lengths (DRPO's length preference)")
        return None, 1, ""
    check_tensor("lengths", lengths, ndim=1, kind="real")
    check_batch(("rewards", "lengths"), (rewards, lengths))
    lens = lengths.detach().cpu().to(torch.float64)
    if not bool((lens.isfinite() & (lens >= 0)).all()):
        raise ValueError("lengths must be finite and >= 0 (response token counts)")
    if max_length is None:
        longest = int(math.ceil(float(lens.max())))
        return lens, max(longest, 1), "the longest response of the batch"
    value = DiscoOptions(max_length=max_length).max_length
    assert value is not None
    return lens, value, "given"


def _positive_weights(
    rewards: Tensor,
    group_ids: Tensor,
    lengths: Tensor,
    preferences: Tensor,
    *,
    threshold: float,
    lam: float,
    max_length: int,
    max_length_source: str,
    length_source: str,
) -> PositiveWeights:
    """DRPO's v per response (its weights times the number of questions G), per question."""
    scores = torch.zeros_like(rewards)
    w = discriminative_weights(
        scores, rewards, group_ids, objective="drpo", threshold=threshold, lam=lam,
        preferences=preferences, validate=False,
    )  # fmt: skip
    index = dense_group_ids(group_ids)
    q = int(index.num_groups)
    d = index.dense
    positive = rewards > threshold
    v = torch.where(positive, w * q, 0.0)
    zeros = torch.zeros(rewards.shape[0], dtype=torch.float64)
    n_pos = zeros.index_add(0, d, positive.to(torch.float64))[:q]
    mass = zeros.index_add(0, d, v)[:q]
    signal = mass > 0
    sq = zeros.index_add(0, d, v * v)[:q]
    effective = torch.where(signal, 1.0 / sq.clamp_min(1e-300), 0.0)
    total_len = zeros.index_add(0, d, torch.where(positive, lengths, 0.0))[:q]
    mean_len = torch.where(signal, total_len / n_pos.clamp_min(1.0), math.nan)
    weighted = torch.where(signal, zeros.index_add(0, d, v * lengths)[:q], math.nan)
    return PositiveWeights(
        lam=lam,
        max_length=max_length,
        max_length_source=max_length_source,
        length_source=length_source,
        num_positives=n_pos.to(torch.int64),
        effective_positives=effective,
        mean_positive_length=mean_len,
        weighted_positive_length=weighted,
    )


def difficulty_report(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    threshold: float = 0.5,
    methods: Sequence[Method] = METHODS,  # type: ignore[assignment]
    bins: int = 10,
    binarize: bool = False,
    std_unbiased: bool = True,
    eps: float = 1e-6,
    group_names: Sequence[str] | None = None,
    lengths: Tensor | None = None,
    max_length: int | None = None,
    lam: float = 0.1,
    length_source: str = "given",
) -> DifficultyReport:
    """Difficulty analysis of one batch of rollouts (no log-probs needed).

    For every question (group): its size and accuracy (share of responses with reward >
    ``threshold``); the share of questions with no correct / only correct answers (no method
    learns from them); the negative-to-positive imbalance of the others; and the weight each
    method puts on each question, measured by running the method's estimator on the batch
    (GRPO / DAPO: std-normalised group advantages, Dr. GRPO: centred rewards, DisCO / DisCO-b:
    discriminative weights) and reading it with :func:`implied_weights`. DAPO's token-level
    weighting is not modelled (rollout dumps carry no lengths): at equal lengths it equals
    GRPO's.

    Args:
      rewards: (B,) rewards.
      group_ids: (B,) integer group ids (any order, ragged groups).
      threshold: reward threshold of a correct answer (DisCO's positive label).
      methods: methods to include, any of ``"grpo"``, ``"dr_grpo"``, ``"dapo"``, ``"disco"``,
        ``"disco_b"``, ``"drpo"``.
      bins: histogram bins of the accuracy when groups differ in size (or exceed 32 responses);
        otherwise the exact accuracies k/n are used.
      binarize: feed the GRPO-family estimators the 0/1 labels instead of the raw rewards (only
        matters for non-binary rewards).
      std_unbiased, eps: the GRPO std convention (verl: True, 1e-6; TRL: True, 1e-4).
      group_names: optional display name of each distinct group id, in ascending id order.
      lengths: optional (B,) response lengths (tokens): DRPO's weights within each question's
        correct answers (:class:`PositiveWeights`, ``positive_weights`` of the report) with
        the length preference ``1 - length / max_length``. Without them DRPO's per-question
        weight (1 per question with signal) is still reported.
      max_length: DRPO's length scale (the engine's maximum response length); default: the
        longest response of the batch.
      lam: DRPO's temperature, > 0.
      length_source: how the lengths were measured, for the report's text.

    Returns:
      :class:`DifficultyReport` (tensors on the CPU).
    """
    threshold = check_number("threshold", threshold)
    eps = check_number("eps", eps, non_negative=True)
    for name, flag in (("binarize", binarize), ("std_unbiased", std_unbiased)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    methods = tuple(methods)
    if not methods:
        raise ValueError("methods is empty; pass at least one of " + ", ".join(METHODS))
    for m in methods:
        if m not in METHODS:
            raise ValueError(
                f"methods: {m!r} is not a method; expected any of {', '.join(METHODS)}"
            )
    check_tensor("rewards", rewards, ndim=1, kind="real")
    check_tensor("group_ids", group_ids, ndim=1, kind="int")
    check_batch(("rewards", "group_ids"), (rewards, group_ids))
    check_device(("rewards", "group_ids"), (rewards, group_ids))
    if rewards.device.type == "meta":
        raise ValueError("rewards is on the meta device: difficulty_report reads its values")
    r = rewards.detach().cpu()
    g = group_ids.detach().cpu()
    if r.dtype.is_floating_point and not bool(r.isfinite().all()):
        raise ValueError("rewards: every reward must be finite to be labelled correct or not")
    r = r.to(torch.float64)
    lam = check_number("lam", lam, positive=True)
    lens, max_len, max_len_source = _lengths(lengths, r, max_length)
    preferences = torch.zeros_like(r) if lens is None else 1.0 - lens / max_len

    weights = _method_weights(
        r, g, methods, threshold=threshold, binarize=binarize, std_unbiased=std_unbiased, eps=eps,
        preferences=preferences, lam=lam,
    )  # fmt: skip
    base = implied_weights(torch.zeros_like(r), r, g, threshold=threshold)
    acc, size = base.accuracy, base.size
    q = acc.numel()
    if group_names is not None:
        group_names = [str(x) for x in group_names]
        if len(group_names) != q:
            raise ValueError(f"group_names has {len(group_names)} names for {q} distinct groups")

    n_pos = torch.round(acc * size).to(torch.float64)
    n_neg = size.to(torch.float64) - n_pos
    signal = (n_pos > 0) & (n_neg > 0)
    ratio = n_neg[signal] / n_pos[signal]
    sizes = set(size.tolist())
    common = next(iter(sizes)) if len(sizes) == 1 else None
    rows, edges, counts = _rows(acc, size, weights, methods, common=common, bins=bins)
    distinct = set(torch.unique(r).tolist())
    return DifficultyReport(
        threshold=threshold,
        methods=methods,
        group_ids=base.group_ids,
        size=size,
        accuracy=acc,
        weights=weights,
        num_responses=int(r.numel()),
        binary_rewards=distinct <= {0.0, 1.0},
        binarized=binarize,
        frac_no_correct=float((n_pos == 0).to(torch.float64).mean()),
        frac_all_correct=float((n_neg == 0).to(torch.float64).mean()),
        frac_with_signal=float(signal.to(torch.float64).mean()),
        imbalance_mean=float(ratio.mean()) if ratio.numel() else math.nan,
        imbalance_median=float(torch.quantile(ratio, 0.5)) if ratio.numel() else math.nan,
        frac_more_negatives=float((ratio > 1).to(torch.float64).mean()) if ratio.numel() else 0.0,
        negatives_per_positive=float(n_neg[signal].sum() / n_pos[signal].sum())
        if ratio.numel()
        else math.nan,
        positive_rate=float(n_pos.sum() / size.sum()),
        hist_edges=edges,
        hist_counts=counts,
        rows=rows,
        common_size=common,
        eps=eps,
        std_unbiased=std_unbiased,
        group_names=list(group_names) if group_names is not None else None,
        positive_weights=None
        if lens is None
        else _positive_weights(
            r,
            g,
            lens,
            preferences,
            threshold=threshold,
            lam=lam,
            max_length=max_len,
            max_length_source=max_len_source,
            length_source=length_source,
        ),  # fmt: skip
    )
