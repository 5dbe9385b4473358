"""The remote tier: entry blobs in a Redis or Valkey server or cluster, shared by many sidecars.

Keys are ``mmc:v1:<stored key>`` (``ns/hash``, or ``tenant@ns/hash`` for a tenant's entry) and
values the entry blob, unchanged (``docs/operating.md``, "Many nodes, one cache").

- Reads (``contains``, ``lease``) go to the remote with a bounded timeout. A value that fails
  verification (truncated, corrupt, another key's) is a miss, and it is deleted there.
- Puts are write-behind: queued (bounded in bytes; a full queue drops and counts, never blocks),
  written by one thread in pipelined batches of ``SET NX`` (the first writer wins), with an
  optional TTL. The caller keeps the blob valid until the put's Future resolves.
- A circuit breaker: ``breaker_failures`` errors in a row mark the remote down; while it is down
  every call is a miss (reads) or a drop (writes) at once, without touching the network, and a
  thread of its own tries to reconnect once per ``retry_s`` (never a request: no request waits
  for a probe). The client makes no retries of its own: a call costs at most the timeout. The
  remote failing never fails the sidecar.

The tier is not durable for the host tier's purposes (``durable = False``): host evictions never
wait for it, and puts never ask it whether a key exists (that would put a network round trip on
every put).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import urllib.parse
from concurrent.futures import Future
from typing import Any, Callable, ClassVar

from mmcache.tiers.remote_config import RemoteConfig, RemoteURLError, parse_remote_url
from mmcache.tiers.remote_coord import WAKE, RemoteCoordination, RemoteDown, close_quietly
from mmcache.core.tier import Owner, PutStatus, Tier, TierLease, done
from mmcache_client.format import EntryFormatError, read_entry

logger = logging.getLogger(__name__)

KEY_PREFIX = "mmc:v1:"

class RemoteTier(Tier):
    name: ClassVar[str] = "remote"
    durable: ClassVar[bool] = False

    def __init__(self, config: RemoteConfig, *, verify_key: Callable[[str, Any], None] | None = None,
                 node: str = "", on_event: Callable[[dict], None] | None = None,
                 on_stored: Callable[[str, int], None] | None = None):
        """``node``: this sidecar's name in events; ``on_event``: called (from a thread) with
        each other node's event read from the stream; ``on_stored``: called with (key, nbytes)
        once a write-behind put is on the remote."""
        import redis  # NOTE: only with --remote

        self._redis = redis
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, redis.exceptions.RedisClusterException,
                                                         OSError)
        """What a call to the remote may raise when the remote (or a cluster node) is away; the
        cluster client's own exception is not a ``RedisError``."""
        self.config = config
        self.address = parse_remote_url(config.url)
        self._verify_key = verify_key
        self._lock = threading.Lock()
        self._client: Any = None
        self.cluster = False
        self._up = False
        self._failures = 0
        self._retry_at = 0.0
        self._counts = dict(hits=0, misses=0, errors=0, dropped=0, bytes_written=0, writes=0, corrupt=0,
                            exists=0, oversize=0)
        self._queued_bytes = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self.node, self._on_stored = node, on_stored
        self._stop = threading.Event()
        self._down = threading.Event()
        """Set while the remote is down: the reconnect thread's cue."""
        self.coord = RemoteCoordination(
            call=self._call, errors=self._errors, new_client=self._new_client, is_up=lambda: self._up,
            wake=lambda: self._queue.put(WAKE), node=node, on_event=on_event, retry_s=config.retry_s,
            timeout_s=config.timeout_ms / 1000, stop=self._stop)
        """Cluster-wide claims and inventory events over this tier's connection."""
        self._reconnector = threading.Thread(target=self._reconnect_loop, name="mmcache-remote-reconnect", daemon=True)
        self._reconnector.start()
        try:
            self._connect()
        except self._errors as e:
            if config.required:
                raise ConnectionError(f"--remote {config.url}: cannot reach it ({e}); "
                                      "start without --remote-required to run with it marked down") from None
            logger.warning("remote %s unreachable at start (%s); running with it marked down", config.url, e)
            self._mark_down()
        self._writer = threading.Thread(target=self._write_loop, name="mmcache-remote-writer", daemon=True)
        self._writer.start()
        self._reader: threading.Thread | None = None
        if on_event is not None:
            self._reader = threading.Thread(target=self.coord.read_loop, name="mmcache-remote-events", daemon=True)
            self._reader.start()

    # ------------------------------------------------------------ connection and breaker
    def _connect(self) -> None:
        client, enabled = self._new_client(self.config.timeout_ms / 1000)
        with self._lock:
            old, self._client, self.cluster = self._client, client, enabled
            self._up, self._failures = True, 0
        self.coord.forget_scripts()
        if old is not None:
            close_quietly(old)
        logger.info("remote %s up (%s)", self.config.url, "cluster" if enabled else "single server")

    def _new_client(self, timeout: float) -> tuple[Any, bool]:
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        redis, addr = self._redis, self.address
        # NOTE: no retries in the client, ever: redis-py's default retries a failed command with
        # exponential backoff (seconds of sleep inside one request while the remote is dead);
        # here one attempt is bounded by the timeout, and the breaker decides what comes next.
        common = dict(username=addr.username, password=addr.password, socket_timeout=timeout,
                      socket_connect_timeout=timeout, ssl=addr.tls, retry=Retry(NoBackoff(), 0))
        host, port = addr.nodes[0]
        probe = redis.Redis(host=host, port=port, **common)
        try:
            enabled = int(probe.info("cluster").get("cluster_enabled", 0)) == 1
        finally:
            probe.close()
        if enabled:
            from redis.cluster import ClusterNode, RedisCluster

            client = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in addr.nodes], **common)
        else:
            if len(addr.nodes) > 1:
                raise RemoteURLError(f"--remote {self.config.url}: several hosts given but {host}:{port} "
                                     "is not in cluster mode")
            client = redis.Redis(host=host, port=port, **common)
        try:
            client.ping()
        except BaseException:
            close_quietly(client)
            raise
        return client, enabled

    def _mark_down(self) -> None:
        with self._lock:
            was_up, self._up = self._up, False
            self._retry_at = time.monotonic() + self.config.retry_s
        if was_up:
            logger.warning("remote %s marked down; reconnecting every %.1f s off the request path",
                           self.config.url, self.config.retry_s)
        self._down.set()

    def _reconnect_loop(self) -> None:
        """While the remote is down: one reconnect per ``retry_s``, on this thread, so that no
        request ever waits for a probe (a request meanwhile is a miss or a drop at once)."""
        while not self._stop.is_set():
            self._down.wait()
            if self._stop.wait(self.config.retry_s):
                return
            with self._lock:
                if self._up:
                    self._down.clear()
                    continue
            try:
                self._connect()
                self._down.clear()
            except self._errors as e:
                self._count("errors")
                logger.debug("remote %s still down: %s", self.config.url, e)

    def _call(self, fn: Callable[[Any], Any]) -> Any:
        """``fn(client)`` under the breaker; raises ``RemoteDown`` or the client's error."""
        with self._lock:
            up, client = self._up, self._client
        if not up:
            raise RemoteDown(f"remote {self.config.url} is down")
        try:
            out = fn(client)
        except self._errors:
            self._count("errors")
            with self._lock:
                self._failures += 1
                trip = self._failures >= self.config.breaker_failures
            if trip:
                self._mark_down()
            raise
        with self._lock:
            self._failures = 0
        return out

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    @staticmethod
    def remote_key(key: str) -> str:
        return KEY_PREFIX + key

    # ------------------------------------------------------------ reads
    def contains(self, key: str) -> bool:
        try:
            return bool(self._call(lambda c: c.exists(self.remote_key(key))))
        except (RemoteDown, *self._errors):
            return False

    def _fetch(self, client: Any, rkey: str) -> bytes | None:
        """The value at ``rkey`` if it is at most ``max_entry_bytes`` long: one round trip
        (``STRLEN`` and a bounded ``GETRANGE``, pipelined on the key's node); a longer one is a
        miss of which at most ``max_entry_bytes + 1`` bytes were read."""
        limit = self.config.max_entry_bytes
        pipe = client.pipeline(transaction=False)
        pipe.strlen(rkey)
        pipe.getrange(rkey, 0, limit)  # NOTE: inclusive end: limit + 1 bytes at most
        size, blob = pipe.execute()
        if int(size) > limit:
            self._count("oversize")
            logger.warning("remote entry %s is %d bytes, over --max-entry-size %d: a miss", rkey, int(size), limit)
            return None
        return blob or None

    def lease(self, key: str, owner: Owner, *, count: bool = True) -> TierLease | None:
        try:
            blob = self._call(lambda c: self._fetch(c, self.remote_key(key)))
        except (RemoteDown, *self._errors) as e:
            logger.debug("remote read of %s failed: %s", key, e)
            blob = None
        if blob is not None:
            try:
                view = read_entry(blob, verify=True)
                if self._verify_key is not None:
                    self._verify_key(key, view)
            except (EntryFormatError, ValueError) as e:
                logger.warning("remote entry %s is unreadable (%s); deleting it", key, e)
                self._count("corrupt")
                self.delete(key)
                blob = None
        if count:
            self._count("hits" if blob is not None else "misses")
        if blob is None:
            return None
        return TierLease(self.name, key, owner, len(blob), memoryview(blob))

    def release(self, lease: TierLease) -> bool:
        return True  # NOTE: the blob is this process's own copy; nothing is pinned remotely

    def release_owner(self, owner: Owner) -> int:
        return 0

    # ------------------------------------------------------------ writes
    def put(self, key: str, blob: memoryview, cost_ms: float = 0.0, *, verify: bool = False) -> Future:
        """Queue ``blob`` for the write-behind thread; the Future resolves once it is written
        (``CREATED``, or ``EXISTS`` where another writer was first), or at once with ``NO_SPACE``
        when the queue is full or the remote is down (a drop, counted)."""
        mv = memoryview(blob).cast("B")
        if verify:
            try:
                read_entry(mv, verify=True)
            except EntryFormatError as e:
                fut: Future = Future()
                fut.set_exception(e)
                return fut
        with self._lock:
            room = self._queued_bytes + mv.nbytes <= self.config.max_queued_bytes or not self._queued_bytes
            down = not self._up
            if self._closed or not room or down:
                self._counts["dropped"] += 1
                if not self._closed:
                    self.coord.end_claim(key)
                return done(PutStatus.NO_SPACE)
            self._queued_bytes += mv.nbytes
        fut = Future()
        self._queue.put((key, mv, fut))
        return fut

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                self.coord.send_events([])
                return
            batch = [] if item is WAKE else [item]
            nbytes = 0 if item is WAKE else item[1].nbytes
            while len(batch) < self.config.batch_max and nbytes < (32 << 20):
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # NOTE: stop after this batch
                    break
                if nxt is WAKE:
                    continue
                batch.append(nxt)
                nbytes += nxt[1].nbytes
            try:
                stored = self._write(batch) if batch else []
                self.coord.send_events(stored)
            except Exception:  # noqa: BLE001 - a bug here must not stop every later write
                logger.exception("remote writer: a batch of %d failed", len(batch))
                for _key, _mv, fut in batch:
                    if not fut.done():
                        fut.set_result(PutStatus.NO_SPACE)

    def _write(self, batch: list) -> list[str]:
        ttl = self.config.ttl_s

        def run(client):
            pipe = client.pipeline(transaction=False)
            for key, mv, _ in batch:
                pipe.set(self.remote_key(key), mv, nx=True, px=int(ttl * 1000) if ttl else None)
            return pipe.execute(raise_on_error=False)
        try:
            results = self._call(run)
        except (RemoteDown, *self._errors) as e:
            logger.debug("remote write of %s entries failed: %s", len(batch), e)
            results = [e] * len(batch)
        written = 0
        stored: list[str] = []
        for (key, mv, fut), result in zip(batch, results):
            with self._lock:
                self._queued_bytes -= mv.nbytes
            stored.append(key)  # NOTE: written or not, its claim ends (a failed write: others encode it)
            if isinstance(result, BaseException):
                self._count("dropped")
                fut.set_result(PutStatus.NO_SPACE)
                continue
            if result:
                written += mv.nbytes
                self._count("writes")
                if self._on_stored is not None:
                    try:
                        self._on_stored(key, mv.nbytes)
                    except Exception:  # noqa: BLE001 - a follower's trouble must not stop the writer
                        logger.exception("remote: publishing the stored event of %s failed", key)
                fut.set_result(PutStatus.CREATED)
            else:
                self._count("exists")
                fut.set_result(PutStatus.EXISTS)
        if written:
            self._count("bytes_written", written)
        return stored

    # ------------------------------------------------------------ claims and events (RemoteCoordination)
    def claim(self, key: str, owner: str, ttl_ms: int) -> tuple[bool, int] | None:
        return self.coord.claim(key, owner, ttl_ms)

    def release_claim(self, key: str, owner: str) -> int:
        return self.coord.release_claim(key, owner)

    def end_claim(self, key: str) -> None:
        self.coord.end_claim(key)

    def emit(self, event: Any) -> None:
        self.coord.emit(event)

    def delete(self, key: str) -> bool:
        try:
            return bool(self._call(lambda c: c.delete(self.remote_key(key))))
        except (RemoteDown, *self._errors):
            return False

    # ------------------------------------------------------------ the rest
    def stats(self) -> dict:
        with self._lock:
            return dict(up=self._up, cluster=self.cluster, queued=self._queue.qsize(), queued_bytes=self._queued_bytes,
                        url=_redacted(self.config.url), **self._counts,
                        events={**self.coord.event_counts, "queued": self.coord.events_queued()})

    def flush(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if not self._queued_bytes:
                    return
            if deadline is not None and time.monotonic() > deadline:
                return
            time.sleep(0.005)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._down.set()  # NOTE: wakes the reconnect thread, which sees the stop and ends
        self._queue.put(None)
        self._writer.join(max(5.0, 4 * self.config.timeout_ms / 1000))
        if self._reader is not None:
            self._reader.join(5.0)
        if self._client is not None:
            close_quietly(self._client)


def _redacted(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    if "@" not in parsed.netloc:
        return url
    return parsed._replace(netloc="***@" + parsed.netloc.rpartition("@")[2]).geturl()
