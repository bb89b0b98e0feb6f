#!/usr/bin/env bash
# Installs what `make bench` needs beyond scripts/install-deps.sh:
#   python3-matplotlib - draws BENCHMARKS-lag.png (Debian's package, for /usr/bin/python3)
# It installs only what is missing. Without it the harness still runs and draws
# the plot with a small built-in PNG writer (as the smoke test may).
set -euo pipefail

need=()
if ! /usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1; then
  need+=(python3-matplotlib)
fi

if [ ${#need[@]} -gt 0 ]; then
  echo "install-bench-deps: installing ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

echo "install-bench-deps: ok (matplotlib $(/usr/bin/python3 -c 'import matplotlib; print(matplotlib.__version__)'))"
