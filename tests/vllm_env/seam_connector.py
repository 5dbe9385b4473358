"""Test seam (LMCache's TOCTOU test, on a real vLLM): ``SeamECConnector`` is the real connector
with one thing added: before the worker loads, it deletes from the sidecar the entries whose
hashes are listed in the file ``$MMCACHE_TEST_SEAM_FILE``, so the scheduler's lookup found them
and the worker's load does not. It appends ``deleted <hash>`` to ``<file>.done`` for each."""

from __future__ import annotations

import os

from mmcache_client import CacheClient
from mmcache_client.vllm.connector import MMCacheECConnector


class SeamECConnector(MMCacheECConnector):
    def start_load_caches(self, encoder_cache, **kwargs) -> None:
        path = os.environ.get("MMCACHE_TEST_SEAM_FILE")
        meta = self._get_connector_metadata()
        if path and os.path.exists(path) and meta.loads:
            doomed = set(open(path).read().split())
            with CacheClient(self.settings.url) as client, open(path + ".done", "a") as done:
                for item in meta.loads:
                    if item.hash in doomed and client.delete(self.namespace, item.hash):
                        done.write(f"deleted {item.hash}\n")
        super().start_load_caches(encoder_cache, **kwargs)
