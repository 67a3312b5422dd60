"""A CRI caller built on gRPC C-core (PyPI grpcio), for tests/interop.rs.

Usage: grpc_client.py SOCKET IMAGE [watch:SECONDS | cancel:MS | echo]

Calls SOCKET with raw protobuf bytes, so no generated code is needed, and
prints one line per call: `name code sha256-of-answer-or-message`. Then
makes 600 calls from 32 threads on one channel, mixed with 20 pulls, and
prints how many did not end as expected.

With cancel:MS it starts a pull of IMAGE with no deadline, cancels it after
MS milliseconds while the channel stays open, and calls ImageFsInfo on the
same channel before and after; prints `pull CODE`, `during CODE`,
`after CODE` and `# ready N`, then `# holding`, and keeps the channel
open until its standard input closes.

With echo (against tests' scripted upstream) it sends an ImageStatus whose
message carries a field no CRI version defines and prints `echo same` when
the echoed answer is byte for byte the message sent, then calls
StreamImages asking for 5,000 messages and prints `stream N CODE`.

With watch:SECONDS it instead calls ImageFsInfo every 20 ms on one channel
until its standard input closes (or SECONDS pass), and prints
`unix-milliseconds code message` for each call, then `# ready N`: how many
times the channel became ready (1 when it kept one connection throughout).

GRPC_PY_AUTHORITY=localhost sets `grpc.default_authority` to `localhost`, as
kubelet >= 1.31 sends it; unset, the channel has grpcio's default options
and sends the percent-encoded socket path (tests/authority.rs).
"""

import os

import concurrent.futures
import hashlib
import sys
import threading
import time

import grpc


def field(number, payload):
    """A length-delimited protobuf field (payloads under 128 bytes)."""
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def call(channel, method, body):
    rpc = channel.unary_unary(
        "/runtime.v1.ImageService/" + method,
        request_serializer=None,
        response_deserializer=None,
    )
    try:
        answer = rpc(body, timeout=60)
        return "OK", hashlib.sha256(answer).hexdigest()[:16], answer
    except grpc.RpcError as e:
        return e.code().name, e.details(), b""


def count_ready(channel):
    """A list that grows by one each time `channel` becomes ready."""
    ready = []
    channel.subscribe(
        lambda state: ready.append(1) if state == grpc.ChannelConnectivity.READY else None,
        try_to_connect=True,
    )
    return ready


def watch(channel, seconds):
    stop = threading.Event()

    def wait_for_stdin():
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_stdin, daemon=True).start()
    ready = count_ready(channel)
    rpc = channel.unary_unary(
        "/runtime.v1.ImageService/ImageFsInfo",
        request_serializer=None,
        response_deserializer=None,
    )
    deadline = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            rpc(b"", timeout=5)
            code, message = "OK", "-"
        except grpc.RpcError as e:
            code, message = e.code().name, (e.details() or "").replace(" ", "_")
        print(int(time.time() * 1000), code, message, flush=True)
        stop.wait(0.02)
    print("# ready", len(ready), flush=True)


def cancel_pull(channel, spec, wait):
    ready = count_ready(channel)
    pull = channel.unary_unary(
        "/runtime.v1.ImageService/PullImage",
        request_serializer=None,
        response_deserializer=None,
    ).future(spec)
    time.sleep(wait)
    during = call(channel, "ImageFsInfo", b"")[0]
    pull.cancel()
    try:
        pull.result()
        code = "OK"
    except grpc.FutureCancelledError:
        code = "CANCELLED"
    except grpc.RpcError as e:
        code = e.code().name
    after = call(channel, "ImageFsInfo", b"")[0]
    print("pull", code)
    print("during", during)
    print("after", after)
    print("# ready", len(ready), flush=True)
    # The channel stays open until standard input closes, so that the test
    # can watch containerd give up the pull while it is (the reset must do
    # it, not the connection's teardown).
    print("# holding", flush=True)
    sys.stdin.read()
    channel.close()


def echo(channel, image):
    # ImageStatusRequest { image: { image }, verbose: true } + field 99.
    message = field(1, field(1, image)) + b"\x10\x01" + b"\x9a\x06\x03new"
    rpc = channel.unary_unary(
        "/runtime.v1.ImageService/ImageStatus",
        request_serializer=None,
        response_deserializer=None,
    )
    answer = rpc(message, timeout=30, metadata=[("x-script", "echo")])
    print("echo", "same" if answer == message else "differs", flush=True)
    stream = channel.unary_stream(
        "/runtime.v1.ImageService/StreamImages",
        request_serializer=None,
        response_deserializer=None,
    )
    count, code = 0, "OK"
    try:
        for _ in stream(b"", timeout=60, metadata=[("x-script", "stream:5000")]):
            count += 1
    except grpc.RpcError as e:
        code = e.code().name
    print("stream", count, code, flush=True)


def main():
    socket, image = sys.argv[1], sys.argv[2].encode()
    authority = os.environ.get("GRPC_PY_AUTHORITY")
    options = [("grpc.default_authority", authority)] if authority else []
    channel = grpc.insecure_channel("unix://" + socket, options=options)
    if len(sys.argv) > 3 and sys.argv[3].startswith("watch:"):
        watch(channel, int(sys.argv[3][len("watch:"):]))
        return
    if len(sys.argv) > 3 and sys.argv[3] == "echo":
        echo(channel, image)
        return
    if len(sys.argv) > 3 and sys.argv[3].startswith("cancel:"):
        cancel_pull(channel, field(1, field(1, image)), int(sys.argv[3][len("cancel:"):]) / 1000)
        return
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
        code, digest, _ = call(channel, method, body)
        if method == "ImageFsInfo" and code == "OK":
            digest = "-"  # its answer carries a timestamp
        print(name, code, digest if code == "OK" else digest.replace(" ", "_"), flush=True)

    mixed = [("ListImages", b""), ("ImageStatus", spec), ("ImageFsInfo", b"")]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(call, channel, *mixed[i % 3]) for i in range(600)]
        futures += [pool.submit(call, channel, "PullImage", spec) for _ in range(20)]
        codes = [f.result()[0] for f in futures]
    print("concurrent", len(codes), sum(1 for c in codes if c != "OK"), flush=True)


if __name__ == "__main__":
    main()
