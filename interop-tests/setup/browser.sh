#!/usr/bin/env bash
# Installs what interop-tests/tests/browser.rs needs: Debian's Chromium and playwright-core
# (interop-tests/browser/package-lock.json). Idempotent; quick when already installed.
set -euo pipefail
cd "$(dirname "$0")/../browser"

if [ ! -x /usr/bin/chromium ]; then
  echo "installing chromium"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "installing nodejs and npm"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq nodejs npm >/dev/null
fi

# npm ci only when node_modules does not match the lock file.
lock_hash=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f node_modules/.peermesh-lock ] || [ "$(cat node_modules/.peermesh-lock)" != "$lock_hash" ]; then
  echo "npm ci (playwright-core)"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$lock_hash" > node_modules/.peermesh-lock
fi
