#!/usr/bin/env bash
# The main job on the embedded default: a tiny BLT on the bundled real corpus.
# Creates/refreshes ./.venv itself, so it works on a fresh machine. Extra flags are passed on,
# e.g. bash launch/quickstart.sh --config.seed=3
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh ""
exec python -m bltjax.demo --config experiments/blt_tiny.py "$@"
