"""Saves off the forward's critical path: a bounded queue drained by one thread.

``offer`` never blocks the engine: it queues ``(key, tensor)`` and returns; past ``capacity``
queued outputs a save is dropped and counted (the image is simply not shared: the next engine
that needs it encodes it). The thread puts each entry straight into the arena's reservation on
the local path (a GPU tensor is copied device → shared memory once, after the event recorded at
``offer`` says the encoder's kernels have written it); a key that exists is not written again
(the sidecar answers "exists" at the reservation, before any byte moves). ``flush`` waits for
what is queued (vLLM's shutdown), bounded.

A claim this engine holds on a key whose save is dropped or fails is given back, so an engine
waiting for that entry encodes it itself now rather than at the claim's expiry.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from mmcache_client.errors import MMCacheError
from mmcache_client.vllm.counters import Counters
from mmcache_client.vllm.link import CacheLink

logger = logging.getLogger(__name__)


class SaveQueue:
    """Lifecycle: ``offer`` from the engine's thread → the ``mmcache-ec-saver`` thread puts →
    ``flush`` / ``close`` at shutdown."""

    def __init__(self, link: CacheLink, namespace: str, *, capacity: int, durable: bool, claim_owner: str | None,
                 counters: Counters):
        self._link, self._namespace = link, namespace
        self._capacity, self._durable, self._owner = capacity, durable, claim_owner
        self._counters = counters
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[str, Any, Any]] = collections.deque()
        self._unclaim: list[str] = []
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mmcache-ec-saver", daemon=True)
        self._thread.start()

    def offer(self, hash_hex: str, tensor: Any) -> bool:
        """Queue one save; False (dropped, counted, its claim given back) when full or closed."""
        ready = _ready_event(tensor)
        with self._cond:
            if self._closed or len(self._queue) >= self._capacity:
                self._counters.add("saves_dropped")
                self._unclaim.append(hash_hex)
                self._cond.notify()
                return False
            self._queue.append((hash_hex, tensor, ready))
            self._cond.notify()
        return True

    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + self._busy

    def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued is saved (or dropped); False if ``timeout_s`` ran out."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._busy or self._unclaim:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush (bounded), then stop the thread; what is still queued is dropped and counted."""
        flushed = self.flush(timeout_s)
        with self._cond:
            self._closed = True
            dropped = len(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if dropped:
            self._counters.add("saves_dropped", dropped)
        if not flushed:
            logger.warning("mmcache: %d save(s) still queued at shutdown after %.0f s; dropped", dropped, timeout_s)
        self._thread.join(timeout_s)
        self._link.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._unclaim and not self._closed:
                    self._cond.wait()
                if self._closed and not self._queue:
                    return
                unclaim, self._unclaim = self._unclaim, []
                item = self._queue.popleft() if self._queue else None
                self._busy = item is not None
            try:
                if unclaim and self._owner is not None:
                    self._release_claims(unclaim)
                if item is not None:
                    self._save(*item)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _save(self, hash_hex: str, tensor: Any, ready: Any) -> None:
        if ready is not None:
            ready.synchronize()  # NOTE: the encoder's kernels on the engine's stream wrote it
        t0 = time.perf_counter()
        created = None
        try:
            created = self._link.call(
                lambda c: c.put(self._namespace, hash_hex, tensor, durable=self._durable), None, "save")
        except MMCacheError as e:  # the sidecar answered: no room now, too large, refused
            logger.debug("mmcache: save of %s/%s refused: %s", self._namespace, hash_hex, e)
        self._counters.add("save_ms", (time.perf_counter() - t0) * 1000.0)
        if created is None:
            self._counters.add("save_errors")
            if self._owner is not None:
                self._release_claims([hash_hex])
            return
        if created:
            self._counters.add("saves")
            self._counters.add("saved_bytes", tensor.numel() * tensor.element_size())
        else:
            self._counters.add("saves_existing")

    def _release_claims(self, hashes: list[str]) -> None:
        keys = [f"{self._namespace}/{h}" for h in hashes]
        try:
            self._link.call(lambda c: c.release_claims(keys, self._owner), 0, "release claims")
        except MMCacheError as e:
            logger.debug("mmcache: giving back claims failed: %s", e)


def _ready_event(tensor: Any) -> Any:
    """A CUDA event recorded now on the current stream for a GPU tensor (None on the CPU)."""
    if getattr(tensor, "is_cuda", False):
        import torch

        event = torch.cuda.Event()
        event.record()
        return event
    return None
