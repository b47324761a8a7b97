"""Command line of the data generators: ``python -m scripts {synthetic,waterbirds} [options]``.

- ``synthetic``: a synthetic multi-vendor cardiac cine dataset in the M&Ms layout (:py:func:`make_synthetic_mnms`);
- ``waterbirds``: a synthetic Waterbirds stand-in in the release's layout (:py:func:`make_synthetic_waterbirds`).

``python -m scripts synthetic --help`` lists the options. Bad arguments, or an output that already
exists, end with a one-line ``error: ...`` and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from . import synthetic, synthetic_waterbirds

COMMANDS = {"synthetic": synthetic.main, "waterbirds": synthetic_waterbirds.main}


def run(argv: Sequence[str]) -> int:
    """Run the command named by ``argv[0]`` with the remaining arguments; returns the exit status."""
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m scripts {{{','.join(COMMANDS)}}} [options]", file=sys.stderr)
        return 2
    try:
        COMMANDS[argv[0]](list(argv[1:]))
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
