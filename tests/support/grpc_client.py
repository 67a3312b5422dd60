"""A CRI caller built on gRPC C-core (PyPI grpcio), for tests/interop.rs.

Usage: grpc_client.py SOCKET IMAGE

Calls SOCKET with raw protobuf bytes, so no generated code is needed, and
prints one line per call: `name code sha256-of-answer-or-message`. Then
makes 600 calls from 32 threads on one channel, mixed with 20 pulls, and
prints how many did not end as expected.
"""

import concurrent.futures
import hashlib
import sys

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


def main():
    socket, image = sys.argv[1], sys.argv[2].encode()
    channel = grpc.insecure_channel("unix://" + socket)
    spec = field(1, field(1, image))
    calls = [
        ("ListImages", "ListImages", b""),
        ("ImageStatus", "ImageStatus", spec),
        ("ImageStatus-missing", "ImageStatus", field(1, field(1, b"docker.io/library/nope:v1"))),
        ("Unknown", "NoSuchMethod", b""),
        ("PullImage", "PullImage", spec),
        ("ImageStatus-after-pull", "ImageStatus", spec),
    ]
    for name, method, body in calls:
        code, digest, _ = call(channel, method, body)
        print(name, code, digest if code == "OK" else digest.replace(" ", "_"), flush=True)

    mixed = [("ListImages", b""), ("ImageStatus", spec), ("ImageFsInfo", b"")]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(call, channel, *mixed[i % 3]) for i in range(600)]
        futures += [pool.submit(call, channel, "PullImage", spec) for _ in range(20)]
        codes = [f.result()[0] for f in futures]
    print("concurrent", len(codes), sum(1 for c in codes if c != "OK"), flush=True)


if __name__ == "__main__":
    main()
