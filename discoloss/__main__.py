"""Command line: ``discoloss demo`` and ``discoloss analyze``.

Subcommands import their (heavier) dependencies only when they run.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: discoloss <command> [options]

commands:
  demo       DisCO vs GRPO-family losses, end to end on CPU (needs the [demo] extra)
  analyze    difficulty-bias report of a rollout dump (needs the [analysis] extra)

run 'discoloss <command> --help' for the options of a command"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command == "demo":
        from discoloss.demo.cli import main as demo_main

        return demo_main(rest)
    if command == "analyze":
        from discoloss.analysis.cli import main as analyze_main

        return analyze_main(rest)
    print(f"discoloss: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
