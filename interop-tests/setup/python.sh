#!/usr/bin/env bash
# Installs what interop-tests/tests/aiortc.rs needs: aiortc and websockets (pinned in
# interop-tests/aiortc/requirements.txt) in a venv at interop-tests/aiortc/.venv, so the system
# Python stays untouched. Idempotent; quick when the venv is already up to date.
set -euo pipefail
dir="$(cd "$(dirname "$0")/../aiortc" && pwd)"
venv="$dir/.venv"
req="$dir/requirements.txt"
stamp="$venv/.requirements.installed"

if [ -x "$venv/bin/python" ] && cmp -s "$req" "$stamp" \
  && "$venv/bin/python" -c 'import aiortc, websockets' 2>/dev/null; then
  echo "aiortc venv up to date: $venv"
  exit 0
fi

# A Python 3.10+ to build the venv from: $PEERMESH_PYTHON, else python3.11 / python3 on PATH
# (pyenv's shims included), else pyenv's 3.11.
python="${PEERMESH_PYTHON:-}"
if [ -z "$python" ]; then
  for candidate in python3.11 python3 /root/.pyenv/versions/3.11*/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1 \
      && "$candidate" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
      python="$candidate"
      break
    fi
  done
fi
if [ -z "$python" ]; then
  # Debian's python3 lacks ensurepip until python3-venv is installed.
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq python3 python3-venv >/dev/null
  python=python3
fi

echo "creating the aiortc venv with $("$python" --version 2>&1): $venv"
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$req"
"$venv/bin/python" -c 'import aiortc, websockets; print("aiortc", aiortc.__version__, "websockets", websockets.__version__)'
cp "$req" "$stamp"
