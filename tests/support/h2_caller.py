"""A raw HTTP/2 CRI caller (PyPI `h2`, header validation off) that sends
any `:authority`, for tests/interop.rs.

Usage: H2_AUTHORITY=KIND h2_caller.py SOCKET IMAGE

KIND is `none` (no `:authority` at all), `empty`, `junk` (8 KiB of
arbitrary printable bytes that are no URI authority), `high` (the socket
path followed by bytes >= 0x80, which are no UTF-8), `path` (the socket
path), `percent` (the socket path percent-encoded) or `localhost`.

Makes the same calls as grpc_go_client on one connection, one stream
each, and prints one line per call: `name code digest-or-message`, where
code is the gRPC code's name, `RST_<reason>` for a stream reset, or
`GOAWAY_<reason>` for a connection error.
"""

import hashlib
import os
import random
import socket as sockets
import sys
import urllib.parse

import h2.config
import h2.connection
import h2.events

CODES = {0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED",
         5: "NOT_FOUND", 8: "RESOURCE_EXHAUSTED", 12: "UNIMPLEMENTED", 13: "INTERNAL",
         14: "UNAVAILABLE", 16: "UNAUTHENTICATED"}


def field(number, payload):
    out = bytearray([number << 3 | 2])
    n = len(payload)
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + payload


def authority(kind, socket):
    if kind == "none":
        return None
    if kind == "empty":
        return b""
    if kind == "junk":
        rng = random.Random(487)
        return bytes(rng.choice(b" !\"#$%&'()*+,-./0123456789:;<=>?@[\\]^_`{|}~abcXYZ") for _ in range(8192))
    if kind == "high":
        return socket.encode() + b"\xff\xfe\x80"
    if kind == "path":
        return socket.encode()
    if kind == "percent":
        return urllib.parse.quote(socket, safe="").encode()
    if kind == "localhost":
        return b"localhost"
    raise SystemExit(f"unknown AUTHORITY {kind}")


class Caller:
    def __init__(self, path, auth):
        self.sock = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)
        config = h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False,
            validate_inbound_headers=False, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(16 * 1024 * 1024)
        self.flush()
        self.auth = auth
        self.dead = None

    def flush(self):
        # The daemon may close the connection right after its GOAWAY: a
        # write can then fail before the GOAWAY is read. Keep going; the
        # read below finds the GOAWAY (or the end of the connection).
        try:
            self.sock.sendall(self.conn.data_to_send())
        except (BrokenPipeError, ConnectionResetError):
            pass

    def call(self, method, message):
        if self.dead:
            return self.dead, "-"
        sid = self.conn.get_next_available_stream_id()
        headers = [(b":method", b"POST"), (b":scheme", b"http"),
                   (b":path", b"/runtime.v1.ImageService/" + method.encode())]
        if self.auth is not None:
            headers.append((b":authority", self.auth))
        headers += [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
        self.conn.send_headers(sid, headers)
        self.conn.send_data(sid, b"\x00" + len(message).to_bytes(4, "big") + message, end_stream=True)
        self.flush()
        body, status, msg = b"", None, ""
        while True:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                self.dead = "EOF"
                return self.dead, "-"
            for ev in self.conn.receive_data(data):
                if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and ev.stream_id == sid:
                    for k, v in ev.headers:
                        if k == b"grpc-status":
                            status = int(v)
                        elif k == b"grpc-message":
                            msg = urllib.parse.unquote(v.decode())
                    if isinstance(ev, h2.events.TrailersReceived) or (ev.stream_ended and status is not None):
                        pass
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    body += ev.data
                    self.conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    self.flush()
                    return "RST_" + ev.error_code.name, "-"
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.dead = "GOAWAY_" + ev.error_code.name
                    return self.dead, "-"
                if isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    self.flush()
                    if status is None:
                        return "NO_STATUS", "-"
                    code = CODES.get(status, str(status))
                    if status != 0:
                        return code, msg.replace(" ", "_")
                    return code, hashlib.sha256(body[5:]).hexdigest()[:16]
            self.flush()


def main():
    path, image = sys.argv[1], sys.argv[2].encode()
    kind = os.environ.get("H2_AUTHORITY", "localhost")
    caller = Caller(path, authority(kind, path))
    spec = field(1, field(1, image))
    calls = [
        ("ImageFsInfo", "ImageFsInfo", b""),
        ("ListImages", "ListImages", b""),
        ("ImageStatus", "ImageStatus", spec),
        ("ImageStatus-missing", "ImageStatus", field(1, field(1, b"docker.io/library/nope:v1"))),
        ("Unknown", "NoSuchMethod", b""),
        ("PullImage", "PullImage", spec),
        ("ImageStatus-after-pull", "ImageStatus", spec),
        ("RemoveImage", "RemoveImage", spec),
        ("ImageStatus-after-remove", "ImageStatus", spec),
    ]
    for name, method, body in calls:
        code, digest = caller.call(method, body)
        if method == "ImageFsInfo" and code == "OK":
            digest = "-"  # its answer carries a timestamp
        print(name, code, digest, flush=True)


if __name__ == "__main__":
    main()
