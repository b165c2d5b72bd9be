#!/usr/bin/env bash
# Lint and format check with ruff (configured in pyproject.toml's [tool.ruff]); .ci/run runs it before the tests.
# Fails on any finding. Most are fixed by: .venv/bin/ruff check --fix . && .venv/bin/ruff format .
set -euo pipefail
cd "$(dirname "$0")/.."
# the venv's ruff must be the one the dev extra pins (formatting changes between releases)
want=$(grep -o '"ruff==[^"]*"' pyproject.toml | tr -d '"' | cut -d= -f3)
have=$(.venv/bin/ruff --version 2>/dev/null | cut -d' ' -f2 || true)
if [ "$have" != "$want" ]; then
  bash scripts/setup.sh
fi
.venv/bin/ruff check .
.venv/bin/ruff format --check .
