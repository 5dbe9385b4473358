"""``mmcache up``: one command that starts a sidecar, encoders, LLM workers and a router (and a
local Redis cluster), supervises them and stops them."""
