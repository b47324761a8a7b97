#!/usr/bin/env bash
# The project's test command: sets up .venv (scripts/setup_env.sh), then runs the linters and the whole test
# suite. Usage: bash scripts/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
