#!/usr/bin/env bash
# Long form of issue 9's suites (`make soak`): tests/reliability with bigger counts and longer holds,
# and tests/faults with the mixed-traffic soak through examples/seed held ZT_SOAK_SECONDS (600 s).
# tests/reliability/test_load.py's long form: 10,000 tunnels held 60 s through two node proxies, a
# connection-rate ramp, and ZT_LOAD_RATE (1,000) new connections per second for 60 s.
# Needs root (network namespaces). SOAK_SUITES picks the suites, e.g. SOAK_SUITES=tests/faults.
# Figures: one JSON line per test in $ZT_RELIABILITY_FIGURES (default /tmp/zt-reliability-figures.jsonl).
set -euo pipefail
cd "$(dirname "$0")/.."
export ZT_SOAK=1
export ZT_SOAK_SECONDS="${ZT_SOAK_SECONDS:-600}"
read -r -a suites <<<"${SOAK_SUITES:-tests/reliability tests/faults}"
exec .venv/bin/pytest "${suites[@]}" -p no:cacheprovider -rA
