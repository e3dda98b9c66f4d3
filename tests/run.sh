#!/usr/bin/env bash
# The test suite: installs bltjax with its test and hf extras into ./.venv (torch is pinned to
# a CPU build), then runs pytest on 8 fake CPU devices. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh "test,hf"
exec python -m pytest tests "$@"
