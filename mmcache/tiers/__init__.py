"""The tiers the store stacks, each with its parts: host (a shared-memory arena), disk (LMDB),
device (GPU memory) and remote (a Redis cluster). Adding a tier is adding a file here that
implements ``mmcache.core.tier.Tier``."""
