"""The examples of README.md and docs/ run as written, so they cannot rot (issue 23).

Python: every ```python block of README.md and of each markdown file under docs/ is executed as a user would
paste it: the blocks of one file in order, in one namespace, in a fresh temporary working directory.

A block that cannot run on its own (it needs a user's data, a trained teacher, a bundle run's outputs...) is marked
in the markdown by an HTML comment on the line right before its fence (blank lines may stand between), which
renders as nothing on GitHub and in the site::

    <!-- not-run: needs a trained teacher checkpoint -->
    ```python
    teacher.load_state_dict(torch.load("teacher.pt"))
    ```

The reason after ``not-run:`` is required; a mark without one, a mark that is not followed by a ```python block and
a misspelt mark (``<!-- not run -->``, ``<!-- skip -->``...) fail. Only blocks tagged ``python`` run (the tag MONAI's
docs use): a block tagged ``py``, ``text`` or ``bash`` is not executed.

Shell: ```bash/```sh/```shell/```console blocks are not run (they train models), but what they name must exist:
every path whose first component is a top-level file or folder of the repository (``scripts/main_job.sh``,
``bundles/<bundle>/configs/train.json``, ``benchmarks/...``), after the variables assigned in the file's earlier
shell lines (``B=bundles/cardiac_mri_groupdistil``) are substituted, and every module run with ``-m``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
MARK = re.compile(r"^\s*<!--\s*not-run:\s*(?P<reason>.*?)\s*-->\s*$")
# anything that looks like an attempt at a mark, so that a misspelt one fails instead of being ignored
MARK_LIKE = re.compile(r"<!--\s*(?:not[\s_-]*run|no[\s_-]*run|skip|norun|do[\s_-]*not[\s_-]*run)\b", re.I)
PYTHON = {"python"}
SHELL = {"bash", "sh", "shell", "console"}


@dataclasses.dataclass
class Block:
    path: Path
    language: str
    line: int  # 1-based line of the first line of code (the one after the opening fence)
    code: str
    reason: str | None  # the not-run mark's reason; None when the block is not marked

    def __str__(self):
        return f"{_rel(self.path)}:{self.line - 1} ({self.language or 'untagged'} block)"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def parse_markdown(path: Path, text: str | None = None) -> tuple[list[Block], list[str]]:
    """The fenced code blocks of ``path`` (or of ``text``) and the problems of its not-run marks."""
    lines = (path.read_text(encoding="utf-8") if text is None else text).split("\n")
    blocks: list[Block] = []
    problems: list[str] = []
    pending: tuple[int, str] | None = None  # (line, reason) of a mark waiting for its block
    where = _rel(path)
    i = 0
    while i < len(lines):
        line = lines[i]
        opening = FENCE.match(line)
        if opening is None:
            mark = MARK.match(line)
            if mark is not None:
                if pending is not None:
                    problems.append(f"{where}:{pending[0]}: a not-run mark not followed by a code block")
                pending = (i + 1, mark.group("reason"))
                if not mark.group("reason"):
                    problems.append(f"{where}:{i + 1}: a not-run mark without a reason: <!-- not-run: why -->")
            elif MARK_LIKE.search(line):
                problems.append(f"{where}:{i + 1}: not a valid mark (write <!-- not-run: reason -->): {line.strip()}")
            elif line.strip() and pending is not None:
                problems.append(f"{where}:{pending[0]}: a not-run mark not right before a code block")
                pending = None
            i += 1
            continue
        indent, fence = opening.group("indent"), opening.group("fence")
        info = opening.group("info").strip()
        language = info.split()[0].lower() if info else ""
        j = i + 1
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                break
            j += 1
        body = [b[len(indent) :] if b.startswith(indent) else b.lstrip() for b in lines[i + 1 : j]]
        reason = pending[1] if pending is not None else None
        if pending is not None and language not in PYTHON:
            problems.append(
                f"{where}:{pending[0]}: a not-run mark before a {language or 'untagged'} block, which never runs"
            )
        blocks.append(Block(path, language, i + 2, "\n".join(body) + "\n", reason))
        pending = None
        i = j + 1
    if pending is not None:
        problems.append(f"{where}:{pending[0]}: a not-run mark not followed by a code block")
    return blocks, problems


def _python_files():
    return [p for p in DOCS if any(b.language in PYTHON for b in parse_markdown(p)[0])]


def _shell_files():
    return [p for p in DOCS if any(b.language in SHELL for b in parse_markdown(p)[0])]


# ---------------------------------------------------------------------------------------------------------------
# the parser itself (on made-up markdown), so that a change of it cannot make the real checks vacuous


def _parse_text(text):
    return parse_markdown(Path("made-up.md"), text)


def test_parser_reads_blocks_and_marks():
    blocks, problems = _parse_text(
        "text\n\n```python\nx = 1\n```\n\n<!-- not-run: needs data -->\n\n```python\ny = open('a')\n```\n"
        "- a list\n\n  ```bash\n  bash scripts/run_tests.sh\n  ```\n",
    )
    assert problems == []
    assert [(b.language, b.code, b.reason) for b in blocks] == [
        ("python", "x = 1\n", None),
        ("python", "y = open('a')\n", "needs data"),
        ("bash", "bash scripts/run_tests.sh\n", None),
    ]
    assert blocks[0].line == 4  # the code's own line, so tracebacks point into the markdown file


@pytest.mark.parametrize(
    "text, problem",
    [
        ("<!-- not-run: -->\n```python\nx\n```\n", "without a reason"),
        ("<!-- not-run:    -->\n```python\nx\n```\n", "without a reason"),
        ("<!-- not-run: why -->\nsome text\n```python\nx\n```\n", "not right before"),
        ("<!-- not-run: why -->\n", "not followed by a code block"),
        ("<!-- not run: why -->\n```python\nx\n```\n", "not a valid mark"),
        ("<!-- skip -->\n```python\nx\n```\n", "not a valid mark"),
        ("<!-- not-run: why -->\n```bash\nx\n```\n", "never runs"),
    ],
)
def test_parser_refuses_bad_marks(text, problem):
    _, problems = _parse_text(text)
    assert len(problems) == 1 and problem in problems[0], problems


# ---------------------------------------------------------------------------------------------------------------
# the real documents


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_not_run_marks_are_well_formed(path):
    _, problems = parse_markdown(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", _python_files(), ids=_rel)
def test_markdown_python_examples_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace: dict = {"__name__": "__doc_example__"}
    ran = 0
    for block in parse_markdown(path)[0]:
        if block.language not in PYTHON or block.reason is not None:
            continue
        # padded with blank lines, so a traceback names the line of the markdown file
        code = "\n" * (block.line - 1) + block.code
        try:
            exec(compile(code, str(path), "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{block} failed: {type(error).__name__}: {error}") from error
        ran += 1
    assert ran or all(b.reason for b in parse_markdown(path)[0] if b.language in PYTHON)


def test_readme_and_usage_have_examples_that_run():
    for path in (ROOT / "README.md", ROOT / "docs" / "usage.md"):
        runnable = [b for b in parse_markdown(path)[0] if b.language in PYTHON and b.reason is None]
        assert runnable, f"{_rel(path)} has no python example that runs"


SHELL_ASSIGNMENT = re.compile(r"^\s*(?:export\s+)?([A-Za-z_]\w*)=(\"[^\"]*\"|'[^']*'|\S*)\s*(?:#.*)?$")
SHELL_VARIABLE = re.compile(r"\$\{?([A-Za-z_]\w*)\}?")
# a relative path (at least one "/"), not part of a longer path, a URL, an option value like x=a/b or a variable
SHELL_PATH = re.compile(r"(?<![\w./$<>{}:=~-])((?:[\w.-]+/)+[\w.-]*)")
SHELL_MODULE = re.compile(r"(?:^|\s)-m\s+([A-Za-z_][\w.]*)")


def _shell_references(blocks: list[Block]) -> list[tuple[Block, str, str]]:
    """(block, kind, name) of each repository path and module that the shell blocks name."""
    top_level = {p.name for p in ROOT.iterdir()} - {".venv", ".git"}
    variables: dict[str, str] = {}
    found = []
    for block in blocks:
        if block.language not in SHELL:
            continue
        for line in block.code.replace("\\\n", " ").split("\n"):
            line = line.strip()
            if line.startswith("$ "):  # a console prompt
                line = line[2:]
            line = re.sub(r"(^|\s)#.*$", "", line)  # comments
            assignment = SHELL_ASSIGNMENT.match(line)
            line = SHELL_VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), line)
            if assignment is not None:
                value = SHELL_VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), assignment.group(2))
                variables[assignment.group(1)] = value.strip("\"'")
            for match in SHELL_PATH.finditer(line):
                name = match.group(1).rstrip("/.")
                if name.split("/")[0] in top_level:
                    found.append((block, "path", name))
            found += [(block, "module", match.group(1)) for match in SHELL_MODULE.finditer(line)]
    unique = {(kind, name): (block, kind, name) for block, kind, name in reversed(found)}  # the first mention
    return sorted(unique.values(), key=lambda ref: found.index(ref))


def test_shell_references_are_found():
    blocks, _ = _parse_text(
        '```bash\nB=bundles/x\nARGS="--meta_file $B/configs/m.json"\npython -m monai.bundle run $ARGS  # c\n```\n'
        "```bash\nbash scripts/main_job.sh /tmp/out  # see docs/a.md\ncurl https://h/x/y.json\n```\n",
    )
    assert [(kind, name) for _, kind, name in _shell_references(blocks)] == [
        ("path", "bundles/x/configs/m.json"),
        ("module", "monai.bundle"),
        ("path", "scripts/main_job.sh"),
    ]


@pytest.mark.parametrize("path", _shell_files(), ids=_rel)
def test_markdown_shell_commands_name_what_exists(path):
    missing = []
    for block, kind, name in _shell_references(parse_markdown(path)[0]):
        if kind == "path" and not (ROOT / name).exists():
            missing.append(f"{block}: {name} does not exist")
        if kind == "module" and importlib.util.find_spec(name) is None:
            missing.append(f"{block}: no module {name} (python -m {name})")
    assert not missing, "\n".join(missing)


def test_readme_shell_commands_are_checked():
    references = {name for _, kind, name in _shell_references(parse_markdown(ROOT / "README.md")[0])}
    assert {"scripts/main_job.sh", "scripts/run_tests.sh"} <= references


@pytest.mark.parametrize(
    "module",
    [
        "monai_groupdistil.losses.distillation",
        "monai_groupdistil.losses.group_dro",
        "monai_groupdistil.losses.group_distillation",
        "monai_groupdistil.data.waterbirds",
        "monai_groupdistil.engines.teacher_cache",
    ],
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0, result
