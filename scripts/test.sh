#!/usr/bin/env bash
# The whole test suite, as CI runs it: lint, types, then every test (unit, integration, e2e).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
# sslyze (the TLS scanner the reliability suite runs against 15008) pins an older cryptography than ours,
# so it lives in a virtualenv of its own.
if [ -z "${ZT_SSLYZE:-}" ]; then
  if [ ! -x .tools/sslyze/bin/sslyze ]; then
    echo "test: installing sslyze into .tools/sslyze" >&2
    python3 -m venv .tools/sslyze
    .tools/sslyze/bin/pip install -q --disable-pip-version-check 'sslyze==6.3.1' 2>&1 | grep -v '^WARNING: Location' || true
  fi
  export ZT_SSLYZE="$PWD/.tools/sslyze/bin/sslyze"
fi
echo "== ruff" >&2
ruff check src tests bench
echo "== mypy --strict" >&2
mypy
echo "== pytest" >&2
set +e
pytest "$@"
rc=$?
set -e
# pytest exits 5 when it collected nothing: that is a broken suite, not a pass.
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi
exit "$rc"
