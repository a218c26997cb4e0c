"""`python -m detector <command> ...` (or `dino-inspect <command> ...`): every command.

python -m detector fit data.root=/data/mvtec data.category=carpet
python -m detector --help
"""

from __future__ import annotations

import importlib
import sys

from detector.commands import COMMANDS
from detector.errors import Exit


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return (
        "usage: python -m detector <command> [arguments]\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\n`python -m detector <command> --help` describes one."
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    name, arguments = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(Exit.CANNOT_RUN)
    module_name, _, function = COMMANDS[name][0].partition(":")
    entry = getattr(importlib.import_module(module_name), function or "main")
    # Each command parses sys.argv itself (argparse, or Hydra's overrides).
    sys.argv = [f"python -m detector {name}", *arguments]
    result = entry()
    if isinstance(result, int):
        raise SystemExit(result)


if __name__ == "__main__":
    main()
