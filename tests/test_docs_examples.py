"""The Python examples in README.md and docs/ are executed, so they cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _files_with_examples():
    return [p for p in DOCS if BLOCK.search(p.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("path", _files_with_examples(), ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_python_examples_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    namespace: dict = {"__name__": "__doc_example__"}
    for index, code in enumerate(BLOCK.findall(path.read_text(encoding="utf-8"))):
        exec(compile(code, f"{path.name}[python block {index}]", "exec"), namespace)


def test_readme_has_an_example():
    assert ROOT / "README.md" in _files_with_examples()


@pytest.mark.parametrize(
    "module",
    [
        "monai_groupdistil.losses.distillation",
        "monai_groupdistil.losses.group_dro",
        "monai_groupdistil.losses.group_distillation",
        "monai_groupdistil.data.waterbirds",
    ],
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), raise_on_error=False, verbose=False)
    assert result.attempted > 0 and result.failed == 0, result


def test_api_reference_is_up_to_date():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, str(ROOT / "docs" / "gen_api.py"), "--check"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr + "\nrun: python docs/gen_api.py"
