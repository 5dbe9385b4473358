"""The local fast path against its floors, with the sidecar in its own process, in one run.

    python benchmarks/fast_path.py [--sizes 64KiB,4.5MiB,64MiB] [--repeats 400] [--no-redis]

For each entry size (bf16 embeddings of hidden 4096: 4.5 MiB is LLaVA's 576 tokens):
- get (unix):        ``CacheClient("unix://")`` get -> ``.tensor`` -> close (lease, view, release)
- get_many N:        one ``get_many`` of N keys -> each ``.tensor`` -> close, per key
- put (unix):        ``put`` of a fresh key (reserve, fill + checksum, seal); host-only and
                     write-through (the disk copy runs in the sidecar, waited for untimed)
- memcpy:            ``np.copyto`` of the same bytes into pre-faulted memory (the physical floor
                     of any put into shared memory)
- HTTP GET:          ``CacheClient("http://")`` get (the entry over loopback TCP, verified)
- redis-py GET:      ``redis.Redis(...).get`` of the same bytes from a loopback ``redis-server``
                     (started here with a free port; skipped if none is installed)
- socketpair:        a 16-byte round trip to another process over a Unix socketpair (the floor
                     of any local control message)

Targets: get of 4.5 MiB <= 30 us median and <= 0.1x its memcpy; get_many of 10 <= 3 us
per key beyond the first; put >= 80% of memcpy bandwidth at 4.5 MiB; HTTP GET <= redis-py GET;
get flat in size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hostinfo import describe
from mmcache_client import CacheClient, content_hash

from mmcache.sidecar.config import parse_size
from mmcache.common.progress import Progress, human_bytes

NS = "bench"
HIDDEN = 4096


def stats_us(times_ns: list[int]) -> tuple[float, float]:
    s = sorted(times_ns)
    return statistics.median(s) / 1e3, s[min(len(s) - 1, int(len(s) * 0.99))] / 1e3


def timed(fn, repeats: int, setup=None) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        t0 = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t0)
    return stats_us(times)


class Sidecar:
    """``mmcache serve`` in its own process, on a free port and a Unix socket."""

    def __init__(self, tmp: str, host_bytes: int, name: str = "s", extra: tuple[str, ...] = ()):
        self.sock = os.path.join(tmp, f"{name}.sock")
        cmd = [sys.executable, "-m", "mmcache.cli", "serve", "--port", "0", "--data-dir", os.path.join(tmp, name),
               "--socket", self.sock, "--host-capacity", str(host_bytes), "--disk-capacity", str(4 * host_bytes),
               *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.proc.stdout:
            if line.startswith("mmcache ready"):
                self.port = int(line.split()[2].rsplit(":", 1)[1])
                threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
                return
        raise RuntimeError(f"the sidecar did not start (exit {self.proc.wait()})")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


class Redis:
    """A loopback ``redis-server`` with no persistence, health-checked with PING."""

    def __init__(self, tmp: str):
        import redis

        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed")
        for _ in range(5):  # NOTE: a free port may be taken between probe and bind: try another
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            self.proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                          "no", "--dir", tmp, "--protected-mode", "yes"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.client = redis.Redis(host="127.0.0.1", port=port)
            deadline = time.monotonic() + 10
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    self.client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.01)
            self.stop()
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def socketpair_floor(repeats: int) -> tuple[float, float]:
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo process
        a.close()
        try:
            while data := b.recv(64):
                b.sendall(data)
        finally:
            os._exit(0)
    b.close()
    msg = b"x" * 16

    def once():
        a.sendall(msg)
        a.recv(64)

    for _ in range(100):
        once()
    out = timed(once, repeats)
    a.close()
    os.waitpid(pid, 0)
    return out


def payload(nbytes: int, seed: int) -> torch.Tensor:
    rows = nbytes // (HIDDEN * 2)
    return torch.full((rows, HIDDEN), float(seed % 200), dtype=torch.bfloat16)


def bench_size(unix: CacheClient, http: CacheClient, redis_client, nbytes: int, repeats: int) -> dict:
    row: dict = {"nbytes": nbytes}
    reps = repeats if nbytes <= 8 << 20 else max(20, repeats // 10)
    distinct = 100 if nbytes <= 8 << 20 else 10
    keys = [content_hash(f"{nbytes}-{i}".encode()) for i in range(distinct)]
    t = payload(nbytes, 1)
    for k in keys:
        unix.put(NS, k, t, persist=False)

    def get():
        with unix.get(NS, keys[0]) as e:
            e.tensor
    get()
    row["get"] = timed(get, reps)
    for n in (1, 10, 100):
        batch = [f"{NS}/{keys[i % distinct]}" for i in range(n)]

        def get_many():
            with unix.get_many(batch) as entries:
                for e in entries:
                    e.tensor
        get_many()
        med, p99 = timed(get_many, max(20, reps // max(1, n // 10)))
        row[f"get_many {n}"] = (med / n, p99 / n, med)
    counter = iter(range(10**9))

    fresh: list[str] = []

    def put(persist: bool):
        def once():
            fresh.append(content_hash(f"put-{nbytes}-{next(counter)}".encode()))
            unix.put(NS, fresh[-1], t, persist=persist)
        return once

    def forget():  # NOTE: untimed; the put keys must not evict the read ones
        _drain(unix)
        while fresh:
            unix.delete(NS, fresh.pop())
    src = t.view(torch.uint8).numpy().reshape(-1)
    # NOTE: pre-faulted destinations, rotated through 512 MiB, so each copy lands in cold memory
    # as a put into the arena does
    dsts = [np.ones_like(src) for _ in range(max(2, (512 << 20) // nbytes))]
    rotate = iter(range(10**9))
    put_reps = max(10, reps // 4)
    group = max(1, min(10, (256 << 20) // nbytes))  # fresh keys at once: within the arena's headroom
    for name, persist in (("put host-only", False), ("put", True)):
        times: list[int] = []
        once = put(persist)
        while len(times) < put_reps:  # NOTE: in groups, the clean-up between them untimed
            forget()
            for _ in range(min(group, put_reps - len(times))):
                t0 = time.perf_counter_ns()
                once()
                times.append(time.perf_counter_ns() - t0)
        row[name] = stats_us(times)
    forget()
    row["memcpy"] = timed(lambda: np.copyto(dsts[next(rotate) % len(dsts)], src), put_reps)
    del dsts

    def http_get():
        with http.get(NS, keys[0]) as e:
            e.tensor
    http_get()
    row["HTTP GET"] = timed(http_get, max(10, reps // 4))
    if redis_client is not None:
        blob = bytes(unix.get(NS, keys[0]).buffer)
        redis_client.set("bench", blob)
        redis_client.get("bench")
        row["redis-py GET"] = timed(lambda: redis_client.get("bench"), max(10, reps // 4))
        redis_client.delete("bench")
    for k in keys:
        unix.delete(NS, k)
    return row


_SENTINEL = iter(range(10**9))


def _drain(client: CacheClient) -> None:
    """Wait (untimed) until the sidecar's disk writer has committed what came before: a durable
    put is acknowledged once committed, and the writer commits in order."""
    key = content_hash(f"sentinel-{next(_SENTINEL)}".encode())
    client.put(NS, key, torch.zeros(1, 8), durable=True)
    client.delete(NS, key)


def print_rows(rows: list[dict], floor: tuple[float, float]) -> list[str]:
    lines = [f"socketpair round trip (the floor of a control message): median {floor[0]:.1f} us, p99 {floor[1]:.1f} us", ""]
    head = "| op | " + " | ".join(f"{r['nbytes'] / 2**20:g} MiB" for r in rows) + " |"
    lines += [head, "|---" * (len(rows) + 1) + "|"]
    for name in ("get", "get_many 1", "get_many 10", "get_many 100", "put host-only", "put", "memcpy", "HTTP GET",
                 "redis-py GET"):
        if name not in rows[0]:
            continue
        cells = []
        for r in rows:
            med, p99 = r[name][:2]
            cell = f"{med:.1f} / {p99:.1f}"
            if name.startswith("put") or name == "memcpy" or "GET" in name:
                cell += f" ({r['nbytes'] / med / 1e3:.1f} GB/s)"
            cells.append(cell)
        label = name + (" (us per key, median / p99)" if name.startswith("get_many") else " (us, median / p99)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in rows:
        mib = r["nbytes"] / 2**20
        get_med, memcpy_med, put_med = r["get"][0], r["memcpy"][0], r["put host-only"][0]
        beyond = (r["get_many 10"][2] - r["get_many 1"][2]) / 9
        verdicts = [f"get {get_med:.1f} us = {get_med / memcpy_med:.3f}x memcpy",
                    f"get_many 10: {beyond:.1f} us per key beyond the first",
                    f"put at {memcpy_med / put_med:.0%} of memcpy (host-only), {memcpy_med / r['put'][0]:.0%} write-through"]
        if "redis-py GET" in r:
            verdicts.append(f"HTTP GET {r['HTTP GET'][0] / r['redis-py GET'][0]:.2f}x redis-py")
        lines.append(f"{mib:g} MiB: " + "; ".join(verdicts))
    return lines


def lines(sizes: list[int], repeats: int, use_redis: bool = True, host_bytes: int | None = None) -> list[str]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        sidecar = Sidecar(tmp, host_bytes or max(1 << 30, 20 * max(sizes)))
        redis_server = None
        if use_redis:
            try:
                redis_server = Redis(tmp)
            except (FileNotFoundError, ImportError, RuntimeError) as e:
                out.append(f"(redis-py GET skipped: {e})")
        unix = CacheClient(f"unix://{sidecar.sock}")
        http = CacheClient(f"http://127.0.0.1:{sidecar.port}")
        try:
            rows = []
            # NOTE: progress on stderr per entry size, never inside a timed loop
            with Progress("fast path", total=len(sizes), unit="sizes") as progress:
                for n in sizes:
                    rows.append(bench_size(unix, http, redis_server.client if redis_server else None, n, repeats))
                    progress.note(f"{human_bytes(n)} entries measured")
                    progress.update(1)
        finally:
            unix.close()
            http.close()
            sidecar.stop()
            if redis_server is not None:
                redis_server.stop()
        floor = socketpair_floor(2000)
    out.append(f"the sidecar in its own process; medians and p99 of up to {repeats} repeats; bf16, hidden {HIDDEN}")
    return out + print_rows(rows, floor)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64KiB,4.5MiB,64MiB")
    ap.add_argument("--repeats", type=int, default=400)
    ap.add_argument("--no-redis", action="store_true")
    args = ap.parse_args()
    print(f"machine: {describe(torch=True)}")
    print("\n".join(lines([parse_size(s) for s in args.sizes.split(",")], args.repeats, not args.no_redis)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
