"""The router (``mmcache-llm router``): the OpenAI-compatible front door that sends each request
through encode, prefill and decode workers, across node groups."""
