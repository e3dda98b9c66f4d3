# Sourced by the README's set-up commands: creates or refreshes ./.venv with bltjax installed.
# Usage: source launch/venv.sh EXTRAS   (EXTRAS e.g. "" or "test,hf")
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BLTJAX_VENV:-$repo_root/.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
extras="${1:-}"
target="$repo_root"
[ -n "$extras" ] && target="$repo_root[$extras]"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$target"
export PATH="$venv/bin:$PATH"
