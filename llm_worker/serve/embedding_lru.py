"""The aggregated baseline's in-process encoder cache: image embeddings by content hash in an
LRU bounded in bytes, inside the one worker that encodes, prefills and decodes — what vLLM keeps
in its engine (its encoder cache), so the EPD benchmark can separate what the cache buys from what
disaggregation buys. Not shared between processes, not persistent; used from one thread."""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any


class EmbeddingLRU:
    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"{capacity_bytes=} must be >= 0")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, Any] = OrderedDict()
        """Key → an ``EncodedImage`` (its ``embeddings`` and the ``extras`` such as grids)."""
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> Any | None:
        encoded = self._entries.get(key)
        if encoded is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return encoded

    def put(self, key: str, encoded: Any) -> None:
        """Keep ``encoded`` (an ``EncodedImage``; not copied: the caller hands it over); one larger
        than the whole capacity is not kept."""
        tensor = encoded.embeddings
        nbytes = tensor.numel() * tensor.element_size()
        if key in self._entries or nbytes > self.capacity_bytes:
            return
        if tensor.untyped_storage().nbytes() > nbytes:
            # NOTE: a view of a batch's output would pin the whole batch
            encoded = dataclasses.replace(encoded, embeddings=tensor.clone())
        while self.bytes + nbytes > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= old.embeddings.numel() * old.embeddings.element_size()
            self.evictions += 1
        self._entries[key] = encoded
        self.bytes += nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        return {"capacity_bytes": self.capacity_bytes, "bytes": self.bytes, "entries": len(self),
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
