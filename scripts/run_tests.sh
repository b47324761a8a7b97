#!/usr/bin/env bash
# The project's test command: sets up .venv (scripts/setup_env.sh), then runs the linters, builds the documentation
# site with the API reference (mkdocs --strict: a broken link or a docstring that does not parse fails) into a
# temporary folder, and runs the whole test suite. Usage: bash scripts/run_tests.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
site_dir=$(mktemp -d)
trap 'rm -rf "$site_dir"' EXIT
.venv/bin/mkdocs build --strict --site-dir "$site_dir"
.venv/bin/python -m pytest -q "$@"
