#!/usr/bin/env bash
# The main job: the seed document's scenario (shared/seed/mtls-with-istio-ambient.md) as a real mesh on
# this host. app-a serves /data in namespace-a; app-b and app-c call it from their own namespaces on
# another node. Each gets its own SPIFFE certificate from the mesh CA; the node proxies carry every
# connection over mutual TLS (HBONE) and enforce the seed's policies.
#
#   1. zerotunnel up examples/seed            nodes and pods as network namespaces, one node proxy per node
#   2. traffic matrix                         app-b -> app-a and app-c -> app-a through the service name,
#                                             with the identities, decision and reason the proxies logged
#   3. zerotunnel analyze … examples/seed/l7  why the seed's L7 policy (GET /data) cannot work at L4
#   4. zerotunnel down                        removes every process, namespace, link and rule
#
# `scripts/demo.sh --keep` leaves the mesh running for you to explore (it says how to stop it).
# Needs root (network namespaces, nftables). Exit status 0 only if every decision was the expected one.
set -euo pipefail
cd "$(dirname "$0")/.."
keep=0
[ "${1:-}" = "--keep" ] && keep=1
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root (it creates network namespaces, veth links and nftables rules); run: sudo $0" >&2
  exit 1
fi

if [ -t 2 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold='' plain=''; fi
step() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain" >&2; }
cleanup() {
  if [ "$keep" -eq 0 ]; then
    step "4. zerotunnel down"
    zerotunnel down
  fi
}

step "1. zerotunnel up examples/seed"
zerotunnel down >/dev/null 2>&1 || true   # a previous demo left running (e.g. --keep) is replaced
trap cleanup EXIT
zerotunnel up examples/seed

# Without a waypoint the node proxies enforce identities only, so app-b may also GET /other; once
# namespace-a uses the seed's waypoint (istio.io/use-waypoint), the L7 rule (GET /data only) holds.
other=ALLOW
grep -q 'istio.io/use-waypoint' examples/seed/mesh.yaml && other=DENY
step "2. traffic matrix: curl from each client pod to app-a through its service name"
python -m zerotunnel.cluster.traffic \
  namespace-b/app-b=http://app-a.namespace-a/data --expect ALLOW \
  namespace-c/app-c=http://app-a.namespace-a/data --expect DENY \
  namespace-b/app-b=http://app-a.namespace-a/other --expect "$other"

step "3. zerotunnel analyze -f examples/seed/mesh.yaml -f examples/seed/l7  (the seed's policy as written)"
set +e
zerotunnel analyze -f examples/seed/mesh.yaml -f examples/seed/l7
rc=$?
set -e
if [ "$rc" -ne 1 ]; then
  echo "demo: expected analyze to report the L7 policy (exit 1), got exit $rc" >&2
  exit 1
fi
cat >&2 <<'EOF'
The seed's first policy restricts GET /data: HTTP attributes, which a node proxy cannot see. In ambient
mode such a rule is dropped, so the policy would deny app-b as well. examples/seed/policies.yaml keeps its
identity part, enforced at L4 by the node proxies; the method and path are enforced only when app-a's
traffic goes through the waypoint (examples/seed/waypoint.yaml, examples/seed/README.md) — which is why
app-b's GET /other above is allowed without one.
EOF

if [ "$keep" -eq 1 ]; then
  cat >&2 <<'EOF'

The mesh is still running. Explore it:
  zerotunnel status                                   nodes, pods, identities, certificate expiry
  zerotunnel exec -n namespace-b app-b -- curl -s http://app-a.namespace-a/data
  zerotunnel logs node/node-1                         the node proxy's log (one JSON access line per connection)
Stop it with: zerotunnel down
EOF
fi
