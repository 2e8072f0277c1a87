#!/usr/bin/env bash
# Tools for `make bench` (bench/): load generators (iperf3, wrk), the server (nginx) and the peers we
# compare against (stunnel4, haproxy), plus py-spy for the profile. Idempotent; needs root.
set -euo pipefail
need=()
for pair in iperf3:iperf3 wrk:wrk stunnel4:stunnel nginx:nginx haproxy:haproxy nftables:nft iproute2:ip curl:curl; do
    pkg=${pair%%:*}; bin=${pair##*:}
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "bench-deps: need root to install: ${need[*]}" >&2
        exit 1
    fi
    echo "bench-deps: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
venv=${VENV:-.venv}
if [ -x "$venv/bin/python" ] && ! [ -x "$venv/bin/py-spy" ]; then
    "$venv/bin/pip" install -q py-spy || echo "bench-deps: py-spy not installed (profile will be skipped)" >&2
fi
