"""The demo's RL loop is on-policy and trains what it rewards: at theta = theta_old the training
forward pass reproduces the sampling distribution's token log-probs (ratio 1), the response
mask covers exactly the generated tokens, the reward is computed on those tokens, and the
model has no dropout; the multi-seed summary; the flawed-demonstration warm-up."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import pytest
import torch

from discoloss.demo import task as T
from discoloss.demo.model import ModelConfig, build_model, generate, pack, response_log_probs
from discoloss.demo.report import seed_interval, summary_rows
from discoloss.demo.train import WarmupConfig, _answer_loss


@pytest.fixture(scope="module")
def model_and_task() -> tuple[object, T.TaskConfig]:
    config = T.TaskConfig(buckets=(1, 2, 3), test_per_bucket=5)
    model = build_model(ModelConfig(hidden=32, layers=2, heads=2, ffn=64), config, seed=1)
    # a few supervised steps so that the distribution is far from uniform
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(30):
        loss = _answer_loss(model, T.sample_questions(rng, 32, config))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, config


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_training_forward_reproduces_the_sampling_log_probs(
    model_and_task: tuple[object, T.TaskConfig], temperature: float
) -> None:
    model, config = model_and_task
    qs = T.sample_questions(random.Random(1), 24, config)
    prompts = [T.encode_prompt(q) for q in qs for _ in range(4)]  # lengths differ: left padding
    assert len({len(p) for p in prompts}) > 1
    responses, sample_lp = generate(
        model,
        prompts,
        max_new_tokens=config.max_answer_tokens,
        temperature=temperature,
        generator=torch.Generator().manual_seed(5),
        with_log_probs=True,
    )
    assert len({len(r) for r in responses}) > 1  # right padding too
    batch = pack(prompts, responses)
    model.train()  # type: ignore[attr-defined]  # the RL loop's mode: no dropout may act
    with torch.no_grad():
        logits = model(  # type: ignore[operator]
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits[:, :-1]
        train_lp, _ = response_log_probs(model, batch)
    tempered = torch.log_softmax(logits / temperature, -1)
    tempered = tempered.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    p_len = max(len(p) for p in prompts)
    r_ = responses
    for i, (r, lp) in enumerate(zip(responses, sample_lp)):
        where = batch.response_mask[i].nonzero().squeeze(1)
        # the mask covers exactly the generated tokens: from the prompt's end, up to and
        # including <eos>, nothing of the prompt and no padding
        assert where.tolist() == list(range(p_len - 1, p_len - 1 + len(r)))
        assert batch.input_ids[i, where + 1].tolist() == r
        assert r.count(T.EOS) <= 1 and (T.EOS not in r or r[-1] == T.EOS)
        # ratio pi_theta / pi_old == 1 at theta = theta_old, to float precision
        torch.testing.assert_close(tempered[i, where], torch.tensor(lp), rtol=0, atol=2e-5)
        if temperature == 1.0:
            torch.testing.assert_close(train_lp[i, where], torch.tensor(lp), rtol=0, atol=2e-5)
    # the reward reads exactly the trained tokens
    trained = [batch.input_ids[i, 1:][batch.response_mask[i]].tolist() for i in range(len(r_))]
    assert trained == responses


def test_model_has_no_dropout_and_train_mode_changes_nothing(
    model_and_task: tuple[object, T.TaskConfig],
) -> None:
    model, config = model_and_task
    qs = T.sample_questions(random.Random(2), 16, config)
    batch = pack([T.encode_prompt(q) for q in qs], [T.encode_answer(q) for q in qs])
    model.train()  # type: ignore[attr-defined]
    a, _ = response_log_probs(model, batch)
    b, _ = response_log_probs(model, batch)
    model.eval()  # type: ignore[attr-defined]
    c, _ = response_log_probs(model, batch)
    model.train()  # type: ignore[attr-defined]
    assert torch.equal(a, b)
    torch.testing.assert_close(a, c, rtol=0, atol=1e-6)


def test_generate_uses_the_current_cache_api(
    model_and_task: tuple[object, T.TaskConfig],
) -> None:
    model, config = model_and_task
    prompts = [T.encode_prompt(q) for q in T.sample_questions(random.Random(3), 8, config)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' deprecation of past_key_values
        generate(model, prompts, max_new_tokens=config.max_answer_tokens, temperature=0)


def test_flawed_demonstrations() -> None:
    q = T.Question(12, 30)
    assert T.decode(T.encode_answer(q, spurious=True)) == "42=<eos>"
    assert T.verify(q, T.encode_answer(q, spurious=True)) == 0.0
    config = T.TaskConfig(buckets=(2, 3))
    assert len(T.encode_answer(T.Question(999, 999), spurious=True)) <= config.max_answer_tokens
    with pytest.raises(ValueError, match="habit"):
        WarmupConfig(habit=1.0)
    with pytest.raises(ValueError, match="habit_steps"):
        WarmupConfig(habit_steps=-1)
    with pytest.raises(ValueError, match="threads must be >= 1"):
        WarmupConfig(threads=0)


def test_warmup_threads_key_the_checkpoint(tmp_path: Path) -> None:
    """The warm-up trains with its own thread count (restored afterwards), and a checkpoint
    trained with one count is not reused for another (their rounding differs)."""
    from discoloss.demo.train import warmup

    task = T.TaskConfig(buckets=(1, 2), test_per_bucket=4)
    small = ModelConfig(hidden=16, layers=1, heads=2, ffn=32)
    old = torch.get_num_threads()
    seen: list[int] = []

    class Bar:
        def __init__(self, **_: object) -> None:
            seen.append(torch.get_num_threads())

        def update(self, _: int) -> None: ...
        def set_postfix(self, **_: object) -> None: ...
        def close(self) -> None: ...

    torch.set_num_threads(1)
    try:
        keys = []
        for threads in (1, 2):
            config = WarmupConfig(steps=2, batch_size=8, habit=0.5, habit_steps=1, threads=threads)
            _, info = warmup(task, small, config, seed=0, cache_dir=tmp_path, progress=Bar)
            assert not info["cached"] and torch.get_num_threads() == 1
            keys.append(info["key"])
        assert seen == [1, 1, 2, 2]  # both stages, with each config's threads
        assert keys[0] != keys[1] and len(list(tmp_path.glob("warmup-*.pt"))) == 4
    finally:
        torch.set_num_threads(old)


def test_seed_interval() -> None:
    # mean 0.5, sd 0.1, n 3: t(2) = 4.303 -> half width 4.303 * 0.1 / sqrt(3) = 0.24843
    lo, hi = seed_interval([0.4, 0.5, 0.6])
    assert lo == pytest.approx(0.5 - 0.24843, abs=1e-4) and hi == pytest.approx(0.74843, abs=1e-4)
    with pytest.raises(ValueError, match="2 seeds"):
        seed_interval([0.5])


def _eval(correct: int, sampled: float, n: int = 10) -> dict[str, dict[int, float]]:
    return {
        "greedy_correct": {2: correct},
        "sampled_sum": {2: sampled * n},
        "sampled_sumsq": {2: sampled * sampled * n},
        "n": {2: n},
    }


def test_summary_across_seeds() -> None:
    steps = [{"reward": 0.1, "entropy": 1.0, "kl": 0.0, "kl_max": 0.0}]
    per_seed = [
        {
            "seed": s,
            "initial_eval": _eval(5, 0.30),
            "methods": {
                "disco": {"final_eval": _eval(g, p), "reward_first": 0.1, "reward_last": r}
            },
        }
        for s, g, p, r in ((0, 6, 0.4, 0.2), (1, 7, 0.5, 0.3), (2, 8, 0.6, 0.4))
    ]
    results = {
        "config": {"task": {"buckets": [2]}},
        "initial_eval": _eval(5, 0.30),
        "methods": {
            "disco": {
                "label": "DisCO",
                "steps": steps,
                "evals": [(1, _eval(6, 0.4))],
                "seconds": 1.0,
            }
        },
        "per_seed": per_seed,
    }
    rows = summary_rows(results)
    assert [r["method"] for r in rows] == ["start", "disco"]
    disco = rows[1]
    assert disco["eval"]["all"]["pass1"] == pytest.approx(0.5)
    assert disco["eval"]["all"]["pass1_ci"] == pytest.approx((0.25157, 0.74843), abs=1e-4)
    assert disco["eval"]["all"]["greedy"] == pytest.approx(0.7)
    assert [p["pass1"] for p in disco["per_seed"]] == pytest.approx([0.4, 0.5, 0.6])
    assert disco["reward_last"] == pytest.approx(0.3)
    start = rows[0]
    # three identical start evaluations: zero-width interval across seeds
    assert start["eval"]["all"]["pass1_ci"] == pytest.approx((0.3, 0.3))


# ----------------------------------------------------------------------------- RL improves


def _reward_curves(lrs: tuple[float, ...]) -> list[list[float]]:
    from discoloss.demo.train import warmup

    task = T.TaskConfig(buckets=(1, 2), test_per_bucket=4)
    model, _ = warmup(
        task,
        ModelConfig(hidden=32, layers=2, heads=2, ffn=64),
        WarmupConfig(steps=600, batch_size=64, lr=3e-3, habit=0.5, habit_steps=100),
        seed=0,
        cache_dir=None,
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return [_rl_curve(model, state, task, lr) for lr in lrs]


def _rl_curve(
    model: object, state: dict[str, torch.Tensor], task: T.TaskConfig, lr: float
) -> list[float]:
    from discoloss.demo.train import RLConfig, rl_train

    model.load_state_dict(state)  # type: ignore[attr-defined]
    rl = RLConfig(
        steps=30,
        questions=32,
        samples=8,
        minibatches=2,
        lr=lr,
        lr_warmup_steps=2,
        eval_every=1000,
        eval_samples=0,
    )
    hist = rl_train("disco", model, task, rl, seed=0, test_set=T.test_questions(task)[:2])
    return [s["reward"] for s in hist["steps"]]


def test_disco_raises_the_training_reward() -> None:
    """Seeded, one thread: DisCO in the demo loop raises the training reward of a tiny policy
    whose warm-up taught it a habit the verifier rejects (half the demonstrations end with a
    stray "=" before <eos>). A broken loss sign, off-policy log-probs, a wrong mask or a
    reward on other tokens stop the rise. The control run (lr 1e-7: the policy barely moves)
    shows that the margin is above the sampling noise of the same reward stream."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trained, control = _reward_curves((1e-3, 1e-7))
    finally:
        torch.set_num_threads(old)

    def gain(curve: list[float]) -> float:
        return sum(curve[-10:]) / 10 - sum(curve[:10]) / 10

    assert gain(trained) > 0.05, trained
    assert abs(gain(control)) < 0.03, control
    assert sum(trained[-10:]) > sum(control[-10:]) + 0.5  # 10 steps: +0.05 mean reward


def test_malformed_responses() -> None:
    from discoloss.demo.train import _malformed

    def ids(text: str) -> list[int]:
        return [T.EOS if c == "$" else T.VOCAB.index(c) for c in text]

    assert not _malformed(ids("42$"))
    assert not _malformed(ids("41$"))  # wrong digits, right format
    for bad in ("42=$", "42", "$", "4+2$", "="):
        assert _malformed(ids(bad)), bad
