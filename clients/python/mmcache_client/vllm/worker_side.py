"""The connector in vLLM's worker: loads into vLLM's encoder cache, saves out of it.

Imports no vLLM (its caller passes plain values). Per step:

- ``load(encoder_cache, loads, encode_list)``: one ``get_tensors`` round trip for all the step's
  items. On the CPU each tensor is a view of the arena that owns its lease (no copy): vLLM's
  encoder cache holds it until vLLM frees the entry (``free_encoder_mm_hashes``: the dict entry
  is popped), and the lease goes back when the last reference to those bytes goes. On a GPU it
  is a copy from the pinned arena made on a stream of its own (the SDK's ``device=`` path).
  Each tensor is checked against what vLLM expects (rows = the item's number of embeddings,
  width, dtype). An item that is not there (evicted or deleted since the scheduler's lookup,
  the sidecar gone, a wrong shape) costs no request: it is put on this step's encode list
  (vLLM's ``scheduled_encoder_inputs``, which the runner encodes right after the loads), so it
  is encoded here, and reported so the scheduler stops trusting its answer.
- ``save(encoder_cache, mm_hash)``: each newly encoded output is kept until the step ends, then
  queued for the saver thread (``mmcache_client.vllm.saver``): off the forward's critical path.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from mmcache_client.errors import MMCacheError
from mmcache_client.vllm.counters import Counters
from mmcache_client.vllm.keys import hash_for
from mmcache_client.vllm.link import CacheLink
from mmcache_client.vllm.saver import SaveQueue
from mmcache_client.vllm.scheduler_side import LoadItem

logger = logging.getLogger(__name__)

FLUSH_AT_SHUTDOWN_S = 10.0
MAX_HELD_SAVES = 64
"""Outputs held for the step's end at most (a runner that never ends its steps still saves)."""


class WorkerSide:
    """Lifecycle: built when vLLM makes the worker's connector → ``load`` / ``save`` per step →
    ``shutdown`` (flushes the saves, bounded)."""

    def __init__(self, load_link: CacheLink, saver: SaveQueue | None, namespace: str, counters: Counters, *,
                 device: Any, dtype: Any, widths: dict[str, int], default_width: int | None):
        self._link, self._saver, self._namespace = load_link, saver, namespace
        self._counters = counters
        self._device, self._dtype = device, dtype
        self._widths, self._default_width = widths, default_width
        self.vanished: list[str] = []
        """This step's items the scheduler found and the worker did not (for the scheduler)."""
        self._step_saves: list[tuple[str, Any]] = []
        """This step's outputs, saved once the step ends."""

    def load(self, encoder_cache: dict[str, Any], loads: list[LoadItem], encode_list: dict[str, list[int]] | None) -> None:
        todo = [item for item in loads if item.mm_hash not in encoder_cache]
        if not todo:
            return
        hashes = sorted({item.hash for item in todo})
        keys = [f"{self._namespace}/{h}" for h in hashes]
        t0 = time.perf_counter()
        try:
            tensors = self._link.call(lambda c: c.get_tensors(keys, device=self._device), None, "load")
        except MMCacheError as e:  # the sidecar refused the question: counted, encoded here
            logger.warning("mmcache: the sidecar refused a load: %s", e)
            tensors = None
        self._counters.add("load_ms", (time.perf_counter() - t0) * 1000.0)
        by_hash = dict(zip(hashes, tensors)) if tensors is not None else {}
        if tensors is None:
            self._counters.add("load_errors")
        loaded = loaded_bytes = 0
        for item in todo:
            tensor = by_hash.get(item.hash)
            why = "not in the cache any more" if tensor is None else self._unfit(tensor, item)
            if why is None:
                encoder_cache[item.mm_hash] = tensor
                loaded += 1
                loaded_bytes += tensor.numel() * tensor.element_size()
                continue
            if tensor is not None:
                self._counters.add("rejected")
            self._encode_here(item, why, encode_list)
        self._counters.add("loads", loaded)
        self._counters.add("loaded_bytes", loaded_bytes)
        del tensors, by_hash  # NOTE: leases of entries not handed to vLLM go back now

    def _unfit(self, tensor: Any, item: LoadItem) -> str | None:
        """Why ``tensor`` cannot stand for ``item``'s encoder output, or None."""
        width = self._widths.get(item.modality, self._default_width)
        if tensor.dim() != 2 or tensor.shape[0] != item.num_embeds or (width and tensor.shape[1] != width):
            return f"shape {list(tensor.shape)}, vLLM expects [{item.num_embeds}, {width or 'any'}]"
        if self._dtype is not None and tensor.dtype != self._dtype:
            return f"dtype {tensor.dtype}, vLLM expects {self._dtype}"
        return None

    def _encode_here(self, item: LoadItem, why: str, encode_list: dict[str, list[int]] | None) -> None:
        self._counters.add("vanished")
        self.vanished.append(item.mm_hash)
        logger.debug("mmcache: %s/%s (%s): %s; encoding it here", self._namespace, item.hash, item.mm_hash, why)
        if encode_list is None:  # NOTE: only a vLLM whose runner encodes from the step's list
            raise RuntimeError(f"mmcache: {item.mm_hash} {why} and this vLLM gave no encode list to add it to")
        indices = encode_list.setdefault(item.req_id, [])
        if item.index not in indices:
            indices.append(item.index)

    def save(self, encoder_cache: dict[str, Any], mm_hash: str) -> None:
        """Keep the output for the saver; it is handed over when the step ends (``end_step``).

        NOTE: the encoder output is saved mid-step (right after the encoder, before the language
        model runs); a save running then would share the step's cores with the forward (on a
        machine with no spare core, ~30 ms of a step measured), so it waits for the step's end."""
        if self._saver is None:
            return
        tensor = encoder_cache.get(mm_hash)
        if tensor is None or getattr(tensor, "dim", lambda: 0)() != 2:
            self._counters.add("save_errors")  # NOTE: an entry is [num_tokens, hidden]
            return
        self._step_saves.append((hash_for(mm_hash), tensor))
        if len(self._step_saves) >= MAX_HELD_SAVES:
            self.end_step()

    def end_step(self) -> None:
        """The step is over: its outputs go to the saver thread."""
        saves, self._step_saves = self._step_saves, []
        for hash_hex, tensor in saves:
            self._saver.offer(hash_hex, tensor)

    def take_report(self) -> tuple[dict[str, float], list[str]]:
        """At the step's end (vLLM's ``build_connector_worker_meta``): the saves go, and the step's
        counters and vanished items are reported."""
        if self._step_saves:
            self.end_step()
        vanished, self.vanished = self.vanished, []
        return self._counters.take(), vanished

    def pending_saves(self) -> int:
        return self._saver.pending() if self._saver is not None else 0

    def shutdown(self) -> None:
        if self._saver is not None:
            self.end_step()
            self._saver.close(FLUSH_AT_SHUTDOWN_S)
        self._link.close()
