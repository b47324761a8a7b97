"""Griffe extension for the API reference: renders the library's reStructuredText idioms as Markdown.

The docstrings follow MONAI's style: Google sections (``Args:``, ``Returns:``, ``Raises:``) with Sphinx roles
(``:py:class:`GroupDROLoss```) and literal blocks introduced by ``::`` (``Example::``). mkdocstrings renders the
text as Markdown, so before the docstrings are parsed this extension turns

- a role ``:py:class:`~a.b.C```, ``:func:`f```, ``:meth:`Title <a.b.f>``` ... into the code span `` `C` ``,
  `` `f` ``, `` `Title` ``;
- a paragraph ending in ``::`` and the indented block after it into the paragraph ending in ``:`` and a fenced
  code block;
- an argument entry that documents several arguments at once (``a, b, c: as for X``, as Napoleon reads it) into
  one entry per argument, each with that description.

It changes only what the site shows, never the docstrings themselves. Used by ``mkdocs.yml``
(``plugins.mkdocstrings.handlers.python.options.extensions``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const):`~?([^`<]*?)\s*(?:<([^`>]*)>)?`")


def _role(match: re.Match) -> str:
    title, target = match.group(1), match.group(2)
    if target is not None and title:  # :class:`Title <a.b.C>`
        return f"`{title}`"
    name = (target or title).strip()
    if match.group(0).split("`", 1)[1].startswith("~"):  # :class:`~a.b.C` shows C
        name = name.rsplit(".", 1)[-1]
    return f"`{name}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


ARGS_SECTION = re.compile(r"^(Args|Arguments|Parameters|Params|Keyword Args|Keyword Arguments|Other Parameters):\s*$")
MULTI_ARG = re.compile(r"^(\s+)(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+):(\s.*)?$")


def _split_multi_args(lines: list[str]) -> list[str]:
    out: list[str] = []
    in_args = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if _indent(line) == 0 and line.strip():
            in_args = bool(ARGS_SECTION.match(line))
        match = MULTI_ARG.match(line) if in_args else None
        if match is None:
            out.append(line)
            i += 1
            continue
        indent, names, rest = match.group(1), match.group(2), match.group(3) or ""
        j = i + 1  # the entry's continuation lines, indented deeper than its first line
        while j < len(lines) and lines[j].strip() and _indent(lines[j]) > len(indent):
            j += 1
        for name in (n.strip() for n in names.split(",")):
            out += [f"{indent}{name}:{rest}", *lines[i + 1 : j]]
        i = j
    return out


def rst_to_markdown(text: str) -> str:
    """Returns ``text`` with the Sphinx roles, ``::`` literal blocks and grouped arguments written as Markdown."""
    text = ROLE.sub(_role, text)
    lines = _split_multi_args(text.split("\n"))
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.rstrip().endswith("::"):
            out.append(line)
            i += 1
            continue
        base = _indent(line)
        stripped = line.rstrip()[:-2].rstrip()
        if stripped.strip():  # "Example::" -> "Example:"; a bare "::" disappears
            out.append(stripped + ":")
        # the literal block: blank lines, then the lines indented deeper than the "::" line
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        k = j
        while k < len(lines) and (not lines[k].strip() or _indent(lines[k]) > base):
            k += 1
        while k > j and not lines[k - 1].strip():
            k -= 1
        block = lines[j:k]
        if not block:
            i += 1
            continue
        depth = min(_indent(b) for b in block if b.strip())
        pad = " " * base
        language = "json" if block[0].lstrip()[:1] in '{["' else "python"
        out += ["", pad + "```" + language] + [pad + b[depth:] if b.strip() else "" for b in block] + [pad + "```"]
        i = k
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrites every docstring of the loaded package with :func:`rst_to_markdown` before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
