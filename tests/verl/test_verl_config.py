"""verl's real ppo_trainer config, composed with the README's overrides, through verl's own
validate_config (wrapped by the adapter); bad values fail with the adapter's messages."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import discoloss.adapters.verl as adapter
import pytest
from conftest import readme_overrides
from discoloss.adapters.verl import DiscoConfigError
from discoloss.adapters.verl.config import TARGET, DiscoPolicyLossConfig
from hydra import compose, initialize_config_dir, initialize_config_module
from omegaconf import OmegaConf

CONF_DIR = str(Path(adapter.__file__).parent / "conf")


def verl_config(*overrides: str) -> Any:
    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def shipped_config(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return compose(config_name="disco_trainer", overrides=list(overrides))


def validate(config: Any) -> None:
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    assert getattr(validate_config, "__discoloss__", False), "the adapter's hook is not installed"
    validate_config(
        config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
    )


def actor_of(config: Any) -> Any:
    from verl.utils.config import omega_conf_to_dataclass

    return omega_conf_to_dataclass(config.actor_rollout_ref.actor)


def test_readme_command_passes_verl_validation() -> None:
    cfg = verl_config(*readme_overrides())
    validate(cfg)
    assert cfg.actor_rollout_ref.actor.policy_loss._target_ == TARGET
    pl = actor_of(cfg).policy_loss
    assert isinstance(pl, DiscoPolicyLossConfig)
    assert (pl.score, pl.objective, pl.tau, pl.delta, pl.beta) == (
        "log_likelihood",
        "disco",
        None,
        1e-4,
        1e3,
    )


def test_shipped_config_options_need_no_plus() -> None:
    cfg = shipped_config(
        *[o for o in readme_overrides() if "loss_mode" not in o and "adv_estimator" not in o],
        "actor_rollout_ref.actor.policy_loss.score=likelihood_ratio",
        "actor_rollout_ref.actor.policy_loss.objective=disco_b",
        "actor_rollout_ref.actor.policy_loss.tau=2.5",
        "actor_rollout_ref.actor.policy_loss.kl_estimator=k3",
    )
    validate(cfg)
    pl = actor_of(cfg).policy_loss
    assert (pl.loss_mode, pl.score, pl.objective, pl.tau, pl.kl_estimator) == (
        "disco",
        "likelihood_ratio",
        "disco_b",
        2.5,
        "k3",
    )
    assert cfg.algorithm.adv_estimator == "disco"


def test_plus_options_on_verl_config() -> None:
    cfg = verl_config(
        *readme_overrides(),
        "+actor_rollout_ref.actor.policy_loss.tau=5",
        "+actor_rollout_ref.actor.policy_loss.threshold=0.0",
    )
    validate(cfg)
    pl = actor_of(cfg).policy_loss
    assert (pl.tau, pl.threshold) == (5.0, 0.0)


def test_non_disco_run_untouched() -> None:
    cfg = verl_config(
        "algorithm.adv_estimator=grpo",
        "actor_rollout_ref.rollout.n=5",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=3",
    )
    validate(cfg)  # micro 3 is not a multiple of n, shuffle etc.: DisCO rules do not apply
    assert (
        cfg.actor_rollout_ref.actor.policy_loss._target_ == "verl.workers.config.PolicyLossConfig"
    )


# Messages are the core's (discoloss.options.DiscoOptions), prefixed with the verl setting path.
P = "actor_rollout_ref.actor.policy_loss."
BAD_OPTIONS = [
    ("tau=-1", P + "tau must be > 0"),
    ("tau=0", P + "tau must be > 0"),
    ("delta=-0.1", P + "delta must be >= 0"),
    ("beta=-1", P + "beta must be >= 0"),
    ("score=logl", P + "score='logl' is not a valid option; expected one of"),
    ("objective=grpo", P + "objective='grpo' is not a valid option; expected one of"),
    ("kl_estimator=k2", P + "kl_estimator='k2' is not a valid option; expected one of"),
    ("weights=whole", P + "weights='whole' is not a valid option; expected one of 'current'"),
    ("weights=null", P + "weights=None is not a valid option"),
    ("normalize=none", P + "normalize='none' is not a valid option; expected one of"),
    ("threshold=nan", P + "threshold must be finite"),
    # the ablation variants' options
    ("constraint=trust", P + "constraint='trust' is not a valid option; expected one of"),
    ("cvar_alpha=0", P + "cvar_alpha must be > 0"),
    ("cvar_alpha=1.5", P + "cvar_alpha must be in (0, 1]"),
    ("margin=-1", P + "margin must be >= 0"),
    ("clip_eps=1.0", P + "clip_eps must be in (0, 1)"),
    ("clip_eps=0", P + "clip_eps must be > 0"),
    ("tau=abc", P + "tau must be a real number, got str"),
    ("lagrangian_lr=0", P + "lagrangian_lr: expected a finite number > 0, got 0"),
    ("lagrangian_lr=-1.0", P + "lagrangian_lr: expected a finite number > 0, got -1.0"),
    ("lagrangian_lr=abc", P + "lagrangian_lr: expected a number > 0, got 'abc'"),
    # DRPO's (validated whatever the objective, like cvar_alpha)
    ("lam=0", P + "lam must be > 0"),
    ("lam=-0.1", P + "lam must be > 0"),
    ("lam=abc", P + "lam must be a real number, got str"),
    ("max_length=0", P + "max_length must be >= 1"),
    ("max_length=1.5", P + "max_length must be an int"),
]


@pytest.mark.parametrize(("override", "message"), BAD_OPTIONS)
def test_bad_option_values(override: str, message: str) -> None:
    cfg = shipped_config(
        *[o for o in readme_overrides()], f"actor_rollout_ref.actor.policy_loss.{override}"
    )
    with pytest.raises(DiscoConfigError, match=re.escape(message)):
        validate(cfg)


MB = "+actor_rollout_ref.actor.policy_loss.weights=micro_batch"
MICRO8 = "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8"  # a multiple of n = 8
BAD_LAYOUT = [
    (["algorithm.adv_estimator=grpo"], "loss_mode=disco needs algorithm.adv_estimator=disco"),
    (
        ["actor_rollout_ref.actor.policy_loss.loss_mode=vanilla"],
        "set actor_rollout_ref.actor.policy_loss.loss_mode=disco",
    ),
    (
        ["actor_rollout_ref.rollout.n=1", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1"],
        "rollout.n=1",
    ),
    (["algorithm.use_kl_in_reward=true"], "use_kl_in_reward"),
    (["critic.enable=true"], "critic.enable=true"),
    # what still holds with the default weights=current: verl's own size rules, with the
    # adapter's message at startup instead of an assertion inside the first update
    (
        ["trainer.n_gpus_per_node=3"],
        "ppo_mini_batch_size \\* actor_rollout_ref.rollout.n = 256 responses is not a multiple "
        "of the actor's data-parallel size 3",
    ),
    (
        ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=3"],
        "ppo_micro_batch_size_per_gpu=3 does not divide the per-GPU mini-batch of 32 ",
    ),
    # the rules that keep questions whole, with weights=micro_batch only
    ([MB, "actor_rollout_ref.actor.shuffle=true"], "actor.shuffle=true"),
    (
        [MB, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=6"],
        "ppo_micro_batch_size_per_gpu=6 is not a multiple",
    ),
    (
        [MB, MICRO8, "trainer.n_gpus_per_node=3"],
        "ppo_mini_batch_size=32 \\(questions\\) is not a multiple of the actor's "
        "data-parallel size 3",
    ),
    ([MB, MICRO8, "data.train_batch_size=100"], "data.train_batch_size=100 is not a multiple"),
    ([MB, MICRO8, "trainer.use_v1=false"], "trainer.balance_batch=true"),
    (
        [
            MB,
            "trainer.use_v1=false",
            "trainer.balance_batch=false",
            "actor_rollout_ref.actor.use_dynamic_bsz=true",
            "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true",
        ],
        "use_dynamic_bsz=true splits questions in the legacy",
    ),
    (
        [MB, MICRO8, "+actor_rollout_ref.actor.policy_loss.normalize=valid"],
        "normalize='valid' is not",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_LAYOUT)
def test_layout_and_pairing_refused(overrides: list[str], message: str) -> None:
    base = {o.split("=")[0]: o for o in readme_overrides()}
    for o in overrides:
        base[o.split("=")[0]] = o
    cfg = verl_config(*base.values())
    with pytest.raises(DiscoConfigError, match=message):
        validate(cfg)


def test_layout_handled_not_refused() -> None:
    """Settings the adapter keeps correct instead of refusing (parity in test_verl_parity)."""
    base = {o.split("=")[0]: o for o in readme_overrides()}
    for o in [
        MB,
        "actor_rollout_ref.actor.use_dynamic_bsz=true",
        "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true",
        "trainer.balance_batch=true",
        "trainer.n_gpus_per_node=8",
        "trainer.nnodes=2",
    ]:
        base[o.split("=")[0]] = o
    validate(verl_config(*base.values()))


PLANNED_ALLOWED = [
    ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1"],
    ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", "trainer.n_gpus_per_node=2"],
    ["actor_rollout_ref.actor.shuffle=true"],
    [
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "trainer.n_gpus_per_node=4",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
    ],
    ["data.train_batch_size=100"],
    ["trainer.use_v1=false", "trainer.balance_batch=true"],
    [
        "trainer.use_v1=false",
        "actor_rollout_ref.actor.use_dynamic_bsz=true",
        "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz=true",
    ],
    ["+actor_rollout_ref.actor.policy_loss.normalize=valid"],
]


@pytest.mark.parametrize("weights", ["current", "sampling"])
@pytest.mark.parametrize("overrides", PLANNED_ALLOWED)
def test_planned_modes_lift_the_whole_question_rules(overrides: list[str], weights: str) -> None:
    """weights=current/sampling: every rule that only kept questions whole is gone."""
    base = {o.split("=")[0]: o for o in readme_overrides()}
    base["+w"] = f"+actor_rollout_ref.actor.policy_loss.weights={weights}"
    for o in overrides:
        key = o.split("=")[0]
        base["+w" if key.endswith(".weights") else key] = o
    validate(verl_config(*base.values()))


@pytest.mark.parametrize("weights", ["current", "sampling", "micro_batch"])
def test_current_weights_refused_with_megatron_pipeline_parallelism(weights: str) -> None:
    """The stats forward's log-probs live on the last pipeline stage only."""
    from discoloss.adapters.verl.layout import check_config

    cfg = OmegaConf.create(
        {
            "algorithm": {"adv_estimator": "disco"},
            "trainer": {"n_gpus_per_node": 8, "nnodes": 1},
            "data": {"train_batch_size": 16},
            "actor_rollout_ref": {
                "rollout": {"n": 8},
                "actor": {
                    "strategy": "megatron",
                    "megatron": {"pipeline_model_parallel_size": 2},
                    "ppo_mini_batch_size": 8,
                    "ppo_micro_batch_size_per_gpu": 8,
                    "policy_loss": {"loss_mode": "disco", "weights": weights},
                },
            },
        }
    )
    if weights == "current":
        with pytest.raises(DiscoConfigError, match="weights=current with Megatron pipeline"):
            check_config(cfg)
    else:
        assert check_config(cfg) is not None


def test_weights_option_reaches_the_loss() -> None:
    from discoloss.adapters.verl._options import DEFAULT_WEIGHTS
    from discoloss.adapters.verl.loss import options_of

    assert DEFAULT_WEIGHTS == "current"
    cfg = verl_config(*readme_overrides())
    validate(cfg)
    assert options_of(actor_of(cfg)).weights == "current"
    for weights in ("sampling", "micro_batch"):
        cfg = verl_config(*readme_overrides(), f"+{P}weights={weights}", MICRO8)
        validate(cfg)
        assert options_of(actor_of(cfg)).weights == weights
        cfg = shipped_config(
            *[o for o in readme_overrides() if "loss_mode" not in o and "adv_estimator" not in o],
            f"{P}weights={weights}",
            MICRO8,
        )
        validate(cfg)
        assert options_of(actor_of(cfg)).weights == weights


def test_bad_weights_stop_the_driver_before_any_worker() -> None:
    """A bad value of policy_loss.weights is refused by verl's validate_config in the driver
    (main_ppo calls it before Ray starts), naming the full setting."""
    cfg = verl_config(*readme_overrides(), f"+{P}weights=per_question")
    with pytest.raises(DiscoConfigError) as info:
        validate(cfg)
    assert str(info.value).startswith(f"{P}weights='per_question' is not a valid option")


def test_dataclass_rejects_bad_value_directly() -> None:
    with pytest.raises(DiscoConfigError, match=re.escape(P + "beta must be >= 0")):
        DiscoPolicyLossConfig(beta=-2.0)
    with pytest.raises(DiscoConfigError, match=re.escape(P + "lagrangian_lr: expected")):
        DiscoPolicyLossConfig(constraint="lagrangian", lagrangian_lr=0.0)
    assert DiscoPolicyLossConfig(constraint="lagrangian").lagrangian_lr == 1e3
    assert OmegaConf.is_config(verl_config())


# Every ablation variant is one override of the shipped config (no "+"), and one "+" override
# of verl's own config; it reaches the loss's options unchanged.
VARIANT_OVERRIDES = [
    ("objective", "cvar"),
    ("objective", "disco_2way"),
    ("objective", "auc_sq_hinge"),
    ("objective", "auc_logistic"),
    ("score", "clipped_ratio"),
    ("constraint", "hinge"),
    ("constraint", "kl_penalty"),
    ("constraint", "none"),
    ("constraint", "lagrangian"),
    ("cvar_alpha", 0.25),
    ("margin", 0.5),
    ("clip_eps", 0.1),
    ("objective", "drpo"),
    ("lam", 0.05),
    ("max_length", 8192),
]


@pytest.mark.parametrize(("name", "value"), VARIANT_OVERRIDES)
@pytest.mark.parametrize("base", ["shipped", "verl"])
def test_variant_is_one_override(name: str, value: Any, base: str) -> None:
    from discoloss.adapters.verl.loss import options_of

    if base == "shipped":
        others = [
            o for o in readme_overrides() if "loss_mode" not in o and "adv_estimator" not in o
        ]
        cfg = shipped_config(*others, f"{P}{name}={value}")
    else:
        cfg = verl_config(*readme_overrides(), f"+{P}{name}={value}")
    validate(cfg)
    actor = actor_of(cfg)
    assert isinstance(actor.policy_loss, DiscoPolicyLossConfig)
    assert getattr(actor.policy_loss, name) == value
    assert getattr(options_of(actor).disco, name) == value  # what the loss passes to disco_loss


def test_option_names_are_the_core_names() -> None:
    """The adapter's dataclass and shipped yaml carry exactly disco_loss's options (from the
    core's DiscoOptions, defaults included) plus the adapter-only ``validate`` and
    ``lagrangian_lr``."""
    from dataclasses import fields

    from verl.workers.config import PolicyLossConfig

    from discoloss.options import DiscoOptions

    core = DiscoOptions()
    own = {f.name for f in fields(DiscoPolicyLossConfig)} - {
        f.name for f in fields(PolicyLossConfig)
    }
    assert own == set(DiscoOptions.names()) | {"weights", "validate", "lagrangian_lr"}
    assert pl_default_lr() == 1e3
    pl = DiscoPolicyLossConfig()
    shipped = shipped_config().actor_rollout_ref.actor.policy_loss
    for name in DiscoOptions.names():
        assert getattr(pl, name) == getattr(core, name), name
        assert shipped[name] == getattr(core, name), name
    assert set(shipped) - {"_target_", "loss_mode"} - {
        f.name for f in fields(PolicyLossConfig)
    } == set(DiscoOptions.names()) | {"weights", "validate", "lagrangian_lr"}
    assert shipped["lagrangian_lr"] == 1e3
    assert shipped["weights"] == pl.weights == "current"


def pl_default_lr() -> float:
    return DiscoPolicyLossConfig().lagrangian_lr


def test_readme_options_table_lists_every_option() -> None:
    from conftest import README
    from discoloss.adapters.verl._options import OPTION_NAMES

    section = README.read_text().split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", section, re.M)
    assert [name for name, _ in rows] == list(OPTION_NAMES)
    shipped = shipped_config().actor_rollout_ref.actor.policy_loss
    for name, default in rows:
        value = shipped[name]
        if isinstance(value, float):
            assert float(default) == value, name
        else:
            assert default == {None: "null", True: "true", False: "false"}.get(value, value), name


# ---------------------------------------------------------------------------------------------
# DRPO: objective=drpo, lam, and max_length from the rollout's response length


def _drpo_config(base: str, *overrides: str) -> Any:
    """A DRPO run's config from the shipped config or verl's own (with "+")."""
    if base == "shipped":
        others = [
            o for o in readme_overrides() if "loss_mode" not in o and "adv_estimator" not in o
        ]
        return shipped_config(*others, f"{P}objective=drpo", *overrides)
    plus = [o if o.startswith(("data.", "actor_rollout_ref.rollout.")) else "+" + o
            for o in overrides]
    return verl_config(*readme_overrides(), f"+{P}objective=drpo", *plus)


@pytest.mark.parametrize("base", ["shipped", "verl"])
def test_drpo_max_length_defaults_to_the_response_length(base: str) -> None:
    """max_length left unset: the driver's validate_config writes the rollout's response length
    (verl's rollout.response_length, which defaults to data.max_response_length) into the
    policy_loss node, where the workers' loss and plan read it."""
    from discoloss.adapters.verl.loss import options_of

    cfg = _drpo_config(base, "data.max_response_length=1234")
    validate(cfg)
    assert cfg.actor_rollout_ref.actor.policy_loss.max_length == 1234
    actor = actor_of(cfg)
    assert actor.policy_loss.max_length == 1234
    opts = options_of(actor).disco
    assert (opts.objective, opts.lam, opts.max_length) == ("drpo", 0.1, 1234)
    # the rollout's own cap, where it is set apart from data.max_response_length
    cfg = _drpo_config(
        base, "data.max_response_length=1234", "actor_rollout_ref.rollout.response_length=2000"
    )
    validate(cfg)
    assert options_of(actor_of(cfg)).disco.max_length == 2000


@pytest.mark.parametrize("base", ["shipped", "verl"])
def test_drpo_max_length_given(base: str) -> None:
    """A given max_length is kept when it is at least the response length cap (the length
    preference 1 - |o|/max_length then stays in [0, 1) for every response); a smaller one is
    refused, naming lam as the knob for a stronger length preference."""
    from discoloss.adapters.verl.loss import options_of

    for value in (1234, 4096):
        cfg = _drpo_config(base, "data.max_response_length=1234", f"{P}max_length={value}")
        validate(cfg)
        assert options_of(actor_of(cfg)).disco.max_length == value
    cfg = _drpo_config(base, "data.max_response_length=1234", f"{P}max_length=1000")
    with pytest.raises(DiscoConfigError) as info:
        validate(cfg)
    message = str(info.value)
    assert message.startswith(
        f"{P}max_length=1000 is smaller than the longest response the rollout can produce "
        "(actor_rollout_ref.rollout.response_length=1234)"
    ), message
    assert f"{P}lam" in message


def test_max_length_is_left_alone_for_other_objectives() -> None:
    """Only DRPO reads max_length: other runs' configs are not changed."""
    cfg = verl_config(*readme_overrides(), "data.max_response_length=1234")
    validate(cfg)
    assert "max_length" not in cfg.actor_rollout_ref.actor.policy_loss
    assert actor_of(cfg).policy_loss.max_length is None
    cfg = shipped_config(
        *[o for o in readme_overrides() if "loss_mode" not in o and "adv_estimator" not in o],
        f"{P}max_length=64",  # smaller than the response length: not DRPO, not checked
    )
    validate(cfg)
    assert actor_of(cfg).policy_loss.max_length == 64


def test_drpo_without_max_length_outside_the_driver_is_refused() -> None:
    """The loss never guesses the length scale (the padded width of a micro-batch would change
    with its composition): without the driver's hook, a DRPO config without max_length is
    refused when verl builds it."""
    with pytest.raises(DiscoConfigError) as info:
        DiscoPolicyLossConfig(objective="drpo")
    assert str(info.value).startswith(f"{P}max_length: objective=drpo needs the length scale")
    assert DiscoPolicyLossConfig(objective="drpo", max_length=8).max_length == 8


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared table
import option_cases  # noqa: E402  (out-of-range values of every option)

#: verl's own options beyond the shared ones.
VERL_ONLY = {"validate": ("maybe", "2")}


def test_every_option_has_cases() -> None:
    """Each field of the policy_loss node (but verl's loss_mode) has out-of-range values in the
    shared table, so that a new option cannot go untested."""
    import dataclasses

    from verl.workers.config import PolicyLossConfig

    base = {f.name for f in dataclasses.fields(PolicyLossConfig)}
    ours = {f.name for f in dataclasses.fields(DiscoPolicyLossConfig)} - base
    assert ours == set(option_cases.BAD_VALUES) | set(VERL_ONLY), ours


@pytest.mark.parametrize(
    ("name", "value"), option_cases.cases({**option_cases.BAD_VALUES, **VERL_ONLY})
)
def test_every_out_of_range_value_is_refused_in_the_driver(name: str, value: str) -> None:
    """Every policy_loss option, set out of its range on the shipped config, is refused by
    validate_config in the driver (main_ppo calls it before Ray starts), and the message
    starts with the option's full path."""
    cfg = shipped_config(
        *[o for o in readme_overrides() if "loss_mode" not in o and "adv_estimator" not in o],
        f"{P}{name}={value}",
    )
    with pytest.raises(DiscoConfigError) as info:
        validate(cfg)
    assert str(info.value).startswith(f"{P}{name}"), str(info.value)
