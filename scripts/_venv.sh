# Sourced by scripts/demo and scripts/test: create or reuse .venv, install torch
# first (pinned: on the dev machines torch==2.13.0 is a local CPU build, an
# unpinned torch would pull a multi-GB CUDA build), then the project.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
extras="${SPECMOE_EXTRAS:-}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
stamp="$venv/.specmoe-installed"
want="$(cat "$root/pyproject.toml" "$root/scripts/_venv.sh" | sha256sum | cut -c1-16)$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q "torch==${SPECMOE_TORCH_VERSION:-2.13.0}"
  "$py" -m pip install -q -e "$root${extras:+[$extras]}"
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
