"""Write the configs the bundles share from their one source, ``bundles/shared``, into every bundle.

A MONAI bundle must be self-contained (``monai.bundle run``, ``download`` and the model zoo read one folder) and
MONAI's config has no include (a ``%file#id`` macro is relative to the working directory), so the bundles keep
full configs and this script keeps their shared part in step:

- ``bundles/shared/<layer>/<config>.json`` holds the ids that every bundle of the layer shares (``LAYERS``); an id
  is a top-level key, or a key inside a section (a dict without ``_target_``, e.g. ``train#trainer``);
- every such id is written into ``bundles/<bundle>/configs/<config>.json`` of each bundle of the layer, in place;
  the bundle's own ids (data, network, hyper-parameters, imports) are left as they are;
- a shared file that is not JSON (``logging.conf``) is copied whole.

Edit the shared file, never its copies, then run::

    python scripts/sync_bundle_configs.py           # write the shared ids into the bundles
    python scripts/sync_bundle_configs.py --check   # exit 1, naming each file and id, if a bundle differs

``tests/test_bundle_configs_shared.py`` runs the check.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSIFICATION = ("cardiac_mri_groupdistil", "waterbirds_groupdistil")
LAYERS = {
    "every_bundle": (*CLASSIFICATION, "cardiac_mri_seg_groupdistil"),  # the GroupDistil workflow
    "classification": CLASSIFICATION,  # accuracy metrics, cross-entropy losses, class predictions
}
LINE_LENGTH = 120


def format_config(value: object, indent: int = 0, key_width: int = 0, in_list: bool = False) -> str:
    """JSON in the bundles' layout: a dict one key per line (inline inside a list), a list of plain values on one
    line when it fits in ``LINE_LENGTH``, otherwise one element per line; 4 spaces of indent."""
    pad = " " * indent
    if isinstance(value, dict) and value and not in_list:
        lines = [
            f"{pad}    {json.dumps(k)}: {format_config(v, indent + 4, len(json.dumps(k)) + 2)}"
            for k, v in value.items()
        ]
        return "{\n" + ",\n".join(lines) + "\n" + pad + "}"
    if isinstance(value, list) and value:
        inline = json.dumps(value)
        plain = not any(isinstance(v, (dict, list)) for v in value)
        if plain and indent + 4 + key_width + len(inline) + 1 <= LINE_LENGTH:
            return inline
        lines = [f"{pad}    {format_config(v, indent + 4, in_list=True)}" for v in value]
        return "[\n" + ",\n".join(lines) + "\n" + pad + "]"
    return json.dumps(value)


def shared_ids(config: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    """The ids of a shared file: its top-level keys, and the keys inside sections (dicts without ``_target_``)."""
    ids: dict[tuple[str, ...], object] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value and "_target_" not in value:
            ids.update(shared_ids(value, (*prefix, key)))
        else:
            ids[(*prefix, key)] = value
    return ids


def apply_ids(config: dict, ids: dict[tuple[str, ...], object]) -> dict:
    """A copy of ``config`` with every id of ``ids`` set (in its place if the config has it, else appended)."""
    config = copy.deepcopy(config)
    for path, value in ids.items():
        section = config
        for key in path[:-1]:
            section = section.setdefault(key, {})
            if not isinstance(section, dict) or "_target_" in section:
                raise ValueError(f"the shared id '{'#'.join(path)}' needs '{key}' to be a section, not a component.")
        section[path[-1]] = copy.deepcopy(value)
    return config


def differing_ids(config: dict, ids: dict[tuple[str, ...], object]) -> list[str]:
    """The ids of ``ids`` that ``config`` lacks or holds with another value, as ``#``-joined names."""
    differing = []
    for path, value in ids.items():
        section: object = config
        for key in path:
            section = section.get(key, KeyError) if isinstance(section, dict) else KeyError
        if section != value:
            differing.append("#".join(path))
    return differing


def read_json(path: Path, text: str | None = None) -> dict:
    """The config in ``path`` (or ``text``, read from it), with an error that names the file."""
    try:
        return json.loads(path.read_text() if text is None else text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from e


def expected_files(root: Path) -> dict[Path, tuple[str, list[str]]]:
    """Every bundle file the shared sources reach: its expected text and the shared ids it now gets wrong."""
    expected: dict[Path, tuple[str, list[str]]] = {}
    for layer, bundles in LAYERS.items():
        for source in sorted((root / "bundles" / "shared" / layer).iterdir()):
            whole = source.read_text() if source.suffix != ".json" else None  # copied whole
            ids = shared_ids(read_json(source)) if whole is None else {}
            for bundle in bundles:
                target = root / "bundles" / bundle / "configs" / source.name
                current, differing = expected.get(target, (target.read_text() if target.is_file() else None, []))
                if whole is not None:
                    expected[target] = (whole, differing + ([] if current == whole else ["the whole file"]))
                    continue
                config = read_json(target, current) if current is not None else {}
                try:
                    text = format_config(apply_ids(config, ids)) + "\n"
                except ValueError as e:
                    raise ValueError(f"{target}: {e}") from e
                expected[target] = (text, differing + differing_ids(config, ids))
    return expected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report the bundle files that differ, write nothing")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this script's)")
    args = parser.parse_args(argv)
    try:
        expected = expected_files(args.root)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stale = []
    for target, (text, differing) in expected.items():
        current = target.read_text() if target.is_file() else None
        if current == text:
            continue
        name = target.relative_to(args.root)
        reason = "missing" if current is None else ", ".join(differing) or "not in the bundles' JSON layout"
        stale.append(f"{name}: {reason}")
        if not args.check:
            target.write_text(text)
            print(f"updated {name}: {reason}")
    if args.check and stale:
        print("bundle configs differ from bundles/shared:\n  " + "\n  ".join(stale), file=sys.stderr)
        print("edit bundles/shared/, not the copies, then run: python scripts/sync_bundle_configs.py", file=sys.stderr)
        return 1
    print(("checked" if args.check else "synced") + f" {len(expected)} bundle config files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
