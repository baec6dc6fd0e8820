"""DRPO in the difficulty analysis: its per-question weight (1 on every question with signal)
and its weights within a question's correct answers, from the responses' lengths, against a
naive computation; ``discoloss analyze`` with a length column."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from discoloss.analysis import METHODS, difficulty_report, difficulty_weight
from discoloss.analysis.cli import JSON_NAME, main
from discoloss.analysis.rollouts import RolloutError, load_rollouts


def rollouts(seed: int, questions: int = 24) -> tuple[list[float], list[int], list[float]]:
    rng = random.Random(seed)
    rewards, groups, lengths = [], [], []
    for q in range(questions):
        p = rng.random()
        for _ in range(rng.randint(1, 9)):  # ragged
            rewards.append(1.0 if rng.random() < p else 0.0)
            groups.append(1000 - 7 * q)  # descending ids: the report sorts them
            lengths.append(float(rng.randint(5, 400)))
    return rewards, groups, lengths


def naive(rewards, groups, lengths, max_length, lam):
    """Per question (ascending id): number of positives, 1 / sum v^2, mean and v-weighted
    length of the correct answers, for questions with a correct and a wrong answer."""
    out = {}
    for g in sorted(set(groups)):
        idx = [i for i, x in enumerate(groups) if x == g]
        pos = [i for i in idx if rewards[i] > 0.5]
        if not pos or len(pos) == len(idx):
            out[g] = (len(pos), 0.0, math.nan, math.nan)
            continue
        e = {i: math.exp((1 - lengths[i] / max_length) / lam) for i in pos}
        z = sum(e.values())
        v = {i: e[i] / z for i in pos}
        out[g] = (
            len(pos),
            1 / sum(x * x for x in v.values()),
            sum(lengths[i] for i in pos) / len(pos),
            sum(v[i] * lengths[i] for i in pos),
        )
    return out


@pytest.mark.parametrize("max_length,lam", [(400, 0.1), (1000, 0.5), (None, 0.05)])
def test_positive_weights_match_a_naive_computation(max_length, lam) -> None:
    rewards, groups, lengths = rollouts(1)
    rep = difficulty_report(
        torch.tensor(rewards), torch.tensor(groups), lengths=torch.tensor(lengths),
        max_length=max_length, lam=lam,
    )  # fmt: skip
    pw = rep.positive_weights
    assert pw is not None
    scale = max_length if max_length is not None else int(max(lengths))
    assert pw.max_length == scale and pw.lam == lam
    want = naive(rewards, groups, lengths, scale, lam)
    assert rep.group_ids.tolist() == sorted(want)
    for i, g in enumerate(rep.group_ids.tolist()):
        n, eff, mean, weighted = want[g]
        assert int(pw.num_positives[i]) == n
        assert float(pw.effective_positives[i]) == pytest.approx(eff, rel=1e-12)
        for got, exp in (
            (pw.mean_positive_length[i], mean),
            (pw.weighted_positive_length[i], weighted),
        ):
            if math.isnan(exp):
                assert math.isnan(float(got))
            else:
                assert float(got) == pytest.approx(exp, rel=1e-12)
    s = pw.summary()
    signal = [g for g in want if want[g][1] > 0]
    assert s["weighted_length"] == pytest.approx(sum(want[g][3] for g in signal) / len(signal))
    assert s["weighted_length"] < s["mean_length"]  # DRPO leans to the short correct answers
    # the per-question weight is DisCO's: 1 on every question with signal
    assert "drpo" in METHODS and rep.methods == METHODS
    torch.testing.assert_close(rep.weights["drpo"], rep.weights["disco"])
    text = rep.to_table(per_question=True)
    assert "DRPO within a question's correct answers" in text and "DRPO eff.pos" in text
    doc = rep.to_dict()
    assert doc["drpo_positive_weights"]["max_length"] == scale
    assert doc["questions"][0]["drpo"].keys() == {
        "effective_positives", "mean_positive_length", "weighted_positive_length"
    }  # fmt: skip


def test_drpo_weight_without_lengths_and_its_closed_form() -> None:
    rewards, groups, _ = rollouts(2)
    rep = difficulty_report(torch.tensor(rewards), torch.tensor(groups), methods=("drpo", "grpo"))
    assert rep.positive_weights is None
    signal = (rep.accuracy > 0) & (rep.accuracy < 1)
    torch.testing.assert_close(rep.weights["drpo"], signal.to(torch.float64))
    assert "need the responses' lengths" in rep.to_table()
    for p in (0.0, 0.3, 1.0):
        assert difficulty_weight(p, "drpo") == difficulty_weight(p, "disco")
        assert difficulty_weight(p, "drpo", n=8, expected=True) == pytest.approx(
            difficulty_weight(p, "disco", n=8, expected=True)
        )


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(max_length=10), ValueError, "max_length needs lengths"),
        (dict(lengths=torch.tensor([1.0, -2.0, 3.0])), ValueError, "lengths must be finite"),
        (dict(lengths=torch.tensor([1.0, 2.0])), ValueError, "lengths has 2"),
        (dict(lengths=torch.ones(3), max_length=0), ValueError, "max_length must be >= 1"),
        (dict(lengths=torch.ones(3), lam=0.0), ValueError, "lam must be > 0"),
    ],
)
def test_bad_drpo_arguments(kwargs: dict[str, Any], exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        difficulty_report(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]), **kwargs)


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_analyze_with_a_length_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rewards, groups, lengths = rollouts(3)
    rows = [
        {"uid": str(g), "score": r, "response_length": int(n), "output": "x" * int(n) + "y"}
        for r, g, n in zip(rewards, groups, lengths)
    ]
    path = _write(tmp_path / "dump.jsonl", rows)
    out_dir = tmp_path / "out"
    assert main([str(path), "--out", str(out_dir), "--no-plot", "--max-length", "500"]) == 0
    out = capsys.readouterr().out
    assert "max_length = 500 (given); lengths: column 'response_length'" in out
    doc = json.loads((out_dir / JSON_NAME).read_text())
    rep = difficulty_report(
        torch.tensor(rewards), torch.tensor([int(g) for g in groups]),
        lengths=torch.tensor(lengths), max_length=500,
    )  # fmt: skip
    assert rep.positive_weights is not None
    for key, value in rep.positive_weights.summary().items():
        assert doc["drpo_positive_weights"][key] == pytest.approx(value, rel=1e-12)
    # a text column: its characters stand in for tokens, and the report says so
    assert main([str(path), "--out", str(out_dir), "--no-plot", "--length-column", "output"]) == 0
    out = capsys.readouterr().out
    assert "characters of the text, not tokens" in out
    loaded = load_rollouts(path, length_column="output")
    assert loaded.lengths == [n + 1 for n in lengths]
    assert loaded.source["length_unit"] == "characters"


def test_analyze_length_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "d.jsonl", [{"uid": "a", "score": 1.0}, {"uid": "a", "score": 0.0}])
    assert main([str(path), "--no-plot", "--out", str(tmp_path), "--max-length", "9"]) == 2
    assert "--max-length needs response lengths" in capsys.readouterr().err
    assert main([str(path), "--no-plot", "--out", str(tmp_path), "--length-column", "n"]) == 2
    assert "column 'n' (--length-column) not found" in capsys.readouterr().err
    bad = _write(tmp_path / "b.jsonl", [{"uid": "a", "score": 1.0, "length": -3}])
    with pytest.raises(RolloutError, match="is not a count >= 0"):
        load_rollouts(bad)
    assert load_rollouts(path).lengths is None
