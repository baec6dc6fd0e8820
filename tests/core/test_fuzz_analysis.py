"""Fuzz suite of ``discoloss.analysis``: the weight functions, the report, the rollout loader
and ``discoloss analyze`` on generated files, valid and broken.

Same contract as ``test_fuzz.py`` (see ``fuzz_support.py``): a ValueError / TypeError that
names an argument (``RolloutError``, a ValueError, for an unusable dump), or values equal to an
independent reference. The command line must exit with 0 and write its report, or with 2 and a
one-line message, never with a traceback.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from fuzz_spec import ANALYSIS, options, signature_defaults
from fuzz_support import (
    F64,
    INVALID,
    RESP_INT,
    RESP_REAL,
    UNCHECKED,
    VALID,
    chance,
    expect_error,
    fuzz,
    mutate,
    parameters,
    run_call,
    token_batches,
)
from hypothesis import given
from hypothesis import strategies as st
from reference import drpo_positive_weights, naive_advantages, ref_difficulty_weight

from discoloss.analysis import difficulty_report, difficulty_weight, implied_weights
from discoloss.analysis.cli import main as analyze_main
from discoloss.analysis.rollouts import (
    GROUP_COLUMNS,
    PROMPT_COLUMNS,
    REWARD_COLUMNS,
    RolloutError,
    load_rollouts,
)

METHODS = ("grpo", "dr_grpo", "dapo", "disco", "disco_b", "drpo")


# --------------------------------------------------------------------------- weights


@st.composite
def accuracies(draw: st.DrawFn) -> tuple[Any, bool, str]:
    """(p, valid, what): numbers, sequences and tensors of accuracies, and broken ones."""
    kind = draw(st.sampled_from(["float", "float", "list", "tensor", "bad"]))
    grid = st.one_of(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0, 0.5, 1 / 3, 7 / 8]))
    if kind == "float":
        return draw(grid), True, "float"
    if kind == "list":
        return draw(st.lists(grid, min_size=0, max_size=4)), True, "list"
    if kind == "tensor":
        shape = draw(st.sampled_from([(), (3,), (2, 2)]))
        vals = draw(st.lists(grid, min_size=4, max_size=4))
        t = torch.tensor(vals[: math.prod(shape)], dtype=F64).reshape(shape)
        dtype = draw(st.sampled_from([F64, torch.float32]))
        return t.to(dtype), True, "tensor"
    bad = draw(
        st.sampled_from(
            [-0.1, 1.1, math.nan, math.inf, True, "0.5", 10**400, [0.5, math.nan],
             [[0.1], [0.2, 0.3]], torch.tensor([0.5, 2.0]), torch.tensor([True]),
             torch.tensor(0.5).to("meta"), torch.tensor([0.5 + 1j]), None]
        )
    )  # fmt: skip
    return bad, False, "bad p"


@fuzz(500)
@given(data=st.data(), p=accuracies())
def test_difficulty_weight(data: st.DataObject, p: tuple[Any, bool, str]) -> None:
    names = ("method", "n", "expected", "std_unbiased", "eps")
    opts = data.draw(options(ANALYSIS, names, defaults=signature_defaults(difficulty_weight)))
    kwargs = dict(opts.kwargs)
    kwargs.setdefault("method", data.draw(st.sampled_from(METHODS)))
    value, valid, what = p
    out = run_call(lambda: difficulty_weight(value, **kwargs))
    if opts.invalid is not None:
        expect_error(out, (opts.invalid,), f"{kwargs}")
        return
    if kwargs.get("expected") and kwargs.get("n") is None:
        expect_error(out, ("expected", "n"), f"{kwargs}")
        return
    if not valid:
        expect_error(out, ("p",), f"p={value!r}")
        return
    assert out.error is None, f"{out.error!r} (p={value!r}, {kwargs})"
    o = opts.resolved
    args = dict(
        n=kwargs.get("n"),
        expected=bool(kwargs.get("expected", False)),
        std_unbiased=o["std_unbiased"],
        eps=float(o["eps"]),
    )
    pt = (
        torch.as_tensor(value, dtype=F64) if not isinstance(value, torch.Tensor) else value.double()
    )
    ref = torch.tensor(
        [ref_difficulty_weight(float(x), kwargs["method"], **args) for x in pt.reshape(-1)],
        dtype=F64,
    ).reshape(pt.shape)
    got = torch.as_tensor(out.value, dtype=F64)
    if isinstance(value, float):
        assert isinstance(out.value, float)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-13)


def ref_implied(
    coef: list[float], rewards: list[float], groups: list[int], threshold: float
) -> dict[str, list[float]]:
    """Per question (ascending id): G * positive mass, G * |negative mass|, accuracy, size."""
    ids = sorted(set(groups))
    g = len(ids)
    out: dict[str, list[float]] = {"ids": [], "weight": [], "neg": [], "accuracy": [], "size": []}
    for q in ids:
        members = [i for i, x in enumerate(groups) if x == q]
        out["ids"].append(q)
        out["weight"].append(g * sum(max(coef[i], 0.0) for i in members))
        out["neg"].append(g * sum(max(-coef[i], 0.0) for i in members))
        out["accuracy"].append(sum(rewards[i] > threshold for i in members) / len(members))
        out["size"].append(len(members))
    return out


@fuzz(400)
@given(data=st.data())
def test_implied_weights(data: st.DataObject) -> None:
    draw = data.draw
    tokens = draw(token_batches(max_groups=5, max_group=4, max_t=1))
    b = tokens.rewards.shape[0]
    names = ("kind", "threshold", "token_normalizer")
    defaults = signature_defaults(implied_weights)
    opts = draw(options(ANALYSIS, names, defaults=defaults))
    kwargs = dict(opts.kwargs)
    adv = torch.tensor(draw(st.lists(st.floats(-4.0, 4.0), min_size=b, max_size=b)), dtype=F64)
    adv = adv.to(draw(st.sampled_from([F64, torch.float32])))
    use_lengths = draw(st.booleans())
    lengths = torch.tensor(draw(st.lists(st.integers(0, 9), min_size=b, max_size=b)))
    if use_lengths:
        kwargs["lengths"] = lengths.to(draw(st.sampled_from([F64, torch.int64])))
    args = {"advantages": adv, "rewards": tokens.rewards, "group_ids": tokens.group_ids}
    roles = {"advantages": RESP_REAL, "rewards": RESP_REAL, "group_ids": RESP_INT}
    verdict, bad, what = VALID, (), "valid"
    kind = opts.resolved["kind"]
    combination: tuple[str, ...] = ()
    if use_lengths and kind == "weights":
        combination = ("lengths",)
    elif not use_lengths and kwargs.get("token_normalizer") is not None:
        combination = ("token_normalizer",)
    elif use_lengths and int(lengths.sum()) == 0 and kwargs.get("token_normalizer") is None:
        combination = ("lengths",)
    if opts.invalid is not None:  # the combination of options may be refused first
        verdict, bad, what = INVALID, (opts.invalid, *combination), "option"
    elif combination:
        verdict, bad, what = INVALID, combination, "combination of lengths and options"
    else:
        m = mutate(draw, args, roles, validate=True)
        args, what = m.args, m.what
        if m.verdict != VALID:
            verdict, bad = m.verdict, m.names
    out = run_call(lambda: implied_weights(*args.values(), **kwargs))
    if verdict in (INVALID, UNCHECKED):
        expect_error(out, bad, f"{what}; {kwargs}")
        return
    assert out.error is None, f"{out.error!r} ({what}; {kwargs})"
    a = [float(x) for x in adv.double()]
    if kind == "advantages":
        coef = [x / b for x in a]
        if use_lengths:
            lens = [float(x) for x in lengths]
            norm = kwargs.get("token_normalizer") or sum(lens) / b
            coef = [c * n / float(norm) for c, n in zip(coef, lens)]
    else:
        coef = a
    thr = float(opts.resolved["threshold"])
    ref = ref_implied(
        coef, [float(x) for x in tokens.rewards.double()], tokens.group_ids.tolist(), thr
    )
    iw = out.value
    assert iw.group_ids.tolist() == ref["ids"]
    assert iw.size.tolist() == ref["size"]
    torch.testing.assert_close(iw.accuracy, torch.tensor(ref["accuracy"], dtype=F64))
    scale = max([1.0] + [abs(c) for c in coef]) * len(ref["ids"]) * b
    for got, want in ((iw.weight, ref["weight"]), (iw.negative_weight, ref["neg"])):
        torch.testing.assert_close(got, torch.tensor(want, dtype=F64), rtol=1e-6, atol=1e-6 * scale)


@fuzz(400)
@given(data=st.data())
def test_difficulty_report(data: st.DataObject) -> None:
    draw = data.draw
    tokens = draw(token_batches(max_groups=5, max_group=4, max_t=1))
    names = ("threshold", "bins", "binarize", "std_unbiased", "eps", "lam", "max_length")
    defaults = signature_defaults(difficulty_report)
    opts = draw(options(ANALYSIS, names, defaults=defaults))
    kwargs = dict(opts.kwargs)
    verdict, bad, what = VALID, (), "valid"
    b = tokens.rewards.shape[0]
    lengths = None
    if draw(st.booleans()):  # DRPO's weights within the correct answers
        counts = draw(st.lists(st.integers(0, 60), min_size=b, max_size=b))
        lengths = torch.tensor(counts, dtype=draw(st.sampled_from([F64, torch.int64])))
        kwargs["lengths"] = lengths
    elif opts.resolved["max_length"] is not None and opts.invalid is None:
        verdict, bad, what = INVALID, ("max_length",), "max_length without lengths"
    method_kind = draw(st.sampled_from(["default", "subset", "bad"]))
    if method_kind == "subset":
        kwargs["methods"] = draw(st.lists(st.sampled_from(METHODS), min_size=1, unique=True))
    elif method_kind == "bad" and opts.invalid is None:
        kwargs["methods"] = draw(st.sampled_from([[], ["grpo", "ppo"], "grpo", [1]]))
        verdict, bad, what = INVALID, ("methods",), f"methods={kwargs['methods']!r}"
    q = len(set(tokens.group_ids.tolist()))
    if draw(st.booleans()):
        n_names = (
            q if verdict != VALID or opts.invalid is not None or draw(st.booleans()) else q + 1
        )
        kwargs["group_names"] = [f"q{i}" for i in range(n_names)]
        if n_names != q and verdict == VALID and opts.invalid is None:
            verdict, bad, what = INVALID, ("group_names",), "group_names"
    args = {"rewards": tokens.rewards, "group_ids": tokens.group_ids}
    roles = {"rewards": RESP_REAL, "group_ids": RESP_INT}
    if opts.invalid is not None:
        verdict, bad, what = INVALID, (opts.invalid,), "option"
    elif verdict == VALID and lengths is not None and chance(draw, 1, 5):
        kwargs["lengths"] = draw(
            st.sampled_from(
                [lengths[:-1] if b > 1 else lengths[:0], lengths.reshape(1, -1), lengths.tolist(),
                 lengths.to(torch.bool), -lengths - 1, lengths.double() * math.nan]
            )
        )  # fmt: skip
        verdict, bad, what = INVALID, ("lengths",), "bad lengths"
    elif verdict == VALID:
        m = mutate(draw, args, roles, validate=True)
        args, what = m.args, m.what
        if m.verdict != VALID:
            verdict, bad = m.verdict, m.names
    out = run_call(lambda: difficulty_report(*args.values(), **kwargs))
    if verdict != VALID:
        expect_error(out, bad, f"{what}; {kwargs}")
        return
    assert out.error is None, f"{out.error!r} ({kwargs})"
    rep = out.value
    o = opts.resolved
    thr = float(o["threshold"])
    rewards = [float(x) for x in tokens.rewards.double()]
    groups = tokens.group_ids.tolist()
    ids = sorted(set(groups))
    members = {g: [i for i, x in enumerate(groups) if x == g] for g in ids}
    acc = [sum(rewards[i] > thr for i in members[g]) / len(members[g]) for g in ids]
    assert rep.group_ids.tolist() == ids
    torch.testing.assert_close(rep.accuracy, torch.tensor(acc, dtype=F64))
    assert math.isclose(rep.frac_no_correct, sum(a == 0 for a in acc) / len(ids))
    assert math.isclose(rep.frac_all_correct, sum(a == 1 for a in acc) / len(ids))
    signal = [0 < a < 1 for a in acc]
    assert math.isclose(rep.frac_with_signal, sum(signal) / len(ids))
    pg = [float(r > thr) for r in rewards] if o["binarize"] else rewards
    b, g = len(rewards), len(ids)
    for method in kwargs.get("methods", METHODS):
        if method in ("disco", "disco_b", "drpo"):
            want = [1.0 if s else 0.0 for s in signal]
        else:
            adv = naive_advantages(
                pg, groups, scale="none" if method == "dr_grpo" else "std",
                unbiased=o["std_unbiased"] if method != "dr_grpo" else True,
                eps=float(o["eps"]) if method != "dr_grpo" else 1e-6,
            )  # fmt: skip
            want = [g * sum(max(adv[i] / b, 0.0) for i in members[q]) for q in ids]
        torch.testing.assert_close(
            rep.weights[method], torch.tensor(want, dtype=F64), rtol=1e-9, atol=1e-12
        )
    if lengths is not None:
        check_drpo_report(rep, rewards, groups, ids, signal, lengths, o, thr)
    assert rep.to_table()  # renders


def check_drpo_report(
    rep: Any,
    rewards: list[float],
    groups: list[int],
    ids: list[int],
    signal: list[bool],
    lengths: torch.Tensor,
    o: dict[str, Any],
    thr: float,
) -> None:
    """DRPO's weights within each question's correct answers against the paper's formula:
    v = softmax over the positives of (1 - |o| / max_length) / lam, max_length by default the
    longest response of the batch."""
    lens = [float(x) for x in lengths.double()]
    max_length = o["max_length"] if o["max_length"] is not None else max(1, math.ceil(max(lens)))
    prefs = [1.0 - x / max_length for x in lens]
    pw = rep.positive_weights
    assert pw is not None and pw.max_length == max_length
    for k, q in enumerate(ids):
        pos = [i for i, x in enumerate(groups) if x == q and rewards[i] > thr]
        assert int(pw.num_positives[k]) == len(pos)
        if not signal[k]:
            assert float(pw.effective_positives[k]) == 0.0
            continue
        v = drpo_positive_weights(pos, prefs, float(o["lam"]))
        eff = 1.0 / sum(x * x for x in v.values())
        weighted = sum(v[i] * lens[i] for i in pos)
        assert math.isclose(float(pw.effective_positives[k]), eff, rel_tol=1e-9), (k, pw, eff)
        assert math.isclose(
            float(pw.weighted_positive_length[k]), weighted, rel_tol=1e-9, abs_tol=1e-9
        ), (k, pw, weighted)


# --------------------------------------------------------------------------- rollout files


def expected_key(row: dict[str, Any], group_col: str | None, prompt_col: str | None) -> str:
    key = str(row[group_col] if group_col is not None else row[prompt_col])
    return key


@st.composite
def rollout_files(draw: st.DrawFn, tmp: Path) -> tuple[Path, dict[str, Any] | None, str]:
    """A file (or directory) and what load_rollouts must read from it (None: it must refuse
    it), and a description."""
    rng = random.Random(draw(st.integers(0, 2**32 - 1)))
    n_groups = draw(st.integers(1, 4))
    reward_col = draw(st.sampled_from(REWARD_COLUMNS))
    key_kind = draw(st.sampled_from(["group", "prompt", "verl_uid"]))
    group_col = draw(st.sampled_from([c for c in GROUP_COLUMNS if c != "uid"]))
    prompt_col = draw(st.sampled_from(PROMPT_COLUMNS))
    rows: list[dict[str, Any]] = []
    rewards: list[float] = []
    keys: list[str] = []
    for q in range(n_groups):
        uid = f"{rng.getrandbits(64):016x}"
        for s in range(draw(st.integers(1, 4))):
            r = rng.choice([0.0, 1.0, 0.5, -1.0, True, 3])
            row: dict[str, Any] = {reward_col: r, "output": "ünïcødé ✓"}
            if key_kind == "group":
                row[group_col] = rng.choice([q, f"question-{q}"])
                keys.append(str(row[group_col]))
            elif key_kind == "prompt":
                row[prompt_col] = f"What is {q} + 1?\n"
                keys.append(row[prompt_col])
            else:
                row["uid"] = f"{uid}_{s}_0"
                row["step"] = 7
                keys.append(f"7/{uid}")
            rows.append(row)
            rewards.append(float(r))
    expected: dict[str, Any] | None = {"rewards": rewards, "groups": keys}
    fmt = draw(st.sampled_from(["jsonl", "jsonl", "parquet", "parquet_as_jsonl", "bom", "dir"]))
    damage = draw(
        st.sampled_from(
            ["none", "none", "none", "random_bytes", "utf16", "latin1", "not_json", "array_line",
             "deep", "no_reward", "bad_reward", "huge_int", "nan_reward", "null_group", "empty",
             "missing_dir_step"]
        )
    )  # fmt: skip
    text_rows = list(rows)
    if damage == "no_reward":
        text_rows = [{k: v for k, v in r.items() if k not in REWARD_COLUMNS} for r in rows]
    elif damage == "bad_reward":
        text_rows = [dict(rows[0], **{reward_col: "yes"})] + rows[1:]
    elif damage == "huge_int":
        text_rows = [dict(rows[0], **{reward_col: 10**400})] + rows[1:]
    elif damage == "nan_reward":
        text_rows = [dict(rows[0], **{reward_col: math.nan})] + rows[1:]
    elif damage == "null_group":
        col = {"group": group_col, "prompt": prompt_col, "verl_uid": "uid"}[key_kind]
        text_rows = [dict(rows[0], **{col: None})] + rows[1:]
    if damage != "none":
        expected = None
    path = tmp / f"rollouts_{rng.getrandbits(32)}"
    path.mkdir()
    name = "7.jsonl" if fmt == "dir" else "data.jsonl"
    target = path / name
    if damage in ("random_bytes", "utf16", "latin1", "not_json", "array_line", "deep", "empty"):
        body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        if damage == "random_bytes":
            data = bytes(rng.getrandbits(8) for _ in range(200)) + b"\xff\xfe\x80"
        elif damage == "utf16":
            data = body.encode("utf-16")
        elif damage == "latin1":
            data = body.replace("✓", "").encode("latin-1")
        elif damage == "not_json":
            data = (body + "{not json\n").encode()
        elif damage == "array_line":
            data = (body + "[1, 2]\n").encode()
        elif damage == "deep":
            data = (body + "[" * 100000 + "]" * 100000 + "\n").encode()
        else:
            data = b"\n\n"
        target.write_bytes(data)
        return (path if fmt == "dir" else target), None, damage
    if fmt in ("parquet", "parquet_as_jsonl"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        if damage in ("huge_int", "bad_reward", "missing_dir_step"):  # JSONL-only damage
            fmt = "jsonl"
        else:
            target = path / ("data.parquet" if fmt == "parquet" else "data.jsonl")

            # one type per column: group keys as strings, rewards as floats (same expectation)
            def typed(k: str, v: Any) -> Any:
                if v is None or isinstance(v, float):
                    return v
                return float(v) if k == reward_col else str(v) if k == group_col else v

            cols = sorted({k for r in text_rows for k in r})
            table = pa.Table.from_pylist([{k: typed(k, r.get(k)) for k in cols} for r in text_rows])
            pq.write_table(table, target)
            return target, expected, f"{fmt}, {damage}"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" * rng.randint(1, 2) for r in text_rows)
    data = text.encode("utf-8")
    if fmt == "bom":
        data = b"\xef\xbb\xbf" + data
    target.write_bytes(data)
    if damage == "missing_dir_step":
        (path / "notes.jsonl").write_bytes(data)
        target.rename(path / "other.jsonl")
        return path, None, damage
    return (path if fmt == "dir" else target), expected, f"{fmt}, {damage}"


@fuzz(300)
@given(data=st.data())
def test_load_rollouts_and_analyze(
    data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("fuzz")
    path, expected, what = data.draw(rollout_files(tmp))
    out = run_call(lambda: load_rollouts(path))
    if expected is None:
        assert isinstance(out.error, RolloutError), f"{what}: {out.error!r} / {out.value!r}"
        assert str(path) in str(out.error) or "column" in str(out.error), str(out.error)
    else:
        assert out.error is None, f"{what}: {out.error!r}"
        assert out.value.rewards == expected["rewards"], what
        assert out.value.groups == expected["groups"], what
    # the command line: exit 2 with a message, or 0 with a report; never a traceback
    import contextlib
    import io

    err, std = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
        code = analyze_main([str(path), "--out", str(tmp / "out"), "--no-plot"])
    if expected is None:
        assert code == 2, (what, code, err.getvalue())
        assert err.getvalue().startswith("discoloss analyze: error: "), err.getvalue()
        assert err.getvalue().count("\n") == 1, err.getvalue()
    else:
        assert code == 0, (what, err.getvalue())
        assert (tmp / "out" / "difficulty_report.json").exists()


@fuzz(60)
@given(
    path=st.sampled_from(["a\0b.jsonl", "", "/", "x" * 5000]),
    file_format=st.sampled_from(["auto", "jsonl", "parquet", "csv", None]),
)
def test_load_rollouts_odd_paths_and_formats(path: str, file_format: Any) -> None:
    out = run_call(lambda: load_rollouts(path, file_format=file_format))
    assert out.error is not None
    if file_format not in ("auto", "jsonl", "parquet"):
        expect_error(out, ("file_format",), repr(file_format))
    else:
        assert isinstance(out.error, RolloutError), repr(out.error)


def test_analysis_parameters_are_tabled() -> None:
    """Every option of the analysis functions has a row in the table (or is an input)."""
    # length_source: a label of the report's text (where the lengths came from)
    inputs = {"p", "advantages", "rewards", "group_ids", "lengths", "methods", "group_names",
              "length_source"}  # fmt: skip
    for fn in (difficulty_weight, implied_weights, difficulty_report):
        assert set(parameters(fn)) - inputs <= set(ANALYSIS), fn.__name__
