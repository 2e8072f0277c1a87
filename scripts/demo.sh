#!/usr/bin/env bash
# The main job: the seed document's scenario (shared/seed/mtls-with-istio-ambient.md) as a real mesh on
# this host. app-a serves /data in namespace-a; app-b and app-c call it from their own namespaces on
# another node. Each gets its own SPIFFE certificate from the mesh CA; the node proxies carry every
# connection over mutual TLS (HBONE) and enforce the seed's policies.
#
#   1. zerotunnel up examples/seed            nodes and pods as network namespaces, one node proxy per node,
#                                             app-a's waypoint and the ingress gateway as pods of their own
#   2. traffic matrix                         app-b and app-c -> app-a through the service name and app-a's
#                                             waypoint, with the identities, decision and reason logged
#   3. external clients                       curl on this host with certificates of two external CAs (and
#                                             an unknown and a revoked one) -> gateway -> waypoint -> app-a
#   4. zerotunnel analyze … examples/seed/l7  why the seed's L7 policy (GET /data) cannot work at L4
#   5. zerotunnel down                        removes every process, namespace, link and rule
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
    step "5. zerotunnel down"
    zerotunnel down
  fi
}

step "1. zerotunnel up examples/seed"
zerotunnel down >/dev/null 2>&1 || true   # a previous demo left running (e.g. --keep) is replaced
trap cleanup EXIT
zerotunnel up examples/seed

step "2. traffic matrix: curl from each client pod to app-a through its service name (via app-a's waypoint)"
python -m zerotunnel.cluster.traffic \
  namespace-b/app-b=http://app-a.namespace-a/data --expect ALLOW \
  "namespace-b/app-b=POST http://app-a.namespace-a/data" --expect DENY \
  namespace-b/app-b=http://app-a.namespace-a/other --expect DENY \
  namespace-c/app-c=http://app-a.namespace-a/data --expect DENY
cat >&2 <<'EOF'
namespace-a uses the waypoint (istio.io/use-waypoint), which enforces the seed's first policy as written
in intent: only app-b, only GET /data (examples/seed/waypoint.yaml); a denial is its 403 "RBAC: access
denied". app-a's node proxy admits only the waypoint's identity (examples/seed/policies.yaml).
EOF

gw=examples/seed/gateway
step "3. external clients (the seed's §8): curl on this host -> ingress gateway -> waypoint -> app-a"
python -m zerotunnel.cluster.ingress --cacert "$gw/server-ca.crt" \
  "$gw/clients/partner-a=https://app-a.example.com/data" --expect ALLOW \
  "$gw/clients/partner-b=https://app-a.example.com/data" --expect ALLOW \
  "$gw/clients/stranger=https://app-a.example.com/data" --expect DENY \
  "$gw/clients/revoked=https://app-a.example.com/data" --expect DENY
cat >&2 <<'EOF'
The gateway's Secret (examples/seed/gateway-secret.yaml) trusts two external CAs, partner-a and partner-b:
a client certificate from either is accepted, and app-a sees it described in X-Forwarded-Client-Cert. A
certificate from any other CA, or one revoked in the Secret's ca.crl, is refused in the TLS handshake.
EOF

step "4. zerotunnel analyze -f examples/seed/mesh.yaml -f examples/seed/l7  (the seed's policy as written)"
set +e
zerotunnel analyze -f examples/seed/mesh.yaml -f examples/seed/l7
rc=$?
set -e
if [ "$rc" -ne 1 ]; then
  echo "demo: expected analyze to report the L7 policy (exit 1), got exit $rc" >&2
  exit 1
fi
cat >&2 <<'EOF'
The seed writes its first policy with a selector and HTTP attributes (GET /data). A node proxy cannot see
HTTP: in ambient mode such a rule is dropped, and the policy would deny app-b as well. That is why the
example attaches the HTTP rule to app-a's waypoint (targetRefs: Service app-a) and keeps only an identity
rule at the node proxy.
EOF

if [ "$keep" -eq 1 ]; then
  cat >&2 <<'EOF'

The mesh is still running. Explore it:
  zerotunnel status                                   nodes, pods, identities, certificate expiry
  zerotunnel exec -n namespace-b app-b -- curl -s http://app-a.namespace-a/data
  curl --cacert examples/seed/gateway/server-ca.crt --cert examples/seed/gateway/clients/partner-a.crt \
       --key examples/seed/gateway/clients/partner-a.key \
       --resolve app-a.example.com:443:<gateway IP from zerotunnel status> https://app-a.example.com/data
  zerotunnel logs -n namespace-a waypoint             the waypoint's log (one JSON line per request)
  zerotunnel logs node/node-1                         the node proxy's log (one JSON access line per connection)
Stop it with: zerotunnel down
EOF
fi
