"""KV hand-off prefill → decode through the sidecar, measured against a memcpy of the same bytes.

    python benchmarks/bench_kv.py [--repeats 5] [--tokens 700]

Per KV shape (the small benchmark model, LLaVA-1.5-7B, Qwen2-VL-7B), the median of:
- put:    the prefill side: ``AsyncCacheClient.put`` over the Unix socket, the entry written in
          place into the shared arena (one copy, checksummed while hot);
- take:   the decode side: get (a read-only view of the arena), ``read_prefill``, the copy of
          K and V into decode's own buffer, release and delete;
- http:   the same bytes PUT and GET over HTTP, as a worker on another node would;
- memcpy: one copy of the KV bytes (the physical floor of an in-memory hand-off; put + take
          do two: into the arena and out of it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# NOTE: benchmarks/ is a folder of scripts; they share hostinfo.py from it.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostinfo import describe
from mmcache_client import AsyncCacheClient

from llm_worker.engine.kv import KVCache, PrefillResult, kv_entry_fields, kv_key, read_prefill

SHAPES = (  # name, layers, kv heads, head dim, dtype
    ("llava-clip-l336-small fp32", 12, 4, 64, torch.float32),
    ("Qwen2-VL-7B fp16 (GQA 4)", 28, 4, 128, torch.float16),
    ("LLaVA-1.5-7B fp16", 32, 32, 128, torch.float16),
)


def start_sidecar(workdir: str, capacity: str) -> tuple[subprocess.Popen, str, str]:
    sock = os.path.join(workdir, "s.sock")
    proc = subprocess.Popen([sys.executable, "-m", "mmcache.cli", "serve", "--data-dir", os.path.join(workdir, "data"),
                             "--port", "0", "--socket", sock, "--host-capacity", capacity, "--max-entry-size", "1GiB",
                             "--log-level", "warning"],
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        match = re.match(r"mmcache ready: (?P<url>http://\S+)", line)
        if match:
            return proc, match["url"], f"unix://{sock}"
    raise RuntimeError(f"the sidecar exited with {proc.wait()}")


async def bench_shape(unix: AsyncCacheClient, http: AsyncCacheClient, layers: int, heads: int, head_dim: int,
                      dtype: torch.dtype, tokens: int, repeats: int) -> dict:
    shape = (layers, heads, tokens, head_dim)
    result = PrefillResult("bench.model", 7, KVCache(torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)),
                           torch.randn(32000), 12.5)
    fields = kv_entry_fields(result)
    dest = (torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype))
    nbytes = result.kv.nbytes
    times: dict[str, list[float]] = {"put": [], "take": [], "http": [], "memcpy": []}
    for i in range(repeats + 1):  # NOTE: the first round warms the arena pages and the connections
        key = kv_key("bench.model", f"req-{i}-{time.monotonic_ns()}")
        t0 = time.perf_counter()
        assert await unix.put(key.namespace, key.hash, **fields)
        t1 = time.perf_counter()
        async with await unix.get(key.namespace, key.hash) as entry:
            got = read_prefill(entry)
            dest[0].copy_(got.kv.keys)
            dest[1].copy_(got.kv.values)
        await unix.delete(key.namespace, key.hash)
        t2 = time.perf_counter()
        hkey = kv_key("bench.model", f"http-{i}-{time.monotonic_ns()}")
        t3 = time.perf_counter()
        await http.put(hkey.namespace, hkey.hash, **fields)
        async with await http.get(hkey.namespace, hkey.hash) as entry:
            got = read_prefill(entry)
            dest[0].copy_(got.kv.keys)
            dest[1].copy_(got.kv.values)
        t4 = time.perf_counter()
        await http.delete(hkey.namespace, hkey.hash)
        t5 = time.perf_counter()
        dest[0].copy_(result.kv.keys)
        dest[1].copy_(result.kv.values)
        t6 = time.perf_counter()
        if i:
            for name, dt in (("put", t1 - t0), ("take", t2 - t1), ("http", t4 - t3), ("memcpy", t6 - t5)):
                times[name].append(dt * 1e3)
    assert torch.equal(dest[0], result.kv.keys)
    return {"nbytes": nbytes, **{k: statistics.median(v) for k, v in times.items()}}


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="mmc-kv-", dir="/tmp") as workdir:
        proc, http_url, unix_url = start_sidecar(workdir, args.capacity)
        try:
            async with AsyncCacheClient(unix_url) as unix, AsyncCacheClient(http_url) as http:
                print(f"machine: {describe(torch=True)}; {args.tokens} prompt tokens; median of {args.repeats}")
                print("| KV of | MiB | memcpy ms | put ms | take ms | put+take / memcpy | http put+get ms |")
                print("|---|---|---|---|---|---|---|")
                for name, layers, heads, head_dim, dtype in SHAPES:
                    r = await bench_shape(unix, http, layers, heads, head_dim, dtype, args.tokens, args.repeats)
                    print(f"| {name} | {r['nbytes'] / 2**20:.1f} | {r['memcpy']:.1f} | {r['put']:.1f} | "
                          f"{r['take']:.1f} | {(r['put'] + r['take']) / r['memcpy']:.1f}x | {r['http']:.1f} |",
                          flush=True)
        finally:
            proc.terminate()
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=700, help="prompt tokens (one 576-token image plus text)")
    p.add_argument("--capacity", default="2GiB", help="the sidecar's arena")
    asyncio.run(run(p.parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
