#!/usr/bin/env bash
# Set up (see scripts/setup.sh) and run the test suite on all cores.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh test
exec .venv/bin/python -m pytest -n 2 --dist loadgroup -q "$@"
