#!/usr/bin/env bash
# The main job. Today: create a mesh CA and a plug-in intermediate, issue the seed scenario's three
# workload identities, inspect and verify them (with zerotunnel and with openssl).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
work=$(mktemp -d /tmp/zerotunnel-demo.XXXXXX)
echo "== mesh CA in $work" >&2
zerotunnel ca init --dir "$work/root" --trust-domain cluster.local
zerotunnel ca init --dir "$work/cacerts" --intermediate-of "$work/root"
for who in a:namespace-a:service-account-a b:namespace-b:service-account-b c:namespace-c:service-account-c; do
  IFS=: read -r app ns sa <<<"$who"
  id="spiffe://cluster.local/ns/$ns/sa/$sa"
  zerotunnel ca issue --dir "$work/cacerts" --spiffe-id "$id" --cert-out "$work/app-$app.pem" --key-out "$work/app-$app.key"
  zerotunnel ca verify --bundle "$work/cacerts/root-cert.pem" --cert "$work/app-$app.pem" --expect-id "$id"
done
zerotunnel ca inspect "$work/app-a.pem"
echo "== openssl verify" >&2
# app-a.pem holds the leaf then the intermediate; openssl wants the leaf alone and the rest as -untrusted.
openssl x509 -in "$work/app-a.pem" -out "$work/app-a.leaf.pem"
openssl verify -CAfile "$work/cacerts/root-cert.pem" -untrusted "$work/cacerts/cert-chain.pem" "$work/app-a.leaf.pem"
echo "files are in $work" >&2
