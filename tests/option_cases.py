"""Out-of-range values of every DisCO option, shared by the engine suites' option tests.

Each engine (verl's ``policy_loss.*``, OpenRLHF's ``--algo.disco.*``, TRL's ``DisCOConfig``)
must refuse every value below before any worker starts, with the option's own name in the
message. The values are written as a user types them (a Hydra override or a command-line
flag); :func:`as_python` turns them into what a Python caller would pass (TRL).

Written from the documented ranges (``discoloss.disco_loss``'s docstring and the engine
guides), not from the validators: a value missing a check here makes a test fail.
``test_every_option_has_cases`` in each suite keeps the table complete as options are added.
"""

from __future__ import annotations

from typing import Any

#: Options of ``discoloss.disco_loss`` -> values outside their documented range.
CORE: dict[str, tuple[str, ...]] = {
    "score": ("ratio", "Log_Likelihood"),
    "objective": ("grpo", "DisCO"),
    "tau": ("0", "-1", "nan", "inf", "abc"),  # > 0, finite
    "delta": ("-1e-4", "nan", "inf"),  # >= 0, finite
    "beta": ("-1", "nan", "inf"),  # >= 0, finite
    "kl_estimator": ("k2",),
    "threshold": ("nan", "inf", "abc"),  # finite
    "normalize": ("some",),
    "constraint": ("trust_region",),
    "cvar_alpha": ("0", "1.5", "nan"),  # in (0, 1]
    "margin": ("-0.1", "inf"),  # >= 0, finite
    "clip_eps": ("0", "1", "nan"),  # in (0, 1)
    "lam": ("0", "-0.1", "nan", "inf"),  # > 0, finite
    "max_length": ("0", "-8", "1.5", "abc"),  # an int >= 1 (or unset)
}

#: Options every adapter adds to the core's.
ADAPTER: dict[str, tuple[str, ...]] = {
    "weights": ("exact", "Current"),  # current | sampling | micro_batch
    "lagrangian_lr": ("0", "-5", "nan", "inf"),  # > 0, finite
}

#: Every shared option -> its out-of-range values.
BAD_VALUES: dict[str, tuple[str, ...]] = {**CORE, **ADAPTER}


def as_python(text: str) -> Any:
    """The value a Python caller would pass for ``text``: an int, a float, else the string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def cases(names: dict[str, tuple[str, ...]] = BAD_VALUES) -> list[tuple[str, str]]:
    """``(option, value)`` pairs for ``pytest.mark.parametrize``."""
    return [(name, value) for name, values in names.items() for value in values]
