"""mkdocs hook: links from a page to a file of the repository outside ``docs/`` (``../bundles/.../README.md``).

On GitHub such a link opens the file; the site holds only ``docs/``, so there the link is written as the file's
path in the repository, in text: "[`bundles/x`](../bundles/x/docs/README.md)" becomes "`bundles/x`
(`bundles/x/docs/README.md` in the repository)". A link to a file that does not exist is left as it is, so the
strict build still reports it. Used by ``mkdocs.yml`` (``hooks``).
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

LINK = re.compile(r"(?<!!)\[([^\]]+)\]\((\.\./[^)\s#]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown, page, config, files):
    docs_dir = Path(config["docs_dir"]).resolve()
    root = docs_dir.parent

    def replace(match: re.Match) -> str:
        text, target = match.group(1), match.group(2)
        path = (docs_dir / posixpath.dirname(page.file.src_uri) / target).resolve()
        try:
            relative = path.relative_to(root)
        except ValueError:
            return match.group(0)
        if not path.exists() or path.is_relative_to(docs_dir):
            return match.group(0)
        return f"{text} (`{relative.as_posix()}` in the repository)"

    return LINK.sub(replace, markdown)
