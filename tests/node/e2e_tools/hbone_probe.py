"""A deliberately plain HBONE client for e2e tests: TLS 1.3 + h2 CONNECT with whatever certificate it is
given, printing one line: `STATUS <code>` when the server answered the CONNECT, `REFUSED <reason>` when the
TLS session was refused or closed before any answer.

Usage: hbone_probe.py HOST PORT AUTHORITY [CERT KEY] [--tls12]
"""

from __future__ import annotations

import socket
import ssl
import sys

import h2.config
import h2.connection
import h2.events


def main() -> None:
    host, port, authority = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    rest = [a for a in sys.argv[4:] if not a.startswith("--")]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if "--tls12" in sys.argv:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    if rest:
        ctx.load_cert_chain(rest[0], rest[1])
    try:
        raw = socket.create_connection((host, port), timeout=5)
        tls = ctx.wrap_socket(raw)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "CONNECT"), (":authority", authority)])
        tls.sendall(conn.data_to_send())
        while True:
            data = tls.recv(65536)
            if not data:
                print("REFUSED eof")
                return
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers).get(b":status", b"?").decode()
                    print(f"STATUS {status}")
                    return
                if isinstance(event, h2.events.ConnectionTerminated | h2.events.StreamReset):
                    print(f"REFUSED {type(event).__name__}")
                    return
            tls.sendall(conn.data_to_send())
    except (ssl.SSLError, OSError) as exc:
        print(f"REFUSED {exc}")


if __name__ == "__main__":
    main()
