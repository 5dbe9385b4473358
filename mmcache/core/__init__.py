"""The cache itself, whatever its tiers: the store that stacks them, the tier interface, eviction
policies, the arena allocator, leases, claims, events, tenant quotas and the data dir."""
