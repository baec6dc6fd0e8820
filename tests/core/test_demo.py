"""``discoloss demo``: data generator and verifier, packing and sampling, report maths, options,
and an end-to-end run of the command with a tiny budget."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from discoloss.demo import task as T
from discoloss.demo.cli import main
from discoloss.demo.model import ModelConfig, build_model, generate, pack, response_log_probs
from discoloss.demo.report import mean_interval, wilson

# ----------------------------------------------------------------------------- task / verifier


def ids(text: str) -> list[int]:
    return [T.VOCAB.index(c) for c in text]


def test_verify_accepts_exactly_the_decimal_sum() -> None:
    q = T.Question(57, 68)
    assert q.answer == "125" and q.prompt == "57+68=" and q.bucket == 2
    assert T.verify(q, [*ids("125"), T.EOS]) == 1.0
    # tokens after the first <eos> are ignored
    assert T.verify(q, [*ids("125"), T.EOS, *ids("99"), T.EOS]) == 1.0
    assert T.verify(q, [*ids("125"), T.EOS, T.PAD, T.PAD]) == 1.0


@pytest.mark.parametrize(
    "response",
    [
        [*"125"],  # no <eos>: cut off at the length limit
        [],  # nothing at all
        ["<eos>"],  # empty answer
        [*"0125", "<eos>"],  # leading zero
        [*"124", "<eos>"],  # wrong
        [*"1250", "<eos>"],  # too long
        [*"12", "<eos>", *"5", "<eos>"],  # answer split by <eos>: only "12" counts
        ["+", *"125", "<eos>"],  # sign / operator token
        [*"125", "=", "<eos>"],
        ["<bos>", *"125", "<eos>"],
        [*"12", "<pad>", "5", "<eos>"],
    ],
)
def test_verify_rejects(response: list[str]) -> None:
    q = T.Question(57, 68)
    tokens = [T.VOCAB.index(t) for t in response]
    assert T.verify(q, tokens) == 0.0


def test_verify_zero_and_one_digit_sums() -> None:
    assert T.verify(T.Question(0, 0), [*ids("0"), T.EOS]) == 1.0
    assert T.verify(T.Question(0, 0), [*ids("00"), T.EOS]) == 0.0
    assert T.verify(T.Question(9, 1), [*ids("10"), T.EOS]) == 1.0
    assert T.Question(0, 0).bucket == 1 and T.Question(0, 1000).bucket == 4


def test_rewards_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="same length"):
        T.rewards([T.Question(1, 2)], [])


def test_the_length_setting_verifier_ignores_filler_only_there() -> None:
    q = T.Question(57, 68)
    padded = [*ids("125"), T.FILLER, T.FILLER, T.EOS]
    assert T.encode_answer(q, filler=2) == padded
    assert T.verify(q, padded) == 0.0  # the default task: "=" is not a digit
    assert T.verify(q, padded, ignore_filler=True) == 1.0
    assert T.verify(q, [*ids("12"), T.FILLER, *ids("5"), T.EOS], ignore_filler=True) == 1.0
    for wrong in ([*ids("124"), T.FILLER, T.EOS], [T.FILLER, T.FILLER, T.EOS], [T.FILLER] * 4):
        assert T.verify(q, wrong, ignore_filler=True) == 0.0
    assert T.rewards([q, q], [padded, [*ids("125"), T.EOS]], ignore_filler=True) == [1.0, 1.0]
    task = T.TaskConfig(buckets=(2, 3), filler=6)
    assert (
        task.ignore_filler
        and task.max_answer_tokens == T.TaskConfig(buckets=(2, 3)).max_answer_tokens + 6
    )
    with pytest.raises(ValueError, match="filler must be >= 0"):
        T.TaskConfig(filler=-1)


def test_grpo_length_penalty_can_push_a_correct_answer_down() -> None:
    """The length-penalised reward of the length setting keeps every correct answer above every
    wrong one, yet GRPO's group normalisation gives a long correct answer a negative advantage
    (the failure DRPO avoids); DRPO's weights on the same group stay positive."""
    from discoloss import discriminative_weights
    from discoloss.baselines import group_advantages
    from discoloss.demo.train import length_penalised

    lengths = [3, 3, 3, 3, 3, 3, 9, 4]
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    r = torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 0])
    shaped = length_penalised(r, mask, 0.5, 9)
    torch.testing.assert_close(shaped[:7], torch.tensor([1 - 1.5 / 9] * 6 + [0.5]))
    assert float(shaped[6]) > float(shaped[7])
    g = torch.zeros(8, dtype=torch.long)
    assert float(group_advantages(shaped, g)[6]) < 0
    w = discriminative_weights(
        torch.zeros(8), r, g, objective="drpo", preferences=1 - torch.tensor(lengths) / 9
    )
    assert bool((w[:7] > 0).all())


def test_encode_decode_roundtrip_and_bad_ids() -> None:
    q = T.Question(4021, 7)
    assert T.decode(T.encode_prompt(q)) == "<bos>4021+7="
    assert T.decode(T.encode_answer(q)) == "4028<eos>"
    assert T.verify(q, T.encode_answer(q)) == 1.0
    with pytest.raises(ValueError, match="outside the vocabulary"):
        T.decode([len(T.VOCAB)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        T.decode([-1])


def test_train_and_test_splits_are_disjoint_including_mirrors() -> None:
    config = T.TaskConfig(buckets=(1, 2, 3, 4), test_per_bucket=5)
    train = T.sample_questions(random.Random(0), 20_000, config)
    test = T.test_questions(config)
    assert not any(T.is_test_pair(q.a, q.b) for q in train)
    assert all(T.is_test_pair(q.a, q.b) for q in test)
    train_pairs = {frozenset((q.a, q.b)) for q in train}
    assert not train_pairs & {frozenset((q.a, q.b)) for q in test}
    # the validation set (learning-rate sweep) is disjoint from both
    val = T.validation_questions(config)
    assert len(val) >= 3 * 5 and all(T.split_of(q.a, q.b) == "val" for q in val)
    val_pairs = {frozenset((q.a, q.b)) for q in val}
    assert not val_pairs & train_pairs and not val_pairs & {frozenset((q.a, q.b)) for q in test}
    # the split is a property of the unordered pair
    for a, b in [(1, 2), (57, 68), (4021, 7), (0, 0), (999, 1000)]:
        assert T.is_test_pair(a, b) == T.is_test_pair(b, a)
    # the held-out share is about 1 / TEST_MODULUS
    rng = random.Random(1)
    share = sum(T.is_test_pair(rng.randrange(10**4), rng.randrange(10**4)) for _ in range(20_000))
    assert abs(share / 20_000 - 1 / T.TEST_MODULUS) < 0.01


def test_generator_buckets_and_determinism() -> None:
    config = T.TaskConfig(buckets=(2, 3, 4), test_per_bucket=300)
    qs = T.sample_questions(random.Random(7), 3000, config)
    assert qs == T.sample_questions(random.Random(7), 3000, config)
    assert qs != T.sample_questions(random.Random(8), 3000, config)
    counts = {k: sum(q.bucket == k for q in qs) for k in config.buckets}
    assert set(counts) == {2, 3, 4} and all(800 < c < 1200 for c in counts.values())
    assert all(q.a >= 0 and q.b >= 0 for q in qs)
    # both orders occur, and the smaller operand spans 1..k digits
    assert any(q.a < q.b for q in qs) and any(q.a > q.b for q in qs)
    assert {len(str(min(q.a, q.b))) for q in qs if q.bucket == 4} == {1, 2, 3, 4}
    test = T.test_questions(config)
    assert test == T.test_questions(config)  # fixed, independent of any run seed
    assert len(test) == len(set(test)) == 900
    assert [q.bucket for q in test] == [2] * 300 + [3] * 300 + [4] * 300
    assert config.max_answer_tokens == 7  # 5 digits + <eos>, and room for one stray token
    assert max(len(T.encode_answer(q)) for q in qs + test) <= config.max_answer_tokens
    assert max(len(T.encode_prompt(q)) for q in qs + test) <= config.max_prompt_tokens


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"buckets": ()}, "buckets"),
        ({"buckets": (0, 2)}, "buckets"),
        ({"buckets": (2, 2)}, "distinct"),
        ({"buckets": (10,)}, "at most 9"),
        ({"test_per_bucket": 0}, "test_per_bucket"),
        ({"buckets": (1, 2), "test_per_bucket": 300}, "exceeds"),
    ],
)
def test_task_config_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        T.TaskConfig(**kwargs)  # type: ignore[arg-type]


def test_sample_questions_bad_split() -> None:
    with pytest.raises(ValueError, match="split"):
        T.sample_questions(random.Random(0), 1, T.TaskConfig(), split="validation")


# ----------------------------------------------------------------------------- model


@pytest.fixture(scope="module")
def tiny_model() -> object:
    config = T.TaskConfig(buckets=(1, 2, 3), test_per_bucket=5)
    return build_model(ModelConfig(hidden=32, layers=2, heads=2, ffn=64), config, seed=0), config


def test_pack_layout() -> None:
    b = pack([[1, 5, 6], [1, 7]], [[8, 2], [9, 9, 2]])
    assert b.input_ids.tolist() == [[1, 5, 6, 8, 2, 0], [0, 1, 7, 9, 9, 2]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 1, 2, 3, 4]]
    # targets are input_ids[:, 1:]; response targets start at the prompt end
    assert b.response_mask.tolist() == [
        [False, False, True, True, False],
        [False, False, True, True, True],
    ]


def test_log_probs_do_not_depend_on_padding(tiny_model: tuple[object, T.TaskConfig]) -> None:
    model, _ = tiny_model
    prompts = [[1, 5, 13, 6, 14], [1, 7, 14]]
    responses = [[8, 2], [9, 9, 9, 2]]
    together, _ = response_log_probs(model, b := pack(prompts, responses))
    for i in range(2):
        alone, _ = response_log_probs(model, a := pack([prompts[i]], [responses[i]]))
        torch.testing.assert_close(
            together[i][b.response_mask[i]], alone[0][a.response_mask[0]], rtol=1e-5, atol=1e-5
        )


def test_generate_greedy_and_seeded_sampling(tiny_model: tuple[object, T.TaskConfig]) -> None:
    model, config = tiny_model
    qs = T.sample_questions(random.Random(0), 16, config)
    prompts = [T.encode_prompt(q) for q in qs]
    g1 = generate(model, prompts, max_new_tokens=config.max_answer_tokens, temperature=0)
    g2 = generate(model, prompts, max_new_tokens=config.max_answer_tokens, temperature=0)
    assert g1 == g2
    # greedy decoding agrees with the argmax of a full forward pass (KV cache, positions)
    for p, r in zip(prompts[:4], g1[:4]):
        seq = list(p)
        for tok in r:
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]  # type: ignore[operator]
            assert int(logits.argmax()) == tok
            seq.append(tok)
    s = [
        generate(
            model,
            prompts,
            max_new_tokens=config.max_answer_tokens,
            temperature=1.0,
            generator=torch.Generator().manual_seed(3),
        )
        for _ in range(2)
    ]
    assert s[0] == s[1]
    for r in s[0]:
        assert 1 <= len(r) <= config.max_answer_tokens
        assert T.EOS not in r[:-1]  # trimmed after the first <eos>
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompts, max_new_tokens=2, temperature=-1.0)


# ----------------------------------------------------------------------------- report maths


def test_wilson_interval() -> None:
    # reference values (z = 1.96): 0/10 -> [0, 0.2775]; 5/10 -> [0.2366, 0.7634]
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and math.isclose(hi, 0.2775, abs_tol=1e-4)
    lo, hi = wilson(5, 10)
    assert math.isclose(lo, 0.2366, abs_tol=1e-4) and math.isclose(hi, 0.7634, abs_tol=1e-4)
    lo, hi = wilson(300, 300)
    assert math.isclose(hi, 1.0) and 0.98 < lo < 1.0
    with pytest.raises(ValueError):
        wilson(3, 0)
    with pytest.raises(ValueError):
        wilson(4, 3)


def test_mean_interval() -> None:
    xs = [0.0, 0.5, 1.0, 0.25]
    lo, hi = mean_interval(sum(xs), sum(x * x for x in xs), len(xs))
    mean = sum(xs) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / 3)
    half = 1.959963984540054 * sd / 2
    assert math.isclose(lo, max(0.0, mean - half)) and math.isclose(hi, mean + half)
    assert mean_interval(3.0, 3.0, 3) == (1.0, 1.0)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--steps", "ten"], "--steps must be an integer"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--methods", "disco,ppo"], "--methods: unknown method 'ppo'"),
        (["--methods", ""], "--methods must be a comma-separated list"),
        (["--methods", "grpo,grpo"], "--methods lists a method twice"),
        (["--buckets", "0,2"], "--buckets must be distinct digit counts"),
        (["--buckets", "a"], "--buckets must be comma-separated"),
        (["--warmup-steps", "-5"], "--warmup-steps must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--warmup-threads", "0"], "--warmup-threads must be >= 1"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["--no-cache", "--cache-dir", "x"], "--no-cache and --cache-dir"),
        (["--buckets", "1", "--test-per-bucket", "400"], "--test-per-bucket"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--lr", "0"], "--lr must be a finite number > 0"),
        (["--lr", "ppo=1e-4"], "--lr: expected a number or method=lr pairs"),
        (["--lr", "disco=x"], "--lr must be a number"),
        (["--sweep-lr", "1e-4"], "--sweep-lr needs at least 2 distinct"),
        (["--sweep-lr", "1e-4,-1"], "--sweep-lr must be a finite number > 0"),
        (["--quick", "--long"], "--quick and --long exclude each other"),
        (["--length", "--long"], "--length and --long exclude each other"),
        (["--methods", "drpo,grpo-lp,ppo"], "--methods: unknown method 'ppo'"),
    ],
)
def test_bad_options_give_a_clear_error(
    argv: list[str], match: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert match in err
    assert not (tmp_path / "o").exists()


def test_out_must_be_a_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["--out", str(f)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for opt in (
        "--methods", "--steps", "--seed", "--seeds", "--quick", "--long", "--out",
        "--cache-dir", "--lr", "--sweep-lr",
    ):  # fmt: skip
        assert opt in out


# ----------------------------------------------------------------------------- end to end

TINY = [
    "--quick", "--steps", "2", "--warmup-steps", "150", "--buckets", "1,2",
    "--test-per-bucket", "6", "--eval-every", "1", "--no-progress", "--seed", "3", "--jobs", "1",
]  # fmt: skip
PNGS = ("reward.png", "entropy.png", "kl.png", "heldout.png", "weights.png")


def _numbers(x: object) -> list[float]:
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return []
    if isinstance(x, (int, float)):
        return [float(x)]
    if isinstance(x, dict):
        return [v for k, val in x.items() for v in _numbers(val)]
    if isinstance(x, (list, tuple)):
        return [v for val in x for v in _numbers(val)]
    raise TypeError(type(x))


def _strip_timing(doc: dict[str, object]) -> dict[str, object]:
    doc = json.loads(json.dumps(doc))
    for k in ("timing", "environment", "command"):
        doc.pop(k)
    doc["warmup"] = {k: v for k, v in doc["warmup"].items() if k in ("key", "final_loss")}
    for m in doc["methods"].values():
        for k in ("seconds", "cpu_seconds", "eval_seconds"):
            m.pop(k)
    for row in doc["summary"]:
        row.pop("seconds", None)
    for seed_run in doc["per_seed"]:
        seed_run["warmup"] = {k: seed_run["warmup"][k] for k in ("key", "final_loss")}
        for m in seed_run["methods"].values():
            m.pop("seconds")
    return doc


def test_quick_compares_disco_with_grpo(tmp_path: Path) -> None:
    """--quick without --methods: DisCO and GRPO only, on the default run's warm-up (its cache
    key: same configuration, including the warm-up's thread count)."""
    from discoloss.demo.cli import _presets, default_warmup_threads

    argv = [*TINY, "--steps", "1", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path)]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert list(doc["methods"]) == ["disco", "grpo"]
    assert doc["config"]["warmup"]["threads"] == default_warmup_threads()
    presets = _presets()
    assert presets["quick"].warmup == presets["default"].warmup == presets["long"].warmup


def test_quick_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    out = tmp_path / "run1"
    four = ["--methods", "disco,grpo,dr_grpo,dapo"]
    assert main([*TINY, *four, "--out", str(out), "--cache-dir", str(cache)]) == 0
    printed = capsys.readouterr().out
    assert "| DisCO |" in printed and "| GRPO |" in printed and "| DAPO |" in printed
    for name in ("table.md", "results.json", *PNGS):
        assert (out / name).stat().st_size > 0, name
    for name in PNGS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "table.md").read_text()
    for label in ("warm-up checkpoint", "DisCO", "GRPO", "Dr. GRPO", "DAPO"):
        assert f"| {label}" in table

    doc = json.loads((out / "results.json").read_text())
    assert list(doc["methods"]) == ["disco", "grpo", "dr_grpo", "dapo"]
    assert all(math.isfinite(v) for v in _numbers(doc)), "non-finite number in results.json"
    # both warm-up stages cached: the clean one and the habit stage
    assert not doc["warmup"]["cached"] and len(list(cache.glob("warmup-*.pt"))) == 2
    for method, hist in doc["methods"].items():
        assert len(hist["steps"]) == 2, method
        assert hist["params_changed"] and hist["param_change_norm"] > 0, method
        # the step had learning signal (else an unchanged model would also be plausible)
        assert any(s["frac_groups_with_signal"] > 0 for s in hist["steps"]), method
        assert [e[0] for e in hist["evals"]] == [0, 1, 2]
        assert hist["last_batch"]["accuracy"] and hist["last_batch"]["weight"]
    disco = doc["methods"]["disco"]
    for key in (
        "objective",
        "penalty",
        "constraint_active",
        "groups_with_signal",
        "effective_negatives",
    ):
        assert key in disco["steps"][0]["extra"], key
    # DisCO puts weight 1 on every question with signal of its last batch
    for a, w in zip(disco["last_batch"]["accuracy"], disco["last_batch"]["weight"]):
        assert math.isclose(w, 1.0 if 0 < a < 1 else 0.0, abs_tol=1e-6)

    # same seed: same numbers (warm-up now from the cache)
    out2 = tmp_path / "run2"
    assert main([*TINY, *four, "--out", str(out2), "--cache-dir", str(cache)]) == 0
    doc2 = json.loads((out2 / "results.json").read_text())
    assert doc2["warmup"]["cached"]
    assert _strip_timing(doc2) == _strip_timing(doc)


def test_length_setting_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--length: DRPO, DisCO and length-penalised GRPO on the filler task; the length table and
    plot, the lengths of the correct answers in every evaluation; the first warm-up stage is
    the default run's (same cache key), the second stage has its own."""
    from discoloss.demo.cli import _presets

    cache, out = tmp_path / "c", tmp_path / "o"
    assert (
        main([*TINY, "--length", "--steps", "1", "--out", str(out), "--cache-dir", str(cache)]) == 0
    )
    printed = capsys.readouterr().out
    assert "| DRPO |" in printed and "length of correct answers" in printed
    doc = json.loads((out / "results.json").read_text())
    assert list(doc["methods"]) == ["drpo", "disco", "grpo_lp"]
    assert doc["config"]["task"]["filler"] == 6 and doc["config"]["warmup"]["filler"] == 0.5
    assert (out / "length.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "length.md").read_text()
    for label in ("warm-up checkpoint", "DRPO", "DisCO", "GRPO + length penalty"):
        assert f"| {label} |" in table
    assert all(math.isfinite(v) for v in _numbers(doc["methods"]["drpo"]["steps"]))
    for method, hist in doc["methods"].items():
        assert hist["params_changed"], method
        for _, e in hist["evals"]:
            assert set(e["correct_n"]) == set(e["n"])
            for b in e["n"]:
                assert 0 <= e["correct_filler"][b] <= e["correct_n"][b]
                assert e["correct_length_sum"][b] >= 2 * e["correct_n"][b]  # a digit and <eos>
    assert "effective_positives" in doc["methods"]["drpo"]["steps"][0]["extra"]
    presets = _presets()
    assert presets["length"].warmup.clean_stage() == presets["default"].warmup.clean_stage()
    assert "filler" not in presets["default"].warmup.second_stage()
    assert len(list(cache.glob("warmup-*.pt"))) == 2


def test_the_command_and_the_sweep_do_not_import_each_other() -> None:
    """The run helpers both use live in discoloss.demo.workers, which imports no demo module;
    the sweep does not import the command (the command imports the sweep)."""
    import ast

    import discoloss.demo as demo

    root = Path(demo.__file__).parent

    def imported(name: str) -> set[str]:
        tree = ast.parse((root / f"{name}.py").read_text())
        mods = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        return {m for m in mods if m.startswith("discoloss.demo")}

    assert "discoloss.demo.cli" not in imported("sweep")
    assert imported("workers") == set()
    assert "discoloss.demo.workers" in imported("sweep") & imported("cli")


def test_module_entry_point_dispatches_demo() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "discoloss", "demo", "--steps", "0"],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--steps must be >= 1" in proc.stderr


def test_seeds_summary_schema(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*TINY, "--steps", "1", "--methods", "disco,grpo", "--seeds", "2"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]) == 0
    assert "per seed" in capsys.readouterr().out
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["config"]["seeds"] == [3, 4] and len(doc["per_seed"]) == 2
    assert len(list((tmp_path / "c").glob("warmup-*.pt"))) == 4  # two stages per seed
    by_method = {row["method"]: row for row in doc["summary"]}
    assert set(by_method) == {"start", "disco", "grpo"}
    for row in doc["summary"]:
        e = row["eval"]["all"]
        assert {"pass1", "pass1_ci", "greedy", "greedy_ci"} <= set(e)
        per_seed = [p["pass1"] for p in row["per_seed"]]
        assert len(per_seed) == 2
        assert math.isclose(e["pass1"], sum(per_seed) / 2)
        assert e["pass1_ci"][0] <= e["pass1"] <= e["pass1_ci"][1]
    for i, _seed in enumerate((3, 4)):
        final = doc["per_seed"][i]["methods"]["disco"]["final_eval"]
        n = sum(final["n"].values())
        assert math.isclose(
            by_method["disco"]["per_seed"][i]["pass1"], sum(final["sampled_sum"].values()) / n
        )


def test_jobs_give_the_numbers_of_one_process(tmp_path: Path) -> None:
    """--jobs 2 runs the RL runs (and the seeds' warm-ups, the sweep's methods) in worker
    processes: the same numbers as one process."""
    cache = str(tmp_path / "c")
    seeds = [*TINY, "--steps", "1", "--methods", "disco,grpo", "--seeds", "2"]
    sweep = [*TINY, "--steps", "1", "--methods", "disco,grpo", "--sweep-lr", "1e-4,1e-3"]
    docs = {}
    for jobs in ("1", "2"):
        for name, argv in (("seeds", seeds), ("sweep", sweep)):
            out = tmp_path / f"{name}{jobs}"
            assert main([*argv, "--jobs", jobs, "--out", str(out), "--cache-dir", cache]) == 0
            docs[name, jobs] = json.loads(
                (out / ("results.json" if name == "seeds" else "sweep.json")).read_text()
            )
    one, two = (_strip_timing(docs["seeds", j]) for j in ("1", "2"))
    assert two["config"].pop("jobs") == 2 and one["config"].pop("jobs") == 1
    assert one == two
    for doc in (docs["sweep", "1"], docs["sweep", "2"]):
        for k in ("seconds", "cpu_seconds", "command", "warmup"):
            doc.pop(k)
    assert docs["sweep", "1"] == docs["sweep", "2"]


def test_sweep_lr_uses_the_validation_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [*TINY, "--steps", "1", "--methods", "disco", "--sweep-lr", "1e-4,1e-3"]
    assert main([*argv, "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]) == 0
    assert "chosen" in capsys.readouterr().out
    doc = json.loads((tmp_path / "o" / "sweep.json").read_text())
    assert doc["split"] == "validation" and doc["lrs"] == [1e-4, 1e-3]
    assert doc["chosen"]["disco"] in (1e-4, 1e-3)
    assert set(doc["runs"]["disco"]) == {repr(1e-4), repr(1e-3)}
    assert (tmp_path / "o" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "o" / "results.json").exists()  # no test-set evaluation


def test_results_files_name_no_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from discoloss.demo.report import write_json_plain

    monkeypatch.setenv("HOME", str(tmp_path / "alice"))
    doc = {
        "warmup": {"path": str(tmp_path / "alice" / ".cache" / "w.pt")},
        "runs": [str(tmp_path / "alice"), str(tmp_path / "alicex" / "a"), "relative/b"],
    }
    write_json_plain(doc, tmp_path / "o.json")
    back = json.loads((tmp_path / "o.json").read_text())
    assert back["warmup"]["path"] == "~/.cache/w.pt"
    assert back["runs"] == ["~", str(tmp_path / "alicex" / "a"), "relative/b"]
