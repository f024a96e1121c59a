#!/usr/bin/env bash
# Set up everything polynet needs on a fresh Debian machine: the Fashion-MNIST package and a
# virtual environment (.venv) with torch, torchvision and polynet itself. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && command -v apt-get >/dev/null; then
  echo "setup: installing the Debian package dataset-fashion-mnist"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
# Looked up, not imported: importing torch takes seconds of the quick start's budget.
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('torch') and u.find_spec('torchvision')))" 2>/dev/null; then
  echo "setup: installing torch and torchvision (about 90 s)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
fi
extras=${1:-}
stamp=".venv/.polynet-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing polynet${extras:+[$extras]}"
  .venv/bin/pip install -q -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
