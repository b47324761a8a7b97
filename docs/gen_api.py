"""Writes docs/api.md, the API reference, from the docstrings of every public name of the package.

Usage: python docs/gen_api.py [--check]   (--check: exit 1 when docs/api.md is not up to date)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from pathlib import Path

MODULES = [
    "monai_groupdistil.losses",
    "monai_groupdistil.engines",
    "monai_groupdistil.handlers",
    "monai_groupdistil.metrics",
    "monai_groupdistil.data",
    "monai_groupdistil.bundle",
]
OUTPUT = Path(__file__).resolve().parent / "api.md"


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _section(name: str, obj) -> list[str]:
    kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "constant"
    lines = [f"### `{name}`", ""]
    if kind == "constant":
        lines += [f"Constant: `{obj!r}`" if len(repr(obj)) < 300 else "Constant.", ""]
        return lines
    lines += ["```py", f"{kind} {name}{_signature(obj)}", "```", ""]
    doc = inspect.getdoc(obj) or "(no docstring)"
    lines += ["```text", doc, "```", ""]
    if inspect.isclass(obj):
        for attr, member in sorted(vars(obj).items()):
            if attr.startswith("_") or not (inspect.isfunction(member) or isinstance(member, property)):
                continue
            member_doc = inspect.getdoc(member)
            if member_doc:
                sig = "" if isinstance(member, property) else _signature(member)
                lines += [f"- `{name}.{attr}{sig}`: {member_doc.splitlines()[0]}"]
        lines.append("")
    return lines


def render() -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/gen_api.py`; `tests/test_docs_examples.py` checks that it is",
        "up to date.",
        "",
    ]
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        lines += [f"## `{module_name}`", "", (inspect.getdoc(module) or "").strip(), ""]
        for name in module.__all__:
            lines += _section(f"{module_name}.{name}", getattr(module, name))
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="only check that docs/api.md is up to date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is out of date: run python docs/gen_api.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
