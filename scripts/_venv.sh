# Sourced by scripts/demo and scripts/test: create or reuse .venv, install torch
# first (pinned: on the dev machines torch==2.13.0 is a local CPU build, an
# unpinned torch would pull a multi-GB CUDA build), then the project.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
extras="${SPECMOE_EXTRAS:-}"
py="$venv/bin/python"
if [ ! -x "$py" ]; then
  echo "creating $venv" >&2
  python3 -m venv "$venv"
fi
stamp="$venv/.specmoe-installed${extras:+-$extras}"
want="$(cat "$root/pyproject.toml" "$root/scripts/_venv.sh" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log="$venv/install.log"
  echo "installing torch ${SPECMOE_TORCH_VERSION:-2.13.0} and specmoe${extras:+[$extras]} into $venv (log: $log)" >&2
  {
    "$py" -m pip install --upgrade pip &&
    "$py" -m pip install "torch==${SPECMOE_TORCH_VERSION:-2.13.0}" &&
    "$py" -m pip install -e "$root${extras:+[$extras]}"
  } > "$log" 2>&1 || { tail -n 40 "$log" >&2; echo "install failed; see $log" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
