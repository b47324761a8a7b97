"""Command line of the data generators: ``python -m scripts {synthetic,waterbirds} [options]``, from a bundle folder.

- ``synthetic`` (the cardiac bundles): a synthetic multi-vendor cardiac cine dataset in the M&Ms layout
  (:py:func:`make_synthetic_mnms`);
- ``waterbirds`` (the Waterbirds bundle): a synthetic Waterbirds stand-in in the release's layout
  (:py:func:`make_synthetic_waterbirds`).

A bundle ships the generator of its own data only. ``python -m scripts synthetic --help`` lists the options. Bad
arguments, or an output that already exists, end with a one-line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence

GENERATORS = {"synthetic": "synthetic", "waterbirds": "synthetic_waterbirds"}  # command: module of this package


def available_commands() -> dict[str, str]:
    """The generators this bundle's ``scripts/`` holds, as ``{command: module}``."""
    return {c: m for c, m in GENERATORS.items() if importlib.util.find_spec(f"{__package__}.{m}") is not None}


def run(argv: Sequence[str]) -> int:
    """Run the command named by ``argv[0]`` with the remaining arguments; returns the exit status."""
    commands = available_commands()
    if argv and argv[0] in GENERATORS and argv[0] not in commands:
        print(
            f"error: this bundle has no '{argv[0]}' generator (scripts/{GENERATORS[argv[0]]}.py): it generates "
            f"the data of another bundle; run it from that bundle's folder.",
            file=sys.stderr,
        )
        return 2
    if not argv or argv[0] not in commands:
        print(f"usage: python -m scripts {{{','.join(commands)}}} [options]", file=sys.stderr)
        return 2
    main = importlib.import_module(f"{__package__}.{commands[argv[0]]}").main
    try:
        main(list(argv[1:]))
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
