"""Copy what the bundles share, ``bundles/shared/``, into every bundle (a MONAI bundle is self-contained).

``bundles/shared/<layer>/<config>``: its ids (keys, or keys inside a section: a dict without ``_target_``) are set in
``configs/<config>`` of each bundle of the layer (``LAYERS``); a file that is not JSON is copied whole, as is
``bundles/shared/scripts/`` into every bundle's ``scripts/``. Edit the shared file, never a copy, then run this
(``--check``: exit 1 naming every bundle file that differs; write nothing).
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLASSIFICATION = ("cardiac_mri_groupdistil", "waterbirds_groupdistil")
LAYERS = {"every_bundle": (*CLASSIFICATION, "cardiac_mri_seg_groupdistil"), "classification": CLASSIFICATION}


def dump(value: object, indent: int = 0) -> str:
    """JSON with 4 spaces of indent, a list of plain values on one line."""
    nested = isinstance(value, (dict, list)) and value
    if not nested or isinstance(value, list) and not any(isinstance(v, (dict, list)) for v in value):
        return json.dumps(value)
    pad = " " * (indent + 4)
    if isinstance(value, dict):
        lines = [f"{pad}{json.dumps(k)}: {dump(v, indent + 4)}" for k, v in value.items()]
    else:
        lines = [pad + dump(v, indent + 4) for v in value]
    brackets = "{}" if isinstance(value, dict) else "[]"
    return brackets[0] + "\n" + ",\n".join(lines) + "\n" + " " * indent + brackets[1]


def merge(config: dict, shared: dict) -> dict:
    """``config`` with every id of ``shared`` set."""
    for key, value in shared.items():
        section = isinstance(value, dict) and value and "_target_" not in value
        if section and isinstance(config.get(key), dict) and "_target_" not in config[key]:
            merge(config[key], value)
        else:
            config[key] = value
    return config


def expected(root: Path) -> dict[Path, str]:
    """Every bundle file the shared sources reach, with the text it must have."""
    texts: dict[Path, str] = {}
    for layer, bundles in LAYERS.items():
        for source in sorted((root / "bundles" / "shared" / layer).iterdir()):
            for bundle in bundles:
                target = root / "bundles" / bundle / "configs" / source.name
                if source.suffix != ".json":
                    texts[target] = source.read_text()
                    continue
                current = texts.get(target) or (target.read_text() if target.is_file() else "{}")
                texts[target] = dump(merge(json.loads(current), json.loads(source.read_text()))) + "\n"
    for source in sorted((root / "bundles" / "shared" / "scripts").glob("*.py")):
        for bundle in LAYERS["every_bundle"]:
            texts[root / "bundles" / bundle / "scripts" / source.name] = source.read_text()
    return texts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="name the bundle files that differ, write nothing")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this script's)")
    args = parser.parse_args(argv)
    texts = expected(args.root)
    stale = [path for path, text in texts.items() if not path.is_file() or path.read_text() != text]
    for path in stale:
        print(f"{'differs from bundles/shared' if args.check else 'updated'}: {path.relative_to(args.root)}")
        if not args.check:
            path.parent.mkdir(exist_ok=True)
            path.write_text(texts[path])
    if args.check and stale:
        print("edit bundles/shared, not the copies, then run: python scripts/sync_bundle_configs.py")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
