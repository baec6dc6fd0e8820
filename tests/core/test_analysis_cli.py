"""``discoloss analyze`` on generated rollout dumps: verl's JSONL layout, plain JSONL and Parquet
tables, and malformed inputs."""

from __future__ import annotations

import json
import math
import random
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from discoloss.__main__ import main as discoloss_main
from discoloss.analysis import difficulty_report
from discoloss.analysis.cli import JSON_NAME, PNG_NAME, main
from discoloss.analysis.rollouts import RolloutError, load_rollouts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def verl_rows(
    step: int, questions: int, n: int, seed: int, *, with_uid: bool
) -> list[dict[str, Any]]:
    """Rows as verl 0.9 writes them to <rollout_data_dir>/<step>.jsonl.

    Default trainer: input, output, gts, score, step and uid = <prompt uid>_<session>_<index>,
    sorted by key. Legacy trainer: no uid, the reward function's extra fields and request_id.
    """
    rng = random.Random(seed)
    rows = []
    for q in range(questions):
        prompt_uid = str(uuid.UUID(int=rng.getrandbits(128)))
        p = rng.random() ** 2
        for s in range(n):
            correct = rng.random() < p
            row: dict[str, Any] = {
                "input": f"system\nSolve.\nuser\nWhat is {q} + {step}? Ü\nassistant\n",
                "output": f"<think>...</think> {q + step if correct else -1}",
                "gts": str(q + step),
                "score": 1.0 if correct else 0.0,
                "step": step,
            }
            if with_uid:
                row["uid"] = f"{prompt_uid}_{s}_0"
            else:
                row["acc"] = correct
                row["pred"] = str(q + step if correct else -1)
                row["request_id"] = uuid.UUID(int=rng.getrandbits(128)).hex
            rows.append(row)
    if with_uid:
        rows.sort(key=lambda r: r["uid"])
    else:
        rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def expected_report(rows: list[dict[str, Any]], key: str, reward: str = "score") -> Any:
    names = sorted({str(r[key]) for r in rows})
    index = {k: i for i, k in enumerate(names)}
    rewards = torch.tensor([float(r[reward]) for r in rows], dtype=torch.float64)
    groups = torch.tensor([index[str(r[key])] for r in rows])
    return difficulty_report(rewards, groups)


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(args)
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------------- verl dumps


def test_verl_rollout_dir_latest_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dump = tmp_path / "rollout"
    steps = {step: verl_rows(step, 24, 8, seed=step, with_uid=True) for step in (1, 2, 10)}
    for step, rows in steps.items():
        write_jsonl(dump / f"{step}.jsonl", rows)
    out_dir = tmp_path / "out"
    rc, out, err = run([str(dump), "--out", str(out_dir)], capsys)
    assert rc == 0, err
    assert "10.jsonl" in out and "step 10" in out  # numerically latest, not "2"
    assert "suffix stripped" in out
    for text in ("GRPO", "Dr. GRPO", "DAPO", "DisCO", "0/8", "8/8", "no signal for any method"):
        assert text in out

    summary = json.loads((out_dir / JSON_NAME).read_text())
    assert summary["num_questions"] == 24 and summary["num_responses"] == 192
    assert summary["source"]["columns"] == {"reward": "score", "group": "uid"}
    assert summary["source"]["steps"] == ["10"]
    # the JSON equals the report computed directly, grouping by the prompt uid
    rows = steps[10]
    for r in rows:
        r["prompt_uid"] = r["uid"].rsplit("_", 2)[0]
    want = expected_report(rows, "prompt_uid")
    assert summary["frac_with_signal"] == pytest.approx(want.frac_with_signal)
    got_w = sorted(q["weights"]["grpo"] for q in summary["questions"])
    assert got_w == pytest.approx(sorted(want.weights["grpo"].tolist()))
    assert all(q["size"] == 8 for q in summary["questions"])
    png = (out_dir / PNG_NAME).read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 10_000


def test_verl_step_selection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dump = tmp_path / "rollout"
    for step in (3, 4):
        write_jsonl(dump / f"{step}.jsonl", verl_rows(step, 10, 4, seed=step, with_uid=True))
    rc, _, err = run([str(dump), "--out", str(tmp_path / "a"), "--step", "3", "--no-plot"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "a" / JSON_NAME).read_text())["source"]["steps"] == ["3"]
    assert not (tmp_path / "a" / PNG_NAME).exists()
    rc, _out, err = run(
        [str(dump), "--out", str(tmp_path / "b"), "--step", "all", "--no-plot"], capsys
    )
    assert rc == 0, err
    summary = json.loads((tmp_path / "b" / JSON_NAME).read_text())
    assert summary["num_questions"] == 20 and summary["source"]["steps"] == ["3", "4"]
    rc, _, err = run([str(dump), "--step", "7"], capsys)
    assert rc == 2 and "no file for step 7" in err


def test_legacy_verl_dump_groups_by_prompt_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = verl_rows(5, 16, 6, seed=0, with_uid=False)
    path = write_jsonl(tmp_path / "5.jsonl", rows)
    rc, out, err = run([str(path), "--out", str(tmp_path / "o"), "--no-plot"], capsys)
    assert rc == 0, err
    assert "prompt text column 'input'" in out
    summary = json.loads((tmp_path / "o" / JSON_NAME).read_text())
    assert summary["num_questions"] == 16  # not one group per request_id
    want = expected_report(rows, "input")
    assert summary["frac_no_correct"] == pytest.approx(want.frac_no_correct)
    # the boolean acc field can be the reward too
    rc, out, err = run(
        [str(path), "--reward-column", "acc", "--out", str(tmp_path / "p"), "--no-plot"], capsys
    )
    assert rc == 0, err
    again = json.loads((tmp_path / "p" / JSON_NAME).read_text())
    assert again["mean_weight"] == pytest.approx(summary["mean_weight"])


def test_keep_uid_suffix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "1.jsonl", verl_rows(1, 5, 4, seed=1, with_uid=True))
    rc, _, err = run([str(path), "--keep-uid-suffix", "--out", str(tmp_path), "--no-plot"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / JSON_NAME).read_text())["num_questions"] == 20  # one per response


# ----------------------------------------------------------------------------- plain tables


def plain_rows(seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for q in range(30):
        n = rng.randint(2, 9)  # ragged groups
        p = rng.random()
        for _ in range(n):
            rows.append({"qid": 1000 + q, "correct": int(rng.random() < p), "note": "x" * 50})
    rng.shuffle(rows)
    return rows


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_plain_table_with_named_columns(
    tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = plain_rows(0)
    path = tmp_path / f"rollouts.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_parquet)(path, rows)
    out_dir = tmp_path / "out"
    args = [str(path), "--group-column", "qid", "--reward-column", "correct", "--out", str(out_dir)]
    rc, out, err = run(args, capsys)
    assert rc == 0, err
    assert "ragged" in out and "0.00-0.10" in out
    summary = json.loads((out_dir / JSON_NAME).read_text())
    want = expected_report(rows, "qid", reward="correct")
    assert summary["num_questions"] == 30
    assert summary["frac_with_signal"] == pytest.approx(want.frac_with_signal)
    assert summary["mean_weight"]["grpo"] == pytest.approx(float(want.weights["grpo"].mean()))
    assert (out_dir / PNG_NAME).stat().st_size > 10_000


def test_parquet_detected_without_suffix(tmp_path: Path) -> None:
    rows = [{"group_id": i // 4, "reward": float(i % 3 == 0)} for i in range(16)]
    path = write_parquet(tmp_path / "dump.bin", rows)
    loaded = load_rollouts(path)
    assert loaded.rewards == [r["reward"] for r in rows]
    assert loaded.groups == [str(r["group_id"]) for r in rows]


def test_entry_point_dispatches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_jsonl(tmp_path / "1.jsonl", verl_rows(1, 4, 4, seed=2, with_uid=True))
    assert discoloss_main(["analyze", str(path), "--out", str(tmp_path), "--no-plot"]) == 0
    assert "Difficulty report" in capsys.readouterr().out
    assert main(["--help"]) == 0


# ----------------------------------------------------------------------------- malformed dumps


def malformed(tmp_path: Path, name: str) -> tuple[Path, list[str]]:
    good = {"uid": "a_0_0", "score": 1.0, "input": "q"}
    if name == "missing":
        return tmp_path / "nope.jsonl", []
    if name == "empty":
        return write_jsonl(tmp_path / "e.jsonl", []), []
    if name == "bad_json":
        p = tmp_path / "b.jsonl"
        p.write_text(json.dumps(good) + '\n{"uid": "a_1_0", "score": 1.0\n')
        return p, []
    if name == "not_object":
        p = tmp_path / "n.jsonl"
        p.write_text("[1, 2]\n")
        return p, []
    if name == "no_reward":
        return write_jsonl(tmp_path / "r.jsonl", [{"uid": "a_0_0", "value": 1}]), []
    if name == "no_group":
        return write_jsonl(tmp_path / "g.jsonl", [{"score": 1.0, "text": "q"}]), []
    if name == "missing_explicit":
        return write_jsonl(tmp_path / "x.jsonl", [good]), ["--group-column", "qid"]
    if name == "text_reward":
        return write_jsonl(tmp_path / "t.jsonl", [good, dict(good, score="correct")]), []
    if name == "null_reward":
        return write_jsonl(tmp_path / "u.jsonl", [good, dict(good, score=None)]), []
    if name == "nan_reward":
        p = tmp_path / "nan.jsonl"
        p.write_text(json.dumps(good) + "\n" + '{"uid": "a_1_0", "score": NaN}\n')
        return p, []
    if name == "row_without_reward":
        return write_jsonl(tmp_path / "w.jsonl", [good, {"uid": "a_1_0"}]), []
    if name == "corrupt_parquet":
        p = tmp_path / "c.parquet"
        p.write_bytes(b"PAR1 definitely not parquet")
        return p, []
    if name == "empty_dir":
        (tmp_path / "d").mkdir()
        return tmp_path / "d", []
    if name == "bad_method":
        return write_jsonl(tmp_path / "m.jsonl", [good]), ["--methods", "grpo,ppo"]
    raise AssertionError(name)


CASES = {
    "missing": "no such file",
    "empty": "no rows",
    "bad_json": "b.jsonl:2: not valid JSON",
    "not_object": "expected a JSON object",
    "no_reward": "no reward column",
    "no_group": "no group column",
    "missing_explicit": "column 'qid' (--group-column) not found",
    "text_reward": "t.jsonl:2: cannot label reward 'correct'",
    "null_reward": "u.jsonl:2: cannot label reward None",
    "nan_reward": "cannot label reward nan",
    "row_without_reward": "w.jsonl:2: missing reward column 'score'",
    "corrupt_parquet": "not a readable Parquet file",
    "empty_dir": "no .jsonl or .parquet file",
    "bad_method": "--methods: unknown ppo",
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_dumps_fail_clearly(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path, extra = malformed(tmp_path, name)
    out_dir = tmp_path / "out"
    rc, _, err = run([str(path), "--out", str(out_dir), *extra], capsys)
    assert rc == 2
    assert err.startswith("discoloss analyze: error: ")
    assert CASES[name] in err, err
    assert "Traceback" not in err
    assert not (out_dir / JSON_NAME).exists()


def test_usage_error_returns_two(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "PATH" in capsys.readouterr().err


def test_load_rollouts_raises_rollout_error(tmp_path: Path) -> None:
    with pytest.raises(RolloutError, match="no such file"):
        load_rollouts(tmp_path / "missing.jsonl")
    assert issubclass(RolloutError, ValueError)
    path = write_jsonl(tmp_path / "s.jsonl", [{"group": 1, "reward": math.pi}])
    with pytest.raises(RolloutError, match="no 'step' column"):
        load_rollouts(path, step=3)
