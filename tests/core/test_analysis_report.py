"""The difficulty report against per-question computations done by hand, and its renderings."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from discoloss.analysis import METHODS, DifficultyReport, difficulty_report, difficulty_weight

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def batch(seed: int, *, sizes: list[int], binary: bool = True) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(len(sizes), generator=gen) ** 2
    groups = torch.cat([torch.full((s,), 10 * i + 1) for i, s in enumerate(sizes)])
    if binary:
        rewards = (torch.rand(groups.numel(), generator=gen) < p[(groups - 1) // 10]).double()
    else:
        rewards = torch.randn(groups.numel(), generator=gen, dtype=torch.float64)
    perm = torch.randperm(groups.numel(), generator=gen)
    return rewards[perm], groups[perm]


def by_hand(rewards: Tensor, groups: Tensor, threshold: float) -> dict[int, tuple[int, int]]:
    """group id -> (responses, correct)."""
    out: dict[int, tuple[int, int]] = {}
    for r, g in zip(rewards.tolist(), groups.tolist()):
        n, k = out.get(g, (0, 0))
        out[g] = (n + 1, k + (r > threshold))
    return out


@pytest.mark.parametrize("sizes", [[8] * 40, [2, 5, 9, 1, 4, 7, 3, 8, 6, 6, 12, 2]])
@pytest.mark.parametrize("threshold", [0.5, 0.0])
def test_summaries_match_hand_counts(sizes: list[int], threshold: float) -> None:
    rewards, groups = batch(len(sizes), sizes=sizes, binary=threshold == 0.5)
    rep = difficulty_report(rewards, groups, threshold=threshold)
    counts = by_hand(rewards, groups, threshold)
    ids = sorted(counts)
    assert rep.group_ids.tolist() == ids
    assert rep.size.tolist() == [counts[g][0] for g in ids]
    torch.testing.assert_close(
        rep.accuracy, torch.tensor([counts[g][1] / counts[g][0] for g in ids], dtype=torch.float64)
    )
    q = len(ids)
    none = sum(counts[g][1] == 0 for g in ids)
    every = sum(counts[g][1] == counts[g][0] for g in ids)
    assert rep.frac_no_correct == pytest.approx(none / q)
    assert rep.frac_all_correct == pytest.approx(every / q)
    signal = [g for g in ids if 0 < counts[g][1] < counts[g][0]]
    assert rep.frac_with_signal == pytest.approx(len(signal) / q)
    ratios = [(counts[g][0] - counts[g][1]) / counts[g][1] for g in signal]
    assert rep.imbalance_mean == pytest.approx(statistics.fmean(ratios))
    assert rep.imbalance_median == pytest.approx(statistics.median(ratios))
    assert rep.frac_more_negatives == pytest.approx(sum(r > 1 for r in ratios) / len(ratios))
    pooled = sum(counts[g][0] - counts[g][1] for g in signal) / sum(counts[g][1] for g in signal)
    assert rep.negatives_per_positive == pytest.approx(pooled)
    assert rep.positive_rate == pytest.approx(sum(c[1] for c in counts.values()) / len(rewards))
    assert rep.num_responses == len(rewards)
    assert sum(r.questions for r in rep.rows) == q
    assert sum(rep.hist_counts) == q
    for m in METHODS:
        assert sum(r.weight_share[m] for r in rep.rows) == pytest.approx(1.0)
        # DisCO puts 1 on each question with signal, nothing elsewhere
        if m in ("disco", "disco_b"):
            want = torch.tensor([1.0 if g in signal else 0.0 for g in ids], dtype=torch.float64)
            torch.testing.assert_close(rep.weights[m], want)


def test_weights_follow_the_closed_forms_on_equal_groups() -> None:
    rewards, groups = batch(0, sizes=[8] * 64)
    rep = difficulty_report(rewards, groups)
    for m in METHODS:
        want = difficulty_weight(rep.accuracy, m, n=8, eps=1e-6)  # type: ignore[arg-type]
        torch.testing.assert_close(rep.weights[m], want)
    # exact accuracy rows 0/8 .. 8/8, with the mean weight of each row
    assert [r.label for r in rep.rows] == [f"{k}/8" for k in range(9)]
    for k, row in enumerate(rep.rows):
        assert row.questions == int((rep.accuracy == k / 8).sum())
        if row.questions:
            assert row.mean_weight["grpo"] == pytest.approx(
                difficulty_weight(k / 8, "grpo", n=8, eps=1e-6)
            )
    # GRPO and Dr. GRPO put less of their weight on the extreme rows than DisCO
    extreme = [1, 7]
    for m in ("grpo", "dr_grpo"):
        grpo_share = sum(rep.rows[k].weight_share[m] for k in extreme)
        disco_share = sum(rep.rows[k].weight_share["disco"] for k in extreme)
        if rep.rows[1].questions + rep.rows[7].questions:
            assert grpo_share < disco_share


def test_ragged_groups_use_bins_and_raw_or_binarized_rewards() -> None:
    rewards, groups = batch(3, sizes=[3, 5, 7, 2, 9, 4, 4, 6], binary=True)
    signed = rewards * 2 - 1  # -1 / +1 rewards, same labels
    raw = difficulty_report(signed, groups, threshold=0.0)
    binarized = difficulty_report(signed, groups, threshold=0.0, binarize=True)
    zero_one = difficulty_report(rewards, groups, threshold=0.0)
    assert not raw.binary_rewards and zero_one.binary_rewards
    assert raw.rows[0].label == "0" and raw.rows[-1].label == "1" and len(raw.rows) == 12
    # std-normalised advantages do not depend on the reward scale (up to eps); Dr. GRPO's do (x2)
    torch.testing.assert_close(raw.weights["grpo"], zero_one.weights["grpo"], rtol=1e-5, atol=0)
    torch.testing.assert_close(raw.weights["dr_grpo"], 2 * zero_one.weights["dr_grpo"])
    torch.testing.assert_close(binarized.weights["dr_grpo"], zero_one.weights["dr_grpo"])
    assert "not 0/1" in raw.to_table()


def test_no_signal_batch() -> None:
    rewards = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1, 1])
    rep = difficulty_report(rewards, groups)
    assert rep.frac_with_signal == 0.0
    assert all(float(w.sum()) == 0.0 for w in rep.weights.values())
    assert math.isnan(rep.imbalance_mean)
    summary = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert summary["imbalance"]["mean_negatives_per_positive"] is None
    assert "no signal for any method: 100.0%" in rep.to_table()


def test_table_and_json_renderings() -> None:
    rewards, groups = batch(4, sizes=[8] * 20)
    names = [f"question-{i}" for i in range(20)]
    rep = difficulty_report(rewards, groups, methods=("grpo", "disco"), group_names=names)
    table = rep.to_table(per_question=True, max_rows=5)
    for text in ("GRPO", "DisCO", "accuracy", "0/8", "8/8", "question-", "... 15 more questions"):
        assert text in table
    assert "Dr. GRPO" not in table
    summary = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert summary["num_questions"] == 20 and summary["group_size"] == 8
    assert summary["methods"] == ["grpo", "disco"]
    assert [q["group"] for q in summary["questions"]] == names
    for q, acc in zip(summary["questions"], rep.accuracy.tolist()):
        assert q["accuracy"] == acc
        assert q["weights"]["grpo"] == pytest.approx(difficulty_weight(acc, "grpo", n=8, eps=1e-6))
    assert str(rep) == rep.to_table()


@pytest.mark.parametrize("sizes", [[8] * 30, [3, 9, 4, 6, 6, 2, 11]])
def test_plot_writes_a_png(tmp_path: Path, sizes: list[int]) -> None:
    rewards, groups = batch(5, sizes=sizes)
    rep = difficulty_report(rewards, groups)
    out = rep.plot(tmp_path / "sub" / "weights.png")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


@pytest.mark.parametrize(
    ("kwargs", "exc", "needle"),
    [
        ({"methods": ("grpo", "ppo")}, ValueError, "methods"),
        ({"methods": ()}, ValueError, "methods"),
        ({"bins": 0}, ValueError, "bins"),
        ({"threshold": math.nan}, ValueError, "threshold"),
        ({"eps": -1.0}, ValueError, "eps"),
        ({"group_names": ["a"]}, ValueError, "group_names"),
    ],
)
def test_bad_options_raise(kwargs: dict[str, object], exc: type[Exception], needle: str) -> None:
    rewards, groups = batch(0, sizes=[4, 4])
    with pytest.raises(exc, match=needle):
        difficulty_report(rewards, groups, **kwargs)  # type: ignore[arg-type]


def test_bad_rewards_raise() -> None:
    with pytest.raises(ValueError, match="rewards"):
        difficulty_report(torch.tensor([1.0, math.nan]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="group_ids"):
        difficulty_report(torch.tensor([1.0, 0.0]), torch.tensor([0, 0, 1]))


def test_import_needs_torch_only() -> None:
    code = (
        "import sys, discoloss.analysis, discoloss.analysis.cli, discoloss.baselines;"
        "bad = [m for m in ('matplotlib', 'pyarrow', 'pandas') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_report_type_is_exported() -> None:
    rewards, groups = batch(1, sizes=[4, 4, 4])
    assert isinstance(difficulty_report(rewards, groups), DifficultyReport)
