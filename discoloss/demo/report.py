"""Results of a demo run: the summary table, the PNG plots and the JSON of every number.

Confidence intervals (95%):

* greedy accuracy (one 0/1 outcome per question): Wilson score interval,
  ``(k + z^2/2 +- z sqrt(k (n-k)/n + z^2/4)) / (n + z^2)``;
* sampled pass@1 (per question, the mean reward of m samples at temperature 1): normal interval
  across questions, ``mean +- z sd / sqrt(n)``, clipped to [0, 1] (the m samples of a question
  are not independent of each other's question, so the interval is taken over questions).

They describe the evaluation noise of one trained policy; they do not include the variation
between training runs (seeds).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "length_rows",
    "length_table_markdown",
    "mean_interval",
    "seed_interval",
    "summary_rows",
    "table_markdown",
    "wilson",
    "write_json",
    "write_length_plot",
    "write_plots",
]

Z95 = 1.959963984540054

#: Plot colours per method (colour-blind friendly palette).
COLORS = {
    "disco": "#0072B2",
    "disco_b": "#56B4E9",
    "grpo": "#D55E00",
    "dr_grpo": "#E69F00",
    "dapo": "#009E73",
    "drpo": "#CC79A7",
    "grpo_lp": "#B8860B",
}
#: The analysis' closed form of each method's question weight (GRPO's for its length-penalised
#: variant, whose advantages are GRPO's).
_WEIGHT_FORM = {"grpo_lp": "grpo"}


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (n >= 1)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n], got k={k}, n={n}")
    p = k / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(total: float, total_sq: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Normal interval of a mean of n values in [0, 1] from their sum and sum of squares."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    mean = total / n
    var = max(total_sq / n - mean * mean, 0.0) * n / max(n - 1, 1)
    half = z * math.sqrt(var / n)
    return max(0.0, mean - half), min(1.0, mean + half)


#: Two-sided 95% quantiles of Student's t, by degrees of freedom (1..30).
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def seed_interval(values: Sequence[float]) -> tuple[float, float]:
    """95% Student-t interval of the mean of per-seed values (at least 2 values)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"values: need at least 2 seeds for an interval, got {n}")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = _T95[n - 2] if n - 1 <= len(_T95) else Z95
    half = t * sd / math.sqrt(n)
    return mean - half, mean + half


def _eval_numbers(e: Mapping[str, Any], buckets: Sequence[int]) -> dict[str, Any]:
    """Accuracies with intervals, per bucket and overall, from an EvalResult as dict."""

    def key(d: Mapping[Any, Any], k: int) -> Any:
        return d[k] if k in d else d[str(k)]

    out: dict[str, Any] = {}
    tot_n = tot_g = 0
    tot_s = tot_s2 = 0.0
    for k in buckets:
        n = int(key(e["n"], k))
        g = int(key(e["greedy_correct"], k))
        s = float(key(e["sampled_sum"], k))
        s2 = float(key(e["sampled_sumsq"], k))
        out[str(k)] = {
            "n": n,
            "greedy": g / n,
            "greedy_ci": wilson(g, n),
            "pass1": s / n,
            "pass1_ci": mean_interval(s, s2, n),
        }
        tot_n += n
        tot_g += g
        tot_s += s
        tot_s2 += s2
    out["all"] = {
        "n": tot_n,
        "greedy": tot_g / tot_n,
        "greedy_ci": wilson(tot_g, tot_n),
        "pass1": tot_s / tot_n,
        "pass1_ci": mean_interval(tot_s, tot_s2, tot_n),
    }
    return out


def summary_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per method (plus the warm-up start): final held-out numbers and training stats.

    Training stats are means over the last ``tail`` steps (a tenth of the run, at least 1).
    """
    buckets = results["config"]["task"]["buckets"]
    rows: list[dict[str, Any]] = [
        {
            "method": "start",
            "label": "warm-up checkpoint (step 0)",
            "eval": _eval_numbers(results["initial_eval"], buckets),
        }
    ]
    for method, hist in results["methods"].items():
        steps = hist["steps"]
        tail = max(1, len(steps) // 10)
        last = steps[-tail:]

        def mean(field: str, rows_: list[dict[str, Any]] = last) -> float:
            return sum(float(s.get(field, 0.0)) for s in rows_) / len(rows_)

        rows.append(
            {
                "method": method,
                "label": hist["label"],
                "eval": _eval_numbers(hist["evals"][-1][1], buckets),
                "eval_step": hist["evals"][-1][0],
                "reward_first": mean("reward", steps[:tail]),
                "reward_last": mean("reward"),
                "malformed_first": mean("malformed", steps[:tail]),
                "malformed_last": mean("malformed"),
                "entropy_first": mean("entropy", steps[:tail]),
                "entropy_last": mean("entropy"),
                "kl_mean": sum(float(s["kl"]) for s in steps) / len(steps),
                "kl_max": max(float(s["kl_max"]) for s in steps),
                "seconds": hist["seconds"],
                "tail_steps": tail,
            }
        )
    per_seed = results.get("per_seed") or []
    if len(per_seed) >= 2:
        rows = [_across_seeds(row, per_seed, buckets) for row in rows]
    return rows


def _across_seeds(
    row: dict[str, Any], per_seed: Sequence[Mapping[str, Any]], buckets: Sequence[int]
) -> dict[str, Any]:
    """``row`` with its eval numbers replaced by the mean over seeds and a 95% interval across
    seeds (Student t); the per-seed figures (with their evaluation-noise intervals) go into
    ``row["per_seed"]``."""
    method = row["method"]
    seeds_eval = [
        _eval_numbers(
            sr["initial_eval"] if method == "start" else sr["methods"][method]["final_eval"],
            buckets,
        )
        for sr in per_seed
    ]
    agg: dict[str, Any] = {}
    for bucket in ["all", *[str(k) for k in buckets]]:
        cell: dict[str, Any] = {"n": seeds_eval[0][bucket]["n"], "seeds": len(per_seed)}
        for what in ("pass1", "greedy"):
            vals = [e[bucket][what] for e in seeds_eval]
            cell[what] = sum(vals) / len(vals)
            cell[f"{what}_ci"] = seed_interval(vals)
        agg[bucket] = cell
    out = dict(row)
    out["eval"] = agg
    out["interval"] = "across seeds (Student t, 95%)"
    out["per_seed"] = [
        {
            "seed": sr["seed"],
            "pass1": e["all"]["pass1"],
            "pass1_ci": e["all"]["pass1_ci"],
            "greedy": e["all"]["greedy"],
            "greedy_ci": e["all"]["greedy_ci"],
            **(
                {}
                if method == "start"
                else {
                    "reward_first": sr["methods"][method]["reward_first"],
                    "reward_last": sr["methods"][method]["reward_last"],
                }
            ),
        }
        for sr, e in zip(per_seed, seeds_eval)
    ]
    if method != "start":
        out["reward_first"] = sum(p["reward_first"] for p in out["per_seed"]) / len(per_seed)
        out["reward_last"] = sum(p["reward_last"] for p in out["per_seed"]) / len(per_seed)
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _ci(e: Mapping[str, Any], what: str) -> str:
    lo, hi = e[f"{what}_ci"]
    return f"{_pct(e[what])} [{_pct(lo)}, {_pct(hi)}]"


def table_markdown(results: Mapping[str, Any]) -> str:
    """The final table (GitHub markdown): accuracies in %, 95% intervals in brackets."""
    buckets = results["config"]["task"]["buckets"]
    rows = summary_rows(results)
    head = (
        ["method", "pass@1 all"]
        + [f"{k}-digit" for k in buckets]
        + ["greedy all", "train reward", "malformed", "entropy", "KL mean", "KL max"]
    )
    multi = bool(rows) and "per_seed" in rows[0]
    if multi:
        head.insert(2, "per seed")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        e = r["eval"]
        cells = [r["label"], _ci(e["all"], "pass1")]
        if multi:
            cells.append(" / ".join(_pct(p["pass1"]) for p in r["per_seed"]))
        cells += [_pct(e[str(k)]["pass1"]) for k in buckets]
        cells.append(_ci(e["all"], "greedy"))
        if r["method"] == "start":
            cells += ["", "", "", "", ""]
        else:
            cells += [
                f"{r['reward_first']:.3f} → {r['reward_last']:.3f}",
                f"{r['malformed_first']:.3f} → {r['malformed_last']:.3f}",
                f"{r['entropy_first']:.3f} → {r['entropy_last']:.3f}",
                f"{r['kl_mean']:.1e}",
                f"{r['kl_max']:.1e}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    n_test = results["config"]["task"]["test_per_bucket"]
    samples = results["config"]["rl"]["eval_samples"]
    tail = rows[1]["tail_steps"] if len(rows) > 1 else 1
    lines.append("")
    if multi:
        seeds = [p["seed"] for p in rows[0]["per_seed"]]
        lines.append(
            f"Mean over {len(seeds)} seeds ({', '.join(map(str, seeds))}: warm-up, question "
            "stream and sampling per seed); intervals in brackets are 95% Student-t intervals "
            "across seeds (training-run variation); 'per seed' lists each seed's pass@1. Entropy "
            "and KL columns: the first seed's run. A difference between two methods counts only "
            "when their intervals do not overlap."
        )
        lines.append("")
    lines.append(
        f"Held-out: {n_test} questions per bucket; pass@1 = mean reward of {samples} samples at "
        "temperature 1 per question, greedy = greedy decoding; % with 95% intervals (pass@1: "
        "normal across questions; greedy: Wilson). Train reward, malformed (share of sampled "
        "responses that are not digits then the end token) and entropy (mean token entropy "
        f"of the sampled responses): first → last {tail} step(s). KL: k1 estimate of "
        "KL(pi_old || pi_theta) on each mini-batch before its update, mean and max over the run."
    )
    return "\n".join(lines)


def write_json(results: Mapping[str, Any], path: Path) -> None:
    """Every number of the run, plus the summary rows."""
    doc = dict(results)
    doc["summary"] = summary_rows(results)
    write_json_plain(doc, path)


def write_json_plain(doc: Mapping[str, Any], path: Path) -> None:
    """``doc`` as JSON, with paths under the home directory written as ``~/...`` (the cache
    path of the warm-up), so that a shared results file names no user's home."""
    path.write_text(json.dumps(_home_as_tilde(doc), indent=1, sort_keys=False) + "\n")


def _home_as_tilde(x: Any) -> Any:
    home = str(Path.home())
    if isinstance(x, str):
        if home not in ("", "/") and (x == home or x.startswith(home + "/")):
            return "~" + x[len(home) :]
        return x
    if isinstance(x, Mapping):
        return {k: _home_as_tilde(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_home_as_tilde(v) for v in x]
    return x


def _smooth(xs: Sequence[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def write_plots(results: Mapping[str, Any], out: Path) -> list[Path]:
    """PNG plots into ``out``; returns their paths.

    reward.png, entropy.png, kl.png: training curves (faint: per step; solid: moving average);
    heldout.png: held-out pass@1 vs step, overall and per bucket, with 95% bands;
    weights.png: per-question weight omega_q vs accuracy on each method's last batch, with the
    closed forms.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buckets = results["config"]["task"]["buckets"]
    methods = results["methods"]
    paths: list[Path] = []

    for field, name, ylabel in (
        ("reward", "reward.png", "training reward (mean over the step's samples)"),
        ("entropy", "entropy.png", "policy entropy (nats/token, sampled responses)"),
        ("kl", "kl.png", "KL(pi_old || pi_theta), k1, mean over mini-batches"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
        for m, hist in methods.items():
            xs = [s["step"] for s in hist["steps"]]
            ys = [float(s[field]) for s in hist["steps"]]
            c = COLORS.get(m)
            k = max(1, len(ys) // 12)
            ax.plot(xs, ys, color=c, alpha=0.25, lw=0.8)
            ax.plot(xs, _smooth(ys, k), color=c, lw=2, label=hist["label"])
        if field == "kl":
            delta = results["config"]["rl"]["delta"]
            ax.axhline(delta, color="k", ls=":", lw=1, label=f"DisCO delta = {delta:g}")
        ax.set_xlabel("RL step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / name
        fig.savefig(p)
        plt.close(fig)
        paths.append(p)

    panels = ["all", *[str(k) for k in buckets]]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), dpi=100, sharex=True)
    for ax, panel in zip(axes, panels):
        for m, hist in methods.items():
            xs, ys, lo, hi = [], [], [], []
            for step, e in hist["evals"]:
                num = _eval_numbers(e, buckets)[panel]
                xs.append(step)
                ys.append(100 * num["pass1"])
                lo.append(100 * num["pass1_ci"][0])
                hi.append(100 * num["pass1_ci"][1])
            c = COLORS.get(m)
            ax.plot(xs, ys, color=c, lw=2, marker="o", ms=3, label=hist["label"])
            ax.fill_between(xs, lo, hi, color=c, alpha=0.12, lw=0)
        ax.set_title("all buckets" if panel == "all" else f"{panel}-digit", fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out pass@1 (%), 95% band")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    p = out / "heldout.png"
    fig.savefig(p)
    plt.close(fig)
    paths.append(p)

    from discoloss.analysis import difficulty_weight

    n = results["config"]["rl"]["samples"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    grid = [i / 200 for i in range(201)]
    for i, (m, hist) in enumerate(methods.items()):
        lb = hist.get("last_batch") or {}
        if not lb:
            continue
        c = COLORS.get(m)
        jitter = (i - (len(methods) - 1) / 2) * 0.006
        ax.scatter(
            [a + jitter for a in lb["accuracy"]],
            lb["weight"],
            s=14,
            color=c,
            alpha=0.7,
            label=f"{hist['label']} (last batch)",
        )
        curve = difficulty_weight(grid, _WEIGHT_FORM.get(m, m), n=None)
        ax.plot(grid, curve.tolist(), color=c, lw=1, ls="--", alpha=0.8)
    ax.set_xlabel(f"question accuracy p in the batch (k correct of n = {n})")
    ax.set_ylabel("question weight omega_q")
    ax.set_title("Difficulty weights (dashed: population closed forms)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / "weights.png"
    fig.savefig(p)
    plt.close(fig)
    paths.append(p)
    return paths


# --------------------------------------------------------------------- the length setting


def _correct_length(e: Mapping[str, Any]) -> tuple[float, float, int]:
    """(mean length of the correct sampled answers, share of them with a filler, their number)
    from an EvalResult as dict (nan without a correct answer)."""
    n = sum(int(v) for v in e.get("correct_n", {}).values())
    if n == 0:
        return math.nan, math.nan, 0
    total = sum(int(v) for v in e["correct_length_sum"].values())
    filler = sum(int(v) for v in e["correct_filler"].values())
    return total / n, filler / n, n


def length_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per method (and the warm-up start): held-out pass@1 and the mean length of the correct
    answers, per seed and their mean with a 95% interval across seeds (2 or more seeds), and
    their changes from the same seed's warm-up (paired: the seeds' warm-ups differ much more
    than the methods do)."""
    buckets = results["config"]["task"]["buckets"]
    per_seed = results.get("per_seed") or []
    methods = ["start", *results["methods"]]
    rows: list[dict[str, Any]] = []
    for m in methods:
        evals = [
            sr["initial_eval"] if m == "start" else sr["methods"][m]["final_eval"]
            for sr in per_seed
        ]
        pass1 = [_eval_numbers(e, buckets)["all"]["pass1"] for e in evals]
        greedy = [_eval_numbers(e, buckets)["all"]["greedy"] for e in evals]
        lengths = [_correct_length(e) for e in evals]
        row: dict[str, Any] = {
            "method": m,
            "label": "warm-up checkpoint" if m == "start" else results["methods"][m]["label"],
            "pass1": pass1,
            "greedy": greedy,
            "correct_length": [x[0] for x in lengths],
            "correct_filler": [x[1] for x in lengths],
            "correct_samples": [x[2] for x in lengths],
        }
        if rows:  # changes from the warm-up of the same seed
            start = rows[0]
            row["pass1_change"] = [a - b for a, b in zip(pass1, start["pass1"])]
            row["correct_length_change"] = [
                a / b - 1.0 for a, b in zip(row["correct_length"], start["correct_length"])
            ]
        else:
            row["pass1_change"] = [0.0] * len(pass1)
            row["correct_length_change"] = [0.0] * len(pass1)
        for key in (
            "pass1", "greedy", "correct_length", "correct_filler", "pass1_change",
            "correct_length_change",
        ):  # fmt: skip
            vals = row[key]
            row[f"{key}_mean"] = sum(vals) / len(vals)
            row[f"{key}_ci"] = seed_interval(vals) if len(vals) >= 2 else None
        rows.append(row)
    return rows


def length_table_markdown(results: Mapping[str, Any]) -> str:
    """The length setting's table: pass@1 and the mean length of the correct answers."""
    rows = length_rows(results)
    seeds = [sr["seed"] for sr in results["per_seed"]]
    multi = len(seeds) >= 2

    def cell(r: Mapping[str, Any], key: str, fmt: Callable[[float], str]) -> str:
        text = fmt(r[f"{key}_mean"])
        if r[f"{key}_ci"] is not None:
            lo, hi = r[f"{key}_ci"]
            text += f" [{fmt(lo)}, {fmt(hi)}]"
        return text

    def pct(x: float) -> str:
        return f"{100 * x:.1f}"

    def signed(x: float) -> str:
        return f"{100 * x:+.1f}"

    def tok(x: float) -> str:
        return f"{x:.2f}"

    head = [
        "method",
        "pass@1 %",
        "per seed",
        "pass@1 change (points)",
        "length of correct answers (tokens)",
        "per seed",
        "length change %",
        "correct answers with filler %",
        "greedy %",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for r in rows:
        start = r["method"] == "start"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    cell(r, "pass1", pct),
                    " / ".join(pct(v) for v in r["pass1"]),
                    "" if start else cell(r, "pass1_change", signed),
                    cell(r, "correct_length", tok),
                    " / ".join(tok(v) for v in r["correct_length"]),
                    "" if start else cell(r, "correct_length_change", signed),
                    cell(r, "correct_filler", pct),
                    cell(r, "greedy", pct),
                ]
            )
            + " |"
        )
    cfg = results["config"]
    task, rl = cfg["task"], cfg["rl"]
    lines.append("")
    lines.append(
        f"Held-out: {task['test_per_bucket']} questions per bucket ({len(task['buckets'])} "
        f"buckets), {rl['eval_samples']} samples per question at temperature 1: pass@1 is "
        "their mean reward (the verifier ignores filler tokens), the length is the mean number "
        "of response tokens (end token included) of the correct samples. "
        + (
            f"Mean over {len(seeds)} seeds ({', '.join(map(str, seeds))}), 95% Student-t "
            "intervals across seeds in brackets."
            if multi
            else f"Seed {seeds[0]}."
        )
        + " Changes: from the warm-up checkpoint of the same seed (pass@1 in points, the length "
        "in % of the warm-up's), averaged over seeds."
        + f" GRPO's reward: correct * (1 - {rl['length_penalty']:g} |o| / "
        f"{task['filler'] + max(task['buckets']) + 3}); DRPO: lam = {rl['lam']:g}, max_length = "
        f"{task['filler'] + max(task['buckets']) + 3} (the generation budget); DisCO: the "
        "verifier's 0/1 reward."
    )
    return "\n".join(lines)


def write_length_plot(results: Mapping[str, Any], out: Path) -> Path:
    """``length.png``: the change of held-out pass@1 against the change of the mean length of
    the correct answers from each seed's warm-up to the end of RL (one point per seed, the mean
    with its 95% interval across seeds), and the mean length of the correct answers along RL
    (pooled over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = length_rows(results)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11.0, 4.2), dpi=100)
    for r in rows:
        c = COLORS.get(r["method"], "k")
        marker = "s" if r["method"] == "start" else "o"
        xs = [100 * v for v in r["correct_length_change"]]
        ys = [100 * v for v in r["pass1_change"]]
        ax.scatter(xs, ys, color=c, alpha=0.45, s=18, marker=marker)
        xerr = yerr = None
        if r["correct_length_change_ci"] is not None and r["method"] != "start":
            mx, my = r["correct_length_change_mean"], r["pass1_change_mean"]
            lo, hi = r["correct_length_change_ci"]
            xerr = [[100 * (mx - lo)], [100 * (hi - mx)]]
            lo, hi = r["pass1_change_ci"]
            yerr = [[100 * (my - lo)], [100 * (hi - my)]]
        ax.errorbar(
            [100 * r["correct_length_change_mean"]], [100 * r["pass1_change_mean"]],
            xerr=xerr, yerr=yerr, color=c, marker=marker, ms=8, capsize=3, lw=1.5,
            label=r["label"],
        )  # fmt: skip
    ax.axhline(0.0, color="k", lw=0.6, alpha=0.5)
    ax.axvline(0.0, color="k", lw=0.6, alpha=0.5)
    ax.set_xlabel("change of the mean length of the correct answers (%)")
    ax.set_ylabel("change of held-out pass@1 (points)")
    ax.set_title("from each seed's warm-up to the end of RL (points: seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    per_seed = results["per_seed"]
    for m, hist in results["methods"].items():
        steps = [step for step, _ in per_seed[0]["methods"][m]["evals"]]
        ys = []
        for j in range(len(steps)):
            n = total = 0
            for sr in per_seed:
                e = sr["methods"][m]["evals"][j][1]
                n += sum(int(v) for v in e["correct_n"].values())
                total += sum(int(v) for v in e["correct_length_sum"].values())
            ys.append(total / n if n else math.nan)
        bx.plot(steps, ys, color=COLORS.get(m), marker="o", ms=3, lw=2, label=hist["label"])
    bx.set_xlabel("RL step")
    bx.set_ylabel("mean length of the correct answers (tokens)")
    bx.set_title(f"held-out, pooled over {len(per_seed)} seed(s)", fontsize=10)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    fig.tight_layout()
    p = out / "length.png"
    fig.savefig(p)
    plt.close(fig)
    return p
