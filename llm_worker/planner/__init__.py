"""``mmcache plan``: stage costs measured on this machine, seeded workloads, a discrete-event
simulator of EPD and aggregated serving, and the search for the best allocation."""
