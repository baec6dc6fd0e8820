"""`DisCOConfig`: a TRL `GRPOConfig` carrying the options of :func:`discoloss.disco_loss`.

Names and defaults are those of ``disco_loss``, except where ``GRPOConfig`` already owns the
name with another meaning:

==================  ==================  ============================================================
DisCO option        DisCOConfig field   why
==================  ==================  ============================================================
``score``           ``score``
``objective``       ``objective``
``tau``             ``tau``
``delta``           ``disco_delta``     ``GRPOConfig.delta`` is the two-sided clipping bound of GRPO
``beta``            ``disco_beta``      ``GRPOConfig.beta`` is the KL-to-reference coefficient
``kl_estimator``    ``kl_estimator``
``threshold``       ``threshold``
``normalize``       ``normalize``
``lam``             ``lam``
``max_length``      ``max_length``      None with ``objective="drpo"``: ``max_completion_length``
==================  ==================  ============================================================

``GRPOConfig.beta`` (reference-model KL) must stay 0 unless ``allow_reference_kl=True``: a
non-zero value is almost always a DisCO ``beta`` put in the wrong field. The options that only
shape GRPO's clipped surrogate (``loss_type``, ``epsilon``, ``epsilon_high``, ``delta``, ...)
must keep their defaults, since the DisCO loss would silently ignore them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from trl import GRPOConfig

from discoloss._checks import check_number
from discoloss.options import DiscoOptions

__all__ = ["DEFAULT_WEIGHTS", "GRPO_ONLY_OPTIONS", "DisCOConfig", "WeightsSource"]

#: Where the per-completion weights of an optimizer step come from (``DisCOConfig.weights``).
WeightsSource = Literal["current", "sampling", "micro_batch"]

#: The default of ``DisCOConfig.weights`` (see the TRL guide for the measurements behind it).
DEFAULT_WEIGHTS: WeightsSource = "current"

#: GRPOConfig fields that only act on GRPO's loss or rewards and that DisCO cannot honour: each
#: must keep its GRPOConfig default. Value: why.
GRPO_ONLY_OPTIONS: dict[str, str] = {
    "loss_type": "it selects GRPO's token aggregation; DisCOTrainer replaces the whole loss",
    "epsilon": "it is GRPO's ratio clipping bound; DisCO's scores are not clipped",
    "epsilon_high": "it is GRPO's upper ratio clipping bound; DisCO's scores are not clipped",
    "delta": "it is GRPO's two-sided clipping bound; the DisCO KL radius is `disco_delta`",
    "importance_sampling_level": "DisCO defines its own sequence scores (see `score`)",
    "off_policy_mask_threshold": "off-policy sequence masking is a GRPO surrogate option",
    "top_entropy_quantile": "DisCO scores every completion token",
    "entropy_coef": "DisCO has no entropy bonus (the paper's setting)",
    "use_adaptive_entropy": "DisCO has no entropy bonus (the paper's setting)",
    "multi_objective_aggregation": (
        "DisCO labels a completion positive iff its weighted reward sum exceeds `threshold`; "
        "'normalize_then_sum' would threshold normalised rewards"
    ),
    "mask_truncated_completions": (
        "it empties the mask of truncated completions, and DisCO scores are token means over "
        "a non-empty completion"
    ),
}

_GRPO_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(GRPOConfig) if f.name in GRPO_ONLY_OPTIONS
}


@dataclass
class DisCOConfig(GRPOConfig):
    r"""Configuration of :class:`~discoloss.adapters.trl.DisCOTrainer`: every ``GRPOConfig``
    field, plus the DisCO options below.

    DisCO (arXiv 2505.12366) maximises a per-prompt discriminative objective under a KL
    constraint, with a squared-hinge penalty:

    .. math::

        \mathcal{L} = -\frac{1}{G}\sum_q J_q
            + \frac{\beta}{2}\big[\widehat{KL}(\pi_{old}\,\|\,\pi_\theta) - \delta\big]_+^2

    Same names and defaults as :func:`discoloss.disco_loss`, except the two prefixed ones.

    Parameters:
      score: ``"log_likelihood"`` (mean token log-prob) or ``"likelihood_ratio"`` (mean token
        ``pi_theta / pi_old``).
      objective: ``"disco"`` (log-mean-exp over a prompt's negatives), ``"disco_b"`` (mean) or
        ``"drpo"`` (DRPO, arXiv 2510.04474: DisCO with each prompt's correct completions
        weighted by the softmax of the length preference ``1 - |o|/max_length`` at temperature
        ``lam``, favouring the short ones).
      tau: DRO temperature; None gives 10 (log_likelihood) or 1 (likelihood_ratio).
      disco_delta: KL constraint radius delta (``disco_loss``'s ``delta``).
      disco_beta: squared-hinge penalty strength beta (``disco_loss``'s ``beta``).
      kl_estimator: ``"k1"`` (log pi_old - log pi_theta) or ``"k3"``.
      threshold: a completion is positive iff its (weighted, summed) reward > threshold.
      normalize: ``"all"`` (divide by all prompts) or ``"valid"`` (by prompts with signal).
      constraint: ``"squared_hinge"`` (DisCO), ``"hinge"``, ``"kl_penalty"``, ``"lagrangian"``
        (a multiplier updated by dual ascent after every optimizer step with the step's KL,
        step size ``lagrangian_lr``, saved in checkpoints) or ``"none"``.
      cvar_alpha, margin, clip_eps: parameters of the ablation objectives / score (see the
        table of ablation variants in the discoloss documentation).
      lam: ``objective="drpo"``: temperature lambda > 0 of the softmax over a prompt's correct
        completions (smaller: more weight on the shortest).
      max_length: ``objective="drpo"``: length scale of the preference ``1 - |o|/max_length``,
        in tokens; None: ``max_completion_length``, the longest completion TRL generates. A
        value below ``max_completion_length`` is refused (only ``lam * max_length`` matters:
        lower ``lam`` for a stronger preference).
      allow_reference_kl: allow ``beta`` (GRPOConfig's KL-to-reference coefficient) to be
        non-zero; its term is then added to the DisCO loss as in GRPO.
      weights: where the per-completion weights ``dJ/ds_i`` (and the penalty's slope) of an
        optimizer step come from. The mini-batch they are planned over is the whole
        generation batch (whole prompts, all processes). ``"current"`` (default): per-completion
        statistics at the step's current parameters, from one no-grad forward pass over the
        generation batch (skipped at the first optimizer step of a generation batch, where the
        sampling log-probs already are the current ones); the applied gradient is exactly that
        of ``disco_loss`` on the generation batch at the current parameters, squared hinge
        included. ``"sampling"``: statistics at the sampling policy, no extra pass; exact for
        ``objective="disco_b"`` and at the first optimizer step of a generation batch, a
        linearisation afterwards, with a per-micro-batch approximation of the penalty.
        ``"micro_batch"`` (whole prompts per micro-batch) is refused: TRL shuffles completions
        across micro-batches.

    Raises ``ValueError`` at construction for fewer than 2 generations per prompt, a non-zero
    ``beta`` without ``allow_reference_kl``, ``steps_per_generation`` not a multiple of
    ``gradient_accumulation_steps``, a changed GRPO-only option, vLLM importance-sampling
    correction, ``weights`` other than ``"current"`` or ``"sampling"``, ``objective="drpo"``
    without a length scale (``max_length`` and ``max_completion_length`` both None) or with
    ``max_length < max_completion_length``, or an invalid DisCO option.
    """

    score: Literal["log_likelihood", "likelihood_ratio", "clipped_ratio"] = field(
        default="log_likelihood",
        metadata={
            "help": "Sequence score: 'log_likelihood', 'likelihood_ratio' or the ablation "
            "'clipped_ratio'."
        },
    )
    objective: Literal[
        "disco", "disco_b", "drpo", "cvar", "disco_2way", "auc_sq_hinge", "auc_logistic"
    ] = field(
        default="disco",
        metadata={
            "help": "'disco' (log-mean-exp over negatives), 'disco_b' (mean), 'drpo' (DRPO: "
            "correct completions weighted towards the short ones, see `lam` and `max_length`), "
            "or an ablation: 'cvar', 'disco_2way', 'auc_sq_hinge', 'auc_logistic'."
        },
    )
    tau: float | None = field(
        default=None,
        metadata={"help": "DRO temperature; None: 10 (log_likelihood) or 1 (likelihood_ratio)."},
    )
    disco_delta: float = field(
        default=1e-4,
        metadata={"help": "DisCO KL constraint radius (disco_loss's `delta`)."},
    )
    disco_beta: float = field(
        default=1e3,
        metadata={"help": "DisCO squared-hinge penalty strength (disco_loss's `beta`)."},
    )
    kl_estimator: Literal["k1", "k3"] = field(
        default="k1",
        metadata={"help": "KL estimator of the constraint: 'k1' or 'k3'."},
    )
    threshold: float = field(
        default=0.5,
        metadata={"help": "A completion is positive iff its reward > threshold."},
    )
    normalize: Literal["all", "valid"] = field(
        default="all",
        metadata={"help": "Divide by all prompts ('all') or by prompts with signal ('valid')."},
    )
    constraint: Literal["squared_hinge", "hinge", "kl_penalty", "lagrangian", "none"] = field(
        default="squared_hinge",
        metadata={
            "help": "How the KL constraint is enforced: 'squared_hinge' (DisCO), 'hinge', "
            "'kl_penalty', 'lagrangian' (multiplier by dual ascent, step `lagrangian_lr`) "
            "or 'none'."
        },
    )
    lagrangian_lr: float = field(
        default=1e3,
        metadata={"help": "Dual step size of constraint='lagrangian'."},
    )
    cvar_alpha: float = field(
        default=0.5,
        metadata={"help": "Fraction of hardest negatives of objective='cvar', in (0, 1]."},
    )
    margin: float = field(
        default=1.0,
        metadata={"help": "Margin of objective='auc_sq_hinge'."},
    )
    clip_eps: float = field(
        default=0.2,
        metadata={"help": "Clip range of score='clipped_ratio', in (0, 1)."},
    )
    lam: float = field(
        default=0.1,
        metadata={
            "help": "Temperature of objective='drpo''s softmax over a prompt's correct "
            "completions, > 0 (smaller: more weight on the shortest)."
        },
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Length scale of objective='drpo''s preference 1 - |o|/max_length, in "
            "tokens, at least `max_completion_length`; None: `max_completion_length`."
        },
    )
    allow_reference_kl: bool = field(
        default=False,
        metadata={"help": "Allow a non-zero `beta` (GRPO's KL-to-reference coefficient)."},
    )
    weights: WeightsSource = field(
        default=DEFAULT_WEIGHTS,
        metadata={
            "help": "Where the per-completion weights of an optimizer step come from: 'current' "
            "(stats at the current parameters, one no-grad forward pass per optimizer step "
            "after the first of a generation batch; exact) or 'sampling' (stats at the sampling "
            "policy, no extra pass; exact for disco_b and at the first optimizer step of a "
            "generation batch). 'micro_batch' is not supported in TRL."
        },
    )

    def __post_init__(self) -> None:
        # Before GRPOConfig's own checks, so that the DisCO reason is the one reported.
        if self.num_generations is None or self.num_generations < 2:
            raise ValueError(
                f"num_generations={self.num_generations}: DisCO compares the completions of a "
                "prompt with each other (positives against negatives), so it needs at least 2 "
                "generations per prompt"
            )
        super().__post_init__()
        self._check_disco_options()
        if not isinstance(self.allow_reference_kl, bool):  # a string would read as True
            raise TypeError(
                f"allow_reference_kl must be a bool, got {type(self.allow_reference_kl).__name__} "
                f"{self.allow_reference_kl!r}"
            )
        if self.beta != 0.0 and not self.allow_reference_kl:
            raise ValueError(
                f"beta={self.beta}: in GRPOConfig `beta` is the KL-to-reference coefficient, not "
                "DisCO's penalty strength. Set the DisCO penalty with `disco_beta` (and its radius "
                "with `disco_delta`) and leave `beta=0.0`; to add a reference-model KL term on top "
                "of DisCO anyway, pass allow_reference_kl=True"
            )
        for name, why in GRPO_ONLY_OPTIONS.items():
            value, default = getattr(self, name), _GRPO_DEFAULTS[name]
            if value != default:
                raise ValueError(
                    f"{name}={value!r} is not supported by DisCOTrainer ({why}); leave it at its "
                    f"default {default!r}"
                )
        if self.use_vllm and self.vllm_importance_sampling_correction:
            raise ValueError(
                "use_vllm=True with vllm_importance_sampling_correction=True is not supported: "
                "DisCO's scores and KL are taken against the trainer's own log-probs at sampling "
                "time, and the vLLM importance-sampling ratio would be silently ignored. Set "
                "vllm_importance_sampling_correction=False"
            )
        if self.steps_per_generation % self.gradient_accumulation_steps != 0:
            raise ValueError(
                f"steps_per_generation={self.steps_per_generation} must be a multiple of "
                f"gradient_accumulation_steps={self.gradient_accumulation_steps}: DisCO plans "
                "its weights over a whole generation batch, so an optimizer step must not mix "
                "completions of two generation batches"
            )

    def disco_options(self) -> DiscoOptions:
        """The validated :class:`discoloss.DiscoOptions` of this config."""
        return DiscoOptions(
            score=self.score,
            objective=self.objective,
            tau=self.tau,
            delta=self.disco_delta,
            beta=self.disco_beta,
            kl_estimator=self.kl_estimator,
            threshold=self.threshold,
            normalize=self.normalize,
            constraint=self.constraint,
            cvar_alpha=self.cvar_alpha,
            margin=self.margin,
            clip_eps=self.clip_eps,
            lam=self.lam,
            max_length=self.drpo_max_length,
        )

    @property
    def drpo_max_length(self) -> int | None:
        """Length scale of DRPO's preference as the loss uses it, in tokens (``max_length``,
        else, with ``objective="drpo"``, ``max_completion_length``)."""
        if self.max_length is not None or self.objective != "drpo":
            return self.max_length
        return self.max_completion_length

    def _check_drpo_max_length(self) -> None:
        if self.objective != "drpo":
            return
        cap = self.max_completion_length
        if self.drpo_max_length is None:
            raise ValueError(
                "objective='drpo' needs the length scale of its preference 1 - |o|/max_length "
                "(the longest completion, in tokens): max_length and max_completion_length are "
                "both None; set one of them"
            )
        if cap is not None and self.drpo_max_length < cap:
            raise ValueError(
                f"max_length={self.max_length} is smaller than max_completion_length={cap}, the "
                "longest completion TRL generates: DRPO's preference 1 - |o|/max_length is meant "
                "to lie in [0, 1) for every completion. For a stronger preference for short "
                "completions lower `lam` (only lam * max_length matters); leave max_length=None "
                "to use max_completion_length"
            )

    def _check_disco_options(self) -> None:
        try:
            self.disco_options()
        except (TypeError, ValueError) as err:  # name the DisCOConfig field, not the core's
            message = str(err)
            for core, field_name in (("delta", "disco_delta"), ("beta", "disco_beta")):
                if message.startswith(core + " ") or message.startswith(core + "="):
                    message = field_name + message[len(core) :]
            raise type(err)(message) from None
        check_number("lagrangian_lr", self.lagrangian_lr, positive=True)
        self._check_drpo_max_length()
        if self.weights == "micro_batch":
            raise ValueError(
                "weights='micro_batch' is not supported by DisCOTrainer: it plans each "
                "micro-batch on its own and needs every completion of a prompt in the same "
                "micro-batch, but TRL shuffles each process's generation batch before splitting "
                "it into micro-batches (and a prompt's completions may sit on several "
                "processes), so no micro-batch holds whole prompts. Use weights='current' "
                "(exact at every optimizer step) or weights='sampling' (no extra forward pass)"
            )
        if self.weights not in ("current", "sampling"):
            raise ValueError(
                f"weights={self.weights!r} is not a valid option; expected 'current' or "
                "'sampling' ('micro_batch' is not supported by DisCOTrainer)"
            )
