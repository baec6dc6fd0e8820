"""The launcher ``python -m discoloss.adapters.openrlhf.train_ppo_ray`` runs OpenRLHF's real
``openrlhf.cli.train_ppo_ray`` (parser, checks, ``train``) in-process; ``train`` is stopped at
``get_strategy`` to capture the arguments it would train with, and ``ray.init`` is recorded."""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from discoloss.adapters.openrlhf import HOOK, settings_from_args
from discoloss.adapters.openrlhf.train_ppo_ray import main

ADAPTER = Path(__file__).resolve().parents[2] / "adapters" / "openrlhf"
OPENRLHF_CLI_SOURCE = Path(
    __import__("importlib.util").util.find_spec("openrlhf.cli.train_ppo_ray").origin).read_text()

BASE = [
    "--actor.model_name_or_path", "/models/tiny",
    "--reward.remote_url", "http://127.0.0.1:9/get_reward",
    "--rollout.n_samples_per_prompt", "4", "--rollout.batch_size", "8",
    "--rollout.micro_batch_size", "4",
    "--train.batch_size", "16", "--train.micro_batch_size", "8",
    "--actor.num_gpus_per_node", "2", "--algo.kl.init_coef", "0",
    "--logger.wandb.run_name", "fixed",
]
DISCO = BASE + ["--algo.advantage.estimator", "disco"]


class Captured(Exception):
    def __init__(self, args: Any) -> None:
        super().__init__("captured")
        self.captured = args


@pytest.fixture
def launch(monkeypatch: pytest.MonkeyPatch) -> Any:
    import openrlhf.utils
    import ray

    inits: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: inits.append(k))

    def get_strategy(args: Any) -> Any:
        raise Captured(args)

    monkeypatch.setattr(openrlhf.utils, "get_strategy", get_strategy)

    def run(argv: list[str], *, wrapper: bool = True) -> SimpleNamespace:
        old = sys.argv
        sys.argv = ["train_ppo_ray", *argv]
        inits.clear()
        try:
            if wrapper:
                main()
            else:
                runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=True)
        except Captured as captured:
            return SimpleNamespace(args=captured.captured, inits=list(inits))
        finally:
            sys.argv = old
        raise AssertionError("train() was not reached")

    return run


def test_disco_flags_reach_the_training_args(launch):
    flags = ["--algo.disco.score", "likelihood_ratio", "--algo.disco.objective", "disco_b",
             "--algo.disco.tau", "2.5", "--algo.disco.delta", "1e-3", "--algo.disco.beta", "7",
             "--algo.disco.kl_estimator", "k3", "--algo.disco.threshold", "0",
             "--algo.disco.normalize",
             "valid"]
    out = launch(DISCO + flags)
    assert out.args.algo.advantage.estimator == "disco"
    settings = settings_from_args(out.args)
    assert settings.loss_kwargs() == dict(score="likelihood_ratio", objective="disco_b", tau=2.5,
                                          delta=1e-3, beta=7.0, kl_estimator="k3", threshold=0.0,
                                          normalize="valid", constraint="squared_hinge",
                                          cvar_alpha=0.5, margin=1.0, clip_eps=0.2, lam=0.1,
                                          max_length=None)
    # the worker setup hook is added to OpenRLHF's own ray.init call, which keeps its env vars
    (init,) = out.inits
    assert init["runtime_env"]["worker_process_setup_hook"] == HOOK
    assert "TOKENIZERS_PARALLELISM" in init["runtime_env"]["env_vars"]


def test_defaults_are_disco_loss_defaults(launch):
    import inspect

    from discoloss import disco_loss

    settings = settings_from_args(launch(DISCO).args).loss_kwargs()
    params = inspect.signature(disco_loss).parameters
    assert settings == {k: params[k].default for k in settings}


def test_help_lists_disco_options(capsys):
    old = sys.argv
    sys.argv = ["train_ppo_ray", "--help"]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = old
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "DisCO (discoloss)" in text
    for name in ("score", "objective", "tau", "delta", "beta", "kl_estimator", "threshold",
                 "normalize", "constraint", "cvar_alpha", "margin", "clip_eps", "lam",
                 "max_length", "lagrangian_lr", "weights"):
        assert f"--algo.disco.{name}" in text
    assert re.search(r"--algo.disco.weights \{current,sampling,micro_batch\}", text)
    assert re.search(r"\(default:\s+current\)", text)
    assert re.search(r"--algo.disco.lagrangian_lr LAGRANGIAN_LR\s+constraint lagrangian", text)
    assert "(default: 1000.0)" in text
    # the values of the string options come from the core's types
    assert re.search(r"--algo.disco.max_length MAX_LENGTH\s+objective drpo", text)
    assert re.search(r"--algo.disco.lam LAM\s+objective drpo", text)
    for value in ("drpo", "clipped_ratio", "cvar", "disco_2way", "auc_sq_hinge", "auc_logistic",
                  "kl_penalty", "hinge"):
        assert value in text
    assert "disco" in re.search(r"--algo.advantage.estimator \{([^}]*)\}", text).group(1)


@pytest.mark.parametrize("flag,value", [
    ("--algo.disco.tau", "0"), ("--algo.disco.tau", "-1"), ("--algo.disco.tau", "nan"),
    ("--algo.disco.delta", "-1e-4"), ("--algo.disco.beta", "-1"), ("--algo.disco.beta", "inf"),
    ("--algo.disco.threshold", "abc"), ("--algo.disco.score", "ratio"),
    ("--algo.disco.objective", "grpo"), ("--algo.disco.kl_estimator", "k2"),
    ("--algo.disco.normalize", "some"), ("--algo.disco.constraint", "trust_region"),
    ("--algo.disco.cvar_alpha", "0"), ("--algo.disco.cvar_alpha", "1.5"),
    ("--algo.disco.margin", "-0.1"), ("--algo.disco.clip_eps", "1"),
    ("--algo.disco.clip_eps", "0"), ("--algo.disco.lagrangian_lr", "0"),
    ("--algo.disco.lagrangian_lr", "-5"), ("--algo.disco.lagrangian_lr", "nan"),
    ("--algo.disco.weights", "exact"), ("--algo.disco.weights", "Current"),
    ("--algo.disco.lam", "0"), ("--algo.disco.lam", "-0.1"), ("--algo.disco.lam", "inf"),
    ("--algo.disco.max_length", "0"), ("--algo.disco.max_length", "1.5"),
])
def test_bad_values_are_rejected(launch, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        launch(DISCO + [f"{flag}={value}"])  # "=": argparse reads "-1e-4" as a flag otherwise
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # argparse's own message for a non-number, else the core's check with the flag's name
    assert f"argument {flag}:" in err or f"error: {flag}" in err, err
    assert value in err or repr(float(value)) in err, err  # the bad value is shown


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared table
import option_cases  # noqa: E402  (out-of-range values of every option)


def test_every_option_has_cases():
    """Each --algo.disco.* flag has out-of-range values in the shared table."""
    from discoloss.adapters.openrlhf.settings import OPTION_NAMES

    assert set(OPTION_NAMES) == set(option_cases.BAD_VALUES), OPTION_NAMES


@pytest.mark.parametrize("name,value", option_cases.cases())
def test_every_out_of_range_value_is_refused_by_the_parser(launch, capsys, name, value):
    """Every --algo.disco.* flag set out of its range stops the launcher in argument parsing
    (exit 2, before Ray or any worker starts), and the message names the flag."""
    flag = f"--algo.disco.{name}"
    with pytest.raises(SystemExit) as exit_info:
        launch(DISCO + [f"{flag}={value}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}:" in err or f"error: {flag}" in err, err


VARIANT_FLAGS = {
    "cvar": (["--algo.disco.objective", "cvar", "--algo.disco.cvar_alpha", "0.25"],
             dict(objective="cvar", cvar_alpha=0.25)),
    "disco_2way": (["--algo.disco.objective", "disco_2way", "--algo.disco.tau", "0.5"],
                   dict(objective="disco_2way", tau=0.5)),
    "auc_sq_hinge": (["--algo.disco.objective", "auc_sq_hinge", "--algo.disco.margin", "0"],
                     dict(objective="auc_sq_hinge", margin=0.0)),
    "auc_logistic": (["--algo.disco.objective", "auc_logistic"], dict(objective="auc_logistic")),
    "clipped_ratio": (["--algo.disco.score", "clipped_ratio", "--algo.disco.clip_eps", "0.1"],
                      dict(score="clipped_ratio", clip_eps=0.1)),
    "hinge": (["--algo.disco.constraint", "hinge"], dict(constraint="hinge")),
    "kl_penalty": (["--algo.disco.constraint", "kl_penalty", "--algo.disco.beta", "0.05"],
                   dict(constraint="kl_penalty", beta=0.05)),
    "none": (["--algo.disco.constraint", "none"], dict(constraint="none")),
}


@pytest.mark.parametrize("variant", list(VARIANT_FLAGS))
def test_variant_flags_reach_the_training_args(launch, variant):
    import inspect

    from discoloss import disco_loss

    flags, want = VARIANT_FLAGS[variant]
    got = settings_from_args(launch(DISCO + flags).args).loss_kwargs()
    params = inspect.signature(disco_loss).parameters
    assert got == {k: want.get(k, params[k].default) for k in got}


def test_lagrangian_and_its_step_size_reach_the_training_args(launch):
    out = launch(DISCO + ["--algo.disco.constraint", "lagrangian",
                          "--algo.disco.lagrangian_lr", "250"])
    settings = settings_from_args(out.args)
    assert settings.constraint == "lagrangian" and settings.lagrangian_lr == 250.0
    assert "lagrangian_lr" not in settings.loss_kwargs()  # not a disco_loss option
    assert settings_from_args(launch(DISCO).args).lagrangian_lr == 1e3
    # and in the actor too (args built without the launcher)
    with pytest.raises(ValueError, match="--algo.disco.lagrangian_lr"):
        settings_from_args(SimpleNamespace(algo=SimpleNamespace(disco=SimpleNamespace(
            constraint="lagrangian", lagrangian_lr=-1.0))))


DRPO = DISCO + ["--algo.disco.objective", "drpo", "--algo.disco.lam", "0.2"]


def test_drpo_max_length_defaults_to_the_generation_cap(launch):
    """objective drpo without --algo.disco.max_length: the length scale of the preference
    1 - |o|/max_length is OpenRLHF's maximum generation length, --rollout.max_new_tokens, else
    --data.max_len (OpenRLHF's default 2048), resolved with the settings in the driver and, from
    the same args, in the actor."""
    out = launch(DRPO + ["--rollout.max_new_tokens", "512"])
    settings = settings_from_args(out.args)
    assert (settings.objective, settings.lam, settings.max_length) == ("drpo", 0.2, 512)
    assert settings.loss_kwargs()["max_length"] == 512
    assert settings_from_args(launch(DRPO).args).max_length == 2048  # --data.max_len's default
    assert settings_from_args(launch(DRPO + ["--data.max_len", "300"]).args).max_length == 300
    # the actor's nested args
    nested = SimpleNamespace(algo=SimpleNamespace(disco=SimpleNamespace(objective="drpo")),
                             rollout=SimpleNamespace(max_new_tokens=None),
                             data=SimpleNamespace(max_len=1024))
    assert settings_from_args(nested).max_length == 1024
    # other objectives leave max_length alone
    assert settings_from_args(launch(DISCO).args).max_length is None


def test_drpo_max_length_given(launch, capsys):
    """A given --algo.disco.max_length at least the generation cap is kept; a smaller one is
    refused before anything starts, naming --algo.disco.lam as the knob for shorter answers."""
    out = launch(DRPO + ["--rollout.max_new_tokens", "512", "--algo.disco.max_length", "4096"])
    assert settings_from_args(out.args).max_length == 4096
    assert settings_from_args(launch(
        DRPO + ["--rollout.max_new_tokens", "512", "--algo.disco.max_length", "512"]
    ).args).max_length == 512
    with pytest.raises(SystemExit) as exit_info:
        launch(DRPO + ["--rollout.max_new_tokens", "512", "--algo.disco.max_length", "500"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: --algo.disco.max_length=500 is smaller than the longest response the " \
        "rollout can produce (512" in err, err
    assert "--algo.disco.lam" in err, err
    with pytest.raises(ValueError, match="neither --rollout.max_new_tokens nor --data.max_len"):
        settings_from_args(SimpleNamespace(algo=SimpleNamespace(disco=SimpleNamespace(
            objective="drpo"))))


def _replace(argv: list[str], flag: str, value: str | None) -> list[str]:
    argv = list(argv)
    if flag in argv:
        i = argv.index(flag)
        del argv[i:i + 2]
    return argv + ([flag] if value is None else [flag, value])


MICRO_BATCH = ["--algo.disco.weights", "micro_batch"]


@pytest.mark.parametrize("flag,value,extra", [
    ("--rollout.n_samples_per_prompt", "1", []),
    ("--train.batch_size", "24", []),            # not a multiple of micro 8 x 2 GPUs
    ("--train.batch_size", "64", []),            # does not divide 8 x 4 = 32 samples per rollout
    ("--rollout.micro_batch_size", "3", []),     # ranks would get unequal shares
    ("--ds.ring_attn_size", "2", []),
    ("--algo.kl.init_coef", "0.01", []),
    ("--actor.policy_loss_type", "gspo", []),
    # the vLLM importance-sampling switch changed between releases: 0.11.1+ / 0.11.0
    ("--algo.advantage.is_correction_level", "token", [])
    if "--algo.advantage.is_correction_level" in OPENRLHF_CLI_SOURCE
    else ("--algo.advantage.is_correction_enable", None, []),
    # whole questions per micro-batch only
    ("--train.micro_batch_size", "6", MICRO_BATCH),  # not a multiple of n=4
    ("--train.dynamic_batch_enable", None, MICRO_BATCH),
])
def test_bad_layouts_are_rejected_naming_the_flag(launch, capsys, flag, value, extra):
    argv = _replace(DISCO + extra, flag, value)
    if flag == "--rollout.n_samples_per_prompt":
        argv = _replace(argv, "--train.micro_batch_size", "8")
    with pytest.raises(SystemExit) as exit_info:
        launch(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {flag}:" in err  # ours, not argparse's
    if extra:
        assert "--algo.disco.weights" in err  # says which mode needs the rule


@pytest.mark.parametrize("changes", [
    {"--train.micro_batch_size": "1"},
    {"--train.micro_batch_size": "2"},
    {"--train.micro_batch_size": "6", "--train.batch_size": "24", "--rollout.batch_size": "12"},
    {"--train.dynamic_batch_enable": None, "--vllm.num_engines": "1"},  # (packing needs vLLM)
    {"--rollout.batch_size": "5", "--rollout.micro_batch_size": "2", "--train.batch_size": "10",
     "--train.micro_batch_size": "1"},  # 10 samples per rank: a question on both ranks
])
@pytest.mark.parametrize("weights", [None, "current", "sampling"])
def test_planned_weights_take_any_micro_batch_layout(launch, changes, weights):
    """The layouts that only micro_batch refuses: any micro-batch size, dynamic batching,
    questions split across ranks. The default weights are ``current``."""
    argv = DISCO + ([] if weights is None else ["--algo.disco.weights", weights])
    for flag, value in changes.items():
        argv = _replace(argv, flag, value)
    settings = settings_from_args(launch(argv).args)
    assert settings.weights == (weights or "current") and settings.planned
    with pytest.raises(SystemExit):
        launch(argv + MICRO_BATCH)


def test_disco_options_need_the_disco_estimator(launch, capsys):
    with pytest.raises(SystemExit):
        launch(BASE + ["--algo.advantage.estimator", "group_norm", "--algo.disco.tau", "3"])
    assert "requires --algo.advantage.estimator disco" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [
    ["--algo.advantage.estimator", "group_norm"],
    ["--algo.advantage.estimator", "reinforce", "--rollout.n_samples_per_prompt", "1",
     "--train.micro_batch_size", "3"],  # layouts DisCO would reject are fine for others
])
def test_non_disco_runs_are_untouched(launch, extra):
    import argparse as argparse_module

    import ray

    parse = argparse_module.ArgumentParser.parse_args
    plain = launch(BASE + extra, wrapper=False)
    wrapped = launch(BASE + extra)
    assert wrapped.args == plain.args
    assert wrapped.inits == plain.inits
    assert "worker_process_setup_hook" not in wrapped.inits[0]["runtime_env"]
    assert not hasattr(wrapped.args.algo, "disco")
    assert argparse_module.ArgumentParser.parse_args is parse  # restored
    assert ray.init.__name__ == "<lambda>"  # the test's recorder, not the launcher's wrapper


def _readme_command() -> list[str]:
    text = (ADAPTER.parents[1] / "docs" / "guides" / "openrlhf.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    joined = block.replace("\\\n", " ")
    launcher = "discoloss.adapters.openrlhf.train_ppo_ray"
    (line,) = [ln for ln in joined.splitlines() if launcher in ln]
    tokens = shlex.split(line)
    return tokens[tokens.index("discoloss.adapters.openrlhf.train_ppo_ray") + 1:]


def test_readme_command(launch):
    argv = _readme_command()
    out = launch(argv)
    assert out.args.algo.advantage.estimator == "disco"
    assert settings_from_args(out.args).loss_kwargs() == dict(
        score="log_likelihood", objective="disco", tau=10.0, delta=1e-4, beta=1e3,
        kl_estimator="k1", threshold=0.5, normalize="all", constraint="squared_hinge",
        cvar_alpha=0.5, margin=1.0, clip_eps=0.2, lam=0.1, max_length=None)
    assert out.args.rollout.n_samples_per_prompt == 8 and out.args.train.batch_size == 256


EXAMPLES = sorted(p.name for p in (ADAPTER / "examples").glob("disco*.sh"))


def test_examples_cover_the_paper_grid():
    assert EXAMPLES == sorted(f"{obj}_{size}_{score}.sh" for obj in ("disco", "disco_b")
                              for size in ("1.5b", "7b") for score in ("logl", "lratio"))


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_scripts_parse(launch, script, tmp_path):
    """Each example's command line (captured by running the script with a stand-in
    interpreter) is accepted by the launcher with the settings its name promises."""
    shim = tmp_path / "python"
    out_file = tmp_path / "argv"
    shim.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > {shlex.quote(str(out_file))}\n")
    shim.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    subprocess.run(["bash", str(ADAPTER / "examples" / script)], env={**env, "PYTHON": str(shim)},
                   check=True)
    argv = out_file.read_bytes().decode().split("\0")[:-1]
    assert argv[:2] == ["-m", "discoloss.adapters.openrlhf.train_ppo_ray"]
    args = launch(argv[2:]).args
    settings = settings_from_args(args)
    assert settings.objective == ("disco_b" if script.startswith("disco_b") else "disco")
    assert settings.score == ("likelihood_ratio" if "lratio" in script else "log_likelihood")
    assert settings.tau == (1.0 if "lratio" in script else 10.0)
    assert (settings.delta, settings.beta) == (1e-4, 1e3)
    assert args.actor.adam.lr == (2e-6 if "1.5b" in script else 1e-6)
    assert "1.5B" in args.actor.model_name_or_path or "7B" in args.actor.model_name_or_path
    assert (args.rollout.batch_size, args.rollout.n_samples_per_prompt, args.train.batch_size) \
        == (128, 8, 256)
    assert args.rollout.temperature == 0.6 and args.algo.kl.init_coef == 0
    # GRPO-like micro-batches with the default (exact) weights
    assert settings.weights == "current"
    assert args.train.micro_batch_size == (1 if "7b" in script else 2)


def test_dry_run_prints_the_resolved_options(launch, capsys, monkeypatch):
    monkeypatch.setenv("DISCOLOSS_DRY_RUN", "1")
    with pytest.raises(SystemExit) as exit_info:
        launch(DISCO + ["--algo.disco.score", "likelihood_ratio"])
    assert exit_info.value.code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["disco"]["score"] == "likelihood_ratio" and printed["disco"]["tau"] is None
    assert printed["disco"]["lagrangian_lr"] == 1e3
    assert printed["disco"]["weights"] == "current"


def test_job_level_hook_is_left_to_ray(monkeypatch):
    """Under ``ray job submit`` with the hook already in the job's runtime env, the launcher
    must not add it again (Ray refuses to merge the same key twice); another hook is an error."""
    from discoloss.adapters.openrlhf.hook import with_setup_hook

    job = {"runtime_env": {"worker_process_setup_hook": HOOK, "env_vars": {"A": "1"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    env = with_setup_hook({"env_vars": {"B": "2"}})
    assert "worker_process_setup_hook" not in env

    from ray.runtime_env.runtime_env import _merge_runtime_env

    merged = _merge_runtime_env(job["runtime_env"], env)
    assert merged is not None and merged["worker_process_setup_hook"] == HOOK

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"worker_process_setup_hook": "mine.setup"}}))
    with pytest.raises(ValueError, match="worker_process_setup_hook"):
        with_setup_hook(None)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert with_setup_hook(None) == {"worker_process_setup_hook": HOOK}


def test_example_reward_function():
    import importlib.util

    path = ADAPTER / "examples" / "math_reward.py"
    spec = importlib.util.spec_from_file_location("math_reward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    prompts = ["Q: 1+1?", "Q: 1+1?", "Q: 1+1?", "Q: frac?"]
    queries = [prompts[0] + " so \\boxed{2}.", prompts[1] + " \\boxed{3}", prompts[2] + " 2",
               prompts[3] + " \\boxed{\\frac{1}{2}}"]
    out = module.reward_func(queries, prompts, ["2", "2", "2", "\\frac{1}{2}"])
    assert out["rewards"].tolist() == [1.0, 0.0, 0.0, 1.0]
