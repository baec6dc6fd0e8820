"""DisCO options for OpenRLHF: the ``--algo.disco.*`` flags and the layout checks.

Everything here works on plain values (argparse namespaces, ``SimpleNamespace`` trees); nothing
imports OpenRLHF, so the checks also run in the driver before any Ray actor starts.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from typing import Any, get_args

from discoloss._types import KLEstimator, Normalize, Objective, Score

__all__ = [
    "ESTIMATOR",
    "DiscoSettings",
    "LayoutError",
    "add_disco_arguments",
    "check_layout",
    "settings_from_args",
]

#: Value of ``--algo.advantage.estimator`` that selects DisCO.
ESTIMATOR = "disco"

#: Prefix of the DisCO flags (``--algo.disco.tau`` ...); the parsed values land in ``args.algo.disco``.
PREFIX = "algo.disco."


@dataclass(frozen=True)
class DiscoSettings:
    """The options of :func:`discoloss.disco_loss`, with its names and defaults.

    ``tau=None`` resolves to 10 for ``log_likelihood`` and 1 for ``likelihood_ratio``.
    """

    score: Score = "log_likelihood"
    objective: Objective = "disco"
    tau: float | None = None
    delta: float = 1e-4
    beta: float = 1e3
    kl_estimator: KLEstimator = "k1"
    threshold: float = 0.5
    normalize: Normalize = "all"

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`discoloss.disco_loss`."""
        return asdict(self)


_CHOICES: dict[str, tuple[str, ...]] = {
    "score": get_args(Score),
    "objective": get_args(Objective),
    "kl_estimator": get_args(KLEstimator),
    "normalize": get_args(Normalize),
}

_HELP: dict[str, str] = {
    "score": "sequence score: length-normalised log-likelihood or likelihood ratio",
    "objective": "disco (log-mean-exp over a question's negatives) or disco_b (plain mean)",
    "tau": "DRO temperature of the disco objective, > 0 (default: 10 for log_likelihood, "
    "1 for likelihood_ratio)",
    "delta": "KL constraint radius, >= 0",
    "beta": "squared-hinge penalty strength, >= 0",
    "kl_estimator": "token KL(pi_old || pi_theta) estimator: k1 = log pi_old - log pi_theta, "
    "k3 = rho - 1 - log rho",
    "threshold": "a response is positive iff its reward > threshold",
    "normalize": "divide the objective by all questions of the mini-batch (all, as published) "
    "or by those with both a positive and a negative (valid)",
}


def _number(name: str, *, positive: bool = False, non_negative: bool = False) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be finite, got {text!r}")
        if positive and not value > 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text!r}")
        if non_negative and not value >= 0:
            raise argparse.ArgumentTypeError(f"{name} must be >= 0, got {text!r}")
        return value

    parse.__name__ = name
    return parse


def add_disco_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """Add the ``--algo.disco.*`` flags to ``parser``; return their ``dest`` names.

    The flags default to ``argparse.SUPPRESS`` so that a namespace only holds the ones given on
    the command line; :func:`settings_from_args` fills in the defaults.
    """
    defaults = DiscoSettings()
    group = parser.add_argument_group(
        "DisCO (discoloss)",
        "Active with --algo.advantage.estimator disco. Same names and defaults as "
        "discoloss.disco_loss.",
    )
    dests = []
    for name in ("score", "objective", "tau", "delta", "beta", "kl_estimator", "threshold",
                 "normalize"):
        dest = PREFIX + name
        default = getattr(defaults, name)
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS,
                                  "help": f"{_HELP[name]} (default: {default})"}
        if name in _CHOICES:
            kwargs.update(type=str, choices=_CHOICES[name])
        elif name == "tau":
            kwargs.update(type=_number("tau", positive=True))
        elif name in ("delta", "beta"):
            kwargs.update(type=_number(name, non_negative=True))
        else:
            kwargs.update(type=_number(name))
        group.add_argument("--" + dest, **kwargs)
        dests.append(dest)
    return dests


def settings_from_args(args: Any) -> DiscoSettings:
    """Read the DisCO options from OpenRLHF's (hierarchical) args; missing ones take defaults."""
    disco = getattr(getattr(args, "algo", None), "disco", None)
    values = {} if disco is None else {k: v for k, v in vars(disco).items() if v is not None}
    known = set(DiscoSettings.__dataclass_fields__)
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown DisCO options in args.algo.disco: {sorted(unknown)}")
    settings = DiscoSettings(**values)
    for name, choices in _CHOICES.items():
        if getattr(settings, name) not in choices:
            raise ValueError(f"--algo.disco.{name}={getattr(settings, name)!r}: expected one of "
                             f"{', '.join(choices)}")
    return settings


class LayoutError(ValueError):
    """A training layout that cannot keep every question's responses together."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def _get(args: Any, dotted: str, default: Any = None) -> Any:
    """Read ``a.b.c`` from a flat argparse namespace (dest ``"a.b.c"``) or a nested one."""
    if hasattr(args, dotted):
        return getattr(args, dotted)
    node = args
    for part in dotted.split("."):
        if not hasattr(node, part):
            return default
        node = getattr(node, part)
    return node


def check_layout(args: Any) -> None:
    """Raise :class:`LayoutError` (naming the flag) for settings DisCO cannot train with.

    DisCO needs every question's n responses in one actor micro-batch. With OpenRLHF's layout
    (a rollout of ``rollout.batch_size * n`` samples, prompt-major; contiguous chunks of
    ``rollout.micro_batch_size`` samples dealt to the DP ranks in order; ``train.batch_size``
    samples per optimizer step, ``train.micro_batch_size`` per micro-batch and rank) that holds when
    every count below is a multiple of n and every step is full.
    """
    n = int(_get(args, "rollout.n_samples_per_prompt", 1))
    rollout_batch = int(_get(args, "rollout.batch_size"))
    rollout_micro = int(_get(args, "rollout.micro_batch_size", 1))
    train_batch = int(_get(args, "train.batch_size"))
    train_micro = int(_get(args, "train.micro_batch_size", 1))
    ring = int(_get(args, "ds.ring_attn_size", 1) or 1)
    tp = int(_get(args, "ds.tensor_parallel_size", 1) or 1)
    world = int(_get(args, "actor.num_nodes", 1)) * int(_get(args, "actor.num_gpus_per_node", 1))

    if n < 2:
        raise LayoutError("--rollout.n_samples_per_prompt",
                          f"DisCO compares the responses of a question: needs >= 2, got {n}")
    if _get(args, "train.dynamic_batch_enable", False):
        raise LayoutError("--train.dynamic_batch_enable",
                          "dynamic batching re-partitions samples by length and splits questions "
                          "across micro-batches; not supported with DisCO")
    if ring > 1:
        raise LayoutError("--ds.ring_attn_size", f"ring attention is not supported with DisCO "
                          f"yet (got {ring})")
    if tp > 1:
        raise LayoutError("--ds.tensor_parallel_size", f"DeepSpeed tensor parallelism is not "
                          f"supported with DisCO yet (got {tp})")
    if train_micro % n:
        raise LayoutError("--train.micro_batch_size",
                          f"must be a multiple of --rollout.n_samples_per_prompt={n} so that every "
                          f"micro-batch holds whole questions (got {train_micro})")
    dp = world
    if train_batch % (train_micro * dp):
        raise LayoutError("--train.batch_size",
                          f"must be a multiple of --train.micro_batch_size x data-parallel ranks "
                          f"= {train_micro} x {dp} (got {train_batch})")
    samples = rollout_batch * n
    if samples % train_batch:
        raise LayoutError("--train.batch_size",
                          f"must divide --rollout.batch_size x --rollout.n_samples_per_prompt = "
                          f"{samples} so that every optimizer step is full (got {train_batch})")
    if samples % (rollout_micro * dp) or (samples // dp) % n:
        raise LayoutError("--rollout.micro_batch_size",
                          f"OpenRLHF deals contiguous chunks of --rollout.micro_batch_size samples "
                          f"to the {dp} actor ranks: {samples} samples must split into equal "
                          f"per-rank shares of whole questions (got {rollout_micro})")

    kl_coef = float(_get(args, "algo.kl.init_coef", 0.0) or 0.0)
    if kl_coef > 0 and not _get(args, "algo.kl.use_loss", False):
        raise LayoutError("--algo.kl.init_coef",
                          f"a reference-KL reward shaping ({kl_coef}) does not apply to DisCO, which "
                          "labels whole responses by their reward: pass --algo.kl.init_coef 0 (no "
                          "reference model, as published) or add --algo.kl.use_loss to add "
                          "OpenRLHF's reference-KL loss term")
    if _get(args, "actor.policy_loss_type", "ppo") != "ppo":
        raise LayoutError("--actor.policy_loss_type",
                          "DisCO replaces the policy loss; leave it at its default 'ppo'")
    level = _get(args, "algo.advantage.is_correction_level", "off")  # 0.11.1+
    enabled = _get(args, "algo.advantage.is_correction_enable", False)  # 0.11.0
    if (level not in (None, "off")) or enabled:
        flag = ("--algo.advantage.is_correction_enable" if enabled
                else "--algo.advantage.is_correction_level")
        raise LayoutError(flag, "DisCO uses the actor's own old log-probs; the vLLM "
                          "importance-sampling correction is not supported with DisCO")

