"""Copy what the bundles share, ``bundles/shared/``, into every bundle (a MONAI bundle is self-contained).

``bundles/shared/<layer>/<config>``: its ids (keys, or keys inside a section: a dict without ``_target_``) are set in
``configs/<config>`` of each bundle of the layer (``LAYERS``); a file that is not JSON is copied whole.
``bundles/shared/scripts/``: each bundle's ``scripts/`` gets ``__main__.py`` and the modules that its own
``scripts/__init__.py`` imports (``from .module import ...``), and the modules those import; a copied module that no
longer is one of them is removed. A module that ``__init__.py`` imports from the bundle's own folder is the bundle's;
any other module there is named, never removed. Edit the shared file, never a copy, then run this (``--check``: exit 1
naming every bundle file that differs or is not used; write nothing).
"""

import argparse
import ast
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
    shared = root / "bundles" / "shared" / "scripts"
    for bundle in LAYERS["every_bundle"]:
        scripts = root / "bundles" / bundle / "scripts"
        for name in ("__main__", *script_modules(shared, scripts)[0]):
            texts[scripts / f"{name}.py"] = (shared / f"{name}.py").read_text()
    return texts


def script_modules(shared: Path, scripts: Path) -> tuple[list[str], list[str]]:
    """The modules that ``scripts/__init__.py`` (a bundle's own) imports, directly or through others: those of
    ``shared`` (copied into the bundle) and the bundle's own (kept as they are)."""
    init = scripts / "__init__.py"
    if not init.is_file():
        raise SystemExit(f"{init} is missing: each bundle owns its scripts/__init__.py, which imports what it uses.")
    copied: set[str] = set()
    own: set[str] = set()
    todo = [init]
    while todo:
        path = todo.pop()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.ImportFrom) or node.level != 1:
                continue  # only the package's own modules: from .module import ...
            for name in [node.module] if node.module else [alias.name for alias in node.names]:
                if name in copied or name in own:
                    continue
                if (shared / f"{name}.py").is_file():
                    copied.add(name)
                    todo.append(shared / f"{name}.py")
                elif (scripts / f"{name}.py").is_file():
                    own.add(name)
                    todo.append(scripts / f"{name}.py")
                else:
                    raise SystemExit(f"{path} imports .{name}, but neither {shared} nor {scripts} has {name}.py.")
    return sorted(copied), sorted(own)


def extra_modules(root: Path, texts: dict[Path, str]) -> tuple[list[Path], list[Path]]:
    """Modules of the bundles' ``scripts/`` that nothing copies or imports: copies of shared modules the bundle no
    longer uses (removed by a sync), and other files, e.g. copies of a module since removed from ``bundles/shared``
    (named, never removed: they may be a bundle's own)."""
    shared = root / "bundles" / "shared" / "scripts"
    names = {path.name for path in shared.glob("*.py")} - {"__init__.py"}
    unused, unknown = [], []
    for bundle in LAYERS["every_bundle"]:
        scripts = root / "bundles" / bundle / "scripts"
        own = {scripts / "__init__.py", *(scripts / f"{name}.py" for name in script_modules(shared, scripts)[1])}
        for path in sorted(scripts.glob("*.py")):
            if path not in texts and path not in own:
                (unused if path.name in names else unknown).append(path)
    return unused, unknown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="name the bundle files that differ, write nothing")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this script's)")
    args = parser.parse_args(argv)
    texts = expected(args.root)
    stale = [path for path, text in texts.items() if not path.is_file() or path.read_text() != text]
    unused, unknown = extra_modules(args.root, texts)
    for path in stale:
        print(f"{'differs from bundles/shared' if args.check else 'updated'}: {path.relative_to(args.root)}")
        if not args.check:
            path.parent.mkdir(exist_ok=True)
            path.write_text(texts[path])
    for path in unused:
        print(f"{'not used by its bundle' if args.check else 'removed'}: {path.relative_to(args.root)}")
        if not args.check:
            path.unlink()
    for path in unknown:
        relative = path.relative_to(args.root)
        print(f"neither shared nor imported by its scripts/__init__.py (remove or import it): {relative}")
    if args.check and (stale or unused):
        print("edit bundles/shared, not the copies, then run: python scripts/sync_bundle_configs.py")
    return 1 if unknown or (args.check and (stale or unused)) else 0


if __name__ == "__main__":
    sys.exit(main())
