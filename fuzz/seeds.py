"""Write the seed corpus (``fuzz/corpus/<target>/``): small valid inputs of each kind, and a few
near misses, from which libFuzzer mutates. ``python fuzz/seeds.py`` rewrites them (deterministic)."""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from exports import make_export  # noqa: E402
from mmcache.ops.export_format import MANIFEST  # noqa: E402
from mmcache_client import wire  # noqa: E402
from mmcache_client.format import plan_entry  # noqa: E402
from mmcache_client.keys import content_hash  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
H = content_hash(b"seed")


def entry(ns="ns", hx=H, rows=3, dtype=np.float32, extra=False) -> bytes:
    tensors = {"embeddings": np.arange(rows * 4, dtype=np.float32).reshape(rows, 4).astype(dtype)}
    if extra:
        tensors["grid"] = np.array([1, 2, 2], dtype=np.int64)
    plan = plan_entry(ns, hx, tensors, {"created_at": "1700000000.0"}, encode_ms=2.0)
    out = bytearray(plan.total_bytes)
    plan.write_into(out)
    return bytes(out)


def frame(op: str, body: bytes | dict, msg_id: int = 1) -> bytes:
    raw = body if isinstance(body, bytes) else wire.json_body(body)
    return wire.frame(msg_id, wire.OP_CODES[op], raw)


def unix_sessions() -> list[bytes]:
    key, blob = f"ns/{H}", entry()
    put = frame("reserve", {"key": key, "nbytes": len(blob)}) + frame("seal", {"key": key, "durable": True})
    read = frame("lookup", {"keys": [key, "ns/" + "0" * 64]}) + frame("lease", wire.keys_body([key])) \
        + frame("release", f"{key}\t0".encode()) + frame("scan", wire.keys_body([key]))
    admin = frame("stats", {}) + frame("list", {"namespace": "ns", "limit": 10}) \
        + frame("claim", {"keys": [key], "owner": "enc", "ttl_ms": 500}) + frame("unclaim", {"keys": [key], "owner": "enc"})
    tenant = frame("hello", {"token": "alice-token-0123456789abcdef", "protocol": 3}) \
        + frame("reserve", {"key": key, "nbytes": 4096}) + frame("abort", {"key": key}) + frame("delete", {"key": key})
    answer = wire.pack_leases([wire.LeaseLoc(256, len(blob), "host", key, wire.Layout("F32", 128, 3, 4)), None,
                               wire.LeaseLoc(wire.IN_LMDB, len(blob), "disk", f"alice@{key}", None)])
    return [frame("hello", {"protocol": 3}) + put + read, read + admin, tenant, admin,
            b"L" + b"abc\n" + answer, frame("lookup", b"not json") + frame("lease", b"\xff\xfe")]


def videos() -> list[bytes]:
    import av

    out = []
    for fmt, codec, n in (("mpegts", "mpeg4", 5), ("avi", "mjpeg", 3), ("gif", "gif", 2), ("mp4", "mpeg4", 4)):
        buf = io.BytesIO()
        with av.open(buf, "w", format=fmt) as container:
            stream = container.add_stream(codec, rate=2)
            stream.width = stream.height = 16
            stream.pix_fmt = "rgb8" if codec == "gif" else "yuvj420p" if codec == "mjpeg" else "yuv420p"
            for i in range(n):
                img = np.full((16, 16, 3), 40 * i, dtype=np.uint8)
                container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            container.mux(stream.encode())
        out.append(buf.getvalue())
    return out


def corpus() -> dict[str, list[bytes]]:
    full = entry(extra=True)
    export_dir = tempfile.mkdtemp(prefix="mmc-seeds-")
    table = make_export(export_dir)
    read = lambda name: open(os.path.join(export_dir, name), "rb").read()  # noqa: E731
    seeds = {
        "entry_parser": [entry(), full, entry(dtype=np.float16, rows=1), full[:-3], full[:8] + b"{}",
                         entry(ns="x" * 128, rows=40)],
        "key_parser": [f"ns/{H}".encode(), f"alice@llava.f16.0123abcd/{H}".encode(), b"ns/", b"@/", b"a@b@c/d",
                       f"ns/{H.upper()}".encode()],
        "tenants_file": [b'"alice-token-0123456789abcdef" = "alice"\n"bob-token-0123456789abcdef" = '
                         b'{tenant = "bob", quota = "4GiB"}\n',
                         json.dumps({"tokens": {"tok-0123456789abcdef": {"tenant": "carol", "quota": 1000},
                                                "tok-abcdef0123456789": "dave"}}).encode(),
                         b'[tokens]\n"t-0123456789abcdef" = {tenant = "e", quota = 512}\n', b"{}", b'x = 1'],
        "unix_frames": unix_sessions(),
        "export_manifest": [read(MANIFEST)],
        "export_shard": [read(table[0]["name"]), read(table[-1]["name"])],
        "video_probe": videos(),
    }
    for name in os.listdir(export_dir):
        os.unlink(os.path.join(export_dir, name))
    os.rmdir(export_dir)
    return seeds


def main() -> None:
    for target, inputs in corpus().items():
        folder = os.path.join(HERE, "corpus", target)
        os.makedirs(folder, exist_ok=True)
        for old in os.listdir(folder):
            os.unlink(os.path.join(folder, old))
        for i, data in enumerate(inputs):
            with open(os.path.join(folder, f"seed-{i:02d}"), "wb") as f:
                f.write(data)
        print(f"{target}: {len(inputs)} seeds")


if __name__ == "__main__":
    main()
