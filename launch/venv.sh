# Sourced by the README's set-up commands and the launchers: creates or refreshes ./.venv with bltjax installed.
# Usage: source launch/venv.sh EXTRAS   (EXTRAS e.g. "", "test,hf", "tpu" or "cuda")
#
# The interpreter must satisfy setup.cfg's python_requires (>= 3.11: jax 0.10, flax, orbax and grain
# need it), which the python3 of Ubuntu 22.04 (the TPU VM images) does not. In order:
#   1. $BLTJAX_PYTHON, if set;
#   2. the first of python3.13, python3.12, python3.11, python3 on PATH that is >= 3.11 (no network);
#   3. uv (`uv` on PATH, or `python3 -m uv` after `pip install uv`): `uv venv --python 3.11` uses a
#      Python uv already has, or downloads a standalone build once (network needed only then).
# Otherwise it stops with a message naming what to install. An existing venv on an older Python is
# refused rather than silently reused. Installs go through constraints.txt (the versions CI tested).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BLTJAX_VENV:-$repo_root/.venv}"
min_python="3.11"
python_ok() {  # the interpreter $1 runs and is >= 3.11
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}
python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo "none"; }
venv_fail() { echo "launch/venv.sh: $*" >&2; return 2 2>/dev/null || exit 2; }

if [ -x "$venv/bin/python" ] && ! python_ok "$venv/bin/python"; then
  venv_fail "$venv has Python $(python_version "$venv/bin/python"); bltjax needs >= $min_python (setup.cfg python_requires). Remove it (rm -rf $venv) and rerun."
fi
if [ ! -x "$venv/bin/python" ]; then
  base=""
  for candidate in ${BLTJAX_PYTHON:-} python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then base="$candidate"; break; fi
  done
  if [ -n "${BLTJAX_PYTHON:-}" ] && [ "$base" != "$BLTJAX_PYTHON" ]; then
    venv_fail "BLTJAX_PYTHON=$BLTJAX_PYTHON is Python $(python_version "$BLTJAX_PYTHON"); expected >= $min_python"
  fi
  if [ -n "$base" ]; then
    "$base" -m venv "$venv"
  elif command -v uv >/dev/null 2>&1; then
    uv venv --seed --python "$min_python" "$venv"
  elif command -v python3 >/dev/null 2>&1 && python3 -m uv --version >/dev/null 2>&1; then
    python3 -m uv venv --seed --python "$min_python" "$venv"
  else
    venv_fail "bltjax needs Python >= $min_python (setup.cfg python_requires); python3 here is $(python_version python3). Install one: 'python3 -m pip install --user uv' (then rerun: uv fetches Python $min_python), or the deadsnakes package python$min_python-venv on Ubuntu, or set BLTJAX_PYTHON to an interpreter >= $min_python."
  fi
fi
extras="${1:-}"
target="$repo_root"
[ -n "$extras" ] && target="$repo_root[$extras]"
constraints=()
[ -f "$repo_root/constraints.txt" ] && constraints=(-c "$repo_root/constraints.txt")
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check ${constraints[@]+"${constraints[@]}"} -e "$target"
export PATH="$venv/bin:$PATH"
