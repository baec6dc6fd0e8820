"""Reading rollout dumps: verl's ``trainer.rollout_data_dir`` JSONL files and plain tables.

verl 0.9 writes one file per training step, ``<rollout_data_dir>/<step>.jsonl``, one JSON object
per response (``RayPPOTrainer._log_rollout_data`` / ``_dump_generations``):

* ``input``: the decoded prompt (special tokens skipped), ``output``: the decoded response,
* ``gts``: the ground truth (``reward_model.ground_truth`` of the sample, or null),
* ``score``: the response's reward, the sum of its token-level scores,
* ``step``: the global step,
* with the default trainer (``trainer.use_v1=True``): ``uid``, the sample key
  ``<prompt uid>_<session>_<index>``: the prompt uid is shared by the n responses of a prompt,
  so the group is the key without its last two ``_<int>`` parts; rows are sorted by key;
* with the legacy trainer: no uid; the extra fields of the reward function (e.g. ``acc``,
  ``pred``), and ``request_id`` (unique per response, not a group). Responses are then grouped
  by their prompt text, which merges two samples of the same prompt in one step.

A plain table (JSONL or Parquet) needs a reward column and a group column (or a prompt column
to group by); names are detected from common choices or given explicitly. When a ``step``
column is present, groups never span steps. An optional length column (response token counts,
or a text column whose character count stands in for them) feeds DRPO's weights within a
question's correct answers; verl's dumps carry none unless the reward function adds one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from discoloss._checks import check_option

__all__ = ["RolloutError", "Rollouts", "load_rollouts"]

REWARD_COLUMNS = ("score", "reward", "rewards", "acc")
GROUP_COLUMNS = ("uid", "group_id", "group", "prompt_id", "question_id")
PROMPT_COLUMNS = ("input", "prompt", "question")
LENGTH_COLUMNS = ("response_length", "length", "num_tokens")
STEP_COLUMN = "step"
_VERL_KEY = re.compile(r"^(?P<uid>.+)_(?P<session>\d+)_(?P<index>\d+)$")
FileFormat = Literal["auto", "jsonl", "parquet"]


class RolloutError(ValueError):
    """A rollout dump that cannot be analysed (missing file, columns or unusable values)."""


@dataclass(frozen=True)
class Rollouts:
    """Rewards and group keys of the responses of a dump, in file order.

    groups: one hashable key per response (strings; with a step column, ``(step, key)``
      tuples rendered as ``"<step>/<key>"``).
    source: what was read and how (files, columns, steps), for the report.
    lengths: one response length per response (tokens, or characters of a text column: see
      ``source["length_unit"]``), or None when the dump has no length column.
    """

    rewards: list[float]
    groups: list[str]
    source: dict[str, Any] = field(default_factory=dict)
    lengths: list[float] | None = None


def _files(path: Path, step: str | None) -> tuple[list[Path], str | None]:
    """Files to read and the step selected by file name (for directories)."""
    try:
        exists = path.exists()
    except (OSError, ValueError) as exc:  # e.g. an embedded NUL byte, a name too long
        raise RolloutError(f"{path!r}: not a usable path ({exc})") from None
    if not exists:
        raise RolloutError(f"{path}: no such file or directory")
    if path.is_file():
        return [path], None
    candidates = sorted(
        (p for p in path.iterdir() if p.is_file() and p.suffix.lower() in (".jsonl", ".parquet")),
        key=lambda p: (not p.stem.isdigit(), int(p.stem) if p.stem.isdigit() else 0, p.name),
    )
    if not candidates:
        raise RolloutError(f"{path}: directory holds no .jsonl or .parquet file")
    if step == "all":
        return candidates, None
    numbered = {p.stem: p for p in candidates if p.stem.isdigit()}
    if step is not None:
        if step not in numbered:
            have = ", ".join(sorted(numbered, key=int)[-5:]) or "none"
            raise RolloutError(f"{path}: no file for step {step} (last steps present: {have})")
        return [numbered[step]], step
    if numbered:
        last = max(numbered, key=int)
        return [numbered[last]], last
    if len(candidates) == 1:
        return candidates, None
    names = ", ".join(p.name for p in candidates[:5])
    raise RolloutError(
        f"{path}: several files and none named <step>.jsonl ({names}); pass a file or --step all"
    )


_PARQUET_MAGIC = b"PAR1"


def _magic(path: Path) -> bytes:
    with path.open("rb") as fh:
        return fh.read(len(_PARQUET_MAGIC))


def _detect_format(path: Path, file_format: str) -> str:
    """``auto``: Parquet by its magic bytes (whatever the name), else by suffix, else JSONL."""
    if file_format != "auto":
        return file_format
    if _magic(path) == _PARQUET_MAGIC:
        return "parquet"
    return "parquet" if path.suffix.lower() == ".parquet" else "jsonl"


def _read_jsonl(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows and their 1-based line numbers. A UTF-8 byte order mark is skipped."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    number = 0
    try:
        with path.open("r", encoding="utf-8-sig") as fh:
            for number, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                rows.append(_json_row(path, number, text))
                lines.append(number)
    except UnicodeDecodeError as exc:
        hint = (
            "it is a Parquet file: pass --format parquet (file_format='parquet')"
            if _magic(path) == _PARQUET_MAGIC
            else "JSONL files are UTF-8 text, one JSON object per line"
        )
        raise RolloutError(
            f"{path}:{number + 1}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} cannot be "
            f"decoded); {hint}"
        ) from None
    return rows, lines


def _json_row(path: Path, number: int, text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RolloutError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise RolloutError(f"{path}:{number}: not valid JSON (nested too deeply)") from None
    if not isinstance(obj, dict):
        raise RolloutError(
            f"{path}:{number}: expected a JSON object per line, got {type(obj).__name__}"
        )
    return obj


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise RolloutError(
            "reading Parquet needs pyarrow: pip install pyarrow (or pip install -e "
            "'.[analysis]' in a checkout of discoloss)"
        ) from exc
    return pq


def _parquet_columns(path: Path) -> set[str]:
    pq = _pyarrow_parquet()
    try:
        return set(pq.read_schema(path).names)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise RolloutError(f"{path}: not a readable Parquet file ({exc})") from None


def _read_parquet(path: Path, wanted: Sequence[str]) -> tuple[list[dict[str, Any]], list[int]]:
    """Only the wanted columns (prompt and response texts can be large)."""
    pq = _pyarrow_parquet()
    try:
        table = pq.read_table(path, columns=list(wanted))
    except Exception as exc:  # noqa: BLE001
        raise RolloutError(f"{path}: not a readable Parquet file ({exc})") from None
    names = list(table.column_names)
    columns = {n: table.column(n).to_pylist() for n in names}
    rows = [{n: columns[n][i] for n in names} for i in range(table.num_rows)]
    # Parquet has no lines: report 1-based row numbers
    return rows, list(range(1, table.num_rows + 1))


def _pick(
    available: set[str], explicit: str | None, candidates: Sequence[str], flag: str
) -> str | None:
    if explicit is not None:
        if explicit not in available:
            raise RolloutError(
                f"column {explicit!r} ({flag}) not found; columns: {', '.join(sorted(available))}"
            )
        return explicit
    return next((c for c in candidates if c in available), None)


def _columns(
    f: Path,
    available: set[str],
    reward_column: str | None,
    group_column: str | None,
    prompt_column: str | None,
) -> tuple[str, str | None, str | None]:
    """(reward column, group column or None, prompt column or None)."""
    r_col = _pick(available, reward_column, REWARD_COLUMNS, "--reward-column")
    if r_col is None:
        raise RolloutError(
            f"{f}: no reward column (looked for {', '.join(REWARD_COLUMNS)}); columns: "
            f"{', '.join(sorted(available))}; pass --reward-column"
        )
    g_col = _pick(available, group_column, GROUP_COLUMNS, "--group-column")
    p_col = None
    if g_col is None:
        p_col = _pick(available, prompt_column, PROMPT_COLUMNS, "--prompt-column")
        if p_col is None:
            raise RolloutError(
                f"{f}: no group column (looked for {', '.join(GROUP_COLUMNS)}) and no prompt "
                f"column to group by (looked for {', '.join(PROMPT_COLUMNS)}); columns: "
                f"{', '.join(sorted(available))}; pass --group-column or --prompt-column"
            )
    return r_col, g_col, p_col


def _reward(value: Any, where: str, column: str) -> float:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        try:
            v = float(value)
        except OverflowError:  # an integer beyond float64's range
            v = math.inf
        if math.isfinite(v):
            return v
    raise RolloutError(
        f"{where}: cannot label reward {value!r} in column {column!r}: rewards must be finite "
        "numbers (or booleans)"
    )


def _length(value: Any, where: str, column: str) -> tuple[float, str]:
    """A response length and its unit: a count (tokens) or a text (its characters)."""
    if isinstance(value, str):
        return float(len(value)), "characters"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        if math.isfinite(v) and v >= 0:
            return v, "tokens"
    raise RolloutError(
        f"{where}: length {value!r} in column {column!r} is not a count >= 0 (or a text)"
    )


def load_rollouts(
    path: str | Path,
    *,
    reward_column: str | None = None,
    group_column: str | None = None,
    prompt_column: str | None = None,
    step: str | int | None = None,
    file_format: FileFormat = "auto",
    keep_uid_suffix: bool = False,
    length_column: str | None = None,
) -> Rollouts:
    """Read the rewards and groups of a rollout dump.

    Args:
      path: a JSONL or Parquet file, or a directory of ``<step>.jsonl`` / ``.parquet`` files
        (verl's ``trainer.rollout_data_dir``): the latest step is read unless ``step`` says
        otherwise.
      reward_column: reward column; default the first of score, reward, rewards, acc.
      group_column: group (prompt id) column; default the first of uid, group_id, group,
        prompt_id, question_id.
      prompt_column: prompt text column used to group when there is no group column; default
        the first of input, prompt, question.
      step: a step number (a directory's ``<step>.jsonl``, or the rows of that step in a file
        with a step column), or ``"all"`` for every file / row.
      file_format: ``"auto"`` (Parquet by content, whatever the file's name; else by suffix;
        else JSONL), ``"jsonl"`` or ``"parquet"``.
      keep_uid_suffix: do not strip verl's ``_<session>_<index>`` suffix from ``uid`` values.
      length_column: response lengths (token counts; a text column counts its characters);
        default the first of response_length, length, num_tokens, if any.

    Raises:
      RolloutError: missing file, unreadable rows, missing columns, or rewards that are not
        finite numbers.
    """
    check_option("file_format", file_format, get_args(FileFormat))
    path = Path(path)
    step_s = None if step is None else str(step)
    files, file_step = _files(path, step_s)
    rewards: list[float] = []
    groups: list[str] = []
    lengths: list[float] | None = []
    units: set[str] = set()
    columns_used: dict[str, str] = {}
    grouping = ""
    steps_seen: set[str] = set()
    for f in files:
        fmt = _detect_format(f, file_format)
        if fmt == "jsonl":
            rows, numbers = _read_jsonl(f)
            if not rows:
                raise RolloutError(f"{f}: no rows")
            available: set[str] = set().union(*(r.keys() for r in rows))
        else:
            available = _parquet_columns(f)
        r_col, g_col, p_col = _columns(f, available, reward_column, group_column, prompt_column)
        l_col = _pick(available, length_column, LENGTH_COLUMNS, "--length-column")
        if fmt == "parquet":
            wanted = [c for c in (r_col, g_col, p_col, l_col, STEP_COLUMN) if c in available]
            rows, numbers = _read_parquet(f, wanted)
        if not rows:
            raise RolloutError(f"{f}: no rows")
        if step_s not in (None, "all") and file_step is None and STEP_COLUMN not in available:
            raise RolloutError(f"{f}: --step {step_s} given but the file has no 'step' column")
        key_col = g_col if g_col is not None else p_col
        assert key_col is not None
        has_step = STEP_COLUMN in available
        keys: list[str] = []
        kept_rewards: list[float] = []
        kept_lengths: list[float] = []
        row_steps: list[str] = []
        for row, number in zip(rows, numbers):
            where = f"{f}:{number}" if fmt == "jsonl" else f"{f} row {number}"
            if r_col not in row:
                raise RolloutError(f"{where}: missing reward column {r_col!r}")
            if key_col not in row or row[key_col] is None:
                raise RolloutError(f"{where}: missing group value in column {key_col!r}")
            s = str(row.get(STEP_COLUMN)) if has_step else ""
            if step_s not in (None, "all") and file_step is None and has_step and s != step_s:
                continue
            kept_rewards.append(_reward(row[r_col], where, r_col))
            if l_col is not None:
                if l_col not in row:
                    raise RolloutError(f"{where}: missing length column {l_col!r}")
                value, unit = _length(row[l_col], where, l_col)
                kept_lengths.append(value)
                units.add(unit)
            keys.append(str(row[key_col]))
            row_steps.append(s)
        if not kept_rewards:
            raise RolloutError(f"{f}: no row with step {step_s}")
        how = f"column {key_col!r}" if g_col is not None else f"prompt text column {key_col!r}"
        if g_col == "uid" and not keep_uid_suffix and all(_VERL_KEY.match(k) for k in keys):
            keys = [_VERL_KEY.match(k).group("uid") for k in keys]  # type: ignore[union-attr]
            how = "column 'uid' (verl sample keys <uid>_<session>_<index>, suffix stripped)"
        if has_step:
            keys = [f"{s}/{k}" for s, k in zip(row_steps, keys)]
            steps_seen.update(row_steps)
            how += ", within each step"
        rewards.extend(kept_rewards)
        groups.extend(keys)
        if l_col is None or lengths is None:
            lengths = None
        else:
            lengths.extend(kept_lengths)
        columns_used = {"reward": r_col, "group": key_col}
        if l_col is not None:
            columns_used["length"] = l_col
        grouping = how
    source = {
        "path": str(path),
        "files": [str(f) for f in files],
        "columns": columns_used,
        "grouping": grouping,
        "steps": sorted(
            steps_seen, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s)
        )
        or ([file_step] if file_step is not None else []),
        "rows": len(rewards),
    }
    if lengths is not None:
        if len(units) > 1:
            raise RolloutError(f"{path}: the length column mixes counts and texts")
        source["length_unit"] = units.pop() if units else "tokens"
    elif "length" in columns_used:  # a file without the column: no lengths at all
        del columns_used["length"]
    return Rollouts(rewards, groups, source, lengths)
