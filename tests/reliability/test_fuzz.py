"""Hypothesis fuzzing of every parser that meets untrusted input (security.md §4 item 30, issue 9).

The targets live in fuzz/targets.py and are shared with the coverage-guided atheris harness
(fuzz/run.py, `make fuzz`). Here each target gets unstructured bytes plus a structured strategy that
reaches deeper (well-formed HTTP/2 frames in hostile orders, mutated valid YAML/CSRs/certificates,
SPIFFE-looking text, path-looking text). Pass: only the declared error type, properties hold, and
no single input takes more than 1 s. The recorded corpus (fuzz/corpus/<target>/) is replayed first.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[2]
T: Any = None


@pytest.fixture(scope="module", autouse=True)
def _targets(rel: Any) -> None:
    global T
    T = rel.fuzz_targets()


def check(name: str, data: bytes) -> None:
    allowed = T.ALLOWED[name]
    t0 = time.perf_counter()
    with contextlib.suppress(allowed):
        T.TARGETS[name](data)
    took = time.perf_counter() - t0
    assert took < T.SLOW_S, f"{name}: {took:.2f} s for {data[:200]!r}"


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOWER = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "fuzz" / "corpus").iterdir()))
def test_recorded_corpus(rel: Any, name: str) -> None:
    """Every recorded input (seeds and minimized findings) replays clean."""
    files = sorted((ROOT / "fuzz" / "corpus" / name).iterdir())
    assert files
    for f in files:
        check(name, f.read_bytes())


# -- HBONE authority and headers ------------------------------------------------------------------

_octet = st.integers(0, 255).map(str)
_authority_text = st.one_of(
    st.tuples(_octet, _octet, _octet, _octet, st.integers(-5, 70000)).map(
        lambda t: f"{t[0]}.{t[1]}.{t[2]}.{t[3]}:{t[4]}"),
    st.tuples(st.ip_addresses(v=6).map(str), st.integers(0, 70000)).map(lambda t: f"[{t[0]}]:{t[1]}"),
    st.tuples(st.from_regex(r"[a-z0-9.-]{1,20}", fullmatch=True), st.integers(0, 70000)).map(
        lambda t: f"{t[0]}:{t[1]}"),
    st.text(alphabet="0123456789.:[]abcdef%@_ \t\r\n\x00+-", max_size=40),
)
_injected = st.tuples(_authority_text, st.sampled_from(["", "\n", "\r\n", " ", "\x00", "\t", "%0a"]),
                      st.booleans()).map(lambda t: t[0] + t[1] if t[2] else t[1] + t[0])


@FAST
@given(st.one_of(st.binary(max_size=80), _injected.map(lambda s: s.encode("utf-8", "replace"))))
def test_authority(data: bytes) -> None:
    check("authority", data)


@FAST
@given(st.one_of(st.binary(max_size=300),
                 st.text(alphabet="abk=,;\"' \t.host\x00\xff", max_size=120).map(
                     lambda s: s.encode("latin-1"))))
def test_baggage_and_forwarded(data: bytes) -> None:
    check("headers", data)


# -- HTTP/2 frame sequences into the HBONE server (byte level, sans-IO) ----------------------------

_sid = st.sampled_from([0, 1, 3, 5, 7, 2, 2**31 - 1])
_flags = st.lists(st.sampled_from(["END_STREAM", "END_HEADERS", "ACK", "PADDED", "PRIORITY"]), max_size=3)


def _headers_block(authority: str, method: str) -> bytes:
    import hpack

    return bytes(hpack.Encoder().encode([(":method", method), (":authority", authority)]))


@st.composite
def frame(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["headers", "data", "rst", "settings", "ping", "window", "priority",
                                 "continuation", "goaway", "junk"]))
    sid = draw(_sid)
    try:
        if kind == "headers":
            block = draw(st.one_of(
                st.builds(_headers_block, st.sampled_from(["127.0.0.1:8080", "x:1", "", "[::1]:80"]),
                          st.sampled_from(["CONNECT", "GET", "connect"])),
                st.binary(max_size=64)))
            flags = draw(st.lists(st.sampled_from(["END_STREAM", "END_HEADERS"]), max_size=2, unique=True))
            return HeadersFrame(sid or 1, block, flags=flags).serialize()
        if kind == "data":
            return DataFrame(sid or 1, draw(st.binary(max_size=64)),
                             flags=draw(st.lists(st.just("END_STREAM"), max_size=1))).serialize()
        if kind == "rst":
            return RstStreamFrame(sid or 1, error_code=draw(st.integers(0, 20))).serialize()
        if kind == "settings":
            values = draw(st.dictionaries(st.integers(1, 9), st.integers(0, 2**32 - 1), max_size=3))
            return SettingsFrame(0, settings=values).serialize()
        if kind == "ping":
            return PingFrame(0, opaque_data=draw(st.binary(min_size=8, max_size=8)),
                             flags=draw(st.lists(st.just("ACK"), max_size=1))).serialize()
        if kind == "window":
            return WindowUpdateFrame(sid, window_increment=draw(st.integers(1, 2**31 - 1))).serialize()
        if kind == "priority":
            weight = draw(st.integers(0, 255))
            return PriorityFrame(sid or 1, depends_on=draw(_sid), stream_weight=weight).serialize()
        if kind == "continuation":
            return ContinuationFrame(sid or 1, draw(st.binary(max_size=32)),
                                     flags=draw(st.lists(st.just("END_HEADERS"), max_size=1))).serialize()
        if kind == "goaway":
            return GoAwayFrame(0, last_stream_id=draw(_sid), error_code=draw(st.integers(0, 20))).serialize()
    except (ValueError, TypeError):  # hyperframe refuses some combinations itself
        return b""
    # junk: a frame header with arbitrary type/flags/length claims and body
    return draw(st.binary(min_size=9, max_size=40))


_frames = st.lists(frame(), max_size=30).map(b"".join)


@FAST
@given(_frames)
def test_h2_frame_sequences_into_server(data: bytes) -> None:
    check("h2_server", data)


@SLOWER
@given(st.binary(max_size=2000))
def test_h2_bytes_into_server(data: bytes) -> None:
    check("h2_server", data)
    check("h2_server_raw", data)


@FAST
@given(st.one_of(_frames, st.binary(max_size=1000)))
def test_h2_from_hostile_server_into_client(data: bytes) -> None:
    check("h2_client", data)


@pytest.mark.slow
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=_frames)
def test_h2_frame_sequences_after_real_tls_handshake(env: Any, rel: Any, data: bytes) -> None:
    """The same frame sequences over a real mTLS connection to a real 15008 server; afterwards a
    legitimate client still gets its tunnel and no socket or tunnel of the attacker remains."""

    async def main() -> None:
        app = await env.app("echo")
        server = await env.server()
        from zerotunnel.node.tls import client_context

        reader, writer = await asyncio.open_connection(
            *server.address, ssl=client_context(env.client_creds), server_hostname=""
        )
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize() + data)
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(reader.read(1 << 16), 0.3)
        writer.transport.abort()
        assert await rel.Probe(env, server, app).once()
        for _ in range(50):
            if server.open_sockets == 0 and not server.live:
                break
            await asyncio.sleep(0.02)
        assert server.open_sockets == 0 and not server.live
        await env.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))


# -- YAML config ----------------------------------------------------------------------------------

_SEEDS = [p.read_text() for p in sorted((ROOT / "examples").rglob("*.yaml"))][:6]


@st.composite
def mutated_yaml(draw: st.DrawFn) -> bytes:
    text = draw(st.sampled_from(_SEEDS))
    lines = text.splitlines()
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["delete", "dup", "indent", "dedent", "replace", "insert", "truncate"]))
        if op == "delete":
            del lines[i]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "indent":
            lines[i] = "  " + lines[i]
        elif op == "dedent":
            lines[i] = lines[i].lstrip()
        elif op == "replace" and ":" in lines[i]:
            key = lines[i].split(":", 1)[0]
            val = draw(st.sampled_from(["", " yes", " no", " ~", " 0x1F", " 1e309", " [", " {a: b}", " &a",
                                        " *a", " !!python/object:os.system", " 99999999999999999999",
                                        " '\\x00'", " -1", " .inf"]))
            lines[i] = key + ":" + val
        elif op == "insert":
            lines.insert(i, draw(st.sampled_from(["---", "...", "%YAML 1.1", "? x", "- - -", "\t",
                                                  "kind: Pod", "<<: *x", "apiVersion: v1"])))
        elif op == "truncate":
            lines = lines[:i]
    return "\n".join(lines).encode()


@SLOWER
@given(st.one_of(mutated_yaml(), st.binary(max_size=300)))
def test_config_yaml(data: bytes) -> None:
    check("config", data)


# -- CSRs into the CA -----------------------------------------------------------------------------

_KEY = ec.generate_private_key(ec.SECP256R1())


def _csr(names: list[x509.GeneralName], cn: str | None, dup: bool) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if dup:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


_name = st.one_of(
    st.just(x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/fuzz")),
    st.just(x509.UniformResourceIdentifier("spiffe://cluster.local/ns/kube-system/sa/admin")),
    st.just(x509.UniformResourceIdentifier("https://evil.example")),
    st.just(x509.DNSName("istiod.istio-system.svc")),
    st.just(x509.RFC822Name("a@b.c")),
)
_CSR = _csr([], None, False)
_CSR_DER = x509.load_pem_x509_csr(_CSR).public_bytes(serialization.Encoding.DER)


def _flip(blob: bytes, rnd: random.Random, n: int) -> bytes:
    b = bytearray(blob)
    for _ in range(n):
        b[rnd.randrange(len(b))] = rnd.randrange(256)
    return bytes(b)


@SLOWER
@given(st.one_of(
    st.builds(_csr, st.lists(_name, max_size=3), st.one_of(st.none(), st.just("spiffe://x/evil")),
              st.booleans()),
    st.builds(_flip, st.just(_CSR_DER), st.randoms(use_true_random=False), st.integers(1, 8)),
    st.binary(max_size=200),
))
def test_csr_into_ca(data: bytes) -> None:
    check("csr", data)


# -- certificates into verify_peer ----------------------------------------------------------------


def _pem_wrap(blob: bytes) -> bytes:
    import base64

    return b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(blob) + b"-----END CERTIFICATE-----\n"


@SLOWER
@given(st.one_of(st.binary(max_size=400), st.binary(max_size=300).map(_pem_wrap)))
def test_arbitrary_bytes_into_verify_peer(data: bytes) -> None:
    check("verify", data)


@SLOWER
@given(st.randoms(use_true_random=False), st.integers(1, 6), st.booleans())
def test_mutated_leaf_into_verify_peer(rel: Any, rnd: random.Random, flips: int, pem: bool) -> None:
    """Valid-looking DER with a few bytes changed: a signature can no longer verify, so every
    mutant must be refused (the target raises on any acceptance)."""
    der = rel.fuzz_leaf_der()
    mutant = _flip(der, rnd, flips)
    if mutant == der:
        return
    if pem:
        mutant = _pem_wrap(mutant)
    check("verify", mutant)


# -- SPIFFE IDs and paths -------------------------------------------------------------------------

_spiffe_text = st.tuples(
    st.sampled_from(["spiffe://", "SPIFFE://", "spiffe:/", "spiffe:///", "", "spiffe://\x00"]),
    st.text(alphabet="abc.-_:@%2F1/ \x00\u00e9", max_size=20),
    st.text(alphabet="abc/.-_%2E?#\x00 :", max_size=30),
).map(lambda t: t[0] + t[1] + t[2])


@FAST
@given(st.one_of(_spiffe_text.map(lambda s: s.encode()), st.binary(max_size=80)))
def test_spiffe_id(data: bytes) -> None:
    check("spiffe", data)


_path_text = st.text(alphabet="/.\\%2eE5cCfF0;?#a:@", max_size=40)


@FAST
@given(st.integers(0, 255), _path_text)
def test_path_normalization_idempotent(mode: int, text: str) -> None:
    check("path", bytes([mode]) + text.encode())


def test_double_encoding_creates_dot_segments() -> None:
    """Found by fuzz/run.py (path target, atheris): `/%%6161` → `/%a61` → `/%A61` (not idempotent).
    The exploitable form: DENY `/admin*` is matched against `/x/%2e%2e/admin`, which is forwarded
    as is, and a backend that percent-decodes before resolving dot segments serves `/admin`. Fixed:
    malformed percent-encoding is a 400 before any decoding."""
    from zerotunnel.policy.normalize import BadRequest, normalize

    for target in ("/x/%%32%65%%32%65/admin", "/%%6161"):
        with pytest.raises(BadRequest):
            normalize(target, "BASE")
