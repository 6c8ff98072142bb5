#!/usr/bin/env bash
# Real tools the tests check our output with: promtool (Debian package
# `prometheus`, ~9 s to install). Installed when missing and apt-get is there
# (CI runs as root); otherwise the tests that need it skip and say why.
set -uo pipefail
if command -v promtool >/dev/null; then
  exit 0
fi
if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
  echo "== installing promtool (apt: prometheus)"
  apt-get update -qq >/dev/null 2>&1
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
    >/dev/null 2>&1 || echo "could not install prometheus; promtool tests will skip" >&2
fi
exit 0
