"""``discoloss analyze PATH``: difficulty-bias report of a rollout dump.

Reads a verl rollout dump (``trainer.rollout_data_dir``: a directory of ``<step>.jsonl`` files,
or one of them) or a plain JSONL / Parquet table with a reward and a group (or prompt) column,
prints the report table and writes ``difficulty_report.json`` and ``difficulty_weights.png`` to
``--out``. See :mod:`discoloss.analysis.rollouts` for the formats.

Exit status: 0 on success, 2 on bad arguments or an unusable dump (the message says why).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from discoloss.analysis.report import difficulty_report
from discoloss.analysis.rollouts import RolloutError, load_rollouts
from discoloss.analysis.weights import METHODS

__all__ = ["main"]

JSON_NAME = "difficulty_report.json"
PNG_NAME = "difficulty_weights.png"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="discoloss analyze",
        description=(
            "Difficulty-bias report of a rollout dump: per-question accuracy, questions without "
            "signal, negative/positive imbalance, and the weight GRPO, Dr. GRPO, DAPO, DisCO and "
            "DRPO put on each question (with response lengths, also DRPO's weights within a "
            "question's correct answers)."
        ),
        epilog=(
            "PATH: a verl trainer.rollout_data_dir (the latest <step>.jsonl is read unless "
            "--step says otherwise), one such file, or a JSONL / Parquet table with a reward "
            "column and a group or prompt column."
        ),
    )
    p.add_argument("path", metavar="PATH", help="rollout dump: directory, .jsonl or .parquet")
    p.add_argument(
        "--out", default="discoloss_analysis", help="output directory (default: %(default)s)"
    )
    p.add_argument("--reward-column", help="reward column (default: score, reward, rewards or acc)")
    p.add_argument(
        "--group-column", help="group / prompt-id column (default: uid, group_id, group, prompt_id "
        "or question_id)"
    )  # fmt: skip
    p.add_argument(
        "--prompt-column", help="prompt text to group by when there is no group column (default: "
        "input, prompt or question)"
    )  # fmt: skip
    p.add_argument(
        "--length-column", help="response lengths for DRPO: token counts, or a text column "
        "whose characters are counted (default: response_length, length or num_tokens, if any)"
    )  # fmt: skip
    p.add_argument(
        "--max-length", type=int, help="DRPO's length scale, the engine's maximum response "
        "length (default: the longest response of the dump)"
    )  # fmt: skip
    p.add_argument("--lam", type=float, default=0.1, help="DRPO's lambda (default: 0.1)")
    p.add_argument("--step", help="step to analyse (a number, or 'all'); default: the latest")
    p.add_argument(
        "--format", dest="file_format", choices=("auto", "jsonl", "parquet"), default="auto"
    )
    p.add_argument(
        "--keep-uid-suffix", action="store_true",
        help="do not strip verl's _<session>_<index> suffix from uid values",
    )  # fmt: skip
    p.add_argument(
        "--threshold", type=float, default=0.5, help="correct iff reward > threshold (default: 0.5)"
    )
    p.add_argument(
        "--methods", default=",".join(METHODS),
        help="comma-separated methods to compare (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--binarize", action="store_true",
        help="give the GRPO-family estimators the 0/1 labels instead of the raw rewards",
    )  # fmt: skip
    p.add_argument("--eps", type=float, default=1e-6, help="GRPO std epsilon (verl 1e-6, TRL 1e-4)")
    p.add_argument(
        "--population-std", action="store_true", help="GRPO std without Bessel's correction"
    )
    p.add_argument(
        "--bins", type=int, default=10, help="accuracy bins for ragged groups (default: 10)"
    )
    p.add_argument("--per-question", action="store_true", help="also print one line per question")
    p.add_argument(
        "--max-questions", type=int, default=50, help="lines of --per-question (default: 50)"
    )
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    return p


def _error(message: str) -> int:
    print(f"discoloss analyze: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return int(exc.code) if isinstance(exc.code, int) else 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        return _error(
            f"--methods: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(METHODS)}"
        )
    try:
        rollouts = load_rollouts(
            args.path,
            reward_column=args.reward_column,
            group_column=args.group_column,
            prompt_column=args.prompt_column,
            step=args.step,
            file_format=args.file_format,
            keep_uid_suffix=args.keep_uid_suffix,
            length_column=args.length_column,
        )
    except RolloutError as exc:
        return _error(str(exc))
    except OSError as exc:
        return _error(f"{args.path}: {exc.strerror or exc}")

    names = sorted(set(rollouts.groups))
    index = {name: i for i, name in enumerate(names)}
    group_ids = torch.tensor([index[g] for g in rollouts.groups], dtype=torch.long)
    rewards = torch.tensor(rollouts.rewards, dtype=torch.float64)
    lengths = None
    length_source = ""
    if rollouts.lengths is not None:
        lengths = torch.tensor(rollouts.lengths, dtype=torch.float64)
        unit = rollouts.source.get("length_unit", "tokens")
        column = rollouts.source["columns"]["length"]
        length_source = f"column {column!r}" + (
            " (characters of the text, not tokens)" if unit == "characters" else ""
        )
    elif args.max_length is not None:
        return _error("--max-length needs response lengths (--length-column)")
    try:
        report = difficulty_report(
            rewards, group_ids, threshold=args.threshold, methods=methods,
            bins=args.bins, binarize=args.binarize, std_unbiased=not args.population_std,
            eps=args.eps, group_names=names, lengths=lengths, max_length=args.max_length,
            lam=args.lam, length_source=length_source,
        )  # fmt: skip
    except (ValueError, TypeError) as exc:
        return _error(str(exc))

    src = rollouts.source
    steps = src["steps"]
    step_txt = (
        f"step {steps[0]}"
        if len(steps) == 1
        else f"{len(steps)} steps"
        if steps
        else "no step column"
    )
    files = ", ".join(src["files"][:3]) + (" ..." if len(src["files"]) > 3 else "")
    print(f"source: {files} ({step_txt})")
    print(f"rewards: column {src['columns']['reward']!r}; questions: {src['grouping']}")
    print()
    print(report.to_table(per_question=args.per_question, max_rows=args.max_questions))

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        summary = {"source": src, **report.to_dict()}
        (out / JSON_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        return _error(f"cannot write to {out}: {exc}")
    print()
    print(f"wrote {out / JSON_NAME}")
    if not args.no_plot:
        try:
            report.plot(out / PNG_NAME)
        except ImportError as exc:
            return _error(f"{exc} (or pass --no-plot)")
        print(f"wrote {out / PNG_NAME}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
