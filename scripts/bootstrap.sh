#!/usr/bin/env bash
# Creates .venv with a Python >= 3.12 found on this machine (PATH first, then pyenv)
# and installs jaxpaged with the requested extras. Idempotent: a stamp file records
# what was installed so repeated `make` calls cost nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-test}"
VENV="${VENV:-.venv}"

is_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }

find_python() {
  for cand in python3.13 python3.12 python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && is_ok "$(command -v "$cand")"; then
      command -v "$cand"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    local root; root="$(pyenv root)"
    for d in $(ls -d "$root"/versions/3.1[2-9]* 2>/dev/null | sort -rV); do
      if [ -x "$d/bin/python" ] && is_ok "$d/bin/python"; then echo "$d/bin/python"; return 0; fi
    done
  fi
  for d in $(ls -d "$HOME"/.pyenv/versions/3.1[2-9]* /usr/local/bin/python3.1[2-9] 2>/dev/null | sort -rV); do
    p="$d"; [ -d "$d" ] && p="$d/bin/python"
    if [ -x "$p" ] && is_ok "$p"; then echo "$p"; return 0; fi
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ] || ! is_ok "$VENV/bin/python"; then
  PY="$(find_python)" || { echo "error: no Python >= 3.12 found on PATH or in pyenv; install one (JAX >= 0.11 needs it)" >&2; exit 1; }
  echo "bootstrap: creating $VENV with $PY ($("$PY" --version))"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
fi

STAMP="$VENV/.jaxpaged-installed-$EXTRAS"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  touch "$STAMP"
fi
