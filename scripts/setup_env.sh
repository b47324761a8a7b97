#!/usr/bin/env bash
# Creates (or reuses) .venv and installs the package with its test dependencies (the test, mlflow and docs extras).
# torch goes first and pinned: the CPU build on disk; a bare `torch` requirement resolved first pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
# the test extra, mlflow for the tracking tests (tests/test_tracking.py) and docs for the API reference site
.venv/bin/python -m pip install -q -e ".[test,mlflow,docs]"
