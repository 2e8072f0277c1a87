"""zerotunnel.identity: SPIFFE workload identity, pure (no I/O, no clock: `now` is passed in).

spiffe   SpiffeId parse/format (SPIFFE-ID rules, Istio form)
csr      workload keys and ztunnel-shaped CSRs
ca       CertificateAuthority: roots, intermediates, plug-in CA loading, issuance (istio-ambient.md §3.3)
bundle   TrustBundle: roots per trust domain, several roots, aliases
verify   verify_peer: cryptography path validation + X.509-SVID rules, each rejection with a Reason
rotation refresh at half-life, jittered backoff, which certificate to serve
"""
