#!/usr/bin/env bash
# Real tools the tests use, from Debian packages: promtool (`prometheus`, ~9 s)
# to check our metrics and rules; nftables, iproute2 and libfaketime for the
# network fault matrix (tests/integration/test_network_faults.py). Installed
# when missing and apt-get is there (CI runs as root); otherwise the tests
# that need them skip and say why.
set -uo pipefail
want=()
command -v promtool >/dev/null || want+=(prometheus)
command -v nft >/dev/null || want+=(nftables)
command -v tc >/dev/null || want+=(iproute2)
compgen -G "/usr/lib/*/faketime/libfaketime.so.1" >/dev/null || want+=(libfaketime)
if [[ ${#want[@]} -eq 0 ]]; then
  exit 0
fi
if command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
  echo "== installing ${want[*]} (apt)"
  apt-get update -qq >/dev/null 2>&1
  for pkg in "${want[@]}"; do
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$pkg" \
      >/dev/null 2>&1 || echo "could not install $pkg; the tests that need it will skip" >&2
  done
fi
exit 0
