"""CSR → signed chain issuance rate of the mesh CA, next to `openssl speed ecdsap256` on the same machine.

What one issuance costs (CertificateAuthority.issue, as the CA's CreateCertificate handler runs it):
parse the PEM CSR, verify its signature (one ECDSA verify), build the leaf, sign it (one ECDSA
sign), PEM-encode, assemble leaf → intermediates → root bundle. So the natural ceiling is about
1/(1/sign + 1/verify) of openssl's raw rates; the ratio printed is issuance/s ÷ openssl sign/s.

Run: .venv/bin/python bench/bench_issuance.py [--seconds 3] [--tiers 2]
CSRs are made before timing (key generation is the client's cost, not the CA's).
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import time
from datetime import UTC, datetime

from zerotunnel.identity.ca import CertificateAuthority
from zerotunnel.identity.csr import generate_key, make_csr
from zerotunnel.identity.spiffe import SpiffeId


def openssl_ecdsa_p256(seconds: int) -> tuple[float, float, str]:
    """(sign/s, verify/s, openssl version) from `openssl speed -seconds N ecdsap256`."""
    out = subprocess.run(
        ["openssl", "speed", "-seconds", str(seconds), "ecdsap256"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    version = subprocess.run(
        ["openssl", "version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    for line in out.splitlines():
        match = re.match(r"\s*256 bits ecdsa \(nistp256\)\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)", line)
        if match:
            return float(match.group(1)), float(match.group(2)), version
    raise RuntimeError(f"no nistp256 line in openssl speed output:\n{out}")


def issuance_rate(seconds: float, tiers: int) -> tuple[float, int]:
    now = datetime.now(UTC)
    ca = CertificateAuthority.create_root("cluster.local", now)
    for _ in range(tiers - 1):
        ca = CertificateAuthority.create_intermediate(ca, now)
    requests = []
    for i in range(64):
        identity = SpiffeId.istio("cluster.local", f"ns{i}", f"sa{i}")
        requests.append((make_csr(identity, generate_key()), identity))
    for csr, identity in requests[:8]:  # warm-up
        ca.issue(csr, identity, now)
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for csr, identity in requests:
            ca.issue(csr, identity, now)
        count += len(requests)
    return count / (time.perf_counter() - start), count


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--tiers", type=int, default=2, help="1 = root signs, 2 = intermediate signs, ...")
    args = parser.parse_args()
    rate, count = issuance_rate(args.seconds, args.tiers)
    sign, verify, version = openssl_ecdsa_p256(args.seconds)
    ceiling = 1 / (1 / sign + 1 / verify)
    print(f"date           {datetime.now(UTC).isoformat(timespec='seconds')}")
    print(f"machine        {platform.machine()} / {cpu_model()} / {platform.python_version()}")
    print(f"issuance       {rate:,.0f} CSR->chain/s ({count} in {args.seconds}s, {args.tiers}-tier CA)")
    print(f"openssl        {sign:,.0f} sign/s, {verify:,.0f} verify/s ecdsap256 ({version})")
    print(f"ratio          {rate / sign:.3f} of openssl sign/s; {rate / ceiling:.3f} of sign+verify ceiling")


if __name__ == "__main__":
    main()
