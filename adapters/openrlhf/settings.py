"""DisCO options for OpenRLHF: the ``--algo.disco.*`` flags and the layout checks.

Everything here works on plain values (argparse namespaces, ``SimpleNamespace`` trees); nothing
imports OpenRLHF, so the checks also run in the driver before any Ray actor starts.

The DisCO options are those of :func:`discoloss.disco_loss` and are validated by the core's
:class:`discoloss.options.DiscoOptions` (same names, defaults, ranges and messages); the adapter
only names the flag, ``--algo.disco.<name>``, in every message. One option is the adapter's
own: ``--algo.disco.lagrangian_lr``, the dual step size of the Lagrange multiplier that
``--algo.disco.constraint lagrangian`` keeps per actor process (see :mod:`.patch`), and
``--algo.disco.weights``, where the per-response weights of a mini-batch come from (see
:mod:`.minibatch`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Literal, get_args

from discoloss._checks import check_number, check_option
from discoloss._types import CONSTRAINTS, KL_ESTIMATORS, NORMALIZES, OBJECTIVES, SCORES
from discoloss.options import DiscoOptions

__all__ = [
    "DEFAULT_WEIGHTS",
    "ESTIMATOR",
    "LOSS_OPTION_NAMES",
    "OPTION_NAMES",
    "DiscoSettings",
    "LayoutError",
    "WEIGHTS",
    "Weights",
    "add_disco_arguments",
    "check_for_openrlhf",
    "check_layout",
    "settings_from_args",
]

#: Value of ``--algo.advantage.estimator`` that selects DisCO.
ESTIMATOR = "disco"

#: Prefix of the DisCO flags (``--algo.disco.tau`` ...); the parsed values land in
#: ``args.algo.disco``.
PREFIX = "algo.disco."

#: The options of :func:`discoloss.disco_loss` (from the core).
LOSS_OPTION_NAMES: tuple[str, ...] = DiscoOptions.names()

#: Where the per-response weights of a mini-batch come from (``--algo.disco.weights``):
#: ``current``: stats at the current parameters (one no-grad forward per mini-batch, except the
#: first of a PPO step), exact at any layout; ``sampling``: stats at the sampling policy (the old
#: log-probs, no extra pass); ``micro_batch``: whole questions per micro-batch, DisCO per
#: micro-batch (the layout rules of the first release).
Weights = Literal["current", "sampling", "micro_batch"]
WEIGHTS: tuple[str, ...] = get_args(Weights)
#: The default of ``--algo.disco.weights``: exact at every mini-batch and any layout.
DEFAULT_WEIGHTS: Weights = "current"


@dataclass(frozen=True)
class DiscoSettings(DiscoOptions):
    """The validated options of :func:`discoloss.disco_loss` (the core's
    :class:`~discoloss.options.DiscoOptions`: score, objective, tau, delta, beta, kl_estimator,
    threshold, normalize, constraint, cvar_alpha, margin, clip_eps), with its names and defaults,
    plus the adapter's ``lagrangian_lr`` and ``weights``.

    ``tau=None`` resolves to 10 for ``log_likelihood`` and 1 otherwise. ``lagrangian_lr`` (> 0)
    is the dual step size eta of :class:`discoloss.constraints.LagrangeMultiplier`, used with
    ``constraint="lagrangian"``: lambda <- max(0, lambda + eta * (KL_W - delta)) once per
    optimizer step, KL_W the step's global KL. ``weights`` (``--algo.disco.weights``) is
    ``current``, ``sampling`` or ``micro_batch``: where the per-response weights of each
    mini-batch come from (see the OpenRLHF guide).
    """

    lagrangian_lr: float = 1e3
    weights: str = DEFAULT_WEIGHTS

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "lagrangian_lr",
                           check_number("lagrangian_lr", self.lagrangian_lr, positive=True))
        check_option("weights", self.weights, WEIGHTS)

    @property
    def planned(self) -> bool:
        """Whether the weights are planned per mini-batch (``current`` or ``sampling``), so that
        micro-batches may hold any part of a question."""
        return self.weights != "micro_batch"

    def loss_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`discoloss.disco_loss` (without ``multiplier``, which
        ``constraint="lagrangian"`` also needs)."""
        return {name: getattr(self, name) for name in LOSS_OPTION_NAMES}


#: The ``--algo.disco.*`` options: those of :func:`discoloss.disco_loss`, ``lagrangian_lr`` and
#: ``weights``.
OPTION_NAMES: tuple[str, ...] = DiscoSettings.names()


#: The string options and their values, from the core's ``Literal`` types (shown by ``--help``).
_CHOICES: dict[str, tuple[str, ...]] = {
    "score": SCORES,
    "objective": OBJECTIVES,
    "kl_estimator": KL_ESTIMATORS,
    "normalize": NORMALIZES,
    "constraint": CONSTRAINTS,
    "weights": WEIGHTS,
}

_HELP: dict[str, str] = {
    "score": "sequence score: length-normalised log-likelihood, likelihood ratio, or the "
    "clipped ratio (clip side by label, range clip_eps)",
    "objective": "disco (log-mean-exp over a question's negatives), disco_b (plain mean) or an "
    "ablation: cvar, disco_2way, auc_sq_hinge, auc_logistic",
    "tau": "temperature of the disco, disco_2way and auc_logistic objectives, > 0 (default: 10 "
    "for log_likelihood, 1 otherwise)",
    "delta": "KL constraint radius, >= 0",
    "beta": "penalty strength of the squared_hinge, hinge and kl_penalty constraints, >= 0",
    "kl_estimator": "token KL(pi_old || pi_theta) estimator: k1 = log pi_old - log pi_theta, "
    "k3 = rho - 1 - log rho",
    "threshold": "a response is positive iff its reward > threshold",
    "normalize": "divide the objective by all questions of the mini-batch (all, as published) "
    "or by those with both a positive and a negative (valid)",
    "constraint": "KL penalty: squared_hinge (DisCO), hinge, kl_penalty (beta KL), lagrangian "
    "(multiplier updated by dual ascent after every optimizer step) or none",
    "cvar_alpha": "objective cvar: fraction of the hardest negatives, in (0, 1]",
    "margin": "objective auc_sq_hinge: pair margin, >= 0",
    "clip_eps": "score clipped_ratio: clip range, in (0, 1)",
    "lagrangian_lr": "constraint lagrangian: dual step size eta of the multiplier, > 0; after "
    "every optimizer step lambda <- max(0, lambda + eta * (KL - delta)) with the step's KL over "
    "all ranks",
    "weights": "where the per-response weights of each mini-batch (optimizer step) come from: "
    "current (one no-grad forward per mini-batch, except the first of a PPO step; exact at any "
    "micro-batch size), sampling (the old log-probs, no extra pass; exact for disco_b and on the "
    "first mini-batch) or micro_batch (whole questions per micro-batch, DisCO per micro-batch)",
}


def add_disco_arguments(parser: argparse.ArgumentParser) -> list[str]:
    """Add the ``--algo.disco.*`` flags to ``parser``; return their ``dest`` names.

    The flags default to ``argparse.SUPPRESS`` so that a namespace only holds the ones given on
    the command line; :func:`settings_from_args` fills in the defaults and validates the values
    (argparse only turns numbers into floats).
    """
    defaults = DiscoSettings()
    group = parser.add_argument_group(
        "DisCO (discoloss)",
        "Active with --algo.advantage.estimator disco. Same names and defaults as "
        "discoloss.disco_loss.",
    )
    dests = []
    for name in OPTION_NAMES:
        dest = PREFIX + name
        default = getattr(defaults, name)
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS,
                                  "help": f"{_HELP[name]} (default: {default})"}
        if name in _CHOICES:
            kwargs.update(type=str, metavar="{" + ",".join(_CHOICES[name]) + "}")
        else:
            kwargs.update(type=float, metavar=name.upper())
        group.add_argument("--" + dest, **kwargs)
        dests.append(dest)
    return dests


def _flag_error(error: ValueError | TypeError) -> ValueError:
    """The core's message, which starts with the option's name, with the flag's name instead."""
    message = str(error)
    for name in sorted(OPTION_NAMES, key=len, reverse=True):
        rest = message[len(name):]
        if message.startswith(name) and not (rest[:1].isalnum() or rest[:1] == "_"):
            return ValueError(f"--{PREFIX}{message}")
    return ValueError(f"--{PREFIX}*: {message}")


def _given(args: Any) -> dict[str, Any]:
    """The DisCO options set in ``args``: a hierarchical namespace (``args.algo.disco.tau``, as
    OpenRLHF's trainers see it) or argparse's flat one (``"algo.disco.tau"``); None = default."""
    flat = {k[len(PREFIX):]: v for k, v in vars(args).items()
            if isinstance(k, str) and k.startswith(PREFIX)} if hasattr(args, "__dict__") else {}
    disco = getattr(getattr(args, "algo", None), "disco", None)
    nested = {} if disco is None else dict(vars(disco))
    return {k: v for k, v in {**nested, **flat}.items() if v is not None}


def check_for_openrlhf(settings: DiscoSettings) -> DiscoSettings:
    """Refuse the options that are valid for :func:`discoloss.disco_loss` but cannot run
    correctly in OpenRLHF's actor (the message names the flag). Every option is supported
    today; the hook is kept for the driver's and the actor's checks."""
    return settings


def settings_from_args(args: Any) -> DiscoSettings:
    """Read and validate the DisCO options from OpenRLHF's args (hierarchical or flat);
    missing ones take :func:`discoloss.disco_loss`'s defaults.

    Raises ValueError naming the ``--algo.disco.<name>`` flag of a bad or unsupported value.
    """
    values = _given(args)
    unknown = sorted(set(values) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"unknown DisCO options in args.algo.disco: {unknown}; expected "
                         f"{', '.join(OPTION_NAMES)}")
    try:
        settings = DiscoSettings(**values)
    except (ValueError, TypeError) as error:
        raise _flag_error(error) from error
    return check_for_openrlhf(settings)


class LayoutError(ValueError):
    """A training layout DisCO cannot train with (the message names the flag)."""

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

    OpenRLHF's layout: a rollout of ``rollout.batch_size * n`` samples, prompt-major; contiguous
    chunks of ``rollout.micro_batch_size`` samples dealt to the DP ranks in order (with
    ``train.dynamic_batch_enable``: length-balanced chunks); ``train.batch_size`` samples per
    optimizer step (mini-batch), ``train.micro_batch_size`` per micro-batch and rank.

    With ``--algo.disco.weights current`` or ``sampling`` (planned weights) a micro-batch may
    hold any part of a question: what remains is that every optimizer step is a full mini-batch
    with the same number of micro-batches on every rank. With ``micro_batch`` every micro-batch
    must hold whole questions: the micro-batch size must be a multiple of n (with the rules
    above, every rank then receives whole questions) and dynamic batching is refused.
    """
    n = int(_get(args, "rollout.n_samples_per_prompt", 1))
    rollout_batch = int(_get(args, "rollout.batch_size"))
    rollout_micro = int(_get(args, "rollout.micro_batch_size", 1))
    train_batch = int(_get(args, "train.batch_size"))
    train_micro = int(_get(args, "train.micro_batch_size", 1))
    ring = int(_get(args, "ds.ring_attn_size", 1) or 1)
    tp = int(_get(args, "ds.tensor_parallel_size", 1) or 1)
    world = int(_get(args, "actor.num_nodes", 1)) * int(_get(args, "actor.num_gpus_per_node", 1))
    dynamic = bool(_get(args, "train.dynamic_batch_enable", False))
    whole_questions = not settings_from_args(args).planned

    if n < 2:
        raise LayoutError("--rollout.n_samples_per_prompt",
                          f"DisCO compares the responses of a question: needs >= 2, got {n}")
    if dynamic and whole_questions:
        raise LayoutError("--train.dynamic_batch_enable",
                          "dynamic batching re-partitions samples by length and splits questions "
                          "across micro-batches; with --algo.disco.weights micro_batch every "
                          "micro-batch must hold whole questions (use --algo.disco.weights "
                          "current or sampling)")
    if ring > 1:
        raise LayoutError("--ds.ring_attn_size", f"ring attention is not supported with DisCO "
                          f"yet (got {ring})")
    if tp > 1:
        raise LayoutError("--ds.tensor_parallel_size", f"DeepSpeed tensor parallelism is not "
                          f"supported with DisCO yet (got {tp})")
    if whole_questions and train_micro % n:
        raise LayoutError("--train.micro_batch_size",
                          f"must be a multiple of --rollout.n_samples_per_prompt={n} so that every "
                          f"micro-batch holds whole questions with --algo.disco.weights "
                          f"micro_batch (got {train_micro}; --algo.disco.weights current or "
                          f"sampling take any micro-batch size)")
    dp = world
    if not dynamic and train_batch % (train_micro * dp):
        raise LayoutError("--train.batch_size",
                          f"must be a multiple of --train.micro_batch_size x data-parallel ranks "
                          f"= {train_micro} x {dp} (got {train_batch})")
    samples = rollout_batch * n
    if samples % train_batch:
        raise LayoutError("--train.batch_size",
                          f"must divide --rollout.batch_size x --rollout.n_samples_per_prompt = "
                          f"{samples} so that every optimizer step is a full mini-batch (got "
                          f"{train_batch})")
    if not dynamic and samples % (rollout_micro * dp):
        raise LayoutError("--rollout.micro_batch_size",
                          f"OpenRLHF deals contiguous chunks of --rollout.micro_batch_size samples "
                          f"to the {dp} actor ranks: {samples} samples must split into equal "
                          f"per-rank shares (got {rollout_micro})")

    kl_coef = float(_get(args, "algo.kl.init_coef", 0.0) or 0.0)
    if kl_coef > 0 and not _get(args, "algo.kl.use_loss", False):
        raise LayoutError("--algo.kl.init_coef",
                          f"a reference-KL reward shaping ({kl_coef}) does not apply to DisCO, "
                          "which labels whole responses by their reward: pass --algo.kl.init_coef "
                          "0 (no reference model, as published) or add --algo.kl.use_loss to add "
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

