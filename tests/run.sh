#!/usr/bin/env bash
# The test suite: installs bltjax with its test, hf and eval extras into ./.venv (torch is pinned
# to a CPU build; eval is lm-eval, tests/test_harness.py), then runs pytest on 8 fake CPU devices. Extra arguments go to pytest:
#   bash tests/run.sh                      everything (what CI runs)
#   bash tests/run.sh -m "not slow"        the edit loop: leaves out what spawns processes,
#                                          trains or compiles a big program
#   bash tests/run.sh tests/test_patching.py -k entropy
#   bash tests/run.sh -n 0                 one process, no workers (e.g. to use a debugger)
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/venv.sh "test,hf,eval"
# One pytest process keeps about one core busy (XLA compiles a program on one thread), so
# pytest-xdist runs a worker per core, at most 4, each a whole test file at a time: module
# fixtures are built once, and the compile cache in .pytest_cache/jax is shared by all.
workers="$(python -c 'import os; print(min(4, len(os.sched_getaffinity(0))))')"
# No path given: pytest runs setup.cfg's testpaths (tests/). A later -n in "$@" wins.
status=0
python -m pytest -n "$workers" --dist loadfile "$@" || status=$?
# Exit 5 is "no test collected". Under a marker expression that only means nothing matched it
# (e.g. -m "not slow" on a file of slow tests), which is not a failure; otherwise it is.
if [ "$status" -eq 5 ] && [[ " $* " == *" -m "* || " $* " == *" -m="* ]]; then
  echo "tests/run.sh: no test matched the marker expression; nothing to run" >&2
  exit 0
fi
exit "$status"
