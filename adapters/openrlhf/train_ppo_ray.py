"""``python -m discoloss.adapters.openrlhf.train_ppo_ray``: OpenRLHF's PPO launcher with DisCO.

Runs OpenRLHF's own ``openrlhf.cli.train_ppo_ray`` (its parser, checks and ``train``) with three
additions, active only with ``--algo.advantage.estimator disco``:

* the parser accepts ``disco`` as an estimator and the ``--algo.disco.*`` options (shown by
  ``--help``), and rejects bad values (checked by the core's ``DiscoOptions``) and layouts
  DisCO cannot train with (:func:`~.settings.check_layout`), naming the flag, before anything
  starts;
* OpenRLHF's ``ray.init`` gets ``runtime_env["worker_process_setup_hook"]`` so that the adapter
  is installed in every Ray worker (where the trainers run);
* the adapter is installed in the driver too.

Without ``disco`` nothing is changed: same arguments, same ``ray.init`` call, same run.
``--algo.disco.*`` options without ``disco`` are an error.

``DISCOLOSS_DRY_RUN=1`` (with ``disco``) stops after the checks and prints the resolved DisCO
options as JSON: a launch script can be validated without a cluster.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import runpy
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from discoloss.adapters.openrlhf.settings import (
    ESTIMATOR,
    add_disco_arguments,
    check_layout,
    settings_from_args,
)

__all__ = ["OPENRLHF_MODULE", "extended_cli", "main"]

#: The OpenRLHF entry point this launcher runs.
OPENRLHF_MODULE = "openrlhf.cli.train_ppo_ray"

_ESTIMATOR_DEST = "algo.advantage.estimator"


def _find_action(parser: argparse.ArgumentParser, dest: str) -> argparse.Action | None:
    for action in parser._actions:
        if action.dest == dest:
            return action
    return None


def _extend(parser: argparse.ArgumentParser) -> list[str]:
    estimator = _find_action(parser, _ESTIMATOR_DEST)
    if estimator is None:
        raise RuntimeError(f"discoloss: {OPENRLHF_MODULE} has no --{_ESTIMATOR_DEST} option; "
                           "this OpenRLHF version is not supported")
    if estimator.choices is not None and ESTIMATOR not in estimator.choices:
        estimator.choices = [*estimator.choices, ESTIMATOR]
    if estimator.help and ESTIMATOR not in estimator.help:
        estimator.help += "; disco: DisCO (discoloss), see --algo.disco.*"
    return add_disco_arguments(parser)


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace, dests: list[str]) -> bool:
    given = [d for d in dests if hasattr(args, d)]
    if getattr(args, _ESTIMATOR_DEST, None) != ESTIMATOR:
        if given:
            parser.error(f"--{given[0]} requires --{_ESTIMATOR_DEST} {ESTIMATOR}")
        return False
    for dest in dests:
        if not hasattr(args, dest):
            setattr(args, dest, None)  # filled with disco_loss's default by settings_from_args
    try:
        settings_from_args(args)  # the core's checks, messages naming the flag
        check_layout(args)
    except ValueError as err:  # LayoutError included
        parser.error(str(err))
    return True


@contextlib.contextmanager
def extended_cli() -> Iterator[dict[str, Any]]:
    """Within the context, the first ``ArgumentParser.parse_args`` of a parser that has
    ``--algo.advantage.estimator`` (OpenRLHF's) learns the DisCO options; when ``disco`` is
    selected, the adapter is installed and ``ray.init`` adds the worker setup hook.

    Yields a dict that receives ``"disco"`` (bool) once the arguments are parsed.
    """
    import ray

    state: dict[str, Any] = {}
    original_parse = argparse.ArgumentParser.parse_args
    original_init = ray.init

    def parse_args(self: argparse.ArgumentParser, args: Sequence[str] | None = None,
                   namespace: Any = None) -> Any:
        if "disco" in state or _find_action(self, _ESTIMATOR_DEST) is None:
            return original_parse(self, args, namespace)
        dests = _extend(self)
        parsed = original_parse(self, args, namespace)
        state["disco"] = _validate(self, parsed, dests)
        if state["disco"] and os.environ.get("DISCOLOSS_DRY_RUN") == "1":
            print(json.dumps({"disco": settings_from_args(parsed).as_dict()}))
            raise SystemExit(0)
        if state["disco"]:
            from discoloss.adapters.openrlhf.patch import install

            install()
            ray.init = init  # type: ignore[assignment]
        return parsed

    def init(*args: Any, **kwargs: Any) -> Any:
        from discoloss.adapters.openrlhf.hook import with_setup_hook

        kwargs["runtime_env"] = with_setup_hook(kwargs.get("runtime_env"))
        return original_init(*args, **kwargs)

    argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign]
    try:
        yield state
    finally:
        argparse.ArgumentParser.parse_args = original_parse  # type: ignore[method-assign]
        ray.init = original_init


def main(argv: Sequence[str] | None = None) -> None:
    """Run OpenRLHF's ``train_ppo_ray`` with the DisCO options (``argv`` defaults to
    ``sys.argv[1:]``)."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    with extended_cli():
        runpy.run_module(OPENRLHF_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
