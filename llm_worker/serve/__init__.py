"""The LLM worker process (``mmcache-llm serve --role prefill|decode|both``): its HTTP face, its
service over the engine and the cache, its config, and the aggregated baseline's in-process LRU."""
