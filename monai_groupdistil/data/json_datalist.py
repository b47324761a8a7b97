"""Reading a user-supplied JSON datalist (a list of ``{"image": path, ...}`` objects) for inference."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["load_json_datalist"]


def load_json_datalist(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a JSON list of entries, each an object with at least an ``image`` key.

    Relative ``image`` paths are resolved against the JSON file's folder; the other keys are kept as they are.

    Args:
        path: the JSON file.

    Returns:
        the entries, with ``image`` an absolute path string.

    Raises:
        ValueError: when the file is not a JSON list or an entry lacks ``image`` (the entry is named).
    """
    path = Path(path)
    items = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise ValueError(f"{path}: a JSON list of entries is expected, got {type(items).__name__}.")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item:
            raise ValueError(f"{path}: entry {i} must be an object with an 'image' key, got {item!r}.")
        image = Path(item["image"])
        out.append({**item, "image": str(image if image.is_absolute() else path.parent / image)})
    return out
