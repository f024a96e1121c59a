#!/usr/bin/env bash
# Quick start: set up (venv, torch, polynet, the Debian Fashion-MNIST package), train the
# default small PolyNet on Fashion-MNIST on the CPU, then report top-1 on the 10,000 test
# images. Extra arguments go to 'polynet train' (e.g. --epochs 2, --threads 2).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
out="runs/quickstart-$(date +%Y%m%d-%H%M%S)"
start=$(date +%s)
# All cores: the main job owns the machine (the automatic choice backs off under load).
.venv/bin/polynet train --config configs/fashion-mnist.yaml --out "$out" --threads "$(nproc)" "$@"
echo "quickstart: finished in $(( $(date +%s) - start )) s; curves: $out/curve.png, metrics: $out/metrics.csv"
