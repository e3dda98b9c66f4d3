#!/usr/bin/env bash
# Runs N processes of a command on this machine, M fake CPU devices each: multi-host without a pod.
#
#   bash launch/local.sh --processes 2 --devices-per-process 2 [--port P] [--heartbeat-timeout S] \
#       [--log-dir DIR] [--dry-run] -- python -m bltjax.train --config experiments/blt_tiny.py --workdir runs/mp ...
#
# The supervisor is launch/local.py (standard library only); see its docstring for what each
# process gets and how failures end the run.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/local.py" "$@"
