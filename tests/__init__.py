"""The tests. Importing any of them puts the bundles' code (``bundles/shared/scripts``, imported as ``scripts``, as
from a model-zoo bundle's folder) on the path: pytest, and a worker process that imports a test module, see it."""

import sys
from pathlib import Path

_SHARED = str(Path(__file__).resolve().parents[1] / "bundles" / "shared")
if _SHARED not in sys.path:
    sys.path.insert(0, _SHARED)
