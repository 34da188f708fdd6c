#!/usr/bin/env bash
# Run the whole emailmw test suite on a fresh Debian machine:
#   1. install Dovecot + Postfix if missing (needs root; the real-server tests use them),
#   2. create .venv and install emailmw with its dev extra,
#   3. lint (ruff), type-check (mypy --strict) and run pytest.
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -k pubsub
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-mailstack.sh

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install --quiet -e '.[dev]'

echo "== ruff"
.venv/bin/ruff check emailmw tests benchmarks examples
.venv/bin/ruff format --check emailmw tests benchmarks examples
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
.venv/bin/python -m pytest "$@"
