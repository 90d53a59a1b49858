"""An independent HBONE peer (client or server) built only from the protocol description, to check our Rust side interoperates with a second implementation.

HBONE: TCP -> TLS 1.3 with client and server certificates -> HTTP/2 (ALPN h2) -> one CONNECT
stream per proxied connection, with `:authority ip:port` and no `:scheme`/`:path`.
Peers are authenticated by the single SPIFFE URI SAN of their leaf certificate.

  client --connect HOST:PORT --authority IP:PORT --cert C --key K --ca ROOT
         --expect-identity spiffe://... --send TEXT [--repeat N] [--half-close]
  server --listen IP:PORT --cert C --key K --ca ROOT

The client prints one JSON line {"status", "received", "peer_identity"} and exits 0 on 200.
The server prints {"listening": "ip:port"} once bound (port 0 picks a free one), then one JSON
line per CONNECT stream, and echoes each stream prefixed once with
"hello <client spiffe id> via <authority>\n".
Needs the PyPI `h2` package (pip install h2).
"""

import argparse
import json
import secrets
import socket
import ssl
import sys
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions

TIMEOUT = 10.0
READ_SIZE = 65536


def split_host_port(text):
    """'1.2.3.4:80' or '[::1]:80' -> (host, port)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def spiffe_ids(cert):
    """URI SANs that are SPIFFE ids, from ssl's getpeercert() dict."""
    return [
        value
        for kind, value in (cert or {}).get("subjectAltName", ())
        if kind == "URI" and value.startswith("spiffe://")
    ]


def tls_context(server, cert, key, ca):
    """TLS 1.3 only, mutual authentication against `ca`, ALPN h2."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(cafile=ca)
    # Identity is the URI SAN, checked by hand after the handshake; there is no host name.
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    if server:
        # HBONE peers never resume sessions, so do not hand out tickets.
        ctx.num_tickets = 0
    return ctx


def send_available(conn, stream_id, pending):
    """Send as much of `pending` (a bytearray, consumed in place) as flow control allows."""
    while pending:
        window = conn.local_flow_control_window(stream_id)
        size = min(len(pending), window, conn.max_outbound_frame_size)
        if size <= 0:
            return
        conn.send_data(stream_id, bytes(pending[:size]))
        del pending[:size]


# ---------------------------------------------------------------- client


def run_client(args):
    out = {"status": None, "received": "", "peer_identity": None}
    try:
        client_exchange(args, out)
    except Exception as e:  # The JSON line is the result either way; say what went wrong.
        out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out), flush=True)
    return 0 if out["status"] == 200 and "error" not in out else 1


def client_exchange(args, out):
    deadline = time.monotonic() + TIMEOUT
    ctx = tls_context(False, args.cert, args.key, args.ca)
    raw = socket.create_connection(split_host_port(args.connect), timeout=TIMEOUT)
    # server_hostname=None: HBONE clients send no SNI.
    sock = ctx.wrap_socket(raw, server_hostname=None)
    if sock.selected_alpn_protocol() != "h2":
        raise RuntimeError(f"ALPN {sock.selected_alpn_protocol()!r}, want h2")
    ids = spiffe_ids(sock.getpeercert())
    out["peer_identity"] = ids[0] if ids else None
    if args.expect_identity not in ids:
        raise RuntimeError(f"server identities {ids} do not include {args.expect_identity}")

    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    local_ip, local_port = sock.getsockname()[:2]
    conn.send_headers(
        stream_id,
        [
            (":method", "CONNECT"),
            (":authority", args.authority),
            ("forwarded", f'for="{local_ip}:{local_port}"'),
            ("baggage", "k8s.cluster.name=interop,k8s.namespace.name=python,service.name=hbone-peer"),
            ("traceparent", f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"),
        ],
    )
    sock.sendall(conn.data_to_send())

    text = args.send.encode() * args.repeat
    pending = bytearray()
    received = bytearray()
    state = {"ended": False, "sent_end": False}

    def handle(events):
        for ev in events:
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == stream_id:
                status = dict(ev.headers).get(":status")
                out["status"] = int(status) if status else None
                if out["status"] == 200:
                    pending.extend(text)
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == stream_id:
                received.extend(ev.data)
                # Hand the window back as soon as the bytes are ours, or the server stalls.
                conn.acknowledge_received_data(ev.flow_controlled_length, stream_id)
            elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                if ev.stream_id == stream_id:
                    state["ended"] = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                state["ended"] = True

    while not state["ended"]:
        if out["status"] == 200 and not state["sent_end"]:
            send_available(conn, stream_id, pending)
            # --half-close ends our side right after the data; otherwise only once the
            # payload has come back, so the server answers while both sides are open.
            if not pending and (args.half_close or text in received):
                conn.end_stream(stream_id)
                state["sent_end"] = True
        sock.sendall(conn.data_to_send())
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("server did not end the stream in time")
        sock.settimeout(remaining)
        data = sock.recv(READ_SIZE)
        if not data:
            break
        handle(conn.receive_data(data))
    out["received"] = received.decode("utf-8", errors="replace")
    try:
        conn.close_connection()
        sock.sendall(conn.data_to_send())
        sock.close()
    except OSError:
        pass


# ---------------------------------------------------------------- server

stdout_lock = threading.Lock()


def log(record):
    with stdout_lock:
        print(json.dumps(record), flush=True)


class ServerConnection:
    """One HBONE connection: runs on its own thread until the peer goes away."""

    def __init__(self, sock, addr):
        self.sock = sock
        self.addr = addr
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.peer = None
        # stream id -> {"pending": bytearray, "remote_ended": bool}
        self.streams = {}

    def run(self):
        try:
            self.sock.settimeout(60)
            ids = spiffe_ids(self.sock.getpeercert())
            self.peer = ids[0] if ids else None
            self.conn.initiate_connection()
            self.flush()
            while True:
                data = self.sock.recv(READ_SIZE)
                if not data:
                    return
                for ev in self.conn.receive_data(data):
                    self.on_event(ev)
                self.pump()
        except (OSError, h2.exceptions.ProtocolError) as e:
            log({"connection_error": f"{type(e).__name__}: {e}", "peer": str(self.addr)})
        finally:
            self.sock.close()

    def on_event(self, ev):
        if isinstance(ev, h2.events.RequestReceived):
            self.on_request(ev.stream_id, ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            # The bytes are buffered for the echo right away, so the window can be returned
            # at once; a test peer can afford the memory.
            # Frames that arrive for a stream we already answered still count against the
            # connection window, so they are acknowledged too.
            self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            stream = self.streams.get(ev.stream_id)
            if stream is not None:
                stream["pending"].extend(ev.data)
        elif isinstance(ev, h2.events.StreamEnded):
            stream = self.streams.get(ev.stream_id)
            if stream is not None:
                stream["remote_ended"] = True
        elif isinstance(ev, h2.events.StreamReset):
            self.streams.pop(ev.stream_id, None)

    def on_request(self, stream_id, headers):
        fields = dict(headers)
        method = fields.get(":method")
        authority = fields.get(":authority")
        # HBONE's CONNECT carries only :method and :authority (RFC 9113 section 8.5).
        if method != "CONNECT" or not authority or ":scheme" in fields or ":path" in fields:
            self.conn.send_headers(stream_id, [(":status", "400")], end_stream=True)
            return
        log(
            {
                "authority": authority,
                "peer_identity": self.peer,
                "forwarded": fields.get("forwarded"),
                "baggage": fields.get("baggage"),
                "traceparent": fields.get("traceparent"),
            }
        )
        self.conn.send_headers(
            stream_id, [(":status", "200"), ("baggage", "k8s.namespace.name=python")]
        )
        greeting = f"hello {self.peer} via {authority}\n".encode()
        self.streams[stream_id] = {"pending": bytearray(greeting), "remote_ended": False}

    def pump(self):
        """Echo what flow control allows; end each stream once the client ended and all is sent."""
        for stream_id, stream in list(self.streams.items()):
            try:
                send_available(self.conn, stream_id, stream["pending"])
                if stream["remote_ended"] and not stream["pending"]:
                    self.conn.end_stream(stream_id)
                    del self.streams[stream_id]
            except h2.exceptions.StreamClosedError:
                # The client reset it meanwhile; nothing more to echo.
                self.streams.pop(stream_id, None)
        self.flush()

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)


def run_server(args):
    ctx = tls_context(True, args.cert, args.key, args.ca)
    host, port = split_host_port(args.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(64)
    bound = listener.getsockname()
    log({"listening": f"{bound[0]}:{bound[1]}" if family == socket.AF_INET else f"[{bound[0]}]:{bound[1]}"})
    while True:
        raw, addr = listener.accept()
        threading.Thread(target=serve_one, args=(ctx, raw, addr), daemon=True).start()


def serve_one(ctx, raw, addr):
    try:
        raw.settimeout(TIMEOUT)
        sock = ctx.wrap_socket(raw, server_side=True)
    except (OSError, ssl.SSLError) as e:
        log({"handshake_error": f"{type(e).__name__}: {e}", "peer": f"{addr[0]}:{addr[1]}"})
        raw.close()
        return
    if sock.selected_alpn_protocol() != "h2":
        log({"handshake_error": f"ALPN {sock.selected_alpn_protocol()!r}", "peer": f"{addr[0]}:{addr[1]}"})
        sock.close()
        return
    ServerConnection(sock, addr).run()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    client = sub.add_parser("client")
    client.add_argument("--connect", required=True, help="HBONE listener, HOST:PORT")
    client.add_argument("--authority", required=True, help="CONNECT target, IP:PORT")
    client.add_argument("--expect-identity", required=True, help="server's SPIFFE id")
    client.add_argument("--send", required=True, help="text to send on the stream")
    client.add_argument("--repeat", type=int, default=1, help="send TEXT this many times")
    client.add_argument("--half-close", action="store_true", help="end our side right after sending")
    server = sub.add_parser("server")
    server.add_argument("--listen", required=True, help="IP:PORT (port 0 picks one)")
    for p in (client, server):
        p.add_argument("--cert", required=True)
        p.add_argument("--key", required=True)
        p.add_argument("--ca", required=True, help="root certificate (PEM)")
    args = parser.parse_args()
    if args.mode == "client":
        sys.exit(run_client(args))
    try:
        run_server(args)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
