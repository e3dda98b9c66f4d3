#!/usr/bin/env bash
# The main job on the embedded default: prepare the bundled corpus -> train a tiny entropy model
# -> entropy sidecars -> train a tiny BLT -> validation bits-per-byte -> accuracies on built-in tasks
# (robustness to noise, a character task): about 10 min on 2 cores, plus 1-2 min for the tasks.
# Creates/refreshes ./.venv itself, so it works on a fresh machine. Rerunning resumes; flags are
# passed on, e.g. bash launch/quickstart.sh --workdir runs/other --blt_steps 500
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh "eval"  # lm-eval: the last stage scores both models on built-in tasks
exec python -m bltjax.quickstart "$@"
