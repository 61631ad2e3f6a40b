#!/usr/bin/env bash
# Installs what interop-tests/tests/ndc.rs needs: node-datachannel (libdatachannel for node,
# interop-tests/ndc/package-lock.json), whose prebuilt binary for linux x64 comes from the npm
# registry as the package @node-datachannel/linux-x64-gnu. Idempotent; quick when installed.
set -euo pipefail
cd "$(dirname "$0")/../ndc"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "installing nodejs and npm"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq nodejs npm >/dev/null
fi

# npm ci only when node_modules does not match the lock file.
lock_hash=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f node_modules/.peermesh-lock ] || [ "$(cat node_modules/.peermesh-lock)" != "$lock_hash" ]; then
  echo "npm ci (node-datachannel)"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$lock_hash" > node_modules/.peermesh-lock
fi

# The prebuilt native module must load on this machine (glibc, node ABI).
node --input-type=module -e \
  "import ndc from 'node-datachannel'; console.log('node-datachannel loads: libdatachannel ' + ndc.getLibraryVersion()); ndc.cleanup();"
