"""Bad configurations fail when the config (or the trainer) is built, with a message that names
the option and says what to do."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import pytest
from discoloss.adapters.trl import DEFAULT_WEIGHTS, GRPO_ONLY_OPTIONS, DisCOConfig, DisCOTrainer
from trl import GRPOConfig
from trl_support import load_example, tiny_config


def test_defaults_are_disco_loss_defaults(tmp_path: Any) -> None:
    config = tiny_config(str(tmp_path))
    assert (config.score, config.objective, config.tau, config.kl_estimator) == (
        "log_likelihood",
        "disco",
        None,
        "k1",
    )
    assert (config.disco_delta, config.disco_beta, config.threshold, config.normalize) == (
        1e-4,
        1e3,
        0.5,
        "all",
    )
    assert config.beta == 0.0 and not config.allow_reference_kl
    assert config.weights == DEFAULT_WEIGHTS == "current"
    assert isinstance(config, GRPOConfig)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"num_generations": 1}, r"num_generations=1: DisCO .* at least 2 generations"),
        ({"beta": 1e3}, r"beta=1000.0: .*KL-to-reference .*disco_beta.*allow_reference_kl"),
        ({"loss_type": "grpo"}, r"loss_type='grpo' is not supported by DisCOTrainer"),
        ({"epsilon": 0.3}, r"epsilon=0.3 is not supported"),
        ({"epsilon_high": 0.28}, r"epsilon_high=0.28 is not supported"),
        ({"delta": 2.0}, r"delta=2.0 is not supported .*disco_delta"),
        ({"importance_sampling_level": "sequence"}, r"importance_sampling_level"),
        ({"top_entropy_quantile": 0.2}, r"top_entropy_quantile=0.2"),
        ({"entropy_coef": 0.01}, r"entropy_coef=0.01"),
        ({"mask_truncated_completions": True}, r"mask_truncated_completions=True"),
        ({"multi_objective_aggregation": "normalize_then_sum"}, r"multi_objective_aggregation"),
        ({"off_policy_mask_threshold": 0.5}, r"off_policy_mask_threshold=0.5"),
        ({"use_vllm": True}, r"vllm_importance_sampling_correction=False"),
        (
            {"steps_per_generation": 3, "gradient_accumulation_steps": 2},
            r"steps_per_generation=3 must be a multiple of gradient_accumulation_steps=2",
        ),
        ({"score": "log_ratio"}, r"score='log_ratio' is not a valid option"),
        ({"objective": "grpo"}, r"objective='grpo' is not a valid option"),
        ({"kl_estimator": "k2"}, r"kl_estimator='k2' is not a valid option"),
        ({"normalize": "none"}, r"normalize='none' is not a valid option"),
        ({"tau": 0.0}, r"tau must be > 0"),
        ({"disco_beta": -1.0}, r"disco_beta must be >= 0"),
        ({"disco_delta": float("nan")}, r"disco_delta must be finite"),
        ({"threshold": float("inf")}, r"threshold must be finite"),
        (
            {"weights": "micro_batch"},
            r"weights='micro_batch' is not supported by DisCOTrainer: .* TRL shuffles .* "
            r"Use weights='current' .* or weights='sampling'",
        ),
        ({"weights": "exact"}, r"weights='exact' is not a valid option; expected 'current' or "),
        ({"objective": "drpo", "lam": 0.0}, r"lam must be > 0"),
        ({"lam": -1.0}, r"lam must be > 0"),
        ({"max_length": 0}, r"max_length must be >= 1"),
        (
            {"objective": "drpo", "max_length": 3},
            r"max_length=3 is smaller than max_completion_length=4, .* lower `lam`",
        ),
        (
            {"objective": "drpo", "max_completion_length": None},
            r"objective='drpo' needs the length scale .* max_length and max_completion_length "
            r"are both None",
        ),
    ],
)
def test_bad_config_fails_at_construction(
    tmp_path: Any, overrides: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_config(str(tmp_path), **overrides)


def test_drpo_max_length_defaults_to_max_completion_length(tmp_path: Any) -> None:
    """objective='drpo' without max_length: the length scale is max_completion_length, the
    longest completion TRL generates; a larger max_length is kept; other objectives ignore it."""
    config = tiny_config(str(tmp_path), objective="drpo", lam=0.2, max_completion_length=16)
    assert config.max_length is None and config.drpo_max_length == 16
    options = config.disco_options()
    assert (options.objective, options.lam, options.max_length) == ("drpo", 0.2, 16)
    config = tiny_config(str(tmp_path), objective="drpo", max_length=64, max_completion_length=16)
    assert config.disco_options().max_length == 64
    assert tiny_config(str(tmp_path), max_completion_length=16).disco_options().max_length is None


def test_grpo_only_options_cover_real_fields() -> None:
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(GRPO_ONLY_OPTIONS) <= names


def test_allowed_combinations(tmp_path: Any) -> None:
    tiny_config(str(tmp_path), beta=0.04, allow_reference_kl=True)
    tiny_config(str(tmp_path), use_vllm=True, vllm_importance_sampling_correction=False)
    tiny_config(str(tmp_path), steps_per_generation=4, gradient_accumulation_steps=2)


def test_trainer_requires_a_disco_config(tmp_path: Any) -> None:
    ex = load_example()
    grpo = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(TypeError, match="args must be a DisCOConfig, got GRPOConfig"):
        DisCOTrainer(
            model=ex.build_model(),
            reward_funcs=ex.parity_reward,
            args=grpo,
            train_dataset=ex.build_dataset(),
            processing_class=ex.build_tokenizer(),
        )


def test_config_round_trips_through_the_cli_parser(tmp_path: Any) -> None:
    """TRL scripts build configs with HfArgumentParser: the DisCO fields must parse."""
    from transformers import HfArgumentParser

    (config,) = HfArgumentParser(DisCOConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--use_cpu",
            "--bf16",
            "false",
            "--objective",
            "disco_b",
            "--disco_beta",
            "500",
            "--tau",
            "2.0",
            "--weights",
            "sampling",
            "--lam",
            "0.3",
            "--max_length",
            "2048",
        ]
    )
    assert (config.lam, config.max_length) == (0.3, 2048)
    assert (config.objective, config.disco_beta, config.tau) == ("disco_b", 500.0, 2.0)
    assert config.weights == "sampling"
    with pytest.raises(SystemExit):
        HfArgumentParser(DisCOConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--objective", "ppo"]
        )


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared table
import option_cases  # noqa: E402  (out-of-range values of every option)

#: DisCOConfig's names of the shared options where GRPOConfig owns the plain one.
FIELD = {"delta": "disco_delta", "beta": "disco_beta"}
#: DisCOConfig's own options beyond the shared ones.
TRL_ONLY = {"allow_reference_kl": ("maybe", "2")}


def test_every_option_has_cases() -> None:
    """Each field DisCOConfig adds to GRPOConfig has out-of-range values in the shared table."""
    ours = {f.name for f in dataclasses.fields(DisCOConfig)} - {
        f.name for f in dataclasses.fields(GRPOConfig)
    }
    shared = {FIELD.get(name, name) for name in option_cases.BAD_VALUES}
    assert ours == shared | set(TRL_ONLY), sorted(ours)


@pytest.mark.parametrize(
    ("name", "value"), option_cases.cases({**option_cases.BAD_VALUES, **TRL_ONLY})
)
def test_every_out_of_range_value_is_refused_at_construction(
    tmp_path: Any, name: str, value: str
) -> None:
    """Every DisCO option of DisCOConfig set out of its range is refused when the config is
    built (before any trainer or process starts), naming the field."""
    field = FIELD.get(name, name)
    with pytest.raises((ValueError, TypeError)) as info:
        tiny_config(str(tmp_path), **{field: option_cases.as_python(value)})
    assert field in str(info.value), str(info.value)
